//! Helpers shared by the end-to-end tests: a raw wire-protocol client (for
//! byte-level cases no driver can produce) and tokio-postgres connections.

#![allow(dead_code)]

use bytes::BytesMut;
use pgferry_protocol::backend;
use pgferry_protocol::login::{ClientLogin, Step};
use pgferry_protocol::scram;
use pgferry_protocol::{decode_frame, encode, Frame};
use pgferry_tests::Ferry;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use pgferry_tests::APP_PASS;

/// A tokio-postgres client through pgferry's read-write port.
pub async fn connect(ferry: &Ferry, user: &str, password: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&ferry.rw_conn_str(user, password, "app"), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect through pgferry: {e}\n{}", ferry.log()));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

pub async fn app(ferry: &Ferry) -> tokio_postgres::Client {
    connect(ferry, "app", APP_PASS).await
}

/// A raw protocol client.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl Raw {
    pub async fn tcp(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp connect");
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects and logs in as `user` (SCRAM, or whatever the server asks).
    pub async fn login(port: u16, user: &str, password: &str) -> Raw {
        let mut r = Raw::tcp(port).await;
        let mut b = BytesMut::new();
        encode::startup_message(&mut b, &[("user", user), ("database", "app")]);
        r.send(&b).await;
        let mut login = ClientLogin::new(user, Some(password));
        loop {
            let f = r.frame().await.expect("login reply");
            b.clear();
            match login.feed(&f, &mut b).unwrap_or_else(|e| panic!("login failed: {e}")) {
                Step::Send => r.send(&b).await,
                Step::ScramKeys { salt, iterations } => {
                    let keys = scram::keys_from_password(password, &salt, iterations);
                    login.scram_keys(&keys, &mut b).unwrap();
                    r.send(&b).await;
                }
                Step::Ready => return r,
                Step::Parameter { .. } | Step::BackendKey { .. } | Step::Read => {}
            }
        }
    }

    pub async fn send(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.expect("write");
    }

    /// Next message, or None on close / after 20 s.
    pub async fn frame(&mut self) -> Option<Frame> {
        let work = async {
            loop {
                if let Some(f) = decode_frame(&mut self.buf, 1 << 30).unwrap() {
                    return Some(f);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), work)
            .await
            .unwrap_or(None)
    }

    /// Messages up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            let f = self.frame().await.expect("connection closed before ReadyForQuery");
            let done = f.tag == b'Z';
            out.push(f);
            if done {
                return out;
            }
        }
    }

    /// Reads until the connection closes; returns what came.
    pub async fn until_closed(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = self.frame().await {
            out.push(f);
        }
        out
    }

    pub async fn query(&mut self, sql: &str) -> Vec<Frame> {
        let mut b = BytesMut::new();
        encode::query(&mut b, sql.as_bytes());
        self.send(&b).await;
        self.until_ready().await
    }
}

/// Tags of a reply sequence, as a string ("1 2 T D C Z").
pub fn tags(frames: &[Frame]) -> String {
    frames
        .iter()
        .map(|f| (f.tag as char).to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// SQLSTATE of the first ErrorResponse.
pub fn error_code(frames: &[Frame]) -> Option<String> {
    frames
        .iter()
        .find(|f| f.tag == b'E')
        .map(|f| backend::error_fields(f.body()).unwrap().code.to_owned())
}

/// Values of the DataRows, as text.
pub fn rows(frames: &[Frame]) -> Vec<Vec<Option<String>>> {
    frames
        .iter()
        .filter(|f| f.tag == b'D')
        .map(|f| {
            let mut r = pgferry_protocol::frame::Reader::new(f.body(), "DataRow");
            let n = r.i16().unwrap();
            (0..n)
                .map(|_| {
                    let len = r.i32().unwrap();
                    (len >= 0).then(|| String::from_utf8_lossy(r.bytes(len as usize).unwrap()).into_owned())
                })
                .collect()
        })
        .collect()
}

/// A ferry in front of the shared cluster with `extra` config.
pub fn ferry(extra: &str) -> Ferry {
    let cluster = pgferry_tests::shared_cluster();
    Ferry::for_cluster(cluster, extra).expect("start pgferry")
}

/// Runs SQL as superuser directly on the primary.
pub fn primary_sql(sql: &str) -> String {
    pgferry_tests::shared_cluster()
        .psql_primary("app", sql)
        .expect("psql on primary")
}

pub use pgferry_tests::PG_BIN;

/// psql against pgferry's admin console (or any database), with headers,
/// unaligned: Ok(stdout) or Err(stderr).
pub fn console(port: u16, user: &str, password: &str, db: &str, sql: &str) -> Result<String, String> {
    let out = std::process::Command::new(std::path::Path::new(PG_BIN).join("psql"))
        .arg(format!(
            "host=127.0.0.1 port={port} user={user} password={password} dbname={db} sslmode=disable"
        ))
        .args(["-X", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// An admin-console command as the test admin; panics on error.
pub fn admin(port: u16, sql: &str) -> String {
    console(port, "admin", "admin-pass", "pgbouncer", sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The rows of a console result whose first columns equal `prefix`.
pub fn rows_starting<'a>(out: &'a str, prefix: &str) -> Vec<Vec<&'a str>> {
    out.lines()
        .skip(1)
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.split('|').collect())
        .collect()
}

/// The HTTP port from the running ferry's config.
pub fn http_port(f: &pgferry_tests::Ferry) -> u16 {
    let cfg: toml::Table = std::fs::read_to_string(&f.config_path).unwrap().parse().unwrap();
    let listen = cfg["http"]["listen"].as_str().unwrap();
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

/// GET `path` on a connection of its own: (status code, body).
pub async fn get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // The server keeps connections alive unless told otherwise.
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

/// Transactions pgferry ran per server port so far (SHOW LATENCY, kind
/// "xact", summed over pools): where routing sent them.
pub fn xacts_per_port(ferry: &Ferry) -> std::collections::BTreeMap<u16, u64> {
    let out = admin(ferry.rw_port, "SHOW LATENCY");
    let mut m = std::collections::BTreeMap::new();
    for r in out.lines().skip(1).map(|l| l.split('|').collect::<Vec<_>>()) {
        if r.len() > 5 && r[4] == "xact" {
            if let Some(port) = r[3].rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) {
                *m.entry(port).or_default() += r[5].parse::<u64>().unwrap_or(0);
            }
        }
    }
    m
}

/// What changed between two [`xacts_per_port`] readings (ports with none
/// left out).
pub fn delta(
    before: &std::collections::BTreeMap<u16, u64>,
    after: &std::collections::BTreeMap<u16, u64>,
) -> std::collections::BTreeMap<u16, u64> {
    after
        .iter()
        .map(|(p, n)| (*p, n - before.get(p).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}
