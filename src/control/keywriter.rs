//! Group commit for vault-key issuance. Concurrent `POST /v1/keys` calls hand their row
//! to one task, which inserts whatever has queued up in a single transaction and then
//! answers each caller. A key is durable before its token is returned; under load one
//! commit serves many keys instead of one.

use super::store::{KeyRow, Store};
use anyhow::{anyhow, Result};
use tokio::sync::{mpsc, oneshot};

const BATCH: usize = 512;

type Job = (KeyRow, oneshot::Sender<Result<(), String>>);

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
                let result = store.insert_keys(&rows).await.map_err(|e| format!("{e:#}"));
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
            .map_err(|e| anyhow!("storing the key failed: {e}"))
    }
}
