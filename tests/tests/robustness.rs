//! Bad input never panics, hangs or buffers without bound: each case gets a
//! protocol-violation error (08P01) or a clean close, and pgferry keeps serving.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use pgferry_protocol::encode;
use std::time::{Duration, Instant};

fn fatal_code(frames: &[pgferry_protocol::Frame]) -> Option<String> {
    error_code(frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_after_login() {
    let f = ferry("[limits]\nmax_message_size = 1048576\n");
    // Unknown message type.
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    r.send(b"\x01\0\0\0\x04").await;
    assert_eq!(fatal_code(&r.until_closed().await).as_deref(), Some("08P01"));
    // Length below 4.
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    r.send(b"Q\0\0\0\x02").await;
    assert_eq!(fatal_code(&r.until_closed().await).as_deref(), Some("08P01"));
    // Length above max_message_size: refused before it is buffered.
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    r.send(b"Q\x7f\xff\xff\xff").await;
    assert_eq!(fatal_code(&r.until_closed().await).as_deref(), Some("08P01"));
    // Malformed body of a known type (Bind with a truncated name).
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    r.send(b"B\0\0\0\x06ab").await;
    assert_eq!(fatal_code(&r.until_closed().await).as_deref(), Some("08P01"));
    // Still serving.
    let c = app(&f).await;
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let log = f.log();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup() {
    let f = ferry("[limits]\nclient_login_timeout = \"1s\"\n");
    // Startup packet over 10,000 bytes.
    let mut r = Raw::tcp(f.rw_port).await;
    r.send(&20000u32.to_be_bytes()).await;
    assert_eq!(fatal_code(&r.until_closed().await).as_deref(), Some("08P01"));
    // Unsupported protocol version: 0A000, as PostgreSQL answers.
    let mut r = Raw::tcp(f.rw_port).await;
    let mut b = BytesMut::new();
    b.put_u32(8);
    b.put_u32(2 << 16);
    r.send(&b).await;
    assert_eq!(fatal_code(&r.until_closed().await).as_deref(), Some("0A000"));
    // No startup packet at all: closed after client_login_timeout.
    let mut r = Raw::tcp(f.rw_port).await;
    let t = Instant::now();
    let got = r.until_closed().await;
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(fatal_code(&got).as_deref(), Some("08P01"));
    // Random bytes.
    for seed in 0..20u32 {
        let mut r = Raw::tcp(f.rw_port).await;
        let junk: Vec<u8> = (0..200u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 13) as u8)
            .collect();
        r.send(&junk).await;
        let t = Instant::now();
        r.until_closed().await;
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    // Missing user.
    let mut r = Raw::tcp(f.rw_port).await;
    let mut b = BytesMut::new();
    encode::startup_message(&mut b, &[("database", "app")]);
    r.send(&b).await;
    assert_eq!(fatal_code(&r.until_closed().await).as_deref(), Some("28000"));
    let c = app(&f).await;
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gssenc_requests_are_declined_and_32_is_negotiated_down() {
    let f = ferry("");
    for code in [80877103u32, 80877104] {
        let mut r = Raw::tcp(f.rw_port).await;
        let mut b = BytesMut::new();
        b.put_u32(8);
        b.put_u32(code);
        r.send(&b).await;
        let mut one = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut r.stream, &mut one)
            .await
            .unwrap();
        assert_eq!(&one, b"N");
    }
    // Protocol 3.2 with a _pq_ option: NegotiateProtocolVersion for 3.0.
    let mut r = Raw::tcp(f.rw_port).await;
    let mut b = BytesMut::new();
    let at = b.len();
    b.put_u32(0);
    b.put_u32((3 << 16) | 2);
    for s in ["user", "app", "database", "app", "_pq_.future", "1"] {
        b.put_slice(s.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = (b.len() - at) as u32;
    b[at..at + 4].copy_from_slice(&len.to_be_bytes());
    r.send(&b).await;
    let f1 = r.frame().await.unwrap();
    assert_eq!(f1.tag, b'v');
    assert_eq!(&f1.body()[..4], &(3u32 << 16).to_be_bytes());
    assert!(String::from_utf8_lossy(f1.body()).contains("_pq_.future"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_refused_and_logged_without_secrets() {
    let f = ferry("");
    for (user, pass) in [("app", "wrong-password"), ("nosuchuser", "whatever-secret")] {
        let e = tokio_postgres::connect(&f.rw_conn_str(user, pass, "app"), tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
        assert_eq!(e.code().unwrap().code(), "28P01", "{e}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = f.log();
    assert!(log.contains("login failed") && log.contains("nosuchuser"), "{log}");
    for secret in ["wrong-password", "whatever-secret", "app-pass", "SCRAM-SHA-256$"] {
        assert!(!log.contains(secret), "log leaks {secret:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_is_enforced() {
    let f = ferry("[limits]\nmax_client_conn = 2\n");
    // The harness's readiness probes may hold a slot for a moment after start.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while held.len() < 2 {
        match tokio_postgres::connect(&f.rw_conn_str("app", APP_PASS, "app"), tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                held.push(c);
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "two clients never got in: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let e = tokio_postgres::connect(&f.rw_conn_str("app", APP_PASS, "app"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code().unwrap().code(), "53300");
}

#[test]
fn check_config_names_unknown_keys() {
    let out = pgferry_tests::Ferry::check_config("[topology]\nsource = \"static\"\nprimary = \"127.0.0.1:1\"\n[auth]\nmethod = \"trust\"\n[pool]\npool_sise = 3\n").unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pool_sise"), "{text}");
    let example = std::fs::read_to_string(pgferry_tests::workspace_root().join("deploy/pgferry.example.toml")).unwrap();
    let example = example.replace("/etc/pgferry/userlist.txt", "/dev/null");
    let out = pgferry_tests::Ferry::check_config(&example).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
