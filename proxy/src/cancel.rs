//! Cancel requests. Each client gets a random pgferry BackendKeyData; a
//! CancelRequest carrying it is forwarded, with the server's own key, to
//! the server connection running that client's query at that moment.

use pgferry_pool::NodeAddr;
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;

/// Where a client's query currently runs.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: Arc<NodeAddr>,
    pub pid: u32,
    pub key: u32,
}

/// A client's entry: its key and its current target.
#[derive(Debug)]
pub struct CancelEntry {
    pub pid: u32,
    pub key: u32,
    target: Mutex<Option<CancelTarget>>,
}

impl CancelEntry {
    pub fn set_target(&self, t: Option<CancelTarget>) {
        *self.target.lock().unwrap() = t;
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<u32, Arc<CancelEntry>>>,
}

/// A client's registration; removes the entry when the client goes away.
pub struct CancelGuard {
    reg: Arc<CancelRegistry>,
    pub entry: Arc<CancelEntry>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.reg.map.lock().unwrap().remove(&self.entry.pid);
    }
}

impl CancelRegistry {
    /// Registers a new client under a fresh random (pid, key).
    pub fn register(self: &Arc<Self>) -> CancelGuard {
        let mut rng = rand::thread_rng();
        let mut map = self.map.lock().unwrap();
        loop {
            // Positive pids, like PostgreSQL's, for clients that print them.
            let pid = rng.gen_range(1..=i32::MAX as u32);
            if map.contains_key(&pid) {
                continue;
            }
            let entry = Arc::new(CancelEntry {
                pid,
                key: rng.gen(),
                target: Mutex::new(None),
            });
            map.insert(pid, entry.clone());
            return CancelGuard {
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
                Some(e) if e.key == key => e.target.lock().unwrap().clone(),
                _ => None,
            }
        };
        let Some(t) = target else { return false };
        send_cancel(&t, tls).await.is_ok()
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
