//! Named prepared statements in transaction mode.
//!
//! Clients name statements as they like ("s1", "S_1", ...), but a server
//! connection is shared, so pgferry prepares each distinct statement (query
//! text + parameter types) under its own global name, `pgferry_<id>`, on
//! whichever server connection a client's Bind or Describe lands on. Each
//! server connection remembers which global statements it holds in a
//! bounded LRU [`ServerStatements`].

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

/// One distinct statement, shared by every client that prepared the same
/// text with the same parameter types.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// Server-side name, NUL-terminated-free: `pgferry_<id>`.
    pub name: Box<[u8]>,
    /// The Parse body after the statement name: query, NUL, parameter types.
    pub parse_tail: Bytes,
    /// What executing it does to session state (scanned once, applied at
    /// every Bind: a statement is parsed once and executed many times).
    pub effects: pgferry_protocol::sql::Effects,
    /// Some server accepted it once: a client's Parse of it can be answered
    /// without a server, and the statement prepared at Bind or Describe.
    verified: AtomicBool,
}

impl Statement {
    pub fn is_verified(&self) -> bool {
        self.verified.load(Relaxed)
    }

    pub fn set_verified(&self) {
        self.verified.store(true, Relaxed);
    }

    /// The query text.
    pub fn query(&self) -> &[u8] {
        let end = self
            .parse_tail
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.parse_tail.len());
        &self.parse_tail[..end]
    }
}

/// The query text at the start of a Parse tail.
fn query_of(parse_tail: &[u8]) -> &[u8] {
    &parse_tail[..parse_tail.iter().position(|&b| b == 0).unwrap_or(parse_tail.len())]
}

/// Deduplicates statements across clients. Entries die with their last
/// client reference; dead entries are swept as the map grows.
#[derive(Default)]
pub struct StatementRegistry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    by_text: HashMap<Bytes, Weak<Statement>>,
    next_id: u64,
    sweep_at: usize,
}

impl StatementRegistry {
    /// The shared statement for this Parse tail, created if needed.
    pub fn intern(&self, parse_tail: &[u8]) -> Arc<Statement> {
        let mut g = self.inner.lock().unwrap();
        if let Some(s) = g.by_text.get(parse_tail).and_then(Weak::upgrade) {
            return s;
        }
        g.next_id += 1;
        let id = g.next_id;
        let tail = Bytes::copy_from_slice(parse_tail);
        let effects = pgferry_protocol::sql::scan(query_of(&tail));
        let s = Arc::new(Statement {
            effects,
            id,
            name: format!("pgferry_{id}").into_bytes().into(),
            parse_tail: tail.clone(),
            verified: AtomicBool::new(false),
        });
        g.by_text.insert(tail, Arc::downgrade(&s));
        if g.by_text.len() > g.sweep_at {
            g.by_text.retain(|_, w| w.strong_count() > 0);
            g.sweep_at = (g.by_text.len() * 2).max(1024);
        }
        s
    }

    /// Every live statement, by id (SHOW PREPARED_STATEMENTS).
    pub fn snapshot(&self) -> Vec<Arc<Statement>> {
        let mut v: Vec<_> = self
            .inner
            .lock()
            .unwrap()
            .by_text
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Number of live distinct statements.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap()
            .by_text
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The statements one server connection holds, least recently used first out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<u64, u64>,
    tick: u64,
}

impl ServerStatements {
    pub fn contains(&self, id: u64) -> bool {
        self.used.contains_key(&id)
    }

    /// Marks `id` used now; returns whether it was already present.
    pub fn touch(&mut self, id: u64) -> bool {
        self.tick += 1;
        match self.used.get_mut(&id) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `id` as prepared. If that makes the cache exceed `capacity`,
    /// returns the least recently used id, which the caller must Close on
    /// the server.
    pub fn insert(&mut self, id: u64, capacity: usize) -> Option<u64> {
        self.tick += 1;
        self.used.insert(id, self.tick);
        if self.used.len() <= capacity.max(1) {
            return None;
        }
        let (&victim, _) = self.used.iter().filter(|(&k, _)| k != id).min_by_key(|(_, &t)| t)?;
        self.used.remove(&victim);
        Some(victim)
    }

    pub fn remove(&mut self, id: u64) {
        self.used.remove(&id);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_dedups_and_forgets() {
        let r = StatementRegistry::default();
        let a = r.intern(b"select 1\0\0\0");
        let b = r.intern(b"select 1\0\0\0");
        let c = r.intern(b"select 2\0\0\0");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(&*a.name, format!("pgferry_{}", a.id).as_bytes());
        assert_eq!(a.query(), b"select 1");
        drop((a, b));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn lru_evicts_oldest() {
        let mut s = ServerStatements::default();
        assert_eq!(s.insert(1, 2), None);
        assert_eq!(s.insert(2, 2), None);
        assert!(s.touch(1));
        assert_eq!(s.insert(3, 2), Some(2));
        assert!(s.contains(1) && s.contains(3) && !s.contains(2));
    }
}
