//! Command line.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use tokio_rustls::TlsConnector;

use crate::conn::ConnParams;
use crate::tls::{self, TlsOptions};

/// A lean PostgreSQL wire-protocol load generator: pre-encoded requests,
/// one write and reads up to ReadyForQuery per transaction, latencies in an
/// HDR histogram.
#[derive(Debug, Parser)]
#[command(name = "pgferry-loadtest", version)]
pub struct Args {
    /// A server to load, as NAME=HOST:PORT, or NAME=tls:HOST:PORT for TLS
    /// (SSLRequest, then a handshake; the certificate is not verified).
    /// Repeat to compare servers; the first one is the baseline of the
    /// summary's TPS ratio.
    #[arg(long = "target", value_name = "NAME=[tls:]HOST:PORT", value_parser = parse_target, required = true)]
    pub targets: Vec<Target>,

    /// Use TLS for every target.
    #[arg(long)]
    pub tls: bool,

    /// TLS key-exchange groups to offer, comma-separated rustls names
    /// (X25519MLKEM768, X25519, secp256r1, secp384r1). Default: all of
    /// aws-lc-rs's defaults.
    #[arg(long, value_delimiter = ',')]
    pub tls_groups: Vec<String>,

    /// Resume TLS sessions across connections (off: every connection pays a
    /// full handshake, as libpq clients do).
    #[arg(long)]
    pub tls_resume: bool,

    /// Process whose CPU time per transaction and RSS are reported for the
    /// target NAME (utime+stime of all its threads, from /proc).
    #[arg(long = "pid", value_name = "NAME=PID", value_parser = parse_pid)]
    pub pids: Vec<(String, u32)>,

    #[arg(long, default_value = "postgres")]
    pub user: String,

    /// Password for cleartext, md5 or SCRAM-SHA-256 authentication.
    #[arg(long, default_value = "", env = "PGPASSWORD", hide_env_values = true)]
    pub password: String,

    /// Database name (default: the user name).
    #[arg(long)]
    pub dbname: Option<String>,

    /// Concurrent client connections.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,

    #[arg(long, value_enum, default_value_t = WorkloadKind::SelectSimple)]
    pub workload: WorkloadKind,

    /// Measurement window of each (round, target).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Load before the measurement window starts (not recorded).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    #[arg(long, default_value_t = 3)]
    pub rounds: usize,

    /// Pause of each client between two transactions.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub think: Duration,

    /// Open loop: each client starts a transaction every 1/RATE seconds
    /// (its first at a random phase), whatever the previous one took.
    /// Latency counts from the scheduled start, so a stall shows in full
    /// (no coordinated omission). 0 = closed loop (with --think).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,

    /// Soak mode: run this long with --clients connections, of which
    /// --active-fraction send --rate transactions per second and the rest
    /// sit idle; every connection is replaced at --reconnect-rate per second
    /// on average. Prints a sample of throughput, latency, errors and each
    /// --pid process's RSS, descriptors and CPU every --sample.
    #[arg(long, value_parser = parse_duration)]
    pub soak: Option<Duration>,

    /// Soak: the share of clients that send transactions.
    #[arg(long, default_value_t = 0.2)]
    pub active_fraction: f64,

    /// Soak: the share of connections closed and opened again per second.
    #[arg(long, default_value_t = 0.01)]
    pub reconnect_rate: f64,

    /// Soak: the interval between two samples.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub sample: Duration,

    /// pgbench scale factor (accounts = scale * 100000, tellers = scale * 10,
    /// branches = scale). Default: counted from pgbench_branches.
    #[arg(long)]
    pub scale: Option<u64>,

    /// Number of pgbench_accounts rows to draw aids from (default: scale * 100000).
    #[arg(long)]
    pub pgbench_accounts: Option<u64>,

    /// Also print one JSON line per (round, target) result.
    #[arg(long)]
    pub json: bool,

    /// Idle-memory mode: open this many connections to each target, run one
    /// `SELECT 1` on each, hold them idle for --hold and report the RSS of
    /// every --pid process before and while they are held.
    #[arg(long)]
    pub idle_clients: Option<usize>,

    /// How long the idle connections are held.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hold: Duration,

    /// Idle mode: after the connections are closed, wait this long and
    /// print each --pid process's RSS again (memory given back).
    #[arg(long, value_parser = parse_duration)]
    pub after: Option<Duration>,

    /// Runtime worker threads of the generator (1 = single-threaded runtime).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,

    /// Connection attempts in flight at once while clients connect, so the
    /// server's listen backlog is not overrun.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,

    /// Limit for one connection's TCP connect plus authentication.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Allow targets outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    pub allow_remote: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// `SELECT abalance FROM pgbench_accounts WHERE aid = N` as a simple Query (pgbench -S).
    SelectSimple,
    /// Unnamed Parse/Bind/Describe/Execute/Sync per transaction (pgbench -S -M extended).
    SelectExtended,
    /// Named statement parsed once per connection, then Bind/Describe/Execute/Sync (pgbench -S -M prepared).
    SelectPrepared,
    /// pgbench's TPC-B-like transaction as one multi-statement simple Query.
    Write,
    /// Connect, authenticate, `SELECT 1`, Terminate per transaction.
    Connect,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::SelectSimple => "select-simple",
            WorkloadKind::SelectExtended => "select-extended",
            WorkloadKind::SelectPrepared => "select-prepared",
            WorkloadKind::Write => "write",
            WorkloadKind::Connect => "connect",
        }
    }

    /// Whether the workload reads pgbench's tables.
    pub fn uses_pgbench_tables(self) -> bool {
        !matches!(self, WorkloadKind::Connect)
    }
}

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub addr: SocketAddr,
    pub tls: bool,
}

fn parse_target(s: &str) -> Result<Target> {
    let (name, hostport) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("expected NAME=HOST:PORT, got {s:?}"))?;
    if name.is_empty() {
        bail!("empty target name in {s:?}");
    }
    let (tls, hostport) = match hostport.strip_prefix("tls:") {
        Some(rest) => (true, rest),
        None => (false, hostport),
    };
    let addr = hostport
        .to_socket_addrs()
        .with_context(|| format!("resolving {hostport:?}"))?
        .next()
        .ok_or_else(|| anyhow!("{hostport:?} resolves to no address"))?;
    Ok(Target {
        name: name.to_owned(),
        addr,
        tls,
    })
}

fn parse_pid(s: &str) -> Result<(String, u32)> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("expected NAME=PID, got {s:?}"))?;
    Ok((
        name.to_owned(),
        pid.parse().with_context(|| format!("bad PID in {s:?}"))?,
    ))
}

/// `10s`, `500ms`, `2m`, `1h`, `250us`; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => bail!("unknown duration unit {u:?} in {s:?}"),
    };
    Ok(Duration::from_secs_f64(secs))
}

impl Args {
    pub fn dbname(&self) -> &str {
        self.dbname.as_deref().unwrap_or(&self.user)
    }

    /// Whether connections to `t` use TLS.
    pub fn uses_tls(&self, t: &Target) -> bool {
        self.tls || t.tls
    }

    /// The TLS connector, when some target uses TLS (one for all of them).
    pub fn tls_connector(&self) -> Result<Option<TlsConnector>> {
        if !self.targets.iter().any(|t| self.uses_tls(t)) {
            return Ok(None);
        }
        let opts = TlsOptions {
            groups: self.tls_groups.clone(),
            resume: self.tls_resume,
        };
        tls::connector(&opts).map(Some)
    }

    /// Connection parameters for `t`; `tls` from [`Args::tls_connector`].
    pub fn conn_params(&self, t: &Target, tls: Option<&TlsConnector>) -> Arc<ConnParams> {
        let tls = if self.uses_tls(t) { tls.cloned() } else { None };
        ConnParams::new(
            t.addr,
            &self.user,
            &self.password,
            self.dbname(),
            self.connect_timeout,
            tls,
        )
    }

    pub fn pid_of(&self, target: &str) -> Option<u32> {
        self.pids.iter().find(|(n, _)| n == target).map(|(_, p)| *p)
    }

    pub fn validate(&self) -> Result<()> {
        for (name, _) in &self.pids {
            if !self.targets.iter().any(|t| &t.name == name) {
                bail!("--pid {name}=...: no --target named {name:?}");
            }
        }
        for (i, t) in self.targets.iter().enumerate() {
            if self.targets[..i].iter().any(|o| o.name == t.name) {
                bail!("target name {:?} given twice", t.name);
            }
            if !self.allow_remote && !t.addr.ip().is_loopback() {
                bail!(
                    "target {} ({}) is not a loopback address; pass --allow-remote to load it",
                    t.name,
                    t.addr
                );
            }
        }
        if self.clients == 0 && self.idle_clients.is_none() {
            bail!("--clients must be at least 1");
        }
        if self.threads == 0 || self.connect_concurrency == 0 {
            bail!("--threads and --connect-concurrency must be at least 1");
        }
        if self.rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a number of transactions per second, 0 or more");
        }
        if !(0.0..=1.0).contains(&self.active_fraction) || !(0.0..1.0).contains(&self.reconnect_rate) {
            bail!("--active-fraction must be within 0..=1 and --reconnect-rate within 0..1");
        }
        if self.soak.is_some() && (self.targets.len() != 1 || self.sample.is_zero()) {
            bail!("--soak loads one --target, sampled every --sample (> 0)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("0ms").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("3 weeks").is_err());
    }

    #[test]
    fn targets() {
        let t = parse_target("pgb=127.0.0.1:6432").unwrap();
        assert_eq!((t.name.as_str(), t.addr.port()), ("pgb", 6432));
        assert!(!t.tls);
        let t = parse_target("pgb-tls=tls:127.0.0.1:6433").unwrap();
        assert_eq!((t.name.as_str(), t.addr.port(), t.tls), ("pgb-tls", 6433, true));
        assert!(parse_target("127.0.0.1:6432").is_err());
        assert_eq!(parse_pid("pgb=42").unwrap(), ("pgb".to_owned(), 42));
    }
}
