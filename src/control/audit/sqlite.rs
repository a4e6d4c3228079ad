//! The audit trail, in its own SQLite file (`audit.db` in the data dir) so that proxy
//! traffic and key issuance never queue for the same write lock.
//!
//! Write side: the proxy hands events to `AuditTrail::record`, which never blocks (a short
//! lock and a push onto a bounded buffer; when full, the event is counted as dropped). One
//! OS thread owns the only write connection: every LINGER it swaps the buffer out and
//! inserts it with a cached prepared statement, one transaction per BATCH events. A plain
//! thread and a synchronous connection rather than an async pool: a batch then costs no
//! hand-off between runtime and database threads per statement, and SQLite's own
//! checkpoints run on this thread, beside the proxy's work rather than in its way. Rows
//! carry no per-row index; each batch adds one span per key and per tenant (see SCHEMA).
//!
//! Read side: `list` through a small read-only pool (WAL readers never block the writer),
//! walking the owner's spans newest first.

use crate::metrics::Metrics;
use crate::money::Micros;
use crate::sync::{AuditEvent, AuditSink};
use anyhow::{Context, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const QUEUE: usize = 65_536;
/// Room for ~10 ms of events at tens of thousands of requests per second, so the buffer
/// rarely grows (and copies) while a request holds the lock.
const INITIAL: usize = 1_024;
/// At most this many events per transaction, and at most LINGER between an event and its
/// write.
const BATCH: usize = 256;
const LINGER: Duration = Duration::from_millis(10);
/// A writer with no finished pass for this long is reported not ready.
const STALLED: Duration = Duration::from_secs(10);

pub const FILE: &str = "audit.db";

/// The trail's schema, its only definition. `seq` orders the trail and is the cursor of
/// `list`. Rows are never deleted, so SQLite's rowid (largest + 1) only grows; without
/// AUTOINCREMENT an insert does not also update `sqlite_sequence`. `model` and the token
/// counts are those of LLM calls (NULL for other calls).
///
/// No per-row index: a key's (and a tenant's) events are found through spans, one row per
/// key (and per tenant) per written batch: `[first_seq, last_seq]` holds every event of
/// that key in the batch, mixed with other keys' events of the same batch. A batch is a
/// contiguous `seq` range (one IMMEDIATE transaction), so one owner's spans never overlap.
/// Two index entries per event made up most of the writer's work (each insert a B-tree
/// descent with string compares and a dirtied page per key); one span per key per batch
/// costs a fraction.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    tenant_id TEXT,
    key_id TEXT,
    label TEXT,
    vendor TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    decision TEXT NOT NULL,
    spend INTEGER NOT NULL,
    vendor_request_id TEXT,
    duration_ms INTEGER NOT NULL,
    model TEXT,
    input_tokens INTEGER,
    cached_input_tokens INTEGER,
    cache_write_tokens INTEGER,
    output_tokens INTEGER
);
CREATE TABLE IF NOT EXISTS tenant_spans (
    tenant_id TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    max_ts_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, last_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_spans (
    tenant_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    max_ts_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, key_id, last_seq)
) WITHOUT ROWID;
";

/// The columns an insert writes, in `insert`'s parameter order.
pub const INSERT: &str = "INSERT INTO audit (ts_ms, tenant_id, key_id, label, vendor, method, \
     path, status, decision, spend, vendor_request_id, duration_ms, model, input_tokens, \
     cached_input_tokens, cache_write_tokens, output_tokens) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";

pub struct AuditTrail {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    reader: SqlitePool,
    strict: bool,
}

struct Shared {
    pending: Mutex<Vec<AuditEvent>>,
    /// Events taken into `pending` so far, counted under its lock: an event's ticket is
    /// the count after it, and events are written in ticket order.
    recorded: std::sync::atomic::AtomicU64,
    passes: Mutex<Passes>,
    pass_done: Condvar,
    /// Strict mode: wakes the writer as soon as an event waits for it.
    work: Condvar,
}

struct Passes {
    /// Write passes completed so far; `flush` waits for the count to move on.
    done: u64,
    /// When the last one ended, for readiness.
    at: Instant,
    /// Every ticket up to this one was written (committed), or given up on and listed in
    /// `failed`.
    durable: u64,
    /// Ticket ranges (first, last) of batches given up on, the latest few.
    failed: std::collections::VecDeque<(u64, u64)>,
}

impl AuditTrail {
    /// Opens (or creates) `audit.db` and starts the writer.
    pub async fn open(
        data_dir: &Path,
        metrics: Arc<Metrics>,
        durability: crate::config::AuditDurability,
    ) -> Result<AuditTrail> {
        let strict = durability == crate::config::AuditDurability::Strict;
        crate::secret::private_dir(data_dir)
            .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
        let path = data_dir.join(FILE);
        crate::secret::private_file(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let conn = open_writer(&path, strict)
            .with_context(|| format!("cannot open the audit database {}", path.display()))?;
        let reader = SqlitePoolOptions::new()
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
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(INITIAL)),
            recorded: Default::default(),
            passes: Mutex::new(Passes {
                done: 0,
                at: Instant::now(),
                durable: 0,
                failed: Default::default(),
            }),
            pass_done: Condvar::new(),
            work: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let thread_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer_loop(conn, strict, &thread_shared, &thread_metrics))
            .context("cannot start the audit writer thread")?;
        Ok(AuditTrail {
            shared,
            metrics,
            reader,
            strict,
        })
    }

    /// Waits until every event recorded before the call is written (or given up on), at
    /// most `timeout`. Called once the proxy has stopped, before the process exits, so the
    /// last requests of a shutdown or upgrade are in the trail. False on timeout.
    pub fn flush(&self, timeout: Duration) -> bool {
        let passes = lock(&self.shared.passes);
        // The pass running now may have swapped the buffer out before our events arrived;
        // the one after it starts after this call, so it takes them.
        let target = passes.done + 2;
        self.shared.work.notify_one();
        let (passes, wait) = self
            .shared
            .pass_done
            .wait_timeout_while(passes, timeout, |p| p.done < target)
            .unwrap_or_else(|p| p.into_inner());
        drop(passes);
        !wait.timed_out()
    }

    /// The tenant's events, newest first: those with `seq < before_seq` and `ts_ms >=
    /// since_ms`, for one key or all.
    pub async fn list(
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
        let mut conn = self.reader.acquire().await?;
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

    /// What the trail records as spent by one key on one UTC day.
    pub async fn spend_of_key(&self, tenant_id: &str, key_id: &str, day: i64) -> Result<Micros> {
        let from = day.saturating_mul(86_400_000);
        let to = from.saturating_add(86_400_000);
        let total: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(a.spend), 0) FROM key_spans s
             JOIN audit a ON a.seq BETWEEN s.first_seq AND s.last_seq
             WHERE s.tenant_id = ?1 AND s.key_id = ?2 AND s.max_ts_ms >= ?3
               AND a.key_id = ?2 AND a.ts_ms >= ?3 AND a.ts_ms < ?4",
        )
        .bind(tenant_id)
        .bind(key_id)
        .bind(from)
        .bind(to)
        .fetch_one(&self.reader)
        .await?;
        Ok(Micros(total))
    }

    /// For readiness: the audit database answers reads, and the writer finished a pass
    /// within STALLED (it normally does every LINGER; a file it cannot write keeps it in
    /// retries of 5 s each, and a writer thread that died never finishes one again).
    pub async fn ping(&self) -> bool {
        let last_pass = lock(&self.shared.passes).at;
        last_pass.elapsed() < STALLED
            && sqlx::query("SELECT 1 FROM audit LIMIT 1")
                .execute(&self.reader)
                .await
                .is_ok()
    }
}

impl AuditTrail {
    /// Queues the event; its ticket, or None when the queue was full (dropped).
    fn push(&self, event: AuditEvent) -> Option<u64> {
        let mut pending = lock(&self.shared.pending);
        if pending.len() < QUEUE {
            pending.push(event);
            let ticket = self
                .shared
                .recorded
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
                + 1;
            drop(pending);
            self.metrics.audit_queue_depth.inc();
            Some(ticket)
        } else {
            drop(pending);
            self.metrics.audit_dropped.inc();
            None
        }
    }
}

impl AuditSink for AuditTrail {
    fn record(&self, event: AuditEvent) {
        let _ = self.push(event);
    }

    fn is_strict(&self) -> bool {
        self.strict
    }

    /// Blocks the calling thread until the event is committed (and, in strict mode,
    /// synced), at most `timeout`. The writer commits whatever is queued as soon as the
    /// previous commit ends: concurrent callers share one commit (group commit).
    fn record_durably(&self, event: AuditEvent, timeout: Duration) -> bool {
        let Some(ticket) = self.push(event) else {
            return false;
        };
        self.shared.work.notify_one();
        let passes = lock(&self.shared.passes);
        let (passes, wait) = self
            .shared
            .pass_done
            .wait_timeout_while(passes, timeout, |p| p.durable < ticket)
            .unwrap_or_else(|p| p.into_inner());
        !wait.timed_out()
            && !passes
                .failed
                .iter()
                .any(|&(first, last)| (first..=last).contains(&ticket))
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// WAL + NORMAL as for the store: a commit survives a process crash. SQLite checkpoints
/// the WAL itself every 1,000 pages, inside this thread's commits.
fn open_writer(path: &Path, strict: bool) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // Strict: every commit is synced (FULL), so an event is kept through an OS crash too.
    conn.pragma_update(None, "synchronous", if strict { "FULL" } else { "NORMAL" })?;
    conn.pragma_update(None, "journal_size_limit", 16 << 20)?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

fn writer_loop(mut conn: rusqlite::Connection, strict: bool, shared: &Shared, metrics: &Metrics) {
    let mut batch = Vec::with_capacity(INITIAL);
    loop {
        if strict {
            // Group commit: write as soon as something waits, and whatever queued up
            // during the previous commit goes together in the next.
            let pending = lock(&shared.pending);
            drop(
                shared
                    .work
                    .wait_timeout_while(pending, LINGER, |p| p.is_empty())
                    .unwrap_or_else(|p| p.into_inner()),
            );
        } else {
            std::thread::sleep(LINGER);
        }
        let taken_through = {
            let mut pending = lock(&shared.pending);
            std::mem::swap(&mut *pending, &mut batch);
            shared.recorded.load(std::sync::atomic::Ordering::Acquire)
        };
        let mut first_ticket = taken_through + 1 - batch.len() as u64;
        let mut failed = Vec::new();
        for chunk in batch.chunks(BATCH) {
            if !write_with_retries(&mut conn, chunk) {
                metrics.audit_dropped.inc_by(chunk.len() as u64);
                failed.push((first_ticket, first_ticket + chunk.len() as u64 - 1));
            }
            first_ticket += chunk.len() as u64;
            metrics.audit_queue_depth.sub(chunk.len() as i64);
        }
        batch.clear();
        // A burst grew the buffer: give the memory back rather than keep it.
        batch.shrink_to(INITIAL);
        {
            let mut passes = lock(&shared.passes);
            passes.done += 1;
            passes.at = Instant::now();
            passes.durable = taken_through;
            for range in failed {
                if passes.failed.len() == 64 {
                    passes.failed.pop_front();
                }
                passes.failed.push_back(range);
            }
        }
        shared.pass_done.notify_all();
    }
}

/// A failed batch is retried a few times; the file is local, so a failure here means the
/// disk is gone, which readiness will show. False when the events were lost.
fn write_with_retries(conn: &mut rusqlite::Connection, events: &[AuditEvent]) -> bool {
    for attempt in 0..3 {
        match insert(conn, events) {
            Ok(()) => return true,
            Err(e) => {
                log::error!(
                    "audit batch of {} events not written (attempt {}): {e}",
                    events.len(),
                    attempt + 1
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    false
}

fn insert(conn: &mut rusqlite::Connection, events: &[AuditEvent]) -> rusqlite::Result<()> {
    // IMMEDIATE: the write lock from the start, so the batch's rows get contiguous `seq`s
    // even with another writer on the file (the other side of a graceful upgrade).
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut spans = Spans::default();
    {
        let mut stmt = tx.prepare_cached(INSERT)?;
        for e in events {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: i64) -> AuditEvent {
        AuditEvent {
            ts_ms: 1_700_000_000_000 + n,
            tenant_id: Some("ten_a".into()),
            key_id: Some(if n % 2 == 0 { "key_even" } else { "key_odd" }.into()),
            label: Some("l".into()),
            vendor: "stripe".into(),
            method: "POST".into(),
            path: "/stripe/v1/payment_intents".into(),
            status: 200,
            decision: "allowed".into(),
            spend: Micros(n),
            vendor_request_id: Some(format!("req_{n}")),
            duration_ms: 3,
            llm: None,
        }
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("keybrake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn recorded_events_are_listed_newest_first_after_a_flush_and_survive_reopening() {
        let dir = temp_dir("audit-list");
        let metrics = Metrics::global();
        let trail = AuditTrail::open(&dir, metrics.clone(), Default::default())
            .await
            .unwrap();
        for n in 0..600 {
            trail.record(event(n));
        }
        assert!(trail.flush(Duration::from_secs(10)));
        let all = trail.list("ten_a", None, 0, i64::MAX, 1000).await.unwrap();
        assert_eq!(all.len(), 600);
        assert_eq!(all[0].1.spend, Micros(599));
        assert!(all.windows(2).all(|w| w[0].0 > w[1].0));
        let odd = trail
            .list("ten_a", Some("key_odd"), 0, i64::MAX, 1000)
            .await
            .unwrap();
        assert_eq!(odd.len(), 300);
        assert!(odd
            .iter()
            .all(|(_, e)| e.key_id.as_deref() == Some("key_odd")));
        assert!(trail
            .list("ten_b", None, 0, i64::MAX, 10)
            .await
            .unwrap()
            .is_empty());

        let again = AuditTrail::open(&dir, metrics, Default::default())
            .await
            .unwrap();
        assert_eq!(
            again
                .list("ten_a", None, 0, i64::MAX, 1000)
                .await
                .unwrap()
                .len(),
            600
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_writer_that_cannot_write_makes_the_trail_not_ready_until_it_can() {
        let dir = temp_dir("audit-stalled");
        let trail = AuditTrail::open(&dir, Metrics::global(), Default::default())
            .await
            .unwrap();
        assert!(trail.ping().await);
        // Another connection holds the write lock: every insert waits out the busy
        // timeout (5 s), three times, before the batch is given up.
        let blocker = rusqlite::Connection::open(dir.join(FILE)).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        trail.record(event(1));
        tokio::time::sleep(STALLED + Duration::from_secs(1)).await;
        let stalled = trail.ping().await;
        blocker.execute_batch("ROLLBACK").unwrap();
        let mut recovered = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if trail.ping().await {
                recovered = true;
                break;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            !stalled,
            "ready while the writer could not write for {STALLED:?}"
        );
        assert!(recovered, "not ready again after the lock was released");
    }

    /// Every page of every listing (per tenant, per key, with and without `since`, walked
    /// through the cursor) equals the brute-force answer, with events of several tenants
    /// and keys interleaved over many batches, some written by a second writer of the same
    /// file (the other side of a graceful upgrade).
    #[tokio::test]
    async fn listings_through_spans_match_a_scan_of_every_event() {
        let dir = temp_dir("audit-spans");
        let metrics = Metrics::global();
        let mut all: Vec<(i64, AuditEvent)> = Vec::new();
        let mixed = |n: i64| {
            let mut e = event(n);
            e.tenant_id = Some(["ten_a", "ten_b"][(n % 2) as usize].into());
            e.key_id = match n % 7 {
                0 => None,
                k => Some(format!("key_{}", k % 3 + 3 * (n % 2)).into()),
            };
            e.ts_ms = 1_700_000_000_000 + (n * 37) % 1000;
            e
        };
        let trail = AuditTrail::open(&dir, metrics.clone(), Default::default())
            .await
            .unwrap();
        let mut seq = 0;
        for n in 0..1500 {
            if n == 700 {
                // The other process writes between two of our batches.
                assert!(trail.flush(Duration::from_secs(10)));
                let other = AuditTrail::open(&dir, metrics.clone(), Default::default())
                    .await
                    .unwrap();
                for m in 0..300 {
                    let mut e = mixed(n + m);
                    e.spend = Micros(1_000_000 + m);
                    other.record(e.clone());
                    seq += 1;
                    all.push((seq, e));
                }
                assert!(other.flush(Duration::from_secs(10)));
            }
            trail.record(mixed(n));
            seq += 1;
            all.push((seq, mixed(n)));
            if n % 97 == 0 {
                assert!(trail.flush(Duration::from_secs(10)));
            }
        }
        assert!(trail.flush(Duration::from_secs(10)));
        for tenant in ["ten_a", "ten_b"] {
            for key in [None, Some("key_1"), Some("key_4"), Some("key_9")] {
                for since in [0, 1_700_000_000_500] {
                    let expected: Vec<(i64, i64)> = all
                        .iter()
                        .rev()
                        .filter(|(_, e)| e.tenant_id.as_deref() == Some(tenant))
                        .filter(|(_, e)| key.is_none() || e.key_id.as_deref() == key)
                        .filter(|(_, e)| e.ts_ms >= since)
                        .map(|(seq, e)| (*seq, e.spend.0))
                        .collect();
                    let mut got = Vec::new();
                    let mut before = i64::MAX;
                    loop {
                        let page = trail.list(tenant, key, since, before, 37).await.unwrap();
                        got.extend(page.iter().map(|(seq, e)| (*seq, e.spend.0)));
                        match page.last() {
                            Some((seq, _)) if page.len() == 37 => before = *seq,
                            _ => break,
                        }
                    }
                    assert_eq!(got, expected, "{tenant} {key:?} since {since}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn llm_model_and_tokens_are_kept() {
        let dir = temp_dir("audit-llm");
        let trail = AuditTrail::open(&dir, Metrics::global(), Default::default())
            .await
            .unwrap();
        let mut e = event(1);
        e.llm = Some(crate::sync::LlmAudit {
            model: "gpt-4o-mini".into(),
            input_tokens: Some(20),
            cached_input_tokens: Some(4),
            cache_write_tokens: Some(0),
            output_tokens: Some(7),
        });
        trail.record(e);
        trail.record(event(2));
        assert!(trail.flush(Duration::from_secs(10)));
        let rows = trail.list("ten_a", None, 0, i64::MAX, 10).await.unwrap();
        assert!(rows[0].1.llm.is_none());
        let llm = rows[1].1.llm.clone().unwrap();
        assert_eq!(llm.model, "gpt-4o-mini");
        assert_eq!(
            (llm.input_tokens, llm.cached_input_tokens, llm.output_tokens),
            (Some(20), Some(4), Some(7))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
