//! The audit trail's write side: the proxy hands events to `AuditWriter::record`, which
//! never blocks (a bounded queue; when full, the event is counted as dropped), and one
//! task writes them to the store in batches, one transaction per batch.

use super::store::Store;
use crate::metrics::Metrics;
use crate::sync::{AuditEvent, AuditSink};
use std::sync::Arc;
use tokio::sync::mpsc;

const QUEUE: usize = 65_536;
/// At most this many events per transaction, and at most LINGER between an event and its
/// write: short transactions keep the writer's bursts of CPU short, so on a shared core
/// it never holds up a request for long (the tail latency of the proxy).
const BATCH: usize = 256;
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);

pub struct AuditWriter {
    tx: mpsc::Sender<AuditEvent>,
    metrics: Arc<Metrics>,
}

impl AuditWriter {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Store, metrics: Arc<Metrics>) -> AuditWriter {
        let (tx, mut rx) = mpsc::channel::<AuditEvent>(QUEUE);
        let task_metrics = metrics.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                // Let a busy proxy fill the batch: one statement and no wake-up per event.
                // Events still reach the store within ~10 ms.
                if batch.len() < BATCH {
                    tokio::time::sleep(LINGER).await;
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(event) => batch.push(event),
                            Err(_) => break,
                        }
                    }
                }
                task_metrics.audit_queue_depth.sub(batch.len() as i64);
                // A failed batch is retried a few times; the store is local, so a failure
                // here means the disk is gone, which readiness will show.
                for attempt in 0..3 {
                    match store.insert_audit_batch(&batch).await {
                        Ok(()) => break,
                        Err(e) => {
                            log::error!(
                                "audit batch of {} events not written (attempt {}): {e:#}",
                                batch.len(),
                                attempt + 1
                            );
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
                batch.clear();
            }
        });
        AuditWriter { tx, metrics }
    }
}

impl AuditSink for AuditWriter {
    fn record(&self, event: AuditEvent) {
        match self.tx.try_send(event) {
            Ok(()) => self.metrics.audit_queue_depth.inc(),
            Err(_) => self.metrics.audit_dropped.inc(),
        }
    }
}
