//! One bound on the answer bytes all metered LLM calls hold at once to read their usage
//! (a JSON answer kept whole, an SSE line waiting for its end). Each call is bounded on
//! its own (`MAX_JSON`, `usage::MAX_LINE`); without a bound on them together, a key
//! could ask many cheap calls with large answers at once (embeddings of many inputs: tens
//! of MB each, a fraction of a cent) and hold the host's memory. A call that finds the
//! bound reached keeps nothing more and is charged as unmeterable: its whole reservation
//! (fail closed, as an answer over its own bound is).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Most answer bytes held for metering by the whole process.
pub const MAX_HELD: usize = 256 * 1024 * 1024;

/// Bytes held against a bound.
pub struct Pool {
    held: AtomicUsize,
    max: usize,
}

impl Pool {
    pub const fn new(max: usize) -> Pool {
        Pool {
            held: AtomicUsize::new(0),
            max,
        }
    }

    /// Bytes held now (`keybrake` shows no metric of it; tests read it).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// The process's pool.
pub static METERING: Pool = Pool::new(MAX_HELD);

/// What one call holds of a pool: its high-water mark, given back when dropped.
pub struct Held {
    pool: &'static Pool,
    bytes: usize,
}

impl Held {
    pub fn new() -> Held {
        Held::from(&METERING)
    }

    pub fn from(pool: &'static Pool) -> Held {
        Held { pool, bytes: 0 }
    }

    /// Makes sure `total` bytes are held for this call: false, and nothing more taken,
    /// when the pool has no room for them.
    pub fn cover(&mut self, total: usize) -> bool {
        let Some(more) = total.checked_sub(self.bytes).filter(|&m| m > 0) else {
            return true;
        };
        let before = self.pool.held.fetch_add(more, Ordering::AcqRel);
        if before.saturating_add(more) > self.pool.max {
            self.pool.held.fetch_sub(more, Ordering::AcqRel);
            return false;
        }
        self.bytes = total;
        true
    }
}

impl Default for Held {
    fn default() -> Held {
        Held::new()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.pool.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_hold_at_most_the_pool_together_and_give_it_back() {
        static POOL: Pool = Pool::new(100);
        let mut a = Held::from(&POOL);
        let mut b = Held::from(&POOL);
        assert!(a.cover(60));
        assert!(a.cover(40), "a lower mark takes nothing more");
        assert!(!b.cover(41), "past the pool");
        assert_eq!(POOL.held(), 60);
        assert!(b.cover(40));
        assert!(!a.cover(61));
        drop(a);
        assert_eq!(POOL.held(), 40);
        assert!(b.cover(100));
        drop(b);
        assert_eq!(POOL.held(), 0);
    }
}
