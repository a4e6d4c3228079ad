//! Budget leases for many keys in one transaction: the grants of a batch of first leases
//! and a round of spend reports, each a handful of statements whatever the number of keys,
//! instead of a few statements per key. The batch travels as one parameter: a JSON array
//! read with `json_each` on SQLite, arrays read with `unnest` on PostgreSQL. Every
//! statement is a round trip (to SQLite's connection thread, or over the network): per
//! key, those round trips cost more than a fresh key's signature check.
//!
//! The grant rule is `Store::lease_grant`'s: the remaining budget (`cap` less settled
//! and held) is checked and taken in one conditional statement, so processes sharing the
//! database never grant more than a cap together. On PostgreSQL the `UPDATE` re-reads a
//! row another replica changed meanwhile (READ COMMITTED re-evaluates the condition on
//! the row's latest version once its lock is granted), and the ledger rows are locked in
//! (key, day) order first, so two replicas' batches never deadlock.

use super::store::{in_transaction, Backend, Store, TxConn};
use crate::money::Micros;
use anyhow::Result;
use sqlx::Row;
use sqlx::{PgConnection, SqliteConnection};
use std::collections::HashMap;

/// One grant asked of `Store::lease_grant_many`.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub key_id: String,
    pub day: i64,
    pub cap: Micros,
    pub min: Micros,
    pub want: Micros,
}

/// The rows of a batch as `json_each` reads them: `(key, day)` is unique in one statement.
const GRANT_ROWS: &str =
    "SELECT json_extract(value, '$[0]') AS k, json_extract(value, '$[1]') AS d,
        json_extract(value, '$[2]') AS cap, json_extract(value, '$[3]') AS mn,
        json_extract(value, '$[4]') AS wt
 FROM json_each($1)";

/// The same rows on PostgreSQL: one array per column.
const PG_GRANT_ROWS: &str =
    "SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[])
         AS r(k, d, cap, mn, wt)";

/// The grant taken from a row (`r`) of the batch: the remaining budget, at most `wt`,
/// or nothing when it is below `mn`. The same text on both backends.
const GRANT: &str = "CASE WHEN r.cap - ledger.settled - ledger.held >= r.mn
     THEN CASE WHEN r.wt < r.cap - ledger.settled - ledger.held
               THEN r.wt ELSE r.cap - ledger.settled - ledger.held END
     ELSE 0 END";

impl Store {
    /// `lease_grant` for every request, in one transaction: the grants, in the order of
    /// `requests` (zero where the key's remaining budget is below `min`).
    pub async fn lease_grant_many(
        &self,
        holder: &str,
        requests: &[GrantRequest],
    ) -> Result<Vec<Micros>> {
        let mut grants = vec![Micros::ZERO; requests.len()];
        // A key may be asked for twice (two days, or two counters of one day): each round
        // takes every (key, day) once, in order, so the second sees the first's grant.
        let mut left: Vec<usize> = (0..requests.len())
            .filter(|&i| requests[i].min.is_positive() && requests[i].want >= requests[i].min)
            .collect();
        if left.is_empty() {
            return Ok(grants);
        }
        let mut rounds = Vec::new();
        while !left.is_empty() {
            let mut seen = std::collections::HashSet::new();
            let (mut round, rest): (Vec<usize>, Vec<usize>) = left
                .iter()
                .partition(|&&i| seen.insert((&requests[i].key_id, requests[i].day)));
            left = rest;
            // (key, day) order: the order rows are created and locked in.
            round.sort_by(|&a, &b| {
                (&requests[a].key_id, requests[a].day).cmp(&(&requests[b].key_id, requests[b].day))
            });
            rounds.push(round);
        }
        in_transaction!(self, |tx| {
            for round in &rounds {
                let asks: Vec<&GrantRequest> = round.iter().map(|&i| &requests[i]).collect();
                let granted = tx.grant_round(&asks).await?;
                let mut leases: Vec<(&str, i64, i64)> = Vec::new();
                for &i in round {
                    let r = &requests[i];
                    let g = granted
                        .get(&(r.key_id.clone(), r.day))
                        .copied()
                        .unwrap_or(0);
                    if g > 0 {
                        grants[i] = Micros(g);
                        leases.push((&r.key_id, r.day, g));
                    }
                }
                if !leases.is_empty() {
                    tx.add_leases(holder, &leases).await?;
                }
            }
            tx.commit().await?;
        });
        Ok(grants)
    }

    /// What a holder did with its leases, in one transaction: for each row, in order,
    /// `settled` is added to the key's settled spend, and `released` (spent or returned)
    /// leaves its lease, and the key's held budget, as far as the lease still holds it
    /// (none of it when the lease was already given back because the holder was taken
    /// for dead).
    pub async fn lease_report_many(
        &self,
        holder: &str,
        reports: &[(String, i64, Micros, Micros)],
    ) -> Result<()> {
        if reports.is_empty() {
            return Ok(());
        }
        let mut slots: Vec<(&str, i64)> = reports
            .iter()
            .map(|(k, d, _, _)| (k.as_str(), *d))
            .collect();
        slots.sort_unstable();
        slots.dedup();
        in_transaction!(self, |tx| {
            // Ledger rows first, then leases: the order every transaction locks in.
            tx.lock_ledger_rows(&slots).await?;
            let mut held = tx.held_leases(holder, &slots).await?;
            // Per (key, day): settled added, released from the lease.
            let mut totals: HashMap<(String, i64), (i64, i64)> = HashMap::new();
            for (key_id, day, settled, released) in reports {
                let slot = (key_id.clone(), *day);
                let take = match held.get_mut(&slot) {
                    Some(h) => {
                        let take = (*h).clamp(0, released.0.max(0));
                        *h -= take;
                        take
                    }
                    None => 0,
                };
                let t = totals.entry(slot).or_default();
                t.0 = t.0.saturating_add(settled.0);
                t.1 = t.1.saturating_add(take);
            }
            let mut totals: Vec<Report> = totals
                .into_iter()
                .map(|((key_id, day), (settled, taken))| Report {
                    key_id,
                    day,
                    settled,
                    taken,
                })
                .collect();
            totals.sort_unstable_by(|a, b| (&a.key_id, a.day).cmp(&(&b.key_id, b.day)));
            tx.apply_reports(holder, &totals).await?;
            tx.commit().await?;
        });
        Ok(())
    }
}

/// A (key, day)'s share of a round of reports: spend to settle, lease budget released.
struct Report {
    key_id: String,
    day: i64,
    settled: i64,
    taken: i64,
}

/// The batch statements, per backend (the batch is a JSON array or a set of arrays).
#[allow(async_fn_in_trait)]
trait BatchConn {
    /// Takes the grants of one round (each (key, day) at most once): the grant per
    /// (key, day), zero or absent when nothing was granted.
    async fn grant_round(&mut self, asks: &[&GrantRequest]) -> Result<HashMap<(String, i64), i64>>;
    /// Adds grants to the holder's lease rows.
    async fn add_leases(&mut self, holder: &str, leases: &[(&str, i64, i64)]) -> Result<()>;
    /// What the holder's leases on these (key, day)s hold now (locked on PostgreSQL).
    async fn held_leases(
        &mut self,
        holder: &str,
        slots: &[(&str, i64)],
    ) -> Result<HashMap<(String, i64), i64>>;
    /// Releases the taken budget from the leases (deleting emptied ones) and applies
    /// settled spend and releases to the ledger.
    async fn apply_reports(&mut self, holder: &str, totals: &[Report]) -> Result<()>;
}

impl BatchConn for SqliteConnection {
    async fn grant_round(&mut self, asks: &[&GrantRequest]) -> Result<HashMap<(String, i64), i64>> {
        let rows: Vec<serde_json::Value> = asks
            .iter()
            .map(|r| serde_json::json!([r.key_id, r.day, r.cap.0, r.min.0, r.want.0]))
            .collect();
        let rows = serde_json::Value::Array(rows).to_string();
        sqlx::query(&format!(
            "INSERT INTO ledger (key_id, day) SELECT k, d FROM ({GRANT_ROWS}) WHERE true
             ON CONFLICT (key_id, day) DO NOTHING"
        ))
        .bind(&rows)
        .execute(&mut *self)
        .await?;
        Ok(sqlx::query(&format!(
            "UPDATE ledger SET last_grant = {GRANT}, held = ledger.held + {GRANT}
             FROM ({GRANT_ROWS}) AS r
             WHERE ledger.key_id = r.k AND ledger.day = r.d
             RETURNING key_id, day, last_grant"
        ))
        .bind(&rows)
        .fetch_all(&mut *self)
        .await?
        .iter()
        .map(|r| ((r.get("key_id"), r.get("day")), r.get("last_grant")))
        .collect())
    }

    async fn add_leases(&mut self, holder: &str, leases: &[(&str, i64, i64)]) -> Result<()> {
        let rows: Vec<serde_json::Value> = leases
            .iter()
            .map(|(k, d, g)| serde_json::json!([k, d, g]))
            .collect();
        sqlx::query(
            "INSERT INTO leases (holder, key_id, day, held)
             SELECT $1, json_extract(value, '$[0]'), json_extract(value, '$[1]'),
                    json_extract(value, '$[2]')
             FROM json_each($2) WHERE true
             ON CONFLICT (holder, key_id, day) DO UPDATE SET held = leases.held + excluded.held",
        )
        .bind(holder)
        .bind(serde_json::Value::Array(rows).to_string())
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn held_leases(
        &mut self,
        holder: &str,
        slots: &[(&str, i64)],
    ) -> Result<HashMap<(String, i64), i64>> {
        let keys: Vec<serde_json::Value> = slots
            .iter()
            .map(|(k, d)| serde_json::json!([k, d]))
            .collect();
        Ok(sqlx::query(
            // CROSS JOIN keeps the batch the outer loop: one primary-key probe per row, not
            // a scan of all the holder's leases.
            "SELECT l.key_id, l.day, l.held FROM json_each($2) AS r
             CROSS JOIN leases AS l
               ON l.holder = $1 AND l.key_id = json_extract(r.value, '$[0]')
                  AND l.day = json_extract(r.value, '$[1]')",
        )
        .bind(holder)
        .bind(serde_json::Value::Array(keys).to_string())
        .fetch_all(&mut *self)
        .await?
        .iter()
        .map(|r| ((r.get("key_id"), r.get("day")), r.get("held")))
        .collect())
    }

    async fn apply_reports(&mut self, holder: &str, totals: &[Report]) -> Result<()> {
        let rows: Vec<serde_json::Value> = totals
            .iter()
            .map(|r| serde_json::json!([r.key_id, r.day, r.settled, r.taken]))
            .collect();
        let rows = serde_json::Value::Array(rows).to_string();
        let report_rows = |param: &str| {
            format!(
                "SELECT json_extract(value, '$[0]') AS k, json_extract(value, '$[1]') AS d,
                        json_extract(value, '$[2]') AS s, json_extract(value, '$[3]') AS t
                 FROM json_each({param})"
            )
        };
        let rows2 = report_rows("$2");
        let rows1 = report_rows("$1");
        // An upsert, so the batch drives (an UPDATE ... FROM scans the holder's leases).
        // Only leases read above have a take, so it never inserts.
        sqlx::query(&format!(
            "INSERT INTO leases (holder, key_id, day, held) SELECT $1, k, d, -t FROM ({rows2})
             WHERE t > 0
             ON CONFLICT (holder, key_id, day) DO UPDATE SET held = leases.held + excluded.held"
        ))
        .bind(holder)
        .bind(&rows)
        .execute(&mut *self)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM leases WHERE holder = $1 AND held <= 0
               AND (key_id, day) IN (SELECT k, d FROM ({rows2}))"
        ))
        .bind(holder)
        .bind(&rows)
        .execute(&mut *self)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO ledger (key_id, day) SELECT k, d FROM ({rows1}) WHERE true
             ON CONFLICT (key_id, day) DO NOTHING"
        ))
        .bind(&rows)
        .execute(&mut *self)
        .await?;
        sqlx::query(&format!(
            "UPDATE ledger SET settled = settled + r.s, held = max(held - r.t, 0)
             FROM ({rows1}) AS r WHERE ledger.key_id = r.k AND ledger.day = r.d"
        ))
        .bind(&rows)
        .execute(&mut *self)
        .await?;
        Ok(())
    }
}

impl BatchConn for PgConnection {
    async fn grant_round(&mut self, asks: &[&GrantRequest]) -> Result<HashMap<(String, i64), i64>> {
        let keys: Vec<&str> = asks.iter().map(|r| r.key_id.as_str()).collect();
        let column =
            |f: fn(&GrantRequest) -> i64| -> Vec<i64> { asks.iter().map(|r| f(r)).collect() };
        let (days, caps, mins, wants) = (
            column(|r| r.day),
            column(|r| r.cap.0),
            column(|r| r.min.0),
            column(|r| r.want.0),
        );
        // Rows come into being in (key, day) order (the asks are sorted), then are locked
        // in that order before the grant reads them.
        sqlx::query(
            "INSERT INTO ledger (key_id, day) SELECT * FROM unnest($1::TEXT[], $2::BIGINT[])
             ON CONFLICT (key_id, day) DO NOTHING",
        )
        .bind(&keys)
        .bind(&days)
        .execute(&mut *self)
        .await?;
        let slots: Vec<(&str, i64)> = keys.iter().copied().zip(days.iter().copied()).collect();
        self.lock_ledger_rows(&slots).await?;
        Ok(sqlx::query(&format!(
            "UPDATE ledger SET last_grant = {GRANT}, held = ledger.held + {GRANT}
             FROM ({PG_GRANT_ROWS}) AS r
             WHERE ledger.key_id = r.k AND ledger.day = r.d
             RETURNING ledger.key_id, ledger.day, ledger.last_grant"
        ))
        .bind(&keys)
        .bind(&days)
        .bind(&caps)
        .bind(&mins)
        .bind(&wants)
        .fetch_all(&mut *self)
        .await?
        .iter()
        .map(|r| ((r.get("key_id"), r.get("day")), r.get("last_grant")))
        .collect())
    }

    async fn add_leases(&mut self, holder: &str, leases: &[(&str, i64, i64)]) -> Result<()> {
        let keys: Vec<&str> = leases.iter().map(|l| l.0).collect();
        let days: Vec<i64> = leases.iter().map(|l| l.1).collect();
        let held: Vec<i64> = leases.iter().map(|l| l.2).collect();
        sqlx::query(
            "INSERT INTO leases (holder, key_id, day, held)
             SELECT $1, k, d, h FROM unnest($2::TEXT[], $3::BIGINT[], $4::BIGINT[]) AS r(k, d, h)
             ON CONFLICT (holder, key_id, day) DO UPDATE SET held = leases.held + excluded.held",
        )
        .bind(holder)
        .bind(keys)
        .bind(days)
        .bind(held)
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn held_leases(
        &mut self,
        holder: &str,
        slots: &[(&str, i64)],
    ) -> Result<HashMap<(String, i64), i64>> {
        let keys: Vec<&str> = slots.iter().map(|s| s.0).collect();
        let days: Vec<i64> = slots.iter().map(|s| s.1).collect();
        Ok(sqlx::query(
            "SELECT l.key_id, l.day, l.held
             FROM unnest($2::TEXT[], $3::BIGINT[]) AS r(k, d)
             JOIN leases AS l ON l.holder = $1 AND l.key_id = r.k AND l.day = r.d
             ORDER BY l.key_id, l.day
             FOR UPDATE OF l",
        )
        .bind(holder)
        .bind(keys)
        .bind(days)
        .fetch_all(&mut *self)
        .await?
        .iter()
        .map(|r| ((r.get("key_id"), r.get("day")), r.get("held")))
        .collect())
    }

    async fn apply_reports(&mut self, holder: &str, totals: &[Report]) -> Result<()> {
        let keys: Vec<&str> = totals.iter().map(|t| t.key_id.as_str()).collect();
        let days: Vec<i64> = totals.iter().map(|t| t.day).collect();
        let settled: Vec<i64> = totals.iter().map(|t| t.settled).collect();
        let taken: Vec<i64> = totals.iter().map(|t| t.taken).collect();
        const ROWS: &str =
            "unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[]) AS r(k, d, s, t)";
        for sql in [
            format!(
                "UPDATE leases SET held = leases.held - r.t FROM {ROWS}
                 WHERE leases.holder = $5 AND leases.key_id = r.k AND leases.day = r.d
                   AND r.t > 0"
            ),
            format!(
                "DELETE FROM leases USING {ROWS}
                 WHERE leases.holder = $5 AND leases.key_id = r.k AND leases.day = r.d
                   AND leases.held <= 0"
            ),
            format!(
                "INSERT INTO ledger (key_id, day) SELECT r.k, r.d FROM {ROWS}
                 WHERE $5::TEXT IS NOT NULL
                 ON CONFLICT (key_id, day) DO NOTHING"
            ),
            format!(
                "UPDATE ledger SET settled = ledger.settled + r.s,
                                   held = GREATEST(ledger.held - r.t, 0)
                 FROM {ROWS} WHERE ledger.key_id = r.k AND ledger.day = r.d
                   AND $5::TEXT IS NOT NULL"
            ),
        ] {
            sqlx::query(&sql)
                .bind(&keys)
                .bind(&days)
                .bind(&settled)
                .bind(&taken)
                .bind(holder)
                .execute(&mut *self)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store(name: &str) -> Store {
        let dir = std::env::temp_dir().join(format!("keybrake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Store::open(&crate::database::Database::Sqlite { data_dir: dir })
            .await
            .unwrap()
    }

    fn ask(key: &str, cap: i64, min: i64, want: i64) -> GrantRequest {
        GrantRequest {
            key_id: key.into(),
            day: 7,
            cap: Micros(cap),
            min: Micros(min),
            want: Micros(want),
        }
    }

    #[tokio::test]
    async fn a_batch_grants_like_one_by_one_and_never_beyond_a_cap() {
        batch_grants(store("grant-many").await).await;
        batch_grants(crate::control::store::tests::postgres().await).await;
    }

    async fn batch_grants(s: Store) {
        s.lease_grant("h1", "k_a", 7, Micros(10), Micros(1), Micros(8))
            .await
            .unwrap();
        let grants = s
            .lease_grant_many(
                "h2",
                &[
                    ask("k_a", 10, 1, 5),   // 2 left of 10
                    ask("k_b", 10, 4, 6),   // new key
                    ask("k_b", 10, 4, 6),   // the same key again: 4 left
                    ask("k_b", 10, 4, 6),   // nothing left
                    ask("k_c", 10, 11, 11), // more than the cap
                    ask("k_d", 10, 0, 5),   // no minimum: nothing asked
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            grants,
            [2, 6, 4, 0, 0, 0].map(Micros).to_vec(),
            "grants in request order"
        );
        let leases = s.leases_of("h2").await.unwrap();
        let held = |k: &str| leases.iter().find(|l| l.0 == k).map(|l| l.2);
        assert_eq!(held("k_a"), Some(Micros(2)));
        assert_eq!(held("k_b"), Some(Micros(10)));
        assert_eq!(held("k_c"), None);

        // k_b: 7 spent and settled, 3 returned; k_a: the lease's 2 returned, 1 overspent.
        s.lease_report_many(
            "h2",
            &[
                ("k_b".into(), 7, Micros(7), Micros(7)),
                ("k_b".into(), 7, Micros(0), Micros(3)),
                ("k_a".into(), 7, Micros(1), Micros(2)),
            ],
        )
        .await
        .unwrap();
        assert!(s.leases_of("h2").await.unwrap().is_empty());
        // k_b: 3 of 10 free again; k_a: 8 held by h1, 1 settled, 1 free.
        let again = s
            .lease_grant_many("h3", &[ask("k_b", 10, 1, 10), ask("k_a", 10, 1, 10)])
            .await
            .unwrap();
        assert_eq!(again, vec![Micros(3), Micros(1)]);
    }
}
