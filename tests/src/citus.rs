//! A real Citus cluster for tests: a coordinator and two workers, each a
//! plain PostgreSQL 15 with `shared_preload_libraries = 'citus'`, run as the
//! unprivileged OS user on free ports in a fresh directory under `/tmp`, like
//! [`crate::PgCluster`].
//!
//! * Every node has the [`STANDARD_USERS`] and database `app` with
//!   `CREATE EXTENSION citus` in it. The coordinator is registered with
//!   `citus_set_coordinator_host`, the workers with `citus_add_node`.
//! * **Authentication.** pg_hba is the one of [`crate::PgCluster`]: `trust`
//!   for superuser `postgres` from 127.0.0.1 and `scram-sha-256` for every
//!   other user, so the client-facing path stays SCRAM (pgferry
//!   authenticates against it). Citus opens node-to-node connections as the
//!   client's user; those find their passwords in a pgpass file written into
//!   the cluster directory (mode 0600) and named by `PGPASSFILE` in the
//!   servers' environment. That works on every node at once, including MX
//!   hops from a worker, which `pg_dist_authinfo` would need a row for on
//!   every node (it is not synced; reference §7). The pgpass file is private
//!   to the cluster: the OS user's real `~/.pgpass` is not touched.
//! * **Which PostgreSQL.** [`citus_pg_bin`]: `$PGFERRY_CITUS_PG_BIN` if set,
//!   else [`crate::PG_BIN`]. Citus is looked for in `../lib/citus.so` next to
//!   that bin directory. The build in `../shared/citus` was made against
//!   PostgreSQL 15.20; a 15.18 server cannot load it (`undefined symbol:
//!   heap_datum_check`): [`CitusCluster::start`] says so.
//! * [`citus_available`] / [`shared_citus_or_skip`]: without Citus a test
//!   prints `SKIPPED: Citus is not installed (run ../shared/citus/install.sh)`
//!   to stderr and returns.
//! * Dropping the cluster stops the servers and removes the directory; a
//!   watchdog does the same if the test process dies first.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::cluster::{PG_BIN, STANDARD_USERS};
use crate::osuser::{pg_os_user, OsUser};
use crate::ports::free_port;
use crate::util::{create_database_sql, create_role_sql, log_section, make_temp_dir, quote_literal, run, sh_quote};
use crate::wait::wait_until;
use crate::watchdog::Watchdog;

/// The PostgreSQL bin directory the Citus cluster runs:
/// `$PGFERRY_CITUS_PG_BIN`, else [`PG_BIN`].
pub fn citus_pg_bin() -> PathBuf {
    match std::env::var_os("PGFERRY_CITUS_PG_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(PG_BIN),
    }
}

/// `citus.so` of [`citus_pg_bin`]'s installation.
pub fn citus_so_path() -> PathBuf {
    citus_pg_bin().join("../lib/citus.so")
}

/// Whether Citus is installed for [`citus_pg_bin`].
pub fn citus_available() -> bool {
    citus_so_path().is_file()
}

/// The line a Citus test prints when it cannot run.
pub const CITUS_SKIP_LINE: &str = "SKIPPED: Citus is not installed (run ../shared/citus/install.sh)";

/// The node names, in order: `coordinator`, `worker1`, `worker2`.
pub const CITUS_NODES: [&str; 3] = ["coordinator", "worker1", "worker2"];

const PG_HBA: &str = "\
# pgferry Citus test cluster
local   all             all                             trust
host    all             postgres        127.0.0.1/32    trust
host    replication     all             127.0.0.1/32    trust
host    all             all             127.0.0.1/32    scram-sha-256
";

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running Citus cluster: coordinator + 2 workers.
#[derive(Debug)]
pub struct CitusCluster {
    pub dir: PathBuf,
    bin: PathBuf,
    /// Ports of [`CITUS_NODES`], in order.
    pub ports: [u16; 3],
    user: &'static OsUser,
    watchdog: Option<Watchdog>,
}

impl CitusCluster {
    /// initdb once, copy the data directory to the three nodes, start them
    /// in parallel, create the extension in `app` on each (in parallel) and
    /// register the nodes. A few seconds.
    pub fn start() -> Result<CitusCluster> {
        let user = pg_os_user()?;
        let bin = citus_pg_bin();
        if !citus_available() {
            bail!("{CITUS_SKIP_LINE}: {} is missing", citus_so_path().display());
        }
        let dir = make_temp_dir("pgferry-citus")?;
        user.chown(&dir)?;
        let watchdog = Watchdog::spawn(&cleanup_script(&dir, &bin), Some(user))?;
        let mut cluster = CitusCluster {
            dir,
            bin,
            ports: [0; 3],
            user,
            watchdog: Some(watchdog),
        };
        cluster.init()?;
        Ok(cluster)
    }

    /// A program of [`citus_pg_bin`], or of [`PG_BIN`] when that directory
    /// lacks it (a bin directory unpacked from the server package has no
    /// psql or pg_isready).
    fn pg_bin(&self, name: &str) -> PathBuf {
        let p = self.bin.join(name);
        if p.exists() {
            p
        } else {
            Path::new(PG_BIN).join(name)
        }
    }

    /// Data directory of node `i` (index into [`CITUS_NODES`]).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(CITUS_NODES[i])
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.log", CITUS_NODES[i]))
    }

    pub fn coordinator_port(&self) -> u16 {
        self.ports[0]
    }

    /// Worker `n` (1 or 2).
    pub fn worker_port(&self, n: usize) -> u16 {
        self.ports[n]
    }

    fn init(&mut self) -> Result<()> {
        let template = self.dir.join("template");
        run(
            self.user.command(self.pg_bin("initdb")).args([
                "-D".as_ref(),
                template.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth-local=trust".as_ref(),
                "--auth-host=scram-sha-256".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ]),
            "initdb (Citus template)",
        )?;
        let conf = format!(
            "\n# --- pgferry Citus test harness ---\n\
             listen_addresses = '127.0.0.1'\n\
             shared_preload_libraries = 'citus'\n\
             max_connections = 200\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             wal_level = logical\n\
             max_replication_slots = 10\n\
             max_wal_senders = 10\n\
             shared_buffers = '64MB'\n\
             citus.local_hostname = '127.0.0.1'\n\
             citus.enable_statistics_collection = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             unix_socket_directories = {}\n",
            quote_literal(&self.dir.to_string_lossy())
        );
        append(&template.join("postgresql.conf"), &conf)?;
        fs::write(template.join("pg_hba.conf"), PG_HBA).context("writing pg_hba.conf")?;

        // Passwords for node-to-node connections (see the module docs).
        let pgpass = self.dir.join("pgpass");
        let mut text = String::new();
        for (name, password) in STANDARD_USERS {
            text.push_str(&format!("*:*:*:{name}:{password}\n"));
        }
        fs::write(&pgpass, text).context("writing pgpass")?;
        fs::set_permissions(&pgpass, fs::Permissions::from_mode(0o600))?;
        self.user.chown(&pgpass)?;

        // The roles and database `app` go into the template, so every node
        // has them (with the same SCRAM verifiers) before Citus starts.
        let port = free_port();
        append(&template.join("postgresql.conf"), &format!("port = {port}\n"))?;
        self.pg_ctl_start(&template, &self.dir.join("template.log"), port)?;
        let mut sql = String::new();
        for (name, password) in STANDARD_USERS {
            sql.push_str(&create_role_sql(name, password));
            sql.push('\n');
        }
        sql.push_str(&create_database_sql("app", "app"));
        sql.push_str("\nGRANT CONNECT ON DATABASE app TO other;\n");
        self.psql(port, "postgres", &sql)?;
        run(
            self.user.command(self.pg_bin("pg_ctl")).args([
                "-D".as_ref(),
                template.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ]),
            "pg_ctl stop (template)",
        )?;

        for i in 0..3 {
            run(
                self.user
                    .command("cp")
                    .args(["-a".as_ref(), template.as_os_str(), self.data_dir(i).as_os_str()]),
                "copying the template data directory",
            )?;
        }
        // Start the three nodes in parallel.
        let this: &CitusCluster = self;
        let ports: Vec<Result<u16>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3).map(|i| s.spawn(move || this.start_on_free_port(i))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("start thread panicked"))))
                .collect()
        });
        for (i, p) in ports.into_iter().enumerate() {
            self.ports[i] = p?;
        }
        let this: &CitusCluster = self;
        let results: Vec<Result<String>> = std::thread::scope(|s| {
            let handles: Vec<_> = this
                .ports
                .iter()
                .map(|&p| s.spawn(move || this.psql(p, "app", "CREATE EXTENSION citus;")))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("psql thread panicked"))))
                .collect()
        });
        for r in results {
            r?;
        }
        let mut sql = format!("SELECT citus_set_coordinator_host('127.0.0.1', {});\n", self.ports[0]);
        for p in &self.ports[1..] {
            sql.push_str(&format!("SELECT citus_add_node('127.0.0.1', {p});\n"));
        }
        self.psql(self.ports[0], "app", &sql)?;
        Ok(())
    }

    fn start_on_free_port(&self, i: usize) -> Result<u16> {
        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port();
            append(&self.data_dir(i).join("postgresql.conf"), &format!("port = {port}\n"))?;
            match self.pg_ctl_start(&self.data_dir(i), &self.log_path(i), port) {
                Ok(()) => return Ok(port),
                Err(e) => {
                    let log = fs::read_to_string(self.log_path(i)).unwrap_or_default();
                    if !log.contains("could not bind") && !log.contains("Address already in use") {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("could not start {}", CITUS_NODES[i])))
    }

    fn pg_ctl_start(&self, data: &Path, log: &Path, port: u16) -> Result<()> {
        let pgpass = self.dir.join("pgpass");
        let res = run(
            self.user
                .command(self.pg_bin("pg_ctl"))
                .env("PGPASSFILE", &pgpass)
                .args([
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "60".as_ref(),
                    "start".as_ref(),
                ]),
            &format!("pg_ctl start ({} on port {port})", data.display()),
        );
        if let Err(e) = res {
            let text = fs::read_to_string(log).unwrap_or_default();
            if text.contains("could not load library") && text.contains("citus") {
                let version = Command::new(self.pg_bin("postgres"))
                    .arg("--version")
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .unwrap_or_default();
                return Err(e.context(format!(
                    "citus.so does not load into this PostgreSQL ({version}). The build in ../shared/citus \
                     was made against PostgreSQL 15.20: upgrade postgresql-15 (apt-get install \
                     --only-upgrade postgresql-15) or point PGFERRY_CITUS_PG_BIN at a 15.20 bin directory \
                     whose ../lib has citus.so\n{}",
                    log_section(log, 10)
                )));
            }
            return Err(e.context(log_section(log, 40)));
        }
        let ready = wait_until(START_TIMEOUT, Duration::from_millis(100), || {
            Ok(self
                .user
                .command(self.pg_bin("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .status()?
                .success())
        });
        if !ready {
            bail!(
                "PostgreSQL on port {port} is not ready after {START_TIMEOUT:?}\n{}",
                log_section(log, 40)
            );
        }
        Ok(())
    }

    /// Runs `sql` with `psql -X -A -t -q -v ON_ERROR_STOP=1` as superuser
    /// `postgres` on `127.0.0.1:port`, database `db`; returns the trimmed
    /// output (rows one per line, columns separated by `|`).
    pub fn psql(&self, port: u16, db: &str, sql: &str) -> Result<String> {
        self.psql_as(port, "postgres", None, db, sql)
    }

    /// [`CitusCluster::psql`] as `user` with `password` (SCRAM).
    pub fn psql_as(&self, port: u16, user: &str, password: Option<&str>, db: &str, sql: &str) -> Result<String> {
        let mut cmd = self.user.command(self.pg_bin("psql"));
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        let mut child = cmd
            .env("PGSSLMODE", "disable")
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                user,
                "-d",
                db,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting psql")?;
        {
            let mut stdin = child.stdin.take().expect("piped stdin");
            stdin.write_all(sql.as_bytes()).context("writing SQL to psql")?;
        }
        let out = child.wait_with_output().context("waiting for psql")?;
        if !out.status.success() {
            let shown: String = sql.chars().take(2000).collect();
            bail!(
                "psql as {user} on port {port}, database {db:?} failed ({}):\n{}\nSQL: {shown}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A third worker, `worker3`, made from the template like the others
    /// and added to the cluster (`citus_add_node`), empty until a rebalance
    /// moves shards to it. Returns its port.
    pub fn add_worker(&self) -> Result<u16> {
        let data = self.dir.join("worker3");
        let log = self.dir.join("worker3.log");
        run(
            self.user
                .command("cp")
                .args(["-a".as_ref(), self.dir.join("template").as_os_str(), data.as_os_str()]),
            "copying the template data directory",
        )?;
        let port = free_port();
        append(&data.join("postgresql.conf"), &format!("port = {port}\n"))?;
        self.pg_ctl_start(&data, &log, port)?;
        self.psql(port, "app", "CREATE EXTENSION citus;")?;
        self.coordinator_sql(&format!("SELECT citus_add_node('127.0.0.1', {port})"))?;
        Ok(port)
    }

    /// A streaming hot standby of worker `n` (1 or 2), registered with
    /// Citus as that group's secondary (`citus_add_secondary_node`). Returns
    /// its port once it accepts connections.
    pub fn add_worker_secondary(&self, n: usize) -> Result<u16> {
        let data = self.dir.join(format!("worker{n}-standby"));
        let log = self.dir.join(format!("worker{n}-standby.log"));
        run(
            self.user.command(self.pg_bin("pg_basebackup")).args([
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                self.ports[n].to_string().as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-R".as_ref(),
                "-X".as_ref(),
                "stream".as_ref(),
                "--checkpoint=fast".as_ref(),
                "--no-sync".as_ref(),
            ]),
            "pg_basebackup (worker standby)",
        )?;
        let port = free_port();
        append(
            &data.join("postgresql.conf"),
            &format!("port = {port}\nhot_standby = on\n"),
        )?;
        self.pg_ctl_start(&data, &log, port)?;
        self.coordinator_sql(&format!(
            "SELECT citus_add_secondary_node('127.0.0.1', {port}, '127.0.0.1', {})",
            self.ports[n]
        ))?;
        Ok(port)
    }

    /// A pgferry users file with the coordinator's SCRAM secrets of `users`
    /// (roles and their verifiers are the same on every node).
    pub fn write_userlist(&self, path: &Path, users: &[&str]) -> Result<()> {
        let mut text = String::new();
        for u in users {
            let secret = self.psql(
                self.ports[0],
                "app",
                &format!("SELECT rolpassword FROM pg_authid WHERE rolname = {}", quote_literal(u)),
            )?;
            if secret.is_empty() {
                bail!("no role {u}");
            }
            text.push_str(&format!("\"{u}\" \"{secret}\"\n"));
        }
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// pgferry in front of this cluster with a static topology (the
    /// coordinator as primary) and Citus routing for database `app` as
    /// user `app`; `extra` TOML is merged over that (pool sizes, a
    /// read-only listener, routing settings).
    pub fn ferry(&self, extra: &str) -> Result<crate::Ferry> {
        let dir = std::env::temp_dir().join(format!("pgferry-citus-{}-{}", std::process::id(), crate::free_port()));
        fs::create_dir_all(&dir)?;
        let users = dir.join("userlist.txt");
        self.write_userlist(&users, &["app", "admin"])?;
        let base = format!(
            "[listen]\nrw = \"127.0.0.1:{rw}\"\n\
             [auth]\nmethod = \"scram-sha-256\"\nusers_file = {users:?}\nadmin_users = [\"admin\"]\n\
             [pool]\npool_size = 4\n\
             [http]\nlisten = \"127.0.0.1:{http}\"\n\
             [topology]\nsource = \"static\"\nprimary = \"127.0.0.1:{coord}\"\n\
             [[user]]\nname = \"app\"\nserver_password = \"app-pass\"\n\
             [citus]\ndatabase = \"app\"\nuser = \"app\"\npassword = \"app-pass\"\nrefresh_interval = \"300ms\"\n",
            rw = crate::free_port(),
            http = crate::free_port(),
            coord = self.coordinator_port(),
        );
        crate::Ferry::start(&crate::merge_toml(&base, extra)?)
    }

    /// [`CitusCluster::psql`] on the coordinator, database `app`.
    pub fn coordinator_sql(&self, sql: &str) -> Result<String> {
        self.psql(self.ports[0], "app", sql)
    }

    /// [`CitusCluster::psql`] on worker `n` (1 or 2), database `app`.
    pub fn worker_sql(&self, n: usize, sql: &str) -> Result<String> {
        self.psql(self.ports[n], "app", sql)
    }

    /// A tokio-postgres connection string for `user` to node port `port`,
    /// database `app`, without TLS.
    pub fn conn_str(&self, port: u16, user: &str, password: &str) -> String {
        crate::util::conn_str(port, user, password, "app")
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        crate::util::tail_file(&self.log_path(i), lines)
    }
}

impl Drop for CitusCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..3 {
                let log = self.log_path(i);
                if log.exists() {
                    eprintln!("{}", log_section(&log, 30));
                }
            }
        }
        if let Some(w) = self.watchdog.take() {
            w.fire();
        }
    }
}

fn cleanup_script(dir: &Path, bin: &Path) -> String {
    let dir = sh_quote(&dir.to_string_lossy());
    format!(
        "exec </dev/null >/dev/null 2>&1\n\
         for d in {dir}/template {dir}/coordinator {dir}/worker1 {dir}/worker2 {dir}/worker3 {dir}/worker1-standby {dir}/worker2-standby; do\n\
         \x20 if [ -f \"$d/postmaster.pid\" ]; then\n\
         \x20   pid=$(head -n 1 \"$d/postmaster.pid\")\n\
         \x20   {pg_ctl} -D \"$d\" -m immediate -w -t 30 stop || kill -9 \"$pid\"\n\
         \x20 fi\n\
         done\n\
         rm -rf {dir}\n",
        pg_ctl = sh_quote(&bin.join("pg_ctl").to_string_lossy()),
    )
}

fn append(path: &Path, text: &str) -> Result<()> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("appending to {}", path.display()))
}

/// One Citus cluster per test binary, or None (after printing
/// [`CITUS_SKIP_LINE`] to stderr) when Citus is not installed. Panics if
/// Citus is installed but the cluster cannot be started.
pub fn shared_citus_or_skip() -> Option<&'static CitusCluster> {
    if !citus_available() {
        eprintln!("{CITUS_SKIP_LINE} [{} missing]", citus_so_path().display());
        return None;
    }
    static SHARED: OnceLock<std::result::Result<CitusCluster, String>> = OnceLock::new();
    let res = SHARED.get_or_init(|| {
        let _ = crate::util::raise_nofile();
        CitusCluster::start().map_err(|e| format!("{e:#}"))
    });
    match res {
        Ok(c) => Some(c),
        Err(e) => panic!("the Citus cluster could not be started: {e}"),
    }
}
