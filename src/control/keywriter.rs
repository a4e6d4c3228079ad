//! Group commit for vault-key issuance. Concurrent `POST /v1/keys` calls hand their row
//! to the writer, which inserts whatever has queued up in a single multi-row statement
//! and then answers each caller. A key is durable before its token is returned; under load
//! one commit serves many keys instead of one. The same insert serves both backends; a
//! lost database is reported as `store::Unavailable` (503 to the caller).
//!
//! One writer serves both backends: while its insert is in flight the next calls queue,
//! and the next statement takes them all. Several writers at once were measured worse on
//! PostgreSQL (load-tests/RESULTS.md, 2026-12-03 sixth session): they split the queue into
//! small batches, each a statement and a commit of its own, and at 6 concurrent callers
//! the p99 was 53–87 ms against 4–9 ms with one writer, the database sharing keybrake's
//! core. With one writer a key waits at most for the commit in flight and its own.

use super::store::{is_unavailable, KeyRow, Store, Unavailable};
use anyhow::{anyhow, Result};
use tokio::sync::{mpsc, oneshot};

const BATCH: usize = 512;

/// A failed batch, as each of its callers gets it: unavailable storage, and the message.
type Failure = (bool, String);

type Job = (KeyRow, oneshot::Sender<Result<(), Failure>>);

pub struct KeyWriter {
    tx: mpsc::Sender<Job>,
}

impl KeyWriter {
    pub fn start(store: Store) -> KeyWriter {
        let (tx, mut rx) = mpsc::channel::<Job>(BATCH * 8);
        tokio::spawn(async move {
            let mut jobs = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut jobs, BATCH).await > 0 {
                let rows: Vec<KeyRow> = jobs.iter().map(|(row, _)| row.clone()).collect();
                let result = store
                    .insert_keys(&rows)
                    .await
                    .map_err(|e| (is_unavailable(&e), format!("{e:#}")));
                for (_, reply) in jobs.drain(..) {
                    let _ = reply.send(result.clone());
                }
            }
        });
        KeyWriter { tx }
    }

    pub async fn insert(&self, row: KeyRow) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((row, reply))
            .await
            .map_err(|_| anyhow!("the key writer stopped"))?;
        answer
            .await
            .map_err(|_| anyhow!("the key writer stopped"))?
            .map_err(|(unavailable, e)| {
                if unavailable {
                    anyhow::Error::new(Unavailable(e))
                } else {
                    anyhow!("storing the key failed: {e}")
                }
            })
    }
}
