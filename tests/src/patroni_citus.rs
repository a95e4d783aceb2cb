//! A real Citus formation under Patroni 3.0.2 (Citus mode): one etcd, one
//! `scope`, group 0 (the coordinator) and worker groups 1 and 2, each a
//! [`PatroniCluster`] of 2 members (6 PostgreSQL + 6 Patroni), with Citus
//! 13.0.5.
//!
//! * **Database.** `citus: {group: N, database: citus}`: Patroni creates
//!   database `citus` and `CREATE EXTENSION citus` in it on every group's
//!   bootstrap leader, so the Citus database is **`citus`** (pgferry's
//!   `[citus] database` must say `citus`, and clients connect to `citus`).
//!   Member `conn_url`s still name `postgres` (Patroni's `postgresql.database`).
//! * **Settings.** Patroni puts `citus` first in `shared_preload_libraries`,
//!   sets `wal_level = logical` and `max_prepared_transactions = 2 ×
//!   max_connections` itself ([`PatroniCitus::start`] checks the first).
//!   The harness adds `citus.local_hostname = '127.0.0.1'` (pg_hba has no
//!   `::1` line) and turns statistics collection off.
//! * **Registration.** Patroni on the coordinator leader adds every worker
//!   group's leader to `pg_dist_node` (`citus_add_node`) and moves it on a
//!   failover (`citus_update_node`, same `nodeid`). Start waits until
//!   `pg_dist_node` names both worker leaders.
//! * **Users and node-to-node passwords.** [`STANDARD_USERS`] are created on
//!   the coordinator leader in database `citus`; Citus propagates the roles
//!   with their SCRAM verifiers to the workers. Patroni 3.0.2 puts only the
//!   superuser's password into `pg_dist_authinfo`. Connections between nodes
//!   made as `app` (MX hops, `run_command_on_*`) find their password in a
//!   pgpass file private to the formation (mode 0600), named by
//!   `PGPASSFILE` in every Patroni's environment, which the postmaster
//!   inherits (as [`crate::citus::CitusCluster`] does). Start checks it with
//!   `run_command_on_all_nodes` as `app` from every group leader.
//! * Member names: `g<G>m1`, `g<G>m2` (`g0m1` is the coordinator's first
//!   member). Timings as in [`PatroniCluster`]: `ttl 10`, `loop_wait 2`,
//!   `retry_timeout 5`, `primary_start_timeout 0`; `synchronous_mode` is
//!   switched on once every group runs (PATCH /config) and start waits for a
//!   sync standby per group, so a crashed leader loses no acknowledged commit.
//! * Without Citus, [`PatroniCitus::start_or_skip`] prints
//!   [`crate::citus::CITUS_SKIP_LINE`] and returns `None`.
//! * Drop (or the watchdogs, if the test process dies) kills every Patroni,
//!   stops every PostgreSQL, removes the directories, then stops etcd.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::citus::{citus_available, citus_so_path, CITUS_SKIP_LINE};
use crate::cluster::{PG_BIN, STANDARD_USERS};
use crate::osuser::{pg_os_user, OsUser};
use crate::patroni::{unique_suffix, Etcd, PatroniCluster, PatroniOptions, PATRONI_SUPERUSER_PASSWORD};
use crate::util::{create_role_sql, make_temp_dir, sh_quote};
use crate::watchdog::Watchdog;

/// The database Patroni creates the Citus extension in.
pub const PATRONI_CITUS_DB: &str = "citus";

/// Worker groups (group 0 is the coordinator).
pub const PATRONI_CITUS_WORKER_GROUPS: [u32; 2] = [1, 2];

const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Options for [`PatroniCitus::start`].
#[derive(Debug, Clone)]
pub struct PatroniCitusOptions {
    /// Worker groups (default 2).
    pub workers: u32,
    /// Members per group (default 2).
    pub members: usize,
    pub ttl: u32,
    pub loop_wait: u32,
    pub retry_timeout: u32,
    /// Extra PostgreSQL parameters for every member.
    pub parameters: Vec<(String, String)>,
}

impl Default for PatroniCitusOptions {
    fn default() -> Self {
        PatroniCitusOptions {
            workers: 2,
            members: 2,
            ttl: 10,
            loop_wait: 2,
            retry_timeout: 5,
            parameters: Vec::new(),
        }
    }
}

/// A Patroni-managed Citus formation. See the module docs.
#[derive(Debug)]
pub struct PatroniCitus {
    /// Index = group number (0 = coordinator). Dropped before `etcd`.
    pub groups: Vec<PatroniCluster>,
    pub etcd: Arc<Etcd>,
    pub scope: String,
    /// Directory holding the formation's pgpass file.
    pub dir: PathBuf,
    /// How long [`PatroniCitus::start`] took.
    pub startup: Duration,
    user: &'static OsUser,
    watchdog: Option<Watchdog>,
}

impl PatroniCitus {
    /// [`PatroniCitus::start`] with the defaults, or `None` after printing
    /// the SKIPPED line when Citus is not installed. Panics if Citus is
    /// installed but the formation does not come up.
    pub fn start_or_skip() -> Option<PatroniCitus> {
        if !citus_available() {
            eprintln!("{CITUS_SKIP_LINE} [{} missing]", citus_so_path().display());
            return None;
        }
        let _ = crate::util::raise_nofile();
        let mut opts = PatroniCitusOptions::default();
        // For measuring failover with shorter Patroni timings than the
        // suite's: PGFERRY_TEST_PATRONI_TIMINGS="ttl,loop_wait,retry_timeout".
        if let Ok(t) = std::env::var("PGFERRY_TEST_PATRONI_TIMINGS") {
            let v: Vec<u32> = t.split(',').filter_map(|x| x.trim().parse().ok()).collect();
            match v[..] {
                [ttl, loop_wait, retry_timeout] => {
                    (opts.ttl, opts.loop_wait, opts.retry_timeout) = (ttl, loop_wait, retry_timeout);
                    eprintln!("Patroni timings from PGFERRY_TEST_PATRONI_TIMINGS: ttl {ttl}, loop_wait {loop_wait}, retry_timeout {retry_timeout}");
                }
                _ => panic!("PGFERRY_TEST_PATRONI_TIMINGS={t:?}: expected ttl,loop_wait,retry_timeout"),
            }
        }
        match PatroniCitus::start(opts) {
            Ok(c) => Some(c),
            Err(e) => panic!("the Patroni Citus formation could not be started: {e:#}"),
        }
    }

    /// etcd, then every group in parallel (each: its first member until it
    /// holds the group's leader key, then the other members until they
    /// stream); then waits until the coordinator's `pg_dist_node` lists
    /// every worker group's leader, creates the standard users and checks
    /// node-to-node connections as `app`. Prints the startup time.
    pub fn start(opts: PatroniCitusOptions) -> Result<PatroniCitus> {
        if !citus_available() {
            bail!("{CITUS_SKIP_LINE}: {} is missing", citus_so_path().display());
        }
        let t0 = Instant::now();
        let user = pg_os_user()?;
        let etcd = Arc::new(Etcd::start()?);
        let scope = format!("ferrycitus-{}", unique_suffix());
        let dir = make_temp_dir("pgferry-patroni-citus")?;
        user.chown(&dir)?;
        let watchdog = Watchdog::spawn(
            &format!(
                "exec </dev/null >/dev/null 2>&1\nrm -rf {}\n",
                sh_quote(&dir.to_string_lossy())
            ),
            Some(user),
        )?;
        let pgpass = dir.join("pgpass");
        let mut text = String::new();
        for (name, password) in STANDARD_USERS {
            text.push_str(&format!("*:*:*:{name}:{password}\n"));
        }
        text.push_str(&format!("*:*:*:postgres:{PATRONI_SUPERUSER_PASSWORD}\n"));
        fs::write(&pgpass, text).context("writing pgpass")?;
        fs::set_permissions(&pgpass, fs::Permissions::from_mode(0o600))?;
        user.chown(&pgpass)?;

        let mut parameters = vec![
            ("citus.local_hostname".to_string(), "127.0.0.1".to_string()),
            ("citus.enable_statistics_collection".to_string(), "off".to_string()),
        ];
        parameters.extend(opts.parameters.iter().cloned());
        let group_opts = |g: u32| PatroniOptions {
            members: opts.members,
            ttl: opts.ttl,
            loop_wait: opts.loop_wait,
            retry_timeout: opts.retry_timeout,
            citus_group: Some(g),
            parameters: parameters.clone(),
            member_prefix: format!("g{g}m"),
            env: vec![("PGPASSFILE".to_string(), pgpass.to_string_lossy().into_owned())],
        };
        let results: Vec<Result<PatroniCluster>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..=opts.workers)
                .map(|g| {
                    let etcd = etcd.clone();
                    let o = group_opts(g);
                    let scope = scope.as_str();
                    s.spawn(move || {
                        PatroniCluster::start_in(etcd, scope, o).with_context(|| format!("Citus group {g}"))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("start thread panicked"))))
                .collect()
        });
        let mut groups = Vec::new();
        let mut first_err = None;
        for r in results {
            match r {
                Ok(c) => groups.push(c),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let mut formation = PatroniCitus {
            groups,
            etcd,
            scope,
            dir,
            startup: Duration::ZERO,
            user,
            watchdog: Some(watchdog),
        };
        if let Some(e) = first_err {
            return Err(e);
        }
        let t_groups = t0.elapsed();
        formation.wait_registered(START_TIMEOUT)?;
        let t_registered = t0.elapsed();
        formation.enable_synchronous_mode()?;
        formation.check_settings()?;
        formation.create_users()?;
        formation.check_node_to_node()?;
        formation.startup = t0.elapsed();
        eprintln!(
            "PatroniCitus: scope {} ({} groups x {} members) up in {:.1} s (groups streaming {:.1} s, \
             workers in pg_dist_node {:.1} s); leaders: {}",
            formation.scope,
            formation.groups.len(),
            opts.members,
            formation.startup.as_secs_f64(),
            t_groups.as_secs_f64(),
            t_registered.as_secs_f64(),
            formation.describe()
        );
        Ok(formation)
    }

    /// `/service/<scope>/`.
    pub fn prefix(&self) -> String {
        format!("/service/{}/", self.scope)
    }

    /// The cluster of group `g` (0 = coordinator).
    pub fn group(&self, g: u32) -> &PatroniCluster {
        &self.groups[g as usize]
    }

    /// Member names of group `g`.
    pub fn members(&self, g: u32) -> Vec<String> {
        self.group(g).member_names()
    }

    /// PostgreSQL port of member `name` of group `g`.
    pub fn pg_port(&self, g: u32, name: &str) -> u16 {
        self.group(g).pg_port(name)
    }

    /// `"127.0.0.1:PORT"` of member `name` of group `g`.
    pub fn addr(&self, g: u32, name: &str) -> String {
        format!("127.0.0.1:{}", self.pg_port(g, name))
    }

    /// The member named by `/service/<scope>/<g>/leader`, if any.
    pub fn leader(&self, g: u32) -> Result<Option<String>> {
        self.group(g).leader()
    }

    /// The PostgreSQL port of group `g`'s leader (error without a leader).
    pub fn leader_port(&self, g: u32) -> Result<u16> {
        let l = self.leader(g)?.ok_or_else(|| anyhow!("group {g} has no leader key"))?;
        Ok(self.pg_port(g, &l))
    }

    /// `(group, member)` owning PostgreSQL port `port`.
    pub fn member_by_port(&self, port: u16) -> Option<(u32, String)> {
        for (g, c) in self.groups.iter().enumerate() {
            for m in c.member_names() {
                if c.pg_port(&m) == port {
                    return Some((g as u32, m));
                }
            }
        }
        None
    }

    /// `g0: g0m1@PORT, g1: ...` (leaders per group).
    pub fn describe(&self) -> String {
        (0..self.groups.len() as u32)
            .map(|g| match self.leader(g) {
                Ok(Some(l)) => format!("g{g}: {l}@{}", self.pg_port(g, &l)),
                other => format!("g{g}: {other:?}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `sql` as superuser `postgres` on the coordinator leader, database
    /// `citus` (psql output: rows per line, `|` between columns).
    pub fn sql(&self, sql: &str) -> Result<String> {
        self.group(0).psql_leader(PATRONI_CITUS_DB, sql)
    }

    /// `sql` as `postgres` on group `g`'s leader, database `citus`.
    pub fn sql_on(&self, g: u32, sql: &str) -> Result<String> {
        self.group(g).psql_leader(PATRONI_CITUS_DB, sql)
    }

    /// Primary rows of the coordinator's `pg_dist_node`: `(groupid,
    /// nodeport)`, active ones only, sorted.
    pub fn dist_nodes(&self) -> Result<Vec<(u32, u16)>> {
        let out = self
            .sql("SELECT groupid, nodeport FROM pg_dist_node WHERE noderole = 'primary' AND isactive ORDER BY 1, 2")?;
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (g, p) = l.split_once('|').ok_or_else(|| anyhow!("bad row {l:?}"))?;
                Ok((g.parse()?, p.parse()?))
            })
            .collect()
    }

    /// Waits until the coordinator's `pg_dist_node` names every worker
    /// group's current leader (Patroni registers / updates them).
    pub fn wait_registered(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let want: Result<Vec<(u32, u16)>> = (1..self.groups.len() as u32)
                .map(|g| Ok((g, self.leader_port(g)?)))
                .collect();
            let have = self.dist_nodes();
            if let (Ok(want), Ok(have)) = (&want, &have) {
                if want.iter().all(|w| have.contains(w)) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "pg_dist_node does not list the worker leaders within {timeout:?}: want {want:?}, have \
                     {have:?}\n{}",
                    self.logs(30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `PATCH /config {"synchronous_mode": true}` on every group, then waits
    /// until each group's `sync` key names a standby. Without it a crashed
    /// leader's last acknowledged commits (not yet streamed) are lost on
    /// failover: measured 2 of 33276 acknowledged inserts.
    fn enable_synchronous_mode(&self) -> Result<()> {
        for (g, c) in self.groups.iter().enumerate() {
            let l = c.leader()?.ok_or_else(|| anyhow!("group {g} has no leader"))?;
            let (status, body) = c.rest(
                &l,
                "PATCH",
                "/config",
                Some(r#"{"synchronous_mode": true}"#),
                Duration::from_secs(10),
            )?;
            if status != 200 {
                bail!("PATCH /config on {l}: {status} {body}");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for g in 0..self.groups.len() {
            loop {
                let v = self.etcd.get(&format!("{}{g}/sync", self.prefix()))?;
                let ok = v
                    .as_deref()
                    .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
                    .is_some_and(|j| j["sync_standby"].is_string());
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("group {g}: no synchronous standby (sync key {v:?})\n{}", self.logs(20));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    fn check_settings(&self) -> Result<()> {
        for g in 0..self.groups.len() as u32 {
            let spl = self.sql_on(g, "SHOW shared_preload_libraries")?;
            if spl.split(',').next().is_none_or(|f| f.trim() != "citus") {
                bail!("group {g}: shared_preload_libraries = {spl:?}, citus is not first");
            }
        }
        Ok(())
    }

    /// The [`STANDARD_USERS`] (created on the coordinator, propagated by
    /// Citus), with CONNECT on `citus`; waits until every worker leader has
    /// them.
    fn create_users(&self) -> Result<()> {
        let mut sql = String::new();
        for (name, password) in STANDARD_USERS {
            sql.push_str(&create_role_sql(name, password));
            sql.push('\n');
        }
        self.sql(&sql)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        for g in 1..self.groups.len() as u32 {
            loop {
                let n = self.sql_on(
                    g,
                    "SELECT count(*) FROM pg_roles WHERE rolname IN ('app', 'admin', 'other')",
                )?;
                if n == "3" {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("group {g} does not have the standard roles (count {n})");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// `run_command_on_all_nodes` as `app` (SCRAM, its password from the
    /// formation's pgpass) from every group's leader.
    fn check_node_to_node(&self) -> Result<()> {
        for g in 0..self.groups.len() as u32 {
            let port = self.leader_port(g)?;
            let out = self.psql_as(
                port,
                "app",
                crate::APP_PASS,
                "SELECT count(*) FILTER (WHERE success), count(*), string_agg(result, '; ') FILTER (WHERE NOT success) \
                 FROM run_command_on_all_nodes('SELECT 1')",
            )?;
            let want = format!("{n}|{n}|", n = self.groups.len());
            if out != want {
                bail!("node-to-node connections as app from group {g} (port {port}): {out:?}, want {want:?}");
            }
        }
        Ok(())
    }

    /// `sql` through TCP on 127.0.0.1:`port` as `user` / `password`,
    /// database `citus` (`psql -X -A -t -q`, 30 s statement timeout).
    pub fn psql_as(&self, port: u16, user: &str, password: &str, sql: &str) -> Result<String> {
        let out = self
            .user
            .command(Path::new(PG_BIN).join("psql"))
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .env("PGOPTIONS", "-c statement_timeout=30000")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["-U", user, "-d", PATRONI_CITUS_DB, "-c", sql])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql as {user} on port {port} failed ({}): {}\nSQL: {sql}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A planned switchover of group `g` through REST `POST /switchover` on
    /// its leader (candidate: the first other member); waits until the
    /// leader key names the candidate. Returns `(old, new)`.
    pub fn switchover(&self, g: u32) -> Result<(String, String)> {
        let c = self.group(g);
        let old = c.leader()?.ok_or_else(|| anyhow!("group {g} has no leader"))?;
        let new = c
            .member_names()
            .into_iter()
            .find(|m| *m != old)
            .ok_or_else(|| anyhow!("group {g} has no other member"))?;
        c.switchover(&old, &new)?;
        Ok((old, new))
    }

    /// A node crash of group `g`'s leader: SIGKILL of its Patroni and its
    /// postmaster. Returns the killed member's name.
    pub fn crash_leader(&self, g: u32) -> Result<String> {
        let c = self.group(g);
        let old = c.leader()?.ok_or_else(|| anyhow!("group {g} has no leader"))?;
        c.kill_member(&old)?;
        Ok(old)
    }

    /// Waits until group `g`'s leader key names a member other than `not`.
    pub fn wait_for_leader(&self, g: u32, not: Option<&str>, timeout: Duration) -> Result<String> {
        self.group(g).wait_for_leader(not, timeout)
    }

    /// A users file for pgferry (`"name" "SCRAM secret"` per line) with
    /// `users`, secrets read from the coordinator's `pg_authid`.
    pub fn write_userlist(&self, path: &Path, users: &[&str]) -> Result<()> {
        let mut text = String::new();
        for u in users {
            let secret = self.sql(&format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{u}'"))?;
            if secret.is_empty() {
                bail!("no role {u}");
            }
            text.push_str(&format!("\"{u}\" \"{secret}\"\n"));
        }
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Log tails of every member of every group, and of etcd.
    pub fn logs(&self, lines: usize) -> String {
        let mut s = String::new();
        for c in &self.groups {
            for m in c.member_names() {
                s.push_str(&c.log_tail(&m, lines));
                s.push('\n');
            }
        }
        s.push_str(&self.etcd.log_tail(lines / 2));
        s
    }

    /// The OS user everything runs as.
    pub fn os_user(&self) -> &'static OsUser {
        self.user
    }
}

impl Drop for PatroniCitus {
    fn drop(&mut self) {
        // Each PatroniCluster prints its own logs when dropped in a panic.
        // Workers first, then the coordinator, then (last Arc) etcd.
        while let Some(c) = self.groups.pop() {
            drop(c);
        }
        if let Some(w) = self.watchdog.take() {
            w.fire();
        }
    }
}
