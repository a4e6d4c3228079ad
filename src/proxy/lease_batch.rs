//! Stage 7's ledger calls, batched: concurrent lease requests (above all the first lease
//! of every fresh key) go to the ledger together, one `Ledger::lease_many` call per batch
//! (`batch_queue`: no timer, the next batch starts when the one before it is answered), so
//! a fresh key costs one ledger round trip divided by the batch's size.
//!
//! A grant is added to its counter by the batch itself, not by the request that asked: a
//! request that gives up waiting (its client went away) loses nothing, and the counter
//! cannot be forgotten before the grant is in (it is held). The part of the grant the
//! ledger committed with it (`LeaseRequest::commit`) joins the counter's budget
//! committed ahead, the rest its available budget.

use super::batch_queue::BatchQueue;
use super::spend::{Held, KeySpend};
use crate::sync::{Grant, LeaseRequest, Ledger, LedgerError};
use std::sync::Arc;
use tokio::sync::oneshot;

/// At most this many requests per `lease_many` call: bounds one transaction (or one
/// HTTP body); the rest wait for the next call, which follows at once.
const MAX_BATCH: usize = 512;

struct Waiting {
    request: LeaseRequest,
    counter: Held,
    answer: oneshot::Sender<Result<Grant, LedgerError>>,
}

pub struct LeaseBatcher {
    ledger: Arc<dyn Ledger>,
    queue: BatchQueue<Waiting>,
}

impl LeaseBatcher {
    pub fn new(ledger: Arc<dyn Ledger>) -> Arc<Self> {
        Arc::new(LeaseBatcher {
            ledger,
            queue: BatchQueue::new(),
        })
    }

    /// Asks the ledger for a lease for `counter`; the grant is added to the counter
    /// before this returns it.
    pub(super) async fn lease(
        self: &Arc<Self>,
        request: LeaseRequest,
        counter: &Arc<KeySpend>,
    ) -> Result<Grant, LedgerError> {
        let (answer, answered) = oneshot::channel();
        let start = self.queue.push(Waiting {
            request,
            counter: Held::new(counter),
            answer,
        });
        if start {
            tokio::spawn(self.clone().send_batches());
        }
        answered
            .await
            .unwrap_or_else(|_| Err(LedgerError("the lease batch was dropped".into())))
    }

    async fn send_batches(self: Arc<Self>) {
        self.queue.drain(MAX_BATCH, |batch| self.send(batch)).await
    }

    async fn send(&self, batch: Vec<Waiting>) {
        let requests = batch.iter().map(|w| w.request.clone()).collect();
        let mut answers = self.ledger.lease_many(requests).await.into_iter();
        for w in batch {
            let answer = answers.next().unwrap_or_else(|| {
                Err(LedgerError(
                    "the ledger answered fewer leases than asked".into(),
                ))
            });
            match &answer {
                Ok(grant) => {
                    if let Some(settled) = grant.settled {
                        w.counter.saw_settled(settled);
                    }
                    let committed = grant.committed.min(grant.granted);
                    w.counter.add_precommitted(committed);
                    w.counter
                        .add_available(grant.granted.saturating_sub(committed));
                }
                // The ledger may have granted before the answer was lost: it gives that
                // back itself, or the counter's next report returns its uncommitted
                // budget (not both: that report could take back a later grant too).
                Err(_) if !self.ledger.gives_back_lost_leases() => w.counter.doubt_lease(),
                Err(_) => {}
            }
            let _ = w.answer.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Micros;
    use crate::sync::{LeaseCommit, LeaseReport};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Grants `want` to every request, `commit` of it committed; records the size of
    /// every batch, and holds each call until the test lets it go.
    struct Gated {
        batches: Mutex<Vec<usize>>,
        calls: AtomicUsize,
        gate: tokio::sync::Semaphore,
    }

    #[async_trait::async_trait]
    impl Ledger for Gated {
        async fn lease(&self, r: LeaseRequest) -> Result<Grant, LedgerError> {
            Ok(grant(&r))
        }
        async fn lease_many(&self, rs: Vec<LeaseRequest>) -> Vec<Result<Grant, LedgerError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.batches.lock().unwrap().push(rs.len());
            self.gate.acquire().await.unwrap().forget();
            rs.iter().map(|r| Ok(grant(r))).collect()
        }
        async fn report(&self, _: Vec<LeaseReport>) -> Result<(), LedgerError> {
            Ok(())
        }
        async fn commit(&self, c: Vec<LeaseCommit>) -> Result<Vec<bool>, LedgerError> {
            Ok(vec![true; c.len()])
        }
    }

    fn grant(r: &LeaseRequest) -> Grant {
        Grant {
            granted: r.want,
            committed: r.commit.min(r.want),
            revoked: false,
            settled: None,
        }
    }

    fn ask(key: &str) -> LeaseRequest {
        LeaseRequest {
            budget: Default::default(),
            key_id: key.into(),
            tenant_id: "tn_1".into(),
            day: 1,
            cap: Micros(10),
            min: Micros(1),
            want: Micros(3),
            commit: Micros(1),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_arriving_during_a_batch_go_together_in_the_next_and_grants_reach_the_counters(
    ) {
        let ledger = Arc::new(Gated {
            batches: Mutex::default(),
            calls: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
        });
        let batcher = LeaseBatcher::new(ledger.clone());
        let counters: Vec<Arc<KeySpend>> = (0..11)
            .map(|i| KeySpend::for_test(&format!("k{i}")))
            .collect();
        // The first request finds the ledger idle: its batch starts at once, alone.
        let first = {
            let (b, c) = (batcher.clone(), counters[0].clone());
            tokio::spawn(async move { b.lease(ask("k0"), &c).await })
        };
        while ledger.calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Ten more while it is in flight: they wait, then go as one batch.
        let rest: Vec<_> = (1..11)
            .map(|i| {
                let (b, c) = (batcher.clone(), counters[i].clone());
                tokio::spawn(async move { b.lease(ask(&format!("k{i}")), &c).await })
            })
            .collect();
        while batcher.queue.waiting() < 10 {
            tokio::task::yield_now().await;
        }
        ledger.gate.add_permits(2);
        let three_one = Grant {
            granted: Micros(3),
            committed: Micros(1),
            revoked: false,
            settled: None,
        };
        assert_eq!(first.await.unwrap().unwrap(), three_one);
        for r in rest {
            assert_eq!(r.await.unwrap().unwrap(), three_one);
        }
        assert_eq!(*ledger.batches.lock().unwrap(), vec![1, 10]);
        // What the ledger committed with the grant is budget committed ahead.
        for c in &counters {
            assert_eq!(c.available_for_test(), Micros(2));
            assert_eq!(c.precommitted_for_test(), Micros(1));
        }
        // Idle again: the next request starts its own batch without waiting.
        ledger.gate.add_permits(1);
        let c = KeySpend::for_test("k_last");
        assert_eq!(batcher.lease(ask("k_last"), &c).await.unwrap(), three_one);
        assert_eq!(*ledger.batches.lock().unwrap(), vec![1, 10, 1]);
    }
}
