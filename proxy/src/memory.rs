//! Where long-lived client state lives: a slab beside the system allocator.
//!
//! A client's registry entry and parameters are made at login, in the middle
//! of the session's short-lived allocations (buffers, SCRAM state, the task).
//! glibc puts them on the same pages, so when an idle client parks and frees
//! everything else, nearly every page still holds a few live bytes of some
//! client and none can go back to the kernel: 10,000 parked clients measured
//! 0.76 KiB live and 0.87 KiB of such holes each (session 11).
//!
//! PgBouncer keeps each kind of object in a slab; this is the same idea under
//! Rust's allocator: what is allocated inside [`long_lived`] comes from pages
//! that hold one size class each and nothing short-lived, so live client
//! state is dense, and a page whose objects are all freed goes back to the
//! kernel at once. Everything else goes to the system allocator untouched;
//! other paths pay one thread-local read per allocation and one address
//! comparison per free.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

const PAGE: usize = 4096;
/// Slot sizes: every 16 bytes up to 256 (client state is short strings,
/// small vectors and the registry entry: little is lost to rounding), then
/// every 64. Anything larger is not what this is for.
const CLASSES: [usize; 20] = [
    16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256, 320, 384, 448, 512,
];
const MAX: usize = 512;
const ALIGN: usize = 16;
/// Address space reserved for the slab (not memory: pages count once used).
/// 1 GiB is over a million clients' state; past it, the system allocator.
const RESERVE_PAGES: usize = 1 << 18;
/// Emptied pages kept for reuse, per size class, instead of released:
/// giving a page back costs a TLB shootdown on every core running the
/// process, which clients connecting and leaving all the time would pay at
/// each login (measured: ~4% of pgferry's CPU at 16 clients reconnecting).
/// Per class, so that one class's leftovers never make another's churn pay
/// it. 160 KiB at most.
const KEEP_EMPTY: usize = 2;

thread_local! {
    static SCOPE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with its small allocations (up to 512 bytes) in the slab: for
/// state that outlives the work around it (a client's registry entry and
/// parameters). What later grows or shrinks outside such a scope moves back
/// to the system allocator.
pub fn long_lived<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPE.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SCOPE.with(|s| s.replace(true)));
    f()
}

fn in_scope() -> bool {
    // (try_with: an allocation during thread teardown is simply not in one.)
    SCOPE.try_with(|s| s.get()).unwrap_or(false)
}

/// The smallest class that holds `size` (1..=512).
fn class_of(size: usize) -> usize {
    if size <= 256 {
        size.max(1).div_ceil(16) - 1
    } else {
        16 + (size - 257) / 64
    }
}

/// One page's bookkeeping, kept apart from the page (so a freed page is
/// wholly free). Indexes are stored plus one, 0 meaning none.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct PageMeta {
    /// Neighbours on the class's list of pages with a free slot, or (next
    /// only) on the stack of released pages.
    prev: u32,
    next: u32,
    used: u16,
    /// Slots handed out at least once: the rest are free without a list.
    carved: u16,
    /// First slot of the page's free list (each free slot holds the next).
    free: u16,
    /// Size class plus one; 0: the page is not in use.
    class: u8,
    listed: bool,
}

/// The slab proper: a reserved region of pages and their bookkeeping. The
/// process has one behind a lock (allocations in scope are logins and
/// parkings, not the transaction path); tests make their own.
pub struct Slab {
    meta: *mut PageMeta,
    base: *mut u8,
    pages: usize,
    /// Pages ever used; above it the region is untouched.
    top: usize,
    /// Released pages to use again before `top` grows.
    released: u32,
    /// Per class: the first page with a free slot.
    partial: [u32; CLASSES.len()],
    /// Pages holding objects, or empty and kept (`KEEP_EMPTY`).
    held_pages: usize,
    /// Per class: held pages with no object on them.
    empty: [u8; CLASSES.len()],
}

// SAFETY: the raw pointers name a private mapping that only the owner of the
// Slab touches (the process's one is behind a Mutex).
unsafe impl Send for Slab {}

impl Slab {
    /// Reserves `pages` pages (and their bookkeeping) of address space,
    /// lazily backed by the kernel. None if the mapping is refused.
    pub fn new(pages: usize) -> Option<Slab> {
        let meta_len = (pages * std::mem::size_of::<PageMeta>()).div_ceil(PAGE) * PAGE;
        let len = meta_len + pages * PAGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // affected. NORESERVE: the reservation is not a commitment.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let p = p.cast::<u8>();
        Some(Slab {
            meta: p.cast(),
            // SAFETY: within the mapping just made.
            base: unsafe { p.add(meta_len) },
            pages,
            top: 0,
            released: 0,
            partial: [0; CLASSES.len()],
            held_pages: 0,
            empty: [0; CLASSES.len()],
        })
    }

    /// Whether `p` came from this slab.
    pub fn owns(&self, p: *const u8) -> bool {
        (p as usize).wrapping_sub(self.base as usize) < self.pages * PAGE
    }

    /// Pages taken from the region: holding objects, or empty and kept.
    pub fn held_pages(&self) -> usize {
        self.held_pages
    }

    /// Held pages with no object on them.
    pub fn empty_pages(&self) -> usize {
        self.empty.iter().map(|&n| n as usize).sum()
    }

    fn meta(&mut self, page: usize) -> &mut PageMeta {
        debug_assert!(page < self.pages);
        // SAFETY: page < pages, and the bookkeeping area holds `pages`
        // entries (zero-filled by the kernel, which is PageMeta::default()).
        unsafe { &mut *self.meta.add(page) }
    }

    fn slot_ptr(&self, page: usize, class: usize, slot: usize) -> *mut u8 {
        // SAFETY: slot < PAGE / CLASSES[class], so within the page.
        unsafe { self.base.add(page * PAGE + slot * CLASSES[class]) }
    }

    fn link(&mut self, class: usize, page: usize) {
        let head = self.partial[class];
        if head != 0 {
            self.meta(head as usize - 1).prev = page as u32 + 1;
        }
        let m = self.meta(page);
        m.prev = 0;
        m.next = head;
        m.listed = true;
        self.partial[class] = page as u32 + 1;
    }

    fn unlink(&mut self, class: usize, page: usize) {
        let m = *self.meta(page);
        if m.prev != 0 {
            self.meta(m.prev as usize - 1).next = m.next;
        } else {
            self.partial[class] = m.next;
        }
        if m.next != 0 {
            self.meta(m.next as usize - 1).prev = m.prev;
        }
        let m = self.meta(page);
        m.prev = 0;
        m.next = 0;
        m.listed = false;
    }

    /// A slot of `size` bytes (1..=512), 16-aligned; None when the region
    /// is full.
    pub fn alloc(&mut self, size: usize) -> Option<*mut u8> {
        let class = class_of(size);
        let per_page = PAGE / CLASSES[class];
        let page = match self.partial[class] {
            0 => {
                let page = if self.released != 0 {
                    let page = self.released as usize - 1;
                    self.released = self.meta(page).next;
                    page
                } else if self.top < self.pages {
                    self.top += 1;
                    self.top - 1
                } else {
                    return None;
                };
                *self.meta(page) = PageMeta {
                    class: class as u8 + 1,
                    ..PageMeta::default()
                };
                self.link(class, page);
                self.held_pages += 1;
                page
            }
            head => {
                let page = head as usize - 1;
                if self.meta(page).used == 0 {
                    self.empty[class] -= 1;
                }
                page
            }
        };
        let m = *self.meta(page);
        let slot = if m.free != 0 {
            let slot = m.free as usize - 1;
            // SAFETY: a free slot of this page holds the next free slot's
            // index (written by `free`); u16 reads need 2-byte alignment,
            // slots are 16-aligned.
            let next = unsafe { self.slot_ptr(page, class, slot).cast::<u16>().read() };
            self.meta(page).free = next;
            slot
        } else {
            self.meta(page).carved += 1;
            m.carved as usize
        };
        let m = self.meta(page);
        m.used += 1;
        if m.used as usize == per_page {
            self.unlink(class, page);
        }
        Some(self.slot_ptr(page, class, slot))
    }

    /// Returns a slot `alloc` gave.
    ///
    /// # Safety
    /// `p` came from this slab's `alloc` and was not freed since.
    pub unsafe fn free(&mut self, p: *mut u8) {
        let off = p as usize - self.base as usize;
        let page = off / PAGE;
        let m = *self.meta(page);
        let class = m.class as usize - 1;
        let slot = (off % PAGE) / CLASSES[class];
        if m.used == 1 && self.empty[class] as usize >= KEEP_EMPTY {
            // The page's last object: the page goes back to the kernel.
            if m.listed {
                self.unlink(class, page);
            }
            // SAFETY: a whole page of the private mapping, with nothing live
            // on it; it reads as zeros when used again.
            unsafe {
                libc::madvise(self.base.add(page * PAGE).cast(), PAGE, libc::MADV_DONTNEED);
            }
            let released = self.released;
            *self.meta(page) = PageMeta {
                next: released,
                ..PageMeta::default()
            };
            self.released = page as u32 + 1;
            self.held_pages -= 1;
            return;
        }
        if m.used == 1 {
            self.empty[class] += 1;
        }
        // SAFETY: the slot is ours again; it holds the free list's link.
        unsafe { self.slot_ptr(page, class, slot).cast::<u16>().write(m.free) };
        let m = self.meta(page);
        m.free = slot as u16 + 1;
        m.used -= 1;
        if !m.listed {
            self.link(class, page);
        }
    }

    /// The usable size of the slot at `p` (its class).
    fn slot_size(&mut self, p: *const u8) -> usize {
        let page = (p as usize - self.base as usize) / PAGE;
        CLASSES[self.meta(page).class as usize - 1]
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        let meta_len = (self.pages * std::mem::size_of::<PageMeta>()).div_ceil(PAGE) * PAGE;
        // SAFETY: the mapping `new` made, with nothing of it in use any more
        // (the owner is gone).
        unsafe { libc::munmap(self.meta.cast(), meta_len + self.pages * PAGE) };
    }
}

/// The process's slab, made on first use.
static SLAB: Mutex<Option<Slab>> = Mutex::new(None);
/// 0: not made yet, 1: made, 2: refused (everything to the system allocator).
static STATE: AtomicU8 = AtomicU8::new(0);
/// The region's bounds, for the lock-free "is this ours" test on free.
static BASE: AtomicUsize = AtomicUsize::new(0);
static LEN: AtomicUsize = AtomicUsize::new(0);

fn ours(p: *const u8) -> bool {
    (p as usize).wrapping_sub(BASE.load(Relaxed)) < LEN.load(Relaxed)
}

fn with_slab<R>(f: impl FnOnce(&mut Slab) -> Option<R>) -> Option<R> {
    if STATE.load(Relaxed) == 2 {
        return None;
    }
    let mut g = SLAB.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        if STATE.load(Relaxed) == 2 {
            return None;
        }
        match Slab::new(RESERVE_PAGES) {
            Some(s) => {
                BASE.store(s.base as usize, Relaxed);
                LEN.store(s.pages * PAGE, Relaxed);
                *g = Some(s);
                STATE.store(1, Relaxed);
            }
            None => {
                STATE.store(2, Relaxed);
                return None;
            }
        }
    }
    g.as_mut().and_then(f)
}

/// Bytes of the process's slab in pages it holds (/metrics);
/// 0 where the binary's allocator is another (the mimalloc build).
pub fn slab_bytes() -> usize {
    if STATE.load(Relaxed) != 1 {
        return 0;
    }
    SLAB.lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or(0, |s| s.held_pages() * PAGE)
}

/// The global allocator: the system's, with [`long_lived`] allocations in
/// the slab.
pub struct Allocator;

fn slab_fits(layout: &Layout) -> bool {
    layout.size() != 0 && layout.size() <= MAX && layout.align() <= ALIGN
}

// SAFETY: every pointer is handed out once by either the slab or the system
// allocator and returned to the one that made it (`ours`); slab slots are at
// least the requested size and 16-aligned.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if slab_fits(&layout) && in_scope() {
            if let Some(p) = with_slab(|s| s.alloc(layout.size())) {
                return p;
            }
        }
        // SAFETY: forwarded as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if slab_fits(&layout) && in_scope() {
            if let Some(p) = with_slab(|s| s.alloc(layout.size())) {
                // SAFETY: the slot holds at least layout.size() bytes.
                unsafe { ptr::write_bytes(p, 0, layout.size()) };
                return p;
            }
        }
        // SAFETY: forwarded as given.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if ours(p) {
            // SAFETY: p is a live slot of the slab (caller's contract).
            with_slab(|s| {
                unsafe { s.free(p) };
                Some(())
            });
        } else {
            // SAFETY: p came from System with this layout.
            unsafe { System.dealloc(p, layout) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = match Layout::from_size_align(new_size, layout.align()) {
            Ok(l) => l,
            Err(_) => return ptr::null_mut(),
        };
        if !ours(p) {
            if !(slab_fits(&new_layout) && in_scope()) {
                // SAFETY: p came from System with this layout.
                return unsafe { System.realloc(p, layout, new_size) };
            }
        } else if in_scope() && slab_fits(&new_layout) {
            // Still fits its slot (and not a shrink that would waste it).
            let slot = with_slab(|s| Some(s.slot_size(p))).unwrap_or(0);
            if new_size <= slot && class_of(new_size) == class_of(slot) {
                return p;
            }
        }
        // Moves between the slab and the system allocator, or between classes.
        // SAFETY: new_layout is valid and non-zero (layout.size() > 0 here).
        let q = unsafe { self.alloc(new_layout) };
        if !q.is_null() {
            // SAFETY: both blocks hold at least the copied length; they are
            // distinct allocations.
            unsafe {
                ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                self.dealloc(p, layout);
            }
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn class_of_is_the_smallest_that_fits() {
        for size in 1..=MAX {
            let c = class_of(size);
            assert!(CLASSES[c] >= size, "{size}");
            assert!(c == 0 || CLASSES[c - 1] < size, "{size}");
        }
    }

    #[test]
    fn classes_fit_and_align() {
        let mut s = Slab::new(64).unwrap();
        for size in [1, 15, 16, 17, 100, 300, 511, 512] {
            let p = s.alloc(size).unwrap();
            assert_eq!(p as usize % ALIGN, 0, "size {size}");
            assert!(s.owns(p));
            assert!(CLASSES[class_of(size)] >= size);
            // The whole slot is writable.
            unsafe { ptr::write_bytes(p, 0xAB, size) };
        }
        assert!(!s.owns(ptr::null()));
        let x = 5u8;
        assert!(!s.owns(&x));
    }

    #[test]
    fn one_class_per_page_and_pages_released_when_empty() {
        let mut s = Slab::new(64).unwrap();
        // 4096 / 64 = 64 objects fill exactly one page.
        let ps: Vec<_> = (0..64).map(|_| s.alloc(64).unwrap()).collect();
        assert_eq!(s.held_pages(), 1);
        let q = s.alloc(64).unwrap();
        assert_eq!(s.held_pages(), 2);
        let small = s.alloc(16).unwrap();
        assert_eq!(s.held_pages(), 3, "another class never shares a page");
        for p in &ps {
            unsafe { s.free(*p) };
        }
        assert_eq!(
            (s.held_pages(), s.empty_pages()),
            (3, 1),
            "an emptied page is kept first"
        );
        // Used again without growing.
        let again = s.alloc(64).unwrap();
        assert_eq!((s.held_pages(), s.empty_pages()), (3, 0));
        unsafe { s.free(again) };
        // Past KEEP_EMPTY kept pages of a class, an emptied page goes back;
        // other classes' kept pages do not count.
        let pages: Vec<*mut u8> = (0..KEEP_EMPTY + 3)
            .map(|_| {
                let first = s.alloc(512).unwrap();
                for _ in 1..PAGE / 512 {
                    s.alloc(512).unwrap();
                }
                first
            })
            .collect();
        unsafe {
            s.free(q);
            s.free(small);
        }
        assert_eq!(s.empty_pages(), 3, "two 64-byte pages and a 16-byte one");
        let held = s.held_pages();
        for &p in &pages {
            for i in 0..PAGE / 512 {
                unsafe { s.free(p.add(i * 512)) };
            }
        }
        assert_eq!(s.empty_pages(), 3 + KEEP_EMPTY);
        assert_eq!(s.held_pages(), held - 3);
        // A released page is used again before the region grows, and reads
        // as zeros.
        let top = s.top;
        let fresh: Vec<_> = (0..3).map(|_| s.alloc(200).unwrap()).collect();
        assert_eq!(s.top, top);
        assert!(fresh.iter().all(|&p| unsafe { *p } == 0));
    }

    #[test]
    fn full_region_says_so() {
        let mut s = Slab::new(2).unwrap();
        for _ in 0..2 * (PAGE / 512) {
            assert!(s.alloc(512).is_some());
        }
        assert!(s.alloc(512).is_none());
        assert!(s.alloc(16).is_none());
    }

    /// Random allocations and frees against a model: no two live objects
    /// overlap, every object keeps its bytes, and exactly the pages with a
    /// live object are held.
    #[test]
    fn model() {
        use rand::{Rng, SeedableRng};
        for seed in 0..20u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut s = Slab::new(256).unwrap();
            let mut live: HashMap<usize, (usize, u8)> = HashMap::new();
            for step in 0..20_000 {
                if live.is_empty() || rng.gen_bool(0.55) {
                    let size = rng.gen_range(1..=MAX);
                    let Some(p) = s.alloc(size) else { continue };
                    let fill = (step % 251) as u8;
                    unsafe { ptr::write_bytes(p, fill, size) };
                    assert!(live.insert(p as usize, (size, fill)).is_none(), "slot handed out twice");
                } else {
                    let k = *live.keys().nth(rng.gen_range(0..live.len())).unwrap();
                    let (size, fill) = live.remove(&k).unwrap();
                    let bytes = unsafe { std::slice::from_raw_parts(k as *const u8, size) };
                    assert!(
                        bytes.iter().all(|&b| b == fill),
                        "seed {seed}: an object was overwritten"
                    );
                    unsafe { s.free(k as *mut u8) };
                }
            }
            let mut spans: Vec<_> = live.iter().map(|(&p, &(size, _))| (p, p + size)).collect();
            spans.sort();
            for w in spans.windows(2) {
                assert!(w[0].1 <= w[1].0, "seed {seed}: objects overlap");
            }
            for (&p, &(size, fill)) in &live {
                let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, size) };
                assert!(
                    bytes.iter().all(|&b| b == fill),
                    "seed {seed}: an object was overwritten"
                );
            }
            let pages: std::collections::HashSet<_> = live.keys().map(|&p| (p - s.base as usize) / PAGE).collect();
            assert_eq!(
                s.held_pages() - s.empty_pages(),
                pages.len(),
                "seed {seed}: pages held vs pages with a live object"
            );
            assert!(s.empty_pages() <= KEEP_EMPTY * CLASSES.len());
            for (p, _) in live.drain() {
                unsafe { s.free(p as *mut u8) };
            }
            assert_eq!(s.held_pages(), s.empty_pages());
            assert!(s.held_pages() <= KEEP_EMPTY * CLASSES.len());
        }
    }

    #[test]
    fn scope_is_restored_after_a_panic() {
        assert!(!in_scope());
        long_lived(|| assert!(in_scope()));
        let r = std::panic::catch_unwind(|| long_lived(|| panic!("inside")));
        assert!(r.is_err());
        assert!(!in_scope());
        long_lived(|| long_lived(|| ()));
        assert!(!in_scope(), "nested scopes restore the outer state");
    }
}
