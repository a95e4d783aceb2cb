//! The floor of a Tokio proxy: a TCP relay that parses nothing and pools
//! nothing. Each client gets its own PostgreSQL connection and one task
//! that copies bytes both ways (`copy_bidirectional`). bench.sh runs it as
//! the target "tokio-relay", beside PgBouncer, the HAProxy relay and
//! pgferry, to show how much of pgferry's CPU per transaction is the
//! runtime's own cost per round trip (BENCHMARKS.md, session 13).
//!
//! Usage: tokio-relay LISTEN_ADDR UPSTREAM_ADDR [THREADS]
//! THREADS: 1 (default) is a current-thread runtime; more is Tokio's
//! multi-thread (work-stealing) runtime with that many workers.

use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: tokio-relay LISTEN_ADDR UPSTREAM_ADDR [THREADS]";
    let listen: SocketAddr = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let upstream: SocketAddr = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let threads: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(1);
    let rt = match threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(relay(client, upstream));
        }
    })
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}
