//! Stage 0 of an edge node: refuse every proxied request with 503 `control_unreachable`
//! while the node's view of the control plane is stale (SPEC §6). `serve` never goes
//! stale.
//!
//! Decided on the request path, from the time of the last sync and the clock: a flag
//! refreshed by another thread would let requests through in the moments before it runs
//! (a node resumed after a pause serves what queued meanwhile first), on a view older
//! than `max_staleness`. The sync loop also keeps a flag for what the clock does not tell
//! (not synced yet, cut off, leases lapsed). One atomic load and one clock read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// When the node's view of the control plane was last known current, on a clock that
/// only moves forward and keeps counting while the host is suspended (`token::mono_ms`: a
/// wall clock set back cannot make a node fresh, nor can a host resumed after a long
/// suspend).
pub struct SyncClock {
    /// `token::mono_ms` when the clock was made.
    start_ms: i64,
    /// Milliseconds after `start_ms` as of which the view is known current.
    synced_at_ms: AtomicU64,
    max_staleness: Duration,
}

impl SyncClock {
    pub fn new(max_staleness: Duration) -> Self {
        SyncClock {
            start_ms: crate::token::mono_ms(),
            synced_at_ms: AtomicU64::new(0),
            max_staleness,
        }
    }

    /// Time on this clock: since it was made.
    pub fn now(&self) -> Duration {
        Duration::from_millis((crate::token::mono_ms() - self.start_ms).max(0) as u64)
    }

    /// The view is current as of `at` (a time of `now`); an earlier one changes nothing.
    /// Kept a millisecond early: `now` is in whole milliseconds, so the age it gives may
    /// be short by up to one, never to make the view look fresher than it is.
    pub fn synced_as_of(&self, at: Duration) {
        self.synced_at_ms
            .fetch_max((at.as_millis() as u64).saturating_sub(1), Ordering::AcqRel);
    }

    pub fn since_sync(&self) -> Duration {
        let at = Duration::from_millis(self.synced_at_ms.load(Ordering::Acquire));
        self.now().saturating_sub(at)
    }

    pub fn too_old(&self) -> bool {
        self.since_sync() > self.max_staleness
    }

    pub fn max_staleness(&self) -> Duration {
        self.max_staleness
    }
}

#[derive(Clone, Default)]
pub struct Staleness(Option<(Arc<AtomicBool>, Arc<SyncClock>)>);

impl Staleness {
    /// A proxy fed in-process (`serve`): never stale.
    pub fn never() -> Self {
        Staleness(None)
    }

    /// Stale while `refused` is set (by whoever watches the sync) or the view `clock`
    /// keeps is older than its `max_staleness`.
    pub fn watched(refused: Arc<AtomicBool>, clock: Arc<SyncClock>) -> Self {
        Staleness(Some((refused, clock)))
    }

    #[inline]
    pub fn is_stale(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|(refused, clock)| refused.load(Ordering::Acquire) || clock.too_old())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_older_than_max_staleness_is_stale_without_anyone_saying_so() {
        let clock = Arc::new(SyncClock::new(Duration::from_millis(50)));
        let refused = Arc::new(AtomicBool::new(false));
        let staleness = Staleness::watched(refused.clone(), clock.clone());
        clock.synced_as_of(clock.now());
        assert!(!staleness.is_stale());
        // Nobody refreshes a flag: the clock alone makes it stale.
        std::thread::sleep(Duration::from_millis(80));
        assert!(staleness.is_stale());
        // An answer current as of an earlier time does not make it fresh.
        clock.synced_as_of(Duration::ZERO);
        assert!(staleness.is_stale());
        clock.synced_as_of(clock.now());
        assert!(!staleness.is_stale());
        refused.store(true, Ordering::Release);
        assert!(staleness.is_stale());
        assert!(!Staleness::never().is_stale());
    }
}
