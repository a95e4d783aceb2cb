//! Which event loop a thread runs, so that a server connection goes back
//! to sessions on the loop whose reactor watches its socket.
//!
//! With one event loop per thread, a socket registered by loop A and read
//! by a session on loop B works, but every readiness event then crosses
//! threads (A wakes, then wakes B). Checkout prefers connections made on
//! the caller's own loop; another loop's connection is the fallback.

use std::cell::Cell;

thread_local! {
    static LOOP: Cell<u16> = const { Cell::new(0) };
}

/// Marks the calling thread as event loop `id` (0: the main one).
pub fn set_current(id: u16) {
    LOOP.with(|l| l.set(id));
}

/// The calling thread's event loop.
pub fn current() -> u16 {
    LOOP.with(|l| l.get())
}
