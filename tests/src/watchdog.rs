//! Cleanup that survives the test process.
//!
//! A watchdog is a detached `sh` (its own process group, so a Ctrl-C aimed at
//! `cargo test` does not reach it) whose stdin is a pipe from the test
//! process. It blocks in `read`:
//!
//! * a line on the pipe (`disarm`) makes it exit without doing anything;
//! * end-of-file runs the cleanup script. The kernel closes the pipe when the
//!   test process ends, however it ends (normal exit with statics never
//!   dropped, panic, abort, SIGKILL), and [`Watchdog::fire`] closes it on
//!   purpose. The pipe's write end is close-on-exec, so servers started by
//!   the test do not keep it open.
//!
//! Reading a pipe, unlike polling a pid with `kill -0`, cannot be fooled by pid
//! reuse and needs no permission on the test process (the cluster's watchdog
//! runs as the unprivileged PostgreSQL user).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::{Context, Result};

use crate::osuser::OsUser;

#[derive(Debug)]
pub(crate) struct Watchdog {
    stdin: Option<ChildStdin>,
    child: Child,
}

impl Watchdog {
    /// Starts a watchdog that runs `cleanup` (sh) once the test process is
    /// gone, as `user` if given.
    pub(crate) fn spawn(cleanup: &str, user: Option<&OsUser>) -> Result<Watchdog> {
        let script = format!("if read -r _line; then exit 0; fi\n{cleanup}\n");
        let mut cmd = match user {
            Some(u) => u.command("/bin/sh"),
            None => Command::new("/bin/sh"),
        };
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let mut child = cmd.spawn().context("starting the cleanup watchdog (sh)")?;
        let stdin = child.stdin.take();
        Ok(Watchdog { stdin, child })
    }

    /// Runs the cleanup now and waits for it to finish.
    pub(crate) fn fire(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }

    /// Stops the watchdog without running the cleanup.
    pub(crate) fn disarm(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"disarm\n");
        }
        let _ = self.child.wait();
    }
}
