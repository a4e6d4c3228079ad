//! Group commit for vault-key issuance. Concurrent `POST /v1/keys` calls hand their row
//! to the writer, which inserts whatever has queued up in a single multi-row statement
//! and then answers each caller. A key is durable before its token is returned; under load
//! one commit serves many keys instead of one. The same insert serves both backends; a
//! lost database is reported as `store::Unavailable` (503 to the caller).
//!
//! On SQLite one lane writes (the file has one writer). On PostgreSQL several lanes do,
//! each on its own connection: while one batch waits for its commit to be flushed, the
//! next is already being inserted, so a key never waits for a whole earlier commit before
//! its own starts.

use super::store::{is_unavailable, KeyRow, Store, Unavailable};
use anyhow::{anyhow, Result};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};

const BATCH: usize = 512;
/// Batches in flight at once on PostgreSQL.
const PG_LANES: usize = 4;

/// A failed batch, as each of its callers gets it: unavailable storage, and the message.
type Failure = (bool, String);

type Job = (KeyRow, oneshot::Sender<Result<(), Failure>>);

pub struct KeyWriter {
    tx: mpsc::Sender<Job>,
}

impl KeyWriter {
    pub fn start(store: Store) -> KeyWriter {
        let (tx, rx) = mpsc::channel::<Job>(BATCH * 8);
        let lanes = if store.postgres().is_some() {
            PG_LANES
        } else {
            1
        };
        // The lane holding the receiver takes what has queued; it lets go before inserting,
        // so the next lane gathers the next batch meanwhile.
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..lanes {
            let (store, rx) = (store.clone(), rx.clone());
            tokio::spawn(async move {
                let mut jobs = Vec::with_capacity(BATCH);
                loop {
                    if rx.lock().await.recv_many(&mut jobs, BATCH).await == 0 {
                        return;
                    }
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
        }
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
