//! The audit trail's write throughput on each backend, through its real interface: events
//! pushed with `AuditTrail::record` as fast as the queue takes them (kept under its bound,
//! so nothing is dropped), then `flush`. SQLite: `audit.db` in a temporary directory
//! (rusqlite writer, spans). PostgreSQL: the database at `AUDIT_PG_URL` (its audit
//! tables are dropped and created afresh each round), UNNEST batches.
//!
//! Prints events/s, this process's CPU per event (user + system, every thread: the
//! recording loop, the writer thread and its runtime) and, for PostgreSQL, the CPU of the
//! whole server meanwhile (every process of the cluster, from /proc: run it on a cluster
//! of its own on this machine).
//!
//! Run: `AUDIT_PG_URL=postgres://user@127.0.0.1:PORT/db cargo bench --bench audit_backends`
//! (`AUDIT_EVENTS=200000`, `AUDIT_ROUNDS=3`).

mod common;
use common::cpu;
use keybrake::config::AuditDurability;
use keybrake::control::audit::AuditTrail;
use keybrake::metrics::Metrics;
use keybrake::money::Micros;
use keybrake::sync::{AuditEvent, AuditSink};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        ts_ms: 1_700_000_000_000 + i as i64,
        tenant_id: Some(format!("tn_{:08}", i % 50).into()),
        key_id: Some(format!("key_01JD{:022}", i % 5_000).into()),
        label: Some("label".into()),
        vendor: "stripe".into(),
        method: "POST".into(),
        path: "/stripe/v1/payment_intents".into(),
        status: 200,
        decision: "allowed".into(),
        spend: Micros(1_000_000),
        vendor_request_id: Some(format!("req_{i:016}")),
        duration_ms: 3,
        llm: None,
    }
}

/// Fields of /proc/PID/stat after the command name (field 3 is index 0).
fn stat_fields(pid: i32) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

/// CPU time of a PostgreSQL cluster on this machine so far: its postmaster with every
/// child it reaped (utime, stime, cutime, cstime), plus every live child (backends, WAL
/// writer, checkpointer, autovacuum).
fn cluster_cpu(postmaster: i32) -> Duration {
    let pm = stat_fields(postmaster);
    let mut ticks: u64 = pm.get(11..15).map_or(0, |f| f.iter().sum());
    let children = std::fs::read_dir(format!("/proc/{postmaster}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        });
    for child in children {
        ticks += stat_fields(child).get(11..13).map_or(0, |f| f.iter().sum());
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// Records `n` events and waits for them to be written; (events/s, µs CPU per event).
fn run(trail: &AuditTrail, metrics: &Metrics, n: usize) -> (f64, f64) {
    let dropped = metrics.audit_dropped.get();
    let (wall, cpu0) = (Instant::now(), cpu());
    for i in 0..n {
        while metrics.audit_queue_depth.get() > 50_000 {
            std::thread::sleep(Duration::from_micros(200));
        }
        trail.record(event(i));
    }
    assert!(
        trail.flush(Duration::from_secs(120)),
        "not written in 120 s"
    );
    let (wall, cpu) = (wall.elapsed(), cpu() - cpu0);
    assert_eq!(metrics.audit_dropped.get(), dropped, "events were dropped");
    (
        n as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / n as f64,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let url = std::env::var("AUDIT_PG_URL").unwrap_or_else(|_| {
        eprintln!("set AUDIT_PG_URL to an empty PostgreSQL database on this machine");
        std::process::exit(2)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let metrics = Metrics::global();
    println!("{n} audit events per round, {rounds} rounds (median):");
    for durability in [AuditDurability::Normal, AuditDurability::Strict] {
        // SQLite.
        let mut sqlite = (vec![], vec![]);
        for round in 0..rounds {
            let dir = std::env::temp_dir().join(format!(
                "keybrake-audit-backends-{}-{round}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let trail = runtime
                .block_on(AuditTrail::open_sqlite(&dir, metrics.clone(), durability))
                .unwrap();
            let (rate, cpu) = run(&trail, &metrics, n);
            sqlite.0.push(rate);
            sqlite.1.push(cpu);
            let _ = std::fs::remove_dir_all(&dir);
        }
        // PostgreSQL: a fresh table each round.
        let mut pg = (vec![], vec![], vec![]);
        for _ in 0..rounds {
            let pool = runtime.block_on(sqlx::PgPool::connect(&url)).unwrap();
            runtime
                .block_on(
                    sqlx::raw_sql("DROP TABLE IF EXISTS audit, keybrake_audit_schema")
                        .execute(&pool),
                )
                .unwrap();
            let trail = Arc::new(
                runtime
                    .block_on(AuditTrail::open_postgres(&url, metrics.clone(), durability))
                    .unwrap(),
            );
            trail.record(event(0));
            assert!(trail.flush(Duration::from_secs(10)));
            // The postmaster: the parent of this connection's backend.
            let backend: i32 = runtime
                .block_on(sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&pool))
                .unwrap();
            let postmaster = stat_fields(backend).get(1).copied().unwrap_or(0) as i32;
            let server0 = cluster_cpu(postmaster);
            let (rate, cpu) = run(&trail, &metrics, n);
            let server = cluster_cpu(postmaster).saturating_sub(server0);
            pg.0.push(rate);
            pg.1.push(cpu);
            pg.2.push(server.as_secs_f64() * 1e6 / n as f64);
            runtime.block_on(pool.close());
        }
        println!(
            "  {durability:?}: sqlite {:>8.0} events/s {:>5.2} µs CPU/event | postgres {:>8.0} events/s {:>5.2} µs CPU/event + server {:>5.2} µs/event",
            median(sqlite.0),
            median(sqlite.1),
            median(pg.0),
            median(pg.1),
            median(pg.2)
        );
    }
}
