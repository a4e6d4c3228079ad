//! Fair shares of the proxy's bounded charge memories (`idempotency`, `charges`): how many
//! entries each tenant holds, so that one tenant filling a memory cannot take the room of
//! the others. Without it, a tenant sending enough metered calls (creates that move no
//! money, under a key with a large cap) would leave every other tenant's retries and
//! confirms unremembered, charged again in full.
//!
//! When a memory is full (after its sweep of expired keys), a tenant that holds fewer
//! entries than the largest holder makes room by evicting one of that holder's entries;
//! the largest holder itself adds nothing more. So under contention every tenant keeps at
//! least an equal share, and a tenant alone may use it all. An evicted entry is forgotten
//! like any entry past the bound: its call is charged in full again (more, never less).
//!
//! Lock order: a memory's shard lock, then the counts (`added` and `removed` are called
//! with a shard held); the counts are never held while a shard is locked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct TenantShares {
    counts: Mutex<HashMap<Arc<str>, usize, ahash::RandomState>>,
}

impl TenantShares {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, usize, ahash::RandomState>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An entry of `tenant` was added to the memory.
    pub fn added(&self, tenant: &Arc<str>) {
        *self.counts().entry(tenant.clone()).or_default() += 1;
    }

    /// An entry of `tenant` left the memory.
    pub fn removed(&self, tenant: &str) {
        let mut counts = self.counts();
        if let Some(n) = counts.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(tenant);
            }
        }
    }

    /// The tenant to evict an entry of, to make room for one of `tenant` in a full
    /// memory: the largest holder, when it holds more than `tenant`.
    pub fn evict_from(&self, tenant: &str) -> Option<Arc<str>> {
        let counts = self.counts();
        let mine = counts.get(tenant).copied().unwrap_or(0);
        let (largest, n) = counts.iter().max_by_key(|(_, n)| **n)?;
        (*n > mine).then(|| largest.clone())
    }

    /// Entries held by `tenant`.
    #[cfg(test)]
    pub fn held(&self, tenant: &str) -> usize {
        self.counts().get(tenant).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_taken_from_the_largest_holder_only_by_a_smaller_one() {
        let shares = TenantShares::default();
        let (a, b): (Arc<str>, Arc<str>) = ("tn_a".into(), "tn_b".into());
        for _ in 0..3 {
            shares.added(&b);
        }
        assert_eq!(shares.evict_from("tn_a").as_deref(), Some("tn_b"));
        assert_eq!(
            shares.evict_from("tn_b"),
            None,
            "the largest holder adds nothing"
        );
        shares.added(&a);
        shares.removed("tn_b");
        shares.removed("tn_b");
        // One each: neither takes from the other.
        assert_eq!(shares.evict_from("tn_a"), None);
        shares.removed("tn_a");
        shares.removed("tn_a"); // one too many: no underflow
        assert_eq!((shares.held("tn_a"), shares.held("tn_b")), (0, 1));
    }
}
