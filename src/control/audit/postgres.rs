//! The audit trail in PostgreSQL: table `audit` in the control plane's database, beside
//! the store's tables, shared by every control replica.
//!
//! `Writer` is the writer thread's only connection, driven by a small runtime of its own
//! on that thread: one transaction per batch, the whole batch in one `INSERT … SELECT FROM
//! UNNEST(arrays)` (one prepared statement, one round trip, whatever the batch size).
//! Each batch first takes a transaction-level advisory lock, so replicas writing to one
//! database commit their batches one after the other: `seq`s become visible in order and a
//! listing's cursor never passes an event that commits later with a smaller `seq`. In
//! `normal` durability the writer's session commits with `synchronous_commit = off` (the
//! SQLite `synchronous=NORMAL` counterpart: a commit survives a crash of keybrake, the last
//! few hundred milliseconds may not survive a crash of the database host); `strict` keeps
//! the server's default, a commit is flushed before it is acknowledged.
//!
//! `Reader` answers through a two-connection pool and plain B-tree indexes `(tenant_id,
//! key_id, seq)` and `(tenant_id, seq)`: no spans (PostgreSQL's index maintenance costs the
//! writer little next to a round trip).

use super::{BatchWriter, Marked, WriteError};
use crate::money::Micros;
use crate::sync::AuditEvent;
use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, Row};
use std::str::FromStr;
use std::time::Duration;

/// The trail's schema versions on PostgreSQL, in order (`keybrake_audit_schema` records
/// how many ran); SQLite's are `sqlite::MIGRATIONS`, kept in step.
pub const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/postgres/audit/0001_audit.sql"),
    include_str!("../../../migrations/postgres/audit/0002_node_batches.sql"),
];

/// The advisory lock every audit batch holds while it commits (any constant, chosen once).
const BATCH_LOCK: i64 = 0x6b62_6175_6469_7400; // "kbaudit\0"

/// The columns an insert writes, each from one array parameter, in `insert`'s order.
const INSERT: &str = "INSERT INTO audit (ts_ms, tenant_id, key_id, label, vendor, method, \
     path, status, decision, spend, vendor_request_id, duration_ms, model, input_tokens, \
     cached_input_tokens, cache_write_tokens, output_tokens) \
     SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::text[], $8::int[], $9::text[], $10::bigint[], $11::text[], \
     $12::bigint[], $13::text[], $14::bigint[], $15::bigint[], $16::bigint[], $17::bigint[])";

const COLUMNS: &str = "seq, ts_ms, tenant_id, key_id, label, vendor, method, path, status, \
     decision, spend, vendor_request_id, duration_ms, model, input_tokens, \
     cached_input_tokens, cache_write_tokens, output_tokens";

/// Applies the trail's schema versions the database lacks, in one transaction under an
/// advisory lock (replicas starting at once apply each exactly once); refuses a database
/// whose trail a newer keybrake wrote.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    /// "kbauditm" in ASCII.
    const LOCK: i64 = 0x6b62_6175_6469_746d;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS keybrake_audit_schema (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let applied: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM keybrake_audit_schema")
            .fetch_one(&mut *tx)
            .await?;
    if applied > MIGRATIONS.len() as i64 {
        anyhow::bail!(
            "audit schema version {applied} in the database is newer than this keybrake \
             (knows {}): upgrade keybrake",
            MIGRATIONS.len()
        );
    }
    if applied == MIGRATIONS.len() as i64 {
        return Ok(());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("audit migration {}", i + 1))?;
    }
    sqlx::query("DELETE FROM keybrake_audit_schema")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO keybrake_audit_schema (version) VALUES ($1)")
        .bind(MIGRATIONS.len() as i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The writer (not connected yet) and the readers' pool, the schema brought up to date.
pub(super) async fn open(url: &str, strict: bool) -> Result<(Writer, Reader)> {
    let options = PgConnectOptions::from_str(url)
        .context("invalid PostgreSQL URL for the audit trail")?
        .application_name("keybrake-audit")
        .options([("client_min_messages", "warning")])
        .log_statements(log::LevelFilter::Debug);
    let options = if strict {
        options
    } else {
        options.options([("synchronous_commit", "off")])
    };
    // The readers connect now, so a wrong URL or an unreachable server is an error at
    // start. The writer connects on its own thread, inside its own runtime: a connection
    // belongs to the runtime that opened it.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(options.clone().application_name("keybrake-audit-read"))
        .await
        .context("cannot connect to PostgreSQL to read the audit trail")?;
    migrate(&pool).await?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the audit writer's runtime")?;
    Ok((
        Writer {
            runtime,
            options,
            conn: None,
            pruned_at: None,
        },
        Reader(pool),
    ))
}

async fn connect(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    tokio::time::timeout(Duration::from_secs(5), PgConnection::connect_with(options))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)?
}

pub(super) struct Writer {
    /// The writer thread's own: the thread blocks on it, never on the proxy's runtime.
    runtime: tokio::runtime::Runtime,
    options: PgConnectOptions,
    /// None after an error, until a reconnect succeeds.
    conn: Option<PgConnection>,
    /// When `node_batches` was last pruned (`super::prune_due`).
    pruned_at: Option<std::time::Instant>,
}

impl BatchWriter for Writer {
    fn write(&mut self, events: &[AuditEvent], batches: &[Marked]) -> Result<(), WriteError> {
        let Writer {
            runtime,
            options,
            conn,
            pruned_at,
        } = self;
        let prune = super::prune_due(pruned_at);
        runtime.block_on(async {
            if conn.is_none() {
                // Whatever keeps a connection from opening (server down, database not
                // accepting connections, too many clients) is waited out.
                *conn = Some(
                    connect(options)
                        .await
                        .map_err(|e| WriteError::Unreachable(e.into()))?,
                );
            }
            let result = match conn.as_mut() {
                Some(c) => {
                    tokio::time::timeout(Duration::from_secs(30), insert(c, events, batches, prune))
                        .await
                        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
                }
                None => unreachable!("connected above"),
            };
            // Whatever failed, the next attempt starts on a fresh connection: a broken one
            // (server restarted, network cut) never answers again.
            result.map_err(|e| {
                *conn = None;
                classify(e)
            })
        })
    }
}

/// Errors of the connection (or of the server's state: shutting down, out of resources,
/// a transaction to retry) are waited out; others refuse the batch.
fn classify(e: sqlx::Error) -> WriteError {
    let transient = match &e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| ["08", "40", "53", "57"].iter().any(|p| c.starts_with(p))),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    };
    if transient {
        WriteError::Unreachable(e.into())
    } else {
        WriteError::Refused(e.into())
    }
}

/// Writes `events` but those of node batches already written, marks the others written,
/// and with `prune` deletes the marks of sessions silent for a week, in one transaction
/// under the replicas' batch lock (so two replicas given the same node batch write it
/// once).
async fn insert(
    conn: &mut PgConnection,
    all: &[AuditEvent],
    batches: &[Marked<'_>],
    prune: Option<i64>,
) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(BATCH_LOCK)
        .execute(&mut *tx)
        .await?;
    let mut skip = Vec::new();
    for m in batches {
        let marked = sqlx::query(super::MARK_NODE_BATCH)
            .bind(&m.batch.holder)
            .bind(m.batch.number.min(i64::MAX as u64) as i64)
            .bind(crate::token::unix_ms() as i64)
            .execute(&mut *tx)
            .await?;
        if marked.rows_affected() == 0 {
            skip.push(m.range.clone());
        }
    }
    if let Some(before) = prune {
        sqlx::query("DELETE FROM node_batches WHERE at_ms < $1")
            .bind(before)
            .execute(&mut *tx)
            .await?;
    }
    let events: Vec<&AuditEvent> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| !skip.iter().any(|r| r.contains(i)))
        .map(|(_, e)| e)
        .collect();
    if events.is_empty() {
        return tx.commit().await;
    }
    let text = |f: fn(&AuditEvent) -> Option<&str>| events.iter().map(|e| f(e)).collect::<Vec<_>>();
    let tokens = |f: fn(&crate::sync::LlmAudit) -> Option<u64>| {
        events
            .iter()
            .map(|e| {
                e.llm
                    .as_ref()
                    .and_then(f)
                    .map(|n| n.min(i64::MAX as u64) as i64)
            })
            .collect::<Vec<_>>()
    };
    sqlx::query(INSERT)
        .bind(events.iter().map(|e| e.ts_ms).collect::<Vec<_>>())
        .bind(text(|e| e.tenant_id.as_deref()))
        .bind(text(|e| e.key_id.as_deref()))
        .bind(text(|e| e.label.as_deref()))
        .bind(text(|e| Some(e.vendor.as_str())))
        .bind(text(|e| Some(e.method.as_str())))
        .bind(text(|e| Some(e.path.as_str())))
        .bind(events.iter().map(|e| e.status as i32).collect::<Vec<_>>())
        .bind(text(|e| Some(e.decision.as_str())))
        .bind(events.iter().map(|e| e.spend.0).collect::<Vec<_>>())
        .bind(text(|e| e.vendor_request_id.as_deref()))
        .bind(
            events
                .iter()
                .map(|e| e.duration_ms.min(i64::MAX as u64) as i64)
                .collect::<Vec<_>>(),
        )
        .bind(text(|e| e.llm.as_ref().map(|l| l.model.as_str())))
        .bind(tokens(|l| l.input_tokens))
        .bind(tokens(|l| l.cached_input_tokens))
        .bind(tokens(|l| l.cache_write_tokens))
        .bind(tokens(|l| l.output_tokens))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

pub(super) struct Reader(PgPool);

impl Reader {
    pub(super) async fn list(
        &self,
        tenant_id: &str,
        key_id: Option<&str>,
        since_ms: i64,
        before_seq: i64,
        limit: i64,
    ) -> Result<Vec<(i64, AuditEvent)>> {
        // Two statements rather than `$2 IS NULL OR key_id = $2`: a generic plan of the
        // latter could not pick the per-key index.
        let rows = match key_id {
            Some(key_id) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM audit WHERE tenant_id = $1 AND key_id = $2
                     AND seq < $3 AND ts_ms >= $4 ORDER BY seq DESC LIMIT $5"
                ))
                .bind(tenant_id)
                .bind(key_id)
                .bind(before_seq)
                .bind(since_ms)
                .bind(limit)
                .fetch_all(&self.0)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM audit WHERE tenant_id = $1
                     AND seq < $2 AND ts_ms >= $3 ORDER BY seq DESC LIMIT $4"
                ))
                .bind(tenant_id)
                .bind(before_seq)
                .bind(since_ms)
                .bind(limit)
                .fetch_all(&self.0)
                .await?
            }
        };
        Ok(rows.iter().map(event_of_row).collect())
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
            // sum(bigint) is numeric: saturated at 2^62 (as the ledger's settled spend),
            // not an out-of-range error.
            "SELECT least(coalesce(sum(spend), 0), 4611686018427387904)::bigint FROM audit
             WHERE tenant_id = $1 AND key_id = $2 AND ts_ms >= $3 AND ts_ms < $4",
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

fn event_of_row(r: &PgRow) -> (i64, AuditEvent) {
    let tokens = |column: &str| r.get::<Option<i64>, _>(column).map(|n| n.max(0) as u64);
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
            status: r.get::<i32, _>("status").clamp(0, u16::MAX as i32) as u16,
            decision: r.get("decision"),
            spend: Micros(r.get("spend")),
            vendor_request_id: r.get("vendor_request_id"),
            duration_ms: r.get::<i64, _>("duration_ms").max(0) as u64,
            llm: r
                .get::<Option<String>, _>("model")
                .map(|model| crate::sync::LlmAudit {
                    model,
                    input_tokens: tokens("input_tokens"),
                    cached_input_tokens: tokens("cached_input_tokens"),
                    cache_write_tokens: tokens("cache_write_tokens"),
                    output_tokens: tokens("output_tokens"),
                }),
        },
    )
}
