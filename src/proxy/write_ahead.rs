//! Stage 7's write-ahead (SPEC §5, "never above the cap" across a crash): a reservation is
//! committed in the ledger (`Ledger::commit`) before its call may be forwarded. Should
//! this process die with calls in flight (kill -9), the ledger settles what was committed
//! as spent when it reclaims the process's leases, and gives back only the rest.
//!
//! Batched and pipelined like `lease_batch` (`batch_queue`): a reservation that finds no
//! commit in flight starts one at once; reservations arriving meanwhile wait and go
//! together in the next call, which starts the moment the one before it is answered.
//! Reservations of one
//! (key, day) in a batch travel as one row, and each row commits as much again as the
//! batch needs when the lease has it (headroom): the key's next reservations take from
//! that committed budget without a round trip. A key reserving from its headroom tops it
//! up in the background before it runs dry (`top_up`, see `spend`), so a busy key's calls
//! do not wait for the ledger (an HTTP call on an edge node, a SQLite transaction in
//! `serve`) at all, and a node whose control plane is unreachable still serves what it
//! committed ahead. The price: a process that dies loses its headroom (counted as spent
//! for the day, at most what its leases hold) besides its calls in flight; the rest of
//! its leases comes back.
//!
//! What happens to a reservation's budget is decided here, not by the waiting request:
//! committed and the request gone (its client went away) → it joins the headroom;
//! refused (the ledger no longer sees it in the lease) → the counter's unreserved budget
//! is dropped, since the ledger does not count it as this process's; unknown (the call
//! failed) → back into the lease uncommitted. In the last case the ledger may have
//! committed it after all: then it counts that much as spent until the lease ends, which
//! errs on the side of the cap.

use super::batch_queue::BatchQueue;
use super::spend::{Held, KeySpend, SpendError};
use crate::money::Micros;
use crate::sync::{Budget, LeaseCommit, Ledger};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::oneshot;

/// At most this many reservations per `Ledger::commit` call; the rest go in the next one.
const MAX_BATCH: usize = 512;

struct Waiting {
    counter: Held,
    amount: Micros,
    /// `None`: a top-up (`amount` zero), nobody waits for it.
    answer: Option<oneshot::Sender<Result<(), SpendError>>>,
    /// Headroom wanted besides what the batch needs.
    ahead: Micros,
}

pub struct WriteAhead {
    ledger: Arc<dyn Ledger>,
    queue: BatchQueue<Waiting>,
}

impl WriteAhead {
    pub fn new(ledger: Arc<dyn Ledger>) -> Arc<Self> {
        Arc::new(WriteAhead {
            ledger,
            queue: BatchQueue::new(),
        })
    }

    /// Commits `amount`, already taken from `counter`'s available budget. `Ok`: the ledger
    /// holds it as committed and the call may go. `Err`: nothing may be sent; the budget
    /// was dealt with as the module comment says.
    pub(super) async fn commit(
        self: &Arc<Self>,
        counter: &Arc<KeySpend>,
        amount: Micros,
    ) -> Result<(), SpendError> {
        let (answer, answered) = oneshot::channel();
        let start = self.queue.push(Waiting {
            counter: Held::new(counter),
            amount,
            answer: Some(answer),
            ahead: Micros::ZERO,
        });
        if start {
            tokio::spawn(self.clone().send_batches());
        }
        answered.await.unwrap_or(Err(SpendError::LedgerUnavailable))
    }

    /// Commits up to `want` more of `counter`'s available budget ahead, in the next batch,
    /// without waiting: a busy key's headroom is refilled before it runs out. The caller
    /// has set the counter's `topping_up` flag; the batch clears it.
    pub(super) fn top_up(self: &Arc<Self>, counter: &Arc<KeySpend>, want: Micros) {
        let start = self.queue.push(Waiting {
            counter: Held::new(counter),
            amount: Micros::ZERO,
            answer: None,
            ahead: want,
        });
        if start {
            tokio::spawn(self.clone().send_batches());
        }
    }

    async fn send_batches(self: Arc<Self>) {
        self.queue.drain(MAX_BATCH, |batch| self.send(batch)).await
    }

    /// One batch: its rows committed in one `Ledger::commit`, each waiter answered.
    async fn send(&self, batch: Vec<Waiting>) {
        let (mut commits, rows, firsts, wants) = rows_of(&batch);
        // Headroom: each key commits as much again as this batch needs, or what a
        // top-up asked for, if its lease has it; its next reservations go without a
        // round trip.
        let ahead: Vec<Micros> = commits
            .iter_mut()
            .zip(firsts.iter().zip(&wants))
            .map(|(c, (&w, &want))| {
                // Counted in transit before it leaves `available`, so a reservation
                // never finds it in neither place.
                let counter = &batch[w].counter;
                let want = want.max(c.amount);
                counter.add_in_transit(want);
                let ahead = counter.take_up_to(want);
                counter.add_in_transit(Micros(ahead.0 - want.0));
                c.amount = c.amount.saturating_add(ahead);
                ahead
            })
            .collect();
        // Rows with nothing to commit (a top-up finding no budget) are not sent.
        let sent: Vec<usize> = (0..commits.len())
            .filter(|&i| commits[i].amount.is_positive())
            .collect();
        let to_send: Vec<LeaseCommit> = sent.iter().map(|&i| commits[i].clone()).collect();
        let mut answers: Option<Vec<bool>> = Some(vec![true; commits.len()]);
        if !to_send.is_empty() {
            match self.ledger.commit(to_send).await {
                Ok(a) if a.len() == sent.len() => {
                    if let Some(all) = answers.as_mut() {
                        for (&i, ok) in sent.iter().zip(a) {
                            all[i] = ok;
                        }
                    }
                }
                Ok(_) => {
                    log::error!("the ledger answered a different number of commits than asked");
                    answers = None;
                }
                Err(e) => {
                    // Every metered call fails so while the ledger is unreachable: one
                    // line per 10 s, not one per call.
                    static LOG: crate::log_every::LogEvery =
                        crate::log_every::LogEvery::new(std::time::Duration::from_secs(10));
                    if let Some(others) = LOG.due() {
                        log::error!(
                            "write-ahead of reservations failed, refusing them ({others} more failed writes since the last such line): {e}"
                        );
                    }
                    answers = None;
                }
            }
        }
        for (i, (w, row)) in batch.into_iter().zip(rows).enumerate() {
            let ok = answers.as_ref().map(|a| a[row]);
            if firsts[row] == i {
                match ok {
                    Some(true) => w.counter.add_precommitted(ahead[row]),
                    // Refused: the lease holds less than the counter thinks (see below).
                    Some(false) => w.counter.doubt_lease(),
                    None => w.counter.add_available(ahead[row]),
                }
                w.counter.add_in_transit(Micros(-ahead[row].0));
            }
            let Some(answer) = w.answer else {
                w.counter.topped_up();
                continue;
            };
            match ok {
                Some(true) => {
                    if let Err(Ok(())) = answer.send(Ok(())) {
                        // Committed, but nobody will send the call: it joins the
                        // budget committed ahead.
                        w.counter.add_precommitted(w.amount);
                    }
                }
                Some(false) => {
                    w.counter.drop_available();
                    // Short because the lease was reclaimed, or because a report in
                    // doubt gave budget back meanwhile: whatever the ledger still holds
                    // uncommitted goes back with the next report.
                    w.counter.doubt_lease();
                    let _ = answer.send(Err(SpendError::LedgerUnavailable));
                }
                None => {
                    w.counter.add_available(w.amount);
                    let _ = answer.send(Err(SpendError::LedgerUnavailable));
                }
            }
        }
    }
}

/// One commit per (key, day) of the batch, the index of each waiter's commit, each
/// commit's first waiter (whose counter holds the headroom), and the most headroom a
/// top-up of that key asked for.
type Rows = (Vec<LeaseCommit>, Vec<usize>, Vec<usize>, Vec<Micros>);

fn rows_of(batch: &[Waiting]) -> Rows {
    let mut commits: Vec<LeaseCommit> = Vec::new();
    let mut firsts = Vec::new();
    let mut wants = Vec::new();
    let mut index: HashMap<(&str, i64), usize> = HashMap::new();
    let rows = batch
        .iter()
        .enumerate()
        .map(|(n, w)| {
            let slot = (w.counter.key_id(), w.counter.day());
            let i = *index.entry(slot).or_insert_with(|| {
                commits.push(LeaseCommit {
                    budget: Budget::KeyDaily,
                    key_id: slot.0.to_string(),
                    day: slot.1,
                    amount: Micros::ZERO,
                });
                firsts.push(n);
                wants.push(Micros::ZERO);
                commits.len() - 1
            });
            let c = &mut commits[i];
            c.amount = c.amount.saturating_add(w.amount);
            wants[i] = wants[i].max(w.ahead);
            i
        })
        .collect();
    (commits, rows, firsts, wants)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{Grant, LeaseReport, LeaseRequest, LedgerError};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Accepts commits of keys not named `refused`; records every call's rows, and holds
    /// each call until the test lets it go.
    struct Gated {
        calls: Mutex<Vec<Vec<LeaseCommit>>>,
        started: AtomicUsize,
        gate: tokio::sync::Semaphore,
        fail: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Ledger for Gated {
        async fn lease(&self, r: LeaseRequest) -> Result<Grant, LedgerError> {
            Ok(Grant::uncommitted(r.want))
        }
        async fn report(&self, _: Vec<LeaseReport>) -> Result<(), LedgerError> {
            Ok(())
        }
        async fn commit(&self, commits: Vec<LeaseCommit>) -> Result<Vec<bool>, LedgerError> {
            self.started.fetch_add(1, Ordering::SeqCst);
            self.calls.lock().unwrap().push(commits.clone());
            self.gate.acquire().await.unwrap().forget();
            if self.fail.load(Ordering::SeqCst) {
                return Err(LedgerError("down".into()));
            }
            Ok(commits.iter().map(|c| c.key_id != "refused").collect())
        }
    }

    fn gated() -> Arc<Gated> {
        Arc::new(Gated {
            calls: Mutex::default(),
            started: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
            fail: Default::default(),
        })
    }

    /// A counter with `available` budget left beside what the commit is for.
    fn counter(key: &str, available: i64) -> Arc<KeySpend> {
        let c = KeySpend::for_test(key);
        c.add_available(Micros(available));
        c
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reservations_waiting_during_a_commit_go_together_one_row_per_key() {
        let ledger = gated();
        let wa = WriteAhead::new(ledger.clone());
        let (a, b, refused) = (counter("a", 0), counter("b", 0), counter("refused", 5));
        let first = {
            let (wa, a) = (wa.clone(), a.clone());
            tokio::spawn(async move { wa.commit(&a, Micros(1)).await })
        };
        while ledger.started.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let mut rest = Vec::new();
        for (c, amount) in [(&a, 2), (&b, 3), (&a, 4), (&refused, 6)] {
            let (wa, c) = (wa.clone(), c.clone());
            rest.push(tokio::spawn(
                async move { wa.commit(&c, Micros(amount)).await },
            ));
        }
        while wa.queue.waiting() < 4 {
            tokio::task::yield_now().await;
        }
        ledger.gate.add_permits(2);
        assert_eq!(first.await.unwrap(), Ok(()));
        let answers: Vec<_> = futures_answers(rest).await;
        assert_eq!(
            answers,
            vec![Ok(()), Ok(()), Ok(()), Err(SpendError::LedgerUnavailable)]
        );
        let mut calls = ledger.calls.lock().unwrap().clone();
        // One row per key; their order is the queue's, which the test does not fix.
        calls[1].sort_by(|x, y| x.key_id.cmp(&y.key_id));
        let row = |k: &str, d: i64, m: i64| LeaseCommit {
            budget: Budget::KeyDaily,
            key_id: k.into(),
            day: d,
            amount: Micros(m),
        };
        assert_eq!(calls[0], vec![row("a", 1, 1)]);
        // `refused` had 5 more in its lease: committed ahead with its 6.
        assert_eq!(
            calls[1],
            vec![row("a", 1, 6), row("b", 1, 3), row("refused", 1, 11)]
        );
        // Refused: the ledger does not hold the counter's budget for us any more.
        assert_eq!(refused.available_for_test(), Micros::ZERO);
        assert_eq!(refused.precommitted_for_test(), Micros::ZERO);
        assert_eq!(a.available_for_test(), Micros::ZERO);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_puts_the_budget_back_and_refuses_the_call() {
        let ledger = gated();
        ledger.fail.store(true, Ordering::SeqCst);
        ledger.gate.add_permits(1);
        let wa = WriteAhead::new(ledger.clone());
        let c = counter("k", 3);
        assert_eq!(
            wa.commit(&c, Micros(7)).await,
            Err(SpendError::LedgerUnavailable)
        );
        assert_eq!(c.available_for_test(), Micros(10));
        assert_eq!(c.precommitted_for_test(), Micros::ZERO);
        assert_eq!(c.unreserved_for_test(), Micros::ZERO);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_whose_request_went_away_and_the_headroom_are_committed_ahead() {
        let ledger = gated();
        let wa = WriteAhead::new(ledger.clone());
        let c = counter("k", 20);
        let waiting = {
            let (wa, c) = (wa.clone(), c.clone());
            tokio::spawn(async move { wa.commit(&c, Micros(9)).await })
        };
        while ledger.started.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        waiting.abort();
        let _ = waiting.await;
        ledger.gate.add_permits(1);
        while c.precommitted_for_test() < Micros(18) {
            tokio::task::yield_now().await;
        }
        assert_eq!(ledger.calls.lock().unwrap()[0][0].amount, Micros(18));
        assert_eq!(c.precommitted_for_test(), Micros(18));
        assert_eq!(c.available_for_test(), Micros(11));
    }

    async fn futures_answers(
        handles: Vec<tokio::task::JoinHandle<Result<(), SpendError>>>,
    ) -> Vec<Result<(), SpendError>> {
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }
}
