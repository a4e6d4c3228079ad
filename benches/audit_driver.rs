//! Audit write throughput with each of the two SQLite drivers Keybrake links: the same
//! schema (`audit::SCHEMA`), the same insert (`audit::INSERT`), the same pragmas (WAL,
//! `synchronous=NORMAL`) and the same batches (256 rows per `BEGIN IMMEDIATE`
//! transaction), written once through `rusqlite` from a plain thread (what the
//! `audit-writer` thread does) and once through `sqlx` from a task on a 2-worker tokio
//! runtime (what moving the writer onto the store's driver would mean). Prints events/s
//! and the process CPU time per event (user + system, every thread, so sqlx's connection
//! worker thread is counted too). A third run writes each batch through `sqlx` as one
//! multi-row INSERT (one hand-off to sqlx's connection thread per batch, not per row).
//! Span rows are left out: they are the same statements for every variant.
//!
//! Run: `cargo bench --bench audit_driver` (`AUDIT_EVENTS=200000`, `AUDIT_ROUNDS=3`).

mod common;
use common::cpu;
use keybrake::control::audit::{INSERT, SCHEMA};
use std::path::{Path, PathBuf};
use std::time::Instant;

const BATCH: usize = 256;

struct Event {
    ts_ms: i64,
    tenant: String,
    key: String,
    path: String,
    request_id: String,
}

fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            ts_ms: 1_700_000_000_000 + i as i64,
            tenant: format!("tn_{:08}", i % 50),
            key: format!("key_01JD{:022}", i % 5_000),
            path: "/stripe/v1/payment_intents".into(),
            request_id: format!("req_{i:016}"),
        })
        .collect()
}

fn fresh(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    path
}

fn with_rusqlite(path: &Path, events: &[Event]) {
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    for chunk in events.chunks(BATCH) {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        {
            let mut stmt = tx.prepare_cached(INSERT).unwrap();
            for e in chunk {
                stmt.execute(rusqlite::params![
                    e.ts_ms,
                    e.tenant,
                    e.key,
                    "label",
                    "stripe",
                    "POST",
                    e.path,
                    200,
                    "allowed",
                    1_000_000i64,
                    e.request_id,
                    3i64,
                    None::<&str>,
                    None::<i64>,
                    None::<i64>,
                    None::<i64>,
                    None::<i64>,
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
}

async fn with_sqlx(path: &Path, events: &[Event]) {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    use sqlx::{ConnectOptions, Executor};
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .connect()
        .await
        .unwrap();
    conn.execute(sqlx::raw_sql(SCHEMA)).await.unwrap();
    for chunk in events.chunks(BATCH) {
        conn.execute("BEGIN IMMEDIATE").await.unwrap();
        for e in chunk {
            sqlx::query(INSERT)
                .bind(e.ts_ms)
                .bind(&e.tenant)
                .bind(&e.key)
                .bind("label")
                .bind("stripe")
                .bind("POST")
                .bind(&e.path)
                .bind(200)
                .bind("allowed")
                .bind(1_000_000i64)
                .bind(&e.request_id)
                .bind(3i64)
                .bind(None::<&str>)
                .bind(None::<i64>)
                .bind(None::<i64>)
                .bind(None::<i64>)
                .bind(None::<i64>)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        conn.execute("COMMIT").await.unwrap();
    }
}

/// sqlx with one multi-row INSERT per batch: one round trip to sqlx's connection thread
/// per batch instead of per row (how a PostgreSQL writer would batch).
async fn with_sqlx_multirow(path: &Path, events: &[Event]) {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    use sqlx::{ConnectOptions, Executor, QueryBuilder, Sqlite};
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .connect()
        .await
        .unwrap();
    conn.execute(sqlx::raw_sql(SCHEMA)).await.unwrap();
    let head = INSERT.split(" VALUES").next().unwrap();
    for chunk in events.chunks(BATCH) {
        conn.execute("BEGIN IMMEDIATE").await.unwrap();
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!("{head} "));
        q.push_values(chunk, |mut b, e| {
            b.push_bind(e.ts_ms)
                .push_bind(&e.tenant)
                .push_bind(&e.key)
                .push_bind("label")
                .push_bind("stripe")
                .push_bind("POST")
                .push_bind(&e.path)
                .push_bind(200)
                .push_bind("allowed")
                .push_bind(1_000_000i64)
                .push_bind(&e.request_id)
                .push_bind(3i64)
                .push_bind(None::<&str>)
                .push_bind(None::<i64>)
                .push_bind(None::<i64>)
                .push_bind(None::<i64>)
                .push_bind(None::<i64>);
        });
        q.build().execute(&mut conn).await.unwrap();
        conn.execute("COMMIT").await.unwrap();
    }
}

fn main() {
    let n: usize = std::env::var("AUDIT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let rounds: usize = std::env::var("AUDIT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = std::env::temp_dir().join(format!("keybrake-audit-driver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let events = events(n);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut results: Vec<(&str, Vec<(f64, f64)>)> = vec![
        ("rusqlite", vec![]),
        ("sqlx", vec![]),
        ("sqlx-multirow", vec![]),
    ];
    for _ in 0..rounds {
        for (name, runs) in results.iter_mut() {
            let path = fresh(&dir, &format!("{name}.db"));
            let (wall, cpu0) = (Instant::now(), cpu());
            match *name {
                "rusqlite" => with_rusqlite(&path, &events),
                "sqlx" => runtime.block_on(with_sqlx(&path, &events)),
                _ => runtime.block_on(with_sqlx_multirow(&path, &events)),
            }
            let (wall, cpu) = (wall.elapsed(), cpu() - cpu0);
            runs.push((
                n as f64 / wall.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / n as f64,
            ));
        }
    }
    println!("{n} audit events, {BATCH} per transaction, {rounds} rounds (median):");
    for (name, mut runs) in results {
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (rate, _) = runs[runs.len() / 2];
        let mut cpus: Vec<f64> = runs.iter().map(|r| r.1).collect();
        cpus.sort_by(f64::total_cmp);
        println!(
            "  {name:13} {rate:>9.0} events/s  {:>5.2} µs CPU/event  (runs: {})",
            cpus[cpus.len() / 2],
            runs.iter()
                .map(|r| format!("{:.0}/s {:.2}µs", r.0, r.1))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
