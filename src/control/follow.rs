//! Replicas on one PostgreSQL database follow each other. Every change another replica
//! must see (API tokens, vendor credentials, signing keys, revocations, nodes) is written
//! with a `NOTIFY keybrake_changes, '<what>'` in the same transaction (`store::Change`),
//! which PostgreSQL delivers to every listener when, and only if, it commits. Each replica
//! listens on one connection of its own and reloads what the notification names, so a
//! token deleted, a credential rotated or a key revoked through one replica holds on every
//! other (and on the proxies and nodes synced from them) within milliseconds.
//!
//! Notifications are not stored: one sent while a replica was not listening (its
//! connection broke, the database restarted) is lost. So a replica reloads everything
//! each time it (re)starts listening, and every `FULL_RELOAD` anyway; revocations are
//! also polled every second (`Control::follow_revocations`). On SQLite none of this runs:
//! its store is one process's, or two during an upgrade, which poll.

use super::store::{Change, CHANGES_CHANNEL};
use super::Control;
use crate::token::now_secs;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Everything is reloaded this often even when no notification came.
const FULL_RELOAD: Duration = Duration::from_secs(10);
/// Wait before listening again after the connection failed.
const RETRY: Duration = Duration::from_millis(500);

const ALL: [Change; 5] = [
    Change::Tokens,
    Change::Credentials,
    Change::SigningKeys,
    Change::Revocations,
    Change::Nodes,
];

impl Control {
    /// Follows the other replicas' changes until the process ends (PostgreSQL only;
    /// returns at once on SQLite).
    pub async fn follow_changes(self: Arc<Self>) {
        let Some(pool) = self.store.postgres().cloned() else {
            return;
        };
        let mut failing = false;
        loop {
            let listening = async {
                let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
                listener.listen(CHANGES_CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            }
            .await;
            let mut listener = match listening {
                Ok(l) => l,
                Err(e) => {
                    if !failing {
                        log::error!("cannot listen for other replicas' changes: {e}");
                        failing = true;
                    }
                    self.apply_changes(&ALL).await;
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            if std::mem::take(&mut failing) {
                log::info!("listening for other replicas' changes again");
            }
            // What was missed while not listening.
            self.apply_changes(&ALL).await;
            loop {
                let first = match tokio::time::timeout(FULL_RELOAD, listener.try_recv()).await {
                    Err(_) => {
                        self.apply_changes(&ALL).await;
                        continue;
                    }
                    Ok(Ok(Some(n))) => n,
                    // The connection broke: listen again on a new one, then reload all.
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                };
                // A burst of changes (a thousand revocations) is applied once per kind.
                let mut changes: HashSet<Change> = HashSet::new();
                changes.extend(Change::parse(first.payload()));
                while let Some(n) = listener.next_buffered() {
                    changes.extend(Change::parse(n.payload()));
                }
                let changes: Vec<Change> = changes.into_iter().collect();
                self.apply_changes(&changes).await;
            }
            log::warn!("lost the connection listening for other replicas' changes");
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Reloads what these changes touched from the store into this replica's caches and
    /// published snapshots.
    pub(super) async fn apply_changes(&self, changes: &[Change]) {
        for change in changes {
            let result = match change {
                Change::Tokens => self.reload_tokens().await,
                Change::Credentials => {
                    let _g = self.credentials_lock.lock().await;
                    self.publish_credentials().await
                }
                Change::SigningKeys => {
                    self.refresh_signing_keys(now_secs()).await;
                    Ok(())
                }
                Change::Revocations => {
                    // Stamped on the database's clock; a minute's margin for a commit
                    // that came late (the poller reads them all every 10 s anyway).
                    let since = self.store.now_secs() - 60;
                    self.catch_up_revocations(Some(since), now_secs()).await
                }
                Change::Nodes => self.reload_nodes().await,
            };
            if let Err(e) = result {
                log::error!(
                    "cannot reload {} changed by another replica: {e:#}",
                    change.as_str()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::crypto::MasterKey;
    use crate::control::{ControlSettings, NewKey};
    use crate::database::{Database, DatabaseUrl};
    use crate::metrics::Metrics;
    use crate::money::Micros;
    use crate::secret::Secret;
    use crate::sync::Published;
    use std::time::Instant;

    async fn replica(database: &Database, name: &str, master: &str) -> Arc<Control> {
        let dir = std::env::temp_dir().join(format!("keybrake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let settings = ControlSettings {
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(3600),
            vendors: ["stripe".to_string()].into(),
            lease_lifetime: Duration::from_secs(8),
            audit_durability: Default::default(),
            expired_key_retention: crate::config::defaults::EXPIRED_KEY_RETENTION,
        };
        Control::open(
            settings,
            database,
            MasterKey::from_base64(master).unwrap(),
            Secret::new("admin"),
            Arc::new(Published::empty()),
            Metrics::global(),
        )
        .await
        .unwrap()
    }

    /// Waits (at most 1 s) until `check` holds; how long it took.
    async fn within_a_second(what: &str, check: impl Fn() -> bool) -> Duration {
        let start = Instant::now();
        while !check() {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{what}: not seen by the other replica within 1 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        start.elapsed()
    }

    /// What one replica changes, the other honours within a second (in practice a few
    /// milliseconds: the notification arrives at commit).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_sees_the_others_changes_within_a_second() {
        let url = crate::control::pg_test::database().await;
        let database = Database::Postgres {
            url: DatabaseUrl::parse(&url).unwrap(),
        };
        let master = MasterKey::generate_base64();
        let a = replica(&database, "follow-a", &master).await;
        let b = replica(&database, "follow-b", &master).await;
        let following = tokio::spawn(b.clone().follow_changes());
        // Let it start listening (it reloads everything once it does).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut took = Vec::new();

        let (tenant, token_id, token, _) = a.create_tenant("t").await.unwrap();
        took.push(
            within_a_second("a new tenant's token", || {
                b.tenant_for_token(token.expose()).as_deref() == Some(tenant.as_str())
            })
            .await,
        );
        let secret = |c: &Control| {
            c.published
                .credentials
                .load()
                .get(&tenant)
                .and_then(|v| v.get("stripe"))
                .map(|s| s.expose().to_string())
        };
        a.put_credential(&tenant, "stripe", Secret::new("sk_test_1"))
            .await
            .unwrap();
        took.push(
            within_a_second("a credential", || {
                secret(&b).as_deref() == Some("sk_test_1")
            })
            .await,
        );
        a.put_credential(&tenant, "stripe", Secret::new("sk_test_2"))
            .await
            .unwrap();
        took.push(
            within_a_second("a rotated credential", || {
                secret(&b).as_deref() == Some("sk_test_2")
            })
            .await,
        );

        // A key issued through B (its credential came from A) and revoked through A.
        let new_key = || NewKey {
            label: "l".into(),
            vendor: "stripe".into(),
            allowed_endpoints: vec!["POST /v1/payment_intents".into()],
            daily_cap: Micros(1_000_000),
            ttl: Duration::from_secs(300),
            metadata: serde_json::json!({}),
            stripe_accounts: None,
        };
        let (key, _) = b.issue_key(&tenant, new_key()).await.unwrap();
        assert!(a.get_key(&tenant, &key.id).await.unwrap().is_some());
        a.revoke_key(&tenant, &key.id).await.unwrap().unwrap();
        took.push(
            within_a_second("a revocation", || {
                b.published.revocations.load().is_revoked(&key.id)
            })
            .await,
        );

        let kid = a.rotate_signing_key().await.unwrap();
        took.push(
            within_a_second("a signing-key rotation", || {
                b.jwks().keys.iter().any(|k| k.kid == kid)
            })
            .await,
        );

        let (node, node_token) = a.create_node("edge-1").await.unwrap().unwrap();
        took.push(
            within_a_second("a new node", || {
                b.node_for_token(node_token.expose()).as_deref() == Some(node.as_str())
            })
            .await,
        );
        assert!(a.delete_node(&node).await.unwrap());
        took.push(
            within_a_second("a deleted node", || {
                b.node_for_token(node_token.expose()).is_none()
            })
            .await,
        );

        assert!(a.delete_api_token(&tenant, &token_id).await.unwrap());
        took.push(
            within_a_second("a deleted API token", || {
                b.tenant_for_token(token.expose()).is_none()
            })
            .await,
        );
        following.abort();
        took.sort();
        eprintln!(
            "replica follow latency over {} changes: median {:?}, max {:?}",
            took.len(),
            took[took.len() / 2],
            took[took.len() - 1]
        );
    }
}
