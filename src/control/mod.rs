//! The control plane (SPEC §1–§3, local half of §6): tenants and their API tokens, sealed
//! vendor credentials, signing keys, vault-key issuance and revocation, the spend ledger
//! and the audit trail. It publishes what the proxy needs through `sync::Published` and
//! serves budget leases through `sync::Ledger`; it never sees a proxied request.
//!
//! `Control` (this file) holds the business rules. Around it: `api` (HTTP routes, input
//! validation, JSON), `auth` (who is calling: `Admin`, `Tenant`), `errors` (the one error
//! type and its HTTP mapping), `listener` (the control API's accept loop and limits),
//! `store` (`keybrake.db`), `audit` (`audit.db`), `keywriter` (group commit of issued
//! keys) and `crypto` (sealing under the master key).

pub mod api;
pub mod audit;
pub mod auth;
pub mod crypto;
pub mod errors;
pub mod fleet;
pub mod follow;
pub mod keywriter;
pub mod ledger_batch;
pub mod listener;
#[cfg(test)]
mod outage_test;
#[cfg(test)]
pub mod pg_test;
pub mod store;
pub mod sync_api;

use crate::ids::{new_id, new_sorted_id, new_token, token_hash};
use crate::metrics::Metrics;
use crate::money::Micros;
use crate::revocation::RevocationFilter;
use crate::secret::Secret;
use crate::sync::{
    utc_day, Grant, LeaseCommit, LeaseReport, LeaseRequest, Ledger, LedgerError, Published,
};
use crate::token::{generate_ed25519, now_secs, unix_ms, Claims, Jwk, Jwks, SigningKey, Verifier};
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use crypto::MasterKey;
use dashmap::DashMap;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use store::{CredentialRow, KeyRow, KeyStatus, LedgerRow, Store};

/// A node session's `report_batches` row is kept this long after its last report: a node
/// resends a batch within seconds of a lost answer, never a week later.
const REPORT_BATCHES_KEPT_MS: i64 = 7 * 24 * 3600 * 1000;
/// How often expired keys past their retention are deleted, how many per transaction, and
/// the pause between two transactions (`Control::prune_expired_keys`).
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
const PRUNE_CHUNK: i64 = 500;
const PRUNE_CHUNK_MIN: i64 = 50;
const PRUNE_PAUSE: Duration = Duration::from_millis(20);
/// A deletion transaction longer than this halves the next one's chunk.
const PRUNE_SLOW: Duration = Duration::from_millis(50);
/// Wall and monotonic clocks apart by more than this since the last round: stepped.
const PRUNE_CLOCK_STEP_MS: i64 = 60_000;

/// A lease batch's record (`lease_batches`) is kept at least this long, and at least four
/// lease lifetimes: a node names a batch lost in its next report, half a second after the
/// lost answer, or once the control plane is back (records are deleted only once this
/// process has reached its storage for a lifetime, as holders are taken for dead: nodes
/// get that long to report after an outage); a node away longer than a lifetime is taken
/// for dead, its leases reclaimed. A copy of a batch that reaches the ledger after its
/// "lost" mark is deleted would be granted, and held until its holder's leases are
/// reclaimed or the day ends.
const LEASE_BATCHES_KEPT_MS: i64 = 2 * 60 * 1000;
/// A replica's clock this far from the database server's is warned about.
const CLOCK_OFF_WARN_MS: u64 = 1000;

pub struct ControlSettings {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// Vendor names of the catalog: a credential or key for anything else is refused.
    pub vendors: HashSet<String>,
    /// How long this process's leases stay its own without a heartbeat (see `Ledger`).
    pub lease_lifetime: Duration,
    pub audit_durability: crate::config::AuditDurability,
    /// How long a key's row and its ledger rows are kept after it expired.
    pub expired_key_retention: Duration,
}

/// Whose API token this is.
#[derive(Clone)]
struct TokenOwner {
    tenant_id: String,
}

pub struct Control {
    settings: ControlSettings,
    store: Store,
    master: MasterKey,
    admin_token: Secret,
    api_tokens: DashMap<[u8; 32], TokenOwner>,
    signer: ArcSwap<SigningKey>,
    jwks: ArcSwap<Jwks>,
    published: Arc<Published>,
    /// This process as a lease holder in the ledger, and until when (unix ms) its
    /// proxy may spend its leases: a little before its heartbeat's `alive_until`, after
    /// which another process may take it for dead and give its leases back. 0 once that
    /// happened (this process was stalled too long): it then spends nothing more.
    holder: String,
    leases_valid_until_ms: std::sync::atomic::AtomicI64,
    /// Serializes credential republishing.
    credentials_lock: tokio::sync::Mutex<()>,
    /// Serializes API token changes with their reload from the store.
    tokens_lock: tokio::sync::Mutex<()>,
    revocations_lock: tokio::sync::Mutex<()>,
    /// Until when (unix seconds) another process may be changing the same store: the two
    /// processes of a graceful upgrade, which both serve the control API for a while.
    /// Meanwhile API tokens and vendor credentials are reloaded every second.
    shared_until: std::sync::atomic::AtomicI64,
    pub audit: audit::AuditTrail,
    keys: keywriter::KeyWriter,
    /// Pages of `GET /v1/keys` built at once: each holds up to `MAX_PAGE_BYTES` of rows
    /// and their JSON while it is built, so many readers cannot add up to gigabytes.
    page_builds: tokio::sync::Semaphore,
    /// Of those, what one tenant may hold (`PAGE_BUILDS_PER_TENANT` each): a tenant's
    /// flood of listings waits behind itself, not in front of every other tenant.
    tenant_page_builds: std::sync::Mutex<crate::Map<String, Arc<tokio::sync::Semaphore>>>,
    metrics: Arc<Metrics>,
    /// Edge nodes and the change feed they long-poll.
    fleet: fleet::Fleet,
}

/// What a caller asked for in `POST /v1/keys`, already validated.
pub struct NewKey {
    pub label: String,
    pub vendor: String,
    pub allowed_endpoints: Vec<String>,
    pub daily_cap: Micros,
    pub ttl: Duration,
    pub metadata: serde_json::Value,
    pub stripe_accounts: Option<Vec<String>>,
}

/// A key as `GET /v1/keys/{id}` shows it.
pub struct KeyView {
    pub row: KeyRow,
    pub status: KeyStatus,
    pub ledger: LedgerRow,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("vendor {0:?} is not configured for this tenant")]
    VendorNotConfigured(String),
    #[error(transparent)]
    Storage(#[from] anyhow::Error),
}

pub fn key_status(row: &KeyRow, now: i64) -> KeyStatus {
    if row.revoked_at.is_some() {
        KeyStatus::Revoked
    } else if row.expires_at <= now {
        KeyStatus::Expired
    } else {
        KeyStatus::Active
    }
}

impl Control {
    /// Opens the store and the audit trail (`database`), loads (or creates) the signing key
    /// and publishes the snapshots.
    pub async fn open(
        settings: ControlSettings,
        database: &crate::database::Database,
        master: MasterKey,
        admin_token: Secret,
        published: Arc<Published>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Control>> {
        let store = Store::open(database).await?;
        let audit =
            audit::AuditTrail::open(database, metrics.clone(), settings.audit_durability).await?;
        let now = now_secs();
        if store
            .live_signing_keys(now)
            .await?
            .iter()
            .all(|k| k.retired_at.is_some())
        {
            create_signing_key(&store, &master, now).await?;
        }
        let (signer, jwks) = load_signing_keys(&store, &master, now).await?;
        let api_tokens = DashMap::new();
        for (hash, _id, tenant_id) in store.all_api_tokens().await? {
            if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
                api_tokens.insert(hash, TokenOwner { tenant_id });
            }
        }
        let keys = keywriter::KeyWriter::start(store.clone());
        let holder = new_id("hld_");
        let lifetime = lease_lifetime_secs(&settings);
        // Holders' deadlines are on the database's clock (`Store::now_secs`), in whole
        // seconds; this process's proxy counts from the start of that second, on its
        // monotonic clock.
        let started_ms = crate::token::mono_ms();
        let store_now_ms = store.now_ms();
        let store_now = store_now_ms.div_euclid(1000);
        let started_ms = started_ms - store_now_ms.rem_euclid(1000);
        store
            .register_holder(&holder, store_now, store_now.saturating_add(lifetime))
            .await?;
        let control = Arc::new(Control {
            settings,
            store,
            master,
            admin_token,
            api_tokens,
            signer: ArcSwap::from_pointee(signer),
            jwks: ArcSwap::from_pointee(jwks),
            published,
            holder,
            leases_valid_until_ms: started_ms
                .saturating_add((lifetime - LEASE_MARGIN_SECS).saturating_mul(1000))
                .into(),
            credentials_lock: Default::default(),
            tokens_lock: Default::default(),
            shared_until: Default::default(),
            revocations_lock: Default::default(),
            audit,
            keys,
            page_builds: tokio::sync::Semaphore::new(PAGE_BUILDS),
            tenant_page_builds: Default::default(),
            metrics,
            fleet: fleet::Fleet::new(),
        });
        control.load_nodes().await?;
        control.publish_jwks();
        control.publish_credentials().await?;
        let live = control
            .store
            .live_revocations(now - crate::revocation::KEPT_PAST_EXPIRY_SECS)
            .await?;
        let revocations = RevocationFilter::with_capacity(live.len() * 2);
        for (id, exp) in live {
            revocations.insert(&id, exp);
        }
        control.metrics.revoked_keys.set(revocations.len() as i64);
        control.published.revocations.store(Arc::new(revocations));
        Ok(control)
    }

    /// Every second, picks up revocations written to the database by another process
    /// sharing it (the old or new process of a graceful upgrade), so none is missed.
    /// Another process may change the same store until `until` (unix seconds).
    pub fn share_store_until(&self, until: i64) {
        self.shared_until.fetch_max(until, Ordering::AcqRel);
    }

    /// Every second: revocations made by another process on the same store (an edge of
    /// the same data dir, the other process of a graceful upgrade) reach this one's filter;
    /// while the store is shared (`share_store_until`), API tokens and vendor credentials
    /// are reloaded too, so a token deleted or a secret rotated through the other process
    /// does not live on in this one.
    ///
    /// The window is counted on the store's clock, the one revocations are stamped with,
    /// and, while another process may write the store (PostgreSQL replicas, the two
    /// processes of an upgrade), every `ALL_REVOCATIONS_EVERY` ticks every live revocation
    /// is read whenever it was stamped: one committed long after its stamp (a writer kept
    /// waiting), or stamped by a host whose clock is off, is in the filter within that time
    /// all the same.
    pub async fn follow_revocations(self: Arc<Self>) {
        const ALL_REVOCATIONS_EVERY: u64 = 10;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut since = self.store.now_secs() - 5;
        for ticks in 1u64.. {
            tick.tick().await;
            let now = now_secs();
            if now <= self.shared_until.load(Ordering::Acquire) {
                if let Err(e) = self.reload_tokens_and_credentials().await {
                    log::error!("cannot reload API tokens and credentials: {e:#}");
                }
            }
            let stamp_now = self.store.now_secs();
            // Another process may commit late: a replica, or the other process of an upgrade.
            let shared =
                self.store.postgres().is_some() || now <= self.shared_until.load(Ordering::Acquire);
            let from = (ticks % ALL_REVOCATIONS_EVERY != 0 || !shared).then_some(since);
            match self.catch_up_revocations(from, now).await {
                Ok(()) => since = stamp_now - 5,
                Err(e) => log::error!("cannot read recent revocations: {e:#}"),
            }
        }
    }

    /// Puts keys revoked by another process at or after `since` into this one's filter
    /// (and its nodes' feed).
    /// `None`: every live revocation, whenever stamped.
    async fn catch_up_revocations(&self, since: Option<i64>, now: i64) -> Result<()> {
        // Kept a day past their keys' expiry, as the filter keeps them.
        let kept_after = now - crate::revocation::KEPT_PAST_EXPIRY_SECS;
        let rows = match since {
            Some(since) => self.store.revoked_since(since, kept_after).await?,
            None => self.store.live_revocations(kept_after).await?,
        };
        let filter = self.published.revocations.load();
        let missing: Vec<_> = rows
            .into_iter()
            .filter(|(id, _)| !filter.is_revoked(id))
            .collect();
        if !missing.is_empty() {
            let _g = self.revocations_lock.lock().await;
            let filter = self.published.revocations.load();
            for (id, exp) in missing {
                filter.insert(&id, exp);
                self.fleet.revoked(&id, exp);
            }
            self.grow_revocations(&filter);
            self.published.generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Every second, on a task of its own so a long reclaim never delays it: this
    /// process's heartbeat as a lease holder. Every few seconds, the
    /// leases of holders that stopped beating (a process killed, or stalled past its
    /// lease lifetime) are settled with what they committed (or the audit trail says they
    /// spent, if more) and the rest given back; once an hour, the report-batch marks of
    /// node sessions silent for a week are deleted. Runs until the process ends.
    ///
    /// No holder is taken for dead before this process has reached its storage for a
    /// whole lease lifetime without a break: an edge node beats through its polls, so
    /// while no control process was running (a restart, an upgrade), or none could write
    /// to the database (an outage), it could not beat, and must get a lifetime to reach
    /// this one before its leases are taken back; otherwise every node would be taken for
    /// dead, and restart, together as the database came back. Reclaiming later is always
    /// safe.
    pub async fn lease_upkeep(self: Arc<Self>) {
        let beating = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                beating.heartbeat().await;
            }
        });
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lifetime = lease_lifetime_secs(&self.settings);
        let every = (lifetime / 4).max(1) as u64;
        // Since when the storage has taken writes without a break (`None`: it does not
        // now). Nodes beat by writing, so a storage that only reads is a break too; and
        // so is a gap in this loop itself (the process or its host was frozen: nobody
        // could beat to it meanwhile).
        let mut reachable_since: Option<tokio::time::Instant> = None;
        // Since when the storage has refused writes (`None`: it takes them).
        let mut storage_down: Option<tokio::time::Instant> = None;
        // When the previous round ended (its own work does not count as a pause).
        let mut last_round = (tokio::time::Instant::now(), crate::token::unix_ms());
        let mut n = 0u64;
        loop {
            tick.tick().await;
            let round = (
                tokio::time::Instant::now(),
                crate::token::unix_ms(),
                self.store.now_ms(),
            );
            let frozen = round.0.duration_since(last_round.0) > UPKEEP_GAP
                || round.1.saturating_sub(last_round.1) > UPKEEP_GAP.as_millis() as u64;
            if frozen {
                log::warn!(
                    "the lease upkeep did not run for more than {} s (this process or its host \
                     was paused): nobody is taken for dead for a lease lifetime",
                    UPKEEP_GAP.as_secs()
                );
                // The database's clock again at once: a host suspended meanwhile may
                // have had its clocks corrected.
                self.sync_clock().await;
            }
            let writable = self.store.ping_writable().await;
            // Said when the storage stops taking writes and when it takes them again (the
            // calls refused meanwhile log once per 10 s).
            match (writable, storage_down) {
                (false, None) => {
                    storage_down = Some(tokio::time::Instant::now());
                    log::error!(
                        "the database does not take writes: leases, spend reports and changes \
                         fail until it does"
                    );
                }
                (true, Some(since)) => {
                    storage_down = None;
                    log::warn!(
                        "the database takes writes again after {:.1} s",
                        since.elapsed().as_secs_f64()
                    );
                }
                _ => {}
            }
            if frozen || !writable {
                reachable_since = None;
            } else if reachable_since.is_none() {
                reachable_since = Some(tokio::time::Instant::now());
            }
            let reachable_for_a_lifetime = reachable_since
                .is_some_and(|t| t.elapsed() >= Duration::from_secs(lifetime.max(0) as u64));
            if reachable_for_a_lifetime && n % every == 0 {
                // Dead by the time this round began: a pause since (in the storage check)
                // kept everyone from beating, and proves nobody dead. On the clock the
                // deadlines were written on.
                let began = round.2.div_euclid(1000);
                if let Err(e) = self.reclaim_dead_holders(began).await {
                    reachable_since = None;
                    log::error!("cannot give back the leases of dead processes: {e:#}");
                }
            }
            if reachable_for_a_lifetime && n % 10 == 0 {
                let kept = LEASE_BATCHES_KEPT_MS.max(lifetime.saturating_mul(4000));
                let before = self.store.now_ms() - kept;
                if let Err(e) = self.store.prune_lease_batches(before).await {
                    log::warn!("cannot delete old lease-batch records: {e:#}");
                }
            }
            if n % 60 == 0 {
                self.sync_clock().await;
            }
            if n % 3600 == 0 {
                let before = self.store.now_ms() - REPORT_BATCHES_KEPT_MS;
                if let Err(e) = self.store.prune_report_batches(before).await {
                    log::warn!("cannot delete old report-batch marks: {e:#}");
                }
                let before = self.store.now_secs() - RECLAIMED_HOLDERS_KEPT_SECS;
                if let Err(e) = self.store.prune_reclaimed_holders(before).await {
                    log::warn!("cannot delete old marks of reclaimed holders: {e:#}");
                }
            }
            // A pause inside the round's own work: this round reclaimed only holders dead
            // when it began; the next ones wait a lifetime, as after any pause.
            let ended = (tokio::time::Instant::now(), crate::token::unix_ms());
            if ended.0.duration_since(round.0) > UPKEEP_GAP
                || ended.1.saturating_sub(round.1) > UPKEEP_GAP.as_millis() as u64
            {
                reachable_since = None;
            }
            last_round = ended;
            n += 1;
        }
    }

    async fn heartbeat(&self) {
        if self.leases_valid_until_ms.load(Ordering::Acquire) == 0 {
            return;
        }
        // The store counts life in whole seconds (on its clock, `Store::now_ms`) from the
        // second this beat started; the proxy spends until a margin after the start of
        // that second (on this process's monotonic clock: a wall clock set back does not
        // stretch it).
        let started_ms = crate::token::mono_ms();
        let lifetime = lease_lifetime_secs(&self.settings);
        let store_now_ms = self.store.now_ms();
        let now_ms = started_ms - store_now_ms.rem_euclid(1000);
        let alive_until = store_now_ms.div_euclid(1000).saturating_add(lifetime);
        match self.store.heartbeat_holder(&self.holder, alive_until).await {
            Ok(true) => {
                let valid_ms =
                    now_ms.saturating_add((lifetime - LEASE_MARGIN_SECS).saturating_mul(1000));
                self.leases_valid_until_ms
                    .fetch_max(valid_ms, Ordering::AcqRel);
            }
            Ok(false) => {
                self.leases_valid_until_ms.store(0, Ordering::Release);
                log::error!(
                    "this process was taken for dead (no heartbeat for the lease lifetime) and \
                     its leases were given back: it refuses metered calls until restarted"
                );
            }
            // No heartbeat: the leases run out at the last `valid_until` (fail closed).
            Err(e) => {
                static LOG: crate::log_every::LogEvery =
                    crate::log_every::LogEvery::new(Duration::from_secs(10));
                if let Some(others) = LOG.due() {
                    log::error!(
                        "lease heartbeat failed ({others} more since the last such line): {e:#}"
                    );
                }
            }
        }
    }

    /// Measures the database server's clock again (on PostgreSQL, replicas keep lease
    /// holders' deadlines on it, so that one replica's clock running ahead cannot take
    /// another's live nodes for dead), and says once a minute while this host's clock is
    /// far from it.
    async fn sync_clock(&self) {
        let offset = match self.store.sync_clock().await {
            Ok(offset) => offset,
            Err(e) => {
                log::warn!(
                    "cannot measure the database server's clock ({e:#}): lease deadlines \
                     use the offset last measured"
                );
                return;
            }
        };
        if offset.unsigned_abs() > CLOCK_OFF_WARN_MS {
            log::warn!(
                "this process's clock is {:.1} s {} the database server's: lease deadlines \
                 are kept on the database's clock, but keys' expiry and the audit trail's \
                 times are this host's: keep clocks in sync (NTP)",
                offset.unsigned_abs() as f64 / 1000.0,
                if offset > 0 { "behind" } else { "ahead of" },
            );
        }
    }

    /// Settles and gives back the leases of every holder whose life ended before `now`
    /// (unix s). Returns how much was given back.
    pub async fn reclaim_dead_holders(&self, now: i64) -> Result<Micros> {
        let mut returned = Micros::ZERO;
        for holder in self.store.dead_holders(now).await? {
            if holder == self.holder {
                continue;
            }
            // One holder that cannot be reclaimed keeps none of the others from it.
            match self.reclaim_holder(&holder, now).await {
                Ok(back) => {
                    log::info!(
                        "gave back {back} of leases held by {holder}, a process that stopped"
                    );
                    returned = returned.checked_add(back).unwrap_or(returned);
                }
                Err(e) => {
                    static LOG: crate::log_every::LogEvery =
                        crate::log_every::LogEvery::new(Duration::from_secs(60));
                    if let Some(others) = LOG.due() {
                        log::error!(
                            "cannot give back the leases held by {holder} ({others} more such \
                             failures since the last line): {e:#}"
                        );
                    }
                }
            }
        }
        Ok(returned)
    }

    async fn reclaim_holder(&self, holder: &str, now: i64) -> Result<Micros> {
        // What the trail records for each (key, day) the holder leased; the reclaim nets
        // out what is settled, under the ledger rows' locks.
        let mut audited = std::collections::HashMap::new();
        for (key_id, day, _) in self.store.leases_of(holder).await? {
            let spend = match self.store.key_tenant(&key_id).await? {
                Some(tenant) => self.audit.spend_of_key(&tenant, &key_id, day).await?,
                None => Micros::ZERO,
            };
            audited.insert((key_id, day), spend);
        }
        self.store.reclaim_holder(holder, &audited, now).await
    }

    /// Public keys: the active signer and every key still needed, re-read from the store
    /// (another process may have rotated). Republished when the set of ids changed.
    async fn refresh_signing_keys(&self, now: i64) {
        match load_signing_keys(&self.store, &self.master, now).await {
            Ok((signer, jwks)) => {
                let ids = |j: &Jwks| j.keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>();
                if ids(&jwks) != ids(&self.jwks.load()) {
                    self.signer.store(Arc::new(signer));
                    self.jwks.store(Arc::new(jwks));
                    self.publish_jwks();
                }
            }
            Err(e) => log::error!("cannot refresh signing keys: {e:#}"),
        }
    }

    /// After inserts into the published revocation filter (`filter`, under
    /// `revocations_lock`, so none can land in it once replaced): swaps in one with twice
    /// the bloom bits once it outgrew its size, and updates the gauge.
    fn grow_revocations(&self, filter: &RevocationFilter) {
        if filter.is_over_capacity() {
            let next = filter.grown();
            self.metrics.revoked_keys.set(next.len() as i64);
            self.published.revocations.store(Arc::new(next));
        } else {
            self.metrics.revoked_keys.set(filter.len() as i64);
        }
    }

    /// Periodic upkeep: drop public keys whose last vault key expired, and revocations a
    /// day past their key's `exp` (`revocation::KEPT_PAST_EXPIRY_SECS`); at start and then
    /// hourly, delete the keys past `expired_key_retention` (on a task of its own).
    pub async fn housekeeping(self: Arc<Self>) {
        let pruning = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_round: Option<(i64, i64)> = None;
            loop {
                tick.tick().await;
                // A wall clock stepped since the last round (a wrong time source, a
                // restored VM) may be far ahead: this round is skipped, not trusted.
                let round = (crate::token::unix_ms() as i64, crate::token::mono_ms());
                let stepped = last_round.is_some_and(|(wall, mono)| {
                    ((round.0 - wall) - (round.1 - mono)).abs() > PRUNE_CLOCK_STEP_MS
                });
                last_round = Some(round);
                if stepped {
                    log::warn!(
                        "this host's clock was stepped in the last hour: expired keys are not \
                         deleted this hour"
                    );
                    continue;
                }
                pruning.prune_expired_keys().await;
            }
        });
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            let now = now_secs();
            self.refresh_signing_keys(now).await;
            let _g = self.revocations_lock.lock().await;
            let current = self.published.revocations.load();
            if current.has_past_keeping(now) {
                let next = current.without_expired(now);
                self.metrics.revoked_keys.set(next.len() as i64);
                self.published.revocations.store(Arc::new(next));
            }
        }
    }

    /// Deletes the keys that expired more than `expired_key_retention` ago, with their
    /// ledger rows, a chunk per transaction (halved while a transaction takes longer than
    /// `PRUNE_SLOW`, so the one SQLite writer is never held for long) and a pause between.
    /// Nothing the API answers for a live key reads them: a deleted key is 404 to
    /// `GET /v1/keys/{id}` (its audit trail stays), and its token was refused as expired
    /// long before. "Now" is the database's clock (measured first on PostgreSQL), and
    /// never later than the newest key's issue: a clock far ahead at start deletes
    /// nothing until keys are issued under it (docs/storage.md says what remains).
    async fn prune_expired_keys(&self) {
        let retention = self.settings.expired_key_retention.as_secs() as i64;
        let ready = async {
            self.store.sync_clock().await?;
            let kids = self.store.signing_key_ids().await?;
            let newest = self.store.newest_key_created_at().await?;
            anyhow::Ok((kids, newest))
        };
        let (kids, newest) = match ready.await {
            Ok((kids, Some(newest))) => (kids, newest),
            Ok((_, None)) => return,
            Err(e) => {
                log::warn!("cannot delete expired keys (will try again in an hour): {e:#}");
                return;
            }
        };
        let before = self.store.now_secs().min(newest).saturating_sub(retention);
        let (mut deleted, mut chunk) = (0, PRUNE_CHUNK);
        for kid in kids {
            loop {
                let started = std::time::Instant::now();
                match self.store.prune_expired_keys(&kid, before, chunk).await {
                    Ok(n) => {
                        deleted += n;
                        if n < chunk as u64 {
                            break;
                        }
                        // The time includes the wait for the writer: a busy store
                        // slows the deletion down to `PRUNE_CHUNK_MIN`, never stops it.
                        if started.elapsed() > PRUNE_SLOW {
                            chunk = (chunk / 2).max(PRUNE_CHUNK_MIN);
                        } else {
                            chunk = (chunk * 2).min(PRUNE_CHUNK);
                        }
                        tokio::time::sleep(PRUNE_PAUSE).await;
                    }
                    Err(e) => {
                        log::warn!("cannot delete expired keys (will try again in an hour): {e:#}");
                        break;
                    }
                }
            }
        }
        if deleted > 0 {
            log::info!(
                "expired keys deleted with their ledger rows: {deleted} (expired more than {} \
                 days ago; expired_key_retention)",
                retention / 86_400
            );
        }
    }

    /// A page cursor: the last row's sequence number sealed (AES-GCM under the master key)
    /// with the tenant and the listing as associated data. Opaque (a tenant cannot read
    /// how many rows other tenants wrote in between) and bound: another tenant's cursor,
    /// or one of another listing, does not open. Processes sharing the master key (both
    /// sides of an upgrade) accept each other's.
    pub fn seal_cursor(&self, kind: api::CursorKind, tenant_id: &str, seq: i64) -> String {
        use base64::Engine;
        let sealed = self
            .master
            .seal(&seq.to_le_bytes(), &cursor_aad(kind, tenant_id));
        format!(
            "cur_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed)
        )
    }

    /// The sequence number inside a cursor this tenant was given for this listing.
    pub fn open_cursor(&self, kind: api::CursorKind, tenant_id: &str, text: &str) -> Option<i64> {
        use base64::Engine;
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.strip_prefix("cur_")?)
            .ok()?;
        let plain = self
            .master
            .open(&sealed, &cursor_aad(kind, tenant_id))
            .ok()?;
        Some(i64::from_le_bytes(plain.try_into().ok()?))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn publish_jwks(&self) {
        let jwks = self.jwks.load();
        self.published
            .verifier
            .store(Arc::new(Verifier::new(&jwks)));
        self.published.generation.fetch_add(1, Ordering::AcqRel);
        self.feed_changed();
    }

    async fn reload_tokens_and_credentials(&self) -> Result<()> {
        self.reload_tokens().await?;
        let _g = self.credentials_lock.lock().await;
        self.publish_credentials().await
    }

    /// Replaces the in-memory API tokens with the store's.
    async fn reload_tokens(&self) -> Result<()> {
        {
            let _g = self.tokens_lock.lock().await;
            let stored: std::collections::HashMap<[u8; 32], String> = self
                .store
                .all_api_tokens()
                .await?
                .into_iter()
                .filter_map(|(hash, _id, tenant_id)| {
                    <[u8; 32]>::try_from(hash.as_slice())
                        .ok()
                        .map(|h| (h, tenant_id))
                })
                .collect();
            self.api_tokens.retain(|hash, _| stored.contains_key(hash));
            for (hash, tenant_id) in stored {
                self.api_tokens
                    .entry(hash)
                    .or_insert(TokenOwner { tenant_id });
            }
        }
        Ok(())
    }

    async fn publish_credentials(&self) -> Result<()> {
        let mut map = crate::sync::Credentials::default();
        for row in self.store.all_credentials().await? {
            let aad = credential_aad(&row.tenant_id, &row.vendor);
            let plain = self
                .master
                .open(&row.sealed, &aad)
                .with_context(|| format!("credential of {} for {}", row.tenant_id, row.vendor))?;
            let secret = String::from_utf8(plain).context("credential is not UTF-8")?;
            map.entry(row.tenant_id)
                .or_default()
                .insert(row.vendor, Secret::new(secret));
        }
        // A reload that found nothing new (every 10 s on PostgreSQL) wakes no node.
        let same = |old: &crate::sync::Credentials| {
            old.len() == map.len()
                && map.iter().all(|(tenant, vendors)| {
                    old.get(tenant).is_some_and(|o| {
                        o.len() == vendors.len()
                            && vendors
                                .iter()
                                .all(|(v, s)| o.get(v).is_some_and(|x| x.ct_eq(s.expose())))
                    })
                })
        };
        if same(&self.published.credentials.load()) {
            return Ok(());
        }
        self.published.credentials.store(Arc::new(map));
        self.feed_changed();
        Ok(())
    }

    // ----- authentication -----

    pub fn is_admin(&self, token: &str) -> bool {
        self.admin_token.ct_eq(token)
    }

    /// The tenant owning this API token. Looked up by SHA-256, never by the token itself.
    pub fn tenant_for_token(&self, token: &str) -> Option<String> {
        self.api_tokens
            .get(&token_hash(token))
            .map(|o| o.tenant_id.clone())
    }

    // ----- tenants, tokens, nodes -----

    /// A new tenant and its first API token: (tenant id, token id, token, created_at).
    pub async fn create_tenant(&self, name: &str) -> Result<(String, String, Secret, i64)> {
        let (id, token_id, token, now) =
            (new_id("tn_"), new_id("tok_"), new_token("kb_"), now_secs());
        let hash = token_hash(&token);
        let _g = self.tokens_lock.lock().await;
        self.store
            .insert_tenant(&id, name, &token_id, &hash, now)
            .await?;
        self.api_tokens.insert(
            hash,
            TokenOwner {
                tenant_id: id.clone(),
            },
        );
        Ok((id, token_id, Secret::new(token), now))
    }

    pub async fn list_tenants(
        &self,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<(String, String, i64)>> {
        self.store.list_tenants(after, limit).await
    }

    /// A new API token for an existing tenant; `None` when the tenant does not exist.
    pub async fn create_api_token(&self, tenant_id: &str) -> Result<Option<(String, Secret)>> {
        if !self.store.tenant_exists(tenant_id).await? {
            return Ok(None);
        }
        let (token_id, token) = (new_id("tok_"), new_token("kb_"));
        let hash = token_hash(&token);
        let _g = self.tokens_lock.lock().await;
        self.store
            .insert_api_token(&token_id, tenant_id, &hash, now_secs())
            .await?;
        self.api_tokens.insert(
            hash,
            TokenOwner {
                tenant_id: tenant_id.to_string(),
            },
        );
        Ok(Some((token_id, Secret::new(token))))
    }

    pub async fn delete_api_token(&self, tenant_id: &str, token_id: &str) -> Result<bool> {
        let _g = self.tokens_lock.lock().await;
        match self.store.delete_api_token(tenant_id, token_id).await? {
            Some(hash) => {
                if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
                    self.api_tokens.remove(&hash);
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// `None` when a node of that name exists (delete it first, or choose another name).
    pub async fn create_node(&self, name: &str) -> Result<Option<(String, Secret)>> {
        let (id, token) = (new_id("nd_"), new_token("kbn_"));
        if !self
            .store
            .insert_node(&id, name, &token_hash(&token), now_secs())
            .await?
        {
            return Ok(None);
        }
        self.node_created(&id, &token);
        Ok(Some((id, Secret::new(token))))
    }

    // ----- signing keys -----

    pub async fn rotate_signing_key(&self) -> Result<String> {
        let now = now_secs();
        let kid = create_signing_key(&self.store, &self.master, now).await?;
        let (signer, jwks) = load_signing_keys(&self.store, &self.master, now).await?;
        self.signer.store(Arc::new(signer));
        self.jwks.store(Arc::new(jwks));
        self.publish_jwks();
        Ok(kid)
    }

    pub fn jwks(&self) -> Arc<Jwks> {
        self.jwks.load_full()
    }

    // ----- vendor credentials -----

    pub fn is_known_vendor(&self, vendor: &str) -> bool {
        self.settings.vendors.contains(vendor)
    }

    pub async fn put_credential(
        &self,
        tenant_id: &str,
        vendor: &str,
        secret: Secret,
    ) -> Result<(String, i64)> {
        let _g = self.credentials_lock.lock().await;
        let now = now_secs();
        let row = CredentialRow {
            tenant_id: tenant_id.into(),
            vendor: vendor.into(),
            sealed: self.master.seal(
                secret.expose().as_bytes(),
                &credential_aad(tenant_id, vendor),
            ),
            last4: secret.last4(),
            updated_at: now,
        };
        self.store.upsert_credential(&row).await?;
        let mut map = (**self.published.credentials.load()).clone();
        map.entry(tenant_id.into())
            .or_default()
            .insert(vendor.into(), secret);
        self.published.credentials.store(Arc::new(map));
        // Edge nodes hold credentials too: wake their long-polls.
        self.feed_changed();
        Ok((row.last4, now))
    }

    pub async fn get_credential(
        &self,
        tenant_id: &str,
        vendor: &str,
    ) -> Result<Option<(String, i64)>> {
        Ok(self
            .store
            .all_credentials()
            .await?
            .into_iter()
            .find(|c| c.tenant_id == tenant_id && c.vendor == vendor)
            .map(|c| (c.last4, c.updated_at)))
    }

    pub async fn delete_credential(&self, tenant_id: &str, vendor: &str) -> Result<bool> {
        let _g = self.credentials_lock.lock().await;
        let existed = self.store.delete_credential(tenant_id, vendor).await?;
        let mut map = (**self.published.credentials.load()).clone();
        if let Some(vendors) = map.get_mut(tenant_id) {
            vendors.remove(vendor);
            if vendors.is_empty() {
                map.remove(tenant_id);
            }
        }
        self.published.credentials.store(Arc::new(map));
        self.feed_changed();
        Ok(existed)
    }

    // ----- vault keys -----

    pub async fn issue_key(
        &self,
        tenant_id: &str,
        req: NewKey,
    ) -> Result<(KeyRow, Secret), IssueError> {
        let configured = self
            .published
            .credentials
            .load()
            .get(tenant_id)
            .is_some_and(|vendors| vendors.contains_key(&req.vendor));
        if !self.is_known_vendor(&req.vendor) || !configured {
            return Err(IssueError::VendorNotConfigured(req.vendor));
        }
        let now = now_secs();
        let signer = self.signer.load();
        let row = KeyRow {
            seq: 0,
            id: new_sorted_id("key_", unix_ms()),
            tenant_id: tenant_id.into(),
            kid: signer.kid.clone(),
            vendor: req.vendor,
            label: req.label,
            allowed_endpoints: req.allowed_endpoints,
            daily_cap: req.daily_cap,
            metadata: req.metadata,
            stripe_accounts: req.stripe_accounts,
            created_at: now,
            expires_at: now + req.ttl.as_secs() as i64,
            revoked_at: None,
        };
        let token = signer.sign(&Claims {
            jti: row.id.clone(),
            ten: row.tenant_id.clone(),
            ven: row.vendor.clone(),
            eps: row.allowed_endpoints.clone(),
            cap: row.daily_cap.0,
            iat: now,
            exp: row.expires_at,
            lbl: row.label.clone(),
            acc: row.stripe_accounts.clone(),
        });
        self.keys.insert(row.clone()).await?;
        self.metrics.keys_issued.inc();
        Ok((row, token))
    }

    pub fn settings(&self) -> &ControlSettings {
        &self.settings
    }

    pub async fn get_key(&self, tenant_id: &str, id: &str) -> Result<Option<KeyView>> {
        let Some(row) = self.store.get_key(tenant_id, id).await? else {
            return Ok(None);
        };
        Ok(Some(self.view(row).await?))
    }

    pub async fn view(&self, row: KeyRow) -> Result<KeyView> {
        let now = now_secs();
        let ledger = self.store.ledger_row(&row.id, utc_day(now)).await?;
        Ok(KeyView {
            status: key_status(&row, now),
            ledger,
            row,
        })
    }

    /// A place to build one listing page for `tenant_id`: one of its own
    /// (`PAGE_BUILDS_PER_TENANT`; none free: 429 `rate_limited` at once, so a tenant's
    /// flood of listings never keeps connections busy waiting), then one of the process's
    /// (`PAGE_BUILDS`, waited for).
    pub async fn page_build(
        &self,
        tenant_id: &str,
    ) -> Result<
        (
            tokio::sync::OwnedSemaphorePermit,
            tokio::sync::SemaphorePermit<'_>,
        ),
        errors::ApiError,
    > {
        let own = {
            let mut by_tenant = self
                .tenant_page_builds
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            by_tenant
                .entry(tenant_id.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(PAGE_BUILDS_PER_TENANT)))
                .clone()
        };
        let own = own.try_acquire_owned().map_err(|_| {
            errors::ApiError::RateLimited("listings of keys", PAGE_BUILDS_PER_TENANT)
        })?;
        let shared = self
            .page_builds
            .acquire()
            .await
            .map_err(|_| errors::ApiError::Internal)?;
        Ok((own, shared))
    }

    /// A page of the tenant's keys, newest first, and whether more may follow. The page
    /// ends at `limit` keys or once its keys take about `MAX_PAGE_BYTES` of JSON, so a page
    /// of large keys (100 patterns, 8 KiB of metadata each) stays a bounded size however
    /// many clients read it at once. Rows are read `PAGE_CHUNK` at a time, and each
    /// chunk's spend in one query.
    pub async fn list_keys(
        &self,
        tenant_id: &str,
        status: Option<KeyStatus>,
        before_seq: i64,
        limit: i64,
    ) -> Result<(Vec<KeyView>, bool)> {
        const PAGE_CHUNK: i64 = 100;
        let now = now_secs();
        let day = utc_day(now);
        let mut views = Vec::new();
        let (mut before, mut bytes) = (before_seq, 0usize);
        // Rows read at a time: few at first, then as many as the keys seen so far say fit
        // in what is left of the page, so a page of large keys never reads (and holds)
        // many more rows than it returns.
        let mut chunk = 16;
        while (views.len() as i64) < limit {
            let want = (limit - views.len() as i64).min(chunk);
            let rows = self
                .store
                .list_keys(tenant_id, status, before, want, now)
                .await?;
            let last_chunk = (rows.len() as i64) < want;
            let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
            let mut ledger = self.store.ledger_rows(&ids, day).await?;
            for row in rows {
                let size = key_json_size(&row);
                if !views.is_empty() && bytes.saturating_add(size) > MAX_PAGE_BYTES {
                    return Ok((views, true));
                }
                bytes = bytes.saturating_add(size);
                before = row.seq;
                views.push(KeyView {
                    status: key_status(&row, now),
                    ledger: ledger.remove(&row.id).unwrap_or_default(),
                    row,
                });
            }
            if last_chunk {
                return Ok((views, false));
            }
            let average = (bytes / views.len().max(1)).max(1);
            chunk = i64::try_from(MAX_PAGE_BYTES.saturating_sub(bytes) / average)
                .unwrap_or(PAGE_CHUNK)
                .clamp(1, PAGE_CHUNK);
        }
        Ok((views, true))
    }

    /// Revokes a key and publishes the revocation before returning, so the in-process proxy
    /// refuses the key from the next request on. Idempotent.
    pub async fn revoke_key(&self, tenant_id: &str, id: &str) -> Result<Option<KeyRow>> {
        let now = now_secs();
        // Stamped on the store's clock (the database server's, on PostgreSQL): the one
        // every replica's catch-up window is counted on.
        let stamp = self.store.now_secs();
        let Some(row) = self.store.revoke_key(tenant_id, id, stamp).await? else {
            return Ok(None);
        };
        let filter = self.published.revocations.load();
        // Kept as the filter keeps revocations: a day past the key's expiry (a clock
        // ahead of the true time must not skip one).
        if !crate::revocation::is_past_keeping(row.expires_at, now) && !filter.is_revoked(&row.id) {
            let _g = self.revocations_lock.lock().await;
            let filter = self.published.revocations.load();
            filter.insert(&row.id, row.expires_at);
            self.fleet.revoked(&row.id, row.expires_at);
            self.grow_revocations(&filter);
            self.published.generation.fetch_add(1, Ordering::AcqRel);
            self.metrics.keys_revoked.inc();
        }
        Ok(Some(row))
    }
}

fn cursor_aad(kind: api::CursorKind, tenant_id: &str) -> String {
    let kind = match kind {
        api::CursorKind::Keys => "keys",
        api::CursorKind::Audit => "audit",
    };
    format!("cursor/{kind}/{tenant_id}")
}

fn credential_aad(tenant_id: &str, vendor: &str) -> String {
    format!("credential/{tenant_id}/{vendor}")
}

async fn create_signing_key(store: &Store, master: &MasterKey, now: i64) -> Result<String> {
    let kid = new_id("kid_");
    let (private, public) = generate_ed25519();
    let sealed = master.seal(&private, &format!("signing-key/{kid}"));
    store
        .insert_signing_key(&kid, &sealed, &public, now)
        .await?;
    Ok(kid)
}

/// The active signer and the JWKS of every key still needed for verification.
async fn load_signing_keys(
    store: &Store,
    master: &MasterKey,
    now: i64,
) -> Result<(SigningKey, Jwks)> {
    let rows = store.live_signing_keys(now).await?;
    let active = rows
        .iter()
        .find(|r| r.retired_at.is_none())
        .context("no active signing key")?;
    let private = master
        .open(
            &active.sealed_private,
            &format!("signing-key/{}", active.kid),
        )
        .context(
            "cannot open the signing key: is this the master key the store (data dir or database) was created with?",
        )?;
    let signer = SigningKey::from_pkcs8(active.kid.clone(), &private)
        .map_err(|_| anyhow::anyhow!("signing key {} is not a valid Ed25519 key", active.kid))?;
    let jwks = Jwks {
        keys: rows
            .iter()
            .map(|r| Jwk::ed25519(&r.kid, &r.public_key))
            .collect(),
    };
    Ok((signer, jwks))
}

/// About the most JSON one page of `GET /v1/keys` holds (see `Control::list_keys`).
pub const MAX_PAGE_BYTES: usize = 512 * 1024;
const PAGE_BUILDS: usize = 8;
const PAGE_BUILDS_PER_TENANT: usize = 2;

/// About how many bytes of JSON a key takes in a listing: its variable parts plus a
/// fixed allowance for ids, dates and money fields.
fn key_json_size(row: &KeyRow) -> usize {
    let patterns: usize = row.allowed_endpoints.iter().map(|p| p.len() + 4).sum();
    let accounts: usize = row
        .stripe_accounts
        .iter()
        .flatten()
        .map(|a| a.len() + 4)
        .sum();
    let metadata = serde_json::to_string(&row.metadata).map_or(0, |m| m.len());
    400 + row.label.len() * 2 + patterns + accounts + metadata
}

/// A pause of the lease upkeep's once-a-second loop longer than this (a frozen process, a
/// suspended host) restarts the wait before anyone is taken for dead.
const UPKEEP_GAP: Duration = Duration::from_secs(5);

/// How long a reclaimed holder's mark is kept (from its start), refusing a late hello of
/// its session.
const RECLAIMED_HOLDERS_KEPT_SECS: i64 = 86_400;

/// Kept between the end of a holder's validity for its own proxy and the moment other
/// processes may take it for dead.
const LEASE_MARGIN_SECS: i64 = 1;

fn lease_lifetime_secs(settings: &ControlSettings) -> i64 {
    i64::try_from(settings.lease_lifetime.as_secs())
        .unwrap_or(i64::MAX)
        .max(LEASE_MARGIN_SECS + 2)
}

impl Control {
    /// Leases for `holder`, all asked in one store transaction (each grant still one
    /// conditional statement: never past a key's cap, whoever else is granting).
    async fn lease_many_for(
        &self,
        holder: &str,
        batch: Option<u64>,
        requests: Vec<LeaseRequest>,
    ) -> Vec<Result<Grant, LedgerError>> {
        let revocations = self.published.revocations.load();
        let revoked: Vec<bool> = requests
            .iter()
            .map(|r| revocations.is_revoked(&r.key_id))
            .collect();
        let asks: Vec<ledger_batch::GrantRequest> = requests
            .into_iter()
            .zip(&revoked)
            .map(|(r, &revoked)| {
                // A revoked key is asked for nothing (min 0 grants nothing).
                ledger_batch::GrantRequest {
                    key_id: r.key_id,
                    day: r.day,
                    cap: r.cap,
                    min: if revoked { Micros::ZERO } else { r.min },
                    want: r.want,
                    commit: r.commit,
                }
            })
            .collect();
        match self
            .store
            .lease_grant_many(holder, self.store.now_secs(), batch, &asks)
            .await
        {
            Ok(grants) => grants
                .into_iter()
                .zip(revoked)
                .map(|(g, revoked)| Ok(Grant { revoked, ..g }))
                .collect(),
            Err(e) => {
                let e = format!("{e:#}");
                asks.iter().map(|_| Err(LedgerError(e.clone()))).collect()
            }
        }
    }

    /// `holder`'s report, applied in one store transaction; `batch` numbered by a node
    /// (`Store::lease_report_many`): false when it was applied already. `lost`: the
    /// node's lease batches whose answers it never got, given back whole.
    async fn report_for(
        &self,
        holder: &str,
        batch: Option<u64>,
        reports: Vec<LeaseReport>,
        lost: &[u64],
    ) -> Result<bool, LedgerError> {
        let overflow = || LedgerError("spend report out of range".into());
        let mut rows = Vec::with_capacity(reports.len());
        for r in reports {
            rows.push(ledger_batch::ReportRow {
                settled: r
                    .spent
                    .checked_add(r.overspent)
                    .ok_or_else(overflow)?
                    .max(Micros::ZERO),
                key_id: r.key_id,
                day: r.day,
                spent: r.spent,
                returned: r.returned,
                unreserved: r.unreserved,
                return_uncommitted: r.return_uncommitted,
            });
        }
        self.store
            .lease_report_many(holder, batch, &rows, lost)
            .await
            .map_err(|e| LedgerError(format!("{e:#}")))
    }

    /// Write-ahead of `holder`'s reservations, in one store transaction.
    async fn commit_for(
        &self,
        holder: &str,
        commits: Vec<LeaseCommit>,
    ) -> Result<Vec<bool>, LedgerError> {
        let rows: Vec<(String, i64, Micros)> = commits
            .into_iter()
            .map(|c| (c.key_id, c.day, c.amount))
            .collect();
        self.store
            .lease_commit_many(holder, self.store.now_secs(), &rows)
            .await
            .map_err(|e| LedgerError(format!("{e:#}")))
    }
}

/// The in-process ledger: leases come straight from the control plane's store, granted
/// to this process as their holder.
#[async_trait::async_trait]
impl Ledger for Control {
    async fn lease(&self, req: LeaseRequest) -> Result<Grant, LedgerError> {
        self.lease_many(vec![req])
            .await
            .pop()
            .unwrap_or_else(|| Err(LedgerError("no answer".into())))
    }

    async fn lease_many(&self, requests: Vec<LeaseRequest>) -> Vec<Result<Grant, LedgerError>> {
        if crate::token::mono_ms() >= self.leases_valid_until_ms() {
            let lapsed = || LedgerError("this process's leases have lapsed (no heartbeat)".into());
            return requests.iter().map(|_| Err(lapsed())).collect();
        }
        self.lease_many_for(&self.holder, None, requests).await
    }

    /// In process, nothing is lost between this call and the store: no numbering.
    async fn report(&self, reports: Vec<LeaseReport>) -> Result<(), LedgerError> {
        self.report_for(&self.holder, None, reports, &[])
            .await
            .map(drop)
    }

    async fn commit(&self, commits: Vec<LeaseCommit>) -> Result<Vec<bool>, LedgerError> {
        self.commit_for(&self.holder, commits).await
    }

    fn leases_valid_until_ms(&self) -> i64 {
        self.leases_valid_until_ms.load(Ordering::Acquire)
    }

    fn report_rows_per_call(&self) -> Option<usize> {
        Some(REPORT_ROWS_PER_TRANSACTION)
    }
}

/// Rows of a spend report applied per store transaction (`Ledger::report_rows_per_call`):
/// first leases wait for the writer behind at most one such transaction.
const REPORT_ROWS_PER_TRANSACTION: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    async fn open(dir: &Path, master: &str) -> Arc<Control> {
        let database = crate::database::Database::Sqlite {
            data_dir: dir.to_path_buf(),
        };
        open_on(&database, master).await
    }

    /// A control on `database` (its store and audit trail).
    async fn open_on(database: &crate::database::Database, master: &str) -> Arc<Control> {
        let settings = ControlSettings {
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(3600),
            vendors: ["stripe".to_string()].into(),
            lease_lifetime: Duration::from_secs(3),
            audit_durability: Default::default(),
            expired_key_retention: crate::config::defaults::EXPIRED_KEY_RETENTION,
        };
        let master = MasterKey::from_base64(master).unwrap();
        let published = Arc::new(Published::empty());
        Control::open(
            settings,
            database,
            master,
            Secret::new("admin"),
            published,
            Metrics::global(),
        )
        .await
        .unwrap()
    }

    async fn postgres_database() -> crate::database::Database {
        let url = pg_test::database().await;
        crate::database::Database::Postgres {
            url: crate::database::DatabaseUrl::parse(&url).unwrap(),
        }
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..50 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("not within 5 s: {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_the_store_is_shared_tokens_and_credentials_follow_the_other_process() {
        let dir = std::env::temp_dir().join(format!("keybrake-shared-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let master = MasterKey::generate_base64();
        let old = open(&dir, &master).await;
        let new = open(&dir, &master).await;
        new.share_store_until(i64::MAX);
        tokio::spawn(new.clone().follow_revocations());

        let (tenant, token_id, token, _) = old.create_tenant("t").await.unwrap();
        old.put_credential(&tenant, "stripe", Secret::new("sk_test_1"))
            .await
            .unwrap();
        let secret = |c: &Control| {
            c.published
                .credentials
                .load()
                .get(&tenant)
                .and_then(|v| v.get("stripe"))
                .map(|s| s.expose().to_string())
        };
        eventually("the new tenant's token and credential", || {
            new.tenant_for_token(token.expose()).as_deref() == Some(tenant.as_str())
                && secret(&new).as_deref() == Some("sk_test_1")
        })
        .await;

        old.put_credential(&tenant, "stripe", Secret::new("sk_test_2"))
            .await
            .unwrap();
        assert!(old.delete_api_token(&tenant, &token_id).await.unwrap());
        eventually("the rotated credential and the deleted token", || {
            new.tenant_for_token(token.expose()).is_none()
                && secret(&new).as_deref() == Some("sk_test_2")
        })
        .await;

        // Outside a shared window nothing is reloaded (the reload is not free).
        let (_, _, other, _) = old.create_tenant("u").await.unwrap();
        let alone = open(&dir, &master).await;
        tokio::spawn(alone.clone().follow_revocations());
        let (_, _, later, _) = old.create_tenant("v").await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(alone.tenant_for_token(other.expose()).is_some());
        assert!(alone.tenant_for_token(later.expose()).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("keybrake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn lease_request(key: &str, cap: i64, min: i64, want: i64) -> LeaseRequest {
        LeaseRequest {
            budget: Default::default(),
            key_id: key.into(),
            tenant_id: "tn_x".into(),
            day: utc_day(now_secs()),
            cap: Micros(cap),
            min: Micros(min),
            want: Micros(want),
            commit: Micros::ZERO,
        }
    }

    /// Two processes on one database (two replicas on PostgreSQL, or the two processes
    /// of a graceful upgrade on SQLite) lease from the same key at once: together they
    /// never grant more than its cap, and all of it is granted, one lease at a time and
    /// in batches.
    async fn race(database: crate::database::Database, name: &str) {
        let dir = temp_dir(name);
        let master = MasterKey::generate_base64();
        let a = open_on(&database, &master).await;
        let b = open_on(&database, &master).await;
        let cap = 1_000_000;
        let mut tasks = Vec::new();
        for i in 0..32 {
            let ledger = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let mut got = 0i64;
                for _ in 0..40 {
                    // Every fourth task asks in batches (two keys at once).
                    let grant = if i % 4 == 1 {
                        let grants = ledger
                            .lease_many(vec![
                                lease_request("key_race", cap, 1, 9_000),
                                lease_request("key_other", cap, 1, 1),
                            ])
                            .await;
                        grants.into_iter().next().unwrap().unwrap()
                    } else {
                        ledger
                            .lease(lease_request("key_race", cap, 1, 9_000))
                            .await
                            .unwrap()
                    };
                    if grant.granted.0 == 0 {
                        break;
                    }
                    got += grant.granted.0;
                }
                got
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let row = a
            .store
            .ledger_row("key_race", utc_day(now_secs()))
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(total <= cap, "granted {total} against a cap of {cap}");
        assert_eq!(total, cap, "the whole cap is granted in the end");
        assert_eq!(row.held, Micros(cap));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_controls_racing_on_one_store_never_grant_more_than_the_cap() {
        let sqlite = crate::database::Database::Sqlite {
            data_dir: temp_dir("lease-race-db"),
        };
        race(sqlite, "lease-race").await;
        race(postgres_database().await, "lease-race-pg").await;
    }

    /// A released reservation's budget is back in the proxy's counter at once, and in the
    /// ledger's uncommitted lease by the next report round, so the next calls can commit
    /// it: the whole cap stays spendable, nothing is left held at the end of the day.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_released_reservation_is_spendable_again_after_the_next_report_round() {
        use crate::proxy::spend::{SpendBook, Spender};
        let dir = temp_dir("released-again");
        let control = open(&dir, &MasterKey::generate_base64()).await;
        let ledger: Arc<dyn Ledger> = control.clone();
        let book = SpendBook::new(
            ledger,
            Arc::new(Published::empty()),
            1,
            2,
            Metrics::global(),
        );
        let who = Spender {
            key_id: "key_released",
            tenant_id: "tn_x",
            vendor: "stripe",
            cap: Micros(10_000_000),
            exp: i64::MAX,
        };
        let t = now_secs();
        // $5 declined by the vendor: released. The next round reports it unreserved.
        let declined = book.reserve(&who, Micros(5_000_000), t).await.unwrap();
        book.release(declined);
        book.report(t, false).await;
        // Both halves of the cap are spent a second later.
        let a = book.reserve(&who, Micros(5_000_000), t + 1).await.unwrap();
        let b = book.reserve(&who, Micros(5_000_000), t + 1).await.unwrap();
        book.settle(a);
        book.settle(b);
        book.report(t + 3, false).await;
        let row = control
            .store
            .ledger_row("key_released", utc_day(t))
            .await
            .unwrap();
        assert_eq!((row.settled, row.held), (Micros(10_000_000), Micros::ZERO));
    }

    /// The ledger grants, and the answer is lost on its way (an edge node's lease call
    /// cut after the control plane committed): the grant is held for a holder that never
    /// heard of it. The proxy, in doubt, gives back everything uncommitted with its next
    /// report, so that part comes back to the key the same day and can be spent. The part
    /// the grant committed for the call that asked (which the ledger cannot tell from a
    /// forwarded call's) stays held until the holder's leases are reclaimed.
    #[tokio::test]
    async fn the_uncommitted_part_of_a_grant_whose_answer_was_lost_comes_back() {
        use crate::proxy::spend::{SpendBook, SpendError, Spender};
        use crate::sync::{Grant, LeaseCommit, LeaseReport};

        /// Forwards to the control plane; loses the answer of the first lease call.
        struct LosesFirstAnswer {
            inner: Arc<Control>,
            lost: std::sync::atomic::AtomicBool,
        }
        #[async_trait::async_trait]
        impl Ledger for LosesFirstAnswer {
            async fn lease(&self, r: LeaseRequest) -> Result<Grant, LedgerError> {
                self.lease_many(vec![r]).await.pop().unwrap()
            }
            async fn lease_many(&self, r: Vec<LeaseRequest>) -> Vec<Result<Grant, LedgerError>> {
                let answers = self.inner.lease_many(r).await;
                if self.lost.swap(true, Ordering::AcqRel) {
                    answers
                } else {
                    answers
                        .iter()
                        .map(|_| Err(LedgerError("connection reset".into())))
                        .collect()
                }
            }
            async fn report(&self, r: Vec<LeaseReport>) -> Result<(), LedgerError> {
                self.inner.report(r).await
            }
            async fn commit(&self, c: Vec<LeaseCommit>) -> Result<Vec<bool>, LedgerError> {
                self.inner.commit(c).await
            }
            fn leases_valid_until_ms(&self) -> i64 {
                self.inner.leases_valid_until_ms()
            }
        }

        let dir = temp_dir("lost-grant");
        let control = open(&dir, &MasterKey::generate_base64()).await;
        let ledger = Arc::new(LosesFirstAnswer {
            inner: control.clone(),
            lost: Default::default(),
        });
        let book = SpendBook::new(
            ledger,
            Arc::new(Published::empty()),
            1,
            2,
            Metrics::global(),
        );
        let who = Spender {
            key_id: "key_lost",
            tenant_id: "tn_x",
            vendor: "stripe",
            cap: Micros(4_000_000),
            exp: i64::MAX,
        };
        let t = now_secs();
        let day = utc_day(t);
        assert!(matches!(
            book.reserve(&who, Micros(1_000_000), t).await,
            Err(SpendError::LedgerUnavailable)
        ));
        // The whole cap is held by this process, which does not know it has it: $2 of it
        // committed for the call that asked.
        let row = control.store.ledger_row("key_lost", day).await.unwrap();
        assert_eq!(row.held, Micros(4_000_000));
        assert!(book.reserve(&who, Micros(1_000_000), t).await.is_err());
        book.report(t, false).await;
        // The uncommitted $2 are spendable again, and spent.
        for _ in 0..2 {
            let r = book.reserve(&who, Micros(1_000_000), t).await.unwrap();
            book.settle(r);
        }
        assert!(book.reserve(&who, Micros(1_000_000), t).await.is_err());
        book.report(t + 3, false).await;
        let row = control.store.ledger_row("key_lost", day).await.unwrap();
        assert_eq!(
            (row.settled, row.held),
            (Micros(2_000_000), Micros(2_000_000))
        );
    }

    /// A $100/day Stripe key of `tenant`, issued at `now` for ten minutes.
    fn stripe_key(id: &str, tenant: &str, now: i64) -> KeyRow {
        KeyRow {
            seq: 0,
            id: id.into(),
            tenant_id: tenant.into(),
            kid: "kid_x".into(),
            vendor: "stripe".into(),
            label: "l".into(),
            allowed_endpoints: vec!["/v1/**".into()],
            daily_cap: Micros(100_000_000),
            metadata: serde_json::json!({}),
            stripe_accounts: None,
            created_at: now,
            expires_at: now + 600,
            revoked_at: None,
        }
    }

    #[tokio::test]
    async fn a_tenant_builds_two_listing_pages_at_once_and_is_told_to_retry_beyond() {
        let dir = temp_dir("page-builds");
        let control = open(&dir, &MasterKey::generate_base64()).await;
        let a1 = control.page_build("tn_a").await.unwrap();
        let _a2 = control.page_build("tn_a").await.unwrap();
        let third = control.page_build("tn_a").await.expect_err("refused");
        assert_eq!(third.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(third.code(), "rate_limited");
        let response = axum::response::IntoResponse::into_response(third);
        assert_eq!(response.headers()["retry-after"], "1");
        // Another tenant is not held up by the first's listings.
        let _b = tokio::time::timeout(Duration::from_secs(1), control.page_build("tn_b"))
            .await
            .expect("at once")
            .unwrap();
        drop(a1);
        assert!(control.page_build("tn_a").await.is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_revoked_keys_lease_is_refused_as_revoked_not_as_its_cap() {
        let dir = temp_dir("lease-revoked");
        let control = open(&dir, &MasterKey::generate_base64()).await;
        let (tenant, _, _, _) = control.create_tenant("t").await.unwrap();
        let now = now_secs();
        let key = stripe_key("key_gone", &tenant, now);
        control.store.insert_keys(&[key]).await.unwrap();
        let ask = || lease_request("key_gone", 100_000_000, 1, 6_250_000);
        let grant = control.lease(ask()).await.unwrap();
        assert!(grant.granted.is_positive() && !grant.revoked);
        control.revoke_key(&tenant, "key_gone").await.unwrap();
        let grant = control.lease(ask()).await.unwrap();
        assert_eq!((grant.granted, grant.revoked), (Micros::ZERO, true));
    }

    /// A process dies holding a lease: once its lifetime has passed, another process
    /// settles what the audit trail shows it spent and gives the rest back; not before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_processes_lease_is_settled_from_the_trail_and_given_back_after_its_lifetime() {
        let dir = temp_dir("lease-reclaim");
        let master = MasterKey::generate_base64();
        let dead = open(&dir, &master).await;
        let (tenant, _, _, _) = dead.create_tenant("t").await.unwrap();
        let now = now_secs();
        let key = stripe_key("key_dead", &tenant, now);
        dead.store.insert_keys(&[key]).await.unwrap();
        let grant = dead
            .lease(lease_request(
                "key_dead",
                100_000_000,
                30_000_000,
                30_000_000,
            ))
            .await
            .unwrap();
        assert_eq!(grant.granted, Micros(30_000_000));
        // Another lease of the same process on another key, none of it spent.
        dead.lease(lease_request("key_idle", 100_000_000, 1, 6_250_000))
            .await
            .unwrap();
        // $10 of it was spent and audited, never reported: then the process died.
        crate::sync::AuditSink::record(
            &dead.audit,
            crate::sync::AuditEvent {
                ts_ms: now * 1000,
                tenant_id: Some(tenant.as_str().into()),
                key_id: Some("key_dead".into()),
                label: None,
                vendor: "stripe".into(),
                method: "POST".into(),
                path: "/stripe/v1/payment_intents".into(),
                status: 200,
                decision: "allowed".into(),
                spend: Micros(10_000_000),
                vendor_request_id: None,
                duration_ms: 1,
                llm: None,
            },
        );
        assert!(dead.audit.flush(Duration::from_secs(10)));
        drop(dead);

        let next = open(&dir, &master).await;
        let day = utc_day(now_secs());
        assert_eq!(
            next.reclaim_dead_holders(now_secs()).await.unwrap(),
            Micros::ZERO
        );
        let held = next.store.ledger_row("key_dead", day).await.unwrap();
        assert_eq!(
            held.held,
            Micros(30_000_000),
            "given back before its lifetime"
        );
        // Dead once `alive_until` (whole seconds, 3 s after the last beat) is in the past.
        tokio::time::sleep(Duration::from_millis(4_200)).await;
        let back = next.reclaim_dead_holders(now_secs()).await.unwrap();
        let spent = next.store.ledger_row("key_dead", day).await.unwrap();
        let idle = next.store.ledger_row("key_idle", day).await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(back, Micros(20_000_000 + 6_250_000));
        assert_eq!(
            (spent.settled, spent.held),
            (Micros(10_000_000), Micros::ZERO)
        );
        assert_eq!((idle.settled, idle.held), (Micros::ZERO, Micros::ZERO));
    }

    /// The JWKS follows a rotation made by another process even when the number of keys
    /// stays the same (the old key had no live vault key left, so it left as one came).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rotation_by_another_process_is_republished_even_at_the_same_key_count() {
        let dir = temp_dir("jwks-ids");
        let master = MasterKey::generate_base64();
        let a = open(&dir, &master).await;
        let b = open(&dir, &master).await;
        let kid = a.rotate_signing_key().await.unwrap();
        assert_eq!(a.jwks().keys.len(), b.jwks().keys.len());
        b.refresh_signing_keys(now_secs()).await;
        let ids: Vec<String> = b.jwks().keys.iter().map(|k| k.kid.clone()).collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(ids, [kid]);
    }
}
