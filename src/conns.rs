//! The open connections of one listener (proxy or control API), bounded in total and per
//! client address. A connection is *waiting* while it has not yet delivered a complete
//! request header (a fresh connection, or a kept-alive one between requests) and *busy*
//! while a request is being served.
//!
//! At a bound, a new connection takes the place of the oldest waiting one (of the same
//! client when the per-client bound is what was reached), which is told to close. So a
//! flood of connections that trickle their headers can never lock a well-behaved client
//! out: the client's connection is the newest, sends its header at once and becomes
//! busy, while the flood's oldest connections are closed to make room. Busy connections
//! are never cut; when every connection at the bound is busy, the new one is refused.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections at most.
    pub max_total: usize,
    /// Open connections of one client address at most (0: no per-client bound).
    pub max_per_client: usize,
}

pub struct ConnTable {
    limits: ConnLimits,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// By admission order: the first waiting entry is the oldest.
    open: BTreeMap<u64, Entry>,
    per_client: crate::Map<IpAddr, usize>,
}

struct Entry {
    client: IpAddr,
    /// Flipped by the connection on every request without taking the table's lock.
    waiting: Arc<AtomicBool>,
    evict: Arc<Notify>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// At the total bound, with every connection busy.
    Full,
    /// At the client's bound, with every connection of the client busy.
    ClientFull,
}

/// One admitted connection; dropping it frees its place.
pub struct ConnGuard {
    table: Arc<ConnTable>,
    id: u64,
    waiting: Arc<AtomicBool>,
    evict: Arc<Notify>,
}

impl ConnTable {
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(ConnTable {
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Admits a connection from `client` (waiting), making room by evicting the oldest
    /// waiting connection if a bound is reached.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<ConnGuard, Refused> {
        let client = canonical(client);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let per_client = inner.per_client.get(&client).copied().unwrap_or(0);
        if self.limits.max_per_client > 0
            && per_client >= self.limits.max_per_client
            && !inner.evict_oldest_waiting(Some(client))
        {
            return Err(Refused::ClientFull);
        }
        if inner.open.len() >= self.limits.max_total && !inner.evict_oldest_waiting(None) {
            return Err(Refused::Full);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let evict = Arc::new(Notify::new());
        let waiting = Arc::new(AtomicBool::new(true));
        inner.open.insert(
            id,
            Entry {
                client,
                waiting: waiting.clone(),
                evict: evict.clone(),
            },
        );
        *inner.per_client.entry(client).or_insert(0) += 1;
        Ok(ConnGuard {
            table: self.clone(),
            id,
            waiting,
            evict,
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open
            .len()
    }
}

impl Inner {
    /// Removes the oldest waiting connection (of `client`, if given) and tells it to
    /// close; false if there is none.
    fn evict_oldest_waiting(&mut self, client: Option<IpAddr>) -> bool {
        let victim = self
            .open
            .iter()
            .find(|(_, e)| {
                e.waiting.load(Ordering::Acquire) && client.is_none_or(|c| e.client == c)
            })
            .map(|(id, _)| *id);
        match victim {
            Some(id) => {
                if let Some(entry) = self.remove(id) {
                    // A stored permit: the connection sees it even if it is not waiting
                    // on it at this instant.
                    entry.evict.notify_one();
                }
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id)?;
        if let Some(n) = self.per_client.get_mut(&entry.client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&entry.client);
            }
        }
        Some(entry)
    }
}

impl ConnGuard {
    /// Marks the connection waiting (for a request header: it may be evicted) or busy.
    pub fn set_waiting(&self, waiting: bool) {
        self.waiting.store(waiting, Ordering::Release);
    }

    /// Resolves once the connection has been evicted to make room for a newer one.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut inner = self.table.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.remove(self.id);
    }
}

/// An IPv4 client seen through an IPv6 socket counts as itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[tokio::test]
    async fn at_the_bound_the_oldest_waiting_connection_makes_room() {
        let table = ConnTable::new(ConnLimits {
            max_total: 3,
            max_per_client: 0,
        });
        let a = table.admit(ip(1)).unwrap();
        let b = table.admit(ip(1)).unwrap();
        let c = table.admit(ip(2)).unwrap();
        a.set_waiting(false); // busy: never evicted
        let d = table.admit(ip(3)).unwrap();
        assert_eq!(table.open(), 3);
        // b, the oldest waiting one, was told to close; c and d were not.
        tokio::time::timeout(std::time::Duration::from_millis(100), b.evicted())
            .await
            .expect("b evicted");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), c.evicted())
                .await
                .is_err()
        );
        c.set_waiting(false);
        d.set_waiting(false);
        // Everyone busy: a new connection is refused.
        assert_eq!(table.admit(ip(4)).err(), Some(Refused::Full));
        drop(b);
        assert_eq!(
            table.open(),
            3,
            "an evicted guard's drop frees nothing twice"
        );
        drop(a);
        assert!(table.admit(ip(4)).is_ok());
    }

    #[tokio::test]
    async fn a_client_at_its_bound_evicts_its_own_oldest_waiting_connection() {
        let table = ConnTable::new(ConnLimits {
            max_total: 100,
            max_per_client: 2,
        });
        let other = table.admit(ip(9)).unwrap();
        let a = table.admit(ip(1)).unwrap();
        let _b = table.admit(ip(1)).unwrap();
        let _c = table.admit(ip(1)).unwrap();
        tokio::time::timeout(std::time::Duration::from_millis(100), a.evicted())
            .await
            .expect("a evicted");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), other.evicted())
                .await
                .is_err(),
            "another client's connection is untouched"
        );
        assert_eq!(table.open(), 3);
        _b.set_waiting(false);
        _c.set_waiting(false);
        assert_eq!(table.admit(ip(1)).err(), Some(Refused::ClientFull));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(table.admit(mapped).err(), Some(Refused::ClientFull));
    }
}
