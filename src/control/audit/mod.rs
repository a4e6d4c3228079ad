//! The audit trail: every proxied or refused call as one event, kept in SQLite (`audit.db`
//! in the data dir, its own file so proxy traffic and key issuance never queue for the
//! same write lock) or in the control plane's PostgreSQL database.
//!
//! Write side (this file, the same for both backends): the proxy hands events to
//! `AuditTrail::record`, which never blocks (a short lock and a push onto a bounded
//! buffer; when full, the event is counted as dropped). One OS thread owns the only write
//! connection: every LINGER (at once in strict mode) it swaps the buffer out and writes
//! it, one transaction per BATCH events, through the backend's `BatchWriter`
//! (`sqlite::Writer`: rusqlite and spans; `postgres::Writer`: one multi-row insert). A
//! batch the database refuses is retried three times, then dropped and counted; a
//! database that cannot be reached (PostgreSQL gone) is retried, reconnecting, for as long
//! as it takes, while new events queue up to the bound.
//!
//! Read side: `list` (newest first, cursor, key and `since` filters) and `spend_of_key`,
//! answered identically by both backends (`sqlite::Reader` walks spans,
//! `postgres::Reader` uses plain indexes).

pub mod postgres;
pub mod sqlite;

pub use postgres::migrate as migrate_postgres;
pub use sqlite::{FILE, INSERT, SCHEMA};

use crate::metrics::Metrics;
use crate::money::Micros;
use crate::sync::{AuditEvent, AuditSink};
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const QUEUE: usize = 65_536;
/// Room for ~10 ms of events at tens of thousands of requests per second, so the buffer
/// rarely grows (and copies) while a request holds the lock.
const INITIAL: usize = 1_024;
/// At most this many events per transaction (stretched to the end of a node batch that
/// starts within them: a node batch is written whole), and at most LINGER between an
/// event and its write.
const BATCH: usize = 256;
const LINGER: Duration = Duration::from_millis(10);
/// A writer with no finished pass for this long is reported not ready.
const STALLED: Duration = Duration::from_secs(10);
/// A writer that has not ended a pass for this long is stuck (`AuditSink::is_failing`):
/// as long as a strict response waits for its event (`STRICT_AUDIT_TIMEOUT`), so a slow
/// but working disk is waited for, and one that keeps every answer back stops forwarding.
const STRICT_STUCK: Duration = Duration::from_secs(5);
/// How long after a pass last gave events up a strict trail counts as failing.
const STRICT_HOLD: Duration = Duration::from_secs(5);

pub struct AuditTrail {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    reader: Reader,
    strict: bool,
}

enum Reader {
    Sqlite(sqlite::Reader),
    Postgres(postgres::Reader),
}

/// Why a batch was not written.
enum WriteError {
    /// The database cannot be reached: retried, reconnecting, until it can.
    Unreachable(anyhow::Error),
    /// The database refused this batch: retried a few times, then dropped.
    Refused(anyhow::Error),
}

/// The backend's one write connection, owned by the writer thread.
trait BatchWriter: Send + 'static {
    /// Writes the events in one transaction, giving them increasing `seq`s in order. The
    /// events of a node batch in `batches` that is already written (`node_batches`) are
    /// left out, and each other one is marked written in the same transaction.
    fn write(&mut self, events: &[AuditEvent], batches: &[Marked]) -> Result<(), WriteError>;

    /// Copies what is committed into the database file itself (SQLite: from the WAL),
    /// so that the file alone holds the trail: a backup that copies it without its WAL
    /// loses nothing older than the last checkpoint. Nothing to do on PostgreSQL.
    fn checkpoint(&mut self) {}
}

/// Under steady writes, the writer checkpoints this often; once writes pause for
/// CHECKPOINT_IDLE, then. Each is a copy of the new WAL pages and a sync or two: a few
/// a second at most, off the path of anyone waiting for a write (`writer_loop`).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
const CHECKPOINT_IDLE: Duration = Duration::from_millis(250);

/// A node's audit batch as the node numbered it (docs/api.md, `/v1/sync/audit`): written
/// once however often it arrives, on any replica. A node session sends its batches one at
/// a time, numbered from 1, so the highest number written per session is all that is kept
/// (table `node_batches`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeBatch {
    /// The node session that sent it.
    pub holder: String,
    pub number: u64,
}

/// A node batch among the events of one `BatchWriter::write`: their indices.
struct Marked<'a> {
    range: std::ops::Range<usize>,
    batch: &'a NodeBatch,
}

/// Rows of `node_batches` not updated for this long are deleted: a node resends a batch
/// within seconds of a lost answer, never a week later.
const NODE_BATCHES_KEPT_MS: i64 = 7 * 24 * 3600 * 1000;

/// Marks a node batch written, in the transaction that writes its events: changes one
/// row, or none when that batch (or a later one of its session) is already written and
/// its events must be left out. The same text on both backends.
const MARK_NODE_BATCH: &str = "INSERT INTO node_batches (holder, last_batch, at_ms) \
     VALUES ($1, $2, $3) ON CONFLICT (holder) DO UPDATE \
     SET last_batch = excluded.last_batch, at_ms = excluded.at_ms \
     WHERE node_batches.last_batch < excluded.last_batch";

/// Once an hour a write also deletes the `node_batches` rows older than a week: the cutoff
/// (Unix ms) when that is due now.
fn prune_due(last: &mut Option<Instant>) -> Option<i64> {
    if last.is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
        return None;
    }
    *last = Some(Instant::now());
    Some(crate::token::unix_ms() as i64 - NODE_BATCHES_KEPT_MS)
}

/// What waits for the writer: events in ticket order, and the node batches among them.
#[derive(Default)]
struct Queue {
    events: Vec<AuditEvent>,
    /// Each node batch queued, with the tickets of its first and last event.
    batches: Vec<(u64, u64, NodeBatch)>,
    /// The node batches of the pass being written, until it ends (the writer's copy of
    /// its `batches`, kept here so a batch sent again meanwhile waits for that pass).
    writing: Vec<(u64, u64, NodeBatch)>,
}

struct Shared {
    pending: Mutex<Queue>,
    /// Events taken into `pending` so far, counted under its lock: an event's ticket is
    /// the count after it, and events are written in ticket order.
    recorded: std::sync::atomic::AtomicU64,
    passes: Mutex<Passes>,
    pass_done: Condvar,
    /// Strict mode: wakes the writer as soon as an event waits for it.
    work: Condvar,
    /// Set by `flush` (the process is stopping): every pass from then on checkpoints
    /// before it counts as done.
    stopping: std::sync::atomic::AtomicBool,
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
    /// When the last pass that had events to write gave some up (a full disk, a
    /// database that refuses writes); `None` once one wrote all of its events. Not ready
    /// for STALLED after it: a proxy that drops its audit events leaves the rotation.
    dropped_at: Option<Instant>,
    /// When a pass last gave events up, whatever passes did after it: a full disk takes
    /// some writes and refuses others (a checkpointed WAL is written again from its start),
    /// so one write that fits says little (`AuditSink::is_failing`).
    failed_at: Option<Instant>,
}

impl Passes {
    /// `AuditSink::is_failing`, for a strict trail.
    fn strict_failing(&self) -> bool {
        self.failed_at.is_some_and(|t| t.elapsed() < STRICT_HOLD)
            || self.at.elapsed() >= STRICT_STUCK
    }
}

impl AuditTrail {
    /// Opens the trail where the control plane keeps its data (`audit.db` beside
    /// `keybrake.db`, or the same PostgreSQL database) and starts the writer.
    pub async fn open(
        database: &crate::database::Database,
        metrics: Arc<Metrics>,
        durability: crate::config::AuditDurability,
    ) -> Result<AuditTrail> {
        match database {
            crate::database::Database::Sqlite { data_dir } => {
                Self::open_sqlite(data_dir, metrics, durability).await
            }
            crate::database::Database::Postgres { url } => {
                Self::open_postgres(url.expose(), metrics, durability).await
            }
        }
    }

    /// Opens (or creates) `audit.db` in the data dir and starts the writer.
    pub async fn open_sqlite(
        data_dir: &Path,
        metrics: Arc<Metrics>,
        durability: crate::config::AuditDurability,
    ) -> Result<AuditTrail> {
        let strict = durability == crate::config::AuditDurability::Strict;
        let (writer, reader) = sqlite::open(data_dir, strict).await?;
        Self::start(writer, Reader::Sqlite(reader), metrics, strict)
    }

    /// Opens the trail in the PostgreSQL database at `url` (applying its schema versions
    /// there) and starts the writer.
    pub async fn open_postgres(
        url: &str,
        metrics: Arc<Metrics>,
        durability: crate::config::AuditDurability,
    ) -> Result<AuditTrail> {
        let strict = durability == crate::config::AuditDurability::Strict;
        let (writer, reader) = postgres::open(url, strict).await?;
        Self::start(writer, Reader::Postgres(reader), metrics, strict)
    }

    fn start(
        writer: impl BatchWriter,
        reader: Reader,
        metrics: Arc<Metrics>,
        strict: bool,
    ) -> Result<AuditTrail> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Queue {
                events: Vec::with_capacity(INITIAL),
                ..Queue::default()
            }),
            recorded: Default::default(),
            passes: Mutex::new(Passes {
                done: 0,
                at: Instant::now(),
                durable: 0,
                failed: Default::default(),
                dropped_at: None,
                failed_at: None,
            }),
            pass_done: Condvar::new(),
            work: Condvar::new(),
            stopping: Default::default(),
        });
        let thread_shared = shared.clone();
        let thread_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer_loop(writer, strict, &thread_shared, &thread_metrics))
            .context("cannot start the audit writer thread")?;
        Ok(AuditTrail {
            shared,
            metrics,
            reader,
            strict,
        })
    }

    /// Waits until every event recorded before the call is written (or given up on) and
    /// checkpointed, at most `timeout`. Called once the proxy has stopped, before the
    /// process exits, so the last requests of a shutdown or upgrade are in the trail (and
    /// in its file). False on timeout.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.shared
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        let passes = lock(&self.shared.passes);
        // The pass running now may have swapped the buffer out before our events arrived;
        // the one after it starts after this call, so it takes them, and checkpoints them
        // into the database file before it counts (`stopping`): a stopped process leaves
        // a file that holds its whole trail.
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
    /// since_ms`, for one key or all. Events without a tenant are listed by nobody.
    pub async fn list(
        &self,
        tenant_id: &str,
        key_id: Option<&str>,
        since_ms: i64,
        before_seq: i64,
        limit: i64,
    ) -> Result<Vec<(i64, AuditEvent)>> {
        match &self.reader {
            Reader::Sqlite(r) => r.list(tenant_id, key_id, since_ms, before_seq, limit).await,
            Reader::Postgres(r) => r.list(tenant_id, key_id, since_ms, before_seq, limit).await,
        }
    }

    /// What the trail records as spent by one key on one UTC day.
    pub async fn spend_of_key(&self, tenant_id: &str, key_id: &str, day: i64) -> Result<Micros> {
        let from = day.saturating_mul(86_400_000);
        let to = from.saturating_add(86_400_000);
        match &self.reader {
            Reader::Sqlite(r) => r.spend_of_key(tenant_id, key_id, from, to).await,
            Reader::Postgres(r) => r.spend_of_key(tenant_id, key_id, from, to).await,
        }
    }

    /// For readiness: the database answers reads, the writer finished a pass within
    /// STALLED (it normally does every LINGER; a database it cannot write keeps it in
    /// retries, and a writer thread that died never finishes one again), and no pass gave
    /// events up within STALLED.
    pub async fn ping(&self) -> bool {
        let (last_pass, dropped_at, refusing) = {
            let passes = lock(&self.shared.passes);
            (
                passes.at,
                passes.dropped_at,
                self.strict && passes.strict_failing(),
            )
        };
        dropped_at.is_none_or(|t| t.elapsed() >= STALLED)
            && last_pass.elapsed() < STALLED
            // A strict proxy refusing every call (`is_failing`) is not ready either.
            && !refusing
            && match &self.reader {
                Reader::Sqlite(r) => r.ping().await,
                Reader::Postgres(r) => r.ping().await,
            }
    }

    /// Queues a node's batch and blocks the calling thread until all of it is committed,
    /// at most `timeout`: what the control plane waits for before it acknowledges the
    /// batch, so a replica killed after answering has kept it. False when it is not (the
    /// queue had no room for all of it, it was given up on, or the wait timed out): the
    /// node keeps it and sends it again (so it is not counted as dropped here), and a
    /// numbered batch (`NodeBatch`) is then still written once, whichever replica the
    /// resend reaches. A batch sent again while its first copy still waits in this queue,
    /// or is being written, waits for that copy instead of being queued again. An
    /// unnumbered batch (a node older than the numbering) written and then sent again is
    /// recorded twice.
    pub fn record_all_durably(
        &self,
        events: Vec<AuditEvent>,
        batch: Option<NodeBatch>,
        timeout: Duration,
    ) -> bool {
        if events.is_empty() {
            return true;
        }
        let (first, last) = {
            let mut queue = lock(&self.shared.pending);
            let queued = batch.as_ref().and_then(|b| {
                (queue.batches.iter())
                    .chain(&queue.writing)
                    .find(|(_, _, q)| q == b)
            });
            if let Some(&(first, last, _)) = queued {
                (first, last)
            } else if queue.events.len() + events.len() > QUEUE {
                return false;
            } else {
                let n = events.len() as u64;
                queue.events.extend(events);
                let last = self
                    .shared
                    .recorded
                    .fetch_add(n, std::sync::atomic::Ordering::AcqRel)
                    + n;
                if let Some(batch) = batch {
                    queue.batches.push((last + 1 - n, last, batch));
                }
                drop(queue);
                self.metrics.audit_queue_depth.add(n as i64);
                (last + 1 - n, last)
            }
        };
        self.shared.work.notify_one();
        let passes = lock(&self.shared.passes);
        let (passes, wait) = self
            .shared
            .pass_done
            .wait_timeout_while(passes, timeout, |p| p.durable < last)
            .unwrap_or_else(|p| p.into_inner());
        !wait.timed_out() && !passes.failed.iter().any(|&(a, b)| a <= last && first <= b)
    }

    /// Queues the event; its ticket, or None when the queue was full (dropped).
    fn push(&self, event: AuditEvent) -> Option<u64> {
        let mut queue = lock(&self.shared.pending);
        if queue.events.len() < QUEUE {
            queue.events.push(event);
            let ticket = self
                .shared
                .recorded
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
                + 1;
            drop(queue);
            self.metrics.audit_queue_depth.inc();
            Some(ticket)
        } else {
            drop(queue);
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

    /// A pass gave events up within `STRICT_HOLD` (a full disk), or no pass has ended
    /// for `STRICT_STUCK` (the writer retries a database it cannot reach; it ends one
    /// every LINGER otherwise). Refused calls' own events keep trying the trail, each one
    /// given up renewing it; it ends `STRICT_HOLD` after the last, with traffic or not
    /// (so a node out of its load balancer's rotation comes back), and a call then
    /// forwarded on a trail still failing starts it again.
    fn is_failing(&self) -> bool {
        lock(&self.shared.passes).strict_failing()
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn writer_loop(mut writer: impl BatchWriter, strict: bool, shared: &Shared, metrics: &Metrics) {
    let mut queue = Queue {
        events: Vec::with_capacity(INITIAL),
        ..Queue::default()
    };
    // The first checkpoint copies what opening the database wrote (its schema).
    let (mut unchecked, mut checkpointed, mut wrote_at) = (true, Instant::now(), Instant::now());
    loop {
        if strict {
            // Group commit: write as soon as something waits, and whatever queued up
            // during the previous commit goes together in the next.
            let pending = lock(&shared.pending);
            drop(
                shared
                    .work
                    .wait_timeout_while(pending, LINGER, |q| q.events.is_empty())
                    .unwrap_or_else(|p| p.into_inner()),
            );
        } else {
            std::thread::sleep(LINGER);
        }
        let taken_through = {
            let mut pending = lock(&shared.pending);
            std::mem::swap(&mut pending.events, &mut queue.events);
            std::mem::swap(&mut pending.batches, &mut queue.batches);
            pending.writing.clone_from(&queue.batches);
            shared.recorded.load(std::sync::atomic::Ordering::Acquire)
        };
        let events = &queue.events;
        let first_ticket = taken_through + 1 - events.len() as u64;
        let mut failed = Vec::new();
        let mut start = 0;
        let mut batches = queue.batches.iter().peekable();
        while start < events.len() {
            // BATCH events per transaction, stretched to the end of a node batch that
            // begins inside it: a node batch is written whole or not at all.
            let mut end = (start + BATCH).min(events.len());
            let mut marked = Vec::new();
            while let Some((first, last, batch)) =
                batches.next_if(|(first, _, _)| ((first - first_ticket) as usize) < end)
            {
                let range = (first - first_ticket) as usize..(last - first_ticket) as usize + 1;
                end = end.max(range.end);
                marked.push(Marked {
                    range: range.start - start..range.end - start,
                    batch,
                });
            }
            let chunk = &events[start..end];
            if !write_with_retries(&mut writer, chunk, &marked) {
                // Node batches are not lost: their nodes hear so and send them again.
                let resent: usize = marked.iter().map(|m| m.range.len()).sum();
                metrics.audit_dropped.inc_by((chunk.len() - resent) as u64);
                let first = first_ticket + start as u64;
                failed.push((first, first + chunk.len() as u64 - 1));
            }
            metrics.audit_queue_depth.sub(chunk.len() as i64);
            start = end;
        }
        let wrote_events = !queue.events.is_empty();
        if wrote_events {
            (unchecked, wrote_at) = (true, Instant::now());
        }
        // Stopping: the file is made whole before `flush` sees this pass done.
        if shared.stopping.load(std::sync::atomic::Ordering::Acquire) {
            writer.checkpoint();
            (unchecked, checkpointed) = (false, Instant::now());
        }
        queue.events.clear();
        queue.batches.clear();
        // A burst grew the buffer: give the memory back rather than keep it.
        queue.events.shrink_to(INITIAL);
        {
            let mut passes = lock(&shared.passes);
            passes.done += 1;
            passes.at = Instant::now();
            passes.durable = taken_through;
            if wrote_events {
                passes.dropped_at = (!failed.is_empty()).then(Instant::now);
            }
            if !failed.is_empty() {
                passes.failed_at = Some(Instant::now());
            }
            for range in failed {
                if passes.failed.len() == 64 {
                    passes.failed.pop_front();
                }
                passes.failed.push_back(range);
            }
        }
        shared.pass_done.notify_all();
        // After `durable` moved on: a batch sent again from now on is queued again, and
        // the next pass finds it written.
        lock(&shared.pending).writing.clear();
        // After the waiters were told: no one waits for a checkpoint.
        if unchecked
            && (checkpointed.elapsed() >= CHECKPOINT_EVERY || wrote_at.elapsed() >= CHECKPOINT_IDLE)
        {
            writer.checkpoint();
            (unchecked, checkpointed) = (false, Instant::now());
        }
    }
}

/// A refused batch is retried a few times (a local file that refuses writes means the
/// disk is gone, which readiness shows), then given up on. An unreachable database is
/// waited for, with backoff up to a second: events keep queueing behind this batch up to
/// QUEUE, and are counted as dropped beyond it. False when the events were lost.
fn write_with_retries(
    writer: &mut impl BatchWriter,
    events: &[AuditEvent],
    batches: &[Marked],
) -> bool {
    let mut refusals = 0;
    let mut backoff = Duration::from_millis(100);
    let mut unreachable_since: Option<Instant> = None;
    let mut logged_at: Option<Instant> = None;
    // A disk that refuses writes refuses every batch: one line per 10 s while it lasts
    // (counting what was dropped), and one when writes work again.
    static REFUSED: crate::log_every::LogEvery =
        crate::log_every::LogEvery::new(Duration::from_secs(10));
    static REFUSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    use std::sync::atomic::Ordering::AcqRel;
    loop {
        match writer.write(events, batches) {
            Ok(()) => {
                if let Some(since) = unreachable_since {
                    log::warn!(
                        "audit database reachable again after {:.1} s",
                        since.elapsed().as_secs_f64()
                    );
                }
                if REFUSING.swap(false, AcqRel) {
                    log::warn!("audit events are written again");
                }
                return true;
            }
            Err(WriteError::Refused(e)) => {
                refusals += 1;
                REFUSING.store(true, std::sync::atomic::Ordering::Release);
                if refusals == 3 {
                    if let Some(others) = REFUSED.due() {
                        log::error!(
                            "audit batch of {} events dropped after {refusals} refused writes \
                             (keybrake_audit_dropped_total; {others} more batches since the \
                             last such line): {e:#}",
                            events.len(),
                        );
                    }
                    return false;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(WriteError::Unreachable(e)) => {
                unreachable_since.get_or_insert_with(Instant::now);
                if logged_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    log::error!(
                        "audit database unreachable, {} events waiting, retrying: {e:#}",
                        events.len()
                    );
                    logged_at = Some(Instant::now());
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests;
