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

/// The parked clients, stored inline (one allocation for all of them).
#[derive(Default)]
struct Slots {
    entries: Vec<Slot>,
    free: Vec<u32>,
    parked: usize,
    /// Parked clients with an idle timeout running.
    timed: usize,
}

struct Slot {
    gen: u32,
    client: Option<(Parked, OwnedSemaphorePermit)>,
}

impl Slots {
    fn insert(&mut self, p: Parked, slot: OwnedSemaphorePermit) -> Key {
        self.parked += 1;
        self.timed += p.deadline().is_some() as usize;
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.entries.push(Slot { gen: 0, client: None });
                (self.entries.len() - 1) as u32
            }
        };
        let s = &mut self.entries[index as usize];
        s.gen = s.gen.wrapping_add(1);
        s.client = Some((p, slot));
        Key { index, gen: s.gen }
    }

    fn take(&mut self, key: Key) -> Option<(Parked, OwnedSemaphorePermit)> {
        let s = self.entries.get_mut(key.index as usize)?;
        if s.gen != key.gen {
            return None;
        }
        let c = s.client.take()?;
        self.parked -= 1;
        self.timed -= c.0.deadline().is_some() as usize;
        self.free.push(key.index);
        if self.parked == 0 {
            // Everyone left: give the table's memory back.
            *self = Slots::default();
        }
        Some(c)
    }

    /// Clients whose idle timeout has passed.
    fn expired(&self, now: tokio::time::Instant) -> Vec<Key> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, s)| s.client.as_ref().and_then(|c| c.0.deadline()).is_some_and(|d| d <= now))
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
/// parker's number (16 bits), and the client's index (24 bits) and
/// generation (low 24 bits) in it; `signal` checks the generation against
/// the slot's, so a stale wake-up resumes nobody.
#[allow(unsafe_code)]
mod slot_waker {
    use super::{Key, PARKERS};
    use std::task::{RawWaker, RawWakerVTable, Waker};

    const VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, drop);

    pub fn new(parker: usize, key: Key) -> Option<Waker> {
        if parker >= 1 << 16 || key.index >= 1 << 24 {
            return None;
        }
        let word = parker << 48 | (key.index as usize) << 24 | (key.gen as usize & 0xff_ffff);
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
            p.signal_masked((word >> 24) as u32 & 0xff_ffff, word as u32 & 0xff_ffff);
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
    let key = parker.slots.lock().unwrap().insert(p, slot);
    PARKED.fetch_add(1, Relaxed);
    PARKS.fetch_add(1, Relaxed);
    // Signals first: from here on a KILL or a drain resumes the client,
    // and one that came just before is seen by the registration's check.
    match slot_waker::new(parker.number, key) {
        Some(waker) => {
            if entry.register_signal(&waker, lifecycle.draining()) {
                parker.signal(key);
            }
        }
        // Beyond 16 million parked clients on one loop: not parked.
        None => parker.signal(key),
    }
    // Then the socket, level-triggered: bytes that arrived before this call
    // are reported at once.
    if let Err(e) = epoll::add(parker.epoll.as_raw_fd(), fd, key.to_u64()) {
        tracing::warn!(error = %e, "cannot park a client; resumed");
        parker.signal(key);
    }
}

/// Runs a parked client's session again, in a new task.
fn resume(p: Parked, slot: OwnedSemaphorePermit) {
    match Session::unpark(p) {
        Ok(session) => {
            tokio::spawn(crate::client::resume(session, slot));
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

    /// `signal` from a waker, which carries the low 24 bits of the
    /// generation only.
    fn signal_masked(&self, index: u32, gen24: u32) {
        let gen = self.slots.lock().unwrap().entries.get(index as usize).map(|s| s.gen);
        if let Some(gen) = gen.filter(|g| g & 0xff_ffff == gen24) {
            self.signal(Key { index, gen });
        }
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
        let keys: Vec<Key> = {
            let slots = self.slots.lock().unwrap();
            (slots.entries.iter().enumerate())
                .filter(|(_, s)| s.client.is_some())
                .map(|(i, s)| Key {
                    index: i as u32,
                    gen: s.gen,
                })
                .collect()
        };
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
mod size_probe {
    #[test]
    fn print_sizes() {
        eprintln!(
            "Parked {} Slot {} ClientEntry {} ClientParams {} Session {}",
            std::mem::size_of::<crate::session::Parked>(),
            std::mem::size_of::<super::Slot>(),
            std::mem::size_of::<crate::clients::ClientEntry>(),
            std::mem::size_of::<crate::params::ClientParams>(),
            std::mem::size_of::<crate::session::Session>(),
        );
    }
}
