//! The audit trail in SQLite: `audit.db` in the data dir, its own file so that proxy
//! traffic and key issuance never queue for the same write lock.
//!
//! `Writer` is the writer thread's only connection (`rusqlite`, a cached prepared insert,
//! one IMMEDIATE transaction per batch: a batch then costs no hand-off between runtime and
//! database threads per statement, see docs/storage.md). Rows carry no per-row index; each
//! batch adds one span per key and per tenant (see SCHEMA). `Reader` answers `list` and
//! `spend_of_key` through a small read-only `sqlx` pool (WAL readers never block the
//! writer), walking the owner's spans newest first.

use super::{BatchWriter, Marked, WriteError};
use crate::money::Micros;
use crate::sync::AuditEvent;
use anyhow::{Context, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub const FILE: &str = "audit.db";

/// The trail's schema versions on SQLite, in order (`PRAGMA user_version` of `audit.db`
/// counts those applied); PostgreSQL's are `postgres::MIGRATIONS`, kept in step.
pub const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/sqlite/audit/0001_audit.sql"),
    include_str!("../../../migrations/sqlite/audit/0002_node_batches.sql"),
];

/// The `audit` table and its spans (version 1): what the audit benchmarks write to.
pub const SCHEMA: &str = MIGRATIONS[0];

/// The columns an insert writes, in `insert`'s parameter order.
pub const INSERT: &str = "INSERT INTO audit (ts_ms, tenant_id, key_id, label, vendor, method, \
     path, status, decision, spend, vendor_request_id, duration_ms, model, input_tokens, \
     cached_input_tokens, cache_write_tokens, output_tokens) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";

/// Opens (or creates) `audit.db` in the data dir: the writer's connection and the readers'.
pub(super) async fn open(data_dir: &Path, strict: bool) -> Result<(Writer, Reader)> {
    crate::secret::private_dir(data_dir)
        .with_context(|| format!("cannot use data dir {}", data_dir.display()))?;
    let path = data_dir.join(FILE);
    if path.metadata().is_ok_and(|m| m.len() > 0) && !has_audit_table(&path) {
        log::warn!(
            "{} exists but holds no audit trail: a new one is started. If it was restored \
             from a copy taken without its -wal file, the events were in that file \
             (docs/storage.md, Backups)",
            path.display()
        );
    }
    crate::secret::private_file(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let conn = open_writer(&path, strict)
        .with_context(|| format!("cannot open the audit database {}", path.display()))?;
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(5))
                .read_only(true),
        )
        .await
        .context("cannot open the audit database for reading")?;
    Ok((
        Writer {
            conn,
            pruned_at: None,
        },
        Reader(pool),
    ))
}

pub(super) struct Writer {
    conn: rusqlite::Connection,
    /// When `node_batches` was last pruned (`super::prune_due`).
    pruned_at: Option<std::time::Instant>,
}

impl BatchWriter for Writer {
    /// Every failure counts as a refusal: the file is local, so it means the disk (or a
    /// lock held past the busy timeout), not a connection to wait for.
    fn write(&mut self, events: &[AuditEvent], batches: &[Marked]) -> Result<(), WriteError> {
        let prune = super::prune_due(&mut self.pruned_at);
        insert(&mut self.conn, events, batches, prune).map_err(|e| WriteError::Refused(e.into()))
    }

    /// PASSIVE: copies what no reader still needs, never waits for one.
    fn checkpoint(&mut self) {
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            static LOG: crate::log_every::LogEvery =
                crate::log_every::LogEvery::new(Duration::from_secs(60));
            if LOG.due().is_some() {
                log::warn!("cannot checkpoint the audit database: {e}");
            }
        }
    }
}

pub(super) struct Reader(SqlitePool);

impl Reader {
    pub(super) async fn list(
        &self,
        tenant_id: &str,
        key_id: Option<&str>,
        since_ms: i64,
        before_seq: i64,
        limit: i64,
    ) -> Result<Vec<(i64, AuditEvent)>> {
        // The owner's spans, newest first, a page at a time; each span's rows newest first.
        // Spans of one owner never overlap, so the concatenation is in `seq` order. A key's
        // spans are looked up under the caller's tenant: another tenant's key has none.
        const SPANS_PER_PAGE: i64 = 64;
        let (spans_query, straddling_query) = match key_id {
            Some(_) => (
                "SELECT first_seq, last_seq FROM key_spans WHERE tenant_id = ?1 AND key_id = ?2
                 AND last_seq < ?3 AND max_ts_ms >= ?4 ORDER BY last_seq DESC LIMIT ?5",
                "SELECT first_seq, last_seq FROM key_spans WHERE tenant_id = ?1 AND key_id = ?2
                 AND last_seq >= ?3 ORDER BY last_seq LIMIT 1",
            ),
            None => (
                "SELECT first_seq, last_seq FROM tenant_spans WHERE tenant_id = ?1 AND ?2 IS NULL
                 AND last_seq < ?3 AND max_ts_ms >= ?4 ORDER BY last_seq DESC LIMIT ?5",
                "SELECT first_seq, last_seq FROM tenant_spans WHERE tenant_id = ?1 AND ?2 IS NULL
                 AND last_seq >= ?3 ORDER BY last_seq LIMIT 1",
            ),
        };
        let mut conn = self.0.acquire().await?;
        let mut out = Vec::new();
        // A cursor can fall inside one span (the only one with first_seq < before_seq <=
        // last_seq); the spans entirely below it are then found from the index directly.
        let mut spans: Vec<(i64, i64)> = sqlx::query_as(straddling_query)
            .bind(tenant_id)
            .bind(key_id)
            .bind(before_seq)
            .fetch_all(&mut *conn)
            .await?;
        spans.retain(|&(first, _)| first < before_seq);
        let mut below = before_seq;
        let mut more = true;
        loop {
            for &(first, last) in &spans {
                let rows = sqlx::query(
                    "SELECT * FROM audit WHERE seq >= ?1 AND seq <= ?2 AND seq < ?3
                     AND tenant_id = ?4 AND (?5 IS NULL OR key_id = ?5) AND ts_ms >= ?6
                     ORDER BY seq DESC LIMIT ?7",
                )
                .bind(first)
                .bind(last)
                .bind(before_seq)
                .bind(tenant_id)
                .bind(key_id)
                .bind(since_ms)
                .bind(limit - out.len() as i64)
                .fetch_all(&mut *conn)
                .await?;
                out.extend(rows.iter().map(event_of_row));
                if out.len() as i64 >= limit {
                    return Ok(out);
                }
            }
            if !more {
                return Ok(out);
            }
            spans = sqlx::query_as(spans_query)
                .bind(tenant_id)
                .bind(key_id)
                .bind(below)
                .bind(since_ms)
                .bind(SPANS_PER_PAGE)
                .fetch_all(&mut *conn)
                .await?;
            more = spans.len() as i64 == SPANS_PER_PAGE;
            if let Some(&(_, last)) = spans.last() {
                below = last;
            }
        }
    }

    /// The key's spend over `[from_ms, to_ms)`.
    pub(super) async fn spend_of_key(
        &self,
        tenant_id: &str,
        key_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Micros> {
        let total: i64 = sqlx::query_scalar(
            // total() never overflows (sum() would fail the query): exact below 2^53
            // micro-USD ($9e9), saturated at 2^62 (as the ledger's settled spend).
            "SELECT CAST(min(total(a.spend), 4611686018427387904.0) AS INTEGER) FROM key_spans s
             JOIN audit a ON a.seq BETWEEN s.first_seq AND s.last_seq
             WHERE s.tenant_id = ?1 AND s.key_id = ?2 AND s.max_ts_ms >= ?3
               AND a.key_id = ?2 AND a.ts_ms >= ?3 AND a.ts_ms < ?4",
        )
        .bind(tenant_id)
        .bind(key_id)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_one(&self.0)
        .await?;
        Ok(Micros(total))
    }

    pub(super) async fn ping(&self) -> bool {
        sqlx::query("SELECT 1 FROM audit LIMIT 1")
            .execute(&self.0)
            .await
            .is_ok()
    }
}

fn event_of_row(r: &sqlx::sqlite::SqliteRow) -> (i64, AuditEvent) {
    (
        r.get("seq"),
        AuditEvent {
            ts_ms: r.get("ts_ms"),
            tenant_id: r.get::<Option<&str>, _>("tenant_id").map(Into::into),
            key_id: r.get::<Option<&str>, _>("key_id").map(Into::into),
            label: r.get::<Option<&str>, _>("label").map(Into::into),
            vendor: r.get("vendor"),
            method: r.get("method"),
            path: r.get("path"),
            status: r.get::<i64, _>("status") as u16,
            decision: r.get("decision"),
            spend: Micros(r.get("spend")),
            vendor_request_id: r.get("vendor_request_id"),
            duration_ms: r.get::<i64, _>("duration_ms") as u64,
            llm: r
                .get::<Option<String>, _>("model")
                .map(|model| crate::sync::LlmAudit {
                    model,
                    input_tokens: tokens(r, "input_tokens"),
                    cached_input_tokens: tokens(r, "cached_input_tokens"),
                    cache_write_tokens: tokens(r, "cache_write_tokens"),
                    output_tokens: tokens(r, "output_tokens"),
                }),
        },
    )
}

fn tokens(r: &sqlx::sqlite::SqliteRow, column: &str) -> Option<u64> {
    r.get::<Option<i64>, _>(column).map(|n| n.max(0) as u64)
}

/// Whether the database file at `path` has the `audit` table (true when it cannot be
/// read: that is for the writer's open to report).
fn has_audit_table(path: &Path) -> bool {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return true;
    };
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit')",
        [],
        |r| r.get::<_, bool>(0),
    )
    .unwrap_or(true)
}

/// WAL + NORMAL as for the store: a commit survives a process crash. SQLite checkpoints
/// the WAL itself every 1,000 pages, inside this thread's commits.
fn open_writer(path: &Path, strict: bool) -> Result<rusqlite::Connection> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Strict: every commit is synced (FULL), so an event is kept through an OS crash too.
    conn.pragma_update(None, "synchronous", if strict { "FULL" } else { "NORMAL" })?;
    conn.pragma_update(None, "journal_size_limit", 16 << 20)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Applies the versions `audit.db` lacks; refuses one written by a newer keybrake.
pub fn migrate(conn: &mut rusqlite::Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let applied: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if applied > MIGRATIONS.len() as i64 {
        anyhow::bail!(
            "audit database schema version {applied} is newer than this keybrake (knows {}): \
             upgrade keybrake",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        tx.execute_batch(sql)
            .with_context(|| format!("audit migration {}", i + 1))?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

/// Writes `events` but those of node batches already written, marks the others written,
/// and with `prune` deletes the marks of sessions silent for a week, in one transaction.
fn insert(
    conn: &mut rusqlite::Connection,
    events: &[AuditEvent],
    batches: &[Marked],
    prune: Option<i64>,
) -> rusqlite::Result<()> {
    // IMMEDIATE: the write lock from the start, so the batch's rows get contiguous `seq`s
    // even with another writer on the file (the other side of a graceful upgrade).
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut spans = Spans::default();
    {
        let mut skip = Vec::new();
        let mut mark = tx.prepare_cached(super::MARK_NODE_BATCH)?;
        for m in batches {
            let number = m.batch.number.min(i64::MAX as u64) as i64;
            let now = crate::token::unix_ms() as i64;
            if mark.execute(rusqlite::params![m.batch.holder, number, now])? == 0 {
                skip.push(m.range.clone());
            }
        }
        if let Some(before) = prune {
            tx.execute("DELETE FROM node_batches WHERE at_ms < ?1", [before])?;
        }
        let mut stmt = tx.prepare_cached(INSERT)?;
        for (_, e) in events
            .iter()
            .enumerate()
            .filter(|(i, _)| !skip.iter().any(|r| r.contains(i)))
        {
            let llm = e.llm.as_ref();
            let n = |f: fn(&crate::sync::LlmAudit) -> Option<u64>| {
                llm.and_then(f).map(|n| n.min(i64::MAX as u64) as i64)
            };
            stmt.execute(rusqlite::params![
                e.ts_ms,
                e.tenant_id.as_deref(),
                e.key_id.as_deref(),
                e.label.as_deref(),
                e.vendor,
                e.method,
                e.path,
                e.status,
                e.decision,
                e.spend.0,
                e.vendor_request_id,
                e.duration_ms as i64,
                llm.map(|l| l.model.as_str()),
                n(|l| l.input_tokens),
                n(|l| l.cached_input_tokens),
                n(|l| l.cache_write_tokens),
                n(|l| l.output_tokens),
            ])?;
            spans.add(tx.last_insert_rowid(), e.ts_ms, &e.tenant_id, &e.key_id);
        }
    }
    spans.write(&tx)?;
    tx.commit()
}

/// Per tenant and per key, the first and last `seq` and the latest `ts_ms` of its events
/// among rows written together (see SCHEMA).
#[derive(Default)]
struct Spans {
    tenants: std::collections::HashMap<Arc<str>, Span>,
    /// Key id → (its tenant, span).
    keys: std::collections::HashMap<Arc<str>, (Arc<str>, Span)>,
    last: i64,
}

#[derive(Clone, Copy)]
struct Span {
    first: i64,
    last: i64,
    max_ts_ms: i64,
}

impl Spans {
    fn add(
        &mut self,
        seq: i64,
        ts_ms: i64,
        tenant_id: &Option<Arc<str>>,
        key_id: &Option<Arc<str>>,
    ) {
        self.last = self.last.max(seq);
        // Events without a tenant (refused before a key was verified) are listed by nobody.
        let Some(tenant) = tenant_id else {
            return;
        };
        let new = Span {
            first: seq,
            last: seq,
            max_ts_ms: ts_ms,
        };
        let extend = |span: &mut Span| {
            span.last = seq;
            span.max_ts_ms = span.max_ts_ms.max(ts_ms);
        };
        self.tenants
            .entry(tenant.clone())
            .and_modify(extend)
            .or_insert(new);
        if let Some(key) = key_id {
            self.keys
                .entry(key.clone())
                .and_modify(|(_, span)| extend(span))
                .or_insert((tenant.clone(), new));
        }
    }

    fn write(&self, tx: &rusqlite::Transaction) -> rusqlite::Result<()> {
        if self.last == 0 {
            return Ok(());
        }
        let mut tenant = tx.prepare_cached(
            "INSERT INTO tenant_spans (tenant_id, last_seq, first_seq, max_ts_ms) \
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (owner, span) in &self.tenants {
            tenant.execute(rusqlite::params![
                owner.as_ref(),
                span.last,
                span.first,
                span.max_ts_ms
            ])?;
        }
        let mut key = tx.prepare_cached(
            "INSERT INTO key_spans (tenant_id, key_id, last_seq, first_seq, max_ts_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (owner, (tenant, span)) in &self.keys {
            key.execute(rusqlite::params![
                tenant.as_ref(),
                owner.as_ref(),
                span.last,
                span.first,
                span.max_ts_ms
            ])?;
        }
        Ok(())
    }
}
