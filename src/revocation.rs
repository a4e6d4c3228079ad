//! The revocation filter (SPEC §6): revoked key ids until their `exp`, as a bloom filter
//! in front of the exact set. The proxy asks "is this id revoked?" on every request; the
//! answer is almost always "no" from the bloom bits alone, without hashing into a map.
//!
//! Inserts are visible at once to every reader (atomic bit sets, concurrent map). Expired
//! ids are purged by rebuilding the filter and swapping it in (`ArcSwap`).

use dashmap::DashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

const HASHES: usize = 4;

pub struct RevocationFilter {
    bits: Box<[AtomicU64]>,
    exact: DashMap<Box<str>, i64, ahash::RandomState>,
    version: AtomicU64,
}

/// Fixed SipHash keys: the bit positions must be the same in every process that reads a
/// published filter.
fn positions(id: &str, nbits: usize) -> [usize; HASHES] {
    let h = {
        let mut s =
            std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().build_hasher();
        s.write(id.as_bytes());
        s.finish()
    };
    let (h1, h2) = (h as u32 as u64, (h >> 32) | 1);
    std::array::from_fn(|i| (h1.wrapping_add(h2.wrapping_mul(i as u64)) % nbits as u64) as usize)
}

impl RevocationFilter {
    /// A filter sized for about `capacity` ids at ~1% false positives (10 bits per id).
    pub fn with_capacity(capacity: usize) -> Self {
        let words = (capacity.max(1024) * 10).div_ceil(64);
        RevocationFilter {
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            exact: DashMap::default(),
            version: AtomicU64::new(0),
        }
    }

    pub fn insert(&self, id: &str, exp: i64) {
        self.exact.insert(id.into(), exp);
        for p in positions(id, self.bits.len() * 64) {
            self.bits[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
        }
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        let maybe = positions(id, self.bits.len() * 64)
            .iter()
            .all(|&p| self.bits[p / 64].load(Ordering::Acquire) & (1 << (p % 64)) != 0);
        maybe && self.exact.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.exact.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// A new filter holding the ids that have not expired at `now`, sized for them.
    pub fn without_expired(&self, now: i64) -> Self {
        let live: Vec<(Box<str>, i64)> = self
            .exact
            .iter()
            .filter(|e| *e.value() > now)
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

    #[test]
    fn expired_entries_leave_on_rebuild() {
        let f = RevocationFilter::with_capacity(10);
        f.insert("key_old", 10);
        f.insert("key_new", 1000);
        let g = f.without_expired(500);
        assert!(!g.is_revoked("key_old") && g.is_revoked("key_new"));
        assert_eq!(g.len(), 1);
        assert!(g.version() > f.version());
    }
}
