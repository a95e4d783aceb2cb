//! The HTTP listener as a server on an untrusted network sees it: persistent
//! connections, HEAD, methods and paths it does not serve, malformed and
//! oversized requests, clients that send their headers slowly (slowloris),
//! and more connections than it serves at once. Raw TCP, so that the
//! requests can be exactly as wrong as a client makes them.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The server's `HEADER_TIMEOUT` (proxy/src/http/server.rs).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Its `MAX_CONNECTIONS`.
const MAX_CONNECTIONS: usize = 64;
/// Of those, kept for 127.0.0.1 (the health check).
const LOCAL_RESERVE: usize = 8;

/// One parsed response.
#[derive(Debug)]
struct Response {
    code: u16,
    /// Header names lower-cased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the HTTP port")
}

/// Reads one response from `s` (a body of Content-Length bytes, none for
/// HEAD); `leftover` keeps bytes read past it. None if the connection
/// closes first; panics after 20 s.
async fn read_response(s: &mut TcpStream, leftover: &mut Vec<u8>, head_request: bool) -> Option<Response> {
    let work = async {
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = leftover.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            leftover.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(leftover[..head_end].to_vec()).expect("ASCII head");
        leftover.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap();
        assert!(status.starts_with("HTTP/1.1 "), "status line {status:?}");
        let code = status[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap_or_else(|| panic!("header line {l:?}"));
                (n.to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        let len = if head_request { 0 } else { len };
        while leftover.len() < len {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            leftover.extend_from_slice(&chunk[..n]);
        }
        let body = leftover.drain(..len).collect();
        Some(Response { code, headers, body })
    };
    tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .expect("a response within 20 s")
}

/// Sends `request` on a fresh connection and reads the response.
async fn exchange(port: u16, request: &[u8]) -> Option<Response> {
    let mut s = connect(port).await;
    s.write_all(request).await.unwrap();
    read_response(&mut s, &mut Vec::new(), request.starts_with(b"HEAD ")).await
}

/// Whether the server closes `s` within `limit` (reading and discarding
/// anything it sends first): the time it took, or None.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// The process's resident memory, from /metrics.
async fn rss(port: u16) -> f64 {
    let (_, body) = get(port, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix("pgferry_process_resident_memory_bytes "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no RSS in /metrics:\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_head_methods_and_paths() {
    let f = ferry("");
    let port = http_port(&f);

    // Three requests on one connection, the last asking to close it.
    let mut s = connect(port).await;
    let mut rest = Vec::new();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, &mut rest, false).await.expect("first response");
    assert_eq!((r.code, r.body.as_slice()), (200, &b"ok\n"[..]), "{r:?}");
    assert_ne!(r.header("connection"), Some("close"), "{r:?}");
    s.write_all(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, &mut rest, false)
        .await
        .expect("a second response on the same connection");
    assert_eq!(r.code, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("# TYPE pgferry_pool_transactions_total counter"));
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, &mut rest, false).await.expect("third response");
    assert_eq!(r.code, 200);
    assert!(
        closed_within(&mut s, Duration::from_secs(2)).await.is_some(),
        "Connection: close is honoured"
    );
    assert!(rest.is_empty(), "nothing after the last response: {rest:?}");

    // Two requests sent at once (pipelined) are both answered, in order.
    let mut s = connect(port).await;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(read_response(&mut s, &mut rest, false).await.unwrap().code, 200);
    assert_eq!(read_response(&mut s, &mut rest, false).await.unwrap().code, 404);

    // HEAD: the GET's headers, no body.
    let mut s = connect(port).await;
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, &mut rest, true).await.expect("HEAD response");
    assert_eq!(r.code, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(
        r.header("content-length")
            .and_then(|l| l.parse::<usize>().ok())
            .is_some_and(|l| l > 1000),
        "the page's length: {r:?}"
    );
    let mut after = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut after)).await;
    assert!(after.is_empty(), "HEAD sent a body: {} bytes", after.len());

    // Methods other than GET and HEAD: 405 with Allow; the body is not read.
    for request in [
        &b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"[..],
        b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n",
        b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"OPTIONS /ready HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let r = exchange(port, request).await.expect("a 405");
        assert_eq!(r.code, 405, "{}: {r:?}", String::from_utf8_lossy(request));
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{r:?}");
    }
    // Unknown paths: 404, whatever the method.
    for request in [
        &b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET /metrics/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    ] {
        let r = exchange(port, request).await.expect("a 404");
        assert_eq!(r.code, 404, "{}: {r:?}", String::from_utf8_lossy(request));
    }
    // HTTP/1.0 without keep-alive: one answer, then the connection closes.
    let mut s = connect(port).await;
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("HTTP/1.0: closed after the response")
        .unwrap();
    assert!(
        out.starts_with(b"HTTP/1.") && out.ends_with(b"\r\n\r\nok\n"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests() {
    let f = ferry("");
    let port = http_port(&f);
    for request in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /\x01\x02 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ] {
        let mut s = connect(port).await;
        s.write_all(request).await.unwrap();
        let r = read_response(&mut s, &mut Vec::new(), false).await;
        let r = r.unwrap_or_else(|| panic!("{:?}: closed without an answer", String::from_utf8_lossy(request)));
        assert_eq!(r.code, 400, "{:?}: {r:?}", String::from_utf8_lossy(request));
        assert!(
            closed_within(&mut s, Duration::from_secs(2)).await.is_some(),
            "{:?}: the connection is closed after a 400",
            String::from_utf8_lossy(request)
        );
    }

    // Oversized heads: 431 (or the connection closed, if the server stops
    // reading before the client stops writing), and no memory kept.
    let before = rss(port).await;
    let big_header = format!("X-Big: {}\r\n", "a".repeat(64 * 1024));
    let many_headers: String = (0..200).map(|i| format!("X-{i}: y\r\n")).collect();
    let huge = format!("X-Huge: {}\r\n", "b".repeat(1 << 20));
    let mut answered = 0;
    for (what, extra) in [
        ("a 64 KiB header", &big_header),
        ("200 headers", &many_headers),
        ("a 1 MiB header", &huge),
    ] {
        for _ in 0..10 {
            let mut s = connect(port).await;
            let request = format!("GET / HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
            // The server stops reading at its limit and may close (reset)
            // the connection while the rest is still being written: a
            // refusal too, as long as nothing is served.
            let _ = s.write_all(request.as_bytes()).await;
            if let Some(r) = read_response(&mut s, &mut Vec::new(), false).await {
                assert_eq!(r.code, 431, "{what}: {r:?}");
                answered += 1;
            }
        }
    }
    assert!(answered >= 10, "only {answered} of 30 oversized requests got a 431");
    let grown = rss(port).await - before;
    assert!(
        grown < 16.0 * 1024.0 * 1024.0,
        "resident memory grew by {:.1} MiB over 30 oversized requests",
        grown / 1048576.0
    );
    // A long URI: 414 or 431, not served.
    let r = exchange(
        port,
        format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "u".repeat(70 * 1024)).as_bytes(),
    )
    .await;
    assert!(r.as_ref().is_none_or(|r| r.code == 414 || r.code == 431), "{r:?}");
    // Still serving.
    assert_eq!(get(port, "/health").await, (200, "ok\n".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_and_others_served() {
    let f = ferry("");
    let port = http_port(&f);

    // Slowloris: a head dribbled a byte every 300 ms never completes; the
    // server closes the connection when the header timeout ends...
    let mut slow = connect(port).await;
    let slow_start = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let (mut rd, mut wr) = slow.into_split();
    let dribble = tokio::spawn(async move {
        loop {
            if wr.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    // ... a connection that sends nothing is closed the same way...
    let mut silent = connect(port).await;
    let silent_task =
        tokio::spawn(async move { closed_within(&mut silent, HEADER_TIMEOUT + Duration::from_secs(8)).await });
    // ... and meanwhile others are served at once.
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(get(port, "/health").await.0, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(HEADER_TIMEOUT + Duration::from_secs(8), rd.read_to_end(&mut buf)).await;
    let took = slow_start.elapsed();
    dribble.abort();
    assert!(read.is_ok(), "the slow client still connected after {took:?}");
    assert!(
        buf.is_empty() || buf.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    assert!(
        took + Duration::from_secs(2) >= HEADER_TIMEOUT,
        "closed after {took:?}: before the header timeout?"
    );
    let silent_took = silent_task.await.unwrap();
    assert!(
        silent_took.is_some_and(|t| t + Duration::from_secs(2) >= HEADER_TIMEOUT),
        "a silent connection: {silent_took:?}"
    );

    // An idle keep-alive connection is closed after the same timeout.
    let mut s = connect(port).await;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut s, &mut Vec::new(), false).await.unwrap().code, 200);
    let idle = closed_within(&mut s, HEADER_TIMEOUT + Duration::from_secs(8)).await;
    assert!(
        idle.is_some_and(|t| t + Duration::from_secs(2) >= HEADER_TIMEOUT),
        "an idle keep-alive connection: {idle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded() {
    let f = ferry("");
    let port = http_port(&f);
    let fds = || {
        let pid = f.pid();
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
    };
    let before = fds();
    // More idle connections than the server serves at once, from another
    // address than the host's own (127.0.0.2: still loopback, but not
    // 127.0.0.1): the server holds its general share and closes the rest
    // at once.
    let mut opened = Vec::new();
    for _ in 0..MAX_CONNECTIONS + 32 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        opened.push(sock.connect(([127, 0, 0, 1], port).into()).await.unwrap());
    }
    // Let the server take them all (a loaded machine may take a moment),
    // then sort: a refused one was closed, a read sees its end.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut idle = Vec::new();
    let mut refused = 0;
    for mut s in opened {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => refused += 1,
            _ => idle.push(s),
        }
    }
    let general = MAX_CONNECTIONS - LOCAL_RESERVE;
    assert!(
        (general - 2..=general).contains(&idle.len()) && refused >= 32,
        "{} held, {refused} closed at once (general slots: {general})",
        idle.len()
    );
    // (Other descriptors come and go meanwhile: a little slack.)
    let held = fds().saturating_sub(before);
    assert!(
        (general - 4..general + 16).contains(&held),
        "{held} more file descriptors with {} connections held",
        idle.len()
    );
    // The host's own health check still gets an answer at once.
    let t = Instant::now();
    assert_eq!(get(port, "/health").await.0, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "answered after {:?}", t.elapsed());
    // Once those time out, others are served again.
    tokio::time::sleep(HEADER_TIMEOUT + Duration::from_secs(1)).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = sock.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(read_response(&mut s, &mut rest, false).await.map(|r| r.code), Some(200));
    drop(idle);
}
