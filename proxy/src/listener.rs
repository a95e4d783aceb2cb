//! Listeners: accept, cap the number of clients, hand each to a task.

use crate::pending::Full;
use crate::shared::Shared;
use pgferry_protocol::encode::{self, Severity};
use pgferry_protocol::sqlstate;
use pgferry_routing::Role;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Binds a listening socket with SO_REUSEADDR, the configured backlog and,
/// with `reuse_port` (`[listen] reuse_port`), SO_REUSEPORT: a new pgferry
/// can then bind the same ports and take over while this one drains (a
/// rolling restart). Without it a port in use is an error (EADDRINUSE).
pub fn bind(addr: SocketAddr, backlog: u32, reuse_port: bool) -> std::io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr, backlog, reuse_port)?)
}

/// `n` non-blocking listening sockets on `addr`, not yet registered with a
/// runtime: one per event loop (thread per core). With more than one they
/// form an SO_REUSEPORT group, in which the kernel hands each new
/// connection to one socket, so one loop wakes for it. (Duplicates of one
/// socket, registered in every loop, would wake them all for every
/// connection, and all but one would find nothing to accept.)
///
/// The group needs SO_REUSEPORT even when `reuse_port` is off. Then the
/// port is first bound without it, so a port another process holds is
/// still an error, as it is with one loop.
pub fn bind_group(
    addr: SocketAddr,
    backlog: u32,
    reuse_port: bool,
    n: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    if n <= 1 {
        return Ok(vec![bind_std(addr, backlog, reuse_port)?]);
    }
    if !reuse_port && addr.port() != 0 {
        drop(bind_std(addr, backlog, false)?);
    }
    let first = bind_std(addr, backlog, true)?;
    // Port 0: the others join the port the first was given.
    let addr = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..n {
        group.push(bind_std(addr, backlog, true)?);
    }
    Ok(group)
}

/// A non-blocking listening socket, not yet registered with a runtime.
pub fn bind_std(addr: SocketAddr, backlog: u32, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(reuse_port)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s.into())
}

/// Accepts until `shutdown` turns true. `slots` caps clients across listeners.
pub async fn accept_loop(
    listener: TcpListener,
    role: Role,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => Some(r),
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let Some(accepted) = accepted else {
            drain_queue(&listener, role, &shared, &slots).await;
            return;
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        admit(stream, peer, role, &shared, &slots);
    }
}

/// Connections the kernel already queued on a listener would be reset when
/// it closes: take them and admit them like any other (pgferry is draining,
/// so they are closed at their first transaction boundary).
async fn drain_queue(listener: &TcpListener, role: Role, shared: &Arc<Shared>, slots: &Arc<Semaphore>) {
    while let Ok(Ok((stream, peer))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await {
        admit(stream, peer, role, shared, slots);
    }
}

/// Counts a new connection, refuses it if a limit says so (the refusal
/// costs only a FATAL: no TLS, no authentication), else starts its task.
fn admit(stream: TcpStream, peer: SocketAddr, role: Role, shared: &Arc<Shared>, slots: &Arc<Semaphore>) {
    let _ = stream.set_nodelay(true);
    let c = &shared.obs.counters;
    match role {
        Role::ReadWrite => &c.accepted_rw,
        Role::ReadOnly => &c.accepted_ro,
    }
    .fetch_add(1, Relaxed);
    let Ok(permit) = slots.clone().try_acquire_owned() else {
        c.refused_max_client_conn.fetch_add(1, Relaxed);
        tracing::warn!(%peer, "max_client_conn reached; refusing client");
        return refuse(
            stream,
            sqlstate::TOO_MANY_CONNECTIONS,
            "too many clients: max_client_conn reached",
        );
    };
    let pending = match shared.auth.pending_logins.try_admit(peer.ip()) {
        Ok(p) => p,
        Err(Full::Total) => {
            c.refused_pending_logins.fetch_add(1, Relaxed);
            tracing::warn!(%peer, "max_pending_logins reached; refusing client");
            return refuse(
                stream,
                sqlstate::TOO_MANY_CONNECTIONS,
                "too many connections are still logging in (max_pending_logins)",
            );
        }
        Err(Full::Address) => {
            c.refused_pending_per_address.fetch_add(1, Relaxed);
            tracing::debug!(%peer, "max_pending_logins_per_address reached; refusing client");
            return refuse(
                stream,
                sqlstate::TOO_MANY_CONNECTIONS,
                "too many connections from this address are still logging in (max_pending_logins_per_address)",
            );
        }
    };
    let fut = crate::client::serve(stream, peer, role, shared.clone(), pending, permit);
    tracing::trace!(bytes = std::mem::size_of_val(&fut), "client task size");
    tokio::spawn(fut);
}

/// Sends a FATAL in plaintext and closes (after reading whatever the client
/// sends, see below). libpq reports it even in answer to an SSLRequest.
fn refuse(stream: tokio::net::TcpStream, code: &'static str, msg: &'static str) {
    tokio::spawn(async move {
        let mut stream = stream;
        let mut b = bytes::BytesMut::new();
        encode::error_response(&mut b, Severity::Fatal, code, msg);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(&b).await?;
            stream.shutdown().await?;
            // Read what the client sent until it closes: closing with unread
            // input would reset the connection and could destroy the error
            // before the client reads it.
            let mut sink = [0u8; 512];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn a_group_shares_one_port_and_each_connection_goes_to_one_socket() {
        let group = bind_group(local(), 128, false, 3).unwrap();
        assert_eq!(group.len(), 3);
        let port = group[0].local_addr().unwrap().port();
        assert!(group.iter().all(|l| l.local_addr().unwrap().port() == port));
        let mut clients = Vec::new();
        for _ in 0..30 {
            clients.push(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut accepted = 0;
        for l in &group {
            while l.accept().is_ok() {
                accepted += 1;
            }
        }
        assert_eq!(
            accepted,
            clients.len(),
            "every connection is queued on exactly one socket"
        );
    }

    #[test]
    fn a_group_does_not_join_a_port_another_process_holds() {
        let other = std::net::TcpListener::bind(local()).unwrap();
        let addr = other.local_addr().unwrap();
        let e = bind_group(addr, 128, false, 2).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        // Nor one that shares its port on purpose, unless told to.
        let sharing = bind_std(local(), 128, true).unwrap();
        let addr = sharing.local_addr().unwrap();
        assert_eq!(
            bind_group(addr, 128, false, 2).unwrap_err().kind(),
            ErrorKind::AddrInUse
        );
        assert_eq!(
            bind_group(addr, 128, true, 2).unwrap().len(),
            2,
            "reuse_port = true joins (rolling restart)"
        );
        // One loop: a plain socket, as before.
        let one = bind_group(local(), 128, false, 1).unwrap();
        let addr = one[0].local_addr().unwrap();
        assert_eq!(bind_std(addr, 128, true).unwrap_err().kind(), ErrorKind::AddrInUse);
    }
}
