//! What a fresh key costs the SQLite ledger: the first lease of each key (granted in
//! batches, its reservation committed by the grant) and the report that settles its one
//! call and gives the rest back (in rounds of many keys), through the store's real
//! interface on a `keybrake.db` in a temporary directory: the writer work `serve` does
//! for every key it sees once.
//!
//! Prints wall time and this process's CPU (every thread, the SQLite worker included) per
//! key for each part.
//!
//! Grant batches are numbered, as an edge node's are (each recorded in `lease_batches`);
//! `LEDGER_NUMBERED=0` grants them unnumbered, as `serve`'s in-process ledger does.
//!
//! Run: `cargo bench --bench ledger_sqlite` (`LEDGER_KEYS=40000`, `LEDGER_BATCH=8`,
//! `LEDGER_REPORT_ROWS=200`, `LEDGER_ROUNDS=3`, `LEDGER_NUMBERED=1`).

mod common;
use common::cpu;
use keybrake::control::ledger_batch::{GrantRequest, ReportRow};
use keybrake::control::store::Store;
use keybrake::database::Database;
use keybrake::money::Micros;
use std::time::{Duration, Instant};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let keys = knob("LEDGER_KEYS", 40_000);
    let batch = knob("LEDGER_BATCH", 8).max(1);
    let report_rows = knob("LEDGER_REPORT_ROWS", 200).max(1);
    let rounds = knob("LEDGER_ROUNDS", 3);
    let numbered = knob("LEDGER_NUMBERED", 1) != 0;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("kb-ledger-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let store = Store::open(&Database::Sqlite {
            data_dir: dir.clone(),
        })
        .await
        .expect("the store opens");
        let now = 1_900_000_000;
        let day = now / 86_400;
        store
            .register_holder("bench", now, now + 1_000_000)
            .await
            .expect("a holder");
        println!(
            "{keys} fresh keys per round, first leases in batches of {batch} ({}), reports in \
             rounds of {report_rows} rows",
            if numbered { "numbered" } else { "unnumbered" }
        );
        println!("round   grant µs/key (wall / CPU)   report µs/key (wall / CPU)");
        let mut number = 0;
        for round in 0..rounds {
            let ids: Vec<String> = (0..keys)
                .map(|i| format!("key_{round:02}{i:024}"))
                .collect();
            let (w0, c0) = (Instant::now(), cpu());
            for chunk in ids.chunks(batch) {
                let asks: Vec<GrantRequest> = chunk
                    .iter()
                    .map(|k| GrantRequest {
                        key_id: k.clone(),
                        day,
                        cap: Micros(5_000_000),
                        min: Micros(1_000_000),
                        want: Micros(5_000_000),
                        commit: Micros(2_000_000),
                    })
                    .collect();
                number += 1;
                let grants = store
                    .lease_grant_many("bench", now, numbered.then_some(number), &asks)
                    .await
                    .expect("granted");
                assert!(grants.iter().all(|g| g.granted == Micros(5_000_000)));
            }
            let (w1, c1) = (Instant::now(), cpu());
            for chunk in ids.chunks(report_rows) {
                let rows: Vec<ReportRow> = chunk
                    .iter()
                    .map(|k| ReportRow {
                        key_id: k.clone(),
                        day,
                        settled: Micros(1_000_000),
                        spent: Micros(1_000_000),
                        returned: Micros(4_000_000),
                        unreserved: Micros(1_000_000),
                        return_uncommitted: false,
                    })
                    .collect();
                assert!(store
                    .lease_report_many("bench", None, &rows, &[])
                    .await
                    .expect("reported"));
            }
            let (w2, c2) = (Instant::now(), cpu());
            let per = |d: Duration| d.as_secs_f64() * 1e6 / keys as f64;
            println!(
                "{round:>5}   {:>9.2} / {:<9.2}            {:>9.2} / {:<9.2}",
                per(w1 - w0),
                per(c1 - c0),
                per(w2 - w1),
                per(c2 - c1)
            );
            let row = store.ledger_row(&ids[0], day).await.expect("a ledger row");
            assert_eq!((row.settled, row.held), (Micros(1_000_000), Micros::ZERO));
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}
