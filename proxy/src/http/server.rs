//! HTTP/1 connections on the listener, served by hyper: keep-alive,
//! persistent connections closed when idle, and every resource a client
//! can hold bounded (connections, header bytes, time), so that the
//! status port cannot be used to starve the proxy of file descriptors or
//! memory. Malformed requests are answered by hyper itself (400, or 431
//! for oversized headers) and the connection closed.

use super::{routes, State};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// Connections served at once: a few operators and a Prometheus scraper
/// need far fewer. Further ones are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Of those, kept for the host itself (127.0.0.1, ::1): the container's or
/// the service manager's health check is answered even while others hold
/// every other slot, so that nobody can get pgferry restarted by filling
/// its status port.
const LOCAL_RESERVE: usize = 8;
/// Time to receive a request's head, from the connection's start or the
/// previous response: slow clients (slowloris) and idle keep-alive
/// connections are closed after it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request head larger than this is answered 431.
const MAX_HEADER_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 64;
/// Read buffer cap (hyper's minimum is 8 KiB).
const MAX_BUF: usize = 16 * 1024;
/// A connection is asked to close after this long (at the end of the
/// response in flight): a client that stops reading its response cannot
/// hold a connection slot for longer than this and `GRACE`.
const LIFETIME: Duration = Duration::from_secs(60);
const GRACE: Duration = Duration::from_secs(5);

/// Accepts and serves connections until `shutdown` turns true.
pub(super) async fn serve(listener: TcpListener, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS - LOCAL_RESERVE));
    let local_slots = Arc::new(Semaphore::new(LOCAL_RESERVE));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_BUF);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, most likely: let some close.
                tracing::debug!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let local = match peer.ip() {
            std::net::IpAddr::V4(a) => a == std::net::Ipv4Addr::LOCALHOST,
            std::net::IpAddr::V6(a) => a.is_loopback(),
        };
        let permit = slots.clone().try_acquire_owned().or_else(|e| {
            if local {
                local_slots.clone().try_acquire_owned()
            } else {
                Err(e)
            }
        });
        let Ok(permit) = permit else {
            // Full: closed at once rather than left in the backlog, where
            // a flood would hold the health check up too.
            tracing::debug!(%peer, "HTTP connection refused: every slot is taken");
            drop(stream);
            continue;
        };
        let service = {
            let state = state.clone();
            service_fn(move |req: Request<Incoming>| {
                let response = routes::respond(&state, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(response) }
            })
        };
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "HTTP connection ended");
                    }
                    return;
                }
                _ = tokio::time::sleep(LIFETIME) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(GRACE, conn).await;
        });
    }
}
