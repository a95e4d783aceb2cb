//! Real PostgreSQL 15 clusters: a primary and optionally a streaming standby.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::osuser::{pg_os_user, OsUser};
use crate::ports::free_port;
use crate::util::{log_section, make_temp_dir, quote_literal, run, sh_quote};
use crate::wait::wait_until;
use crate::watchdog::Watchdog;

/// Where the PostgreSQL 15 programs are (Debian's layout). The wrappers in
/// `/usr/local/bin` or `/usr/bin` are deliberately not used.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The password of the standard user `app`.
pub const APP_PASS: &str = "app-pass";

/// Roles that [`shared_cluster`] and [`PgCluster::ensure_standard_users`]
/// create: `(name, password)`. `app` owns database `app`; `other` may connect
/// to it; `admin` is an ordinary login role (pgferry's admin user in
/// [`crate::Ferry::for_cluster`]).
pub const STANDARD_USERS: [(&str, &str); 3] = [("app", APP_PASS), ("admin", "admin-pass"), ("other", "other-pass")];

const PG_HBA: &str = "\
# pgferry test cluster
local   all             all                             trust
host    all             postgres        127.0.0.1/32    trust
host    replication     all             127.0.0.1/32    trust
host    all             all             127.0.0.1/32    scram-sha-256
";

/// How long a server may take to start or a standby to catch up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn pg_bin(name: &str) -> PathBuf {
    Path::new(PG_BIN).join(name)
}

/// Options for [`PgCluster::start`].
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// Also create a streaming standby of the primary (pg_basebackup -R).
    pub standby: bool,
}

/// One of the cluster's two servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Primary,
    Standby,
}

impl Node {
    fn name(self) -> &'static str {
        match self {
            Node::Primary => "primary",
            Node::Standby => "standby",
        }
    }
}

/// A running PostgreSQL primary (and optional standby) in its own directory.
///
/// Layout of `dir`: `primary/` and `standby/` (data directories),
/// `primary.log`, `standby.log`, and the servers' Unix sockets.
/// Dropping it stops the servers (`pg_ctl stop -m immediate`) and removes
/// `dir`; a watchdog does the same if the test process dies first.
#[derive(Debug)]
pub struct PgCluster {
    pub dir: PathBuf,
    pub primary_port: u16,
    pub standby_port: Option<u16>,
    user: &'static OsUser,
    watchdog: Option<Watchdog>,
    setup_lock: Mutex<bool>,
}

impl PgCluster {
    /// initdb + start a primary on a free port, and with `opts.standby` a
    /// streaming standby; returns once both accept connections and the
    /// standby streams.
    pub fn start(opts: PgOptions) -> Result<PgCluster> {
        let user = pg_os_user()?;
        let dir = make_temp_dir("pgferry-pg")?;
        user.chown(&dir)?;
        let watchdog = Watchdog::spawn(&cleanup_script(&dir), Some(user))?;
        // From here on, dropping `cluster` (also on error) cleans up.
        let mut cluster = PgCluster {
            dir,
            primary_port: 0,
            standby_port: None,
            user,
            watchdog: Some(watchdog),
            setup_lock: Mutex::new(false),
        };
        cluster.init_primary()?;
        if opts.standby {
            cluster.init_standby()?;
        }
        Ok(cluster)
    }

    /// The OS user the servers run as.
    pub fn os_user(&self) -> &'static OsUser {
        self.user
    }

    pub fn data_dir(&self, node: Node) -> PathBuf {
        self.dir.join(node.name())
    }

    pub fn log_path(&self, node: Node) -> PathBuf {
        self.dir.join(format!("{}.log", node.name()))
    }

    /// The node's port. Panics for `Standby` on a cluster without one.
    pub fn port(&self, node: Node) -> u16 {
        match node {
            Node::Primary => self.primary_port,
            Node::Standby => self.standby_port.expect("this cluster has no standby"),
        }
    }

    /// `"127.0.0.1:PORT"` of the node.
    pub fn addr(&self, node: Node) -> String {
        format!("127.0.0.1:{}", self.port(node))
    }

    /// The last `lines` lines of the node's server log.
    pub fn log_tail(&self, node: Node, lines: usize) -> String {
        crate::util::tail_file(&self.log_path(node), lines)
    }

    fn init_primary(&mut self) -> Result<()> {
        let data = self.data_dir(Node::Primary);
        run(
            self.user.command(pg_bin("initdb")).args([
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth-local=trust".as_ref(),
                "--auth-host=scram-sha-256".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ]),
            "initdb",
        )?;
        let conf = format!(
            "\n# --- pgferry test harness ---\n\
             listen_addresses = '127.0.0.1'\n\
             max_connections = 300\n\
             fsync = off\n\
             synchronous_commit = off\n\
             wal_writer_delay = '10ms'\n\
             full_page_writes = off\n\
             wal_level = replica\n\
             max_wal_senders = 5\n\
             wal_keep_size = '256MB'\n\
             shared_buffers = '128MB'\n\
             hot_standby = on\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             unix_socket_directories = {}\n",
            quote_literal(&self.dir.to_string_lossy())
        );
        append(&data.join("postgresql.conf"), &conf)?;
        fs::write(data.join("pg_hba.conf"), PG_HBA).context("writing pg_hba.conf")?;
        self.primary_port = self.start_on_free_port(Node::Primary)?;
        Ok(())
    }

    fn init_standby(&mut self) -> Result<()> {
        let data = self.data_dir(Node::Standby);
        run(
            self.user.command(pg_bin("pg_basebackup")).args([
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                self.primary_port.to_string().as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-R".as_ref(),
                "-X".as_ref(),
                "stream".as_ref(),
                "-c".as_ref(),
                "fast".as_ref(),
                "--no-sync".as_ref(),
            ]),
            "pg_basebackup",
        )?;
        self.standby_port = Some(self.start_on_free_port(Node::Standby)?);
        let streaming = wait_until(START_TIMEOUT, Duration::from_millis(100), || {
            Ok(self.psql(
                self.primary_port,
                "postgres",
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            )? != "0")
        });
        if !streaming {
            bail!(
                "the standby on port {} did not start streaming from the primary within {:?}\n{}\n{}",
                self.port(Node::Standby),
                START_TIMEOUT,
                log_section(&self.log_path(Node::Standby), 40),
                log_section(&self.log_path(Node::Primary), 20),
            );
        }
        Ok(())
    }

    /// Picks a free port, writes it into the node's config and starts it;
    /// retries with another port if the chosen one was taken meanwhile.
    fn start_on_free_port(&self, node: Node) -> Result<u16> {
        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port();
            append(
                &self.data_dir(node).join("postgresql.conf"),
                &format!("port = {port}\n"),
            )?;
            match self.start_node_on(node, port) {
                Ok(()) => return Ok(port),
                Err(e) => {
                    let log = fs::read_to_string(self.log_path(node)).unwrap_or_default();
                    if !log.contains("could not bind") && !log.contains("Address already in use") {
                        return Err(e);
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("could not start the {}", node.name())))
    }

    /// Starts a stopped node again (on its existing port).
    pub fn start_node(&self, node: Node) -> Result<()> {
        self.start_node_on(node, self.port(node))
    }

    fn start_node_on(&self, node: Node, port: u16) -> Result<()> {
        let data = self.data_dir(node);
        let log = self.log_path(node);
        let res = run(
            self.user.command(pg_bin("pg_ctl")).args([
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ]),
            &format!("pg_ctl start ({} on port {port})", node.name()),
        );
        if let Err(e) = res {
            return Err(e.context(log_section(&log, 40)));
        }
        let ready = wait_until(START_TIMEOUT, Duration::from_millis(100), || {
            Ok(self
                .user
                .command(pg_bin("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .status()?
                .success())
        });
        if !ready {
            bail!(
                "PostgreSQL {} on port {port} is not ready after {:?}\n{}",
                node.name(),
                START_TIMEOUT,
                log_section(&log, 40)
            );
        }
        Ok(())
    }

    /// `pg_ctl stop -m MODE` (`fast`, `immediate`, `smart`) for one node.
    pub fn stop_node(&self, node: Node, mode: &str) -> Result<()> {
        let data = self.data_dir(node);
        run(
            self.user.command(pg_bin("pg_ctl")).args([
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                mode.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "stop".as_ref(),
            ]),
            &format!("pg_ctl stop ({})", node.name()),
        )?;
        Ok(())
    }

    /// `pg_ctl promote` the standby (waits until it accepts writes).
    pub fn promote_standby(&self) -> Result<()> {
        let data = self.data_dir(Node::Standby);
        run(
            self.user.command(pg_bin("pg_ctl")).args([
                "-D".as_ref(),
                data.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "promote".as_ref(),
            ]),
            "pg_ctl promote",
        )?;
        Ok(())
    }

    /// Runs `sql` (any number of statements) with `psql -X -A -t -q -v
    /// ON_ERROR_STOP=1` as superuser `postgres` over TCP to
    /// `127.0.0.1:port`, database `db`; returns the trimmed output (rows,
    /// one per line, columns separated by `|`).
    pub fn psql(&self, port: u16, db: &str, sql: &str) -> Result<String> {
        let mut child = self
            .user
            .command(pg_bin("psql"))
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
                "postgres",
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
            bail!(
                "psql on port {port}, database {db:?} failed ({}):\n{}\nSQL: {sql}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// [`PgCluster::psql`] on the primary.
    pub fn psql_primary(&self, db: &str, sql: &str) -> Result<String> {
        self.psql(self.primary_port, db, sql)
    }

    /// `CREATE ROLE name LOGIN PASSWORD password` with a SCRAM-SHA-256 verifier.
    pub fn create_user(&self, name: &str, password: &str) -> Result<()> {
        self.psql_primary("postgres", &crate::util::create_role_sql(name, password))?;
        Ok(())
    }

    /// `CREATE DATABASE name OWNER owner`.
    pub fn create_database(&self, name: &str, owner: &str) -> Result<()> {
        self.psql_primary("postgres", &crate::util::create_database_sql(name, owner))?;
        Ok(())
    }

    /// The role's `pg_authid.rolpassword` (`SCRAM-SHA-256$4096:...`).
    pub fn scram_secret(&self, name: &str) -> Result<String> {
        let secret = self.psql_primary(
            "postgres",
            &format!(
                "SELECT coalesce(rolpassword, '') FROM pg_authid WHERE rolname = {};",
                quote_literal(name)
            ),
        )?;
        if secret.is_empty() {
            bail!("role {name:?} does not exist or has no password");
        }
        Ok(secret)
    }

    /// Writes a PgBouncer-style userlist (`"name" "SCRAM-SHA-256$..."` lines)
    /// for `users`, with their secrets from pg_authid.
    pub fn write_userlist(&self, path: &Path, users: &[&str]) -> Result<()> {
        let mut text = String::new();
        for user in users {
            let secret = self.scram_secret(user)?;
            text.push_str(&format!(
                "\"{}\" \"{}\"\n",
                user.replace('"', "\"\""),
                secret.replace('"', "\"\"")
            ));
        }
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Waits until the standby (if any) has replayed everything the primary
    /// had written when this was called.
    pub fn wait_for_replay(&self) -> Result<()> {
        let Some(standby) = self.standby_port else {
            return Ok(());
        };
        // A transaction that writes WAL (a transactional logical message) and
        // commits synchronously flushes everything before it, including
        // commits made with synchronous_commit = off. Once its xid is
        // visible in a standby snapshot, everything committed before it is.
        let out = self.psql_primary(
            "postgres",
            "SET synchronous_commit = on;\n\
             BEGIN;\n\
             SELECT pg_logical_emit_message(true, 'pgferry-harness', 'replay');\n\
             SELECT txid_current();\n\
             COMMIT;",
        )?;
        let xid = out.lines().last().unwrap_or_default().trim().to_string();
        if xid.is_empty() || !xid.bytes().all(|b| b.is_ascii_digit()) {
            bail!("unexpected txid_current() output: {out:?}");
        }
        let sql = format!("SELECT pg_visible_in_snapshot('{xid}'::xid8, pg_current_snapshot())");
        if !wait_until(START_TIMEOUT, Duration::from_millis(20), || {
            Ok(self.psql(standby, "postgres", &sql)? == "t")
        }) {
            bail!(
                "the standby did not replay the primary's transaction {xid} within {START_TIMEOUT:?}\n{}",
                log_section(&self.log_path(Node::Standby), 40)
            );
        }
        Ok(())
    }

    /// Creates the [`STANDARD_USERS`] and database `app` (owned by `app`,
    /// `other` granted CONNECT) unless they exist; waits for the standby to
    /// replay them.
    pub fn ensure_standard_users(&self) -> Result<()> {
        let mut done = self.setup_lock.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return Ok(());
        }
        for (name, password) in STANDARD_USERS {
            let exists = self.psql_primary(
                "postgres",
                &format!("SELECT count(*) FROM pg_roles WHERE rolname = {}", quote_literal(name)),
            )?;
            if exists == "0" {
                self.create_user(name, password)?;
            }
        }
        let exists = self.psql_primary("postgres", "SELECT count(*) FROM pg_database WHERE datname = 'app'")?;
        if exists == "0" {
            self.create_database("app", "app")?;
        }
        self.psql_primary("postgres", "GRANT CONNECT ON DATABASE app TO other;")?;
        self.wait_for_replay()?;
        *done = true;
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in [Node::Primary, Node::Standby] {
                let log = self.log_path(node);
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

/// Stops both servers (immediate, then SIGKILL if that fails) and removes
/// the directory. Run as the cluster's OS user by the watchdog.
fn cleanup_script(dir: &Path) -> String {
    let dir = sh_quote(&dir.to_string_lossy());
    format!(
        "exec </dev/null >/dev/null 2>&1\n\
         for d in {dir}/standby {dir}/primary; do\n\
         \x20 if [ -f \"$d/postmaster.pid\" ]; then\n\
         \x20   pid=$(head -n 1 \"$d/postmaster.pid\")\n\
         \x20   {pg_ctl} -D \"$d\" -m immediate -w -t 30 stop || kill -9 \"$pid\"\n\
         \x20 fi\n\
         done\n\
         rm -rf {dir}\n",
        pg_ctl = pg_bin("pg_ctl").display(),
    )
}

fn append(path: &Path, text: &str) -> Result<()> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("appending to {}", path.display()))
}

/// One primary + streaming standby per test binary, with the
/// [`STANDARD_USERS`] and database `app`. Started on first use; stopped and
/// removed by its watchdog when the test process exits. Panics (in every
/// test that asks) if it cannot be started.
pub fn shared_cluster() -> &'static PgCluster {
    static SHARED: OnceLock<std::result::Result<PgCluster, String>> = OnceLock::new();
    let res = SHARED.get_or_init(|| {
        let _ = crate::util::raise_nofile();
        let c = PgCluster::start(PgOptions { standby: true }).map_err(|e| format!("{e:#}"))?;
        c.ensure_standard_users().map_err(|e| format!("{e:#}"))?;
        Ok(c)
    });
    match res {
        Ok(c) => c,
        Err(e) => panic!("the shared PostgreSQL cluster could not be started: {e}"),
    }
}
