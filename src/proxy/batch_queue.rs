//! The batching both ledger stages share (`lease_batch`, `write_ahead`): no timer. An item
//! that finds no batch in flight starts one at once (an idle ledger adds no latency);
//! items arriving while a batch is in flight wait and go together in the next one, which
//! starts the moment the batch before it is answered. Under load a batch grows with the
//! load, so each item costs one ledger round trip divided by the batch's size.

use std::future::Future;
use std::sync::Mutex;

pub(super) struct BatchQueue<T> {
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    waiting: Vec<T>,
    /// A sender is running; it takes whatever is waiting until nothing is.
    sending: bool,
}

impl<T> BatchQueue<T> {
    pub(super) fn new() -> Self {
        BatchQueue {
            inner: Mutex::new(Inner {
                waiting: Vec::new(),
                sending: false,
            }),
        }
    }

    /// Queues `item`. True when no sender is running: the caller starts one (`drain`).
    pub(super) fn push(&self, item: T) -> bool {
        let mut q = self.lock();
        q.waiting.push(item);
        !std::mem::replace(&mut q.sending, true)
    }

    /// The sender: hands the waiting items to `send`, at most `max` at a time, one batch
    /// after the other, until nothing waits. Should it end early (a panic in `send`), the
    /// next `push` starts another sender instead of waiting forever; the items of the lost
    /// batch are dropped with it (their waiters see their answer channel closed).
    pub(super) async fn drain<F, Fut>(&self, max: usize, mut send: F)
    where
        F: FnMut(Vec<T>) -> Fut,
        Fut: Future<Output = ()>,
    {
        // Clears `sending` if this sender ends other than by finding nothing waiting (then
        // it is cleared under the same lock as that check: clearing it again afterwards
        // could let two senders run, one started by a `push` in between).
        struct Stop<'a, T> {
            queue: &'a BatchQueue<T>,
            done: bool,
        }
        impl<T> Drop for Stop<'_, T> {
            fn drop(&mut self) {
                if !self.done {
                    self.queue.lock().sending = false;
                }
            }
        }
        let mut stop = Stop {
            queue: self,
            done: false,
        };
        loop {
            let batch: Vec<T> = {
                let mut q = self.lock();
                if q.waiting.is_empty() {
                    q.sending = false;
                    stop.done = true;
                    return;
                }
                let n = q.waiting.len().min(max);
                q.waiting.drain(..n).collect()
            };
            send(batch).await;
        }
    }

    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
