//! The unprivileged OS user that runs PostgreSQL.
//!
//! PostgreSQL refuses to run as root. When the tests run as root the harness
//! uses `$PGFERRY_TEST_OS_USER`, else `postgres`, else `pgferry-test`
//! (created with `useradd --system` if missing), and starts every PostgreSQL
//! program with that uid/gid. When the tests run as an ordinary user,
//! PostgreSQL simply runs as that user.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

use crate::cluster::PG_BIN;

/// The OS account PostgreSQL programs run as.
#[derive(Debug, Clone)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// True when the tests run as root and commands switch to `uid`/`gid`.
    pub switch: bool,
}

/// The OS user for PostgreSQL, resolved (and if need be created) once.
pub fn pg_os_user() -> Result<&'static OsUser> {
    static USER: OnceLock<std::result::Result<OsUser, String>> = OnceLock::new();
    USER.get_or_init(|| resolve().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("cannot find an unprivileged OS user for PostgreSQL: {e}"))
}

fn resolve() -> Result<OsUser> {
    let me = std::fs::metadata("/proc/self").context("stat /proc/self")?;
    if me.uid() != 0 {
        let out = Command::new("id").arg("-un").output().context("running id -un")?;
        return Ok(OsUser {
            name: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            uid: me.uid(),
            gid: me.gid(),
            switch: false,
        });
    }
    let mut candidates = Vec::new();
    if let Ok(name) = std::env::var("PGFERRY_TEST_OS_USER") {
        candidates.push(name);
    }
    candidates.push("postgres".into());
    candidates.push("pgferry-test".into());
    for name in &candidates {
        if let Some((uid, gid)) = lookup(name) {
            if uid == 0 {
                continue;
            }
            return Ok(OsUser {
                name: name.clone(),
                uid,
                gid,
                switch: true,
            });
        }
    }
    let name = "pgferry-test";
    let out = Command::new("useradd")
        .args(["--system", "--create-home", "--shell", "/usr/sbin/nologin", name])
        .output()
        .context("running useradd")?;
    // 9: the user exists (another test binary created it meanwhile).
    if !out.status.success() && out.status.code() != Some(9) {
        bail!(
            "useradd --system --create-home {name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let (uid, gid) = lookup(name).ok_or_else(|| anyhow!("user {name} not found after useradd"))?;
    Ok(OsUser {
        name: name.into(),
        uid,
        gid,
        switch: true,
    })
}

fn lookup(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id")
            .args([flag, name])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

impl OsUser {
    /// A command that runs as this user with a clean environment (no stray
    /// `PG*` variables): `PATH` starting with the PostgreSQL 15 binaries,
    /// `LC_ALL=C`, `PGCLIENTENCODING=UTF8`, cwd `/tmp`, stdin `/dev/null`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", format!("{PG_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"))
            .env("HOME", "/tmp")
            .env("LC_ALL", "C")
            .env("PGCLIENTENCODING", "UTF8")
            .current_dir("/tmp")
            .stdin(Stdio::null());
        if self.switch {
            c.uid(self.uid).gid(self.gid);
        }
        c
    }

    /// Gives `path` to this user (a no-op when not running as root).
    pub fn chown(&self, path: &Path) -> Result<()> {
        if self.switch {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
                .with_context(|| format!("chown {} to {}", path.display(), self.name))?;
        }
        Ok(())
    }
}
