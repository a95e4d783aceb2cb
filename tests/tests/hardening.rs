//! Hardening: settings that must not lock clients out, limits an address or
//! an attacker cannot use against everyone else, and bounded state.

mod common;

use common::*;
use std::time::Duration;
use tokio::net::TcpStream;

/// `client_login_timeout = 0` means no timeout (as in PgBouncer), in the
/// file and through the console's SET; it never refuses every login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_login_timeout_zero_means_no_timeout() {
    let f = ferry("[limits]\nclient_login_timeout = \"0s\"\n");
    let c = app(&f).await;
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    // A silent socket is not closed for want of a deadline... (1.5 s is
    // past any deadline a zero could have produced).
    let silent = TcpStream::connect(("127.0.0.1", f.rw_port)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut b = [0u8; 1];
    assert!(
        matches!(silent.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the silent login was closed"
    );
    drop(silent);

    // SET on the console of a ferry that started with a timeout.
    let f = ferry("");
    admin(f.rw_port, "SET client_login_timeout = 0");
    let show = admin(f.rw_port, "SHOW CONFIG");
    assert!(show.lines().any(|l| l.starts_with("client_login_timeout|0|")), "{show}");
    let c = app(&f).await;
    assert_eq!(c.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
    // The console itself still takes logins.
    admin(f.rw_port, "SHOW VERSION");
}
