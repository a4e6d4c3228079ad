//! Budget leases for many keys in one transaction: the grants of a batch of first leases
//! and a round of spend reports, each a handful of statements over a JSON array
//! (`json_each`) whatever the number of keys, instead of a few statements per key. Every
//! statement sent to SQLite is a round trip to its connection's thread: per key, those
//! round trips cost more than a fresh key's signature check.
//!
//! The grant rule is `Store::lease_grant`'s: the remaining budget (`cap` less settled
//! and held) is checked and taken in one conditional statement, so processes sharing the
//! database never grant more than a cap together.
//!
//! Write-ahead: a lease row's `committed` is the part of it that reservations took for
//! calls that may have reached the vendor and were not yet reported spent or unreserved.
//! `lease_commit_many` adds to it before a proxy forwards; reports take from it; when a
//! holder dies, `Store::reclaim_holder` settles it as spent and gives back only the rest.

use super::store::Store;
use crate::money::Micros;
use anyhow::Result;
use sqlx::Row;
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
 FROM json_each(?1)";

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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        while !left.is_empty() {
            let mut seen = std::collections::HashSet::new();
            let (round, rest): (Vec<usize>, Vec<usize>) = left
                .iter()
                .partition(|&&i| seen.insert((&requests[i].key_id, requests[i].day)));
            left = rest;
            let rows: Vec<serde_json::Value> = round
                .iter()
                .map(|&i| {
                    let r = &requests[i];
                    serde_json::json!([r.key_id, r.day, r.cap.0, r.min.0, r.want.0])
                })
                .collect();
            let rows = serde_json::Value::Array(rows).to_string();
            sqlx::query(&format!(
                "INSERT INTO ledger (key_id, day) SELECT k, d FROM ({GRANT_ROWS}) WHERE true
                 ON CONFLICT (key_id, day) DO NOTHING"
            ))
            .bind(&rows)
            .execute(&mut *tx)
            .await?;
            let granted = sqlx::query(&format!(
                "UPDATE ledger SET
                     last_grant = iif(r.cap - settled - held >= r.mn, min(r.wt, r.cap - settled - held), 0),
                     held = held + iif(r.cap - settled - held >= r.mn, min(r.wt, r.cap - settled - held), 0)
                 FROM ({GRANT_ROWS}) AS r
                 WHERE ledger.key_id = r.k AND ledger.day = r.d
                 RETURNING key_id, day, last_grant"
            ))
            .bind(&rows)
            .fetch_all(&mut *tx)
            .await?;
            let by_key: HashMap<(String, i64), i64> = granted
                .iter()
                .map(|r| ((r.get("key_id"), r.get("day")), r.get("last_grant")))
                .collect();
            let mut leases = Vec::new();
            for &i in &round {
                let r = &requests[i];
                let g = by_key.get(&(r.key_id.clone(), r.day)).copied().unwrap_or(0);
                if g > 0 {
                    grants[i] = Micros(g);
                    leases.push(serde_json::json!([r.key_id, r.day, g]));
                }
            }
            if !leases.is_empty() {
                sqlx::query(
                    "INSERT INTO leases (holder, key_id, day, held)
                     SELECT ?1, json_extract(value, '$[0]'), json_extract(value, '$[1]'),
                            json_extract(value, '$[2]')
                     FROM json_each(?2) WHERE true
                     ON CONFLICT (holder, key_id, day) DO UPDATE SET held = held + excluded.held",
                )
                .bind(holder)
                .bind(serde_json::Value::Array(leases).to_string())
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(grants)
    }

    /// What a holder did with its leases, in one transaction, each row applied in order:
    /// `settled` is added to the key's settled spend; `spent` and `unreserved` leave the
    /// lease's committed part (`lease_commit_many`); `spent` and `returned` leave the
    /// lease, and the key's held budget, as far as the lease holds uncommitted budget:
    /// committed budget stays held until its call is reported spent or unreserved.
    pub async fn lease_report_many(&self, holder: &str, reports: &[ReportRow]) -> Result<()> {
        if reports.is_empty() {
            return Ok(());
        }
        let keys: Vec<serde_json::Value> = reports
            .iter()
            .map(|r| serde_json::json!([r.key_id, r.day]))
            .collect();
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let lease_rows = sqlx::query(
            // CROSS JOIN keeps the batch the outer loop: one primary-key probe per row,
            // not a scan of all the holder's leases.
            "SELECT l.key_id, l.day, l.held, l.committed FROM json_each(?2) AS r
             CROSS JOIN leases AS l
               ON l.holder = ?1 AND l.key_id = json_extract(r.value, '$[0]')
                  AND l.day = json_extract(r.value, '$[1]')",
        )
        .bind(holder)
        .bind(serde_json::Value::Array(keys).to_string())
        .fetch_all(&mut *tx)
        .await?;
        // Per (key, day): the lease (held, committed) as the rows leave it.
        let mut leases: HashMap<(String, i64), (i64, i64)> = lease_rows
            .iter()
            .map(|r| {
                (
                    (r.get("key_id"), r.get("day")),
                    (r.get("held"), r.get("committed")),
                )
            })
            .collect();
        // Per (key, day): settled added, taken out of the lease.
        let mut totals: HashMap<(String, i64), (i64, i64)> = HashMap::new();
        for r in reports {
            let slot = (r.key_id.clone(), r.day);
            let take = match leases.get_mut(&slot) {
                Some((held, committed)) => {
                    let done = r.spent.0.max(0).saturating_add(r.unreserved.0.max(0));
                    *committed = committed.saturating_sub(done).max(0);
                    let leave = r.spent.0.max(0).saturating_add(r.returned.0.max(0));
                    let take = leave.clamp(0, (*held - *committed).max(0));
                    *held -= take;
                    take
                }
                None => 0,
            };
            let t = totals.entry(slot).or_default();
            t.0 = t.0.saturating_add(r.settled.0);
            t.1 = t.1.saturating_add(take);
        }
        let lease_values: Vec<serde_json::Value> = leases
            .iter()
            .map(|((k, d), (h, c))| serde_json::json!([k, d, h, c]))
            .collect();
        // An upsert of rows read above (it never inserts), so the batch drives: an
        // UPDATE ... FROM scans the holder's leases.
        sqlx::query(
            "INSERT INTO leases (holder, key_id, day, held, committed)
             SELECT ?1, json_extract(value, '$[0]'), json_extract(value, '$[1]'),
                    json_extract(value, '$[2]'), json_extract(value, '$[3]')
             FROM json_each(?2) WHERE true
             ON CONFLICT (holder, key_id, day)
             DO UPDATE SET held = excluded.held, committed = excluded.committed",
        )
        .bind(holder)
        .bind(serde_json::Value::Array(lease_values).to_string())
        .execute(&mut *tx)
        .await?;
        let rows: Vec<serde_json::Value> = totals
            .iter()
            .map(|((k, d), (s, t))| serde_json::json!([k, d, s, t]))
            .collect();
        let rows = serde_json::Value::Array(rows).to_string();
        let report_rows = |param: &str| {
            format!(
                "SELECT json_extract(value, '$[0]') AS k, json_extract(value, '$[1]') AS d,
                        json_extract(value, '$[2]') AS s, json_extract(value, '$[3]') AS t
                 FROM json_each({param})"
            )
        };
        let rows2 = report_rows("?2");
        let rows1 = report_rows("?1");
        sqlx::query(&format!(
            "DELETE FROM leases WHERE holder = ?1 AND held <= 0 AND committed <= 0
               AND (key_id, day) IN (SELECT k, d FROM ({rows2}))"
        ))
        .bind(holder)
        .bind(&rows)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO ledger (key_id, day) SELECT k, d FROM ({rows1}) WHERE true
             ON CONFLICT (key_id, day) DO NOTHING"
        ))
        .bind(&rows)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "UPDATE ledger SET settled = settled + r.s, held = max(held - r.t, 0)
             FROM ({rows1}) AS r WHERE ledger.key_id = r.k AND ledger.day = r.d"
        ))
        .bind(&rows)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Write-ahead of reservations (`sync::LeaseCommit`), in one transaction: each
    /// (key, day)'s amounts, summed, are added to the holder's lease as committed if the
    /// lease holds that much uncommitted budget and the holder is alive at `now` (its
    /// leases not yet reclaimable). The answers, in the order of `commits`.
    pub async fn lease_commit_many(
        &self,
        holder: &str,
        now: i64,
        commits: &[(String, i64, Micros)],
    ) -> Result<Vec<bool>> {
        let mut sums: HashMap<(&str, i64), i64> = HashMap::new();
        for (k, d, a) in commits {
            let sum = sums.entry((k.as_str(), *d)).or_default();
            *sum = sum.saturating_add(a.0.max(0));
        }
        if sums.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<serde_json::Value> = sums
            .iter()
            .map(|((k, d), a)| serde_json::json!([k, d, a]))
            .collect();
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let alive: Option<i64> =
            sqlx::query_scalar("SELECT alive_until FROM holders WHERE id = ?1")
                .bind(holder)
                .fetch_optional(&mut *tx)
                .await?;
        if alive.is_none_or(|until| until < now) {
            tx.rollback().await?;
            return Ok(vec![false; commits.len()]);
        }
        // Only rows read from `leases` are upserted (it never inserts); the batch drives
        // with one primary-key probe per row.
        let done = sqlx::query(
            "INSERT INTO leases (holder, key_id, day, held, committed)
             SELECT l.holder, l.key_id, l.day, l.held, json_extract(r.value, '$[2]')
             FROM json_each(?2) AS r
             CROSS JOIN leases AS l
               ON l.holder = ?1 AND l.key_id = json_extract(r.value, '$[0]')
                  AND l.day = json_extract(r.value, '$[1]')
             WHERE l.committed + json_extract(r.value, '$[2]') <= l.held
             ON CONFLICT (holder, key_id, day)
             DO UPDATE SET committed = committed + excluded.committed
             RETURNING key_id, day",
        )
        .bind(holder)
        .bind(serde_json::Value::Array(rows).to_string())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let ok: std::collections::HashSet<(String, i64)> = done
            .iter()
            .map(|r| (r.get("key_id"), r.get("day")))
            .collect();
        Ok(commits
            .iter()
            .map(|(k, d, _)| ok.contains(&(k.clone(), *d)))
            .collect())
    }
}

/// One row of a holder's spend report (`Store::lease_report_many`).
#[derive(Debug, Clone, Default)]
pub struct ReportRow {
    pub key_id: String,
    pub day: i64,
    /// Added to the key's settled spend (spent from the lease, and overspent beyond it).
    pub settled: Micros,
    /// Spent from the lease: leaves it and its committed part.
    pub spent: Micros,
    /// Given back to the key: leaves the lease.
    pub returned: Micros,
    /// Committed and not spent, back in the holder's lease: leaves the committed part.
    pub unreserved: Micros,
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store(name: &str) -> Store {
        let dir = std::env::temp_dir().join(format!("keybrake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Store::open(&dir).await.unwrap()
    }

    fn row(key: &str, settled: i64, spent: i64, returned: i64, unreserved: i64) -> ReportRow {
        ReportRow {
            key_id: key.into(),
            day: 7,
            settled: Micros(settled),
            spent: Micros(spent),
            returned: Micros(returned),
            unreserved: Micros(unreserved),
        }
    }

    fn commit(key: &str, amount: i64) -> (String, i64, Micros) {
        (key.into(), 7, Micros(amount))
    }

    #[tokio::test]
    async fn committed_budget_stays_held_until_reported_and_is_settled_when_its_holder_dies() {
        let s = store("commit-many").await;
        s.register_holder("h1", 0, 100).await.unwrap();
        let grants = s
            .lease_grant_many("h1", &[ask("k_a", 10, 1, 10), ask("k_b", 10, 1, 4)])
            .await
            .unwrap();
        assert_eq!(grants, vec![Micros(10), Micros(4)]);
        // Two rows of one key are summed; a key without a lease, or beyond it, is refused.
        let answers = s
            .lease_commit_many(
                "h1",
                50,
                &[
                    commit("k_a", 3),
                    commit("k_b", 5),
                    commit("k_a", 2),
                    commit("k_c", 1),
                ],
            )
            .await
            .unwrap();
        assert_eq!(answers, vec![true, false, true, false]);
        // k_a: 5 committed. A report of 2 spent, 1 unreserved and all 10 returned leaves
        // the 2 still committed in the lease.
        s.lease_report_many("h1", &[row("k_a", 2, 2, 10, 1)])
            .await
            .unwrap();
        let held = |leases: &[(String, i64, Micros)], k: &str| {
            leases.iter().find(|l| l.0 == k).map(|l| l.2)
        };
        assert_eq!(
            held(&s.leases_of("h1").await.unwrap(), "k_a"),
            Some(Micros(2))
        );
        // Past its life, nothing more is committed.
        assert_eq!(
            s.lease_commit_many("h1", 101, &[commit("k_b", 1)])
                .await
                .unwrap(),
            vec![false]
        );
        // Reclaimed: the 2 committed are settled as spent (whatever the audit trail knew),
        // k_b's 4 (never committed) come back.
        let back = s.reclaim_holder("h1", &HashMap::new()).await.unwrap();
        assert_eq!(back, Micros(4));
        assert_eq!(s.ledger_row("k_a", 7).await.unwrap().settled, Micros(4));
        assert_eq!(s.ledger_row("k_a", 7).await.unwrap().held, Micros::ZERO);
        let again = s
            .lease_grant_many("h2", &[ask("k_a", 10, 1, 10), ask("k_b", 10, 1, 10)])
            .await
            .unwrap();
        assert_eq!(again, vec![Micros(6), Micros(10)]);
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
        let s = store("grant-many").await;
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
                row("k_b", 7, 7, 0, 0),
                row("k_b", 0, 0, 3, 0),
                row("k_a", 1, 0, 2, 0),
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
