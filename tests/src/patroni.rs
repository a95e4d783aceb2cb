//! A real etcd and a real Patroni cluster (Debian's `etcd-server`,
//! `etcd-client`, `patroni` 3.0.2 and PostgreSQL 15), for the etcd/Patroni
//! topology source.
//!
//! * [`Etcd`]: one etcd 3.4 member on loopback, v3 API only, fresh data dir,
//!   free client and peer ports. [`Etcd::put`] / [`Etcd::get_prefix`] /
//!   [`Etcd::delete`] go through `etcdctl`, so they do not share code with
//!   pgferry's own client.
//! * [`PatroniCluster`]: its own [`Etcd`] plus N Patroni members (default 3),
//!   each with its own data dir, Unix socket dir, PostgreSQL port and REST
//!   port on 127.0.0.1, and a unique `scope`. The first member bootstraps
//!   alone; the others join once the `leader` key exists.
//! * [`write_citus_layout`]: Patroni's Citus key layout written by hand (no
//!   Citus here), as documented in `shared/reference/patroni-etcd.md` §7.
//!
//! Every process runs as the unprivileged [`OsUser`]. Each [`Etcd`] and each
//! [`PatroniCluster`] has a watchdog (see `watchdog.rs`) that kills whatever
//! runs from its directory and removes the directory once the test process is
//! gone, however it ended; `Drop` does the same at once.
//!
//! Settings: `ttl: 10`, `loop_wait: 2`, `retry_timeout: 5` (configurable),
//! `primary_start_timeout: 0` (a killed postmaster means a failover, not a
//! restart in place), `synchronous_mode: false`, `use_pg_rewind`,
//! `use_slots`, `fsync = off`. `pg_hba`: `local all all trust`,
//! scram-sha-256 for everything on 127.0.0.1/32. Superuser `postgres` with
//! password [`PATRONI_SUPERUSER_PASSWORD`].

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::cluster::PG_BIN;
use crate::osuser::{pg_os_user, OsUser};
use crate::ports::free_port;
use crate::util::{log_section, make_temp_dir, send_signal, sh_quote, tail_file};
use crate::watchdog::Watchdog;

/// `/usr/bin/etcd` (Debian's `etcd-server`, 3.4).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// `/usr/bin/etcdctl` (Debian's `etcd-client`).
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";
/// `/usr/bin/patroni` (Debian's `patroni`, 3.0.2). The packaged entry point
/// runs under `/usr/bin/python3` with Debian's psycopg2 etc.
pub const PATRONI_BIN: &str = "/usr/bin/patroni";
/// `/usr/bin/patronictl`.
pub const PATRONICTL_BIN: &str = "/usr/bin/patronictl";

/// Password of the PostgreSQL superuser `postgres` in every Patroni cluster.
pub const PATRONI_SUPERUSER_PASSWORD: &str = "patroni-super-pass";
/// Password of the replication user `replicator`.
pub const PATRONI_REPLICATION_PASSWORD: &str = "patroni-repl-pass";
/// Password of the pg_rewind user `rewinder`.
pub const PATRONI_REWIND_PASSWORD: &str = "patroni-rewind-pass";

/// How long an etcd may take to answer `endpoint health` after starting.
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on each wait of [`PatroniCluster::start`].
const CLUSTER_START_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound on one `psql` run.
const PSQL_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// etcd

/// One etcd 3.4 member on 127.0.0.1 (v3 API only; v2 is off), running as the
/// unprivileged [`OsUser`] from a fresh directory `dir` (`data/`,
/// `etcd.log`).
///
/// Dropping it kills etcd and removes `dir`; a watchdog does the same if the
/// test process dies first.
#[derive(Debug)]
pub struct Etcd {
    pub client_port: u16,
    pub peer_port: u16,
    pub dir: PathBuf,
    /// The etcd member name and `--initial-cluster-token`.
    pub name: String,
    user: &'static OsUser,
    child: Mutex<Option<Child>>,
    watchdog: Option<Watchdog>,
}

impl Etcd {
    /// Starts a single-member etcd on two free ports and waits (up to 30 s)
    /// until `etcdctl endpoint health` succeeds.
    pub fn start() -> Result<Etcd> {
        let user = pg_os_user()?;
        let dir = make_temp_dir("pgferry-etcd")?;
        user.chown(&dir)?;
        let watchdog = Watchdog::spawn(&kill_dir_script(&dir, false), Some(user))?;
        let etcd = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            name: format!("etcd-{}", unique_suffix()),
            dir,
            user,
            child: Mutex::new(None),
            watchdog: Some(watchdog),
        };
        etcd.spawn()?;
        Ok(etcd)
    }

    /// `"127.0.0.1:PORT"`: the client endpoint (what Patroni's `etcd3.hosts`
    /// and pgferry's config name).
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `"http://127.0.0.1:PORT"`.
    pub fn url(&self) -> String {
        format!("http://{}", self.endpoint())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// The last `lines` lines of etcd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log_path(), lines)
    }

    /// True while the etcd process started last has not exited.
    pub fn is_running(&self) -> bool {
        match self.child().as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The pid of the running etcd, if any.
    pub fn pid(&self) -> Option<u32> {
        let mut guard = self.child();
        let c = guard.as_mut()?;
        matches!(c.try_wait(), Ok(None)).then(|| c.id())
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn(&self) -> Result<()> {
        let mut guard = self.child();
        if let Some(c) = guard.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                bail!("etcd on {} is already running", self.endpoint());
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening etcd.log")?;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = self.user.command(ETCD_BIN);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .arg("--initial-cluster")
            .arg(format!("{}={peer}", self.name))
            .args(["--initial-cluster-state", "new", "--initial-cluster-token"])
            .arg(&self.name)
            .args(["--enable-v2=false", "--logger=zap", "--log-outputs=stderr"])
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting etcd")?;
        *guard = Some(child);
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = guard.as_mut().map(Child::try_wait) {
                *guard = None;
                bail!(
                    "etcd on {} exited during startup with {status}\n{}",
                    self.endpoint(),
                    log_section(&self.log_path(), 40)
                );
            }
            if crate::util::port_accepts(self.client_port)
                && self
                    .etcdctl_output(&["--command-timeout=1s", "endpoint", "health"])
                    .is_ok_and(|o| o.status.success())
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd on {} is not healthy after {ETCD_START_TIMEOUT:?}\n{}",
                    self.endpoint(),
                    log_section(&self.log_path(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then waits for etcd to exit (SIGKILL after 10 s). A no-op if
    /// it is not running.
    pub fn stop(&self) {
        let mut guard = self.child();
        if let Some(mut child) = guard.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = send_signal(child.id(), libc::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// SIGKILL, and reaps it. A no-op if it is not running.
    pub fn kill(&self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again with the same data dir, name and ports (stopping it
    /// first with [`Etcd::stop`] if it runs); waits until it is healthy.
    /// Keys and leases survive; etcd extends lease TTLs on restart.
    pub fn restart(&self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// Runs `etcdctl --endpoints=127.0.0.1:PORT ARGS...` (v3 API, 2 s dial
    /// timeout, 5 s command timeout) as the OS user; returns its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let out = self.etcdctl_output(args)?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?} against {} failed ({}): {}",
                self.endpoint(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `args` may start with `--command-timeout=..` (default 5 s).
    fn etcdctl_output(&self, args: &[&str]) -> Result<Output> {
        let (timeout, args) = match args.first() {
            Some(a) if a.starts_with("--command-timeout=") => (*a, &args[1..]),
            _ => ("--command-timeout=5s", args),
        };
        self.user
            .command(ETCDCTL_BIN)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(["--dial-timeout=2s", timeout])
            .args(args)
            .output()
            .context("running etcdctl")
    }

    /// `etcdctl put -- key value`.
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.etcdctl(&["put", "--", key, value])?;
        Ok(())
    }

    /// The value of `key`, `None` if it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let (_, kvs) = parse_etcdctl_json(&self.etcdctl(&["get", "-w", "json", "--", key])?)?;
        Ok(kvs.into_iter().find(|(k, _)| k == key).map(|(_, v)| v))
    }

    /// Every `(key, value)` under `prefix`, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        Ok(self.get_prefix_with_revision(prefix)?.1)
    }

    /// [`Etcd::get_prefix`] plus the store revision it was read at
    /// (`header.revision`).
    pub fn get_prefix_with_revision(&self, prefix: &str) -> Result<(i64, Vec<(String, String)>)> {
        parse_etcdctl_json(&self.etcdctl(&["get", "--prefix", "-w", "json", "--", prefix])?)
    }

    /// The current store revision.
    pub fn revision(&self) -> Result<i64> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        // One entry per endpoint: [{"Endpoint": ..., "Status": {"header": {"revision": N, ...}, ...}}]
        let v: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("etcdctl output {out:?}"))?;
        v[0]["Status"]["header"]["revision"]
            .as_i64()
            .ok_or_else(|| anyhow!("no revision in {out:?}"))
    }

    /// `etcdctl del -- key`; returns how many keys were deleted (0 or 1).
    pub fn delete(&self, key: &str) -> Result<u64> {
        let out = self.etcdctl(&["del", "--", key])?;
        out.trim()
            .parse()
            .with_context(|| format!("etcdctl del printed {out:?}"))
    }

    /// `etcdctl del --prefix -- prefix`; returns how many keys were deleted.
    pub fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let out = self.etcdctl(&["del", "--prefix", "--", prefix])?;
        out.trim()
            .parse()
            .with_context(|| format!("etcdctl del printed {out:?}"))
    }

    /// `etcdctl compaction --physical REV`.
    pub fn compact(&self, revision: i64) -> Result<()> {
        self.etcdctl(&["compaction", "--physical", &revision.to_string()])?;
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", log_section(&self.log_path(), 20));
        }
        self.kill();
        if let Some(w) = self.watchdog.take() {
            w.fire();
        }
    }
}

/// Parses `etcdctl get -w json` output: `(header.revision, [(key, value)])`.
/// Keys and values are base64 there; etcdctl omits `value` when it is empty.
fn parse_etcdctl_json(out: &str) -> Result<(i64, Vec<(String, String)>)> {
    let v: serde_json::Value = serde_json::from_str(out).with_context(|| format!("etcdctl output {out:?}"))?;
    let revision = v["header"]["revision"]
        .as_i64()
        .ok_or_else(|| anyhow!("no revision in etcdctl output {out:?}"))?;
    let mut kvs = Vec::new();
    for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let key = kv["key"].as_str().ok_or_else(|| anyhow!("no key in {kv}"))?;
        let value = kv["value"].as_str().unwrap_or_default();
        kvs.push((base64_text(key)?, base64_text(value)?));
    }
    kvs.sort();
    Ok((revision, kvs))
}

fn base64_text(s: &str) -> Result<String> {
    let bytes = BASE64.decode(s).map_err(|e| anyhow!("bad base64 {s:?}: {e}"))?;
    String::from_utf8(bytes).map_err(|e| anyhow!("etcd value is not UTF-8: {e}"))
}

pub(crate) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{:x}", std::process::id(), nanos)
}

/// A watchdog / cleanup script: with `postgres`, first SIGKILLs the Patroni
/// processes of `dir` and asks its postmasters for an immediate shutdown
/// (SIGQUIT); then SIGKILLs every process whose command line names a path
/// under `dir/`, and removes `dir`.
///
/// The pattern is `dir` followed by `/`, which the script's own text (and so
/// the watchdog's command line) never contains.
fn kill_dir_script(dir: &Path, postgres: bool) -> String {
    let d = sh_quote(&dir.to_string_lossy());
    let mut s = format!(
        "exec </dev/null >/dev/null 2>&1\n\
         d={d}\n\
         kill_matching() {{\n\
         \x20 for p in /proc/[0-9]*; do\n\
         \x20   pid=${{p#/proc/}}\n\
         \x20   [ \"$pid\" = \"$$\" ] && continue\n\
         \x20   case \"$(tr '\\0' ' ' < \"$p/cmdline\" 2>/dev/null)\" in\n\
         \x20     *\"$d/\"*$2*) kill -$1 \"$pid\" ;;\n\
         \x20   esac\n\
         \x20 done\n\
         }}\n"
    );
    if postgres {
        s.push_str(
            "kill_matching KILL patroni.yml\n\
             pids=\n\
             for pf in \"$d\"/*/data/postmaster.pid; do\n\
             \x20 [ -f \"$pf\" ] || continue\n\
             \x20 pid=$(head -n 1 \"$pf\")\n\
             \x20 case \"$(tr '\\0' ' ' < \"/proc/$pid/cmdline\" 2>/dev/null)\" in\n\
             \x20   *\"$d/\"*) kill -QUIT \"$pid\"; pids=\"$pids $pid\" ;;\n\
             \x20 esac\n\
             done\n\
             for _i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do\n\
             \x20 alive=\n\
             \x20 for pid in $pids; do [ -d \"/proc/$pid\" ] && alive=1; done\n\
             \x20 [ -z \"$alive\" ] && break\n\
             \x20 sleep 0.25\n\
             done\n",
        );
    }
    s.push_str(
        "kill_matching KILL\n\
         sleep 0.1\n\
         rm -rf \"$d\"\n",
    );
    s
}

// ---------------------------------------------------------------------------
// Patroni

/// Options for [`PatroniCluster::start`].
#[derive(Debug, Clone)]
pub struct PatroniOptions {
    /// Number of members (default 3).
    pub members: usize,
    /// Patroni `ttl` in seconds (default 10).
    pub ttl: u32,
    /// Patroni `loop_wait` in seconds (default 2).
    pub loop_wait: u32,
    /// Patroni `retry_timeout` in seconds (default 5).
    pub retry_timeout: u32,
    /// `citus: {group: N, database: citus}`: keys move to
    /// `/service/<scope>/<N>/`. Needs the citus extension, which Debian does
    /// not package: PostgreSQL will not start without it (Patroni puts
    /// `citus` in `shared_preload_libraries`). Default `None`.
    pub citus_group: Option<u32>,
    /// Extra PostgreSQL parameters for every member, written to
    /// `bootstrap.dcs.postgresql.parameters` (e.g.
    /// `("shared_preload_libraries", "pg_stat_statements")`,
    /// `("log_statement", "all")`). Values are YAML single-quoted.
    pub parameters: Vec<(String, String)>,
    /// Member names are `<member_prefix>1`, `<member_prefix>2`, ... (default
    /// `"pg"`).
    pub member_prefix: String,
    /// Extra environment for every Patroni process (PostgreSQL, which
    /// Patroni starts, inherits it), e.g. `PGPASSFILE`. Default empty.
    pub env: Vec<(String, String)>,
}

impl Default for PatroniOptions {
    fn default() -> Self {
        PatroniOptions {
            members: 3,
            ttl: 10,
            loop_wait: 2,
            retry_timeout: 5,
            citus_group: None,
            parameters: Vec::new(),
            member_prefix: "pg".into(),
            env: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Member {
    name: String,
    pg_port: u16,
    rest_port: u16,
    dir: PathBuf,
    patroni: Mutex<Option<Child>>,
}

/// A Patroni cluster on its own etcd.
///
/// Layout of `dir`: `ctl.yml` (for `patronictl`) and one directory per member
/// (`pg1`, `pg2`, ...) with `patroni.yml`, `patroni.log` (Patroni's output),
/// `data/` (PostgreSQL data dir), `sock/` (Unix socket dir), `pglog/postgresql.log`
/// (the server log, through the logging collector) and `pgpass`.
///
/// Dropping it kills every Patroni, shuts its PostgreSQL servers down
/// (immediate), removes `dir`, then stops etcd; a watchdog does the same if
/// the test process dies first. When dropped during a panic it prints the
/// log tails of every member first.
#[derive(Debug)]
pub struct PatroniCluster {
    /// Shared with other clusters started by [`PatroniCluster::start_in`].
    pub etcd: Arc<Etcd>,
    pub scope: String,
    /// `"/service/"`.
    pub namespace: String,
    pub citus_group: Option<u32>,
    pub dir: PathBuf,
    pub opts: PatroniOptions,
    members: Vec<Member>,
    user: &'static OsUser,
    watchdog: Option<Watchdog>,
}

impl PatroniCluster {
    /// Starts etcd, then the first member alone until the `leader` key
    /// exists, then the others; returns once the leader key is set and every
    /// other member streams from the leader (`pg_stat_replication`). Each wait
    /// is bounded (90 s); errors carry the log tails.
    pub fn start(opts: PatroniOptions) -> Result<PatroniCluster> {
        if opts.members == 0 {
            bail!("a Patroni cluster needs at least one member");
        }
        let etcd = Arc::new(Etcd::start()?);
        PatroniCluster::start_in(etcd, &format!("ferry-{}", unique_suffix()), opts)
    }

    /// [`PatroniCluster::start`] on an existing etcd (shared, e.g. by the
    /// groups of a Patroni Citus formation, which all use one `scope`) with
    /// the given `scope`.
    pub fn start_in(etcd: Arc<Etcd>, scope: &str, opts: PatroniOptions) -> Result<PatroniCluster> {
        if opts.members == 0 {
            bail!("a Patroni cluster needs at least one member");
        }
        let user = pg_os_user()?;
        let dir = make_temp_dir("pgferry-patroni")?;
        user.chown(&dir)?;
        let watchdog = Watchdog::spawn(&kill_dir_script(&dir, true), Some(user))?;
        let scope = scope.to_string();
        let members = (1..=opts.members)
            .map(|i| {
                let name = format!("{}{i}", opts.member_prefix);
                Member {
                    dir: dir.join(&name),
                    name,
                    pg_port: free_port(),
                    rest_port: free_port(),
                    patroni: Mutex::new(None),
                }
            })
            .collect();
        // From here on, dropping `cluster` (also on error) cleans up.
        let cluster = PatroniCluster {
            etcd,
            scope,
            namespace: "/service/".into(),
            citus_group: opts.citus_group,
            dir,
            opts,
            members,
            user,
            watchdog: Some(watchdog),
        };
        cluster.write_configs()?;
        let first = cluster.members[0].name.clone();
        cluster.start_member(&first)?;
        let deadline = Instant::now() + CLUSTER_START_TIMEOUT;
        loop {
            if cluster.leader()?.as_deref() == Some(first.as_str()) {
                break;
            }
            cluster.check_alive(&first)?;
            if Instant::now() >= deadline {
                bail!(
                    "the first member {first} did not take the leader key {} within {CLUSTER_START_TIMEOUT:?}\n{}",
                    cluster.leader_key(),
                    cluster.all_logs(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for m in &cluster.members[1..] {
            cluster.start_member(&m.name)?;
        }
        let others: Vec<String> = cluster.members[1..].iter().map(|m| m.name.clone()).collect();
        let deadline = Instant::now() + CLUSTER_START_TIMEOUT;
        loop {
            let streaming = cluster.streaming_replicas(&first).unwrap_or_default();
            if others.iter().all(|o| streaming.contains(o)) {
                break;
            }
            for o in &others {
                cluster.check_alive(o)?;
            }
            if Instant::now() >= deadline {
                bail!(
                    "replicas {others:?} are not all streaming from {first} within {CLUSTER_START_TIMEOUT:?} \
                     (streaming: {streaming:?})\n{}",
                    cluster.all_logs(40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(cluster)
    }

    fn member(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no Patroni member {name:?} (members: {:?})", self.member_names()))
    }

    /// `pg1`, `pg2`, ... in order.
    pub fn member_names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    /// The member's PostgreSQL port on 127.0.0.1. Panics on an unknown name.
    pub fn pg_port(&self, name: &str) -> u16 {
        self.member(name).pg_port
    }

    /// The member's Patroni REST port on 127.0.0.1. Panics on an unknown name.
    pub fn rest_port(&self, name: &str) -> u16 {
        self.member(name).rest_port
    }

    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.member(name).dir.join("data")
    }

    pub fn socket_dir(&self, name: &str) -> PathBuf {
        self.member(name).dir.join("sock")
    }

    /// Patroni's own output (stdout and stderr).
    pub fn patroni_log_path(&self, name: &str) -> PathBuf {
        self.member(name).dir.join("patroni.log")
    }

    /// The PostgreSQL server log (logging collector).
    pub fn pg_log_path(&self, name: &str) -> PathBuf {
        self.member(name).dir.join("pglog").join("postgresql.log")
    }

    /// The OS user everything runs as.
    pub fn os_user(&self) -> &'static OsUser {
        self.user
    }

    /// `/service/<scope>/`, or `/service/<scope>/<group>/` with a Citus group.
    pub fn key_prefix(&self) -> String {
        match self.citus_group {
            Some(g) => format!("{}{}/{g}/", self.namespace, self.scope),
            None => format!("{}{}/", self.namespace, self.scope),
        }
    }

    /// The `leader` key.
    pub fn leader_key(&self) -> String {
        format!("{}leader", self.key_prefix())
    }

    /// The `members/<name>` key.
    pub fn member_key(&self, name: &str) -> String {
        format!("{}members/{name}", self.key_prefix())
    }

    /// The member named by the `leader` key in etcd, if any.
    pub fn leader(&self) -> Result<Option<String>> {
        self.etcd.get(&self.leader_key())
    }

    /// The member's `members/<name>` value (JSON), if present.
    pub fn member_value(&self, name: &str) -> Result<Option<String>> {
        self.etcd.get(&self.member_key(name))
    }

    fn write_configs(&self) -> Result<()> {
        for m in &self.members {
            for sub in ["", "sock", "pglog"] {
                let d = if sub.is_empty() { m.dir.clone() } else { m.dir.join(sub) };
                fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                self.user.chown(&d)?;
            }
            let path = m.dir.join("patroni.yml");
            fs::write(&path, self.member_yaml(m)).with_context(|| format!("writing {}", path.display()))?;
            self.user.chown(&path)?;
        }
        let ctl = format!(
            "scope: {}\nnamespace: {}\netcd3:\n  hosts: {}\n{}",
            self.scope,
            self.namespace,
            self.etcd.endpoint(),
            self.citus_yaml()
        );
        fs::write(self.dir.join("ctl.yml"), ctl).context("writing ctl.yml")?;
        Ok(())
    }

    fn citus_yaml(&self) -> String {
        match self.citus_group {
            Some(g) => format!("citus:\n  group: {g}\n  database: citus\n"),
            None => String::new(),
        }
    }

    fn member_yaml(&self, m: &Member) -> String {
        let q = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let path = |p: PathBuf| q(&p.to_string_lossy());
        let o = &self.opts;
        let mut extra = String::new();
        for (k, v) in &o.parameters {
            extra.push_str(&format!("        {k}: {}\n", q(v)));
        }
        format!(
            "scope: {scope}\n\
             namespace: {namespace}\n\
             name: {name}\n\
             restapi:\n\
             \x20 listen: 127.0.0.1:{rest}\n\
             \x20 connect_address: 127.0.0.1:{rest}\n\
             etcd3:\n\
             \x20 hosts: {etcd}\n\
             {citus}\
             bootstrap:\n\
             \x20 dcs:\n\
             \x20   ttl: {ttl}\n\
             \x20   loop_wait: {loop_wait}\n\
             \x20   retry_timeout: {retry_timeout}\n\
             \x20   maximum_lag_on_failover: 1048576\n\
             \x20   primary_start_timeout: 0\n\
             \x20   synchronous_mode: false\n\
             \x20   postgresql:\n\
             \x20     use_pg_rewind: true\n\
             \x20     use_slots: true\n\
             \x20     parameters:\n\
             \x20       wal_level: replica\n\
             \x20       hot_standby: 'on'\n\
             \x20       wal_log_hints: 'on'\n\
             \x20       max_connections: 200\n\
             \x20       max_wal_senders: 10\n\
             \x20       max_replication_slots: 10\n\
             \x20       wal_keep_size: 128MB\n\
             \x20       password_encryption: scram-sha-256\n\
             {extra}\
             \x20 initdb:\n\
             \x20 - encoding: UTF8\n\
             \x20 - locale: C\n\
             \x20 - data-checksums\n\
             \x20 - no-sync\n\
             postgresql:\n\
             \x20 listen: 127.0.0.1:{pg}\n\
             \x20 connect_address: 127.0.0.1:{pg}\n\
             \x20 data_dir: {data}\n\
             \x20 bin_dir: {bin}\n\
             \x20 pgpass: {pgpass}\n\
             \x20 use_unix_socket: true\n\
             {basebackup}\
             \x20 authentication:\n\
             \x20   superuser: {{username: postgres, password: {su}}}\n\
             \x20   replication: {{username: replicator, password: {repl}}}\n\
             \x20   rewind: {{username: rewinder, password: {rewind}}}\n\
             \x20 pg_hba:\n\
             \x20 - local all all trust\n\
             \x20 - host replication replicator 127.0.0.1/32 scram-sha-256\n\
             \x20 - host all all 127.0.0.1/32 scram-sha-256\n\
             \x20 parameters:\n\
             \x20   unix_socket_directories: {sock}\n\
             \x20   shared_buffers: 32MB\n\
             \x20   fsync: 'off'\n\
             \x20   full_page_writes: 'on'\n\
             \x20   logging_collector: 'on'\n\
             \x20   log_directory: {pglog}\n\
             \x20   log_filename: postgresql.log\n\
             \x20   log_line_prefix: '%m [%p] %q%u@%d '\n",
            scope = q(&self.scope),
            namespace = q(&self.namespace),
            name = q(&m.name),
            rest = m.rest_port,
            etcd = self.etcd.endpoint(),
            citus = self.citus_yaml(),
            // In Citus mode the bootstrap leaves enough dirty buffers that
            // pg_basebackup's default spread checkpoint takes minutes.
            basebackup = if self.citus_group.is_some() {
                "  basebackup:\n  - checkpoint: fast\n"
            } else {
                ""
            },
            ttl = o.ttl,
            loop_wait = o.loop_wait,
            retry_timeout = o.retry_timeout,
            pg = m.pg_port,
            data = path(m.dir.join("data")),
            bin = q(PG_BIN),
            pgpass = path(m.dir.join("pgpass")),
            su = q(PATRONI_SUPERUSER_PASSWORD),
            repl = q(PATRONI_REPLICATION_PASSWORD),
            rewind = q(PATRONI_REWIND_PASSWORD),
            sock = path(m.dir.join("sock")),
            pglog = path(m.dir.join("pglog")),
        )
    }

    /// Fails with the member's logs if its Patroni process has exited.
    fn check_alive(&self, name: &str) -> Result<()> {
        let m = self.member(name);
        let mut guard = m.patroni.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = guard.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                *guard = None;
                drop(guard);
                bail!("Patroni of {name} exited with {status}\n{}", self.log_tail(name, 40));
            }
        }
        Ok(())
    }

    /// True while the member's Patroni process (started by this harness)
    /// runs.
    pub fn patroni_running(&self, name: &str) -> bool {
        let m = self.member(name);
        let mut guard = m.patroni.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The pid of the member's Patroni process, if it runs.
    pub fn patroni_pid(&self, name: &str) -> Option<u32> {
        let m = self.member(name);
        let mut guard = m.patroni.lock().unwrap_or_else(|e| e.into_inner());
        let c = guard.as_mut()?;
        matches!(c.try_wait(), Ok(None)).then(|| c.id())
    }

    /// The pid of the member's running postmaster (first line of
    /// `postmaster.pid`, checked against `/proc/PID/cmdline`), if any.
    pub fn postmaster_pid(&self, name: &str) -> Option<u32> {
        let data = self.data_dir(name);
        let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        cmdline.contains(&*data.to_string_lossy()).then_some(pid)
    }

    /// Starts the member's Patroni (again) with its config; returns at once.
    /// PostgreSQL comes back as a replica (with pg_rewind if needed) after a
    /// few seconds: see [`PatroniCluster::wait_streaming`]. If the member's
    /// postmaster still runs (after [`PatroniCluster::kill_patroni`]), Patroni
    /// adopts it.
    pub fn start_member(&self, name: &str) -> Result<()> {
        let m = self.member(name);
        let mut guard = m.patroni.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = guard.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                bail!("Patroni of {name} is already running (pid {})", c.id());
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.dir.join("patroni.log"))
            .context("opening patroni.log")?;
        let child = self
            .user
            .command(PATRONI_BIN)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .arg(m.dir.join("patroni.yml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {PATRONI_BIN} for {name}"))?;
        *guard = Some(child);
        Ok(())
    }

    /// Stops the member's Patroni with SIGTERM (it shuts PostgreSQL down and,
    /// on the leader, releases the leader key) and waits for it to exit
    /// (SIGKILL after 30 s). A no-op if it is not running.
    pub fn stop_member(&self, name: &str) -> Result<()> {
        let m = self.member(name);
        let mut guard = m.patroni.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut child) = guard.take() else {
            return Ok(());
        };
        if matches!(child.try_wait(), Ok(None)) {
            send_signal(child.id(), libc::SIGTERM).with_context(|| format!("SIGTERM to Patroni of {name}"))?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) {
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("Patroni of {name} did not exit within 30 s of SIGTERM (killed)");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.wait();
        Ok(())
    }

    /// SIGKILLs only the member's Patroni process (its PostgreSQL keeps
    /// running) and reaps it. Errors if it does not run.
    pub fn kill_patroni(&self, name: &str) -> Result<()> {
        let m = self.member(name);
        let mut guard = m.patroni.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut child) = guard.take() else {
            bail!("Patroni of {name} is not running");
        };
        if !matches!(child.try_wait(), Ok(None)) {
            bail!("Patroni of {name} had already exited");
        }
        child.kill().with_context(|| format!("SIGKILL to Patroni of {name}"))?;
        let _ = child.wait();
        Ok(())
    }

    /// SIGKILLs the member's postmaster (pid from `postmaster.pid`). Errors
    /// if it does not run.
    pub fn kill_postmaster(&self, name: &str) -> Result<()> {
        let pid = self
            .postmaster_pid(name)
            .ok_or_else(|| anyhow!("the postmaster of {name} is not running"))?;
        send_signal(pid, libc::SIGKILL).with_context(|| format!("SIGKILL to the postmaster of {name} ({pid})"))
    }

    /// A node crash: SIGKILLs the member's Patroni, then its postmaster.
    pub fn kill_member(&self, name: &str) -> Result<()> {
        let patroni = self.kill_patroni(name);
        let postmaster = self.kill_postmaster(name);
        patroni.and(postmaster)
    }

    /// Waits until the `leader` key names a member other than `not` (any
    /// member if `None`); returns its name.
    pub fn wait_for_leader(&self, not: Option<&str>, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.leader() {
                Ok(Some(l)) if Some(l.as_str()) != not => return Ok(l),
                other => other,
            };
            if Instant::now() >= deadline {
                bail!(
                    "no leader other than {not:?} within {timeout:?} (last read: {last:?})\n{}",
                    self.all_logs(20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the member's PostgreSQL answers `pg_is_in_recovery()`
    /// with false.
    pub fn wait_writable(&self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let res = self.psql_timeout(name, "postgres", "SELECT pg_is_in_recovery()", Duration::from_secs(5));
            if matches!(res.as_deref(), Ok("f")) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} is not writable within {timeout:?} (last: {res:?})\n{}",
                    self.log_tail(name, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `application_name`s streaming from `leader` (`pg_stat_replication`,
    /// `state = 'streaming'`), sorted.
    pub fn streaming_replicas(&self, leader: &str) -> Result<Vec<String>> {
        let out = self.psql(
            leader,
            "postgres",
            "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming' ORDER BY 1",
        )?;
        Ok(out.lines().map(str::to_string).filter(|s| !s.is_empty()).collect())
    }

    /// Waits until `name` streams from the current leader.
    pub fn wait_streaming(&self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let leader = self.leader().ok().flatten();
            if let Some(l) = &leader {
                if l != name && self.streaming_replicas(l).unwrap_or_default().iter().any(|r| r == name) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} does not stream from the leader ({leader:?}) within {timeout:?}\n{}",
                    self.log_tail(name, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until there is a leader and every other member streams from it;
    /// returns the leader.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(l)) = self.leader() {
                let streaming = self.streaming_replicas(&l).unwrap_or_default();
                if self.members.iter().all(|m| m.name == l || streaming.contains(&m.name)) {
                    return Ok(l);
                }
            }
            if Instant::now() >= deadline {
                bail!("the cluster is not healthy within {timeout:?}\n{}", self.all_logs(30));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `sql` with `psql -X -A -t -q -v ON_ERROR_STOP=1` as superuser
    /// `postgres` through the member's Unix socket (trust), database `db`;
    /// returns the trimmed output (rows one per line, columns separated by
    /// `|`). Bounded by 30 s.
    pub fn psql(&self, name: &str, db: &str, sql: &str) -> Result<String> {
        self.psql_timeout(name, db, sql, PSQL_TIMEOUT)
    }

    /// [`PatroniCluster::psql`] with an explicit bound (psql is killed after
    /// `timeout`).
    pub fn psql_timeout(&self, name: &str, db: &str, sql: &str, timeout: Duration) -> Result<String> {
        let m = self.member(name);
        let mut cmd = self.user.command(Path::new(PG_BIN).join("psql"));
        cmd.env("PGCONNECT_TIMEOUT", "3")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(m.dir.join("sock"))
            .args(["-p", &m.pg_port.to_string(), "-U", "postgres", "-d", db, "-f", "-"]);
        let out = output_with_timeout(cmd, sql.as_bytes(), timeout).with_context(|| format!("psql on {name}"))?;
        if !out.status.success() {
            bail!(
                "psql on {name} (port {}), database {db:?} failed ({}):\n{}\nSQL: {sql}",
                m.pg_port,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// [`PatroniCluster::psql`] on the member the leader key names.
    pub fn psql_leader(&self, db: &str, sql: &str) -> Result<String> {
        let leader = self.leader()?.ok_or_else(|| anyhow!("no leader key"))?;
        self.psql(&leader, db, sql)
    }

    /// `CREATE ROLE name LOGIN PASSWORD password` (SCRAM-SHA-256) on the
    /// leader.
    pub fn create_user(&self, name: &str, password: &str) -> Result<()> {
        self.psql_leader("postgres", &crate::util::create_role_sql(name, password))?;
        Ok(())
    }

    /// `CREATE DATABASE name OWNER owner` on the leader.
    pub fn create_database(&self, name: &str, owner: &str) -> Result<()> {
        self.psql_leader("postgres", &crate::util::create_database_sql(name, owner))?;
        Ok(())
    }

    /// Role `app` ([`crate::APP_PASS`]) owning database `app` with the
    /// table the failover tests write to: `probe (id, port, at)`.
    pub fn create_app_and_probe(&self) -> Result<()> {
        self.create_user("app", crate::APP_PASS)?;
        self.create_database("app", "app")?;
        self.psql_leader(
            "app",
            "CREATE TABLE probe (id bigserial PRIMARY KEY, port int, at timestamptz DEFAULT clock_timestamp());
             ALTER TABLE probe OWNER TO app;",
        )?;
        Ok(())
    }

    /// A pgferry config following this cluster through etcd, on fresh
    /// ports, with `pool_size` and `app` logging in with its real SCRAM
    /// secret (a users file in the cluster's directory). `extra_topology`
    /// goes into `[topology]`.
    pub fn ferry_config(&self, pool_size: usize, extra_topology: &str) -> Result<String> {
        let secret = self.psql_leader("postgres", "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")?;
        let users = self.dir.join("userlist.txt");
        fs::write(&users, format!("\"app\" \"{secret}\"\n")).context("writing userlist.txt")?;
        Ok(format!(
            "[listen]\nrw = \"127.0.0.1:{rw}\"\nro = \"127.0.0.1:{ro}\"\n\
             [auth]\nusers_file = {users:?}\n\
             [pool]\npool_size = {pool_size}\n\
             [topology]\nsource = \"etcd\"\nendpoints = [\"{etcd}\"]\nscope = \"{scope}\"\n\
             check_user = \"postgres\"\ncheck_password = \"{su}\"\n{extra_topology}\n",
            rw = free_port(),
            ro = free_port(),
            etcd = self.etcd.endpoint(),
            scope = self.scope,
            su = PATRONI_SUPERUSER_PASSWORD,
        ))
    }

    /// An HTTP request to the member's REST API (`body` is sent as JSON);
    /// returns `(status, body)`. Bounded by `timeout`.
    pub fn rest(
        &self,
        name: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<(u16, String)> {
        http_request(self.rest_port(name), method, path, body, timeout)
    }

    /// A planned switchover through REST `POST /switchover
    /// {"leader":..,"candidate":..}` on the leader; Patroni answers once it
    /// is done. Then waits until the leader key names `candidate`.
    pub fn switchover(&self, leader: &str, candidate: &str) -> Result<()> {
        let body = serde_json::json!({ "leader": leader, "candidate": candidate }).to_string();
        let (status, text) = self
            .rest(leader, "POST", "/switchover", Some(&body), Duration::from_secs(60))
            .with_context(|| format!("POST /switchover to {leader}"))?;
        if status != 200 {
            bail!("POST /switchover {body} answered {status}: {text}");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.leader()?.as_deref() == Some(candidate) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "after the switchover ({status} {text}) the leader key does not name {candidate}: {:?}",
                    self.leader()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `patronictl -c DIR/ctl.yml ARGS...`; returns its stdout.
    /// E.g. `["switchover", "--leader", a, "--candidate", b, "--force"]` (the
    /// scope is appended by the caller if needed: [`PatroniCluster::scope`]).
    pub fn patronictl(&self, args: &[&str]) -> Result<String> {
        let out = self
            .user
            .command(PATRONICTL_BIN)
            .arg("-c")
            .arg(self.dir.join("ctl.yml"))
            .args(args)
            .output()
            .context("running patronictl")?;
        if !out.status.success() {
            bail!(
                "patronictl {args:?} failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end(),
                String::from_utf8_lossy(&out.stdout).trim_end()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The last `lines` lines of the member's Patroni log and of its
    /// PostgreSQL log.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        format!(
            "{}\n{}",
            log_section(&self.patroni_log_path(name), lines),
            log_section(&self.pg_log_path(name), lines)
        )
    }

    /// The log tails of every member and of etcd.
    pub fn all_logs(&self, lines: usize) -> String {
        let mut s = String::new();
        for m in &self.members {
            s.push_str(&self.log_tail(&m.name, lines));
            s.push('\n');
        }
        s.push_str(&log_section(&self.etcd.log_path(), lines / 2));
        s
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.all_logs(30));
        }
        if let Some(w) = self.watchdog.take() {
            w.fire();
        }
        for m in &self.members {
            let mut guard = m.patroni.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mut c) = guard.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // `etcd` is dropped after this, so Patroni never sees it vanish first.
    }
}

/// Runs `cmd` with `input` on stdin; kills it after `timeout`.
fn output_with_timeout(mut cmd: Command, input: &[u8], timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let res = match rx.recv_timeout(timeout) {
        Ok(out) => out.context("waiting for the child"),
        Err(_) => {
            // Not reaped yet (the thread still waits on it): the pid is ours.
            let _ = send_signal(pid, libc::SIGKILL);
            let _ = rx.recv();
            Err(anyhow!(
                "{:?} did not finish within {timeout:?} (killed)",
                cmd.get_program()
            ))
        }
    };
    let _ = writer.join();
    res
}

/// A minimal HTTP/1.1 client for 127.0.0.1 (`Connection: close`).
fn http_request(port: u16, method: &str, path: &str, body: Option<&str>, timeout: Duration) -> Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .with_context(|| format!("reading the answer to {method} {path} from {addr}"))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP answer from {addr}: {head:?}"))?;
    Ok((status, body.to_string()))
}

// ---------------------------------------------------------------------------
// Citus layout

/// The WAL position written as `xlog_location` / `optime` by
/// [`write_citus_layout`].
pub const CITUS_LAYOUT_XLOG: u64 = 50_355_856;

/// A member value as Patroni 3.0.2 writes it: `conn_url` =
/// `postgres://127.0.0.1:PORT/postgres`, `api_url` on 127.0.0.1:8008 (never
/// dialed by the tests), `state`, `role`, `version` 3.0.2, `xlog_location`,
/// `timeline` 1.
pub fn patroni_member_json(role: &str, state: &str, pg_port: u16, xlog_location: u64) -> String {
    // Patroni's key order, which tests compare as text (serde_json's
    // objects sort their keys): a format with JSON-quoted values.
    use serde_json::Value;
    format!(
        "{{\"conn_url\":{},\"api_url\":\"http://127.0.0.1:8008/patroni\",\"state\":{},\"role\":{},\
         \"version\":\"3.0.2\",\"xlog_location\":{xlog_location},\"timeline\":1}}",
        Value::from(format!("postgres://127.0.0.1:{pg_port}/postgres")),
        Value::from(state),
        Value::from(role),
    )
}

/// One Patroni Citus group for [`write_citus_layout`]: `(group, [(member,
/// role, pg_port)], leader)`.
pub type CitusGroup<'a> = (u32, &'a [(&'a str, &'a str, u16)], &'a str);

/// Writes Patroni's Citus layout (reference §7) for `scope` into `etcd`,
/// one `etcdctl put` per key, no leases. For each
/// `(group, members, leader)`, under `/service/<scope>/<group>/`:
///
/// * `config`: `{"ttl":10,"loop_wait":2,"retry_timeout":5,...}`
/// * `initialize`: a system identifier (`7710841025460503863 + group`)
/// * `leader`: `leader` (a bare name; skipped if empty)
/// * `members/<name>`: [`patroni_member_json`] with the given role
///   (`master` / `primary` / `replica` ...), `state` `running`, the port,
///   `xlog_location` [`CITUS_LAYOUT_XLOG`]
/// * `status`: `{"optime":CITUS_LAYOUT_XLOG}`
/// * `sync`: `{"leader":<leader>,"sync_standby":null}`
///
/// Group 0 is the coordinator; workers are 1, 2, ...
pub fn write_citus_layout(etcd: &Etcd, scope: &str, groups: &[CitusGroup<'_>]) -> Result<()> {
    for (group, members, leader) in groups {
        let prefix = format!("/service/{scope}/{group}/");
        etcd.put(
            &format!("{prefix}config"),
            "{\"ttl\":10,\"loop_wait\":2,\"retry_timeout\":5,\"maximum_lag_on_failover\":1048576,\
             \"primary_start_timeout\":0,\"synchronous_mode\":false,\
             \"postgresql\":{\"use_pg_rewind\":true,\"use_slots\":true,\
             \"parameters\":{\"wal_level\":\"logical\",\"hot_standby\":\"on\",\"wal_log_hints\":\"on\"}}}",
        )?;
        etcd.put(
            &format!("{prefix}initialize"),
            &(7_710_841_025_460_503_863u64 + u64::from(*group)).to_string(),
        )?;
        for (name, role, port) in members.iter() {
            etcd.put(
                &format!("{prefix}members/{name}"),
                &patroni_member_json(role, "running", *port, CITUS_LAYOUT_XLOG),
            )?;
        }
        etcd.put(
            &format!("{prefix}status"),
            &format!("{{\"optime\":{CITUS_LAYOUT_XLOG}}}"),
        )?;
        if !leader.is_empty() {
            etcd.put(
                &format!("{prefix}sync"),
                &serde_json::json!({ "leader": leader, "sync_standby": null }).to_string(),
            )?;
            etcd.put(&format!("{prefix}leader"), leader)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcdctl_json() {
        let out = r#"{"header":{"cluster_id":1,"member_id":2,"revision":3,"raft_term":2},"kvs":[{"key":"L2EvYw==","create_revision":3,"mod_revision":3,"version":1},{"key":"L2EvYg==","create_revision":2,"mod_revision":2,"version":1,"value":"LXggeyJxIjoxfQ=="}],"count":2}"#;
        let (rev, kvs) = parse_etcdctl_json(out).unwrap();
        assert_eq!(rev, 3);
        assert_eq!(
            kvs,
            vec![("/a/b".into(), r#"-x {"q":1}"#.into()), ("/a/c".into(), String::new())]
        );
        let (rev, kvs) = parse_etcdctl_json(r#"{"header":{"cluster_id":1,"revision":17,"raft_term":2}}"#).unwrap();
        assert_eq!((rev, kvs.len()), (17, 0));
    }

    #[test]
    fn member_json_shape() {
        assert_eq!(
            patroni_member_json("master", "running", 5432, 7),
            r#"{"conn_url":"postgres://127.0.0.1:5432/postgres","api_url":"http://127.0.0.1:8008/patroni","state":"running","role":"master","version":"3.0.2","xlog_location":7,"timeline":1}"#
        );
    }
}
