//! Polling until something holds: every test that waits for a server, a
//! log line or a count uses these, so timeouts read the same everywhere.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Result;

/// Polls `f` every `every` until it returns `Ok(true)` or `timeout` passes.
/// Returns whether it succeeded; errors from `f` count as "not yet".
pub fn wait_until(timeout: Duration, every: Duration, mut f: impl FnMut() -> Result<bool>) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(true) = f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after
/// `timeout`. Blocks the thread: in async tests use [`wait_for_async`].
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let ok = wait_until(timeout, Duration::from_millis(50), || Ok(check()));
    assert!(ok, "timed out after {timeout:?} waiting for {what}");
}

/// [`wait_for`] for async tests: sleeps on the runtime between checks, and
/// `check` may be async.
pub async fn wait_for_async<F: Future<Output = bool>>(what: &str, timeout: Duration, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
