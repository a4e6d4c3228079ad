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
//! The entry evicted is the holder's oldest: each tenant's ids are kept in the order they
//! were added, and popped from the front (one no longer in the memory, swept or
//! replaced, is skipped; one still in use is put back), in O(1) per entry added. Only
//! when none is left does the memory scan for one, at most [`SCAN`] entries, so a caller
//! filling the memory can never make another's call pay for a scan of all of it.
//!
//! Lock order: a memory's shard lock, then the shares (`added` and `removed` are called
//! with a shard held); a shard is never locked while the shares are held.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Entries a memory looks at, at most, for one of a tenant's when no candidate is left.
pub const SCAN: usize = 4096;

/// Candidates still in use put back, at most, before one eviction gives up.
const IN_USE_PUT_BACK: usize = 64;

struct Share<K> {
    held: usize,
    /// The tenant's ids, oldest first (some maybe gone already; never more than `held`).
    ids: VecDeque<K>,
}

type Shares<K> = HashMap<Arc<str>, Share<K>, ahash::RandomState>;

pub struct TenantShares<K> {
    shares: Mutex<Shares<K>>,
}

impl<K> Default for TenantShares<K> {
    fn default() -> Self {
        TenantShares {
            shares: Mutex::default(),
        }
    }
}

/// What became of an eviction candidate.
pub enum Evicted {
    /// Removed from the memory.
    Yes,
    /// Still there but in use (a call in flight): kept, and tried again later.
    InUse,
    /// No longer there, or no longer that tenant's.
    Gone,
}

impl<K: Clone> TenantShares<K> {
    fn shares(&self) -> std::sync::MutexGuard<'_, Shares<K>> {
        self.shares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entry `id` of `tenant` was added to the memory.
    pub fn added(&self, tenant: &Arc<str>, id: &K) {
        let id = id.clone();
        let mut shares = self.shares();
        let share = shares.entry(tenant.clone()).or_insert_with(|| Share {
            held: 0,
            ids: VecDeque::new(),
        });
        share.held += 1;
        share.ids.push_back(id);
    }

    /// An entry of `tenant` left the memory.
    pub fn removed(&self, tenant: &str) {
        let mut shares = self.shares();
        if let Some(share) = shares.get_mut(tenant) {
            share.held = share.held.saturating_sub(1);
            if share.held == 0 {
                shares.remove(tenant);
            } else if share.ids.len() > share.held {
                // Bounded by what the tenant holds (the oldest go first; an entry whose
                // id is dropped here is still found by a scan).
                share.ids.pop_front();
            }
        }
    }

    /// The tenant to evict an entry of, to make room for one of `tenant` in a full
    /// memory (the largest holder, when it holds more than `tenant`), with its oldest id
    /// (maybe gone already; `None` when none is left).
    fn evict_from(&self, tenant: &str) -> Option<(Arc<str>, Option<K>)> {
        let mut shares = self.shares();
        let mine = shares.get(tenant).map_or(0, |s| s.held);
        let (largest, share) = shares.iter_mut().max_by_key(|(_, s)| s.held)?;
        (share.held > mine).then(|| (largest.clone(), share.ids.pop_front()))
    }

    /// Puts back a candidate still in use, behind the others.
    fn put_back(&self, tenant: &str, id: K) {
        if let Some(share) = self.shares().get_mut(tenant) {
            share.ids.push_back(id);
        }
    }

    /// Entries held by `tenant`.
    #[cfg(test)]
    pub fn held(&self, tenant: &str) -> usize {
        self.shares().get(tenant).map_or(0, |s| s.held)
    }
}

/// Makes room in a full memory for an entry of `tenant`: evicts the oldest entry not in
/// use of the largest holder, if it holds more than `tenant`. `evict(id, tenant)` removes
/// entry `id` if it is that tenant's and not in use (telling the shares itself);
/// `scan(tenant)` finds such an entry among the first [`SCAN`]. Whether room was made.
pub fn make_room<K: Clone>(
    shares: &TenantShares<K>,
    tenant: &str,
    evict: impl Fn(&K, &str) -> Evicted,
    scan: impl FnOnce(&str) -> Option<K>,
) -> bool {
    let mut put_back = 0;
    loop {
        match shares.evict_from(tenant) {
            None => return false,
            Some((largest, Some(id))) => match evict(&id, &largest) {
                Evicted::Yes => return true,
                Evicted::Gone => {}
                Evicted::InUse => {
                    shares.put_back(&largest, id);
                    put_back += 1;
                    if put_back == IN_USE_PUT_BACK {
                        return false;
                    }
                }
            },
            Some((largest, None)) => {
                return scan(&largest)
                    .is_some_and(|id| matches!(evict(&id, &largest), Evicted::Yes));
            }
        }
    }
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
        assert_eq!((&*largest, candidate), ("tn_b", Some(0)), "its oldest id");
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
    fn the_oldest_entry_not_in_use_goes_and_gone_ones_are_skipped_however_many() {
        let shares: TenantShares<u32> = TenantShares::default();
        let b: Arc<str> = "tn_b".into();
        for id in 0..1000 {
            shares.added(&b, &id);
        }
        // 0..900 gone already (refused calls, swept), 900 in flight: 901 goes.
        let evict = |id: &u32, _: &str| match id {
            0..900 => Evicted::Gone,
            900 => Evicted::InUse,
            _ => Evicted::Yes,
        };
        let evicted = std::cell::Cell::new(None);
        let evict_noting = |id: &u32, t: &str| {
            let e = evict(id, t);
            if matches!(e, Evicted::Yes) {
                evicted.set(Some(*id));
            }
            e
        };
        assert!(make_room(&shares, "tn_a", evict_noting, |_| None));
        assert_eq!(evicted.get(), Some(901));
        // The one in flight was put back, behind the others.
        let (_, next) = shares.evict_from("tn_a").unwrap();
        assert_eq!(next, Some(902));
        // No candidate left: the scan is the last resort.
        while shares.evict_from("tn_a").is_some_and(|(_, c)| c.is_some()) {}
        assert!(make_room(&shares, "tn_a", |_, _| Evicted::Yes, |_| Some(7)));
        assert!(!make_room(&shares, "tn_a", |_, _| Evicted::Yes, |_| None));
    }
}
