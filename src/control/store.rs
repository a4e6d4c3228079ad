//! Storage of the control plane, on one of two backends behind the same methods:
//! embedded SQLite (WAL, `keybrake.db` in the data dir: one writer connection, since
//! SQLite has one writer, a checkpointer and a few readers) or PostgreSQL (one pool shared
//! by every query; any number of `control` replicas on one database). Both go through
//! `sqlx`. A query whose text is the same on both is written once (`$1` placeholders,
//! which SQLite reads too) and run through `on_reader!`/`on_writer!`/`in_transaction!`;
//! where the dialects differ the method says so in one `match` on the backend.
//!
//! Migrations live in `migrations/{sqlite,postgres}/`, one file per version in each,
//! kept in step (a unit test compares the tables and columns they create).
//!
//! Secrets never reach this module in clear: credentials and signing keys arrive sealed
//! (see `crypto`), API tokens arrive hashed.

use crate::database::Database;
use crate::money::Micros;
use anyhow::{bail, Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Row, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One schema version: its text for each backend. Applied in order; SQLite's
/// `PRAGMA user_version` and PostgreSQL's `keybrake_schema` table record how many ran.
/// The first is the whole schema, one `CREATE` per table; a change to the schema of a
/// released version is a new entry at the end (a new file in both directories), never an
/// edit of one that shipped. The audit trail's schema has versions of its own
/// (`migrations/{sqlite,postgres}/audit/`, `audit::sqlite::MIGRATIONS`).
pub struct Migration {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// Commit 21a949d (withdrawn the same day, never released) applied a version 4 to SQLite
/// (`ledger` and `leases` WITHOUT ROWID): version 4 here is therefore empty, and changes
/// start at 5.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        sqlite: include_str!("../../migrations/sqlite/0001_schema.sql"),
        postgres: include_str!("../../migrations/postgres/0001_schema.sql"),
    },
    Migration {
        sqlite: include_str!("../../migrations/sqlite/0002_lease_committed.sql"),
        postgres: include_str!("../../migrations/postgres/0002_lease_committed.sql"),
    },
    Migration {
        sqlite: include_str!("../../migrations/sqlite/0003_report_batches.sql"),
        postgres: include_str!("../../migrations/postgres/0003_report_batches.sql"),
    },
    Migration {
        sqlite: include_str!("../../migrations/sqlite/0004_withdrawn.sql"),
        postgres: include_str!("../../migrations/postgres/0004_withdrawn.sql"),
    },
    Migration {
        sqlite: include_str!("../../migrations/sqlite/0005_node_names.sql"),
        postgres: include_str!("../../migrations/postgres/0005_node_names.sql"),
    },
    Migration {
        sqlite: include_str!("../../migrations/sqlite/0006_lease_batches.sql"),
        postgres: include_str!("../../migrations/postgres/0006_lease_batches.sql"),
    },
    Migration {
        sqlite: include_str!("../../migrations/sqlite/0007_live_revocations.sql"),
        postgres: include_str!("../../migrations/postgres/0007_live_revocations.sql"),
    },
];

/// The store's file in the data dir.
pub const FILE: &str = "keybrake.db";

/// PostgreSQL pool size: grants, reports and issuance batches of every caller share it.
/// A replica's key writer holds one connection per batch; the rest serve the API.
const PG_POOL_SIZE: u32 = 16;
/// How long the first connection at start may take.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a query waits for a pooled connection (or a new one) before it fails, so a
/// lost database answers `storage_unavailable` in seconds instead of hanging the API.
const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct Store {
    pub(super) backend: Backend,
    /// The database server's clock, as last measured: its time (unix ms) less this
    /// process's monotonic clock (`token::mono_ms`) at the same moment; `UNMEASURED` on
    /// SQLite or until a measurement succeeds. Lease holders' deadlines are written and
    /// compared on it (`now_ms`).
    db_clock_base: Arc<AtomicI64>,
}

const UNMEASURED: i64 = i64::MIN;

/// One measurement of the database server's clock (ms).
struct ClockReading {
    /// Server time less this host's wall clock.
    wall_offset: i64,
    /// Server time less this process's monotonic clock (`token::mono_ms`).
    mono_base: i64,
}

#[derive(Clone)]
pub(super) enum Backend {
    Sqlite {
        writer: SqlitePool,
        checkpointer: SqlitePool,
        reader: SqlitePool,
    },
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the pool reads go to (SQLite's read-only pool, or
/// the PostgreSQL pool): one query text for both backends.
macro_rules! on_reader {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.backend {
            Backend::Sqlite { reader: $pool, .. } => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// Like `on_reader!`, with the pool writes go to (SQLite's one writer connection).
macro_rules! on_writer {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.backend {
            Backend::Sqlite { writer: $pool, .. } => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` with `$tx` a write transaction: `BEGIN IMMEDIATE` on SQLite (it takes the
/// write lock at once: no other process's write can slip between a read and a write of
/// it), a READ COMMITTED transaction on PostgreSQL, where the statements that must not
/// race lock their rows themselves (see `lease_grant`). The body commits; an early
/// return rolls back.
macro_rules! in_transaction {
    ($store:expr, |$tx:ident| $body:expr) => {
        match &$store.backend {
            Backend::Sqlite { writer, .. } => {
                #[allow(unused_mut)]
                let mut $tx = writer.begin_with("BEGIN IMMEDIATE").await?;
                $body
            }
            Backend::Postgres(pool) => {
                #[allow(unused_mut)]
                let mut $tx = pool.begin().await?;
                $body
            }
        }
    };
}
pub(super) use in_transaction;
pub(super) use on_writer;

/// Whether the SQLite writer connection may go back to its pool (`after_release`): not
/// when it is still inside a transaction. A transaction that failed on a full disk was
/// rolled back by SQLite itself, so the rollback `sqlx` sends on drop fails and its count
/// of open transactions stays at one: every later `BEGIN` on the connection was refused
/// until a restart. Closed instead; the pool opens another.
async fn left_in_a_transaction(
    conn: &mut sqlx::SqliteConnection,
) -> std::result::Result<bool, sqlx::Error> {
    use sqlx::Connection;
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    // A transaction dropped on an error queued its rollback: let it run, look again.
    conn.ping().await?;
    if conn.is_in_transaction() {
        log::warn!(
            "the SQLite writer connection was left inside a failed transaction (disk full?): \
             closed, a new one is opened"
        );
        return Ok(false);
    }
    Ok(true)
}

/// Runs `script` on SQLite's writer connection in one trip to its thread: statements that
/// open a write transaction (`BEGIN IMMEDIATE`) and end with `COMMIT`, with the rows they
/// return. Each statement sent on its own is such a trip, two thread switches that cost
/// more than the statement (`benches/ledger_sqlite.rs`), so the ledger's statements per
/// batch of fresh keys go as one script.
///
/// Once it has the connection, it runs as a task of its own, to its end: a caller that
/// stops waiting (a node's request gone) must not stop it between its `BEGIN` and
/// `COMMIT`, which would leave the one writer connection inside a transaction. On an error the transaction is rolled back; a
/// connection that cannot even do that is closed.
pub(super) async fn sqlite_script(
    writer: &SqlitePool,
    script: String,
    arguments: sqlx::sqlite::SqliteArguments<'static>,
) -> Result<Vec<sqlx::sqlite::SqliteRow>> {
    // Acquired here: a caller that stops waiting for the writer runs nothing.
    let mut conn = writer.acquire().await?;
    tokio::spawn(async move {
        match sqlx::query_with(&script, arguments)
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => Ok(rows),
            Err(e) => {
                // No transaction to roll back (`BEGIN` itself failed) is the one harmless
                // failure.
                if let Err(r) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
                    let idle = r
                        .as_database_error()
                        .is_some_and(|d| d.message().contains("no transaction is active"));
                    if !idle {
                        conn.close_on_drop();
                    }
                }
                Err(e.into())
            }
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("the store's script stopped: {e}"))?
}

/// A key as a lease request is checked against (`Store::key_limits`).
#[derive(Debug, Clone)]
pub struct KeyLimits {
    pub tenant_id: String,
    pub label: String,
    pub daily_cap: Micros,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
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

/// A row of either backend whose columns decode as `i64`, `String` and `Vec<u8>`: what
/// every table here is made of (INTEGER/BIGINT, TEXT, BLOB/BYTEA).
pub(super) trait TableRow: Row {
    fn int(&self, column: &str) -> i64;
    fn int_opt(&self, column: &str) -> Option<i64>;
    fn text(&self, column: &str) -> String;
    fn text_opt(&self, column: &str) -> Option<String>;
    fn bytes(&self, column: &str) -> Vec<u8>;
}

impl<R> TableRow for R
where
    R: Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn int(&self, column: &str) -> i64 {
        self.get(column)
    }
    fn int_opt(&self, column: &str) -> Option<i64> {
        self.get(column)
    }
    fn text(&self, column: &str) -> String {
        self.get(column)
    }
    fn text_opt(&self, column: &str) -> Option<String> {
        self.get(column)
    }
    fn bytes(&self, column: &str) -> Vec<u8> {
        self.get(column)
    }
}

fn key_row(r: &impl TableRow) -> KeyRow {
    KeyRow {
        seq: r.int("seq"),
        id: r.text("id"),
        tenant_id: r.text("tenant_id"),
        kid: r.text("kid"),
        vendor: r.text("vendor"),
        label: r.text("label"),
        allowed_endpoints: serde_json::from_str(&r.text("allowed_endpoints")).unwrap_or_default(),
        daily_cap: Micros(r.int("daily_cap")),
        metadata: serde_json::from_str(&r.text("metadata")).unwrap_or_default(),
        stripe_accounts: r
            .text_opt("stripe_accounts")
            .and_then(|s| serde_json::from_str(&s).ok()),
        created_at: r.int("created_at"),
        expires_at: r.int("expires_at"),
        revoked_at: r.int_opt("revoked_at"),
    }
}

fn ledger_of_row(r: &impl TableRow) -> LedgerRow {
    LedgerRow {
        settled: Micros(r.int("settled")),
        held: Micros(r.int("held")),
    }
}

impl Store {
    /// Opens the store and brings its schema up to date. A database written by a newer
    /// keybrake (more migrations than this one knows) is refused, untouched.
    pub async fn open(database: &Database) -> Result<Store> {
        match database {
            Database::Sqlite { data_dir } => Store::open_sqlite(data_dir).await,
            Database::Postgres { url } => {
                let options = PgConnectOptions::from_str(url.expose())
                    .context("the database URL does not parse")?
                    .application_name("keybrake")
                    // The migrations' `CREATE … IF NOT EXISTS` would log a NOTICE per start.
                    .options([("client_min_messages", "warning")]);
                // One connection first, for a clear error when the database cannot be
                // reached (the pool would only say it timed out).
                let first = tokio::time::timeout(PG_CONNECT_TIMEOUT, options.connect()).await;
                match first {
                    Ok(Ok(conn)) => drop(conn),
                    // sqlx's message already ends with its cause: printed once.
                    Ok(Err(e)) => bail!("cannot connect to PostgreSQL at {url}: {e}"),
                    Err(_) => bail!(
                        "cannot connect to PostgreSQL at {url}: no answer within {} s",
                        PG_CONNECT_TIMEOUT.as_secs()
                    ),
                }
                let pool = PgPoolOptions::new()
                    .max_connections(PG_POOL_SIZE)
                    .acquire_timeout(PG_ACQUIRE_TIMEOUT)
                    // A connection that broke while idle in the pool (database restarted)
                    // is found out before a query uses it.
                    .test_before_acquire(true)
                    .connect_with(options)
                    .await
                    .with_context(|| format!("cannot connect to PostgreSQL at {url}"))?;
                migrate_postgres(&pool).await?;
                let store = Store {
                    backend: Backend::Postgres(pool),
                    db_clock_base: Arc::new(AtomicI64::new(UNMEASURED)),
                };
                if let Err(e) = store.sync_clock().await {
                    log::warn!(
                        "cannot measure the database server's clock ({e:#}): lease deadlines \
                         use this host's until a measurement succeeds (tried each minute)"
                    );
                }
                Ok(store)
            }
        }
    }

    async fn open_sqlite(data_dir: &Path) -> Result<Store> {
        crate::secret::private_dir(data_dir)
            .with_context(|| format!("cannot use data dir {}", data_dir.display()))?;
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
        // No ping before a connection is handed out (sqlx's default): a local file does
        // not drop connections, and each ping is one more trip to SQLite's thread, which
        // costs more than a fresh key's batch of grants (`benches/ledger_sqlite.rs`).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .after_release(|conn, _| Box::pin(left_in_a_transaction(conn)))
            .connect_with(
                options
                    .clone()
                    .pragma("wal_autocheckpoint", "16384")
                    .pragma("journal_size_limit", "16777216"),
            )
            .await
            .context("cannot open the SQLite database")?;
        migrate_sqlite(&writer)
            .await
            .with_context(|| format!("cannot set up {}", path.display()))?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .context("cannot open the SQLite database for checkpoints")?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await
            .context("cannot open the SQLite database for reading")?;
        Ok(Store {
            backend: Backend::Sqlite {
                writer,
                reader,
                checkpointer,
            },
            db_clock_base: Arc::new(AtomicI64::new(UNMEASURED)),
        })
    }

    /// The PostgreSQL pool, when the store is on PostgreSQL (for what follows other
    /// replicas' changes, and the audit trail sharing the database).
    pub fn postgres(&self) -> Option<&PgPool> {
        match &self.backend {
            Backend::Postgres(pool) => Some(pool),
            Backend::Sqlite { .. } => None,
        }
    }

    /// Keeps the WAL short without putting a checkpoint inside any commit (SQLite only:
    /// returns at once on PostgreSQL, which manages its own WAL). Four times a second:
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
        let Backend::Sqlite {
            writer,
            checkpointer,
            ..
        } = &self.backend
        else {
            return;
        };
        crate::metrics::show_wal_backlog();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stuck_since: Option<std::time::Instant> = None;
        let mut last_warning: Option<std::time::Instant> = None;
        // A failing checkpoint (a full disk) is logged once a minute, not four times a second.
        let mut last_failure: Option<std::time::Instant> = None;
        let mut failed = |e: sqlx::Error| {
            if last_failure.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
                last_failure = Some(std::time::Instant::now());
                log::warn!("WAL checkpoint failed (logged once a minute): {e}");
            }
        };
        loop {
            tick.tick().await;
            // Twice: the second pass copies what was committed during the first, so the
            // pass the writes wait for has only a few milliseconds' worth left.
            for pool in [checkpointer, checkpointer] {
                if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(pool)
                    .await
                {
                    failed(e);
                }
            }
            // One row: busy (0 or 1), frames in the WAL, frames copied (-1 and -1 when
            // the database is not in WAL mode).
            let result = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(writer)
                .await;
            let now = std::time::Instant::now();
            let complete = match result {
                Ok((busy, frames, copied)) => {
                    backlog.set((frames - copied).max(0));
                    busy == 0 && copied >= frames
                }
                Err(e) => {
                    failed(e);
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

    /// The database answers (readiness). On PostgreSQL a lost database makes this false
    /// within `PG_ACQUIRE_TIMEOUT`; the pool reconnects by itself once it is back.
    pub async fn ping(&self) -> bool {
        let ping = async {
            on_reader!(self, |pool| sqlx::query("SELECT 1")
                .execute(pool)
                .await
                .is_ok())
        };
        tokio::time::timeout(Duration::from_secs(2), ping)
            .await
            .unwrap_or(false)
    }

    /// Whether the storage takes writes now, within 2 s. On PostgreSQL a statement that
    /// changes nothing, but that a server which only reads (a standby during a failover)
    /// refuses; a SQLite file cannot turn read-only that way, and its one writer
    /// connection may be busy for a while: `ping` there.
    pub async fn ping_writable(&self) -> bool {
        let ping = async {
            match &self.backend {
                Backend::Sqlite { .. } => self.ping().await,
                Backend::Postgres(pool) => {
                    sqlx::query("UPDATE holders SET alive_until = alive_until WHERE 1 = 0")
                        .execute(pool)
                        .await
                        .is_ok()
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(2), ping)
            .await
            .unwrap_or(false)
    }

    /// Now (unix ms) on the clock lease holders' deadlines are kept on: the database
    /// server's, as last measured (`sync_clock`) and carried on by this process's
    /// monotonic clock (a wall clock set back or forward does not move it); on SQLite,
    /// or before a measurement succeeds, this host's. Replicas on PostgreSQL compare
    /// deadlines each other wrote, so their own clocks need not agree.
    pub fn now_ms(&self) -> i64 {
        match self.db_clock_base.load(Ordering::Acquire) {
            UNMEASURED => crate::token::unix_ms() as i64,
            base => base.saturating_add(crate::token::mono_ms()),
        }
    }

    /// `now_ms` in whole seconds.
    pub fn now_secs(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// Measures the database server's clock again (PostgreSQL): how far it is ahead of
    /// this host's wall clock (ms; 0 on SQLite). A failed or too slow measurement keeps
    /// the last one, and says why.
    pub async fn sync_clock(&self) -> Result<i64> {
        Ok(match self.measure_clock().await? {
            Some(reading) => {
                self.db_clock_base
                    .store(reading.mono_base, Ordering::Release);
                reading.wall_offset
            }
            None => 0,
        })
    }

    /// The database server's clock against the middle of the query's round trip, the
    /// fastest of three; `None` on SQLite (one host, one clock). Replicas on PostgreSQL
    /// compare the deadlines each other wrote (a holder's `alive_until`), so they keep
    /// them on one clock (docs/operations.md). An error when no round trip took less
    /// than 200 ms (the middle would be up to 100 ms off).
    async fn measure_clock(&self) -> Result<Option<ClockReading>> {
        let Backend::Postgres(pool) = &self.backend else {
            return Ok(None);
        };
        // Only the query is timed, not the wait for a connection.
        let mut conn = pool.acquire().await?;
        let mut best: Option<(i64, ClockReading)> = None;
        for _ in 0..3 {
            let (wall, mono) = (crate::token::unix_ms() as i64, crate::token::mono_ms());
            let server: i64 =
                sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
                    .fetch_one(&mut *conn)
                    .await?;
            let round_trip = crate::token::mono_ms() - mono;
            let reading = ClockReading {
                wall_offset: server - (wall + round_trip / 2),
                mono_base: server - (mono + round_trip / 2),
            };
            if best.as_ref().is_none_or(|b| round_trip < b.0) {
                best = Some((round_trip, reading));
            }
        }
        match best {
            Some((round_trip, reading)) if round_trip <= 200 => Ok(Some(reading)),
            Some((round_trip, _)) => {
                bail!("the fastest of three round trips to the database took {round_trip} ms")
            }
            None => Ok(None),
        }
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
        in_transaction!(self, |tx| {
            sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(name)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO api_tokens (id, tenant_id, token_hash, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(token_id)
            .bind(id)
            .bind(token_hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.notify(Change::Tokens).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn list_tenants(
        &self,
        after_created: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<(String, String, i64)>> {
        let (ts, id) = after_created.unwrap_or((i64::MIN, String::new()));
        const SQL: &str = "SELECT id, name, created_at FROM tenants WHERE (created_at, id) > ($1, $2) ORDER BY created_at, id LIMIT $3";
        Ok(on_reader!(self, |pool| sqlx::query(SQL)
            .bind(ts)
            .bind(&id)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| (r.text("id"), r.text("name"), r.int("created_at")))
            .collect()))
    }

    pub async fn tenant_exists(&self, id: &str) -> Result<bool> {
        Ok(on_reader!(self, |pool| sqlx::query(
            "SELECT 1 FROM tenants WHERE id = $1"
        )
        .bind(id)
        .fetch_optional(pool)
        .await?
        .is_some()))
    }

    pub async fn insert_api_token(
        &self,
        id: &str,
        tenant_id: &str,
        token_hash: &[u8],
        now: i64,
    ) -> Result<()> {
        in_transaction!(self, |tx| {
            sqlx::query(
                "INSERT INTO api_tokens (id, tenant_id, token_hash, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(tenant_id)
            .bind(token_hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.notify(Change::Tokens).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Deletes a tenant's API token; returns its hash when it existed.
    pub async fn delete_api_token(
        &self,
        tenant_id: &str,
        token_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(in_transaction!(self, |tx| {
            let row = sqlx::query(
                "DELETE FROM api_tokens WHERE tenant_id = $1 AND id = $2 RETURNING token_hash",
            )
            .bind(tenant_id)
            .bind(token_id)
            .fetch_optional(&mut *tx)
            .await?;
            // Nothing deleted, nothing for the other replicas to reload (a caller naming
            // ids that do not exist must not make every replica reload its tokens).
            if row.is_some() {
                tx.notify(Change::Tokens).await?;
            }
            tx.commit().await?;
            row.map(|r| r.bytes("token_hash"))
        }))
    }

    /// Every API token as (hash, token id, tenant id), loaded into memory at start.
    pub async fn all_api_tokens(&self) -> Result<Vec<(Vec<u8>, String, String)>> {
        Ok(on_reader!(self, |pool| sqlx::query(
            "SELECT token_hash, id, tenant_id FROM api_tokens"
        )
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| (r.bytes("token_hash"), r.text("id"), r.text("tenant_id")))
        .collect()))
    }

    /// False, and nothing written, when a node of that name exists.
    pub async fn insert_node(
        &self,
        id: &str,
        name: &str,
        token_hash: &[u8],
        now: i64,
    ) -> Result<bool> {
        let inserted: bool;
        in_transaction!(self, |tx| {
            inserted = sqlx::query(
                "INSERT INTO nodes (id, name, token_hash, created_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO NOTHING",
            )
            .bind(id)
            .bind(name)
            .bind(token_hash)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if inserted {
                tx.notify(Change::Nodes).await?;
            }
            tx.commit().await?;
        });
        Ok(inserted)
    }

    /// Every node: (id, name, created_at, token hash), oldest first.
    pub async fn all_nodes(&self) -> Result<Vec<(String, String, i64, Vec<u8>)>> {
        Ok(on_reader!(self, |pool| sqlx::query(
            "SELECT id, name, created_at, token_hash FROM nodes ORDER BY created_at, id",
        )
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| {
            (
                r.text("id"),
                r.text("name"),
                r.int("created_at"),
                r.bytes("token_hash"),
            )
        })
        .collect()))
    }

    /// Deletes a node (its token stops working); false when there is none.
    pub async fn delete_node(&self, id: &str) -> Result<bool> {
        Ok(in_transaction!(self, |tx| {
            let done = sqlx::query("DELETE FROM nodes WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() > 0 {
                tx.notify(Change::Nodes).await?;
            }
            tx.commit().await?;
            done.rows_affected() == 1
        }))
    }

    // ----- vendor credentials -----

    pub async fn upsert_credential(&self, row: &CredentialRow) -> Result<()> {
        in_transaction!(self, |tx| {
            sqlx::query(
                "INSERT INTO credentials (tenant_id, vendor, sealed, last4, updated_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (tenant_id, vendor) DO UPDATE SET sealed = excluded.sealed, last4 = excluded.last4, updated_at = excluded.updated_at",
            )
            .bind(&row.tenant_id)
            .bind(&row.vendor)
            .bind(&row.sealed)
            .bind(&row.last4)
            .bind(row.updated_at)
            .execute(&mut *tx)
            .await?;
            tx.notify(Change::Credentials).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn delete_credential(&self, tenant_id: &str, vendor: &str) -> Result<bool> {
        Ok(in_transaction!(self, |tx| {
            let done = sqlx::query("DELETE FROM credentials WHERE tenant_id = $1 AND vendor = $2")
                .bind(tenant_id)
                .bind(vendor)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() > 0 {
                tx.notify(Change::Credentials).await?;
            }
            tx.commit().await?;
            done.rows_affected() > 0
        }))
    }

    pub async fn all_credentials(&self) -> Result<Vec<CredentialRow>> {
        Ok(on_reader!(self, |pool| sqlx::query(
            "SELECT tenant_id, vendor, sealed, last4, updated_at FROM credentials"
        )
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| CredentialRow {
            tenant_id: r.text("tenant_id"),
            vendor: r.text("vendor"),
            sealed: r.bytes("sealed"),
            last4: r.text("last4"),
            updated_at: r.int("updated_at"),
        })
        .collect()))
    }

    // ----- signing keys -----

    pub async fn insert_signing_key(
        &self,
        kid: &str,
        sealed_private: &[u8],
        public_key: &[u8],
        now: i64,
    ) -> Result<()> {
        in_transaction!(self, |tx| {
            sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO signing_keys (kid, sealed_private, public_key, created_at) VALUES ($1, $2, $3, $4)")
                .bind(kid)
                .bind(sealed_private)
                .bind(public_key)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.notify(Change::SigningKeys).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// The active key plus every retired key that still signs a live vault key.
    pub async fn live_signing_keys(&self, now: i64) -> Result<Vec<SigningKeyRow>> {
        Ok(on_reader!(self, |pool| sqlx::query(
            "SELECT kid, sealed_private, public_key, retired_at FROM signing_keys s
             WHERE retired_at IS NULL
                OR EXISTS (SELECT 1 FROM keys k WHERE k.kid = s.kid AND k.expires_at > $1)
             ORDER BY created_at",
        )
        .bind(now)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| SigningKeyRow {
            kid: r.text("kid"),
            sealed_private: r.bytes("sealed_private"),
            public_key: r.bytes("public_key"),
            retired_at: r.int_opt("retired_at"),
        })
        .collect()))
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
        on_writer!(self, |pool| {
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
            insert.build().execute(pool).await?;
        });
        Ok(())
    }

    pub async fn get_key(&self, tenant_id: &str, id: &str) -> Result<Option<KeyRow>> {
        Ok(on_reader!(self, |pool| sqlx::query(
            "SELECT * FROM keys WHERE id = $1 AND tenant_id = $2"
        )
        .bind(id)
        .bind(tenant_id)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(key_row)))
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
            Some(KeyStatus::Active) => "AND revoked_at IS NULL AND expires_at > $4",
            Some(KeyStatus::Revoked) => "AND revoked_at IS NOT NULL AND $4 = $4",
            Some(KeyStatus::Expired) => "AND revoked_at IS NULL AND expires_at <= $4",
        };
        let sql = format!("SELECT * FROM keys WHERE tenant_id = $1 AND seq < $2 {filter} ORDER BY seq DESC LIMIT $3");
        Ok(on_reader!(self, |pool| {
            let mut q = sqlx::query(&sql)
                .bind(tenant_id)
                .bind(before_seq)
                .bind(limit);
            if status.is_some() {
                q = q.bind(now);
            }
            q.fetch_all(pool).await?.iter().map(key_row).collect()
        }))
    }

    /// Marks a key revoked (first revocation wins); returns the stored row.
    pub async fn revoke_key(&self, tenant_id: &str, id: &str, now: i64) -> Result<Option<KeyRow>> {
        Ok(in_transaction!(self, |tx| {
            let revoked = sqlx::query(
                "UPDATE keys SET revoked_at = $1 WHERE id = $2 AND tenant_id = $3 AND revoked_at IS NULL RETURNING *",
            )
            .bind(now)
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
            // Only a key of the caller's revoked now: another tenant's id, none, or one
            // revoked already changes nothing the replicas must reload.
            let row = match revoked {
                Some(row) => {
                    tx.notify(Change::Revocations).await?;
                    Some(row)
                }
                None => {
                    sqlx::query("SELECT * FROM keys WHERE id = $1 AND tenant_id = $2")
                        .bind(id)
                        .bind(tenant_id)
                        .fetch_optional(&mut *tx)
                        .await?
                }
            };
            tx.commit().await?;
            row.as_ref().map(key_row)
        }))
    }

    /// Keys revoked at or after `since` that have not expired: revocations made by another
    /// process on the same database (another replica, or the other side of an upgrade).
    pub async fn revoked_since(&self, since: i64, now: i64) -> Result<Vec<(String, i64)>> {
        self.revocations(
            "SELECT id, expires_at FROM keys WHERE revoked_at >= $1 AND expires_at > $2",
            &[since, now],
        )
        .await
    }

    /// Revoked keys that have not expired yet: the content of the revocation filter.
    pub async fn live_revocations(&self, now: i64) -> Result<Vec<(String, i64)>> {
        // By the partial index `keys_live_revoked` (version 7): the keys ever revoked are
        // never all read, only those not expired.
        self.revocations(
            "SELECT id, expires_at FROM keys WHERE revoked_at IS NOT NULL AND expires_at > $1",
            &[now],
        )
        .await
    }

    /// (id, expires_at) of the keys `sql` selects with `binds`.
    async fn revocations(&self, sql: &'static str, binds: &[i64]) -> Result<Vec<(String, i64)>> {
        Ok(on_reader!(self, |pool| binds
            .iter()
            .fold(sqlx::query(sql), |q, b| q.bind(*b))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| (r.text("id"), r.int("expires_at")))
            .collect()))
    }

    // ----- ledger -----

    pub async fn ledger_row(&self, key_id: &str, day: i64) -> Result<LedgerRow> {
        Ok(on_reader!(self, |pool| sqlx::query(
            "SELECT settled, held FROM ledger WHERE key_id = $1 AND day = $2"
        )
        .bind(key_id)
        .bind(day)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(ledger_of_row)
        .unwrap_or_default()))
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
            on_reader!(self, |pool| {
                let mut q = sqlx::QueryBuilder::new(
                    "SELECT key_id, settled, held FROM ledger WHERE day = ",
                );
                q.push_bind(day).push(" AND key_id IN (");
                let mut ids = q.separated(", ");
                for id in chunk {
                    ids.push_bind(*id);
                }
                ids.push_unseparated(")");
                for r in q.build().fetch_all(pool).await? {
                    out.insert(r.text("key_id"), ledger_of_row(&r));
                }
            });
        }
        Ok(out)
    }

    /// Registers a ledger holder (a process that grants leases to its proxy) alive until
    /// `alive_until`.
    pub async fn register_holder(&self, id: &str, now: i64, alive_until: i64) -> Result<()> {
        // Again for the same id (a node whose hello answer was lost says hello again):
        // its life is extended, as a heartbeat would; never once reclaimed (a copy of the
        // hello that arrives late must not bring back a holder whose leases were given
        // back: its next poll is told they lapsed).
        on_writer!(self, |pool| sqlx::query(
            "INSERT INTO holders (id, started_at, alive_until) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET alive_until = excluded.alive_until
             WHERE holders.alive_until < excluded.alive_until AND holders.alive_until <> -1"
        )
        .bind(id)
        .bind(now)
        .bind(alive_until)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Extends a holder's life; false when its row is gone or marked reclaimed (another
    /// process gave its leases back: it was taken for dead).
    pub async fn heartbeat_holder(&self, id: &str, alive_until: i64) -> Result<bool> {
        // (CASE, not SQLite's max() nor PostgreSQL's GREATEST(): one text for both.)
        let done = on_writer!(self, |pool| sqlx::query(
            "UPDATE holders
             SET alive_until = CASE WHEN alive_until < $1 THEN $1 ELSE alive_until END
             WHERE id = $2 AND alive_until <> -1"
        )
        .bind(alive_until)
        .bind(id)
        .execute(pool)
        .await?
        .rows_affected());
        Ok(done == 1)
    }

    /// Deletes the marks of holders reclaimed that started before `before` (unix s, on
    /// the database's clock): how many.
    pub async fn prune_reclaimed_holders(&self, before: i64) -> Result<u64> {
        on_writer!(self, |pool| sqlx::query(
            "DELETE FROM holders WHERE alive_until = -1 AND started_at < $1"
        )
        .bind(before)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))
        .map_err(Into::into)
    }

    /// Holders whose life ended before `now` (and not yet reclaimed).
    pub async fn dead_holders(&self, now: i64) -> Result<Vec<String>> {
        Ok(on_reader!(self, |pool| sqlx::query(
            "SELECT id FROM holders WHERE alive_until < $1 AND alive_until <> -1"
        )
        .bind(now)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| r.text("id"))
        .collect()))
    }

    /// The leases a holder has: (key id, day, held).
    pub async fn leases_of(&self, holder: &str) -> Result<Vec<(String, i64, Micros)>> {
        Ok(on_reader!(self, |pool| sqlx::query(
            "SELECT key_id, day, held FROM leases WHERE holder = $1"
        )
        .bind(holder)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| (r.text("key_id"), r.int("day"), Micros(r.int("held"))))
        .collect()))
    }

    /// Gives back the leases of a dead holder, after adding to each key's settled spend
    /// what it spent. `audited` is the spend the audit trail records for each (key, day);
    /// less what the ledger has settled (read under the rows' locks), it is spend nobody
    /// has reported yet: the dead holder's, or a live holder's not reported yet.
    ///
    /// Settled: the lease's committed part (write-ahead, see `ledger_batch`: every call a
    /// holder forwards is committed until it reports it), or that unreported spend less
    /// what other holders have committed on the key, whichever is more. The second is a
    /// charge learned from the vendor's answer over what was reserved, that the holder
    /// died before reporting: the vendor took it. Another holder's calls are not counted
    /// again (their own reports settle them); spend of theirs not in the trail yet can
    /// hide that much of it.
    /// Removes the holder, whose later reports then release nothing. Two replicas
    /// reclaiming the same holder at once give its leases back once: the second finds
    /// them gone. Only a holder whose life ended before `dead_before` (unix s) is
    /// reclaimed, checked again under its lock: one whose heartbeat extended its life
    /// since it was seen dead keeps its leases (nothing is given back).
    pub async fn reclaim_holder(
        &self,
        holder: &str,
        audited: &std::collections::HashMap<(String, i64), Micros>,
        dead_before: i64,
    ) -> Result<Micros> {
        in_transaction!(self, |tx| {
            // The holder first, as a grant locks it (`lease_grant_many`): a grant to it
            // in flight commits before its leases are read here, or grants nothing.
            let alive_until: Option<i64> = sqlx::query_scalar(&for_update(
                tx.is_postgres(),
                "SELECT alive_until FROM holders WHERE id = $1",
            ))
            .bind(holder)
            .fetch_optional(&mut *tx)
            .await?;
            if alive_until.is_some_and(|until| until >= dead_before) {
                tx.rollback().await?;
                return Ok(Micros::ZERO);
            }
            let mut slots: Vec<(String, i64)> =
                sqlx::query("SELECT key_id, day FROM leases WHERE holder = $1")
                    .bind(holder)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|r| (r.text("key_id"), r.int("day")))
                    .collect();
            slots.sort();
            let refs: Vec<(&str, i64)> = slots.iter().map(|(k, d)| (k.as_str(), *d)).collect();
            tx.lock_ledger_rows(&refs).await?;
            // Re-read under the locks: a racing reclaim may have taken some already.
            let rows = sqlx::query(&for_update(
                tx.is_postgres(),
                "SELECT key_id, day, held, committed FROM leases WHERE holder = $1
                 ORDER BY key_id, day",
            ))
            .bind(holder)
            .fetch_all(&mut *tx)
            .await?;
            let mut returned = Micros::ZERO;
            for r in &rows {
                let (key_id, day, held) = (r.text("key_id"), r.int("day"), r.int("held"));
                let settled: i64 =
                    sqlx::query_scalar("SELECT settled FROM ledger WHERE key_id = $1 AND day = $2")
                        .bind(&key_id)
                        .bind(day)
                        .fetch_optional(&mut *tx)
                        .await?
                        .unwrap_or(0);
                let unreported = audited
                    .get(&(key_id.clone(), day))
                    .map_or(0, |m| m.0)
                    .saturating_sub(settled)
                    .max(0);
                let committed = r.int("committed");
                // The other holders' commitments matter only when the trail shows more
                // than this one committed: read then only (`leases` has no index by key,
                // and a dead node may hold thousands of leases).
                let others_committed: i64 = if unreported > committed {
                    sqlx::query_scalar(
                        "SELECT CAST(COALESCE(SUM(committed), 0) AS BIGINT) FROM leases
                         WHERE key_id = $1 AND day = $2 AND holder <> $3",
                    )
                    .bind(&key_id)
                    .bind(day)
                    .bind(holder)
                    .fetch_one(&mut *tx)
                    .await?
                } else {
                    0
                };
                // Every call the holder forwarded is committed until reported: its spend is
                // its committed budget, or more where the trail shows spend nobody's
                // committed budget accounts for (a charge learned from an answer).
                let spent = committed
                    .max(unreported.saturating_sub(others_committed.max(0)))
                    .max(0);
                tx.ledger_add(&key_id, day, Micros(spent), Micros(-held))
                    .await?;
                returned = returned
                    .checked_add(Micros((held - spent).max(0)))
                    .unwrap_or(returned);
            }
            sqlx::query("DELETE FROM leases WHERE holder = $1")
                .bind(holder)
                .execute(&mut *tx)
                .await?;
            // Kept, marked reclaimed (`alive_until` -1: dead to every check), so that no
            // late hello or heartbeat brings it back; deleted a day later
            // (`prune_reclaimed_holders`).
            sqlx::query("UPDATE holders SET alive_until = -1 WHERE id = $1")
                .bind(holder)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(returned)
        })
    }

    /// What a node's lease request is checked against, for each of `ids` that exists:
    /// the key's tenant, daily cap (micro-USD), expiry and revocation time.
    pub async fn key_limits(
        &self,
        ids: &[&str],
    ) -> Result<std::collections::HashMap<String, KeyLimits>> {
        fn limits(r: &impl TableRow) -> (String, KeyLimits) {
            let limits = KeyLimits {
                tenant_id: r.text("tenant_id"),
                label: r.text("label"),
                daily_cap: Micros(r.int("daily_cap")),
                expires_at: r.int("expires_at"),
                revoked_at: r.int_opt("revoked_at"),
            };
            (r.text("id"), limits)
        }
        Ok(match &self.backend {
            Backend::Sqlite { reader, .. } => sqlx::query(
                "SELECT id, tenant_id, label, daily_cap, expires_at, revoked_at FROM keys
                 WHERE id IN (SELECT value FROM json_each($1))",
            )
            .bind(serde_json::to_string(ids)?)
            .fetch_all(reader)
            .await?
            .iter()
            .map(limits)
            .collect(),
            Backend::Postgres(pool) => sqlx::query(
                "SELECT id, tenant_id, label, daily_cap, expires_at, revoked_at FROM keys
                 WHERE id = ANY($1::TEXT[])",
            )
            .bind(ids)
            .fetch_all(pool)
            .await?
            .iter()
            .map(limits)
            .collect(),
        })
    }

    /// The key's tenant, for audit lookups by key.
    pub async fn key_tenant(&self, key_id: &str) -> Result<Option<String>> {
        Ok(on_reader!(self, |pool| sqlx::query(
            "SELECT tenant_id FROM keys WHERE id = $1"
        )
        .bind(key_id)
        .fetch_optional(pool)
        .await?
        .map(|r| r.text("tenant_id"))))
    }

    /// When the newest key was issued (unix s, by its issuer's clock); `None` without keys.
    pub async fn newest_key_created_at(&self) -> Result<Option<i64>> {
        Ok(on_reader!(self, |pool| sqlx::query_scalar(
            "SELECT created_at FROM keys ORDER BY seq DESC LIMIT 1"
        )
        .fetch_optional(pool)
        .await?))
    }

    /// The ids of every signing key there has been (vault keys name theirs in `kid`).
    pub async fn signing_key_ids(&self) -> Result<Vec<String>> {
        Ok(on_reader!(self, |pool| sqlx::query_scalar(
            "SELECT kid FROM signing_keys ORDER BY created_at"
        )
        .fetch_all(pool)
        .await?))
    }

    /// Deletes at most `limit` keys signed with `kid` that expired before `before` (unix
    /// s), and their ledger rows, in one transaction: how many keys. A key with budget
    /// still held by a lease stays for a later round (the lease's reclaim reads it). Keys
    /// are found by `keys_by_kid`, oldest expiry first.
    pub async fn prune_expired_keys(&self, kid: &str, before: i64, limit: i64) -> Result<u64> {
        Ok(in_transaction!(self, |tx| {
            // On PostgreSQL the rows are locked, and rows another replica is deleting are
            // skipped (its round and this one share the work instead of waiting).
            let pick = "SELECT id FROM keys k WHERE kid = $1 AND expires_at < $2
                   AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.key_id = k.id AND l.held <> 0)
                 ORDER BY expires_at LIMIT $3";
            let pick = if tx.is_postgres() {
                format!("{pick} FOR UPDATE SKIP LOCKED")
            } else {
                pick.to_string()
            };
            let ids: Vec<String> = sqlx::query_scalar(&pick)
                .bind(kid)
                .bind(before)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
            if ids.is_empty() {
                return Ok(0);
            }
            // The ids as one JSON array: one bind for both backends.
            let listed = if tx.is_postgres() {
                "SELECT jsonb_array_elements_text($1::jsonb)"
            } else {
                "SELECT value FROM json_each($1)"
            };
            let json = serde_json::to_string(&ids)?;
            sqlx::query(&format!(
                "DELETE FROM ledger WHERE key_id IN ({listed}) AND held = 0"
            ))
            .bind(&json)
            .execute(&mut *tx)
            .await?;
            let deleted = sqlx::query(&format!("DELETE FROM keys WHERE id IN ({listed})"))
                .bind(&json)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            deleted
        }))
    }

    /// Adds deltas to a ledger row (creating it), atomically.
    pub async fn ledger_add(
        &self,
        key_id: &str,
        day: i64,
        settled: Micros,
        held: Micros,
    ) -> Result<()> {
        on_writer!(self, |pool| {
            let mut conn = pool.acquire().await?;
            conn.ledger_add(key_id, day, settled, held).await
        })
    }
}

/// The database could not be reached, or refused work for a reason that passes (it is
/// restarting, out of connections, locked, out of disk). The control API answers these
/// 503 `storage_unavailable`; anything else is a 500.
#[derive(Debug, thiserror::Error)]
#[error("storage unavailable: {0}")]
pub struct Unavailable(pub String);

/// Whether this error means the storage is unavailable rather than a bug or bad data.
pub fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        if cause.is::<Unavailable>() {
            return true;
        }
        let Some(e) = cause.downcast_ref::<sqlx::Error>() else {
            return false;
        };
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some()
                {
                    // SQLSTATE classes: 08 connection exception, 53 insufficient
                    // resources, 57P0x shutting down / starting up, 58 system error.
                    ["08", "53", "57P0", "58"]
                        .iter()
                        .any(|c| code.starts_with(c))
                } else {
                    // SQLite primary result codes: BUSY, LOCKED, IOERR, FULL, CANTOPEN.
                    let primary = code.parse::<i32>().unwrap_or(0) & 0xff;
                    matches!(primary, 5 | 6 | 10 | 13 | 14)
                }
            }
            _ => false,
        }
    })
}

/// What changed, announced to the other replicas on PostgreSQL (`NOTIFY`, delivered at
/// the commit of the transaction that made the change, and only if it commits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    Tokens,
    Credentials,
    SigningKeys,
    Revocations,
    Nodes,
}

/// The channel replicas listen on.
pub const CHANGES_CHANNEL: &str = "keybrake_changes";

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Tokens => "tokens",
            Change::Credentials => "credentials",
            Change::SigningKeys => "signing_keys",
            Change::Revocations => "revocations",
            Change::Nodes => "nodes",
        }
    }

    pub fn parse(text: &str) -> Option<Change> {
        [
            Change::Tokens,
            Change::Credentials,
            Change::SigningKeys,
            Change::Revocations,
            Change::Nodes,
        ]
        .into_iter()
        .find(|c| c.as_str() == text)
    }
}

/// `sql` with `FOR UPDATE` on PostgreSQL (SQLite has no row locks: its write transaction
/// already excludes every other writer).
fn for_update(postgres: bool, sql: &str) -> String {
    if postgres {
        format!("{sql} FOR UPDATE")
    } else {
        sql.to_string()
    }
}

/// What the write transactions need that differs by backend, on a connection of either.
#[allow(async_fn_in_trait)]
pub(super) trait TxConn {
    fn is_postgres(&self) -> bool;
    /// Tells the other replicas, at commit, that `change` happened (PostgreSQL only: a
    /// SQLite store is one process's, or two during an upgrade, which poll instead).
    async fn notify(&mut self, change: Change) -> Result<()>;
    /// Locks these ledger rows, in (key, day) order, before the transaction touches any
    /// lease row: every transaction locks in that order, so two replicas never deadlock.
    /// Nothing to do on SQLite, whose write transaction excludes other writers.
    async fn lock_ledger_rows(&mut self, slots: &[(&str, i64)]) -> Result<()>;
    /// Adds deltas to a ledger row (creating it) in one statement; `held` never drops
    /// below zero.
    async fn ledger_add(
        &mut self,
        key_id: &str,
        day: i64,
        settled: Micros,
        held: Micros,
    ) -> Result<()>;
}

impl TxConn for sqlx::SqliteConnection {
    fn is_postgres(&self) -> bool {
        false
    }

    async fn notify(&mut self, _change: Change) -> Result<()> {
        Ok(())
    }

    async fn lock_ledger_rows(&mut self, _slots: &[(&str, i64)]) -> Result<()> {
        Ok(())
    }

    async fn ledger_add(
        &mut self,
        key_id: &str,
        day: i64,
        settled: Micros,
        held: Micros,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO ledger (key_id, day, settled, held) VALUES ($1, $2, $3, max($4, 0))
             ON CONFLICT (key_id, day) DO UPDATE SET settled = settled + $3, held = max(held + $4, 0)",
        )
        .bind(key_id)
        .bind(day)
        .bind(settled.0)
        .bind(held.0)
        .execute(self)
        .await?;
        Ok(())
    }
}

impl TxConn for sqlx::PgConnection {
    fn is_postgres(&self) -> bool {
        true
    }

    async fn notify(&mut self, change: Change) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES_CHANNEL)
            .bind(change.as_str())
            .execute(self)
            .await?;
        Ok(())
    }

    async fn lock_ledger_rows(&mut self, slots: &[(&str, i64)]) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let mut sorted = slots.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let (keys, days): (Vec<&str>, Vec<i64>) = sorted.into_iter().unzip();
        // Missing rows come into being first, in (key, day) order too: a row inserted
        // after others are locked (a report's first spend on a key) would wait, out of
        // order, on a grant that inserted it and waits on a row locked here (a deadlock).
        sqlx::query(
            "INSERT INTO ledger (key_id, day) SELECT * FROM unnest($1::TEXT[], $2::BIGINT[])
             ON CONFLICT (key_id, day) DO NOTHING",
        )
        .bind(&keys)
        .bind(&days)
        .execute(&mut *self)
        .await?;
        sqlx::query(
            "SELECT 1 FROM ledger WHERE (key_id, day) IN
                 (SELECT * FROM unnest($1::TEXT[], $2::BIGINT[]))
             ORDER BY key_id, day FOR UPDATE",
        )
        .bind(keys)
        .bind(days)
        .execute(self)
        .await?;
        Ok(())
    }

    async fn ledger_add(
        &mut self,
        key_id: &str,
        day: i64,
        settled: Micros,
        held: Micros,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO ledger AS l (key_id, day, settled, held) VALUES ($1, $2, $3, GREATEST($4, 0))
             ON CONFLICT (key_id, day) DO UPDATE
             SET settled = l.settled + $3, held = GREATEST(l.held + $4, 0)",
        )
        .bind(key_id)
        .bind(day)
        .bind(settled.0)
        .bind(held.0)
        .execute(self)
        .await?;
        Ok(())
    }
}

/// The error for a database written by a newer keybrake.
fn newer_schema(applied: i64) -> anyhow::Error {
    anyhow::anyhow!(
        "database schema version {applied} is newer than this keybrake (knows {}): upgrade keybrake",
        MIGRATIONS.len()
    )
}

async fn migrate_sqlite(pool: &SqlitePool) -> Result<()> {
    let applied: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(pool)
        .await?;
    if applied > MIGRATIONS.len() as i64 {
        return Err(newer_schema(applied));
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(m.sqlite)
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

/// Any number of replicas may start at once on an empty database: the migrations run in
/// one transaction under an advisory lock, so exactly one applies each.
async fn migrate_postgres(pool: &PgPool) -> Result<()> {
    /// The advisory lock key of keybrake's migrations ("keybrake" in ASCII).
    const LOCK: i64 = 0x6b65_7962_7261_6b65;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS keybrake_schema (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let applied: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM keybrake_schema")
        .fetch_one(&mut *tx)
        .await?;
    if applied > MIGRATIONS.len() as i64 {
        return Err(newer_schema(applied));
    }
    if applied == MIGRATIONS.len() as i64 {
        return Ok(());
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        sqlx::raw_sql(m.postgres)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("migration {}", i + 1))?;
    }
    sqlx::query("DELETE FROM keybrake_schema")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO keybrake_schema (version) VALUES ($1)")
        .bind(MIGRATIONS.len() as i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::database::DatabaseUrl;
    use crate::ids::new_sorted_id;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("keybrake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    async fn sqlite(name: &str) -> Store {
        Store::open(&Database::Sqlite {
            data_dir: temp_dir(name),
        })
        .await
        .unwrap()
    }

    pub(crate) async fn postgres() -> Store {
        let url = crate::control::pg_test::database().await;
        Store::open(&Database::Postgres {
            url: DatabaseUrl::parse(&url).unwrap(),
        })
        .await
        .unwrap()
    }

    /// A full disk (here SQLite's page limit) fails a write transaction, and SQLite rolls
    /// it back itself: the connection must not stay stuck "inside" it (every later write
    /// refused until a restart) once there is room again.
    #[tokio::test]
    async fn writes_work_again_after_the_disk_was_full() {
        let store = sqlite("full-disk").await;
        let Backend::Sqlite { writer, .. } = &store.backend else {
            unreachable!()
        };
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(writer)
            .await
            .unwrap();
        sqlx::query(&format!("PRAGMA max_page_count = {}", pages + 2))
            .execute(writer)
            .await
            .unwrap();
        let name = "x".repeat(2000);
        let mut full = false;
        for n in 0..1000 {
            let id = format!("tn_{n}");
            let token = format!("tok_{n}");
            if store
                .insert_tenant(&id, &name, &token, &[n as u8; 32], 1)
                .await
                .is_err()
            {
                full = true;
                break;
            }
        }
        assert!(full, "the page limit was never reached");
        sqlx::query("PRAGMA max_page_count = 1073741823")
            .execute(writer)
            .await
            .unwrap();
        let again = store
            .insert_tenant("tn_after", "after", "tok_after", &[7; 32], 1)
            .await;
        assert!(again.is_ok(), "{again:?}");
    }

    /// Holders' deadlines are kept on the database server's clock: a local PostgreSQL
    /// server shares the host's clock, so they agree within the round trip; an offset
    /// measured is what `now_ms` adds; SQLite has no other clock.
    #[tokio::test]
    async fn deadlines_are_kept_on_the_database_clock() {
        let pg = postgres().await;
        let offset = pg.sync_clock().await.unwrap();
        assert!(offset.abs() < 1000, "{offset}");
        let local = || crate::token::unix_ms() as i64;
        assert!((pg.now_ms() - local()).abs() < 1000);
        // A database an hour ahead: deadlines follow it, carried on by this process's
        // monotonic clock.
        let base = pg.db_clock_base.load(Ordering::Acquire);
        pg.db_clock_base.store(base + 3_600_000, Ordering::Release);
        let ahead = pg.now_ms() - local();
        assert!((3_599_000..=3_601_000).contains(&ahead), "{ahead}");
        assert!(pg.sync_clock().await.unwrap().abs() < 1000);
        assert!((pg.now_ms() - local()).abs() < 1000);
        let store = sqlite("clock-offset").await;
        assert_eq!(store.sync_clock().await.unwrap(), 0);
        assert_eq!(store.db_clock_base.load(Ordering::Acquire), UNMEASURED);
    }

    /// (table, column, type, nullable) of every table the migrations made, types named
    /// as SQLite declares them (BIGINT is INTEGER, BYTEA is BLOB).
    async fn schema(store: &Store) -> Vec<(String, String, String, bool)> {
        let mut out: Vec<(String, String, String, bool)> = match &store.backend {
            Backend::Sqlite { reader, .. } => sqlx::query(
                "SELECT m.name AS t, c.name AS c, c.type AS ty, c.\"notnull\" AS nn, c.pk AS pk
                 FROM sqlite_master m JOIN pragma_table_info(m.name) c
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'",
            )
            .fetch_all(reader)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                // A primary key column is NOT NULL in PostgreSQL whatever it says.
                let not_null = r.int("nn") == 1 || r.int("pk") > 0;
                (r.text("t"), r.text("c"), r.text("ty"), !not_null)
            })
            .collect(),
            Backend::Postgres(pool) => sqlx::query(
                "SELECT table_name::TEXT AS t, column_name::TEXT AS c, data_type::TEXT AS ty,
                        is_nullable::TEXT AS nn
                 FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name <> 'keybrake_schema'",
            )
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let ty = match r.text("ty").as_str() {
                    "bigint" => "INTEGER".to_string(),
                    "bytea" => "BLOB".to_string(),
                    "text" => "TEXT".to_string(),
                    other => other.to_string(),
                };
                (r.text("t"), r.text("c"), ty, r.text("nn") == "YES")
            })
            .collect(),
        };
        out.sort();
        out
    }

    /// A revocation or deletion naming nothing (an id of another tenant's, or none) tells
    /// the other replicas nothing: a caller repeating it cannot make every replica reload.
    #[tokio::test]
    async fn a_change_that_changed_nothing_notifies_no_replica() {
        let store = postgres().await;
        let Backend::Postgres(pool) = &store.backend else {
            unreachable!()
        };
        let mut listener = sqlx::postgres::PgListener::connect_with(pool)
            .await
            .unwrap();
        listener.listen(CHANGES_CHANNEL).await.unwrap();
        store
            .insert_tenant("tn_a", "a", "tok_a", b"hash-a", 1)
            .await
            .unwrap();
        let heard = |l: &mut sqlx::postgres::PgListener| {
            let mut out = Vec::new();
            while let Some(n) = l.next_buffered() {
                out.push(n.payload().to_string());
            }
            out
        };
        let wait = || tokio::time::sleep(std::time::Duration::from_millis(300));
        wait().await;
        listener.try_recv().await.unwrap(); // the tenant's own
        heard(&mut listener);
        let key = KeyRow {
            seq: 0,
            id: "key_a".into(),
            tenant_id: "tn_a".into(),
            kid: "k1".into(),
            vendor: "stripe".into(),
            label: "l".into(),
            allowed_endpoints: vec!["POST /v1/payment_intents".into()],
            daily_cap: Micros(1),
            metadata: serde_json::json!({}),
            stripe_accounts: None,
            created_at: 1,
            expires_at: i64::MAX,
            revoked_at: None,
        };
        store.insert_keys(&[key]).await.unwrap();
        // Another tenant's key, a missing token, node and credential: nothing changes.
        assert!(store
            .revoke_key("tn_b", "key_a", 2)
            .await
            .unwrap()
            .is_none());
        assert!(store
            .delete_api_token("tn_a", "tok_none")
            .await
            .unwrap()
            .is_none());
        assert!(!store.delete_node("nd_none").await.unwrap());
        assert!(!store.delete_credential("tn_a", "stripe").await.unwrap());
        // Then a real revocation: its notification is the only one (revoking it again
        // changes nothing, and answers the key as it is).
        assert!(store
            .revoke_key("tn_a", "key_a", 2)
            .await
            .unwrap()
            .is_some());
        let again = store.revoke_key("tn_a", "key_a", 3).await.unwrap();
        assert_eq!(again.and_then(|k| k.revoked_at), Some(2));
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
            .await
            .expect("the revocation is notified")
            .unwrap();
        wait().await;
        let mut all = vec![first.payload().to_string()];
        all.extend(heard(&mut listener));
        assert_eq!(all, vec![Change::Revocations.as_str().to_string()]);
    }

    #[tokio::test]
    async fn both_backends_end_with_the_same_tables_and_columns() {
        let lite = schema(&sqlite("schema-parity").await).await;
        let pg = schema(&postgres().await).await;
        assert!(lite.len() > 40, "{lite:?}");
        assert_eq!(lite, pg);
    }

    /// Version 5 on a store holding two nodes of one name (allowed before it): the first
    /// created keeps the name (ids are random, not in creation order), the other gets its
    /// id appended, and the name is then unique.
    #[tokio::test]
    async fn nodes_sharing_a_name_before_version_5_are_renamed_by_it_on_both_backends() {
        async fn names(s: &Store) -> Vec<String> {
            let mut v: Vec<String> = s
                .all_nodes()
                .await
                .unwrap()
                .into_iter()
                .map(|n| n.1)
                .collect();
            v.sort();
            v
        }
        let renamed = vec!["edge".to_string(), "edge-nd_2".to_string()];
        // SQLite: back to version 4 without the index, two nodes named alike.
        let dir = temp_dir("node-names");
        let database = Database::Sqlite {
            data_dir: dir.clone(),
        };
        let store = Store::open(&database).await.unwrap();
        let Backend::Sqlite { writer, .. } = &store.backend else {
            unreachable!()
        };
        sqlx::raw_sql(
            "DROP INDEX nodes_name; DROP TABLE lease_batches; DROP INDEX keys_live_revoked;
             PRAGMA user_version = 4;
             INSERT INTO nodes VALUES ('nd_9', 'edge', x'01', 1), ('nd_2', 'edge', x'02', 2);",
        )
        .execute(writer)
        .await
        .unwrap();
        drop(store);
        let store = Store::open(&database).await.unwrap();
        assert_eq!(names(&store).await, renamed);
        assert!(!store.insert_node("nd_3", "edge", b"3", 3).await.unwrap());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        // PostgreSQL: the same.
        let url = crate::control::pg_test::database().await;
        let database = Database::Postgres {
            url: DatabaseUrl::parse(&url).unwrap(),
        };
        let store = Store::open(&database).await.unwrap();
        sqlx::raw_sql(
            "DROP INDEX nodes_name; DROP TABLE lease_batches; DROP INDEX keys_live_revoked;
             UPDATE keybrake_schema SET version = 4;
             INSERT INTO nodes VALUES ('nd_9', 'edge', '\\x01', 1), ('nd_2', 'edge', '\\x02', 2);",
        )
        .execute(store.postgres().unwrap())
        .await
        .unwrap();
        let store = Store::open(&database).await.unwrap();
        assert_eq!(names(&store).await, renamed);
        assert!(!store.insert_node("nd_3", "edge", b"3", 3).await.unwrap());
    }

    #[tokio::test]
    async fn a_schema_newer_than_this_binary_is_refused_on_both_backends() {
        let dir = temp_dir("schema-newer");
        let database = Database::Sqlite {
            data_dir: dir.clone(),
        };
        let store = Store::open(&database).await.unwrap();
        let Backend::Sqlite { writer, .. } = &store.backend else {
            unreachable!()
        };
        sqlx::query("PRAGMA user_version = 99")
            .execute(writer)
            .await
            .unwrap();
        drop(store);
        let want = format!(
            "database schema version 99 is newer than this keybrake (knows {}): upgrade keybrake",
            MIGRATIONS.len()
        );
        let err = format!("{:#}", Store::open(&database).await.err().unwrap());
        // Named with the file it is about.
        let file = dir.join(FILE);
        assert_eq!(err, format!("cannot set up {}: {want}", file.display()));
        let _ = std::fs::remove_dir_all(&dir);

        let url = crate::control::pg_test::database().await;
        let database = Database::Postgres {
            url: DatabaseUrl::parse(&url).unwrap(),
        };
        let store = Store::open(&database).await.unwrap();
        sqlx::query("UPDATE keybrake_schema SET version = 99")
            .execute(store.postgres().unwrap())
            .await
            .unwrap();
        let err = Store::open(&database).await.err().unwrap();
        assert_eq!(format!("{err:#}"), want);
    }

    /// The same calls give the same answers on both backends.
    async fn exercise(s: &Store) {
        s.insert_tenant("tn_a", "a", "tok_a", b"hash-a", 10)
            .await
            .unwrap();
        s.insert_tenant("tn_b", "b", "tok_b", b"hash-b", 20)
            .await
            .unwrap();
        assert!(
            s.insert_tenant("tn_c", "c", "tok_c", b"hash-a", 30)
                .await
                .is_err(),
            "a token hash is unique"
        );
        assert!(!s.tenant_exists("tn_c").await.unwrap(), "rolled back");
        let tenants = s.list_tenants(Some((10, "tn_a".into())), 10).await.unwrap();
        assert_eq!(tenants, vec![("tn_b".into(), "b".into(), 20)]);
        s.insert_api_token("tok_a2", "tn_a", b"hash-a2", 11)
            .await
            .unwrap();
        assert_eq!(
            s.delete_api_token("tn_b", "tok_a2").await.unwrap(),
            None,
            "another tenant's token"
        );
        assert_eq!(
            s.delete_api_token("tn_a", "tok_a2").await.unwrap(),
            Some(b"hash-a2".to_vec())
        );
        let mut tokens = s.all_api_tokens().await.unwrap();
        tokens.sort();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            tokens[0],
            (b"hash-a".to_vec(), "tok_a".into(), "tn_a".into())
        );

        assert!(s
            .insert_node("nd_1", "edge", b"node-hash", 5)
            .await
            .unwrap());
        // A name names one live node; deleting it frees the name.
        assert!(!s.insert_node("nd_2", "edge", b"hash-2", 6).await.unwrap());
        assert_eq!(s.all_nodes().await.unwrap().len(), 1);
        assert!(s.delete_node("nd_1").await.unwrap());
        assert!(!s.delete_node("nd_1").await.unwrap());
        assert!(s.insert_node("nd_2", "edge", b"hash-2", 6).await.unwrap());
        assert!(s.delete_node("nd_2").await.unwrap());

        let cred = |sealed: &[u8]| CredentialRow {
            tenant_id: "tn_a".into(),
            vendor: "stripe".into(),
            sealed: sealed.to_vec(),
            last4: "1234".into(),
            updated_at: 7,
        };
        s.upsert_credential(&cred(b"one")).await.unwrap();
        s.upsert_credential(&cred(b"two")).await.unwrap();
        let creds = s.all_credentials().await.unwrap();
        assert_eq!((creds.len(), creds[0].sealed.as_slice()), (1, &b"two"[..]));
        assert!(s.delete_credential("tn_a", "stripe").await.unwrap());
        assert!(!s.delete_credential("tn_a", "stripe").await.unwrap());

        s.insert_signing_key("kid_1", b"sealed1", b"pub1", 100)
            .await
            .unwrap();
        s.insert_signing_key("kid_2", b"sealed2", b"pub2", 200)
            .await
            .unwrap();
        let key = |n: u64, kid: &str, expires_at: i64| KeyRow {
            metadata: serde_json::json!({ "n": n }),
            stripe_accounts: (n == 2).then(|| vec!["acct_1".to_string()]),
            ..test_key(n, kid, expires_at)
        };
        let rows = vec![
            key(1, "kid_1", 1_000),
            key(2, "kid_2", 1_000),
            key(3, "kid_2", 400),
        ];
        s.insert_keys(&rows).await.unwrap();
        // kid_1 is retired but still signs a live key.
        let live: Vec<String> = s
            .live_signing_keys(500)
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.kid)
            .collect();
        assert_eq!(live, ["kid_1", "kid_2"]);
        let got = s.get_key("tn_a", &rows[1].id).await.unwrap().unwrap();
        assert_eq!(got.stripe_accounts, Some(vec!["acct_1".to_string()]));
        assert_eq!(got.metadata, serde_json::json!({ "n": 2 }));
        assert!(s.get_key("tn_b", &rows[1].id).await.unwrap().is_none());
        let all = s.list_keys("tn_a", None, i64::MAX, 10, 500).await.unwrap();
        assert_eq!(
            all.iter().map(|k| k.label.as_str()).collect::<Vec<_>>(),
            ["k3", "k2", "k1"]
        );
        let page = s.list_keys("tn_a", None, all[0].seq, 1, 500).await.unwrap();
        assert_eq!(page[0].label, "k2");
        let revoked = s
            .revoke_key("tn_a", &rows[0].id, 450)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(revoked.revoked_at, Some(450));
        let again = s
            .revoke_key("tn_a", &rows[0].id, 460)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.revoked_at, Some(450), "the first revocation wins");
        let status = |st| async move {
            s.list_keys("tn_a", Some(st), i64::MAX, 10, 500)
                .await
                .unwrap()
                .into_iter()
                .map(|k| k.label)
                .collect::<Vec<_>>()
        };
        assert_eq!(status(KeyStatus::Active).await, ["k2"]);
        assert_eq!(status(KeyStatus::Revoked).await, ["k1"]);
        assert_eq!(status(KeyStatus::Expired).await, ["k3"]);
        assert_eq!(
            s.revoked_since(440, 500).await.unwrap(),
            vec![(rows[0].id.clone(), 1_000)]
        );
        assert!(s.revoked_since(451, 500).await.unwrap().is_empty());
        assert_eq!(
            s.key_tenant(&rows[0].id).await.unwrap().as_deref(),
            Some("tn_a")
        );

        // The ledger: grant, report, a dead holder's leases given back.
        s.register_holder("h1", 0, 10).await.unwrap();
        s.register_holder("h2", 0, 10).await.unwrap();
        let grant = |holder: &'static str, min: i64, want: i64| {
            let ask = crate::control::ledger_batch::GrantRequest {
                key_id: "k".into(),
                day: 9,
                cap: Micros(100),
                min: Micros(min),
                want: Micros(want),
                commit: Micros::ZERO,
            };
            let s = &s;
            async move { s.lease_grant_many(holder, 5, None, &[ask]).await.unwrap()[0].granted }
        };
        assert_eq!(grant("h1", 10, 60).await, Micros(60));
        assert_eq!(grant("h2", 10, 60).await, Micros(40));
        assert_eq!(grant("h2", 1, 1).await, Micros::ZERO);
        // 25 of the 60 spent, the other 35 returned.
        let report = crate::control::ledger_batch::ReportRow {
            key_id: "k".into(),
            day: 9,
            settled: Micros(25),
            spent: Micros(25),
            returned: Micros(35),
            unreserved: Micros::ZERO,
            return_uncommitted: false,
        };
        s.lease_report_many("h1", None, &[report], &[])
            .await
            .unwrap();
        assert_eq!(
            s.ledger_row("k", 9).await.unwrap(),
            LedgerRow {
                settled: Micros(25),
                held: Micros(40)
            }
        );
        assert!(s.heartbeat_holder("h1", 100).await.unwrap());
        assert!(s.heartbeat_holder("h1", 50).await.unwrap());
        assert_eq!(s.dead_holders(60).await.unwrap(), ["h2"]);
        // The trail: the 25 h1 reported and settled, and 15 h2 spent, unreported.
        let known = [(("k".to_string(), 9), Micros(40))].into();
        // Seen dead at 60, then its heartbeat came: it keeps its leases.
        assert!(s.heartbeat_holder("h2", 70).await.unwrap());
        assert_eq!(
            s.reclaim_holder("h2", &known, 60).await.unwrap(),
            Micros::ZERO
        );
        assert_eq!(
            s.leases_of("h2").await.unwrap(),
            [("k".to_string(), 9, Micros(40))]
        );
        assert_eq!(
            s.reclaim_holder("h2", &known, i64::MAX).await.unwrap(),
            Micros(25)
        );
        assert_eq!(
            s.reclaim_holder("h2", &known, i64::MAX).await.unwrap(),
            Micros::ZERO,
            "given back once"
        );
        assert!(!s.heartbeat_holder("h2", 100).await.unwrap());
        // A copy of its hello arriving late does not bring it back: its next poll is
        // told its leases lapsed, and it is not taken for dead again.
        s.register_holder("h2", 0, 200).await.unwrap();
        assert!(!s.heartbeat_holder("h2", 300).await.unwrap());
        assert_eq!(grant("h2", 1, 1).await, Micros::ZERO);
        assert_eq!(s.dead_holders(i64::MAX).await.unwrap(), ["h1"]);
        // Its mark goes once it is old enough; a hello after that is a new holder.
        assert_eq!(s.prune_reclaimed_holders(0).await.unwrap(), 0);
        assert_eq!(s.prune_reclaimed_holders(1).await.unwrap(), 1);
        assert_eq!(
            s.ledger_rows(&["k", "none"], 9).await.unwrap(),
            [(
                "k".to_string(),
                LedgerRow {
                    settled: Micros(40),
                    held: Micros::ZERO
                }
            )]
            .into()
        );
        s.ledger_add("k", 9, Micros(1), Micros(-5)).await.unwrap();
        assert_eq!(s.ledger_row("k", 9).await.unwrap().held, Micros::ZERO);
        // A holder whose trail shows more than its lease (a vendor's answer charged past
        // the reservation, and it died before reporting): all of it is settled, except
        // what a live holder's committed budget may account for (its calls in flight or
        // not reported yet: settled by its own report).
        let ask = |key: &str, commit: i64| crate::control::ledger_batch::GrantRequest {
            key_id: key.into(),
            day: 9,
            cap: Micros(100),
            min: Micros(10),
            want: Micros(10),
            commit: Micros(commit),
        };
        s.register_holder("h3", 0, 10).await.unwrap();
        s.register_holder("h4", 0, 10).await.unwrap();
        for key in ["k2", "k3"] {
            let granted = s
                .lease_grant_many("h3", 5, None, &[ask(key, 4)])
                .await
                .unwrap();
            assert_eq!(granted[0].granted, Micros(10));
        }
        let granted = s
            .lease_grant_many("h4", 5, None, &[ask("k3", 10)])
            .await
            .unwrap();
        assert_eq!(granted[0].committed, Micros(10));
        let known = [
            (("k2".to_string(), 9), Micros(30)),
            (("k3".to_string(), 9), Micros(30)),
        ]
        .into();
        assert_eq!(
            s.reclaim_holder("h3", &known, i64::MAX).await.unwrap(),
            Micros::ZERO
        );
        assert_eq!(
            s.ledger_row("k2", 9).await.unwrap(),
            LedgerRow {
                settled: Micros(30),
                held: Micros::ZERO
            }
        );
        // k3: 30 audited, h4 holds 10 committed: 20 settled for h3, h4's held lease stays.
        assert_eq!(
            s.ledger_row("k3", 9).await.unwrap(),
            LedgerRow {
                settled: Micros(20),
                held: Micros(10)
            }
        );
        assert!(s.ping().await);
        assert!(s.ping_writable().await);
    }

    #[tokio::test]
    async fn the_store_answers_alike_on_sqlite() {
        exercise(&sqlite("exercise").await).await;
    }

    #[tokio::test]
    async fn the_store_answers_alike_on_postgres() {
        exercise(&postgres().await).await;
    }

    /// Tenant `tn_a`'s key number `n`, signed with `kid`.
    fn test_key(n: u64, kid: &str, expires_at: i64) -> KeyRow {
        KeyRow {
            seq: 0,
            id: new_sorted_id("key_", n),
            tenant_id: "tn_a".into(),
            kid: kid.into(),
            vendor: "stripe".into(),
            label: format!("k{n}"),
            allowed_endpoints: vec!["POST /v1/payment_intents".into()],
            daily_cap: Micros(5_000_000),
            metadata: serde_json::json!({}),
            stripe_accounts: None,
            created_at: 300,
            expires_at,
            revoked_at: None,
        }
    }

    /// Expired keys past their retention go with their ledger rows, a chunk at a time;
    /// keys not yet expired or expired later stay, and so does one whose ledger still has
    /// budget held by a lease (until the lease is given back).
    async fn prune(s: &Store) {
        s.insert_tenant("tn_a", "a", "tok_a", b"hash-a", 10)
            .await
            .unwrap();
        s.insert_signing_key("kid_1", b"sealed1", b"pub1", 100)
            .await
            .unwrap();
        s.insert_signing_key("kid_2", b"sealed2", b"pub2", 200)
            .await
            .unwrap();
        assert_eq!(s.signing_key_ids().await.unwrap(), ["kid_1", "kid_2"]);
        let key = test_key;
        // Three old keys of kid_1, one of them still holding a lease; one old key of
        // kid_2; one of kid_1 that expires at the cut-off and one after.
        let rows = vec![
            key(1, "kid_1", 400),
            key(2, "kid_1", 500),
            key(3, "kid_1", 600),
            key(4, "kid_2", 450),
            key(5, "kid_1", 1_000),
            key(6, "kid_1", 5_000),
        ];
        s.insert_keys(&rows).await.unwrap();
        for (r, held) in rows.iter().zip([0, 0, 7, 0, 0, 0]) {
            s.ledger_add(&r.id, 1, Micros(11), Micros(held))
                .await
                .unwrap();
            s.ledger_add(&r.id, 2, Micros(13), Micros::ZERO)
                .await
                .unwrap();
        }
        let exists = |i: usize| {
            let id = rows[i].id.clone();
            async move { s.get_key("tn_a", &id).await.unwrap().is_some() }
        };
        let ledger = |i: usize| {
            let id = rows[i].id.clone();
            async move { s.ledger_row(&id, 2).await.unwrap().settled }
        };

        assert_eq!(s.prune_expired_keys("kid_1", 1_000, 1).await.unwrap(), 1);
        assert!(!exists(0).await, "the oldest expiry goes first");
        assert!(exists(1).await);
        assert_eq!(s.prune_expired_keys("kid_1", 1_000, 10).await.unwrap(), 1);
        assert!(!exists(1).await);
        assert!(exists(2).await, "a lease still holds budget on it");
        assert!(exists(3).await, "another signing key's");
        assert!(
            exists(4).await && exists(5).await,
            "not expired before the cut-off"
        );
        assert_eq!(
            ledger(0).await,
            Micros::ZERO,
            "its ledger rows went with it"
        );
        assert_eq!(
            s.ledger_row(&rows[0].id, 1).await.unwrap().settled,
            Micros::ZERO
        );
        assert_eq!(ledger(2).await, Micros(13));
        assert_eq!(ledger(4).await, Micros(13));
        assert_eq!(s.prune_expired_keys("kid_1", 1_000, 10).await.unwrap(), 0);

        // The lease given back: the key goes on the next round.
        s.ledger_add(&rows[2].id, 1, Micros::ZERO, Micros(-7))
            .await
            .unwrap();
        assert_eq!(s.prune_expired_keys("kid_1", 1_000, 10).await.unwrap(), 1);
        assert!(!exists(2).await);
        assert_eq!(s.prune_expired_keys("kid_2", 1_000, 10).await.unwrap(), 1);
        assert!(!exists(3).await);
        assert!(exists(4).await && exists(5).await);
        assert_eq!(ledger(5).await, Micros(13));
    }

    #[tokio::test]
    async fn expired_keys_are_deleted_with_their_ledger_rows_on_sqlite() {
        prune(&sqlite("prune").await).await;
    }

    #[tokio::test]
    async fn expired_keys_are_deleted_with_their_ledger_rows_on_postgres() {
        prune(&postgres().await).await;
    }

    /// A reader that holds an old snapshot keeps the checkpoint from copying what was
    /// written after it: the backlog gauge shows it, and drops to 0 once the reader ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wal_backlog_shows_a_reader_holding_an_old_snapshot() {
        let dir = temp_dir("backlog-test");
        let store = Store::open(&Database::Sqlite {
            data_dir: dir.clone(),
        })
        .await
        .unwrap();
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
        let Backend::Sqlite { reader, .. } = &store.backend else {
            unreachable!()
        };
        let mut reader = reader.begin().await.unwrap();
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
        let store = Store::open(&Database::Sqlite {
            data_dir: dir.clone(),
        })
        .await
        .unwrap();
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
