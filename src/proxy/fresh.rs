//! Stage 0 of an edge node: refuse every proxied request with 503 `control_unreachable`
//! while the node's view of the control plane is stale (SPEC §6). The sync loop sets the
//! flag; the request path pays one atomic load. `serve` never goes stale.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone, Default)]
pub struct Staleness(Option<Arc<AtomicBool>>);

impl Staleness {
    /// A proxy fed in-process (`serve`): never stale.
    pub fn never() -> Self {
        Staleness(None)
    }

    /// Stale until `flag` is cleared by whoever watches the sync.
    pub fn watched(flag: Arc<AtomicBool>) -> Self {
        Staleness(Some(flag))
    }

    #[inline]
    pub fn is_stale(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f.load(Ordering::Acquire))
    }
}
