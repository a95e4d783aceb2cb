//! Parked clients: idle clients that hold no task.
//!
//! A logged-in client waiting between transactions costs a task, its
//! session's future, the session, and a registration in tokio's reactor:
//! about 3 KiB. Most of that only matters while it works. A plain-TCP client
//! idle for `park_idle_after` is therefore parked: its session keeps only
//! what spans transactions (`session::Parked`: parameters, named
//! statements, registry entry), its socket leaves tokio's reactor for an
//! epoll set shared by the event loop, and its task ends. When the socket
//! becomes readable (a request, or the client leaving), when the client is
//! signalled (KILL, a drain) or when its idle timeout fires, the session is
//! rebuilt and a new task runs it from where it stopped.
//!
//! Who asks a client to park: `sweep`, which counts quiet intervals per
//! client in the registry (`ClientEntry::sweep`); a session counts its own
//! traffic with one atomic load per read (`ClientEntry::touch`). The
//! session decides: only with nothing in flight or buffered and no server
//! held (`Session::parkable`).
//!
//! One parker per event-loop thread, made on first use: a thread-per-core
//! loop resumes its clients on itself.

use crate::session::{Parked, Session};
use crate::shared::Shared;
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::task::JoinHandle;

/// Clients parked now, and parked since start (all event loops): for
/// `/metrics`.
static PARKED: AtomicUsize = AtomicUsize::new(0);
static PARKS: AtomicU64 = AtomicU64::new(0);

/// (clients parked now, parkings since start).
pub fn stats() -> (usize, u64) {
    (PARKED.load(Relaxed), PARKS.load(Relaxed))
}

/// Generations are 24-bit (see `slot_waker`).
const GEN_MASK: u32 = 0xff_ffff;

/// Ready sockets taken per `epoll_wait`.
const BATCH: usize = 256;
/// How often parked clients' idle timeouts are checked (PgBouncer checks
/// its timeouts once a second too).
const TIMEOUT_CHECK: Duration = Duration::from_secs(1);

/// One event loop's parked clients.
struct Parker {
    /// Its place in `PARKERS`.
    number: usize,
    epoll: AsyncFd<OwnedFd>,
    slots: Mutex<Slots>,
    /// Clients signalled (KILL, drain) since the watcher last looked.
    signalled: Mutex<Vec<Key>>,
    notify: Notify,
}

/// A parked client's place: its index in `Slots`, and the generation that
/// tells a stale wake-up (for a client already resumed) from a live one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    index: u32,
    gen: u32,
}

impl Key {
    fn to_u64(self) -> u64 {
        (self.gen as u64) << 32 | self.index as u64
    }

    fn from_u64(v: u64) -> Key {
        Key {
            index: v as u32,
            gen: (v >> 32) as u32,
        }
    }
}

/// A parked client, as the table sees it.
type Client = (Parked, OwnedSemaphorePermit);

/// What the table needs to know of an entry: when its idle timeout fires.
trait Deadline {
    fn deadline(&self) -> Option<tokio::time::Instant>;
}

impl Deadline for Client {
    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.0.deadline()
    }
}

/// The parked clients, stored inline (one allocation for all of them).
struct Slots<T = Client> {
    entries: Vec<Slot<T>>,
    free: Vec<u32>,
    /// Generations only go up, even when the table is emptied: an old key
    /// never matches a later client.
    next_gen: u32,
    parked: usize,
    /// Parked clients with an idle timeout running.
    timed: usize,
}

struct Slot<T> {
    gen: u32,
    client: Option<T>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            entries: Vec::new(),
            free: Vec::new(),
            next_gen: 0,
            parked: 0,
            timed: 0,
        }
    }
}

impl<T: Deadline> Slots<T> {
    fn insert(&mut self, client: T) -> Key {
        self.parked += 1;
        self.timed += client.deadline().is_some() as usize;
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push(Slot { gen: 0, client: None });
                (self.entries.len() - 1) as u32
            }
        };
        // 24 bits: what a waker's word has room for.
        self.next_gen = (self.next_gen + 1) & GEN_MASK;
        let s = &mut self.entries[index as usize];
        s.gen = self.next_gen;
        s.client = Some(client);
        Key { index, gen: s.gen }
    }

    /// The client under `key`, unless it was taken already (a stale key).
    fn take(&mut self, key: Key) -> Option<T> {
        let s = self.entries.get_mut(key.index as usize)?;
        if s.gen != key.gen {
            return None;
        }
        let c = s.client.take()?;
        self.parked -= 1;
        self.timed -= c.deadline().is_some() as usize;
        self.free.push(key.index);
        if self.parked == 0 {
            // Everyone left: give the table's memory back.
            *self = Slots {
                next_gen: self.next_gen,
                ..Slots::default()
            };
        }
        Some(c)
    }

    /// Every parked client.
    fn keys(&self) -> Vec<Key> {
        self.keys_where(|_| true)
    }

    /// Clients whose idle timeout has passed.
    fn expired(&self, now: tokio::time::Instant) -> Vec<Key> {
        self.keys_where(|c| c.deadline().is_some_and(|d| d <= now))
    }

    fn keys_where(&self, f: impl Fn(&T) -> bool) -> Vec<Key> {
        (self.entries.iter().enumerate())
            .filter(|(_, s)| s.client.as_ref().is_some_and(&f))
            .map(|(i, s)| Key {
                index: i as u32,
                gen: s.gen,
            })
            .collect()
    }
}

/// Every parker made (one per event loop), so that a waker can name its
/// parker by number: a parked client's waker is then a plain word, with no
/// allocation per client.
static PARKERS: Mutex<Vec<Weak<Parker>>> = Mutex::new(Vec::new());

/// A parked client's waker: what its registry entry calls on KILL or a
/// drain, in place of its (ended) task's waker. Its data word is the
/// parker's number (16 bits), and the client's index and generation (24
/// bits each) in it; the watcher checks the generation against the slot's,
/// so a stale wake-up resumes nobody.
#[allow(unsafe_code)]
mod slot_waker {
    use super::{Key, GEN_MASK, PARKERS};
    use std::task::{RawWaker, RawWakerVTable, Waker};

    const VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, drop);

    pub fn new(parker: usize, key: Key) -> Option<Waker> {
        if parker >= 1 << 16 || key.index >= 1 << 24 {
            return None;
        }
        let word = parker << 48 | (key.index as usize) << 24 | key.gen as usize;
        // SAFETY: the data is a plain integer, never dereferenced; the
        // vtable's functions only decode it.
        Some(unsafe { Waker::from_raw(RawWaker::new(word as *const (), &VTABLE)) })
    }

    fn clone(data: *const ()) -> RawWaker {
        RawWaker::new(data, &VTABLE)
    }

    fn wake(data: *const ()) {
        let word = data as usize;
        let parker = PARKERS.lock().unwrap().get(word >> 48).and_then(|w| w.upgrade());
        if let Some(p) = parker {
            // No lock of the parker's table here: `park` holds it while it
            // registers this waker, and a concurrent wake-up may run right
            // there. The watcher checks the generation.
            p.signal(Key {
                index: (word >> 24) as u32 & 0xff_ffff,
                gen: word as u32 & GEN_MASK,
            });
        }
    }

    fn drop(_: *const ()) {}
}

thread_local! {
    /// This thread's parker and its watcher task (remade if that task's
    /// runtime has gone, as in tests that start one per test).
    static PARKER: RefCell<Option<(Arc<Parker>, JoinHandle<()>)>> = const { RefCell::new(None) };
}

fn current() -> io::Result<Arc<Parker>> {
    PARKER.with(|cell| {
        let mut cell = cell.borrow_mut();
        if let Some((p, task)) = &*cell {
            if !task.is_finished() {
                return Ok(p.clone());
            }
        }
        let p = Parker::new()?;
        let task = tokio::spawn(watch(p.clone()));
        *cell = Some((p.clone(), task));
        Ok(p)
    })
}

/// Parks a client (its task ends after this). Should parking fail, the
/// client is resumed at once and nothing is lost.
pub fn park(p: Parked, slot: OwnedSemaphorePermit) {
    let parker = match current() {
        Ok(parker) => parker,
        Err(e) => {
            tracing::warn!(error = %e, "cannot park clients (epoll); client kept running");
            return resume(p, slot);
        }
    };
    let fd = p.stream.as_raw_fd();
    let entry = p.entry().clone();
    let lifecycle = p.lifecycle().clone();
    PARKED.fetch_add(1, Relaxed);
    PARKS.fetch_add(1, Relaxed);
    // All three steps under the table's lock: the watcher (possibly on
    // another thread) cannot resume the client half-parked, with its
    // socket not yet in the epoll set or its old waker still registered.
    let mut slots = parker.slots.lock().unwrap();
    let key = slots.insert((p, slot));
    // Signals: from here on a KILL or a drain resumes the client, and one
    // that came just before is seen by the registration's own check.
    let signalled = match slot_waker::new(parker.number, key) {
        Some(waker) => entry.register_signal(&waker, lifecycle.draining()),
        // Beyond 16 million parked clients on one loop: resumed at once.
        None => true,
    };
    // The socket, level-triggered: bytes that arrived before this call are
    // reported at once.
    let added = epoll::add(parker.epoll.as_raw_fd(), fd, key.to_u64());
    drop(slots);
    if let Err(e) = &added {
        tracing::warn!(error = %e, "cannot park a client; resumed");
    }
    if signalled || added.is_err() {
        parker.signal(key);
    }
}

/// Runs a parked client's session again, in a new task.
fn resume(p: Parked, slot: OwnedSemaphorePermit) {
    match Session::unpark(p) {
        Ok(session) => {
            tokio::spawn(crate::client::run_session(session, slot));
        }
        Err(e) => tracing::warn!(error = %e, "cannot resume a parked client; its connection is closed"),
    }
}

impl Parker {
    fn new() -> io::Result<Arc<Parker>> {
        let epoll = epoll::register(epoll::create()?)?;
        let mut all = PARKERS.lock().unwrap();
        // A parker whose runtime is gone leaves its number free.
        let number = all.iter().position(|w| w.strong_count() == 0).unwrap_or(all.len());
        let p = Arc::new(Parker {
            number,
            epoll,
            slots: Mutex::new(Slots::default()),
            signalled: Mutex::new(Vec::new()),
            notify: Notify::new(),
        });
        if number == all.len() {
            all.push(Arc::downgrade(&p));
        } else {
            all[number] = Arc::downgrade(&p);
        }
        Ok(p)
    }

    fn signal(&self, key: Key) {
        self.signalled.lock().unwrap().push(key);
        self.notify.notify_one();
    }

    /// Takes the client out of the epoll set and resumes it, unless it was
    /// resumed already (a stale key).
    fn wake(&self, key: Key) {
        let Some((p, slot)) = self.slots.lock().unwrap().take(key) else {
            return;
        };
        PARKED.fetch_sub(1, Relaxed);
        epoll::remove(self.epoll.as_raw_fd(), p.stream.as_raw_fd());
        resume(p, slot);
    }

    /// Resumes every client the epoll set reports ready.
    fn wake_ready(&self, events: &mut [libc::epoll_event]) -> io::Result<usize> {
        let n = epoll::wait(self.epoll.as_raw_fd(), events)?;
        for ev in &events[..n] {
            self.wake(Key::from_u64(ev.u64));
        }
        Ok(n)
    }
}

impl Parker {
    /// The epoll set failed (never seen): resume everyone parked here; the
    /// next client to park makes a new parker.
    fn fail(&self, e: io::Error) {
        tracing::error!(error = %e, "parked clients' epoll failed; resuming them all");
        let keys = self.slots.lock().unwrap().keys();
        for key in keys {
            self.wake(key);
        }
    }
}

/// The few epoll calls parking needs, as safe functions.
#[allow(unsafe_code)]
mod epoll {
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use tokio::io::unix::AsyncFd;

    pub fn create() -> io::Result<OwnedFd> {
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The epoll set in tokio's reactor: readable when a member is ready.
    pub fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
        // SAFETY: the descriptor is owned by the AsyncFd, which deregisters
        // it before closing it.
        Ok(unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?)
    }

    /// Watches `fd` for input or hang-up (level-triggered), tagged `data`.
    pub fn add(epoll: RawFd, fd: RawFd, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: data,
        };
        // SAFETY: plain syscall; `ev` outlives it.
        if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn remove(epoll: RawFd, fd: RawFd) {
        // SAFETY: plain syscall; a null event is allowed for EPOLL_CTL_DEL.
        unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Ready members, without waiting.
    pub fn wait(epoll: RawFd, events: &mut [libc::epoll_event]) -> io::Result<usize> {
        // SAFETY: `events` is valid for its length; timeout 0 never blocks.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// The parker's task: resumes clients whose socket is ready, who were
/// signalled, or whose idle timeout passed.
async fn watch(p: Arc<Parker>) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; BATCH];
    let mut check = tokio::time::interval(TIMEOUT_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let timed = p.slots.lock().unwrap().timed > 0;
        tokio::select! {
            ready = p.epoll.readable() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => return p.fail(e),
                };
                loop {
                    match p.wake_ready(&mut events) {
                        Ok(n) if n == events.len() => continue,
                        Ok(_) => {
                            guard.clear_ready();
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return p.fail(e),
                    }
                }
            }
            _ = p.notify.notified() => {
                let keys = std::mem::take(&mut *p.signalled.lock().unwrap());
                for key in keys {
                    p.wake(key);
                }
            }
            now = check.tick(), if timed => {
                let expired = p.slots.lock().unwrap().expired(now);
                for key in expired {
                    p.wake(key);
                }
            }
        }
    }
}

/// Asks clients idle for `park_idle_after` to park, sweeping the registry
/// every half of it (0 turns parking off; a reload applies).
pub async fn sweep(shared: Arc<Shared>) {
    loop {
        let after = shared.settings.config().runtime.park_idle_after;
        if after.is_zero() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tokio::time::sleep((after / 2).max(Duration::from_millis(50))).await;
        if shared.lifecycle.drain_age().is_some() {
            return;
        }
        let asked = shared.clients.sweep_idle();
        if asked > 0 {
            tracing::trace!(asked, "idle clients asked to park");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in client: its deadline, if any.
    struct Fake(Option<tokio::time::Instant>);

    impl Deadline for Fake {
        fn deadline(&self) -> Option<tokio::time::Instant> {
            self.0
        }
    }

    #[test]
    fn a_key_takes_its_client_once_and_stale_keys_take_nothing() {
        let mut t = Slots::<Fake>::default();
        let a = t.insert(Fake(None));
        let b = t.insert(Fake(None));
        assert_ne!(a, b);
        assert!(t.take(a).is_some());
        assert!(t.take(a).is_none(), "taken twice");
        // The freed place is reused under a new generation: the old key
        // (a wake-up for the client that left) does not reach the new one.
        let c = t.insert(Fake(None));
        assert_eq!(c.index, a.index);
        assert_ne!(c.gen, a.gen);
        assert!(t.take(a).is_none());
        assert!(t.take(Key { index: 99, gen: 1 }).is_none(), "no such place");
        assert_eq!(t.keys(), vec![c, b]);
        assert!(t.take(b).is_some() && t.take(c).is_some());
        assert_eq!((t.parked, t.entries.capacity()), (0, 0), "empty table freed");
        // Generations go on after the table was emptied.
        let d = t.insert(Fake(None));
        assert!(d.gen > c.gen && t.take(c).is_none());
    }

    #[test]
    fn generations_fit_a_wakers_24_bits() {
        let mut t = Slots::<Fake> {
            next_gen: GEN_MASK - 1,
            ..Default::default()
        };
        let a = t.insert(Fake(None));
        let b = t.insert(Fake(None));
        assert_eq!((a.gen, b.gen), (GEN_MASK, 0));
        assert!(t.take(a).is_some() && t.take(b).is_some());
    }

    #[test]
    fn expired_lists_only_clients_past_their_deadline() {
        let now = tokio::time::Instant::now();
        let mut t = Slots::<Fake>::default();
        let early = t.insert(Fake(Some(now - Duration::from_secs(1))));
        let _later = t.insert(Fake(Some(now + Duration::from_secs(60))));
        let _none = t.insert(Fake(None));
        assert_eq!(t.timed, 2);
        assert_eq!(t.expired(now), vec![early]);
        t.take(early).unwrap();
        assert_eq!(t.timed, 1);
        assert!(t.expired(now).is_empty());
    }

    #[test]
    fn keys_round_trip_through_the_epoll_word() {
        for k in [
            Key { index: 0, gen: 1 },
            Key {
                index: u32::MAX,
                gen: u32::MAX,
            },
            Key { index: 7, gen: 0 },
        ] {
            assert_eq!(Key::from_u64(k.to_u64()), k);
        }
    }
}

#[cfg(test)]
mod size {
    /// What a parked client costs in the parker's table (besides its
    /// registry entry and parameters): kept small on purpose.
    #[test]
    fn a_parked_client_takes_at_most_200_bytes_in_the_table() {
        let slot = std::mem::size_of::<super::Slot<super::Client>>();
        assert!(slot <= 200, "Slot is {slot} bytes");
    }
}
