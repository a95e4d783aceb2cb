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

/// A Parse with 40,000 parameter types (above i16::MAX, within PostgreSQL's
/// 65,535) and its Bind go through: one INSERT of 40,000 rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_with_40000_parameters() {
    use bytes::{BufMut, BytesMut};
    use pgferry_protocol::encode;
    const N: usize = 40_000;
    primary_sql("DROP TABLE IF EXISTS hard_many; CREATE TABLE hard_many (x int); ALTER TABLE hard_many OWNER TO app");
    let f = ferry("");
    let mut r = Raw::login(f.rw_port, "app", APP_PASS).await;
    let values: Vec<String> = (1..=N).map(|i| format!("(${i})")).collect();
    let sql = format!("INSERT INTO hard_many (x) VALUES {}", values.join(","));
    let mut types = BytesMut::new();
    types.put_u16(N as u16);
    for _ in 0..N {
        types.put_u32(23); // int4
    }
    let mut rest = BytesMut::new();
    rest.put_i16(0); // every parameter in text
    rest.put_u16(N as u16);
    for i in 0..N {
        let v = i.to_string();
        rest.put_i32(v.len() as i32);
        rest.put_slice(v.as_bytes());
    }
    rest.put_i16(0); // results in text
    let mut b = BytesMut::new();
    encode::parse(&mut b, b"many", sql.as_bytes(), &types);
    encode::bind(&mut b, b"", b"many", &rest);
    encode::execute(&mut b, b"", 0);
    encode::sync(&mut b);
    r.send(&b).await;
    let reply = r.until_ready().await;
    assert_eq!(tags(&reply), "1 2 C Z", "{:?}\n{}", error_code(&reply), f.log());
    let done = reply.iter().find(|m| m.tag == b'C').unwrap();
    assert_eq!(
        &done.body()[..done.body().len() - 1],
        format!("INSERT 0 {N}").as_bytes()
    );
    assert_eq!(primary_sql("SELECT count(*) FROM hard_many"), N.to_string());
}
