//! The HTTP listener (default 127.0.0.1:8404): `/metrics` in the Prometheus
//! text format, `/health` (the process is up), `/ready` (a leader is
//! confirmed for the read-write port), and `/`, an HTML status page that
//! refreshes itself, with charts of the last 15 minutes.
//!
//! - [`server`]: hyper's HTTP/1 connections, bounded in number, size and time.
//! - [`routes`]: which path answers what.
//! - [`metrics`], [`page`]: the bodies, computed at request time from the
//!   same counters the admin console reads.
//! - [`history`]: the samples behind the charts; [`charts`]: inline SVG.

mod charts;
mod history;
mod metrics;
mod page;
mod routes;
mod server;

use crate::clients::ClientRegistry;
use crate::shared::{Observability, PoolRegistry};
use history::History;
use pgferry_routing::Router;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the endpoints read: counters and events, the pools, the topology,
/// and the clients (for the servers they hold).
pub struct View {
    pub obs: Arc<Observability>,
    pub pools: Arc<PoolRegistry>,
    pub router: Router,
    pub clients: Arc<ClientRegistry>,
    pub tls: Arc<pgferry_tls::Acceptor>,
    /// Draining (SIGTERM): /ready says so, /health does not.
    pub lifecycle: Arc<crate::shared::Lifecycle>,
}

/// What a request handler reads: the view and the charts' history.
struct State {
    view: Arc<View>,
    history: Arc<Mutex<History>>,
}

/// Samples the history for the charts and serves HTTP, until `shutdown`
/// turns true.
pub async fn serve(listener: TcpListener, view: Arc<View>, shutdown: watch::Receiver<bool>) {
    let history = Arc::new(Mutex::new(History::new(Instant::now())));
    tokio::spawn(history::sample_every(view.clone(), history.clone(), shutdown.clone()));
    server::serve(listener, Arc::new(State { view, history }), shutdown).await;
}

/// Escapes text for HTML and SVG, in content and in quoted attributes.
fn html(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
