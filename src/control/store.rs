//! Storage of the control plane: embedded SQLite (WAL) through `sqlx`, so PostgreSQL can
//! follow behind the same functions. One writer connection (SQLite has one writer; a
//! single connection avoids lock contention), a few readers.
//!
//! Secrets never reach this module in clear: credentials and signing keys arrive sealed
//! (see `crypto`), API tokens arrive hashed.

use crate::money::Micros;
use anyhow::{Context, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::time::Duration;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran. The
/// first is the whole schema, one `CREATE` per table; a change to the schema of a released
/// version is a new entry at the end, never an edit of one that shipped. The audit trail
/// has its own file and schema (`audit::SCHEMA`).
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    token_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE credentials (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    vendor TEXT NOT NULL,
    sealed BLOB NOT NULL,
    last4 TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, vendor)
);
CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    sealed_private BLOB NOT NULL,
    public_key BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    retired_at INTEGER
);
CREATE TABLE keys (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    kid TEXT NOT NULL,
    vendor TEXT NOT NULL,
    label TEXT NOT NULL,
    allowed_endpoints TEXT NOT NULL,
    daily_cap INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    stripe_accounts TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX keys_by_tenant ON keys (tenant_id, seq);
CREATE INDEX keys_by_kid ON keys (kid, expires_at);
CREATE INDEX keys_by_revoked_at ON keys (revoked_at) WHERE revoked_at IS NOT NULL;
-- `held` is the sum of the key's leases for the day (see `leases`). `last_grant` carries
-- a grant out of the one conditional statement that makes it.
CREATE TABLE ledger (
    key_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    settled INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,
    last_grant INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day)
);
-- Processes serving the ledger to their proxy, so that a dead holder's leases can be
-- given back.
CREATE TABLE holders (
    id TEXT PRIMARY KEY,
    started_at INTEGER NOT NULL,
    alive_until INTEGER NOT NULL
);
CREATE TABLE leases (
    holder TEXT NOT NULL,
    key_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    held INTEGER NOT NULL,
    PRIMARY KEY (holder, key_id, day)
);
"#,
    // Write-ahead of reservations (`ledger_batch`): the part of a lease that calls which
    // may have reached the vendor took, settled as spent if its holder dies.
    "ALTER TABLE leases ADD COLUMN committed INTEGER NOT NULL DEFAULT 0;",
];

/// The store's file in the data dir.
pub const FILE: &str = "keybrake.db";

#[derive(Clone)]
pub struct Store {
    pub(super) writer: SqlitePool,
    checkpointer: SqlitePool,
    reader: SqlitePool,
}

#[derive(Debug, Clone)]
pub struct KeyRow {
    pub seq: i64,
    pub id: String,
    pub tenant_id: String,
    pub kid: String,
    pub vendor: String,
    pub label: String,
    pub allowed_endpoints: Vec<String>,
    pub daily_cap: Micros,
    pub metadata: serde_json::Value,
    pub stripe_accounts: Option<Vec<String>>,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
    Expired,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }
}

pub struct SigningKeyRow {
    pub kid: String,
    pub sealed_private: Vec<u8>,
    pub public_key: Vec<u8>,
    pub retired_at: Option<i64>,
}

pub struct CredentialRow {
    pub tenant_id: String,
    pub vendor: String,
    pub sealed: Vec<u8>,
    pub last4: String,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerRow {
    pub settled: Micros,
    pub held: Micros,
}

fn key_row(r: &sqlx::sqlite::SqliteRow) -> KeyRow {
    KeyRow {
        seq: r.get("seq"),
        id: r.get("id"),
        tenant_id: r.get("tenant_id"),
        kid: r.get("kid"),
        vendor: r.get("vendor"),
        label: r.get("label"),
        allowed_endpoints: serde_json::from_str(r.get::<&str, _>("allowed_endpoints"))
            .unwrap_or_default(),
        daily_cap: Micros(r.get("daily_cap")),
        metadata: serde_json::from_str(r.get::<&str, _>("metadata")).unwrap_or_default(),
        stripe_accounts: r
            .get::<Option<&str>, _>("stripe_accounts")
            .and_then(|s| serde_json::from_str(s).ok()),
        created_at: r.get("created_at"),
        expires_at: r.get("expires_at"),
        revoked_at: r.get("revoked_at"),
    }
}

impl Store {
    pub async fn open(data_dir: &Path) -> Result<Store> {
        crate::secret::private_dir(data_dir)
            .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
        let path = data_dir.join(FILE);
        crate::secret::private_file(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a commit survives a process crash (kill -9); only an OS crash
            // can lose the last transactions. Spend is additionally protected by leases.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        // The writer does not checkpoint inside a commit: that checkpoint's syncs were the
        // issuance tail. `checkpoints` does it beside the writes instead, and lets the WAL
        // start over (see there). The writer's own checkpoint stays as a safety net at
        // 16,384 pages (64 MiB), which the WAL only reaches if that task stops.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(
                options
                    .clone()
                    .pragma("wal_autocheckpoint", "16384")
                    .pragma("journal_size_limit", "16777216"),
            )
            .await
            .context("cannot open the SQLite database")?;
        migrate(&writer).await?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .context("cannot open the SQLite database for checkpoints")?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .context("cannot open the SQLite database for reading")?;
        Ok(Store {
            writer,
            reader,
            checkpointer,
        })
    }

    /// Keeps the WAL short without putting a checkpoint inside any commit. Four times a
    /// second:
    /// 1. PASSIVE checkpoints on their own connection copy the committed pages into the
    ///    database file while writes go on (they never block them);
    /// 2. a second PASSIVE checkpoint on the writer connection copies what was committed
    ///    meanwhile. The writer pool has one connection, so no write runs beside it and it
    ///    ends with the whole WAL copied; the writer's next transaction then starts the WAL
    ///    over from its beginning (SQLite does that when no reader still needs old frames).
    ///
    /// Writes wait only for step 2: a few pages and two syncs. A reader that keeps an old
    /// snapshot open (a backup, say) stops the WAL from starting over until it ends, as in
    /// any WAL database; nothing here waits for it. Runs until the process ends.
    ///
    /// The writer pass's result is watched: `keybrake_store_wal_backlog_frames` shows the
    /// frames it could not copy, and a WAL that stays uncopied (a reader holding an old
    /// snapshot, a stuck disk) is logged after 10 s, then once a minute until it clears.
    pub async fn checkpoints(self, backlog: prometheus::IntGauge) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stuck_since: Option<std::time::Instant> = None;
        let mut last_warning: Option<std::time::Instant> = None;
        loop {
            tick.tick().await;
            // Twice: the second pass copies what was committed during the first, so the
            // pass the writes wait for has only a few milliseconds' worth left.
            for pool in [&self.checkpointer, &self.checkpointer] {
                if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(pool)
                    .await
                {
                    log::warn!("WAL checkpoint failed: {e}");
                }
            }
            // One row: busy (0 or 1), frames in the WAL, frames copied (-1 and -1 when
            // the database is not in WAL mode).
            let result = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&self.writer)
                .await;
            let now = std::time::Instant::now();
            let complete = match result {
                Ok((busy, frames, copied)) => {
                    backlog.set((frames - copied).max(0));
                    busy == 0 && copied >= frames
                }
                Err(e) => {
                    log::warn!("WAL checkpoint failed: {e}");
                    false
                }
            };
            if complete {
                if stuck_since.take().is_some() && last_warning.take().is_some() {
                    log::info!("the WAL is fully checkpointed again");
                }
                continue;
            }
            let since = *stuck_since.get_or_insert(now);
            let due = last_warning.is_none_or(|w| now - w >= Duration::from_secs(60));
            if now - since >= Duration::from_secs(10) && due {
                log::warn!(
                    "the WAL has not been fully checkpointed for {} s (a reader holding an \
                     old snapshot, or a slow disk?); it grows until it is",
                    (now - since).as_secs()
                );
                last_warning = Some(now);
            }
        }
    }

    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.reader).await.is_ok()
    }

    // ----- tenants and tokens -----

    pub async fn insert_tenant(
        &self,
        id: &str,
        name: &str,
        token_id: &str,
        token_hash: &[u8],
        now: i64,
    ) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, ?)")
            .bind(id)
            .bind(name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, tenant_id, token_hash, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(token_id)
        .bind(id)
        .bind(token_hash)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn list_tenants(
        &self,
        after_created: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<(String, String, i64)>> {
        let (ts, id) = after_created.unwrap_or((i64::MIN, String::new()));
        let rows = sqlx::query(
            "SELECT id, name, created_at FROM tenants WHERE (created_at, id) > (?, ?) ORDER BY created_at, id LIMIT ?",
        )
        .bind(ts)
        .bind(id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("id"), r.get("name"), r.get("created_at")))
            .collect())
    }

    pub async fn tenant_exists(&self, id: &str) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM tenants WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .is_some())
    }

    pub async fn insert_api_token(
        &self,
        id: &str,
        tenant_id: &str,
        token_hash: &[u8],
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, tenant_id, token_hash, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(id)
        .bind(tenant_id)
        .bind(token_hash)
        .bind(now)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Deletes a tenant's API token; returns its hash when it existed.
    pub async fn delete_api_token(
        &self,
        tenant_id: &str,
        token_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query(
            "DELETE FROM api_tokens WHERE tenant_id = ? AND id = ? RETURNING token_hash",
        )
        .bind(tenant_id)
        .bind(token_id)
        .fetch_optional(&self.writer)
        .await?;
        Ok(row.map(|r| r.get("token_hash")))
    }

    /// Every API token as (hash, token id, tenant id), loaded into memory at start.
    pub async fn all_api_tokens(&self) -> Result<Vec<(Vec<u8>, String, String)>> {
        let rows = sqlx::query("SELECT token_hash, id, tenant_id FROM api_tokens")
            .fetch_all(&self.reader)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("token_hash"), r.get("id"), r.get("tenant_id")))
            .collect())
    }

    pub async fn insert_node(
        &self,
        id: &str,
        name: &str,
        token_hash: &[u8],
        now: i64,
    ) -> Result<()> {
        sqlx::query("INSERT INTO nodes (id, name, token_hash, created_at) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(name)
            .bind(token_hash)
            .bind(now)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Every node: (id, name, created_at, token hash), oldest first.
    pub async fn all_nodes(&self) -> Result<Vec<(String, String, i64, Vec<u8>)>> {
        let rows = sqlx::query(
            "SELECT id, name, created_at, token_hash FROM nodes ORDER BY created_at, id",
        )
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get("id"),
                    r.get("name"),
                    r.get("created_at"),
                    r.get("token_hash"),
                )
            })
            .collect())
    }

    /// Deletes a node (its token stops working); false when there is none.
    pub async fn delete_node(&self, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM nodes WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    // ----- vendor credentials -----

    pub async fn upsert_credential(&self, row: &CredentialRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO credentials (tenant_id, vendor, sealed, last4, updated_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (tenant_id, vendor) DO UPDATE SET sealed = excluded.sealed, last4 = excluded.last4, updated_at = excluded.updated_at",
        )
        .bind(&row.tenant_id)
        .bind(&row.vendor)
        .bind(&row.sealed)
        .bind(&row.last4)
        .bind(row.updated_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn delete_credential(&self, tenant_id: &str, vendor: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM credentials WHERE tenant_id = ? AND vendor = ?")
            .bind(tenant_id)
            .bind(vendor)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn all_credentials(&self) -> Result<Vec<CredentialRow>> {
        let rows =
            sqlx::query("SELECT tenant_id, vendor, sealed, last4, updated_at FROM credentials")
                .fetch_all(&self.reader)
                .await?;
        Ok(rows
            .iter()
            .map(|r| CredentialRow {
                tenant_id: r.get("tenant_id"),
                vendor: r.get("vendor"),
                sealed: r.get("sealed"),
                last4: r.get("last4"),
                updated_at: r.get("updated_at"),
            })
            .collect())
    }

    // ----- signing keys -----

    pub async fn insert_signing_key(
        &self,
        kid: &str,
        sealed_private: &[u8],
        public_key: &[u8],
        now: i64,
    ) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("UPDATE signing_keys SET retired_at = ? WHERE retired_at IS NULL")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO signing_keys (kid, sealed_private, public_key, created_at) VALUES (?, ?, ?, ?)")
            .bind(kid)
            .bind(sealed_private)
            .bind(public_key)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The active key plus every retired key that still signs a live vault key.
    pub async fn live_signing_keys(&self, now: i64) -> Result<Vec<SigningKeyRow>> {
        let rows = sqlx::query(
            "SELECT kid, sealed_private, public_key, retired_at FROM signing_keys s
             WHERE retired_at IS NULL
                OR EXISTS (SELECT 1 FROM keys k WHERE k.kid = s.kid AND k.expires_at > ?)
             ORDER BY created_at",
        )
        .bind(now)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(|r| SigningKeyRow {
                kid: r.get("kid"),
                sealed_private: r.get("sealed_private"),
                public_key: r.get("public_key"),
                retired_at: r.get("retired_at"),
            })
            .collect())
    }

    // ----- vault keys -----

    /// Inserts keys with one multi-row statement: the group commit behind `KeyWriter`.
    pub async fn insert_keys(&self, keys: &[KeyRow]) -> Result<()> {
        let mut rows = Vec::with_capacity(keys.len());
        for k in keys {
            rows.push((
                k,
                serde_json::to_string(&k.allowed_endpoints)?,
                serde_json::to_string(&k.metadata)?,
                k.stripe_accounts
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()?,
            ));
        }
        let mut insert = sqlx::QueryBuilder::new(
            "INSERT INTO keys (id, tenant_id, kid, vendor, label, allowed_endpoints, daily_cap, metadata, stripe_accounts, created_at, expires_at) ",
        );
        insert.push_values(rows, |mut b, (k, endpoints, metadata, accounts)| {
            b.push_bind(k.id.clone())
                .push_bind(k.tenant_id.clone())
                .push_bind(k.kid.clone())
                .push_bind(k.vendor.clone())
                .push_bind(k.label.clone())
                .push_bind(endpoints)
                .push_bind(k.daily_cap.0)
                .push_bind(metadata)
                .push_bind(accounts)
                .push_bind(k.created_at)
                .push_bind(k.expires_at);
        });
        insert.build().execute(&self.writer).await?;
        Ok(())
    }

    pub async fn get_key(&self, tenant_id: &str, id: &str) -> Result<Option<KeyRow>> {
        let row = sqlx::query("SELECT * FROM keys WHERE id = ? AND tenant_id = ?")
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.as_ref().map(key_row))
    }

    /// Newest first; `before_seq` is the cursor.
    pub async fn list_keys(
        &self,
        tenant_id: &str,
        status: Option<KeyStatus>,
        before_seq: i64,
        limit: i64,
        now: i64,
    ) -> Result<Vec<KeyRow>> {
        let filter = match status {
            None => "",
            Some(KeyStatus::Active) => "AND revoked_at IS NULL AND expires_at > ?4",
            Some(KeyStatus::Revoked) => "AND revoked_at IS NOT NULL AND ?4 = ?4",
            Some(KeyStatus::Expired) => "AND revoked_at IS NULL AND expires_at <= ?4",
        };
        let sql = format!("SELECT * FROM keys WHERE tenant_id = ?1 AND seq < ?2 {filter} ORDER BY seq DESC LIMIT ?3");
        let mut q = sqlx::query(&sql)
            .bind(tenant_id)
            .bind(before_seq)
            .bind(limit);
        if status.is_some() {
            q = q.bind(now);
        }
        Ok(q.fetch_all(&self.reader)
            .await?
            .iter()
            .map(key_row)
            .collect())
    }

    /// Marks a key revoked (first revocation wins); returns the stored row.
    pub async fn revoke_key(&self, tenant_id: &str, id: &str, now: i64) -> Result<Option<KeyRow>> {
        let row = sqlx::query(
            "UPDATE keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? AND tenant_id = ? RETURNING *",
        )
        .bind(now)
        .bind(id)
        .bind(tenant_id)
        .fetch_optional(&self.writer)
        .await?;
        Ok(row.as_ref().map(key_row))
    }

    /// Keys revoked at or after `since` that have not expired: revocations made by another
    /// process on the same database (the old one, during a graceful upgrade).
    pub async fn revoked_since(&self, since: i64, now: i64) -> Result<Vec<(String, i64)>> {
        let rows =
            sqlx::query("SELECT id, expires_at FROM keys WHERE revoked_at >= ? AND expires_at > ?")
                .bind(since)
                .bind(now)
                .fetch_all(&self.reader)
                .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("id"), r.get("expires_at")))
            .collect())
    }

    /// Revoked keys that have not expired yet: the content of the revocation filter.
    pub async fn live_revocations(&self, now: i64) -> Result<Vec<(String, i64)>> {
        // `revoked_at >= i64::MIN` holds for every revoked key and never for NULL.
        self.revoked_since(i64::MIN, now).await
    }

    // ----- ledger -----

    pub async fn ledger_row(&self, key_id: &str, day: i64) -> Result<LedgerRow> {
        let row = sqlx::query("SELECT settled, held FROM ledger WHERE key_id = ? AND day = ?")
            .bind(key_id)
            .bind(day)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.as_ref().map(ledger_of_row).unwrap_or_default())
    }

    /// The ledger rows of many keys for one day, in one query (absent rows are zero).
    pub async fn ledger_rows(
        &self,
        key_ids: &[&str],
        day: i64,
    ) -> Result<std::collections::HashMap<String, LedgerRow>> {
        let mut out = std::collections::HashMap::with_capacity(key_ids.len());
        // SQLite's default limit is 32,766 variables; pages hold at most 1,000 keys.
        for chunk in key_ids.chunks(1000) {
            let mut q =
                sqlx::QueryBuilder::new("SELECT key_id, settled, held FROM ledger WHERE day = ");
            q.push_bind(day).push(" AND key_id IN (");
            let mut ids = q.separated(", ");
            for id in chunk {
                ids.push_bind(*id);
            }
            ids.push_unseparated(")");
            for r in q.build().fetch_all(&self.reader).await? {
                out.insert(r.get("key_id"), ledger_of_row(&r));
            }
        }
        Ok(out)
    }

    /// Registers a ledger holder (a process that grants leases to its proxy) alive until
    /// `alive_until`.
    pub async fn register_holder(&self, id: &str, now: i64, alive_until: i64) -> Result<()> {
        sqlx::query("INSERT INTO holders (id, started_at, alive_until) VALUES (?, ?, ?)")
            .bind(id)
            .bind(now)
            .bind(alive_until)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Extends a holder's life; false when its row is gone (another process gave its
    /// leases back: it was taken for dead).
    pub async fn heartbeat_holder(&self, id: &str, alive_until: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE holders SET alive_until = max(alive_until, ?) WHERE id = ?")
            .bind(alive_until)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Holders whose life ended before `now`.
    pub async fn dead_holders(&self, now: i64) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT id FROM holders WHERE alive_until < ?")
                .bind(now)
                .fetch_all(&self.reader)
                .await?,
        )
    }

    /// The leases a holder has: (key id, day, held).
    pub async fn leases_of(&self, holder: &str) -> Result<Vec<(String, i64, Micros)>> {
        let rows = sqlx::query("SELECT key_id, day, held FROM leases WHERE holder = ?")
            .bind(holder)
            .fetch_all(&self.reader)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("key_id"), r.get("day"), Micros(r.get("held"))))
            .collect())
    }

    /// Grants `holder` between `min` and `want` of the key's remaining budget for `day`
    /// (`cap` less settled and held), or nothing. The check and the grant are one
    /// conditional statement, so any number of processes granting from one database
    /// never grant more than the cap together; the holder's lease row is written in the
    /// same transaction.
    pub async fn lease_grant(
        &self,
        holder: &str,
        key_id: &str,
        day: i64,
        cap: Micros,
        min: Micros,
        want: Micros,
    ) -> Result<Micros> {
        if min.0 <= 0 || want < min {
            return Ok(Micros::ZERO);
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let grant: Option<i64> = sqlx::query_scalar(
            "INSERT INTO ledger (key_id, day, settled, held, last_grant)
             SELECT ?1, ?2, 0, g, g FROM (SELECT min(?3, ?4) AS g) WHERE g >= ?5
             ON CONFLICT (key_id, day) DO UPDATE SET
                 last_grant = min(?3, ?4 - settled - held),
                 held = held + min(?3, ?4 - settled - held)
             WHERE ?4 - settled - held >= ?5
             RETURNING last_grant",
        )
        .bind(key_id)
        .bind(day)
        .bind(want.0)
        .bind(cap.0)
        .bind(min.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(grant) = grant.filter(|g| *g > 0) else {
            tx.rollback().await?;
            return Ok(Micros::ZERO);
        };
        sqlx::query(
            "INSERT INTO leases (holder, key_id, day, held) VALUES (?, ?, ?, ?)
             ON CONFLICT (holder, key_id, day) DO UPDATE SET held = held + excluded.held",
        )
        .bind(holder)
        .bind(key_id)
        .bind(day)
        .bind(grant)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Micros(grant))
    }

    /// What a holder did with its leases, in one transaction: `settled` is added to the
    /// key's settled spend, and `released` (spent or returned) leaves its lease, and the
    /// key's held budget, as far as the lease still holds it (none of it when the lease
    /// was already given back because the holder was taken for dead).
    pub async fn lease_report(
        &self,
        holder: &str,
        reports: &[(String, i64, Micros, Micros)],
    ) -> Result<()> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        for (key_id, day, settled, released) in reports {
            let held: Option<i64> = sqlx::query_scalar(
                "SELECT held FROM leases WHERE holder = ? AND key_id = ? AND day = ?",
            )
            .bind(holder)
            .bind(key_id)
            .bind(day)
            .fetch_optional(&mut *tx)
            .await?;
            let take = held.unwrap_or(0).clamp(0, released.0.max(0));
            if held.is_some() {
                sqlx::query(
                    "UPDATE leases SET held = held - ?4 WHERE holder = ?1 AND key_id = ?2 AND day = ?3",
                )
                .bind(holder)
                .bind(key_id)
                .bind(day)
                .bind(take)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "DELETE FROM leases WHERE holder = ? AND key_id = ? AND day = ? AND held <= 0",
                )
                .bind(holder)
                .bind(key_id)
                .bind(day)
                .execute(&mut *tx)
                .await?;
            }
            ledger_add_on(&mut tx, key_id, *day, *settled, Micros(-take)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Gives back the leases of a dead holder, after adding to each key's settled spend
    /// what it spent of its lease: the lease's committed part (write-ahead, see
    /// `ledger_batch`) or what `known_spent` says, whichever is more, at most the lease.
    /// Removes the holder, whose later reports then release nothing.
    pub async fn reclaim_holder(
        &self,
        holder: &str,
        known_spent: &std::collections::HashMap<(String, i64), Micros>,
    ) -> Result<Micros> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query("SELECT key_id, day, held, committed FROM leases WHERE holder = ?")
            .bind(holder)
            .fetch_all(&mut *tx)
            .await?;
        let mut returned = Micros::ZERO;
        for r in &rows {
            let (key_id, day, held, committed): (String, i64, i64, i64) = (
                r.get("key_id"),
                r.get("day"),
                r.get("held"),
                r.get("committed"),
            );
            let spent = known_spent
                .get(&(key_id.clone(), day))
                .map_or(0, |m| m.0)
                .max(committed)
                .clamp(0, held.max(0));
            ledger_add_on(&mut tx, &key_id, day, Micros(spent), Micros(-held)).await?;
            returned = returned
                .checked_add(Micros(held - spent))
                .unwrap_or(returned);
        }
        sqlx::query("DELETE FROM leases WHERE holder = ?")
            .bind(holder)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM holders WHERE id = ?")
            .bind(holder)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(returned)
    }

    /// The key's tenant, for audit lookups by key.
    pub async fn key_tenant(&self, key_id: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT tenant_id FROM keys WHERE id = ?")
                .bind(key_id)
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    /// Adds deltas to a ledger row (creating it), atomically.
    pub async fn ledger_add(
        &self,
        key_id: &str,
        day: i64,
        settled: Micros,
        held: Micros,
    ) -> Result<()> {
        let mut conn = self.writer.acquire().await?;
        ledger_add_on(&mut conn, key_id, day, settled, held).await
    }
}

fn ledger_of_row(r: &sqlx::sqlite::SqliteRow) -> LedgerRow {
    LedgerRow {
        settled: Micros(r.get("settled")),
        held: Micros(r.get("held")),
    }
}

async fn ledger_add_on(
    conn: &mut sqlx::SqliteConnection,
    key_id: &str,
    day: i64,
    settled: Micros,
    held: Micros,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO ledger (key_id, day, settled, held) VALUES (?1, ?2, ?3, max(?4, 0))
         ON CONFLICT (key_id, day) DO UPDATE SET settled = settled + ?3, held = max(held + ?4, 0)",
    )
    .bind(key_id)
    .bind(day)
    .bind(settled.0)
    .bind(held.0)
    .execute(conn)
    .await?;
    Ok(())
}

async fn migrate(pool: &SqlitePool) -> Result<()> {
    let applied: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(pool)
        .await?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("migration {}", i + 1))?;
        sqlx::raw_sql(&format!("PRAGMA user_version = {}", i + 1))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::new_sorted_id;

    /// A reader that holds an old snapshot keeps the checkpoint from copying what was
    /// written after it: the backlog gauge shows it, and drops to 0 once the reader ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wal_backlog_shows_a_reader_holding_an_old_snapshot() {
        let dir =
            std::env::temp_dir().join(format!("keybrake-backlog-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).await.unwrap();
        store
            .insert_tenant("tn_t", "t", "tok_t", b"h", 0)
            .await
            .unwrap();
        let backlog = prometheus::IntGauge::new("backlog", "test").unwrap();
        let checkpoints = tokio::spawn(store.clone().checkpoints(backlog.clone()));
        let wait_for = |want: fn(i64) -> bool| {
            let backlog = backlog.clone();
            async move {
                for _ in 0..40 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if want(backlog.get()) {
                        return true;
                    }
                }
                false
            }
        };
        let insert = |n: u64| {
            let store = store.clone();
            async move {
                store
                    .insert_tenant(
                        &format!("tn_{n}"),
                        "t",
                        &format!("tok_{n}"),
                        &n.to_be_bytes(),
                        0,
                    )
                    .await
                    .unwrap()
            }
        };

        // A read transaction pins the snapshot of this moment.
        let mut reader = store.reader.begin().await.unwrap();
        sqlx::query("SELECT count(*) FROM tenants")
            .fetch_one(&mut *reader)
            .await
            .unwrap();
        for n in 0..20 {
            insert(n).await;
        }
        let pinned = wait_for(|b| b > 0).await;
        reader.rollback().await.unwrap();
        insert(100).await;
        let cleared = wait_for(|b| b == 0).await;
        checkpoints.abort();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(pinned, "no backlog while a reader pinned an old snapshot");
        assert!(cleared, "backlog {} after the reader ended", backlog.get());
    }

    /// Writes that never pause for a checkpoint: the WAL must still start over, so the
    /// file stays a fraction of what went through it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wal_stays_bounded_under_writes_that_never_pause() {
        let dir = std::env::temp_dir().join(format!("keybrake-wal-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).await.unwrap();
        store
            .insert_tenant("tn_t", "t", "tok_t", b"h", 0)
            .await
            .unwrap();
        let backlog = prometheus::IntGauge::new("backlog", "test").unwrap();
        let checkpoints = tokio::spawn(store.clone().checkpoints(backlog));

        let key = |n: u64| KeyRow {
            seq: 0,
            id: new_sorted_id("key_", n),
            tenant_id: "tn_t".into(),
            kid: "kid_t".into(),
            vendor: "stripe".into(),
            label: "wal".into(),
            allowed_endpoints: vec!["POST /v1/payment_intents".into()],
            daily_cap: Micros(1),
            metadata: serde_json::json!({ "pad": "x".repeat(3000) }),
            stripe_accounts: None,
            created_at: 0,
            expires_at: 1,
            revoked_at: None,
        };
        // SQLite starts the WAL over by rewriting its header with the checkpoint sequence
        // number (bytes 12..16, big-endian) incremented: counting its changes counts
        // restarts without depending on how far the file grew between two of them (which
        // moves with the machine's load).
        let wal = dir.join("keybrake.db-wal");
        let wal_sequence = || {
            use std::io::Read;
            let mut header = [0u8; 16];
            std::fs::File::open(&wal)
                .and_then(|mut f| f.read_exact(&mut header))
                .map_or(None, |_| {
                    Some(u32::from_be_bytes(header[12..16].try_into().unwrap()))
                })
        };
        // Bounded in bytes (48 MiB of rows) and in time (60 s), whichever comes first. Each
        // row costs the WAL ~2.7 times its size (overflow pages, the index), so a WAL that
        // never started over would end ~2.7 times larger than the rows written. One that
        // restarts levels off at ~13 MB on an idle machine; under a loaded CI machine the
        // checkpointer lags and it reached ~30 MB for 50 MB of rows. Asserting "smaller
        // than the rows written" tells the two apart with a wide margin either side.
        let (mut written, mut largest_wal, mut n) = (0u64, 0u64, 0u64);
        let (mut restarts, mut last_seen) = (0u32, None);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while written < 48 << 20 && std::time::Instant::now() < deadline {
            let rows: Vec<KeyRow> = (0..8).map(|i| key(n + i)).collect();
            n += 8;
            store.insert_keys(&rows).await.unwrap();
            written += 8 * 3000;
            largest_wal = largest_wal.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            if let Some(seq) = wal_sequence() {
                if last_seen.is_some_and(|last| last != seq) {
                    restarts += 1;
                }
                last_seen = Some(seq);
            }
        }
        checkpoints.abort();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            written >= 8 << 20,
            "too little was written to judge: {written} bytes"
        );
        assert!(
            restarts >= 2 && largest_wal < written,
            "the WAL started over {restarts} times while {written} bytes of rows were written, \
             and reached {largest_wal} bytes"
        );
    }
}
