//! Tests of the harness itself: real PostgreSQL, no pgferry needed.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pgferry_protocol::scram::Secret;
use pgferry_tests::{
    conn_str, free_port, port_accepts, shared_cluster, wait_for, wait_until, Ferry, Node, PgCluster, PgOptions,
};

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// Logs in with tokio-postgres and returns `current_user|current_database()`.
fn login(port: u16, user: &str, password: &str, db: &str) -> Result<String, tokio_postgres::Error> {
    block_on(async {
        let (client, conn) =
            tokio_postgres::connect(&conn_str(port, user, password, db), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let row = client
            .query_one("SELECT current_user::text, current_database()::text", &[])
            .await?;
        Ok(format!("{}|{}", row.get::<_, String>(0), row.get::<_, String>(1)))
    })
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/pgferry-harness-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn cluster_with_standby_streams_and_drop_cleans_up() {
    let c = PgCluster::start(PgOptions { standby: true }).unwrap();
    let (pp, sp) = (c.primary_port, c.standby_port.expect("standby port"));
    assert_ne!(pp, sp);
    assert!(port_accepts(pp) && port_accepts(sp));

    assert_eq!(c.psql(pp, "postgres", "SELECT pg_is_in_recovery()").unwrap(), "f");
    assert_eq!(c.psql(sp, "postgres", "SELECT pg_is_in_recovery()").unwrap(), "t");
    assert_eq!(
        c.psql_primary("postgres", "SELECT state FROM pg_stat_replication")
            .unwrap(),
        "streaming"
    );
    for (setting, want) in [
        ("max_connections", "300"),
        ("fsync", "off"),
        ("listen_addresses", "127.0.0.1"),
        ("wal_level", "replica"),
        ("password_encryption", "scram-sha-256"),
    ] {
        assert_eq!(
            c.psql(pp, "postgres", &format!("SHOW {setting}")).unwrap(),
            want,
            "{setting}"
        );
    }
    assert_eq!(c.psql(sp, "postgres", "SHOW port").unwrap(), sp.to_string());

    // Several statements, several rows; replication reaches the standby.
    c.psql_primary("postgres", "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2);")
        .unwrap();
    c.wait_for_replay().unwrap();
    assert_eq!(c.psql(sp, "postgres", "SELECT x FROM t ORDER BY x").unwrap(), "1\n2");
    assert_eq!(c.psql(sp, "postgres", "SELECT 1, 'a'").unwrap(), "1|a");

    // Errors carry PostgreSQL's message.
    let err = c.psql(sp, "postgres", "INSERT INTO t VALUES (3)").unwrap_err();
    assert!(format!("{err:#}").contains("read-only transaction"), "{err:#}");
    let err = c.psql(pp, "postgres", "SELECT 1; SELECT nope; SELECT 2").unwrap_err();
    assert!(format!("{err:#}").contains("\"nope\" does not exist"), "{err:#}");

    // The servers run as the unprivileged user, which owns the directory.
    let user = c.os_user();
    let meta = fs::metadata(c.data_dir(Node::Primary)).unwrap();
    assert_eq!(meta.uid(), user.uid);
    assert_ne!(user.uid, 0);
    assert!(c.log_path(Node::Primary).is_file());
    assert!(c.log_path(Node::Standby).is_file());

    let dir = c.dir.clone();
    drop(c);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(!port_accepts(pp), "primary still listening");
    assert!(!port_accepts(sp), "standby still listening");
}

#[test]
fn stop_start_and_promote_nodes() {
    let c = PgCluster::start(PgOptions { standby: true }).unwrap();
    c.stop_node(Node::Standby, "fast").unwrap();
    assert!(!port_accepts(c.port(Node::Standby)));
    c.start_node(Node::Standby).unwrap();
    assert_eq!(
        c.psql(c.port(Node::Standby), "postgres", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "t"
    );
    c.promote_standby().unwrap();
    assert_eq!(
        c.psql(c.port(Node::Standby), "postgres", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "f"
    );
    c.psql(c.port(Node::Standby), "postgres", "CREATE TABLE after_promote ()")
        .unwrap();
}

#[test]
fn cluster_without_standby() {
    let c = PgCluster::start(PgOptions::default()).unwrap();
    assert_eq!(c.standby_port, None);
    assert_eq!(
        c.psql_primary("postgres", "SELECT count(*) FROM pg_stat_replication")
            .unwrap(),
        "0"
    );
    c.wait_for_replay().unwrap();
}

#[test]
fn create_user_scram_secret_and_userlist_round_trip() {
    let c = shared_cluster();
    let password = "s3cret 'quoted' \\ pw";
    c.create_user("alice", password).unwrap();
    c.create_database("alicedb", "alice").unwrap();

    let secret = c.scram_secret("alice").unwrap();
    assert!(secret.starts_with("SCRAM-SHA-256$4096:"), "{secret}");
    // The verifier really is the password's: recompute it from the salt.
    let parsed = Secret::parse(&secret).unwrap();
    assert_eq!(Secret::from_password(password, &parsed.salt, parsed.iterations), parsed);
    assert_eq!(parsed.encode(), secret);

    // PostgreSQL accepts the password over TCP with SCRAM, and only it.
    assert_eq!(
        login(c.primary_port, "alice", password, "alicedb").unwrap(),
        "alice|alicedb"
    );
    let err = login(c.primary_port, "alice", "wrong", "alicedb").unwrap_err();
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("28P01"), "{err}");
    // ... on the standby too, once replayed.
    c.wait_for_replay().unwrap();
    assert_eq!(
        login(c.standby_port.unwrap(), "alice", password, "alicedb").unwrap(),
        "alice|alicedb"
    );

    assert!(c.scram_secret("nobody").is_err());

    let dir = scratch_dir("userlist");
    let path = dir.join("userlist.txt");
    c.write_userlist(&path, &["alice", "app"]).unwrap();
    let app_secret = c.scram_secret("app").unwrap();
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        format!("\"alice\" \"{secret}\"\n\"app\" \"{app_secret}\"\n")
    );
    assert!(c.write_userlist(&path, &["nobody"]).is_err());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shared_cluster_has_the_standard_users() {
    let c = shared_cluster();
    assert!(std::ptr::eq(c, shared_cluster()));
    let sp = c.standby_port.expect("shared cluster has a standby");
    for port in [c.primary_port, sp] {
        assert_eq!(login(port, "app", "app-pass", "app").unwrap(), "app|app");
        assert_eq!(login(port, "other", "other-pass", "app").unwrap(), "other|app");
        assert_eq!(
            login(port, "admin", "admin-pass", "postgres").unwrap(),
            "admin|postgres"
        );
    }
    assert_eq!(
        c.psql_primary(
            "postgres",
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'"
        )
        .unwrap(),
        "app"
    );
    assert_eq!(c.psql(sp, "postgres", "SELECT pg_is_in_recovery()").unwrap(), "t");
    // app can create tables in its database (PostgreSQL 15: it owns `public`).
    c.psql_primary("app", "SET ROLE app; CREATE TABLE app_owned (x int)")
        .unwrap();
}

#[test]
fn cluster_config_is_valid_for_pgferry_and_merges_extra() {
    let c = shared_cluster();
    let dir = scratch_dir("config");
    let extra = "[pool]\npool_size = 2\n\
                 [limits]\nmax_client_conn = 50\n\
                 [[user]]\nname = \"app\"\npool_size = 3\n\
                 [[user]]\nname = \"other\"\nserver_password = \"other-pass\"\n";
    let text = Ferry::cluster_config(c, &dir, extra).unwrap();
    let cfg = pgferry_config::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    assert_eq!(cfg.listen.rw.ip().to_string(), "127.0.0.1");
    let ro = cfg.listen.ro.expect("ro");
    assert_ne!(cfg.listen.rw.port(), ro.port());
    assert_eq!(cfg.pool.pool_size, 2);
    assert_eq!(cfg.limits.max_client_conn, 50);
    assert_eq!(cfg.auth.admin_users, vec!["admin".to_string()]);
    let pgferry_config::Topology::Static { primary, standbys } = &cfg.topology else {
        panic!("the harness writes a static topology");
    };
    assert_eq!(primary, &format!("127.0.0.1:{}", c.primary_port));
    assert_eq!(standbys, &vec![format!("127.0.0.1:{}", c.standby_port.unwrap())]);
    let app = cfg.user("app").unwrap();
    assert_eq!(app.server_password.as_deref(), Some("app-pass"));
    assert_eq!(app.pool_size, Some(3));
    assert_eq!(
        cfg.user("other").unwrap().server_password.as_deref(),
        Some("other-pass")
    );

    let users_file = cfg.auth.users_file.clone().unwrap();
    assert_eq!(users_file, dir.join("userlist.txt"));
    let list = fs::read_to_string(&users_file).unwrap();
    for user in ["app", "admin", "other"] {
        let line = format!("\"{user}\" \"{}\"", c.scram_secret(user).unwrap());
        assert!(list.lines().any(|l| l == line), "{line} not in\n{list}");
    }
    fs::remove_dir_all(&dir).unwrap();
}

/// Writes an executable fake `pgferry` script into `dir`.
fn fake_pgferry(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake-pgferry");
    fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             [ \"$1\" = --config ] && [ -f \"$2\" ] || {{ echo \"bad arguments: $*\" >&2; exit 2; }}\n\
             {body}\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Not a test: the body of the fake pgferry of `ferry_start_waits_for_listeners`
/// (this test binary re-run with FAKE_PGFERRY_LISTEN set).
#[test]
#[ignore = "helper process, run by ferry_start_waits_for_listeners"]
fn fake_pgferry_listener() {
    let Ok(addrs) = std::env::var("FAKE_PGFERRY_LISTEN") else {
        return;
    };
    // Listen late, so that Ferry::start has to wait.
    std::thread::sleep(Duration::from_millis(300));
    let listeners: Vec<_> = addrs
        .split(',')
        .map(|a| std::net::TcpListener::bind(a).unwrap())
        .collect();
    eprintln!("fake pgferry listening on {addrs}");
    std::thread::sleep(Duration::from_secs(60));
    drop(listeners);
}

#[test]
fn ferry_start_waits_for_listeners_and_drop_kills() {
    let dir = scratch_dir("fake-listener");
    let (rw, ro) = (free_port(), free_port());
    let exe = std::env::current_exe().unwrap();
    let bin = fake_pgferry(
        &dir,
        &format!(
            "echo fake pgferry starting >&2\n\
             FAKE_PGFERRY_LISTEN=127.0.0.1:{rw},127.0.0.1:{ro} exec {} --exact fake_pgferry_listener --include-ignored --nocapture --quiet",
            exe.display()
        ),
    );
    let config = format!("[listen]\nrw = \"127.0.0.1:{rw}\"\nro = \"127.0.0.1:{ro}\"\n");
    let mut ferry = Ferry::start_with_binary(&bin, &config).unwrap();
    assert_eq!((ferry.rw_port, ferry.ro_port), (rw, Some(ro)));
    assert!(ferry.is_running());
    assert!(port_accepts(rw) && port_accepts(ro));
    assert_eq!(fs::read_to_string(&ferry.config_path).unwrap(), config);
    let log = ferry.log();
    assert!(log.contains("fake pgferry starting"), "{log}");
    assert!(
        ferry.rw_conn_str("app", "pw", "app").contains(&format!("port={rw} "))
            && ferry.ro_conn_str("app", "pw", "app").contains(&format!("port={ro} "))
    );

    // A signal reaches the process; wait_exit reaps it.
    ferry.signal(libc::SIGTERM).unwrap();
    let status = ferry.wait_exit(Duration::from_secs(10)).unwrap().expect("exited");
    assert!(!status.success());
    assert!(!ferry.is_running());
    assert!(ferry.signal(libc::SIGTERM).is_err());
    let ferry_dir = ferry.dir.clone();
    drop(ferry);
    assert!(!ferry_dir.exists());

    // Drop kills a running one.
    let ferry = Ferry::start_with_binary(&bin, &config).unwrap();
    let pid = ferry.pid();
    let ferry_dir = ferry.dir.clone();
    drop(ferry);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} still exists");
    assert!(!ferry_dir.exists());
    wait_for("the port to close", Duration::from_secs(5), || !port_accepts(rw));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ferry_start_reports_early_exit_with_the_log_tail() {
    let dir = scratch_dir("early-exit");
    let bin = fake_pgferry(&dir, "echo 'error: boom in config' >&2\nexit 3");
    let config = format!("[listen]\nrw = \"127.0.0.1:{}\"\n", free_port());
    let err = format!("{:#}", Ferry::start_with_binary(&bin, &config).unwrap_err());
    assert!(err.contains("exited during startup"), "{err}");
    assert!(err.contains("exit status: 3"), "{err}");
    assert!(err.contains("error: boom in config"), "{err}");

    let err = format!(
        "{:#}",
        Ferry::start_with_binary(&bin, "[pool]\npool_size = 1\n").unwrap_err()
    );
    assert!(err.contains("[listen] rw"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ferry_start_times_out_when_nothing_listens() {
    let dir = scratch_dir("no-listen");
    let bin = fake_pgferry(&dir, "echo 'still thinking' >&2\nexec sleep 60");
    let config = format!("[listen]\nrw = \"127.0.0.1:{}\"\n", free_port());
    let started = Instant::now();
    let err = format!("{:#}", Ferry::start_with_binary(&bin, &config).unwrap_err());
    assert!(started.elapsed() >= Duration::from_secs(9), "{:?}", started.elapsed());
    assert!(err.contains("did not accept connections"), "{err}");
    assert!(err.contains("still thinking"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

/// Not a test: the body of `watchdog_cleans_up_after_the_test_process_dies`
/// (this test binary re-run with WATCHDOG_CHILD_OUT set). Starts a cluster and
/// a (fake) pgferry, reports them, then SIGKILLs itself.
#[test]
#[ignore = "helper process, run by watchdog_cleans_up_after_the_test_process_dies"]
fn watchdog_child() {
    let Ok(out) = std::env::var("WATCHDOG_CHILD_OUT") else {
        return;
    };
    let out = PathBuf::from(out);
    let c = PgCluster::start(PgOptions { standby: true }).unwrap();
    let rw = free_port();
    let bin = fake_pgferry(
        out.parent().unwrap(),
        &format!(
            "FAKE_PGFERRY_LISTEN=127.0.0.1:{rw} exec {} --exact fake_pgferry_listener --include-ignored --quiet",
            std::env::current_exe().unwrap().display()
        ),
    );
    let ferry = Ferry::start_with_binary(&bin, &format!("[listen]\nrw = \"127.0.0.1:{rw}\"\n")).unwrap();
    fs::write(
        &out,
        format!(
            "{}\n{}\n{} {} {}\n",
            c.dir.display(),
            ferry.dir.display(),
            c.primary_port,
            c.standby_port.unwrap(),
            rw
        ),
    )
    .unwrap();
    let me = std::process::id().to_string();
    let _ = Command::new("kill").args(["-KILL", &me]).status();
    std::process::abort();
}

#[test]
fn watchdog_cleans_up_after_the_test_process_dies() {
    let dir = scratch_dir("watchdog");
    let out_file = dir.join("child.out");
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "watchdog_child", "--include-ignored", "--nocapture"])
        .env("WATCHDOG_CHILD_OUT", &out_file)
        .status()
        .unwrap();
    assert!(!status.success(), "the child should have died: {status}");
    let out = fs::read_to_string(&out_file).expect("the child reported its cluster");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let dirs = [PathBuf::from(lines[0]), PathBuf::from(lines[1])];
    let ports: Vec<u16> = lines[2].split(' ').map(|p| p.parse().unwrap()).collect();
    assert_eq!(ports.len(), 3);
    assert!(
        wait_until(Duration::from_secs(60), Duration::from_millis(100), || Ok(dirs
            .iter()
            .all(|d| !d.exists())
            && ports.iter().all(|p| !port_accepts(*p)))),
        "left behind after the test process died: dirs {dirs:?} (exist: {:?}), ports {ports:?} (listening: {:?})",
        dirs.iter().map(|d| d.exists()).collect::<Vec<_>>(),
        ports.iter().map(|p| port_accepts(*p)).collect::<Vec<_>>(),
    );
    fs::remove_dir_all(&dir).unwrap();
}
