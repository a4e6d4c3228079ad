//! The audit trail's tests: the same scenarios on SQLite and on a throwaway PostgreSQL
//! (`pg_test`), which must give the same answers, and each backend's failure modes.

use super::*;
use crate::control::pg_test;

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

/// Where a trail lives; `open` opens another trail on the same place (a restart, or a
/// second process writing beside the first).
enum Place {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Place {
    async fn new(backend: &str, name: &str) -> Place {
        match backend {
            "sqlite" => Place::Sqlite(temp_dir(name)),
            _ => Place::Postgres(pg_test::database().await),
        }
    }

    async fn open(&self) -> AuditTrail {
        self.open_with(Default::default()).await
    }

    async fn open_with(&self, durability: crate::config::AuditDurability) -> AuditTrail {
        match self {
            Place::Sqlite(dir) => AuditTrail::open_sqlite(dir, Metrics::global(), durability).await,
            Place::Postgres(db) => {
                AuditTrail::open_postgres(db, Metrics::global(), durability).await
            }
        }
        .unwrap()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Place::Sqlite(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

const BACKENDS: [&str; 2] = ["sqlite", "postgres"];

#[tokio::test]
async fn recorded_events_are_listed_newest_first_after_a_flush_and_survive_reopening() {
    for backend in BACKENDS {
        let place = Place::new(backend, "audit-list").await;
        let trail = place.open().await;
        for n in 0..600 {
            trail.record(event(n));
        }
        assert!(trail.flush(Duration::from_secs(10)), "{backend}");
        let all = trail.list("ten_a", None, 0, i64::MAX, 1000).await.unwrap();
        assert_eq!(all.len(), 600, "{backend}");
        assert_eq!(all[0].1.spend, Micros(599), "{backend}");
        assert!(all.windows(2).all(|w| w[0].0 > w[1].0), "{backend}");
        let odd = trail
            .list("ten_a", Some("key_odd"), 0, i64::MAX, 1000)
            .await
            .unwrap();
        assert_eq!(odd.len(), 300, "{backend}");
        assert!(odd
            .iter()
            .all(|(_, e)| e.key_id.as_deref() == Some("key_odd")));
        assert!(trail
            .list("ten_b", None, 0, i64::MAX, 10)
            .await
            .unwrap()
            .is_empty());
        assert!(trail.ping().await, "{backend}");

        let again = place.open().await;
        assert_eq!(
            again
                .list("ten_a", None, 0, i64::MAX, 1000)
                .await
                .unwrap()
                .len(),
            600,
            "{backend}"
        );
    }
}

#[tokio::test]
async fn a_writer_that_cannot_write_makes_the_trail_not_ready_until_it_can() {
    let place = Place::new("sqlite", "audit-stalled").await;
    let Place::Sqlite(dir) = &place else {
        unreachable!()
    };
    let trail = place.open().await;
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
    assert!(
        !stalled,
        "ready while the writer could not write for {STALLED:?}"
    );
    assert!(recovered, "not ready again after the lock was released");
}

/// A batch given up (a full disk, a database refusing writes: here a write lock held past
/// every retry) makes the trail not ready, though the writer keeps finishing passes; a
/// later batch written whole makes it ready again.
#[tokio::test]
async fn events_given_up_make_the_trail_not_ready_until_a_batch_is_written() {
    let place = Place::new("sqlite", "audit-dropped").await;
    let Place::Sqlite(dir) = &place else {
        unreachable!()
    };
    let trail = place.open().await;
    let blocker = rusqlite::Connection::open(dir.join(FILE)).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    trail.record(event(1));
    let mut given_up = false;
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !lock(&trail.shared.passes).failed.is_empty() {
            given_up = true;
            break;
        }
    }
    blocker.execute_batch("ROLLBACK").unwrap();
    assert!(given_up, "the batch was never given up");
    assert!(!trail.ping().await, "ready right after events were dropped");
    trail.record(event(2));
    assert!(trail.flush(Duration::from_secs(10)));
    assert!(
        trail.ping().await,
        "not ready after a batch was written whole"
    );
}

/// PostgreSQL lost while running: the trail reports not ready, events recorded meanwhile
/// wait in the queue, and once the database takes connections again the writer reconnects
/// by itself and writes every one of them, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lost_while_running_queues_events_and_the_writer_reconnects() {
    let place = Place::new("postgres", "audit-pg-lost").await;
    let Place::Postgres(db) = &place else {
        unreachable!()
    };
    let trail = place.open().await;
    for n in 0..10 {
        trail.record(event(n));
    }
    assert!(trail.flush(Duration::from_secs(10)));
    assert!(trail.ping().await);

    // Nobody may connect to the database, and every connection to it is cut.
    let admin_url = db.rsplit_once('/').unwrap().0.to_string() + "/postgres";
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    let name = db.rsplit_once('/').unwrap().1;
    let set_allowed = |allowed: bool| {
        let admin = admin.clone();
        async move {
            sqlx::raw_sql(&format!(
                "ALTER DATABASE {name} ALLOW_CONNECTIONS {allowed}"
            ))
            .execute(&admin)
            .await
            .unwrap();
            if !allowed {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                )
                .bind(name)
                .execute(&admin)
                .await
                .unwrap();
            }
        }
    };
    set_allowed(false).await;
    for n in 10..400 {
        trail.record(event(n));
    }
    assert!(
        !trail.flush(Duration::from_secs(2)),
        "events written while the database refused every connection"
    );
    assert!(!trail.ping().await, "ready while the database is gone");

    set_allowed(true).await;
    assert!(
        trail.flush(Duration::from_secs(15)),
        "the writer did not reconnect"
    );
    let mut ready = false;
    for _ in 0..50 {
        if trail.ping().await {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "not ready again once the database is back");
    let all = trail.list("ten_a", None, 0, i64::MAX, 1000).await.unwrap();
    let spends: Vec<i64> = all.iter().rev().map(|(_, e)| e.spend.0).collect();
    assert_eq!(spends, (0..400).collect::<Vec<_>>());
    admin.close().await;
}

/// A scenario with events of several tenants and keys interleaved over many batches, some
/// written by a second writer on the same database (the other side of a graceful upgrade,
/// or another replica): every page of every listing (per tenant, per key, with and
/// without `since`, walked through the cursor) equals the brute-force answer, and so does
/// each key's spend per day. Run on both backends; their answers are also compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_backends_list_and_sum_exactly_what_a_scan_of_every_event_gives() {
    let mut answers = Vec::new();
    for backend in BACKENDS {
        answers.push(scenario(backend).await);
    }
    assert_eq!(answers[0], answers[1], "SQLite and PostgreSQL disagree");
}

/// Every listing page and spend of the scenario, as comparable text.
async fn scenario(backend: &str) -> Vec<String> {
    let place = Place::new(backend, "audit-spans").await;
    let mut all: Vec<(i64, AuditEvent)> = Vec::new();
    let day = 1_700_000_000_000 / 86_400_000;
    let mixed = |n: i64| {
        let mut e = event(n);
        e.tenant_id = Some(["ten_a", "ten_b"][(n % 2) as usize].into());
        e.key_id = match n % 7 {
            0 => None,
            k => Some(format!("key_{}", k % 3 + 3 * (n % 2)).into()),
        };
        // Two UTC days, so `since` and the per-day sum both cut somewhere.
        e.ts_ms = (day + 1) * 86_400_000 - 500 + (n * 37) % 1000;
        e
    };
    let trail = place.open().await;
    let mut seq = 0;
    for n in 0..1500 {
        if n == 700 {
            // The other process writes between two of our batches.
            assert!(trail.flush(Duration::from_secs(10)));
            let other = place.open().await;
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
    let mut answers = Vec::new();
    for tenant in ["ten_a", "ten_b"] {
        for key in [None, Some("key_1"), Some("key_4"), Some("key_9")] {
            for since in [0, (day + 1) * 86_400_000] {
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
                    answers.extend(page.iter().map(|p| format!("{p:?}")));
                    match page.last() {
                        Some((seq, _)) if page.len() == 37 => before = *seq,
                        _ => break,
                    }
                }
                assert_eq!(got, expected, "{backend}: {tenant} {key:?} since {since}");
            }
            let Some(key) = key else { continue };
            for d in [day, day + 1, day + 2] {
                let expected: i64 = all
                    .iter()
                    .filter(|(_, e)| e.tenant_id.as_deref() == Some(tenant))
                    .filter(|(_, e)| e.key_id.as_deref() == Some(key))
                    .filter(|(_, e)| e.ts_ms.div_euclid(86_400_000) == d)
                    .map(|(_, e)| e.spend.0)
                    .sum();
                let got = trail.spend_of_key(tenant, key, d).await.unwrap();
                assert_eq!(got, Micros(expected), "{backend}: {tenant} {key} day {d}");
                answers.push(format!("{tenant} {key} {d} {}", got.0));
            }
        }
    }
    answers
}

/// A reclaim reads a key's day from the trail: events whose spend adds up past i64
/// (a node may send 10,000 of $1e9 each) give the largest figure, not a failed query
/// (which stopped every reclaim after it).
#[tokio::test]
async fn a_key_spend_past_the_integer_range_saturates() {
    for backend in BACKENDS {
        let place = Place::new(backend, "audit-saturates").await;
        let trail = place.open().await;
        let huge = Micros(i64::MAX / 2 + 1);
        for n in 0..3 {
            trail.record(AuditEvent {
                key_id: Some("key_big".into()),
                spend: huge,
                ..event(n)
            });
        }
        assert!(trail.flush(Duration::from_secs(10)), "{backend}");
        let day = event(0).ts_ms.div_euclid(86_400_000);
        let got = trail.spend_of_key("ten_a", "key_big", day).await.unwrap();
        assert_eq!(got, Micros(1 << 62), "{backend}");
        let exact = trail.spend_of_key("ten_a", "key_even", day).await.unwrap();
        assert_eq!(exact, Micros(0), "{backend}");
    }
}

#[tokio::test]
async fn llm_model_and_tokens_are_kept() {
    for backend in BACKENDS {
        let place = Place::new(backend, "audit-llm").await;
        let trail = place.open().await;
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
        assert!(rows[0].1.llm.is_none(), "{backend}");
        let llm = rows[1].1.llm.clone().unwrap();
        assert_eq!(llm.model, "gpt-4o-mini", "{backend}");
        assert_eq!(
            (
                llm.input_tokens,
                llm.cached_input_tokens,
                llm.cache_write_tokens,
                llm.output_tokens
            ),
            (Some(20), Some(4), Some(0), Some(7)),
            "{backend}"
        );
    }
}

/// Strict mode on PostgreSQL: `record_durably` answers true once the event is committed
/// (it is listed right after, by another connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_on_postgres_confirms_only_committed_events() {
    let place = Place::new("postgres", "audit-pg-strict").await;
    let trail = place
        .open_with(crate::config::AuditDurability::Strict)
        .await;
    let confirmed =
        tokio::task::block_in_place(|| trail.record_durably(event(42), Duration::from_secs(5)));
    assert!(confirmed);
    let rows = trail.list("ten_a", None, 0, i64::MAX, 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1.spend, Micros(42));
}

/// A node batch whose answer was lost is sent again, to the same replica or another one
/// (a second trail on the same database): its events are written once. A later batch of
/// the session is written; an earlier number arriving late is not; another session's
/// batch 1 is. A node batch larger than a transaction's BATCH behind plain events is
/// written whole, so a resend finds it all there.
#[tokio::test]
async fn a_node_batch_sent_again_is_written_once_on_any_replica() {
    for backend in BACKENDS {
        let place = Place::new(backend, "audit-node-batches").await;
        let a = place.open().await;
        let b = place.open().await;
        let batch = |holder: &str, number| {
            Some(NodeBatch {
                holder: holder.into(),
                number,
            })
        };
        let events = |from: i64, n: i64| (from..from + n).map(event).collect::<Vec<_>>();
        let wait = Duration::from_secs(10);
        for n in 0..200 {
            a.record(event(n));
        }
        assert!(a.record_all_durably(events(200, 300), batch("node_1/s_1", 1), wait));
        assert!(b.record_all_durably(events(200, 300), batch("node_1/s_1", 1), wait));
        assert!(a.record_all_durably(events(200, 300), batch("node_1/s_1", 1), wait));
        assert!(b.record_all_durably(events(500, 10), batch("node_1/s_1", 2), wait));
        assert!(a.record_all_durably(events(200, 300), batch("node_1/s_1", 1), wait));
        assert!(a.record_all_durably(events(510, 5), batch("node_1/s_2", 1), wait));
        // Unnumbered (a node older than the numbering): written each time it arrives.
        assert!(b.record_all_durably(events(515, 1), None, wait));
        assert!(b.record_all_durably(events(515, 1), None, wait));

        let all = a.list("ten_a", None, 0, i64::MAX, 10_000).await.unwrap();
        let mut spends: Vec<i64> = all.iter().map(|(_, e)| e.spend.0).collect();
        spends.sort_unstable();
        let mut expected: Vec<i64> = (0..516).collect();
        expected.push(515);
        expected.sort_unstable();
        assert_eq!(spends, expected, "{backend}");
    }
}

/// A node whose answer timed out sends the batch again while the replica is still writing
/// its first copy: the resend waits for that write instead of queueing the batch again
/// (which would only be answered after the next pass, and so on while passes are slow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_batch_sent_again_while_it_is_being_written_waits_for_that_write() {
    let place = Place::new("sqlite", "audit-resend-in-flight").await;
    let Place::Sqlite(dir) = &place else {
        unreachable!()
    };
    let trail = Arc::new(place.open().await);
    // Another connection holds the write lock: the writer's pass waits for it.
    let blocker = rusqlite::Connection::open(dir.join(FILE)).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let send = |trail: &Arc<AuditTrail>| {
        let trail = trail.clone();
        tokio::task::spawn_blocking(move || {
            let batch = NodeBatch {
                holder: "node_1/s_1".into(),
                number: 1,
            };
            let events = (0..5).map(event).collect();
            trail.record_all_durably(events, Some(batch), Duration::from_secs(10))
        })
    };
    let first = send(&trail);
    while lock(&trail.shared.pending).writing.is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recorded = || {
        trail
            .shared
            .recorded
            .load(std::sync::atomic::Ordering::Acquire)
    };
    let before = recorded();
    let second = send(&trail);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(recorded(), before, "the resend was queued again");
    blocker.execute_batch("COMMIT").unwrap();
    assert!(first.await.unwrap());
    assert!(second.await.unwrap());
    let all = trail.list("ten_a", None, 0, i64::MAX, 100).await.unwrap();
    assert_eq!(all.len(), 5);
}
