//! The logged-in clients: each one's cancel key, where its query runs, and
//! what the console shows and acts on (SHOW CLIENTS, KILL_CLIENT, KILL).
//!
//! Each client gets a random pgferry BackendKeyData; a CancelRequest
//! carrying it is forwarded, with the server's own key, to the server
//! connection running that client's query at that moment.

use atomic_waker::AtomicWaker;
use pgferry_pool::NodeAddr;
use pgferry_routing::Role;
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};
use tokio::io::AsyncWriteExt;

/// What a client is, fixed at login.
///
/// Strings as `Box<str>` (no spare capacity field): with the rest of the
/// entry this keeps `Arc<ClientEntry>` in the slab's 256-byte class, and it
/// is held for every client, idle or not.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub user: Box<str>,
    pub database: Box<str>,
    pub peer: SocketAddr,
    pub port: Role,
    pub connected: SystemTime,
    /// "TLSv1.3/TLS13_AES_256_GCM_SHA384"-style, or empty.
    pub tls: Box<str>,
    pub application_name: Box<str>,
}

/// Where a client's query currently runs.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: Arc<NodeAddr>,
    pub pid: u32,
    pub key: u32,
    /// pgferry's id of that server connection (SHOW CLIENTS' link) and
    /// when it was opened (SHOW SERVERS).
    pub server: u64,
    pub server_created: Instant,
}

/// A client's entry: its key, its current target and what SHOW CLIENTS
/// prints.
#[derive(Debug)]
pub struct ClientEntry {
    pub pid: u32,
    pub key: u32,
    pub info: ClientInfo,
    /// The cancel key of the server most recently linked, current while
    /// `link` says linked. Replaced (under the lock) only when the client
    /// gets a different server: linking and unlinking are atomic stores,
    /// not a lock and a reference count per transaction.
    target: Mutex<Option<CancelTarget>>,
    /// pgferry's id of the server `target` holds, shifted left, with bit 0
    /// set while that server runs the client's queries. Written by the
    /// session only.
    link: AtomicU64,
    /// When the client last got a server (request_time), in microseconds
    /// since `epoch()`.
    linked_since: AtomicU64,
    /// Since when the client has been waiting for a server connection, in
    /// microseconds since `epoch()` plus one; 0 while it is not. Atomic:
    /// set and cleared on every wait for a server connection.
    waiting_since: AtomicU64,
    /// KILL_CLIENT / KILL db: the session ends as soon as it sees this.
    killed: AtomicBool,
    /// The session task, woken by a kill. Registering is a couple of atomic
    /// operations per wait (a `Notify` would take a lock each time).
    kill_waker: AtomicWaker,
    /// Parking (see `park.rs`): how many idle sweeps in a row found no
    /// client traffic, or one of the `PARK_*` states.
    idle: AtomicU8,
}

/// Sweeps without traffic before a client is asked to park: with sweeps
/// every `park_idle_after / 2`, it has been idle for 1 to 1.5 times that.
const PARK_AFTER_SWEEPS: u8 = 3;
/// The sweeper asked the session to park; it has not answered yet.
const PARK_ASKED: u8 = 253;
/// The session could not park (TLS, a server held, ...): not asked again
/// until the client sends something.
const PARK_DECLINED: u8 = 254;
/// The client is parked.
const PARKED: u8 = 255;

/// The process's reference instant for `waiting_since`.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn micros_since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_micros() as u64
}

/// Why a session was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// KILL_CLIENT / KILL db.
    Killed,
    /// pgferry started shutting down.
    Drain,
    /// The client has been idle for `park_idle_after`: park if possible.
    Park,
}

/// A snapshot of one client for the console.
pub struct ClientRow {
    pub server: Option<CancelTarget>,
    pub request_age: std::time::Duration,
    /// How long it has been waiting for a server, if it is.
    pub waiting: Option<std::time::Duration>,
}

impl ClientEntry {
    /// Links the client to the server `server` running its queries
    /// (`since`: when it got it); `target` makes its cancel key, needed
    /// only when the client last had another server.
    pub fn set_target(&self, server: u64, since: Instant, target: impl FnOnce() -> CancelTarget) {
        if self.link.load(Relaxed) >> 1 != server {
            *self.target.lock().unwrap() = Some(target());
        }
        self.linked_since.store(micros_since_epoch(since), Relaxed);
        // Release: a reader that sees the link sees the target stored above.
        self.link.store(server << 1 | 1, Release);
    }

    /// The client has no server now.
    pub fn clear_target(&self) {
        let v = self.link.load(Relaxed);
        if v & 1 == 1 {
            self.link.store(v & !1, Release);
        }
    }

    /// The server running the client's queries now, if any.
    fn current_target(&self) -> Option<CancelTarget> {
        let v = self.link.load(Acquire);
        if v & 1 == 0 {
            return None;
        }
        let id = v >> 1;
        // A different server linked meanwhile: its id does not match.
        let t = self
            .target
            .lock()
            .unwrap()
            .as_ref()
            .filter(|t| t.server == id)
            .cloned()?;
        // Still linked after the copy: the key was current at that instant,
        // as when a lock guarded both (what is left is the race between
        // the end of the transaction and the cancel reaching the server,
        // which PostgreSQL's protocol has too).
        (self.link.load(Acquire) == v).then_some(t)
    }

    pub fn set_waiting(&self, waiting: bool) {
        if waiting {
            self.set_waiting_since(Instant::now());
        } else {
            self.waiting_since.store(0, Relaxed);
        }
    }

    /// Waiting since `t` (a time the caller already read: no clock read).
    pub fn set_waiting_since(&self, t: Instant) {
        let v = t.saturating_duration_since(epoch()).as_micros() as u64 + 1;
        self.waiting_since.store(v, Relaxed);
    }

    pub fn row(&self) -> ClientRow {
        let since = self.waiting_since.load(Relaxed);
        let waiting = (since > 0).then(|| {
            let now = epoch().elapsed().as_micros() as u64 + 1;
            std::time::Duration::from_micros(now.saturating_sub(since))
        });
        let since = epoch() + std::time::Duration::from_micros(self.linked_since.load(Relaxed));
        ClientRow {
            server: self.current_target(),
            request_age: since.elapsed(),
            waiting,
        }
    }

    /// Ends the client's session (the session sends 57P01 and closes).
    pub fn kill(&self) {
        self.killed.store(true, Release);
        self.kill_waker.wake();
    }

    /// Wakes the session to look at pgferry's state (a drain started).
    pub fn nudge(&self) {
        self.kill_waker.wake();
    }

    /// The client sent something: it is not idle. One load per read; the
    /// store only when a sweep counted it idle.
    pub fn touch(&self) {
        if self.idle.load(Relaxed) != 0 {
            self.idle.store(0, Relaxed);
        }
    }

    /// The session parked (`true`) or could not (`false`).
    pub fn parked(&self, parked: bool) {
        self.idle.store(if parked { PARKED } else { PARK_DECLINED }, Relaxed);
    }

    /// One idle sweep: counts a sweep without traffic, and asks the
    /// session to park after `PARK_AFTER_SWEEPS` of them. A session that
    /// sent something in between has reset the count (`touch`), and the
    /// exchange fails: it is simply not counted this time.
    fn sweep(&self) -> bool {
        let n = self.idle.load(Relaxed);
        if n >= PARK_ASKED {
            return false;
        }
        let next = if n + 1 >= PARK_AFTER_SWEEPS { PARK_ASKED } else { n + 1 };
        if self.idle.compare_exchange(n, next, Relaxed, Relaxed).is_err() || next != PARK_ASKED {
            return false;
        }
        self.kill_waker.wake();
        true
    }

    /// Registers `waker` for this client's signals. Ready when one is
    /// already due (a parked client is then resumed at once).
    pub fn register_signal(&self, waker: &std::task::Waker, draining: &AtomicBool) -> bool {
        let mut cx = Context::from_waker(waker);
        self.poll_signal(&mut cx, true, draining).is_ready()
    }

    /// Ready when the client is killed, or, if `watch_drain`, when
    /// `draining` is set (checked on every wakeup: `nudge` after setting it).
    /// Otherwise registers the waker, so a kill or a nudge wakes the task.
    pub fn poll_signal(&self, cx: &mut Context<'_>, watch_drain: bool, draining: &AtomicBool) -> Poll<Signal> {
        let check = || {
            if self.killed.load(Acquire) {
                Some(Signal::Killed)
            } else if watch_drain && draining.load(Acquire) {
                Some(Signal::Drain)
            } else if self.idle.load(Relaxed) == PARK_ASKED {
                Some(Signal::Park)
            } else {
                None
            }
        };
        if let Some(s) = check() {
            return Poll::Ready(s);
        }
        self.kill_waker.register(cx.waker());
        // A signal between the check and the registration woke nobody.
        match check() {
            Some(s) => Poll::Ready(s),
            None => Poll::Pending,
        }
    }
}

#[derive(Default)]
pub struct ClientRegistry {
    map: Mutex<HashMap<u32, Arc<ClientEntry>>>,
}

/// A client's registration; removes the entry when the client goes away.
pub struct ClientGuard {
    reg: Arc<ClientRegistry>,
    pub entry: Arc<ClientEntry>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.reg.map.lock().unwrap().remove(&self.entry.pid);
    }
}

impl ClientRegistry {
    /// Registers a new client under a fresh random (pid, key).
    pub fn register(self: &Arc<Self>, info: ClientInfo) -> ClientGuard {
        let mut rng = rand::thread_rng();
        let mut map = self.map.lock().unwrap();
        loop {
            // Positive pids, like PostgreSQL's, for clients that print them.
            let pid = rng.gen_range(1..=i32::MAX as u32);
            if map.contains_key(&pid) {
                continue;
            }
            let entry = Arc::new(ClientEntry {
                pid,
                key: rng.gen(),
                info,
                target: Mutex::new(None),
                link: AtomicU64::new(0),
                linked_since: AtomicU64::new(micros_since_epoch(Instant::now())),
                waiting_since: AtomicU64::new(0),
                killed: AtomicBool::new(false),
                kill_waker: AtomicWaker::new(),
                idle: AtomicU8::new(0),
            });
            map.insert(pid, entry.clone());
            return ClientGuard {
                reg: self.clone(),
                entry,
            };
        }
    }

    /// Forwards a cancel request. Unknown keys are ignored silently, as
    /// PostgreSQL does, so that keys cannot be probed.
    pub async fn cancel(&self, pid: u32, key: u32, tls: &pgferry_tls::Connector) -> bool {
        let target = {
            let map = self.map.lock().unwrap();
            match map.get(&pid) {
                // The pid is public, the key is the secret: both must match.
                Some(e) if e.key == key => e.current_target(),
                _ => None,
            }
        };
        let Some(t) = target else { return false };
        send_cancel(&t, tls).await.is_ok()
    }

    /// Every logged-in client, in login order.
    pub fn all(&self) -> Vec<Arc<ClientEntry>> {
        let mut v: Vec<_> = self.map.lock().unwrap().values().cloned().collect();
        v.sort_by_key(|e| e.info.id);
        v
    }

    /// Ends the sessions of the clients `which` selects (they get 57P01);
    /// returns how many.
    pub fn kill(&self, which: impl Fn(&ClientInfo) -> bool) -> usize {
        let map = self.map.lock().unwrap();
        let mut n = 0;
        for e in map.values().filter(|e| which(&e.info)) {
            e.kill();
            n += 1;
        }
        n
    }

    /// One idle sweep over every client (see `ClientEntry::sweep`);
    /// returns how many were asked to park. A few nanoseconds per client,
    /// under the registry's lock.
    pub fn sweep_idle(&self) -> usize {
        self.map.lock().unwrap().values().filter(|e| e.sweep()).count()
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sends a CancelRequest to a server, over TLS when server connections use
/// it (the key is a secret).
pub async fn send_cancel(t: &CancelTarget, tls: &pgferry_tls::Connector) -> std::io::Result<()> {
    let work = async {
        let s = tokio::net::TcpStream::connect((t.addr.host.as_str(), t.addr.port)).await?;
        let mut s = pgferry_pool::server::negotiate_tls(s, &t.addr.host, tls)
            .await
            .map_err(std::io::Error::other)?;
        let mut b = bytes::BytesMut::with_capacity(16);
        pgferry_protocol::encode::cancel_request(&mut b, t.pid, t.key);
        s.write_all(&b).await?;
        s.shutdown().await
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel request timed out"))?
}

#[cfg(test)]
mod tests {
    /// Every client holds one entry, parked or not: an `Arc<ClientEntry>`
    /// (two counters more) must stay within the slab's 256-byte class.
    #[test]
    fn entry_fits_its_slab_class() {
        assert!(std::mem::size_of::<super::ClientEntry>() + 16 <= 256);
    }

    /// The cancel key follows the server linked now: none between
    /// transactions, the new one after a change, and the stored key is
    /// made only when the server differs from the last one.
    #[test]
    fn cancel_target_follows_the_linked_server() {
        use super::*;
        let reg = Arc::new(ClientRegistry::default());
        let g = reg.register(ClientInfo {
            id: 1,
            user: "u".into(),
            database: "d".into(),
            peer: "127.0.0.1:1".parse().unwrap(),
            port: Role::ReadWrite,
            connected: SystemTime::now(),
            tls: "".into(),
            application_name: "".into(),
        });
        let e = &g.entry;
        let target = |server: u64| CancelTarget {
            addr: Arc::new(NodeAddr {
                host: "h".into(),
                port: 1,
            }),
            pid: server as u32 * 10,
            key: 7,
            server,
            server_created: Instant::now(),
        };
        let current = |e: &ClientEntry| e.current_target().map(|t| (t.server, t.pid));
        assert_eq!(current(e), None, "no server at login");
        let mut made = 0;
        e.set_target(3, Instant::now(), || {
            made += 1;
            target(3)
        });
        assert_eq!(current(e), Some((3, 30)));
        assert_eq!(e.row().server.map(|t| t.server), Some(3));
        e.clear_target();
        assert_eq!(current(e), None, "released: nothing to cancel");
        assert!(e.row().server.is_none());
        e.set_target(3, Instant::now(), || {
            made += 1;
            target(3)
        });
        assert_eq!(current(e), Some((3, 30)));
        assert_eq!(made, 1, "the same server again: its key is kept, not made again");
        e.clear_target();
        e.set_target(4, Instant::now(), || {
            made += 1;
            target(4)
        });
        assert_eq!(current(e), Some((4, 40)));
        assert_eq!(made, 2);
        // A reader that saw server 4 linked while the stored key is
        // already another server's (the session relinked in between)
        // gets nothing, never the other server's key.
        *e.target.lock().unwrap() = Some(target(5));
        assert_eq!(current(e), None, "the stored key is not the linked server's");
        *e.target.lock().unwrap() = Some(target(4));
        assert_eq!(current(e), Some((4, 40)));
    }
}
