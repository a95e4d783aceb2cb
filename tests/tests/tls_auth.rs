//! TLS on the listeners and to PostgreSQL, SCRAM (with channel binding),
//! hba rules, auth_query, per-user limits and abuse limits: real psql /
//! libpq, tokio-postgres over rustls, a raw rustls client for direct TLS, and
//! a real PostgreSQL with scram-sha-256 and ssl=on. Certificates come from a
//! test CA made here with rcgen.

mod common;

use common::*;
use pgferry_tests::in_recovery;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

// ---- certificates ----

/// A CA and what it signed, as PEM files in `dir`.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
}

impl Pki {
    fn new(name: &str) -> (Pki, CertifiedIssuer<'static, KeyPair>) {
        let dir = std::env::temp_dir().join(format!("pgferry-pki-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("pgferry test CA {name}"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, issuer.pem()).unwrap();
        (Pki { dir, ca }, issuer)
    }

    /// A leaf certificate for `names` (server) or `cn` (client): (cert, key).
    fn leaf(
        &self,
        issuer: &CertifiedIssuer<'static, KeyPair>,
        file: &str,
        cn: &str,
        server: bool,
    ) -> (PathBuf, PathBuf) {
        let names = if server {
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        } else {
            vec![]
        };
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.crt")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        (c, k)
    }
}

fn tls_toml(cert: &Path, key: &Path, extra: &str) -> String {
    format!("[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n{extra}\n")
}

// ---- clients ----

/// Runs psql with a connection string; Ok(stdout) or Err(stderr).
fn psql(conn: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(Path::new(PG_BIN).join("psql"))
        .args([conn, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn conn(port: u16, user: &str, password: &str, extra: &str) -> String {
    format!("host=localhost port={port} user={user} password={password} dbname=app {extra}")
}

/// A rustls client configuration that accepts any certificate and records it.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<u8>>);

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = end_entity.to_vec();
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_config(alpn: bool, recorder: Arc<Recorder>) -> Arc<rustls::ClientConfig> {
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder)
        .with_no_client_auth();
    if alpn {
        c.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    Arc::new(c)
}

/// A client configuration that verifies against `ca`.
fn verifying_config(ca: &Path) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The certificate pgferry presents after an SSLRequest.
async fn presented_cert(port: u16) -> Vec<u8> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.unwrap();
    assert_eq!(s[0], b'S');
    let rec = Arc::new(Recorder::default());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let _tls = tokio_rustls::TlsConnector::from(client_config(false, rec.clone()))
        .connect(name, tcp)
        .await
        .unwrap();
    let der = rec.0.lock().unwrap().clone();
    der
}

async fn tls_client(port: u16, user: &str, password: &str, ca: &Path) -> tokio_postgres::Client {
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(verifying_config(ca));
    let (client, conn) = tokio_postgres::connect(&conn(port, user, password, "sslmode=require"), tls)
        .await
        .unwrap_or_else(|e| panic!("TLS connect: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The SQLSTATE of a failed tokio-postgres connection attempt.
async fn connect_error(conn_str: &str) -> String {
    match tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await {
        Ok(_) => panic!("connection unexpectedly succeeded: {conn_str}"),
        Err(e) => e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| format!("no SQLSTATE: {e}")),
    }
}

// ---- TLS termination ----

#[test]
fn psql_over_tls_verify_full_and_refusals() {
    let (pki, ca) = Pki::new("verify");
    let (cert, key) = pki.leaf(&ca, "server", "localhost", true);
    let f = ferry(&tls_toml(&cert, &key, "client_tls = \"require\""));
    let port = f.rw_port;
    let ca_file = pki.ca.display().to_string();

    let ok = psql(
        &conn(
            port,
            "app",
            APP_PASS,
            &format!("sslmode=verify-full sslrootcert={ca_file}"),
        ),
        "SELECT 42",
    );
    assert_eq!(ok.as_deref(), Ok("42"), "{}", f.log());
    assert_eq!(
        psql(&conn(port, "app", APP_PASS, "sslmode=require"), "SELECT 1").as_deref(),
        Ok("1")
    );
    // The read-only port terminates TLS too.
    let ro = f.ro_port.unwrap();
    assert_eq!(
        psql(
            &conn(
                ro,
                "app",
                APP_PASS,
                &format!("sslmode=verify-full sslrootcert={ca_file}")
            ),
            "SELECT pg_is_in_recovery()"
        )
        .as_deref(),
        Ok("t")
    );

    // A CA that did not sign pgferry's certificate: libpq refuses.
    let (other, _other_ca) = Pki::new("stranger");
    let err = psql(
        &conn(
            port,
            "app",
            APP_PASS,
            &format!("sslmode=verify-full sslrootcert={}", other.ca.display()),
        ),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");

    // Plaintext when TLS is required: FATAL 28000 that says so.
    let err = psql(&conn(port, "app", APP_PASS, "sslmode=disable"), "SELECT 1").unwrap_err();
    assert!(err.contains("pgferry requires TLS"), "{err}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = rt.block_on(connect_error(&f.rw_conn_str("app", APP_PASS, "app")));
    assert_eq!(code, "28000");

    // Wrong password and unknown user over TLS: 28P01, the same message shape.
    let wrong = psql(&conn(port, "app", "nope", "sslmode=require"), "SELECT 1").unwrap_err();
    assert!(
        wrong.contains("password authentication failed for user \"app\""),
        "{wrong}"
    );
    let unknown = psql(&conn(port, "ghost", "nope", "sslmode=require"), "SELECT 1").unwrap_err();
    assert!(
        unknown.contains("password authentication failed for user \"ghost\""),
        "{unknown}"
    );
    assert!(!f.log().contains("nope"), "a password reached the log");
    let _ = std::fs::remove_dir_all(&pki.dir);
    let _ = std::fs::remove_dir_all(&other.dir);
}

#[test]
fn scram_channel_binding_is_required_and_works() {
    let (pki, ca) = Pki::new("cb");
    let (cert, key) = pki.leaf(&ca, "server", "localhost", true);
    let f = ferry(&tls_toml(&cert, &key, ""));
    // libpq with channel_binding=require picks SCRAM-SHA-256-PLUS and checks
    // pgferry's tls-server-end-point hash; it fails if either side is wrong.
    let out = psql(
        &conn(f.rw_port, "app", APP_PASS, "sslmode=require channel_binding=require"),
        "SELECT current_user",
    );
    assert_eq!(out.as_deref(), Ok("app"), "{}", f.log());
    // Without TLS there is nothing to bind to: libpq refuses by itself.
    let err = psql(
        &conn(f.rw_port, "app", APP_PASS, "sslmode=disable channel_binding=require"),
        "SELECT 1",
    )
    .unwrap_err();
    assert!(err.contains("channel binding"), "{err}");
    // client_tls = allow (the default with a certificate): plaintext works.
    assert_eq!(
        psql(&conn(f.rw_port, "app", APP_PASS, "sslmode=disable"), "SELECT 2").as_deref(),
        Ok("2")
    );
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[test]
fn mutual_tls_checks_client_certificates() {
    let (pki, ca) = Pki::new("mtls");
    let (cert, key) = pki.leaf(&ca, "server", "localhost", true);
    let (ccert, ckey) = pki.leaf(&ca, "client", "app", false);
    let (stranger, sca) = Pki::new("mtls-stranger");
    let (bcert, bkey) = stranger.leaf(&sca, "client", "app", false);
    let f = ferry(&tls_toml(
        &cert,
        &key,
        &format!("client_tls = \"require\"\nclient_ca_file = {:?}", pki.ca),
    ));
    let good = format!("sslmode=require sslcert={} sslkey={}", ccert.display(), ckey.display());
    assert_eq!(
        psql(&conn(f.rw_port, "app", APP_PASS, &good), "SELECT 7").as_deref(),
        Ok("7"),
        "{}",
        f.log()
    );
    assert!(
        f.log().contains("client_cert=true"),
        "the login line says a certificate was presented"
    );
    let none = psql(&conn(f.rw_port, "app", APP_PASS, "sslmode=require"), "SELECT 1").unwrap_err();
    assert!(none.contains("certificate") || none.contains("SSL"), "{none}");
    let bad = format!("sslmode=require sslcert={} sslkey={}", bcert.display(), bkey.display());
    let err = psql(&conn(f.rw_port, "app", APP_PASS, &bad), "SELECT 1").unwrap_err();
    assert!(
        err.contains("certificate") || err.contains("SSL") || err.contains("alert"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&pki.dir);
    let _ = std::fs::remove_dir_all(&stranger.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_requires_alpn_postgresql() {
    let (pki, ca) = Pki::new("direct");
    let (cert, key) = pki.leaf(&ca, "server", "localhost", true);
    let f = ferry(&tls_toml(&cert, &key, ""));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // PostgreSQL 17's direct TLS: a ClientHello first, with ALPN.
    let tcp = TcpStream::connect(("127.0.0.1", f.rw_port)).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client_config(true, Arc::default()))
        .connect(name.clone(), tcp)
        .await
        .expect("direct TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    let mut b = bytes::BytesMut::new();
    pgferry_protocol::encode::startup_message(&mut b, &[("user", "app"), ("database", "app")]);
    tls.write_all(&b).await.unwrap();
    let mut head = [0u8; 9];
    tls.read_exact(&mut head).await.unwrap();
    // AuthenticationSASL, offering SCRAM-SHA-256-PLUS first.
    assert_eq!((head[0], &head[5..9]), (b'R', &[0u8, 0, 0, 10][..]));
    let mut rest = vec![0u8; u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize - 8];
    tls.read_exact(&mut rest).await.unwrap();
    assert!(rest.starts_with(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0"), "{rest:?}");

    // Without ALPN, direct TLS is refused: the connection closes.
    let tcp = TcpStream::connect(("127.0.0.1", f.rw_port)).await.unwrap();
    let r = tokio_rustls::TlsConnector::from(client_config(false, Arc::default()))
        .connect(name, tcp)
        .await;
    if let Ok(mut s) = r {
        s.write_all(&b).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(matches!(n, Ok(0) | Err(_)), "no reply expected without ALPN: {n:?}");
    }
    let log = f.wait_log("without ALPN", Duration::from_secs(5));
    assert!(log.contains("without ALPN"), "{log}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// A TLS 1.1-only ClientHello (record version 3.1, client_version 3.2, no
/// supported_versions extension) after SSLRequest: pgferry answers with a
/// TLS alert, never a handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_is_refused() {
    let (pki, ca) = Pki::new("tls11");
    let (cert, key) = pki.leaf(&ca, "server", "localhost", true);
    let f = ferry(&tls_toml(&cert, &key, ""));
    let mut tcp = TcpStream::connect(("127.0.0.1", f.rw_port)).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.unwrap();
    let mut s = [0u8; 1];
    tcp.read_exact(&mut s).await.unwrap();
    assert_eq!(s[0], b'S');
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend_from_slice(&[0x11; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // AES-CBC-SHA suites
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
                                            // signature_algorithms (so that the version is what rustls objects to)
    let ext = [0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x01, 0x04, 0x03];
    hello.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    hello.extend_from_slice(&ext);
    let mut hs = vec![0x01, 0x00, 0x00, hello.len() as u8];
    hs.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, hs.len() as u8];
    record.extend_from_slice(&hs);
    tcp.write_all(&record).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply)).await;
    // An alert (0x15) or nothing, never a ServerHello (0x16).
    assert!(
        matches!(reply.first(), Some(0x15) | None),
        "expected a TLS alert, got {reply:?}"
    );
    let needle = "TLS handshake failed: peer is incompatible: Tls12NotOffered";
    let log = f.wait_log(needle, Duration::from_secs(5));
    assert!(log.contains(needle), "{log}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// The certificate is replaced and SIGHUP sent while clients run
/// transactions over TLS: no transaction fails, and new handshakes get the
/// new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reload_under_load() {
    let (pki, ca) = Pki::new("reload");
    let (cert, key) = pki.leaf(&ca, "server", "localhost", true);
    let mut f = ferry(&tls_toml(
        &cert,
        &key,
        "client_tls = \"require\"\n[pool]\npool_size = 4",
    ));
    let port = f.rw_port;
    let before = presented_cert(port).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for i in 0..20 {
        let (stop, done, ca) = (stop.clone(), done.clone(), pki.ca.clone());
        workers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Half the clients reconnect for every transaction, so that
                // handshakes run across the reload.
                let c = tls_client(port, "app", APP_PASS, &ca).await;
                for _ in 0..if i % 2 == 0 { 1 } else { 50 } {
                    match c.query_one("SELECT 1::int4 + $1", &[&1i32]).await {
                        Ok(_) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Replace the files (as a certificate renewal does), then SIGHUP.
    let (new_cert, new_key) = pki.leaf(&ca, "server2", "localhost", true);
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    f.signal(libc::SIGHUP).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in workers {
        errors.extend(w.await.unwrap());
    }
    assert!(errors.is_empty(), "failed transactions: {errors:?}");
    assert!(done.load(Ordering::Relaxed) > 100, "too few transactions ran");
    let after = presented_cert(port).await;
    assert_ne!(before, after, "the new certificate is served after SIGHUP");
    assert!(f.log().contains("SIGHUP: configuration, users and TLS files reloaded"));

    // A broken file: the reload fails and the current certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    f.signal(libc::SIGHUP).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(presented_cert(port).await, after);
    assert!(
        f.log().contains("SIGHUP: reload refused") && f.log().contains("TLS:"),
        "{}",
        f.log()
    );
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// TLS clients are never parked (rustls keeps its state in the stream):
/// idle well past park_idle_after, a TLS client keeps its session, while a
/// plain one beside it is parked; both go on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_are_not_parked() {
    let (pki, ca) = Pki::new("park");
    let (cert, key) = pki.leaf(&ca, "server", "localhost", true);
    let f = ferry(&tls_toml(&cert, &key, "[runtime]\npark_idle_after = \"200ms\"\n"));
    let tls = tls_client(f.rw_port, "app", APP_PASS, &pki.ca).await;
    let plain = app(&f).await;
    let parked = || async {
        let (_, body) = get(http_port(&f), "/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix("pgferry_clients_parked "))
            .map(|v| v.trim().to_owned())
    };
    let t = Instant::now();
    while parked().await.as_deref() != Some("1") {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "plain client not parked\n{}",
            f.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(parked().await.as_deref(), Some("1"), "only the plain client is parked");
    assert_eq!(tls.simple_query("SELECT 1").await.unwrap().len(), 3);
    assert_eq!(plain.simple_query("SELECT 1").await.unwrap().len(), 3);
}

/// Cancels for a TLS client's query: on a new plain connection (as libpq
/// sends them) and inside TLS (as tokio-postgres does with sslmode=require).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_tls_client_query() {
    let (pki, ca) = Pki::new("cancel");
    let (cert, key) = pki.leaf(&ca, "server", "localhost", true);
    // Cancels are logged as a count per stats_period.
    let f = ferry(&tls_toml(&cert, &key, "[runtime]\nstats_period = \"1s\"\n"));
    for (sslmode, plain_cancel) in [("prefer", true), ("require", false)] {
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(verifying_config(&pki.ca));
        let (c, conn) = tokio_postgres::connect(
            &conn(f.rw_port, "app", APP_PASS, &format!("sslmode={sslmode}")),
            tls.clone(),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let token = c.cancel_token();
        let started = Instant::now();
        let q = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        if plain_cancel {
            token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        } else {
            token.cancel_query(tls).await.unwrap();
        }
        let err = q.await.unwrap().unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{sslmode}: {err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    let forwarded = |log: &str| -> u64 {
        log.lines()
            .filter(|l| l.contains("cancel requests in the last period"))
            .filter_map(|l| l.split("forwarded=").nth(1))
            .map(|v| v.split(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let end = Instant::now() + Duration::from_secs(5);
    while forwarded(&f.log()) < 2 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = f.log();
    assert_eq!(log.matches("tls=true").count(), 2, "both sessions were on TLS: {log}");
    assert_eq!(forwarded(&log), 2, "{log}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

// ---- TLS to PostgreSQL ----

/// Turns on ssl in the shared cluster's primary with a certificate for
/// "localhost" from `issuer`.
fn enable_server_ssl(pki: &Pki, issuer: &CertifiedIssuer<'static, KeyPair>) {
    let cluster = pgferry_tests::shared_cluster();
    let (cert, key) = pki.leaf(issuer, "pg", "localhost", true);
    let data = cluster.data_dir(pgferry_tests::Node::Primary);
    let (dc, dk) = (data.join("pgferry-test.crt"), data.join("pgferry-test.key"));
    std::fs::copy(&cert, &dc).unwrap();
    std::fs::copy(&key, &dk).unwrap();
    cluster.os_user().chown(&dc).unwrap();
    cluster.os_user().chown(&dk).unwrap();
    primary_sql(&format!(
        "ALTER SYSTEM SET ssl_cert_file = '{}'; ALTER SYSTEM SET ssl_key_file = '{}'; ALTER SYSTEM SET ssl = on;",
        dc.display(),
        dk.display()
    ));
    primary_sql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connections_use_verified_tls() {
    let (pki, ca) = Pki::new("server");
    enable_server_ssl(&pki, &ca);
    let cluster = pgferry_tests::shared_cluster();
    let primary = cluster.primary_port;
    let topo = format!("[topology]\nprimary = \"localhost:{primary}\"\nstandbys = []\n");
    let f = ferry(&format!(
        "{topo}[tls]\nserver_tls = \"verify-full\"\nserver_ca_file = {:?}\n",
        pki.ca
    ));
    let c = app(&f).await;
    let row = c
        .query_one("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "pgferry's server connection is not on TLS");
    assert!(row.get::<_, String>(1).starts_with("TLSv1."));

    // A CA that did not sign PostgreSQL's certificate: no server connection.
    let (other, _oca) = Pki::new("server-stranger");
    let g = ferry(&format!(
        "{topo}[tls]\nserver_tls = \"verify-ca\"\nserver_ca_file = {:?}\n",
        other.ca
    ));
    let code = connect_error(&g.rw_conn_str("app", APP_PASS, "app")).await;
    assert_eq!(code, "08001", "{}", g.log());
    assert!(g.log().contains("TLS handshake with localhost"), "{}", g.log());

    // require encrypts without verifying, as in libpq.
    let h = ferry(&format!("{topo}[tls]\nserver_tls = \"require\"\n"));
    let c = app(&h).await;
    let row = c
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    let _ = std::fs::remove_dir_all(&pki.dir);
    let _ = std::fs::remove_dir_all(&other.dir);
}

// ---- hba, users, limits ----

#[test]
fn hba_rules_pick_the_method_in_order() {
    let (pki, ca) = Pki::new("hba");
    let (cert, key) = pki.leaf(&ca, "server", "localhost", true);
    let f = ferry(&format!(
        "{}\
         [[hba]]\ntype = \"hostnossl\"\nuser = [\"other\"]\nmethod = \"reject\"\n\
         [[hba]]\naddress = \"10.0.0.0/8\"\nmethod = \"trust\"\n\
         [[hba]]\naddress = \"127.0.0.1/32\"\nuser = [\"app\", \"other\"]\nmethod = \"scram-sha-256\"\n",
        tls_toml(&cert, &key, "")
    ));
    // other over plaintext hits the reject rule.
    let err = psql(&conn(f.rw_port, "other", "other-pass", "sslmode=disable"), "SELECT 1").unwrap_err();
    assert!(err.contains("pgferry hba rejects"), "{err}");
    // Over TLS the third rule applies.
    assert_eq!(
        psql(
            &conn(f.rw_port, "other", "other-pass", "sslmode=require"),
            "SELECT current_user"
        )
        .as_deref(),
        Ok("other")
    );
    // The trust rule is for 10/8 only: from 127.0.0.1 app still needs its password.
    let wrong = psql(&conn(f.rw_port, "app", "wrong", "sslmode=disable"), "SELECT 1").unwrap_err();
    assert!(wrong.contains("password authentication failed"), "{wrong}");
    // admin matches no rule at all.
    let none = psql(&conn(f.rw_port, "admin", "admin-pass", "sslmode=disable"), "SELECT 1").unwrap_err();
    assert!(none.contains("pgferry hba has no entry for"), "{none}");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_users_and_client_caps() {
    let mut f = ferry(
        "[[user]]\nname = \"other\"\naccess = \"read-only\"\nmax_client_connections = 2\n\
         [[user]]\nname = \"admin\"\naccess = \"read-only-port\"\n",
    );
    primary_sql("CREATE TABLE IF NOT EXISTS ro_probe (x int); GRANT ALL ON ro_probe TO other;");
    pgferry_tests::shared_cluster().wait_for_replay().unwrap();
    // Forced read-only on the read-write port: PostgreSQL refuses the write.
    let c = connect(&f, "other", "other-pass").await;
    let e = c.simple_query("INSERT INTO ro_probe VALUES (1)").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25006"), "{e}");
    // And pgferry refuses the ways out of read-only mode.
    for sql in [
        "SET default_transaction_read_only = off",
        "BEGIN READ WRITE",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        "RESET ALL",
    ] {
        let e = c.simple_query(sql).await.unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("25006"), "{sql}: {e}");
    }
    let e = c.prepare("BEGIN READ WRITE").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25006"));
    assert_eq!(
        c.query_one("SELECT count(*) FROM ro_probe", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0,
        "reads still work"
    );
    // max_client_connections = 2: the third connection is refused.
    let _c2 = connect(&f, "other", "other-pass").await;
    let code = connect_error(&f.rw_conn_str("other", "other-pass", "app")).await;
    assert_eq!(code, "53300");
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _c3 = connect(&f, "other", "other-pass").await;
    // A reload that raises the cap applies to the next login.
    let code = connect_error(&f.rw_conn_str("other", "other-pass", "app")).await;
    assert_eq!(code, "53300");
    let original = std::fs::read_to_string(&f.config_path).unwrap();
    assert!(original.contains("max_client_connections = 2"), "{original}");
    std::fs::write(
        &f.config_path,
        original.replace("max_client_connections = 2", "max_client_connections = 3"),
    )
    .unwrap();
    let reloads = f.log().matches(" reloaded").count();
    f.signal(libc::SIGHUP).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while f.log().matches(" reloaded").count() == reloads {
        assert!(Instant::now() < end, "no reload:\n{}", f.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _c4 = connect(&f, "other", "other-pass").await;

    // read-only-port: 5432 refuses the login, 5433 takes it.
    let code = connect_error(&f.rw_conn_str("admin", "admin-pass", "app")).await;
    assert_eq!(code, "42501");
    let (ro, conn) = tokio_postgres::connect(&f.ro_conn_str("admin", "admin-pass", "app"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = ro.query_one("SELECT pg_is_in_recovery()", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0));
}

/// A read-only user is read-only on 5432 and on 5433 when 5433 falls back to
/// the primary: PostgreSQL refuses its writes (its server connections log in
/// with default_transaction_read_only = on), pgferry refuses the statements
/// that would turn that off, and reads of the setting work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_user_is_read_only_on_both_ports() {
    let f = ferry(
        "[topology]\nstandbys = []\n[pool]\nro_fallback_to_primary = true\n\
         [[user]]\nname = \"other\"\naccess = \"read-only\"\n",
    );
    primary_sql("CREATE TABLE IF NOT EXISTS ro_both (x int); GRANT ALL ON ro_both TO other;");
    let code = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_owned()).unwrap_or_else(|| e.to_string());
    let rw = f.rw_conn_str("other", "other-pass", "app");
    let ro = f.ro_conn_str("other", "other-pass", "app");
    // The third asks for read-write in its startup packet.
    let ro_asking = format!("{ro} options='-c default_transaction_read_only=off'");
    for conn_str in [&rw, &ro, &ro_asking] {
        let c = pgferry_tests::connect(conn_str).await.unwrap();
        assert!(!in_recovery(&c).await, "{conn_str}: the primary serves it");
        let e = c.simple_query("INSERT INTO ro_both VALUES (1)").await.unwrap_err();
        assert_eq!(code(e), "25006", "{conn_str}: INSERT");
        let e = c
            .execute("INSERT INTO ro_both VALUES ($1)", &[&2i32])
            .await
            .unwrap_err();
        assert_eq!(code(e), "25006", "{conn_str}: extended INSERT");
        for sql in [
            "SET default_transaction_read_only = off",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "BEGIN READ WRITE",
            "START TRANSACTION READ WRITE",
            "SELECT set_config('default_transaction_read_only', 'off', false)",
            "RESET default_transaction_read_only",
            "RESET ALL",
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'default_transaction_read_only'",
        ] {
            let e = c.simple_query(sql).await.unwrap_err();
            assert_eq!(code(e), "25006", "{conn_str}: {sql}");
        }
        // Inside a transaction too, where transaction_read_only could be set.
        c.batch_execute("BEGIN").await.unwrap();
        let e = c.simple_query("SET transaction_read_only = off").await.unwrap_err();
        assert_eq!(code(e), "25006", "{conn_str}: SET transaction_read_only");
        c.batch_execute("ROLLBACK").await.unwrap();

        // Reads of the settings.
        let show: String = c
            .query_one("SHOW default_transaction_read_only", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(show, "on", "{conn_str}");
        let current: String = c
            .query_one("SELECT current_setting('transaction_read_only')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(current, "on", "{conn_str}");
        let rows = c.simple_query("SHOW transaction_read_only").await.unwrap();
        assert!(!rows.is_empty(), "{conn_str}: simple SHOW");
        let n: i64 = c.query_one("SELECT count(*) FROM ro_both", &[]).await.unwrap().get(0);
        assert_eq!(n, 0, "{conn_str}: nothing was written");
    }
}

/// SQL built at run time can get past the guard's text scan; PostgreSQL
/// then reports default_transaction_read_only = off, and pgferry closes that
/// server connection (rolling back) instead of letting a read-only user
/// keep a read-write session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_session_turned_read_write_loses_its_connection() {
    let f = ferry("[[user]]\nname = \"other\"\naccess = \"read-only\"\n");
    primary_sql("CREATE TABLE IF NOT EXISTS ro_evade (x int); GRANT ALL ON ro_evade TO other;");
    let c = pgferry_tests::connect(&f.rw_conn_str("other", "other-pass", "app"))
        .await
        .unwrap();
    let evade = "DO $$BEGIN EXECUTE format('SET %s = %s', 'default_transaction' || '_read_only', 'off'); END$$";
    assert!(c.simple_query(evade).await.is_err(), "the session must not survive it");
    assert!(
        f.log().contains("turned default_transaction_read_only off"),
        "{}",
        f.log()
    );
    let c = pgferry_tests::connect(&f.rw_conn_str("other", "other-pass", "app"))
        .await
        .unwrap();
    let show: String = c
        .query_one("SHOW default_transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(show, "on");
    let e = c.simple_query("INSERT INTO ro_evade VALUES (1)").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25006"));
}

/// An attacker and a legitimate client on one address (127.0.0.1), even
/// for the same user: beyond auth_failure_limit the attacker's failures
/// are answered only after auth_failure_delay, while the right password
/// logs in at once and cancel requests from the address still work.
/// Nothing is refused because of someone else's failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_slowed_down_not_refused() {
    let f = ferry("[limits]\nauth_failure_limit = 5\nauth_failure_window = \"60s\"\nauth_failure_delay = \"1500ms\"\n");
    // Up to the limit, failures are answered at once.
    for i in 0..5 {
        let t = Instant::now();
        assert_eq!(
            connect_error(&f.rw_conn_str("app", &format!("wrong-{i}"), "app")).await,
            "28P01"
        );
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "failure {i} took {:?}",
            t.elapsed()
        );
    }
    // Beyond it, every failure of app from this address is slowed down.
    let mut attacks = Vec::new();
    for i in 5..15 {
        let cs = f.rw_conn_str("app", &format!("wrong-{i}"), "app");
        attacks.push(tokio::spawn(async move {
            let t = Instant::now();
            (connect_error(&cs).await, t.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile the legitimate client logs in at once and works.
    let t = Instant::now();
    let c = connect(&f, "app", APP_PASS).await;
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "login took {:?}",
        t.elapsed()
    );
    // A cancel request from the same address reaches its query.
    let token = c.cancel_token();
    let query = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel request served");
    let r = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("the query was cancelled")
        .unwrap();
    let e = r.expect_err("pg_sleep(30) was cancelled");
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    for a in attacks {
        let (code, took) = a.await.unwrap();
        assert_eq!(code, "28P01");
        assert!(
            took >= Duration::from_millis(1400),
            "a failure beyond the limit took only {took:?}"
        );
    }
    // Another user on the address is not slowed down by app's failures.
    let t = Instant::now();
    assert_eq!(connect_error(&f.rw_conn_str("other", "wrong", "app")).await, "28P01");
    assert!(t.elapsed() < Duration::from_millis(1000));
    let log = f.log();
    assert!(log.contains("slowing down further failures"), "{log}");
    assert!(!log.contains("refusing address"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_logins_are_capped() {
    let f = ferry("[limits]\nmax_pending_logins = 5\nclient_login_timeout = \"3s\"\n");
    // The harness's readiness probe may still hold a slot for a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(TcpStream::connect(("127.0.0.1", f.rw_port)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    match tokio_postgres::connect(&f.rw_conn_str("app", APP_PASS, "app"), tokio_postgres::NoTls).await {
        Ok(_) => panic!("a sixth login was accepted:\n{}", f.log()),
        Err(e) => assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}"),
    }
    // Once the silent ones time out, logins work again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let c = app(&f).await;
    c.simple_query("SELECT 1").await.unwrap();
    drop(idle);
}

// ---- auth_query ----

/// auth_query through a SECURITY DEFINER function, as an unprivileged
/// auth_user: users missing from the users file log in with their
/// PostgreSQL password (and pgferry logs in to PostgreSQL as them by SCRAM
/// pass-through); unknown users, wrong passwords, expired VALID UNTIL and
/// injection attempts all get 28P01.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_logins() {
    primary_sql(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'aq_auth') THEN
             CREATE ROLE aq_auth LOGIN PASSWORD 'aq-auth-pass';
             CREATE ROLE aq_user LOGIN PASSWORD 'aq-user-pass';
             CREATE ROLE aq_expired LOGIN PASSWORD 'aq-expired-pass' VALID UNTIL '2001-01-01';
             CREATE ROLE aq_future LOGIN PASSWORD 'aq-future-pass' VALID UNTIL 'infinity';
           END IF;
         END $$;
         GRANT CONNECT ON DATABASE app TO aq_user, aq_expired, aq_future;
         CREATE TABLE IF NOT EXISTS aq_canary (x int);
         CREATE OR REPLACE FUNCTION public.pgferry_lookup(uname text)
           RETURNS TABLE (usename name, passwd text, valuntil timestamptz)
           LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
           $f$ SELECT usename, passwd, valuntil FROM pg_catalog.pg_shadow WHERE usename = uname $f$;
         REVOKE ALL ON FUNCTION public.pgferry_lookup(text) FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION public.pgferry_lookup(text) TO aq_auth;",
    );
    pgferry_tests::shared_cluster().wait_for_replay().unwrap();
    let f = ferry(
        "[auth]\nauth_user = \"aq_auth\"\nauth_query = \"SELECT * FROM public.pgferry_lookup($1)\"\n\
         [[user]]\nname = \"aq_auth\"\nserver_password = \"aq-auth-pass\"\n",
    );
    let c = connect(&f, "aq_user", "aq-user-pass").await;
    let who = c.query_one("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(who.get::<_, String>(0), "aq_user");
    let c = connect(&f, "aq_future", "aq-future-pass").await;
    c.simple_query("SELECT 1").await.unwrap();

    let attempts = [
        ("aq_user", "wrong"),
        ("nobody_here", "whatever"),
        ("aq_expired", "aq-expired-pass"),
        ("x' OR '1'='1", "x"),
        ("aq_user'; DROP TABLE aq_canary; --", "x"),
        ("\"; SET search_path = evil; --", "x"),
    ];
    for (user, password) in attempts {
        let code = connect_error(&f.rw_conn_str(user, password, "app")).await;
        assert_eq!(code, "28P01", "{user}");
    }
    assert_eq!(
        primary_sql("SELECT count(*) FROM pg_class WHERE relname = 'aq_canary'"),
        "1"
    );
    let log = f.log();
    assert!(log.contains("VALID UNTIL has passed"), "{log}");
    assert!(
        !log.contains("aq-expired-pass") && !log.contains("aq-user-pass"),
        "a password reached the log"
    );

    // An unknown user and a wrong password take about the same time (on a
    // fresh proxy without the throttle, which would soon refuse us).
    drop(f);
    let f = ferry(
        "[auth]\nauth_user = \"aq_auth\"\nauth_query = \"SELECT * FROM public.pgferry_lookup($1)\"\n\
         [[user]]\nname = \"aq_auth\"\nserver_password = \"aq-auth-pass\"\n[limits]\nauth_failure_limit = 0\n",
    );
    // Warm up the auth_query pool first: its first connection is not
    // what is being compared.
    time_failed_logins(&f.rw_conn_str("warm_up", "wrong", "app")).await;
    let known = time_failed_logins(&f.rw_conn_str("aq_user", "wrong", "app")).await;
    let unknown = time_failed_logins(&f.rw_conn_str("nobody_at_all", "wrong", "app")).await;
    let ratio = known.as_secs_f64() / unknown.as_secs_f64();
    eprintln!("wrong password: {known:?}, unknown user: {unknown:?} (5 attempts each)");
    assert!((0.33..3.0).contains(&ratio), "timing differs: {known:?} vs {unknown:?}");
}

async fn time_failed_logins(conn_str: &str) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        assert!(tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await.is_err());
        total += t.elapsed();
    }
    total
}
