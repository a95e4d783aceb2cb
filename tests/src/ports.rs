//! Free TCP ports for PostgreSQL and pgferry listeners.
//!
//! Ports are drawn at random from below the kernel's ephemeral range (so an
//! outgoing connection's source port can never take a port between the moment
//! it is handed out and the moment a server binds it), checked by binding
//! `127.0.0.1:port`, remembered in a process-wide set so that parallel tests
//! never get the same port, and reserved across processes with an advisory
//! `flock` on `/tmp/pgferry-test-ports/PORT` that the kernel drops when this
//! process exits.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

const LOCK_DIR: &str = "/tmp/pgferry-test-ports";
const LOWEST: u16 = 15000;

struct State {
    handed_out: HashSet<u16>,
    /// Open lock files; dropping them would release the reservations.
    locks: Vec<File>,
    rng: u64,
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Mutex::new(State {
            handed_out: HashSet::new(),
            locks: Vec::new(),
            rng: (nanos ^ (u64::from(std::process::id()) << 32)) | 1,
        })
    })
}

impl State {
    fn next_random(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The start of the kernel's ephemeral port range (default 32768).
fn ephemeral_low() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Takes an exclusive, non-blocking flock on `LOCK_DIR/port`. `Ok(None)` if
/// another live process holds it.
#[allow(unsafe_code)]
fn lock_port(port: u16) -> io::Result<Option<File>> {
    let dir = Path::new(LOCK_DIR);
    if !dir.is_dir() {
        fs::create_dir_all(dir)?;
        // Shared by every user that runs the tests; sticky like /tmp.
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o1777));
    }
    let path = dir.join(port.to_string());
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?,
        Err(e) => return Err(e),
    };
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// A TCP port on 127.0.0.1 that is free now and that no other caller in this
/// process (nor, while this process lives, another process using this
/// harness) will be handed. Panics if none can be found.
pub fn free_port() -> u16 {
    let mut st = state().lock().unwrap_or_else(|e| e.into_inner());
    let high = ephemeral_low().min(32768);
    if high > LOWEST + 1000 {
        let span = u64::from(high - LOWEST);
        for _ in 0..2000 {
            let port = LOWEST + (st.next_random() % span) as u16;
            if st.handed_out.contains(&port) || !bindable(port) {
                continue;
            }
            match lock_port(port) {
                Ok(Some(f)) => st.locks.push(f),
                Ok(None) => continue,
                // The lock directory is unusable: rely on the in-process set.
                Err(_) => {}
            }
            // The lock was taken after the bind check: check again.
            if !bindable(port) {
                continue;
            }
            st.handed_out.insert(port);
            return port;
        }
    }
    // Fallback: let the kernel choose.
    for _ in 0..1000 {
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding 127.0.0.1:0");
        if st.handed_out.insert(port) {
            return port;
        }
    }
    panic!("free_port: no free port found on 127.0.0.1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let set: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(set.len(), ports.len(), "duplicate ports: {ports:?}");
        let low = ephemeral_low();
        for p in ports {
            assert!(p < low, "port {p} is in the ephemeral range");
            TcpListener::bind(("127.0.0.1", p)).unwrap_or_else(|e| panic!("port {p}: {e}"));
        }
    }

    #[test]
    fn a_locked_port_is_not_locked_twice() {
        let p = free_port();
        // This process already holds the flock through `state().locks`; a
        // second open file description must not get it.
        assert!(lock_port(p).unwrap().is_none());
    }
}
