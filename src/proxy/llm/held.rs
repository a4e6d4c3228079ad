//! One bound on the answer bytes all metered LLM calls hold at once to read their usage
//! (a JSON answer kept whole, an SSE line waiting for its end). Each call is bounded on
//! its own (`MAX_JSON`, `usage::MAX_LINE`); without a bound on them together, a key
//! could ask many cheap calls with large answers at once (embeddings of many inputs: tens
//! of MB each, a fraction of a cent) and hold the host's memory. A call that finds no
//! room keeps nothing more and is charged as unmeterable: its whole reservation (fail
//! closed, as an answer over its own bound is).
//!
//! So that one tenant's calls cannot leave the others without room, the first
//! `FREE_PER_CALL` bytes of every call are not counted (ordinary answers and SSE lines
//! never meet the bound), and one tenant's calls hold at most half of the pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Most answer bytes held for metering by the whole process, beyond each call's first
/// `FREE_PER_CALL`.
pub const MAX_HELD: usize = 256 * 1024 * 1024;

/// What each call holds without counting against the pool.
pub const FREE_PER_CALL: usize = 64 * 1024;

/// Bytes held against a bound, in all and by tenant.
pub struct Pool {
    held: AtomicUsize,
    /// Tenant (its id's hash) → bytes its calls hold; tenants holding none are absent.
    by_tenant: Mutex<Option<HashMap<u64, usize>>>,
    max: usize,
}

impl Pool {
    pub const fn new(max: usize) -> Pool {
        Pool {
            held: AtomicUsize::new(0),
            by_tenant: Mutex::new(None),
            max,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    fn tenants(&self) -> std::sync::MutexGuard<'_, Option<HashMap<u64, usize>>> {
        self.by_tenant.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `more` bytes for `tenant`: false, and nothing taken, past its share or the pool.
    fn take(&self, tenant: u64, more: usize) -> bool {
        let mut tenants = self.tenants();
        let tenants = tenants.get_or_insert_with(HashMap::new);
        let mine = tenants.get(&tenant).copied().unwrap_or(0);
        if mine.saturating_add(more) > self.max / 2 {
            return false;
        }
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                h.checked_add(more).filter(|&t| t <= self.max)
            })
            .is_ok();
        if taken {
            tenants.insert(tenant, mine + more);
        }
        taken
    }

    fn give_back(&self, tenant: u64, bytes: usize) {
        let mut tenants = self.tenants();
        if let Some(tenants) = tenants.as_mut() {
            if let Some(mine) = tenants.get_mut(&tenant) {
                *mine = mine.saturating_sub(bytes);
                if *mine == 0 {
                    tenants.remove(&tenant);
                }
            }
        }
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// The process's pool.
pub static METERING: Pool = Pool::new(MAX_HELD);

/// What one call holds of a pool (its high-water mark beyond `FREE_PER_CALL`), given back
/// when dropped.
pub struct Held {
    pool: &'static Pool,
    tenant: u64,
    bytes: usize,
}

impl Held {
    /// For a call of the tenant whose id hashes to `tenant` (`revocation::id_hash`).
    pub fn new(tenant: u64) -> Held {
        Held::from(&METERING, tenant)
    }

    pub fn from(pool: &'static Pool, tenant: u64) -> Held {
        Held {
            pool,
            tenant,
            bytes: 0,
        }
    }

    /// Makes sure `total` bytes are held for this call: false, and nothing more taken,
    /// when the pool or the tenant's share has no room for them.
    pub fn cover(&mut self, total: usize) -> bool {
        let counted = total.saturating_sub(FREE_PER_CALL);
        let Some(more) = counted.checked_sub(self.bytes).filter(|&m| m > 0) else {
            return true;
        };
        if !self.pool.take(self.tenant, more) {
            return false;
        }
        self.bytes = counted;
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.pool.give_back(self.tenant, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: usize = FREE_PER_CALL;

    #[test]
    fn calls_hold_at_most_the_pool_together_and_give_it_back() {
        static POOL: Pool = Pool::new(200);
        let mut a = Held::from(&POOL, 1);
        let mut b = Held::from(&POOL, 2);
        let mut c = Held::from(&POOL, 3);
        assert!(a.cover(K + 100));
        assert!(a.cover(K + 40), "a lower mark takes nothing more");
        assert!(b.cover(K + 90));
        assert!(!c.cover(K + 11), "past the pool");
        assert_eq!(POOL.held(), 190);
        assert!(c.cover(K + 10));
        drop(a);
        assert_eq!(POOL.held(), 100);
        drop((b, c));
        assert_eq!(POOL.held(), 0);
    }

    #[test]
    fn a_calls_first_bytes_are_free_and_a_tenant_holds_at_most_half() {
        static POOL: Pool = Pool::new(200);
        let mut first = Held::from(&POOL, 7);
        let mut second = Held::from(&POOL, 7);
        assert!(first.cover(K), "within the free part");
        assert_eq!(POOL.held(), 0);
        assert!(first.cover(K + 60));
        assert!(!second.cover(K + 41), "past the tenant's half");
        assert!(second.cover(K + 40));
        // Another tenant still finds room while the first holds its half.
        let mut other = Held::from(&POOL, 8);
        assert!(other.cover(K + 100));
        assert_eq!(POOL.held(), 200);
        drop((first, second, other));
        assert_eq!(POOL.held(), 0);
        assert!(POOL.tenants().as_ref().is_none_or(HashMap::is_empty));
    }
}
