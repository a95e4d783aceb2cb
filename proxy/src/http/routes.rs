//! Which path answers what. GET and HEAD only (hyper leaves the body out
//! of a HEAD answer and keeps its Content-Length); any other method on a
//! known path is 405 with `Allow`, an unknown path 404. Request bodies are
//! never read: none of these resources takes one.

use super::{metrics, page, State};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Metrics,
    Health,
    Ready,
    Status,
}

impl Route {
    pub(super) fn find(path: &str) -> Option<Route> {
        match path {
            "/metrics" => Some(Route::Metrics),
            "/health" => Some(Route::Health),
            "/ready" => Some(Route::Ready),
            "/" => Some(Route::Status),
            _ => None,
        }
    }
}

const TEXT: &str = "text/plain";

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The answer to `method` on `path` (the query string already left out).
pub(super) fn respond(state: &State, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let Some(route) = Route::find(path) else {
        return response(StatusCode::NOT_FOUND, TEXT, "not found\n");
    };
    if method != Method::GET && method != Method::HEAD {
        let mut r = response(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET or HEAD only\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let view = &state.view;
    match route {
        Route::Metrics => response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::metrics(&view.obs, &view.pools, &view.router, &view.tls),
        ),
        Route::Health if view.lifecycle.draining().load(std::sync::atomic::Ordering::Relaxed) => {
            response(StatusCode::OK, TEXT, "ok: draining\n")
        }
        Route::Health => response(StatusCode::OK, TEXT, "ok\n"),
        // Load balancers stop sending new clients to a pgferry that drains.
        Route::Ready if view.lifecycle.draining().load(std::sync::atomic::Ordering::Relaxed) => response(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: pgferry is shutting down (draining)\n",
        ),
        Route::Ready if view.router.topology().primary.is_some() => {
            response(StatusCode::OK, TEXT, "ready: a leader is confirmed\n")
        }
        Route::Ready => response(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: no confirmed leader\n",
        ),
        Route::Status => response(
            StatusCode::OK,
            "text/html; charset=utf-8",
            page::status_page(view, &state.history),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::Route;

    #[test]
    fn paths() {
        assert_eq!(Route::find("/"), Some(Route::Status));
        assert_eq!(Route::find("/metrics"), Some(Route::Metrics));
        assert_eq!(Route::find("/metrics/"), None);
        assert_eq!(Route::find("/Metrics"), None);
        assert_eq!(Route::find("*"), None);
        assert_eq!(Route::find(""), None);
    }
}
