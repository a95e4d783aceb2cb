//! The HTTP listener (default 127.0.0.1:8404): `/metrics` in the Prometheus
//! text format, `/health` (the process is up), `/ready` (a leader is
//! confirmed for the read-write port), and `/`, a plain HTML status page
//! that refreshes itself.
//!
//! A few GET requests a second at most: a minimal HTTP/1.1 responder (one
//! request per connection, bounded request size and time) is all it needs.
//! Every value is computed at request time from the same counters the
//! admin console reads.

mod metrics;
mod page;

use crate::clients::ClientRegistry;
use crate::shared::{Observability, PoolRegistry};
use metrics::metrics;
use page::status_page;
use pgferry_pool::Pool;
use pgferry_routing::Router;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const MAX_REQUEST: usize = 8192;

/// What the endpoints read: counters and events, the pools, the topology,
/// and the clients (for the servers they hold).
pub struct View {
    pub obs: Arc<Observability>,
    pub pools: Arc<PoolRegistry>,
    pub router: Router,
    pub clients: Arc<ClientRegistry>,
    pub tls: Arc<pgferry_tls::Acceptor>,
}

/// Serves until `shutdown` turns true.
pub async fn serve(listener: TcpListener, view: Arc<View>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let view = view.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, &view)).await;
        });
    }
}

async fn handle(mut stream: TcpStream, view: &View) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(buf.split(|b| *b == b'\r').next().unwrap_or_default()).into_owned();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(&view.obs, &view.pools, &view.router, &view.tls),
        ),
        ("GET" | "HEAD", "/health") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET" | "HEAD", "/ready") => {
            if view.router.topology().primary.is_some() {
                ("200 OK", "text/plain", "ready: a leader is confirmed\n".to_owned())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready: no confirmed leader\n".to_owned(),
                )
            }
        }
        ("GET" | "HEAD", "/") => ("200 OK", "text/html; charset=utf-8", status_page(view)),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_owned()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

fn pools(registry: &PoolRegistry) -> Vec<Arc<Pool>> {
    let mut p = registry.all();
    p.sort_by(|a, b| {
        (
            &a.key.database,
            &a.key.user,
            a.key.read_only,
            &a.key.node.host,
            a.key.node.port,
        )
            .cmp(&(
                &b.key.database,
                &b.key.user,
                b.key.read_only,
                &b.key.node.host,
                b.key.node.port,
            ))
    });
    p
}

/// Escapes text for HTML, in content and in quoted attributes.
fn html(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
