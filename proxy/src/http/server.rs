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
/// need far fewer. Further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
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
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_BUF);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok(permit) = permit else { return };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: let some close.
                tracing::debug!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
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
