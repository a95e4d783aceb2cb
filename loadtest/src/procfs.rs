//! Process accounting from /proc (CPU time, RSS) and the process-level
//! settings of the generator itself (file-descriptor limit, SIGPIPE).

use anyhow::{anyhow, Context, Result};

/// User plus system CPU time of a process (all its threads), in µs.
pub fn cpu_micros(pid: u32) -> Result<u64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks = parse_stat_cpu_ticks(&stat).ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    Ok(ticks * 1_000_000 / clock_ticks_per_second())
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line. The command
/// name (field 2) may contain spaces and parentheses, so fields are counted
/// from the last ')'.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // rest starts at field 3 (state): utime is field 14, i.e. index 11.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size (VmRSS) of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_vm_rss(&status).ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

#[allow(unsafe_code)]
fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Restores the default SIGPIPE action, so that `pgferry-loadtest | head`
/// ends quietly instead of panicking on a closed stdout.
#[allow(unsafe_code)]
pub fn default_sigpipe() {
    // SAFETY: installs the default disposition; no handler code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the new soft
/// limit: every client is a socket.
pub fn raise_nofile_limit() -> Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")
}

/// Open file descriptors of a process (entries of /proc/PID/fd).
pub fn fd_count(pid: u32) -> Result<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).with_context(|| format!("reading /proc/{pid}/fd"))?;
    Ok(dir.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let s = "1234 (a b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 1 0 5 1000 10 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(s), Some(281));
    }

    #[test]
    fn rss_field() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t   12345 kB\nRssAnon: 1 kB\n"),
            Some(12345)
        );
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        cpu_micros(me).unwrap();
    }
}
