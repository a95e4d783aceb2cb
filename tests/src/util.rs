//! Small helpers shared by the harness modules.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

/// The last `lines` lines of a (log) file, or a note saying why there are none.
pub fn tail_file(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            if all.is_empty() {
                format!("({} is empty)", path.display())
            } else {
                all[start..].join("\n")
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// `--- last lines of FILE ---\n...` for error messages.
pub(crate) fn log_section(path: &Path, lines: usize) -> String {
    format!(
        "--- last {lines} lines of {} ---\n{}\n--- end of {} ---",
        path.display(),
        tail_file(path, lines),
        path.display()
    )
}

/// A fresh, empty directory `/tmp/{prefix}-{pid}-{n}-{nanos}` (mode 0700).
///
/// `/tmp` rather than `$TMPDIR`: the unprivileged PostgreSQL user must be
/// able to reach it.
pub(crate) fn make_temp_dir(prefix: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    use std::os::unix::fs::DirBuilderExt;
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = PathBuf::from(format!("/tmp/{prefix}-{}-{n}-{nanos:09}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("could not create a fresh directory /tmp/{prefix}-*")
}

/// Single-quotes `s` for `sh`.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `"name"` for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'literal'` for SQL (standard_conforming_strings = on).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A libpq / tokio-postgres connection string to `127.0.0.1:port` with
/// `sslmode=disable`.
pub fn conn_str(port: u16, user: &str, password: &str, db: &str) -> String {
    fn val(v: &str) -> String {
        if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
            v.to_string()
        } else {
            format!("'{}'", v.replace('\\', r"\\").replace('\'', r"\'"))
        }
    }
    format!(
        "host=127.0.0.1 port={port} user={} password={} dbname={} sslmode=disable",
        val(user),
        val(password),
        val(db)
    )
}

/// True if something accepts TCP connections on `127.0.0.1:port`.
pub fn port_accepts(port: u16) -> bool {
    addr_accepts(SocketAddr::from(([127, 0, 0, 1], port)))
}

pub(crate) fn addr_accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Runs `cmd` to completion; a non-zero exit is an error carrying its output.
pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(anyhow!(
            "{what} failed ({}): {:?} {:?}\nstderr:\n{}\nstdout:\n{}",
            out.status,
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim_end(),
            String::from_utf8_lossy(&out.stdout).trim_end()
        ));
    }
    Ok(out)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (capped at
/// `/proc/sys/fs/nr_open`, above which Linux refuses it), for this process
/// and the children it starts afterwards. Returns the new soft limit.
pub fn raise_nofile() -> Result<u64> {
    rlimit::increase_nofile_limit(nr_open()).context("raising RLIMIT_NOFILE")
}

fn nr_open() -> u64 {
    fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u64::MAX)
}

/// Sends signal `sig` to process `pid`.
#[allow(unsafe_code)]
pub(crate) fn send_signal(pid: u32, sig: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SQL creating a login role with a SCRAM-SHA-256 verifier for `password`.
pub fn create_role_sql(name: &str, password: &str) -> String {
    format!(
        "SET password_encryption = 'scram-sha-256';\nCREATE ROLE {} LOGIN PASSWORD {};",
        quote_ident(name),
        quote_literal(password)
    )
}

/// SQL creating database `name` owned by `owner`.
pub fn create_database_sql(name: &str, owner: &str) -> String {
    format!("CREATE DATABASE {} OWNER {};", quote_ident(name), quote_ident(owner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_str_quotes_only_when_needed() {
        assert_eq!(
            conn_str(6432, "app", "app-pass", "app"),
            "host=127.0.0.1 port=6432 user=app password=app-pass dbname=app sslmode=disable"
        );
        assert_eq!(
            conn_str(1, "a b", "it's", ""),
            r"host=127.0.0.1 port=1 user='a b' password='it\'s' dbname='' sslmode=disable"
        );
    }

    #[test]
    fn sql_quoting() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn tail_file_keeps_last_lines() {
        let dir = make_temp_dir("pgferry-util-test").unwrap();
        let f = dir.join("log");
        fs::write(&f, "1\n2\n3\n4\n").unwrap();
        assert_eq!(tail_file(&f, 2), "3\n4");
        assert_eq!(tail_file(&f, 10), "1\n2\n3\n4");
        assert!(tail_file(&dir.join("missing"), 3).contains("cannot read"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn raise_nofile_reaches_hard_limit() {
        let soft = raise_nofile().unwrap();
        let (cur, hard) = rlimit::Resource::NOFILE.get().unwrap();
        assert_eq!(cur, soft);
        assert_eq!(cur, hard.min(nr_open()), "the soft limit reaches the hard limit");
    }
}
