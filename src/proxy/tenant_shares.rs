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
//! The entry to evict is found in O(1): each tenant's most recent ids are kept (at most
//! [`RECENT`]); one no longer in the memory (swept, replaced) is skipped. Only when none
//! is left does the memory scan for one, at most [`SCAN`] entries, so a caller filling
//! the memory can never make another's call pay for a scan of all of it.
//!
//! Lock order: a memory's shard lock, then the shares (`added` and `removed` are called
//! with a shard held); the shares are never held while a shard is locked.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// A tenant's most recent ids kept as eviction candidates.
const RECENT: usize = 256;

/// Entries a memory looks at, at most, for one of a tenant's when no candidate is left.
pub const SCAN: usize = 4096;

struct Share<K> {
    held: usize,
    recent: VecDeque<K>,
}

pub struct TenantShares<K> {
    shares: Mutex<HashMap<Arc<str>, Share<K>, ahash::RandomState>>,
}

impl<K> Default for TenantShares<K> {
    fn default() -> Self {
        TenantShares {
            shares: Mutex::default(),
        }
    }
}

impl<K: Clone> TenantShares<K> {
    fn shares(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Share<K>, ahash::RandomState>> {
        self.shares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entry `id` of `tenant` was added to the memory.
    pub fn added(&self, tenant: &Arc<str>, id: &K) {
        let mut shares = self.shares();
        let share = shares.entry(tenant.clone()).or_insert_with(|| Share {
            held: 0,
            recent: VecDeque::new(),
        });
        share.held += 1;
        if share.recent.len() == RECENT {
            share.recent.pop_front();
        }
        share.recent.push_back(id.clone());
    }

    /// An entry of `tenant` left the memory.
    pub fn removed(&self, tenant: &str) {
        let mut shares = self.shares();
        if let Some(share) = shares.get_mut(tenant) {
            share.held = share.held.saturating_sub(1);
            if share.held == 0 {
                shares.remove(tenant);
            }
        }
    }

    /// The tenant to evict an entry of, to make room for one of `tenant` in a full
    /// memory (the largest holder, when it holds more than `tenant`), with a candidate
    /// id of its (the oldest of its recent ones, maybe gone already; `None` when none is
    /// left).
    pub fn evict_from(&self, tenant: &str) -> Option<(Arc<str>, Option<K>)> {
        let mut shares = self.shares();
        let mine = shares.get(tenant).map_or(0, |s| s.held);
        let (largest, share) = shares.iter_mut().max_by_key(|(_, s)| s.held)?;
        (share.held > mine).then(|| (largest.clone(), share.recent.pop_front()))
    }

    /// Entries held by `tenant`.
    #[cfg(test)]
    pub fn held(&self, tenant: &str) -> usize {
        self.shares().get(tenant).map_or(0, |s| s.held)
    }
}

/// Makes room in a full memory for an entry of `tenant`: evicts one of the largest
/// holder's entries, if it holds more than `tenant`. `remove(id, tenant)` removes the
/// entry `id` if that tenant's (telling the shares itself); `scan(tenant)` finds one of
/// its entries among the first [`SCAN`]. Whether room was made.
pub fn make_room<K: Clone>(
    shares: &TenantShares<K>,
    tenant: &str,
    remove: impl Fn(&K, &str) -> bool,
    scan: impl FnOnce(&str) -> Option<K>,
) -> bool {
    // A few candidates at most: each one gone already was swept or replaced.
    for _ in 0..8 {
        match shares.evict_from(tenant) {
            None => return false,
            Some((largest, Some(id))) => {
                if remove(&id, &largest) {
                    return true;
                }
            }
            Some((largest, None)) => {
                return scan(&largest).is_some_and(|id| remove(&id, &largest));
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_taken_from_the_largest_holder_only_by_a_smaller_one() {
        let shares: TenantShares<u32> = TenantShares::default();
        let (a, b): (Arc<str>, Arc<str>) = ("tn_a".into(), "tn_b".into());
        for id in 0..3 {
            shares.added(&b, &id);
        }
        let (largest, candidate) = shares.evict_from("tn_a").unwrap();
        assert_eq!(
            (&*largest, candidate),
            ("tn_b", Some(0)),
            "its oldest recent id"
        );
        assert!(
            shares.evict_from("tn_b").is_none(),
            "the largest holder adds nothing"
        );
        shares.added(&a, &10);
        shares.removed("tn_b");
        shares.removed("tn_b");
        // One each: neither takes from the other.
        assert!(shares.evict_from("tn_a").is_none());
        shares.removed("tn_a");
        shares.removed("tn_a"); // one too many: no underflow
        assert_eq!((shares.held("tn_a"), shares.held("tn_b")), (0, 1));
    }

    #[test]
    fn candidates_gone_already_are_skipped_and_a_bounded_scan_is_the_last_resort() {
        let shares: TenantShares<u32> = TenantShares::default();
        let b: Arc<str> = "tn_b".into();
        for id in 0..(RECENT as u32 + 10) {
            shares.added(&b, &id);
        }
        // Only the last id is still there: the first candidates were dropped beyond
        // RECENT, the next ones fail to remove; after 8 tries, no room this time.
        let still_there = RECENT as u32 + 9;
        let remove = |id: &u32, _: &str| *id == still_there;
        assert!(!make_room(&shares, "tn_a", remove, |_| None));
        // Candidates exhausted: the scan finds it.
        while shares.evict_from("tn_a").is_some_and(|(_, c)| c.is_some()) {}
        assert!(make_room(&shares, "tn_a", remove, |_| Some(still_there)));
    }
}
