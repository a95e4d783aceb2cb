//! Pending logins: connections still in startup or authentication.
//!
//! Each holds a place until it logs in, fails or times out
//! (client_login_timeout). The places are capped in total
//! (max_pending_logins) and per source address
//! (max_pending_logins_per_address), so that silent sockets from one
//! address cannot take every place and block everyone else's logins for
//! the length of the login timeout.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Places held per address (entries go when they reach 0).
type ByAddress = Arc<Mutex<HashMap<IpAddr, usize>>>;

pub struct PendingLogins {
    total: Arc<Semaphore>,
    max: usize,
    /// 0: no per-address cap.
    per_address: usize,
    by_address: ByAddress,
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    Address,
}

/// A connection's place; given back when dropped.
pub struct PendingLogin {
    _total: OwnedSemaphorePermit,
    address: Option<(IpAddr, ByAddress)>,
}

impl PendingLogins {
    pub fn new(max: usize, per_address: usize) -> Self {
        let max = max.max(1);
        PendingLogins {
            total: Arc::new(Semaphore::new(max)),
            max,
            per_address,
            by_address: Arc::default(),
        }
    }

    /// A place for a new connection from `ip`, unless a cap is reached.
    pub fn try_admit(&self, ip: IpAddr) -> Result<PendingLogin, Full> {
        let address = if self.per_address > 0 {
            let mut map = self.by_address.lock().unwrap();
            let n = map.entry(ip).or_insert(0);
            if *n >= self.per_address {
                return Err(Full::Address);
            }
            *n += 1;
            Some((ip, self.by_address.clone()))
        } else {
            None
        };
        match self.total.clone().try_acquire_owned() {
            Ok(total) => Ok(PendingLogin { _total: total, address }),
            Err(_) => {
                release(address);
                Err(Full::Total)
            }
        }
    }

    /// Connections in the login phase now.
    pub fn count(&self) -> usize {
        self.max - self.total.available_permits()
    }
}

fn release(address: Option<(IpAddr, ByAddress)>) {
    if let Some((ip, map)) = address {
        let mut map = map.lock().unwrap();
        if let Some(n) = map.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }
}

impl Drop for PendingLogin {
    fn drop(&mut self) {
        release(self.address.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_cannot_take_every_place() {
        let p = PendingLogins::new(10, 3);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| p.try_admit(a).unwrap()).collect();
        assert_eq!(p.try_admit(a).err(), Some(Full::Address));
        let other = p.try_admit(b).expect("another address still gets a place");
        assert_eq!(p.count(), 4);
        drop(held);
        assert_eq!(p.count(), 1);
        assert!(p.try_admit(a).is_ok(), "places come back");
        drop(other);
        assert_eq!(p.count(), 0);
        assert!(
            p.by_address.lock().unwrap().is_empty(),
            "no entry kept for idle addresses"
        );
    }

    #[test]
    fn the_total_cap_still_applies_and_returns_the_address_place() {
        let p = PendingLogins::new(2, 0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let _a = p.try_admit(ip).unwrap();
        let _b = p.try_admit(ip).unwrap();
        assert_eq!(p.try_admit(ip).err(), Some(Full::Total));
        let p = PendingLogins::new(1, 5);
        let _a = p.try_admit(ip).unwrap();
        assert_eq!(p.try_admit(ip).err(), Some(Full::Total));
        assert_eq!(
            p.by_address.lock().unwrap()[&ip],
            1,
            "the refused one gave its address place back"
        );
    }
}
