//! The revocation filter (SPEC §6): revoked key ids until a day past their `exp`, as a
//! bloom filter in front of the exact set. The proxy asks "is this id revoked?" on every
//! request; the answer is almost always "no" from the bloom bits alone, without hashing
//! into a map.
//!
//! Inserts are visible at once to every reader (atomic bit sets, concurrent map). Expired
//! ids are purged by rebuilding the filter and swapping it in (`ArcSwap`). A filter holding
//! more ids than it was sized for (`is_over_capacity`) is swapped for one with twice the
//! bits over the same exact set (`grown`), before its bits fill up and every lookup falls
//! through to the exact set.

/// How long past its key's `exp` a revoked id is kept. An expired key is refused for
/// its `exp` alone, by the same wall clock; but a clock stepped forward (then back), or a
/// process started with a clock ahead, would drop ids whose keys are still valid by the
/// true time, and such a key would spend again. A day covers any step NTP or a VM
/// restore makes.
pub const KEPT_PAST_EXPIRY_SECS: i64 = 86_400;

/// Whether a revoked id whose key expires at `exp` is no longer kept at `now`.
pub fn is_past_keeping(exp: i64, now: i64) -> bool {
    exp.saturating_add(KEPT_PAST_EXPIRY_SECS) <= now
}

use dashmap::DashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const HASHES: usize = 4;
/// Bloom bits per id the filter is sized for (~1 % false positives with 4 hashes).
const BITS_PER_ID: usize = 10;

pub struct RevocationFilter {
    bits: Box<[AtomicU64]>,
    /// Shared with the filter `grown` from this one (the ids are not copied).
    exact: Arc<DashMap<Box<str>, i64, ahash::RandomState>>,
    version: AtomicU64,
}

fn bloom_words(capacity: usize) -> Box<[AtomicU64]> {
    let words = (capacity.max(1024) * BITS_PER_ID).div_ceil(64);
    (0..words).map(|_| AtomicU64::new(0)).collect()
}

/// The hash an id's bloom bits are placed by: fixed SipHash keys, so the bit positions
/// are the same in every process that reads a published filter. A holder of an id it
/// looks up often (a cached key) keeps it and asks with `is_revoked_hashed`.
pub fn id_hash(id: &str) -> u64 {
    let mut s = std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().build_hasher();
    s.write(id.as_bytes());
    s.finish()
}

fn positions(h: u64, nbits: usize) -> [usize; HASHES] {
    let (h1, h2) = (h as u32 as u64, (h >> 32) | 1);
    std::array::from_fn(|i| (h1.wrapping_add(h2.wrapping_mul(i as u64)) % nbits as u64) as usize)
}

impl RevocationFilter {
    /// A filter sized for about `capacity` ids at ~1% false positives (10 bits per id).
    pub fn with_capacity(capacity: usize) -> Self {
        RevocationFilter {
            bits: bloom_words(capacity),
            exact: Default::default(),
            version: AtomicU64::new(0),
        }
    }

    pub fn insert(&self, id: &str, exp: i64) {
        self.exact.insert(id.into(), exp);
        self.set_bits(id);
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    fn set_bits(&self, id: &str) {
        for p in positions(id_hash(id), self.bits.len() * 64) {
            self.bits[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
        }
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.is_revoked_hashed(id, id_hash(id))
    }

    /// `is_revoked`, with `hash` = `id_hash(id)` computed beforehand.
    pub fn is_revoked_hashed(&self, id: &str, hash: u64) -> bool {
        let maybe = positions(hash, self.bits.len() * 64)
            .iter()
            .all(|&p| self.bits[p / 64].load(Ordering::Acquire) & (1 << (p % 64)) != 0);
        maybe && self.exact.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.exact.len()
    }

    /// Holds more ids than it was sized for: its writer swaps in `grown`.
    pub fn is_over_capacity(&self) -> bool {
        self.exact.len() * BITS_PER_ID > self.bits.len() * 64
    }

    /// The same ids with bloom bits sized for twice as many (so regrowing costs O(1) per
    /// insert over time), over the same exact set: only the bits are new. For the
    /// filter's one writer (or under its lock), swapping it in at once: an id inserted
    /// into `self` afterwards would be in the shared set but not in the new bits.
    pub fn grown(&self) -> Self {
        let next = RevocationFilter {
            bits: bloom_words(self.exact.len() * 2),
            exact: self.exact.clone(),
            version: AtomicU64::new(self.version() + 1),
        };
        for e in self.exact.iter() {
            next.set_bits(e.key());
        }
        next
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Whether any id is past being kept at `now` (`is_past_keeping`).
    pub fn has_past_keeping(&self, now: i64) -> bool {
        self.exact.iter().any(|e| is_past_keeping(*e.value(), now))
    }

    /// A new filter holding the ids still kept at `now` (`is_past_keeping`), sized for them.
    pub fn without_expired(&self, now: i64) -> Self {
        let live: Vec<(Box<str>, i64)> = self
            .exact
            .iter()
            .filter(|e| !is_past_keeping(*e.value(), now))
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        let next = RevocationFilter::with_capacity(live.len() * 2);
        for (id, exp) in live {
            next.insert(&id, exp);
        }
        next.version.store(self.version() + 1, Ordering::Release);
        next
    }

    pub fn ids(&self) -> Vec<(String, i64)> {
        self.exact
            .iter()
            .map(|e| (e.key().to_string(), *e.value()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_ids_are_found_and_others_are_not() {
        let f = RevocationFilter::with_capacity(100);
        for i in 0..1000 {
            f.insert(&format!("key_{i}"), 100);
        }
        assert!((0..1000).all(|i| f.is_revoked(&format!("key_{i}"))));
        assert!((1000..5000).all(|i| !f.is_revoked(&format!("key_{i}"))));
    }

    /// Fraction of the bloom bits set.
    fn fill(f: &RevocationFilter) -> f64 {
        let ones: u32 = f
            .bits
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum();
        ones as f64 / (f.bits.len() * 64) as f64
    }

    #[test]
    fn an_outgrown_filter_says_so_and_its_rebuild_has_room() {
        let f = RevocationFilter::with_capacity(1024);
        for i in 0..1024 {
            f.insert(&format!("key_{i}"), 100);
        }
        assert!(!f.is_over_capacity());
        for i in 1024..20_000 {
            f.insert(&format!("key_{i}"), 100);
        }
        assert!(f.is_over_capacity());
        assert!(
            fill(&f) > 0.99,
            "20x its capacity: the bits are all but full"
        );
        let g = f.grown();
        assert!(!g.is_over_capacity());
        assert!(fill(&g) < 0.3, "sized for twice the ids: {}", fill(&g));
        assert!(g.version() > f.version());
        assert!((0..20_000).all(|i| g.is_revoked(&format!("key_{i}"))));
        assert!((20_000..30_000).all(|i| !g.is_revoked(&format!("key_{i}"))));
        // Inserts go on in the grown filter.
        g.insert("key_late", 100);
        assert!(g.is_revoked("key_late") && g.len() == 20_001);
    }

    #[test]
    fn entries_leave_on_rebuild_a_day_after_their_expiry() {
        let f = RevocationFilter::with_capacity(10);
        f.insert("key_old", 10);
        f.insert("key_recent", 501);
        f.insert("key_new", 1000);
        let now = 500 + KEPT_PAST_EXPIRY_SECS;
        assert!(f.has_past_keeping(now));
        let g = f.without_expired(now);
        assert!(!g.is_revoked("key_old"));
        assert!(g.is_revoked("key_recent") && g.is_revoked("key_new"));
        assert_eq!(g.len(), 2);
        assert!(g.version() > f.version());
        assert!(!g.has_past_keeping(now));
    }
}
