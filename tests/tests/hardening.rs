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

async fn connect_db(f: &pgferry_tests::Ferry, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(&f.rw_conn_str("app", APP_PASS, db), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

/// The pools of databases not listed in [[database]] (auto_database) are
/// bounded: a made-up name leaves no pool behind, at most max_auto_pools
/// exist (unused ones are freed to make room, else 53300), and a pool
/// nobody uses is freed after autodb_idle_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_database_pools_are_bounded_and_freed() {
    let f = ferry("[pool]\nautodb_idle_timeout = \"1s\"\nmax_auto_pools = 2\n");
    for i in 0..20 {
        let Err(e) = connect_db(&f, &format!("hard_nope_{i}")).await else {
            panic!("no such database");
        };
        assert_eq!(e.code().map(|c| c.code()), Some("3D000"), "{e}");
    }
    let pools = admin(f.rw_port, "SHOW POOLS");
    assert!(!pools.contains("hard_nope"), "made-up names left pools:\n{pools}");

    let app_client = connect_db(&f, "app").await.unwrap();
    let postgres_client = connect_db(&f, "postgres").await.unwrap();
    postgres_client.simple_query("SELECT 1").await.unwrap();
    let Err(e) = connect_db(&f, "template1").await else {
        panic!("a third auto pool");
    };
    assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");
    let msg = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
    assert!(msg.contains("max_auto_pools"), "{msg}");
    // Once the postgres pool has no client, it makes room.
    drop(postgres_client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t1 = connect_db(&f, "template1").await.expect("room was made");
    t1.simple_query("SELECT 1").await.unwrap();
    let pools = admin(f.rw_port, "SHOW POOLS");
    assert!(!pools.contains("\npostgres|"), "{pools}");
    // A pool nobody uses goes after autodb_idle_timeout; one in use stays.
    drop(t1);
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pools = admin(f.rw_port, "SHOW POOLS");
        if !pools.contains("\ntemplate1|") {
            assert!(pools.contains("\napp|app|"), "{pools}");
            break;
        }
        assert!(std::time::Instant::now() < end, "unused pool kept:\n{pools}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app_client.simple_query("SELECT 1").await.unwrap();
}

/// RELOAD / SIGHUP read their files off the runtime: with one worker
/// thread and a users file that is a pipe nobody writes to yet (a read
/// that blocks), clients are still served; the reload finishes once the
/// file can be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reads_files_off_the_runtime() {
    let mut f = ferry("[runtime]\nworker_threads = 1\n");
    let c = app(&f).await;
    c.simple_query("SELECT 1").await.unwrap();
    let config = std::fs::read_to_string(&f.config_path).unwrap();
    let users_line = config.lines().find(|l| l.starts_with("users_file")).unwrap().to_owned();
    let users_path = users_line.split('"').nth(1).unwrap().to_owned();
    let users = std::fs::read(&users_path).unwrap();
    let fifo = f.dir.join("users.fifo");
    let st = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    std::fs::write(
        &f.config_path,
        config.replace(&users_line, &format!("users_file = \"{}\"", fifo.display())),
    )
    .unwrap();
    f.signal(libc::SIGHUP).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The reload is stuck reading the pipe; clients are not.
    let served = tokio::time::timeout(Duration::from_secs(5), async {
        c.simple_query("SELECT 2").await.unwrap();
        app(&f).await.simple_query("SELECT 3").await.unwrap();
    })
    .await;
    // Unblock the reload in any case, so pgferry can finish it.
    let writer = std::thread::spawn(move || std::fs::write(&fifo, users));
    assert!(
        served.is_ok(),
        "clients stalled while a reload read a file:\n{}",
        f.log()
    );
    writer.join().unwrap().unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !f.log().contains("SIGHUP: configuration") {
        assert!(std::time::Instant::now() < end, "no reload:\n{}", f.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.simple_query("SELECT 4").await.unwrap();
}

/// A socket from `source` (any 127.0.0.0/8 address) to `port` on 127.0.0.1.
async fn tcp_from(source: [u8; 4], port: u16) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((std::net::Ipv4Addr::from(source), 0).into()).unwrap();
    sock.connect(([127, 0, 0, 1], port).into()).await.unwrap()
}

/// Silent sockets from one address (127.0.0.2), more than max_pending_logins,
/// hold at most that address's share of the login places: a login from
/// 127.0.0.1 goes through at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_from_one_address_do_not_block_other_logins() {
    let f = ferry(
        "[limits]\nmax_pending_logins = 50\nmax_pending_logins_per_address = 10\nclient_login_timeout = \"30s\"\n",
    );
    let mut silent = Vec::new();
    for _ in 0..60 {
        silent.push(tcp_from([127, 0, 0, 2], f.rw_port).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Beyond its share, the address is refused at once.
    let mut last = Raw {
        stream: silent.pop().unwrap(),
        buf: bytes::BytesMut::new(),
    };
    assert_eq!(error_code(&last.until_closed().await).as_deref(), Some("53300"));
    let t = std::time::Instant::now();
    let c = app(&f).await;
    assert!(t.elapsed() < Duration::from_secs(2), "login took {:?}", t.elapsed());
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    drop(silent);
}

/// A raw connection that sent a startup packet for `user` and got
/// AuthenticationSASL back.
async fn sasl_start(port: u16, user: &str) -> Raw {
    use pgferry_protocol::backend::{self, AuthRequest};
    let mut r = Raw::tcp(port).await;
    let mut b = bytes::BytesMut::new();
    pgferry_protocol::encode::startup_message(&mut b, &[("user", user), ("database", "app")]);
    r.send(&b).await;
    let f = r.frame().await.expect("authentication request");
    assert_eq!(f.tag, b'R');
    assert!(matches!(
        backend::authentication(f.body()).unwrap(),
        AuthRequest::Sasl { .. }
    ));
    r
}

/// SQLSTATEs as PostgreSQL gives them: an unsupported protocol version is
/// 0A000; a SASL message that is missing, malformed or names a mechanism
/// that was not offered is 08P01, for known and unknown users alike; a
/// wrong password stays 28P01.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_and_sasl_errors_have_postgresql_sqlstates() {
    use bytes::{BufMut, BytesMut};
    use pgferry_protocol::backend::{self, AuthRequest};
    use pgferry_protocol::encode;
    use pgferry_protocol::scram::{keys_from_password, parse_server_first, ClientExchange, MECHANISM};
    let f = ferry("");
    let mut r = Raw::tcp(f.rw_port).await;
    let mut b = BytesMut::new();
    b.put_u32(8);
    b.put_u32((9 << 16) | 9);
    r.send(&b).await;
    assert_eq!(
        error_code(&r.until_closed().await).as_deref(),
        Some("0A000"),
        "protocol 9.9"
    );

    for user in ["app", "no_such_user"] {
        type Case = (&'static str, fn(&mut BytesMut));
        let cases: [Case; 3] = [
            ("unknown mechanism", |b| {
                encode::sasl_initial_response(b, "FOO-BAR", b"n,,n=,r=abc")
            }),
            ("malformed client-first", |b| {
                encode::sasl_initial_response(b, MECHANISM, b"garbage")
            }),
            ("a Query instead of SASLInitialResponse", |b| {
                encode::query(b, b"SELECT 1")
            }),
        ];
        for (what, make) in cases {
            let mut r = sasl_start(f.rw_port, user).await;
            let mut b = BytesMut::new();
            make(&mut b);
            r.send(&b).await;
            assert_eq!(
                error_code(&r.until_closed().await).as_deref(),
                Some("08P01"),
                "{user}: {what}"
            );
        }
        for (what, last) in [
            ("malformed client-final", &b"garbage"[..]),
            ("nonce mismatch", &b"c=biws,r=not-the-nonce,p=AAAA"[..]),
        ] {
            let mut r = sasl_start(f.rw_port, user).await;
            let (_, first) = ClientExchange::start();
            let mut b = BytesMut::new();
            encode::sasl_initial_response(&mut b, MECHANISM, &first);
            r.send(&b).await;
            let c = r.frame().await.expect("SASLContinue");
            assert!(matches!(
                backend::authentication(c.body()).unwrap(),
                AuthRequest::SaslContinue { .. }
            ));
            let mut b = BytesMut::new();
            encode::password(&mut b, last);
            r.send(&b).await;
            assert_eq!(
                error_code(&r.until_closed().await).as_deref(),
                Some("08P01"),
                "{user}: {what}"
            );
        }
        // A well-formed exchange with the wrong password.
        let mut r = sasl_start(f.rw_port, user).await;
        let (mut ex, first) = ClientExchange::start();
        let mut b = BytesMut::new();
        encode::sasl_initial_response(&mut b, MECHANISM, &first);
        r.send(&b).await;
        let c = r.frame().await.expect("SASLContinue");
        let AuthRequest::SaslContinue { data } = backend::authentication(c.body()).unwrap() else {
            panic!("expected SASLContinue");
        };
        let sf = parse_server_first(data).unwrap();
        let keys = keys_from_password("wrong", &sf.salt, sf.iterations);
        let fin = ex.respond(data, &keys).unwrap();
        let mut b = BytesMut::new();
        encode::password(&mut b, &fin);
        r.send(&b).await;
        assert_eq!(
            error_code(&r.until_closed().await).as_deref(),
            Some("28P01"),
            "{user}: wrong password"
        );
    }
}

/// A burst of 1,000 cancel requests writes a bounded number of log lines:
/// each is logged at DEBUG, and one INFO line per stats_period counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_floods_are_logged_in_aggregate() {
    const CANCELS: u64 = 1000;
    let f = ferry("[runtime]\nstats_period = \"1s\"\n");
    let port = f.rw_port;
    let mut tasks = Vec::new();
    for t in 0..20u32 {
        tasks.push(tokio::spawn(async move {
            for i in 0..(CANCELS as u32 / 20) {
                let mut r = Raw::tcp(port).await;
                let mut b = bytes::BytesMut::new();
                pgferry_protocol::encode::cancel_request(&mut b, 1_000_000 + t * 1000 + i, 42);
                r.send(&b).await;
                assert!(r.until_closed().await.is_empty(), "a cancel request gets no answer");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The last period's line.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let log = f.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("cancel request")).collect();
    assert!(
        lines.len() <= 10,
        "{} lines for {CANCELS} cancels:\n{}",
        lines.len(),
        lines[..10.min(lines.len())].join("\n")
    );
    let counted: u64 = lines
        .iter()
        .filter_map(|l| l.split("requests=").nth(1))
        .map(|v| v.split(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted, CANCELS, "{}", lines.join("\n"));
}

/// SHOW LISTS counts the connections still logging in (login_clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_lists_counts_pending_logins() {
    let f = ferry("[limits]\nclient_login_timeout = \"30s\"\n");
    let login_clients = |f: &pgferry_tests::Ferry| -> usize {
        let out = admin(f.rw_port, "SHOW LISTS");
        let row = rows_starting(&out, "login_clients|");
        row[0][1].parse().unwrap()
    };
    // The harness's readiness probe may still be logging in for a moment.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while login_clients(&f) != 0 {
        assert!(std::time::Instant::now() < end, "logins pending at rest");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(("127.0.0.1", f.rw_port)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(login_clients(&f), 3);
    drop(silent);
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while login_clients(&f) != 0 {
        assert!(std::time::Instant::now() < end, "closed logins still counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
