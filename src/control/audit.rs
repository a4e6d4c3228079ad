//! The audit trail's write side: the proxy hands events to `AuditWriter::record`, which
//! never blocks (a short lock and a push onto a bounded buffer; when full, the event is
//! counted as dropped), and one task swaps the buffer out every LINGER and writes it to
//! the store, one transaction per BATCH events.
//!
//! A swapped buffer rather than a channel: a request pays no wake-up of the writer and no
//! per-message queue allocation; the writer wakes on its own clock.

use super::store::Store;
use crate::metrics::Metrics;
use crate::sync::{AuditEvent, AuditSink};
use std::sync::{Arc, Mutex};

const QUEUE: usize = 65_536;
/// Room for ~10 ms of events at tens of thousands of requests per second, so the buffer
/// rarely grows (and copies) while a request holds the lock.
const INITIAL: usize = 1_024;
/// At most this many events per transaction, and at most LINGER between an event and its
/// write: short transactions keep the writer's bursts of CPU short, so on a shared core
/// it never holds up a request for long (the tail latency of the proxy).
const BATCH: usize = 256;
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);

pub struct AuditWriter {
    pending: Arc<Mutex<Vec<AuditEvent>>>,
    metrics: Arc<Metrics>,
    store: Store,
}

impl AuditWriter {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Store, metrics: Arc<Metrics>) -> AuditWriter {
        let pending = Arc::new(Mutex::new(Vec::with_capacity(INITIAL)));
        let shared = pending.clone();
        let task_metrics = metrics.clone();
        let task_store = store.clone();
        tokio::spawn(async move {
            let store = task_store;
            let mut tick = tokio::time::interval(LINGER);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut batch = Vec::with_capacity(INITIAL);
            loop {
                tick.tick().await;
                write_pending(&shared, &mut batch, &store, &task_metrics).await;
                // A burst grew the buffer: give the memory back rather than keep it.
                batch.shrink_to(INITIAL);
            }
        });
        AuditWriter {
            pending,
            metrics,
            store,
        }
    }

    /// Writes every buffered event now. Called once the proxy has stopped, before the
    /// process exits, so the last requests of a shutdown or upgrade are in the trail.
    pub async fn flush(&self) {
        let mut batch = Vec::new();
        write_pending(&self.pending, &mut batch, &self.store, &self.metrics).await;
    }
}

/// Swaps the buffer out and writes it, BATCH events per transaction.
async fn write_pending(
    pending: &Mutex<Vec<AuditEvent>>,
    batch: &mut Vec<AuditEvent>,
    store: &Store,
    metrics: &Metrics,
) {
    std::mem::swap(
        &mut *pending.lock().unwrap_or_else(|p| p.into_inner()),
        batch,
    );
    for chunk in batch.chunks(BATCH) {
        if !write_with_retries(store, chunk).await {
            metrics.audit_dropped.inc_by(chunk.len() as u64);
        }
        metrics.audit_queue_depth.sub(chunk.len() as i64);
    }
    batch.clear();
}

/// A failed batch is retried a few times; the store is local, so a failure here means
/// the disk is gone, which readiness will show. False when the events were lost.
async fn write_with_retries(store: &Store, events: &[AuditEvent]) -> bool {
    for attempt in 0..3 {
        match store.insert_audit_batch(events).await {
            Ok(()) => return true,
            Err(e) => {
                log::error!(
                    "audit batch of {} events not written (attempt {}): {e:#}",
                    events.len(),
                    attempt + 1
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    false
}

impl AuditSink for AuditWriter {
    fn record(&self, event: AuditEvent) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() < QUEUE {
            pending.push(event);
            self.metrics.audit_queue_depth.inc();
        } else {
            drop(pending);
            self.metrics.audit_dropped.inc();
        }
    }
}
