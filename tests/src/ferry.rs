//! The `pgferry` binary under test.

use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use toml::{Table, Value};

use crate::cluster::PgCluster;
use crate::ports::free_port;
use crate::util::{addr_accepts, log_section, make_temp_dir, send_signal, sh_quote};
use crate::watchdog::Watchdog;

/// How long pgferry may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The workspace root (the directory with the workspace `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let is_workspace = |dir: &Path| fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| t.contains("[workspace]"));
    if let Some(root) = manifest.parent().filter(|r| is_workspace(r)) {
        return root.to_path_buf();
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(root) = exe.ancestors().find(|a| is_workspace(a)) {
            return root.to_path_buf();
        }
    }
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The pgferry binary to test: `$PGFERRY_BIN` if set (relative to the
/// workspace root), else the most recently built of `release/pgferry` and
/// `debug/pgferry` in `$CARGO_TARGET_DIR`, in the target directory this test
/// binary was built into, and in `<workspace>/target`.
pub fn pgferry_bin() -> Result<PathBuf> {
    let root = workspace_root();
    if let Some(p) = std::env::var_os("PGFERRY_BIN") {
        let p = root.join(p);
        if !p.is_file() {
            bail!("PGFERRY_BIN={} does not exist", p.display());
        }
        return Ok(p);
    }
    let mut target_dirs: Vec<PathBuf> = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        target_dirs.push(root.join(t));
    }
    if let Ok(exe) = std::env::current_exe() {
        // <target>/<profile>/deps/<test binary>
        let deps = exe.parent();
        if deps.and_then(Path::file_name).is_some_and(|n| n == "deps") {
            if let Some(t) = deps.and_then(Path::parent).and_then(Path::parent) {
                target_dirs.push(t.to_path_buf());
            }
        }
    }
    target_dirs.push(root.join("target"));
    let mut looked = Vec::new();
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for t in &target_dirs {
        for profile in ["release", "debug"] {
            let p = t.join(profile).join("pgferry");
            looked.push(p.display().to_string());
            if let Ok(mtime) = fs::metadata(&p).and_then(|m| m.modified()) {
                if best.as_ref().is_none_or(|(b, _)| mtime > *b) {
                    best = Some((mtime, p));
                }
            }
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        anyhow!(
            "no pgferry binary found (looked at {}); build it with `cargo build --bins` \
             or set PGFERRY_BIN",
            looked.join(", ")
        )
    })
}

/// Deep-merges the TOML document `extra` into `base`: tables merge key by
/// key, arrays of tables (`[[user]]`, `[[database]]`) merge entries with the
/// same `name` and append the others, anything else in `extra` replaces the
/// value in `base`.
pub fn merge_toml(base: &str, extra: &str) -> Result<String> {
    let mut b: Table = base.parse().context("parsing the base TOML")?;
    let e: Table = extra.parse().context("parsing the extra TOML")?;
    merge_tables(&mut b, e);
    toml::to_string(&b).context("serializing merged TOML")
}

fn merge_tables(base: &mut Table, extra: Table) {
    fn is_table_array(v: &Value) -> bool {
        matches!(v, Value::Array(a) if a.iter().all(Value::is_table))
    }
    fn name_of(v: &Value) -> Option<&str> {
        v.get("name").and_then(Value::as_str)
    }
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(e)) => merge_tables(b, e),
            (Some(b @ Value::Array(_)), Value::Array(e)) if is_table_array(b) && e.iter().all(Value::is_table) => {
                let Value::Array(b) = b else { unreachable!() };
                for item in e {
                    let pos = name_of(&item).and_then(|n| b.iter().position(|x| name_of(x) == Some(n)));
                    match (pos, item) {
                        (Some(i), Value::Table(t)) => {
                            if let Value::Table(existing) = &mut b[i] {
                                merge_tables(existing, t);
                            }
                        }
                        (_, item) => b.push(item),
                    }
                }
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// `[listen] rw` / `ro` of a config, as addresses to connect to.
fn listen_addrs(config: &str) -> Result<(SocketAddr, Option<SocketAddr>)> {
    let t: Table = config.parse().context("the pgferry config is not valid TOML")?;
    let get = |k: &str| -> Result<Option<SocketAddr>> {
        let Some(v) = t.get("listen").and_then(|l| l.get(k)) else {
            return Ok(None);
        };
        let s = v.as_str().ok_or_else(|| anyhow!("listen.{k} is not a string"))?;
        let mut a: SocketAddr = s.parse().with_context(|| format!("listen.{k} = {s:?}"))?;
        if a.ip().is_unspecified() {
            a.set_ip(match a.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        Ok(Some(a))
    };
    let rw = get("rw")?.ok_or_else(|| anyhow!("the harness needs [listen] rw set explicitly"))?;
    Ok((rw, get("ro")?))
}

/// A running `pgferry --config FILE` process.
///
/// `dir` holds `pgferry.toml`, `pgferry.log` (its stdout and stderr) and, from
/// [`Ferry::for_cluster`], `userlist.txt`. Dropping it kills the process
/// (SIGKILL) and removes `dir`, except when the test is panicking: then the log
/// tail is printed and `dir` is kept. A watchdog kills the process if the test
/// process dies first.
#[derive(Debug)]
pub struct Ferry {
    pub rw_port: u16,
    /// `None` when the config has no `[listen] ro`.
    pub ro_port: Option<u16>,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub binary: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
    watchdog: Option<Watchdog>,
}

impl Ferry {
    /// Starts [`pgferry_bin`] with `config_toml` and waits (up to 10 s) until
    /// its rw (and ro, if configured) ports accept TCP connections.
    pub fn start(config_toml: &str) -> Result<Ferry> {
        Self::start_with_binary(&pgferry_bin()?, config_toml)
    }

    /// [`Ferry::start`] with an explicit binary.
    pub fn start_with_binary(binary: &Path, config_toml: &str) -> Result<Ferry> {
        let dir = make_temp_dir("pgferry-proxy")?;
        Self::start_in(dir, binary, config_toml)
    }

    /// Starts pgferry in front of `cluster` with the harness's minimal config
    /// (see [`Ferry::cluster_config`]) deep-merged with `extra_toml` (see
    /// [`merge_toml`]).
    pub fn for_cluster(cluster: &PgCluster, extra_toml: &str) -> Result<Ferry> {
        let binary = pgferry_bin()?;
        let dir = make_temp_dir("pgferry-proxy")?;
        let config = match Self::cluster_config(cluster, &dir, extra_toml) {
            Ok(c) => c,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Self::start_in(dir, &binary, &config)
    }

    /// The minimal config for `cluster`: rw and ro on fresh ports of
    /// 127.0.0.1, SCRAM auth with `dir/userlist.txt` (written now from the
    /// real pg_authid secrets of `app`, `admin`, `other`, which are created if
    /// missing), admin user `admin`, `pool_size = 4`, static topology with the
    /// cluster's primary and standby, and `[[user]] app` with its server
    /// password; then `extra_toml` deep-merged into it.
    pub fn cluster_config(cluster: &PgCluster, dir: &Path, extra_toml: &str) -> Result<String> {
        cluster.ensure_standard_users()?;
        let userlist = dir.join("userlist.txt");
        cluster.write_userlist(&userlist, &["app", "admin", "other"])?;
        let standbys = cluster
            .standby_port
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .unwrap_or_default();
        let base = format!(
            "[listen]\n\
             rw = \"127.0.0.1:{rw}\"\n\
             ro = \"127.0.0.1:{ro}\"\n\
             [auth]\n\
             method = \"scram-sha-256\"\n\
             users_file = {users_file}\n\
             admin_users = [\"admin\"]\n\
             [pool]\n\
             pool_size = 4\n\
             [http]\n\
             listen = \"127.0.0.1:{http}\"\n\
             [topology]\n\
             source = \"static\"\n\
             primary = \"127.0.0.1:{primary}\"\n\
             standbys = [{standbys}]\n\
             [[user]]\n\
             name = \"app\"\n\
             server_password = \"app-pass\"\n",
            rw = free_port(),
            ro = free_port(),
            http = free_port(),
            users_file = Value::String(userlist.to_string_lossy().into_owned()),
            primary = cluster.primary_port,
        );
        merge_toml(&base, extra_toml)
    }

    /// Runs `pgferry --check-config FILE` on `config_toml` and returns its
    /// output (the caller looks at `status`).
    pub fn check_config(config_toml: &str) -> Result<Output> {
        let binary = pgferry_bin()?;
        let dir = make_temp_dir("pgferry-check")?;
        let path = dir.join("pgferry.toml");
        let res = fs::write(&path, config_toml)
            .context("writing the config")
            .and_then(|()| {
                Command::new(&binary)
                    .arg("--check-config")
                    .arg(&path)
                    .stdin(Stdio::null())
                    .output()
                    .with_context(|| format!("running {}", binary.display()))
            });
        let _ = fs::remove_dir_all(&dir);
        res
    }

    fn start_in(dir: PathBuf, binary: &Path, config_toml: &str) -> Result<Ferry> {
        let res = Self::spawn_and_wait(&dir, binary, config_toml);
        if res.is_err() {
            let _ = fs::remove_dir_all(&dir);
        }
        res
    }

    fn spawn_and_wait(dir: &Path, binary: &Path, config_toml: &str) -> Result<Ferry> {
        let (rw, ro) = listen_addrs(config_toml)?;
        let _ = crate::util::raise_nofile();
        let config_path = dir.join("pgferry.toml");
        let log_path = dir.join("pgferry.log");
        fs::write(&config_path, config_toml).context("writing pgferry.toml")?;
        let log = File::create(&log_path).context("creating pgferry.log")?;
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&config_path)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            cmd.env("RUST_BACKTRACE", "1");
        }
        // ETXTBSY: a file just written (a test's fake binary) can still be open
        // for writing in a child that another test thread forked meanwhile.
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                res => break res.with_context(|| format!("starting {}", binary.display()))?,
            }
        };
        let watchdog = Watchdog::spawn(
            &format!(
                "kill -9 {} 2>/dev/null\nrm -rf {}\n",
                child.id(),
                sh_quote(&dir.to_string_lossy())
            ),
            None,
        );
        let mut ferry = Ferry {
            rw_port: rw.port(),
            ro_port: ro.map(|a| a.port()),
            dir: dir.to_path_buf(),
            config_path,
            log_path,
            binary: binary.to_path_buf(),
            child,
            exit: None,
            watchdog: None,
        };
        ferry.watchdog = Some(watchdog?);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pending: Vec<SocketAddr> = std::iter::once(rw).chain(ro).collect();
        loop {
            if let Some(status) = ferry.try_wait()? {
                let msg = format!(
                    "pgferry ({}) exited during startup with {status}\nconfig {}:\n{}\n{}",
                    binary.display(),
                    ferry.config_path.display(),
                    config_toml.trim_end(),
                    log_section(&ferry.log_path, 40)
                );
                ferry.keep_nothing();
                bail!(msg);
            }
            pending.retain(|a| !addr_accepts(*a));
            if pending.is_empty() {
                return Ok(ferry);
            }
            if Instant::now() >= deadline {
                ferry.kill();
                let msg = format!(
                    "pgferry ({}) did not accept connections on {pending:?} within {START_TIMEOUT:?}\n{}",
                    binary.display(),
                    log_section(&ferry.log_path, 40)
                );
                ferry.keep_nothing();
                bail!(msg);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process and removes the directory now (startup failures:
    /// the message already carries the log tail).
    fn keep_nothing(mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
        // Drop sees an exited process and no dir: nothing left to do.
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything pgferry wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The log once it contains `needle`, or as it is after `timeout` (the
    /// caller asserts on it). pgferry may log a refusal after closing the
    /// socket, so a test that saw the close waits for the line.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() > end {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`, `libc::SIGHUP`) to the process.
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        if let Some(status) = self.try_wait()? {
            bail!("pgferry already exited with {status}");
        }
        send_signal(self.pid(), sig).with_context(|| format!("kill -{sig} {}", self.pid()))
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            if let Some(status) = self.child.try_wait().context("waitpid(pgferry)")? {
                self.exit = Some(status);
                // The pid may be reused from now on: the watchdog must not kill it.
                if let Some(w) = self.watchdog.take() {
                    w.disarm();
                }
            }
        }
        Ok(self.exit)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// SIGKILLs the process (if still running) and reaps it.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exit = Some(status);
            }
        }
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
    }

    /// [`crate::conn_str`] for the rw port.
    pub fn rw_conn_str(&self, user: &str, password: &str, db: &str) -> String {
        crate::conn_str(self.rw_port, user, password, db)
    }

    /// [`crate::conn_str`] for the ro port (panics without one).
    pub fn ro_conn_str(&self, user: &str, password: &str, db: &str) -> String {
        crate::conn_str(self.ro_port.expect("no [listen] ro"), user, password, db)
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking && self.dir.exists() {
            eprintln!(
                "pgferry (pid {}) log, kept in {}:\n{}",
                self.child.id(),
                self.dir.display(),
                log_section(&self.log_path, 80)
            );
        }
        self.kill();
        if !panicking {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_overrides_scalars_merges_tables_and_named_entries() {
        let base = "[listen]\nrw = \"127.0.0.1:1\"\n[pool]\npool_size = 4\n\
                    [topology]\nstandbys = [\"a\", \"b\"]\n\
                    [[user]]\nname = \"app\"\nserver_password = \"p\"\n";
        let extra = "[pool]\npool_size = 2\nmin_pool_size = 1\n[limits]\nmax_client_conn = 5\n\
                     [topology]\nstandbys = []\n\
                     [[user]]\nname = \"app\"\npool_size = 3\n\
                     [[user]]\nname = \"other\"\n";
        let merged: Table = merge_toml(base, extra).unwrap().parse().unwrap();
        assert_eq!(merged["listen"]["rw"].as_str(), Some("127.0.0.1:1"));
        assert_eq!(merged["pool"]["pool_size"].as_integer(), Some(2));
        assert_eq!(merged["pool"]["min_pool_size"].as_integer(), Some(1));
        assert_eq!(merged["limits"]["max_client_conn"].as_integer(), Some(5));
        assert_eq!(merged["topology"]["standbys"].as_array().map(Vec::len), Some(0));
        let users = merged["user"].as_array().unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users[0]["name"].as_str(), Some("app"));
        assert_eq!(users[0]["server_password"].as_str(), Some("p"));
        assert_eq!(users[0]["pool_size"].as_integer(), Some(3));
        assert_eq!(users[1]["name"].as_str(), Some("other"));
    }

    #[test]
    fn listen_addrs_map_unspecified_to_loopback() {
        let (rw, ro) = listen_addrs("[listen]\nrw = \"0.0.0.0:7000\"\nro = \"[::]:7001\"\n").unwrap();
        assert_eq!(rw, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(ro, Some("[::1]:7001".parse().unwrap()));
        let (_, ro) = listen_addrs("[listen]\nrw = \"127.0.0.1:7000\"\n").unwrap();
        assert_eq!(ro, None);
        assert!(listen_addrs("[pool]\npool_size = 1\n").is_err());
    }

    #[test]
    fn workspace_root_has_the_proxy_crate() {
        assert!(workspace_root().join("proxy/Cargo.toml").is_file());
    }
}
