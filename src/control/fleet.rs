//! The control plane's side of the edge fleet (SPEC §1, §5, §6): node tokens, the
//! versioned change feed that edge nodes long-poll (public keys, vendor credentials,
//! revocations as deltas), node sessions as lease holders, and spend and audit coming
//! back from nodes. The HTTP shapes are in `sync_api`.

use super::Control;
use crate::ids::{new_id, token_hash};
use crate::money::Micros;
use crate::sync::{AuditEvent, Grant, LeaseCommit, LeaseReport, LeaseRequest, LedgerError};
use crate::token::{now_secs, unix_ms, Jwks};
use anyhow::Result;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Revocations kept for deltas: a node further behind than this gets a full snapshot.
const REVOCATION_LOG: usize = 100_000;

/// How many days back a node's spend report is still applied (`about_known_keys`).
const REPORT_DAYS_BACK: i64 = 7;

/// What changed since a version: the feed's state and its recent revocations.
struct FeedLog {
    /// Versions at or below `floor` have left the log: older nodes get everything.
    floor: u64,
    revoked: VecDeque<(u64, String, i64)>,
}

/// Nodes known to this process, the change feed, and when each node last synced.
pub struct Fleet {
    /// This process's feed id: versions of another process (or of a restart) mean nothing
    /// here, so a node that sends another epoch gets a full snapshot.
    pub epoch: String,
    version: tokio::sync::watch::Sender<u64>,
    log: std::sync::Mutex<FeedLog>,
    /// Node token hash → node id.
    tokens: DashMap<[u8; 32], String>,
    /// Node id → last sync (unix ms), as seen by this process.
    last_sync: DashMap<String, i64>,
    /// Set when this process stops: node audit batches are refused (the node sends them
    /// again to the next process) so that every batch accepted is written before exit.
    audit_closed: std::sync::RwLock<bool>,
}

impl Fleet {
    pub fn new() -> Fleet {
        Fleet {
            epoch: new_id("ep_"),
            version: tokio::sync::watch::channel(1).0,
            log: std::sync::Mutex::new(FeedLog {
                floor: 1,
                revoked: VecDeque::new(),
            }),
            tokens: DashMap::new(),
            last_sync: DashMap::new(),
            audit_closed: std::sync::RwLock::new(false),
        }
    }

    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Something nodes hold changed (keys, credentials, nodes): wakes every long-poll.
    pub fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// A key was revoked: goes into the delta log, then wakes every long-poll.
    pub fn revoked(&self, id: &str, exp: i64) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = 0;
        self.version.send_modify(|v| {
            *v += 1;
            next = *v;
        });
        log.revoked.push_back((next, id.to_string(), exp));
        while log.revoked.len() > REVOCATION_LOG {
            if let Some((v, _, _)) = log.revoked.pop_front() {
                log.floor = v;
            }
        }
    }

    /// Revocations after `since`, or `None` when the log no longer reaches back that far.
    fn revoked_since(&self, since: u64) -> Option<Vec<(String, i64)>> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if since < log.floor {
            return None;
        }
        Some(
            log.revoked
                .iter()
                .filter(|(v, _, _)| *v > since)
                .map(|(_, id, exp)| (id.clone(), *exp))
                .collect(),
        )
    }

    fn node_for_token(&self, token: &str) -> Option<String> {
        self.tokens.get(&token_hash(token)).map(|n| n.clone())
    }

    pub fn is_node(&self, id: &str) -> bool {
        self.tokens.iter().any(|n| n.value() == id)
    }

    fn synced(&self, node: &str) {
        self.last_sync.insert(node.to_string(), unix_ms() as i64);
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet::new()
    }
}

/// One answer of the long-poll. `full`: the node replaces everything it holds; otherwise
/// `revoked` holds only revocations after the version it sent (and `jwks` / `credentials`
/// are absent when nothing changed at all).
#[derive(Serialize, Deserialize)]
pub struct SyncAnswer {
    pub epoch: String,
    pub version: u64,
    pub full: bool,
    pub jwks: Option<Jwks>,
    /// tenant id → vendor → secret, in clear: this body only travels to an authenticated
    /// node, over TLS when the control URL is https.
    pub credentials:
        Option<std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>>,
    pub revoked: Vec<(String, i64)>,
    /// How long the node's leases stay its own from the moment it sent this poll.
    pub lease_valid_for_ms: u64,
    /// The node's session was taken for dead and its leases given back.
    pub leases_lapsed: bool,
    /// How long the poll was held before this answer was built (ms): the answer is
    /// current as of at least that long after the node sent the poll, however late it
    /// arrives.
    #[serde(default)]
    pub held_ms: u64,
}

/// A node session's holder id in the ledger: one per process start, so the leases of a
/// node that restarts are reclaimed and never confused with its new ones.
pub fn holder_id(node: &str, session: &str) -> String {
    format!("{node}.{session}")
}

/// A session id sent by a node: short and plain, since it becomes part of a holder id.
pub fn valid_session(session: &str) -> bool {
    (8..=64).contains(&session.len())
        && session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Control {
    /// Loads the nodes' tokens (hashes) from the store into memory; true if any was added,
    /// removed or changed hands.
    pub(super) async fn load_nodes(&self) -> Result<bool> {
        let stored = self.store.all_nodes().await?;
        let before = self.fleet.tokens.len();
        self.fleet.tokens.retain(|h, _| {
            stored
                .iter()
                .any(|(_, _, _, hash)| hash.as_slice() == h.as_slice())
        });
        let mut changed = self.fleet.tokens.len() != before;
        for (id, _, _, hash) in stored {
            if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
                changed |= self.fleet.tokens.insert(hash, id.clone()).as_ref() != Some(&id);
            }
        }
        Ok(changed)
    }

    /// Reloads the nodes after another replica changed them: a deleted node's token stops
    /// working here too, and its long-polls are answered now.
    pub(super) async fn reload_nodes(&self) -> Result<()> {
        if !self.load_nodes().await? {
            // Nothing changed (the periodic reload): no node is woken.
            return Ok(());
        }
        let live: std::collections::HashSet<String> = self
            .fleet
            .tokens
            .iter()
            .map(|e| e.value().clone())
            .collect();
        self.fleet.last_sync.retain(|id, _| live.contains(id));
        self.fleet.bump();
        Ok(())
    }

    /// The node owning this token. Looked up by SHA-256, never by the token itself.
    pub fn node_for_token(&self, token: &str) -> Option<String> {
        self.fleet.node_for_token(token)
    }

    pub(super) fn node_created(&self, id: &str, token: &str) {
        self.fleet.tokens.insert(token_hash(token), id.to_string());
    }

    /// Every node with its last sync (unix ms, `None`: never synced with this process).
    pub async fn list_nodes(&self) -> Result<Vec<(String, String, i64, Option<i64>)>> {
        Ok(self
            .store
            .all_nodes()
            .await?
            .into_iter()
            .map(|(id, name, created, _)| {
                let last = self.fleet.last_sync.get(&id).map(|t| *t);
                (id, name, created, last)
            })
            .collect())
    }

    /// Deletes a node: its token stops working at once and its long-polls are answered
    /// (with 401) now. Its leases are reclaimed like any silent holder's, after their
    /// lifetime.
    pub async fn delete_node(&self, id: &str) -> Result<bool> {
        if !self.store.delete_node(id).await? {
            return Ok(false);
        }
        self.fleet.tokens.retain(|_, n| n != id);
        self.fleet.last_sync.remove(id);
        self.fleet.bump();
        Ok(true)
    }

    /// A node session starts: registered as a lease holder.
    pub async fn node_hello(&self, node: &str, session: &str) -> Result<()> {
        let now = self.store.now_secs();
        self.store
            .register_holder(
                &holder_id(node, session),
                now,
                now.saturating_add(super::lease_lifetime_secs(&self.settings)),
            )
            .await?;
        self.fleet.synced(node);
        Ok(())
    }

    /// The long-poll: waits up to `wait` for a change after `since` (of `epoch`), then
    /// answers what changed. `None` when the node was deleted meanwhile.
    pub async fn node_poll(
        &self,
        node: &str,
        session: &str,
        epoch: &str,
        since: u64,
        wait: Duration,
    ) -> Result<Option<SyncAnswer>> {
        let received = std::time::Instant::now();
        let lifetime = super::lease_lifetime_secs(&self.settings);
        let alive = self
            .store
            .heartbeat_holder(
                &holder_id(node, session),
                self.store.now_secs().saturating_add(lifetime),
            )
            .await?;
        // A poll answers within a quarter of the time the node may spend its leases (the
        // lifetime less the margin, counted from when it sent the poll), so the next
        // answer extends them with half that time to spare.
        let valid_ms = ((lifetime - super::LEASE_MARGIN_SECS).max(0) as u64).saturating_mul(1000);
        let wait = wait.min(Duration::from_millis(valid_ms / 4));
        let same_epoch = epoch == self.fleet.epoch;
        // A session taken for dead waits too: it learns so from the first answer, and
        // one answered at once would poll again at once, in a loop.
        if same_epoch && since == self.fleet.version() {
            let mut rx = self.fleet.version.subscribe();
            let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v != since)).await;
        }
        if !self.fleet.is_node(node) {
            return Ok(None);
        }
        self.fleet.synced(node);
        // Measured before anything is read: every change up to now is in the answer.
        let held_ms = received.elapsed().as_millis() as u64;
        let version = self.fleet.version();
        let delta = if same_epoch && since <= version {
            self.fleet.revoked_since(since)
        } else {
            None
        };
        let lease_valid_for_ms = if alive { valid_ms } else { 0 };
        let (full, revoked) = match delta {
            Some(r) => (false, r),
            None => (true, self.published.revocations.load().ids()),
        };
        let changed = full || version != since;
        let credentials = changed.then(|| {
            self.published
                .credentials
                .load()
                .iter()
                .map(|(t, vendors)| {
                    (
                        t.clone(),
                        vendors
                            .iter()
                            .map(|(v, s)| (v.clone(), s.expose().to_string()))
                            .collect(),
                    )
                })
                .collect()
        });
        Ok(Some(SyncAnswer {
            epoch: self.fleet.epoch.clone(),
            version,
            full,
            jwks: changed.then(|| (*self.jwks()).clone()),
            credentials,
            revoked,
            lease_valid_for_ms,
            leases_lapsed: !alive,
            held_ms,
        }))
    }

    /// Leases for a node session, asked in one store transaction, each grant atomic;
    /// `batch` is the node's number for them (`Store::lease_grant_many`). A request for a
    /// day this control plane is not in (`is_lease_day`) is an error, not a grant of
    /// nothing: the node answers 503 `ledger_unavailable` (not 429 `cap_exhausted` for
    /// a key with budget left), and both sides log it.
    pub async fn node_leases(
        &self,
        node: &str,
        session: &str,
        batch: Option<u64>,
        requests: Vec<LeaseRequest>,
    ) -> Vec<Result<Grant, LedgerError>> {
        // The day by the clock holders' deadlines are kept on (the database server's with
        // PostgreSQL): replicas agree on it near midnight whatever their own clocks say.
        let now = self.store.now_secs();
        let on_day: Vec<bool> = requests.iter().map(|r| is_lease_day(r.day, now)).collect();
        let off_day = requests
            .iter()
            .find(|r| !is_lease_day(r.day, now))
            .map(|r| off_day_error(node, r.day, now));
        let asks: Vec<LeaseRequest> = requests
            .into_iter()
            .filter(|r| is_lease_day(r.day, now))
            .collect();
        let asked = asks.len();
        let grants = if asks.is_empty() {
            Vec::new()
        } else {
            let grants = match self.checked_against_keys(asks).await {
                Ok(asks) => {
                    self.lease_many_for(&holder_id(node, session), batch, asks)
                        .await
                }
                Err(e) => (0..asked)
                    .map(|_| Err(LedgerError(format!("{e:#}"))))
                    .collect(),
            };
            // The store's own words (SQL, constraint names) stay in this log: the node is
            // told that the grant failed and where to look.
            static LOG: crate::log_every::LogEvery =
                crate::log_every::LogEvery::new(Duration::from_secs(10));
            let failed = grants.iter().find(|g| g.is_err());
            if let Some(Err(e)) = failed.filter(|_| LOG.due().is_some()) {
                log::warn!(
                    "cannot grant node {node}'s lease batch {}: {}",
                    batch.map_or("(unnumbered)".into(), |b| b.to_string()),
                    e.0
                );
            }
            grants
                .into_iter()
                .map(|g| {
                    g.map_err(|_| {
                        LedgerError(
                            "the control plane could not record this grant (its log says why)"
                                .into(),
                        )
                    })
                })
                .collect()
        };
        // In the order asked.
        let mut grants = grants.into_iter();
        on_day
            .into_iter()
            .map(|on| match (on, &off_day) {
                (true, _) => grants
                    .next()
                    .unwrap_or_else(|| Err(LedgerError("no grant".into()))),
                (false, Some(e)) => Err(LedgerError(e.0.clone())),
                (false, None) => Err(LedgerError("no grant".into())),
            })
            .collect()
    }

    /// A node's lease requests as the key rows have them: the cap is the key's, not the
    /// node's word, and a key that does not exist, belongs to another tenant, or is
    /// revoked or expired is asked for nothing. (`serve`'s own proxy asks with claims
    /// this process verified.)
    async fn checked_against_keys(&self, requests: Vec<LeaseRequest>) -> Result<Vec<LeaseRequest>> {
        let mut ids: Vec<&str> = requests.iter().map(|r| r.key_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let keys = self.store.key_limits(&ids).await?;
        let now = now_secs();
        Ok(requests
            .into_iter()
            .map(|mut r| {
                let usable = keys.get(&r.key_id).filter(|k| {
                    k.tenant_id == r.tenant_id && k.revoked_at.is_none() && k.expires_at > now
                });
                match usable {
                    Some(k) => r.cap = k.daily_cap,
                    None => r.min = Micros::ZERO,
                }
                r
            })
            .collect())
    }

    /// A node session's spend report. `batch` is the node's number for it (docs/api.md):
    /// false when that batch was applied already (its answer was lost), and nothing is
    /// applied again. `lost_leases`: the session's lease batches whose answers it never
    /// got, given back whole with the report.
    pub async fn node_report(
        &self,
        node: &str,
        session: &str,
        batch: Option<u64>,
        reports: Vec<LeaseReport>,
        lost_leases: &[u64],
    ) -> Result<bool, LedgerError> {
        let reports = self
            .about_known_keys(reports)
            .await
            .map_err(|e| LedgerError(format!("{e:#}")))?;
        self.report_for(&holder_id(node, session), batch, reports, lost_leases)
            .await
    }

    /// A node's report rows about keys that exist, for a day from a week ago to tomorrow
    /// (UTC; a node's clock may be a little ahead of this one's; a report held back by an
    /// outage may arrive days later): a row about anything else can settle nothing real,
    /// and would only add rows to the ledger. (A revoked or expired key's rows stay: its
    /// calls were made.)
    async fn about_known_keys(&self, reports: Vec<LeaseReport>) -> Result<Vec<LeaseReport>> {
        let mut ids: Vec<&str> = reports.iter().map(|r| r.key_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let keys = self.store.key_limits(&ids).await?;
        let today = crate::sync::utc_day(now_secs());
        let asked = reports.len();
        let known: Vec<LeaseReport> = reports
            .into_iter()
            .filter(|r| {
                keys.contains_key(&r.key_id)
                    && (today - REPORT_DAYS_BACK..=today + 1).contains(&r.day)
            })
            .collect();
        if known.len() < asked {
            log::warn!(
                "a node reported spend on {} keys that do not exist or days no lease is \
                 granted for: ignored",
                asked - known.len()
            );
        }
        Ok(known)
    }

    /// Write-ahead of a node session's reservations (`sync::LeaseCommit`).
    pub async fn node_commit(
        &self,
        node: &str,
        session: &str,
        commits: Vec<LeaseCommit>,
    ) -> Result<Vec<bool>, LedgerError> {
        self.commit_for(&holder_id(node, session), commits).await
    }

    /// Audit events recorded by a node, into the same trail as `serve`'s, answered once
    /// committed. `batch` is the node's number for it (`audit::NodeBatch`): a batch sent
    /// again after a lost answer is written once. False (the node must send the batch
    /// again): it is not all written yet, the keys could not be read, or this process is
    /// stopping (`close_node_audit`).
    ///
    /// An event is filed under the tenant that owns its key, whatever tenant the node
    /// named: under none when the key does not exist, so no node can put an event into
    /// another tenant's trail.
    pub async fn node_audit(
        self: &Arc<Self>,
        node: &str,
        session: &str,
        batch: Option<u64>,
        mut events: Vec<AuditEvent>,
    ) -> bool {
        let closed = *self
            .fleet
            .audit_closed
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if closed {
            return false;
        }
        if let Err(e) = self.vet_node_events(&mut events).await {
            log::warn!("cannot read the keys of a node's audit events: {e:#}");
            return false;
        }
        let batch = batch.map(|number| super::audit::NodeBatch {
            holder: holder_id(node, session),
            number,
        });
        let control = self.clone();
        tokio::task::spawn_blocking(move || {
            control
                .audit
                // Well inside the node's 5 s call timeout, so the node hears "not yet"
                // rather than giving up on its own.
                .record_all_durably(events, batch, std::time::Duration::from_secs(2))
        })
        .await
        .unwrap_or(false)
    }

    /// What a node says is taken only where the control plane cannot know better, and
    /// never as it came: each event's tenant and label are its key's (none for an event
    /// without a key, or with a key that does not exist); texts are cut to the proxy's
    /// bounds with control characters replaced, so a trail read in a terminal shows what
    /// happened and nothing else; a key id that is not one is dropped; a time more than a
    /// minute ahead of this host's clock is that minute; a negative spend is none.
    async fn vet_node_events(&self, events: &mut [AuditEvent]) -> Result<()> {
        let latest_ms = crate::token::unix_ms() as i64 + NODE_CLOCK_AHEAD_MS;
        for event in events.iter_mut() {
            // Replaced first, then cut: a replacement is longer than what it replaces.
            for text in [
                &mut event.method,
                &mut event.path,
                &mut event.vendor,
                &mut event.decision,
            ]
            .into_iter()
            .chain(event.vendor_request_id.as_mut())
            .chain(event.llm.as_mut().map(|l| &mut l.model))
            {
                replace_control_chars(text);
            }
            *event = crate::proxy::audit::bounded(std::mem::take(event));
            // A key id is an id or nothing: one no key has is kept only if it looks like one.
            if event.key_id.as_deref().is_some_and(|id| {
                id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            }) {
                event.key_id = None;
            }
            event.ts_ms = event.ts_ms.clamp(0, latest_ms);
            // As every amount a node sends (`sync_api::amounts_in_range`): the trail's
            // sums (a reclaim reads them) must not overflow.
            event.spend = event.spend.clamp(Micros::ZERO, crate::money::MAX_USD);
        }
        let mut ids: Vec<&str> = events.iter().filter_map(|e| e.key_id.as_deref()).collect();
        ids.sort_unstable();
        ids.dedup();
        let keys = if ids.is_empty() {
            Default::default()
        } else {
            self.store.key_limits(&ids).await?
        };
        let owners: HashMap<&str, (Arc<str>, Arc<str>)> = keys
            .iter()
            .map(|(id, k)| {
                let owner = (Arc::from(k.tenant_id.as_str()), Arc::from(k.label.as_str()));
                (id.as_str(), owner)
            })
            .collect();
        for event in events.iter_mut() {
            let owner = event.key_id.as_deref().and_then(|id| owners.get(id));
            event.tenant_id = owner.map(|(tenant, _)| tenant.clone());
            event.label = owner.map(|(_, label)| label.clone());
        }
        Ok(())
    }

    /// Stopping: refuses node audit batches from now on, then writes every event
    /// accepted, at most `timeout`. False on timeout.
    pub fn close_node_audit(&self, timeout: Duration) -> bool {
        *self
            .fleet
            .audit_closed
            .write()
            .unwrap_or_else(|p| p.into_inner()) = true;
        self.audit.flush(timeout)
    }

    /// Called when a change nodes hold is published.
    pub(super) fn feed_changed(&self) {
        self.fleet.bump();
    }
}

/// How far ahead of this host's clock a node's audit event may be dated: more is a clock
/// gone wrong (or a made-up event), filed at now.
const NODE_CLOCK_AHEAD_MS: i64 = 60_000;

/// The error for a lease on `day` at `now` (unix s), a day this control plane is not in:
/// said on the control plane once a minute, and to the node, which logs it.
fn off_day_error(node: &str, day: i64, now: i64) -> LedgerError {
    let today = crate::sync::utc_day(now);
    static LOG: crate::log_every::LogEvery =
        crate::log_every::LogEvery::new(std::time::Duration::from_secs(60));
    if LOG.due().is_some() {
        log::warn!(
            "node {node} asks for a lease on UTC day {day} while this control plane is on \
             day {today}: refused (is the node's clock off?)"
        );
    }
    LedgerError(format!(
        "the control plane is on UTC day {today}, not {day}: leases are granted for its \
         own day only (is this node's clock off?)"
    ))
}

/// Whether a lease may be granted on `day` at `now` (unix s): only on the control plane's
/// own UTC day. A node whose clock is off, by hours or by a second, would otherwise be
/// granted the next day's cap while the fleet still spends this day's, two caps in one
/// day; its calls are refused (503) for as long as the two clocks' days differ.
fn is_lease_day(day: i64, now: i64) -> bool {
    day == crate::sync::utc_day(now)
}

/// Control characters (escape sequences, line breaks) and line or paragraph separators
/// become U+FFFD. A proxy's own texts never have them (HTTP does not carry them); a node's
/// might.
fn replace_control_chars(text: &mut String) {
    use crate::proxy::audit::is_unprintable;
    if text.contains(is_unprintable) {
        *text = text.replace(is_unprintable, "\u{FFFD}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_granted_on_the_control_planes_own_day_only() {
        let day = 20_000i64;
        let midnight = day * 86_400;
        for now in [midnight, midnight + 1, midnight + 43_200, midnight + 86_399] {
            assert!(is_lease_day(day, now), "{now}");
            assert!(!is_lease_day(day - 1, now), "{now}");
            assert!(!is_lease_day(day + 1, now), "{now}");
        }
    }
    use crate::control::crypto::MasterKey;
    use crate::control::ControlSettings;
    use crate::metrics::Metrics;
    use crate::secret::Secret;
    use crate::sync::Published;
    use std::sync::Arc;

    async fn open(name: &str) -> Arc<Control> {
        let dir =
            std::env::temp_dir().join(format!("keybrake-fleet-{name}-{}", std::process::id()));
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
            &crate::database::Database::Sqlite {
                data_dir: dir.clone(),
            },
            MasterKey::from_base64(&MasterKey::generate_base64()).unwrap(),
            Secret::new("admin"),
            Arc::new(Published::empty()),
            Metrics::global(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_node_gets_everything_once_then_only_what_changed_and_is_woken_by_a_revocation() {
        let control = open("delta").await;
        let (node, token) = control.create_node("edge").await.unwrap().unwrap();
        assert_eq!(
            control.node_for_token(token.expose()).as_deref(),
            Some(node.as_str())
        );
        assert_eq!(control.node_for_token("kbn_wrong"), None);
        control.node_hello(&node, "session-1").await.unwrap();
        control.fleet.revoked("key_old", i64::MAX);
        control
            .published
            .revocations
            .load()
            .insert("key_old", i64::MAX);

        let poll = |epoch: String, since: u64, wait: u64| {
            let (control, node) = (control.clone(), node.clone());
            async move {
                control
                    .node_poll(
                        &node,
                        "session-1",
                        &epoch,
                        since,
                        Duration::from_millis(wait),
                    )
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        let first = poll(String::new(), 0, 5000).await;
        assert!(first.full && first.jwks.is_some() && first.credentials.is_some());
        assert_eq!(first.revoked, vec![("key_old".to_string(), i64::MAX)]);
        assert!(first.lease_valid_for_ms > 0 && !first.leases_lapsed);

        // Nothing changed: the poll waits (at most a quarter of the 8 s lease lifetime).
        let started = std::time::Instant::now();
        let idle = poll(first.epoch.clone(), first.version, 300).await;
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(!idle.full && idle.revoked.is_empty() && idle.jwks.is_none());

        // A revocation wakes a waiting poll at once, and only it travels.
        let waiting = tokio::spawn(poll(first.epoch.clone(), first.version, 5000));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        control.fleet.revoked("key_new", i64::MAX);
        let delta = waiting.await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!delta.full);
        assert_eq!(delta.revoked, vec![("key_new".to_string(), i64::MAX)]);
        assert!(delta.version > first.version);

        // Another process's (or a restart's) versions mean nothing: everything again.
        let other = poll("ep_other".into(), delta.version, 5000).await;
        assert!(other.full);

        // Deleted: the token stops working, a poll is answered "gone".
        assert!(control.delete_node(&node).await.unwrap());
        assert_eq!(control.node_for_token(token.expose()), None);
        assert!(control
            .node_poll(
                &node,
                "session-1",
                &other.epoch,
                other.version,
                Duration::ZERO
            )
            .await
            .unwrap()
            .is_none());
        assert!(!control.delete_node(&node).await.unwrap());
    }

    /// A lease for a day the control plane is not in is refused as an error (the node
    /// answers 503, not 429 for a key with budget left); the others in the batch are
    /// answered in their places.
    #[tokio::test]
    async fn a_lease_for_another_day_is_an_error_in_its_place() {
        let control = open("off-day").await;
        let (node, _) = control.create_node("edge").await.unwrap().unwrap();
        control.node_hello(&node, "session-1").await.unwrap();
        let today = crate::sync::utc_day(now_secs());
        let ask = |key: &str, day: i64| LeaseRequest {
            budget: crate::sync::Budget::KeyDaily,
            key_id: key.into(),
            tenant_id: "tn_none".into(),
            day,
            cap: Micros(1_000_000),
            min: Micros(1_000_000),
            want: Micros(1_000_000),
            commit: Micros::ZERO,
        };
        let answers = control
            .node_leases(
                &node,
                "session-1",
                None,
                vec![
                    ask("key_a", today),
                    ask("key_b", today + 3),
                    ask("key_c", today),
                ],
            )
            .await;
        assert_eq!(answers.len(), 3);
        // No such keys: nothing granted, but answered.
        assert_eq!(answers[0].as_ref().unwrap().granted, Micros::ZERO);
        assert_eq!(answers[2].as_ref().unwrap().granted, Micros::ZERO);
        let refused = answers[1].as_ref().unwrap_err();
        assert!(refused.0.contains("clock"), "{refused}");
    }

    #[tokio::test]
    async fn a_credential_put_or_deleted_wakes_the_nodes_long_polls() {
        let control = open("credentials").await;
        let (node, _) = control.create_node("edge").await.unwrap().unwrap();
        control.node_hello(&node, "session-1").await.unwrap();
        let (tenant, ..) = control.create_tenant("acme").await.unwrap();
        let first = control
            .node_poll(&node, "session-1", "", 0, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        for put in [true, false] {
            let since = control.fleet.version();
            let waiting = {
                let (control, node, epoch) = (control.clone(), node.clone(), first.epoch.clone());
                tokio::spawn(async move {
                    control
                        .node_poll(&node, "session-1", &epoch, since, Duration::from_secs(5))
                        .await
                        .unwrap()
                        .unwrap()
                })
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
            let started = std::time::Instant::now();
            if put {
                control
                    .put_credential(&tenant, "stripe", Secret::new("sk_test_new"))
                    .await
                    .unwrap();
            } else {
                assert!(control.delete_credential(&tenant, "stripe").await.unwrap());
            }
            let answer = waiting.await.unwrap();
            assert!(started.elapsed() < Duration::from_secs(1));
            let held = answer.credentials.expect("the credentials travel");
            assert_eq!(
                held.get(&tenant).and_then(|v| v.get("stripe")).is_some(),
                put
            );
        }
    }

    #[test]
    fn sessions_are_short_and_plain() {
        assert!(valid_session("s06h3n7gfm0ddsce"));
        assert!(!valid_session("short"));
        assert!(!valid_session("has.a.dot.in.it"));
        assert!(!valid_session(&"x".repeat(65)));
    }

    #[tokio::test]
    async fn a_credential_set_or_deleted_wakes_waiting_polls_with_the_new_credentials() {
        let control = open("credential").await;
        let (node, _token) = control.create_node("edge").await.unwrap().unwrap();
        control.node_hello(&node, "session-1").await.unwrap();
        let tenant = control.create_tenant("acme").await.unwrap().0;
        let poll = |epoch: String, since: u64| {
            let (control, node) = (control.clone(), node.clone());
            async move {
                control
                    .node_poll(&node, "session-1", &epoch, since, Duration::from_secs(5))
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        let first = poll(String::new(), 0).await;
        let tenant_id = tenant.clone();
        let secret_of = move |a: &SyncAnswer| {
            a.credentials
                .as_ref()
                .and_then(|c| c.get(&tenant_id))
                .and_then(|v| v.get("stripe"))
                .cloned()
        };
        assert_eq!(secret_of(&first), None);

        let waiting = tokio::spawn(poll(first.epoch.clone(), first.version));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        control
            .put_credential(&tenant, "stripe", Secret::new("sk_test_rotated"))
            .await
            .unwrap();
        let set = waiting.await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(secret_of(&set).as_deref(), Some("sk_test_rotated"));

        let waiting = tokio::spawn(poll(set.epoch.clone(), set.version));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(control.delete_credential(&tenant, "stripe").await.unwrap());
        let deleted = waiting.await.unwrap();
        assert!(deleted.version > set.version);
        assert_eq!(secret_of(&deleted), None);
    }
}
