//! Budget leases for many keys in one transaction: the grants of a batch of first leases
//! and a round of spend reports, each a handful of statements whatever the number of keys,
//! instead of a few statements per key. The batch travels as one parameter: a JSON array
//! read with `json_each` on SQLite, arrays read with `unnest` on PostgreSQL. Every
//! statement is a round trip (to SQLite's connection thread, or over the network): per
//! key, those round trips cost more than a fresh key's signature check.
//!
//! The grant rule: the remaining budget (`cap` less settled and held) is checked and
//! taken in one conditional statement, so processes sharing the
//! database never grant more than a cap together. On PostgreSQL the `UPDATE` re-reads a
//! row another replica changed meanwhile (READ COMMITTED re-evaluates the condition on
//! the row's latest version once its lock is granted), and the ledger rows are locked in
//! (key, day) order first, so two replicas' batches never deadlock.
//!
//! Write-ahead: a lease row's `committed` is the part of it that reservations took for
//! calls that may have reached the vendor and were not yet reported spent or unreserved.
//! `lease_commit_many` adds to it before a proxy forwards (or the grant itself does, for
//! the reservation that asked for the lease); reports take from it, and a
//! report returning budget never takes the lease below it; when a holder dies,
//! `Store::reclaim_holder` settles it as spent and gives back only the rest.

use super::store::{in_transaction, on_writer, sqlite_script, Backend, Store, TxConn};
use crate::money::Micros;
use crate::sync::Grant;
use anyhow::Result;
use sqlx::{Arguments, Row};
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
    /// Of the grant, at most this much is recorded as committed (`LeaseRequest::commit`).
    pub commit: Micros,
}

/// The rows of a round of grants as `json_each` reads them from parameter `$N` (`N`
/// replaced): `(key, day)` is unique in one round.
const GRANT_ROWS: &str =
    "SELECT json_extract(value, '$[0]') AS k, json_extract(value, '$[1]') AS d,
        json_extract(value, '$[2]') AS cap, json_extract(value, '$[3]') AS mn,
        json_extract(value, '$[4]') AS wt, json_extract(value, '$[5]') AS c
 FROM json_each($N)";

/// The holder (`$1`) is alive at `$2`: a condition of every statement of a grant on
/// SQLite, which runs as one script (`grant_on_sqlite`).
const HOLDER_ALIVE: &str = "EXISTS (SELECT 1 FROM holders WHERE id = $1 AND alive_until >= $2)";

/// The same rows on PostgreSQL: one array per column.
const PG_GRANT_ROWS: &str =
    "SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[])
         AS r(k, d, cap, mn, wt)";

/// A report's settled spend (`r.s`, never negative) added to a ledger row, saturating at
/// 2^62 micro-USD (far past any cap) instead of overflowing: no report, however large,
/// can make the row unreadable or wrap it around to a small number.
const SETTLE: &str = "CASE WHEN r.s > 4611686018427387904 - ledger.settled
     THEN 4611686018427387904 ELSE ledger.settled + r.s END";

/// The grant taken from a row (`r`) of the batch: the remaining budget, at most `wt`,
/// or nothing when it is below `mn`. The same text on both backends.
const GRANT: &str = "CASE WHEN r.cap - ledger.settled - ledger.held >= r.mn
     THEN CASE WHEN r.wt < r.cap - ledger.settled - ledger.held
               THEN r.wt ELSE r.cap - ledger.settled - ledger.held END
     ELSE 0 END";

impl Store {
    /// `lease_grant` for every request, in one transaction: the grants, in the order of
    /// `requests` (none where the key's remaining budget is below `min`). Of each grant,
    /// up to the request's `commit` joins the lease as committed in the same statement
    /// (the write-ahead of the reservation that asked, see the module comment).
    ///
    /// Nothing is granted to a holder that is not alive at `now` (never registered, past
    /// its life, or reclaimed): a lease granted then would never be given back. The
    /// holder's row is read first, shared-locked on PostgreSQL, so a reclaim running at
    /// the same time either sees this grant's leases or makes it grant nothing.
    ///
    /// `batch` is the node session's number for these requests: what they granted is
    /// recorded under it (table `lease_batches`), so a batch whose answer the node never
    /// got comes back whole when the node names it lost (`lease_report_many`); a batch
    /// already named lost grants nothing. `None` (the in-process ledger, whose answers
    /// cannot be lost, or a node older than the numbering) records nothing.
    pub async fn lease_grant_many(
        &self,
        holder: &str,
        now: i64,
        batch: Option<u64>,
        requests: &[GrantRequest],
    ) -> Result<Vec<Grant>> {
        let mut grants = vec![Grant::NONE; requests.len()];
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
        let pool = match &self.backend {
            Backend::Sqlite { writer, .. } => {
                return grant_on_sqlite(writer, holder, now, batch, requests, &rounds).await;
            }
            Backend::Postgres(pool) => pool,
        };
        let mut tx = pool.begin().await?;
        let alive: Option<i64> =
            sqlx::query_scalar("SELECT alive_until FROM holders WHERE id = $1 FOR SHARE")
                .bind(holder)
                .fetch_optional(&mut *tx)
                .await?;
        if alive.is_none_or(|until| until < now) {
            tx.rollback().await?;
            return Ok(grants);
        }
        // Named lost already (read under the holder's lock, which the report naming it
        // takes exclusively): this copy arrived late, and grants nothing.
        let batch = batch.map(batch_number);
        if let Some(number) = batch {
            let lost: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM lease_batches
                                 WHERE holder = $1 AND batch = $2 AND round = -1)",
            )
            .bind(holder)
            .bind(number)
            .fetch_one(&mut *tx)
            .await?;
            if lost {
                tx.rollback().await?;
                return Ok(grants);
            }
        }
        for (n, round) in rounds.iter().enumerate() {
            let asks: Vec<&GrantRequest> = round.iter().map(|&i| &requests[i]).collect();
            let granted = pg_grant_round(&mut tx, &asks).await?;
            let mut leases: Vec<NewLease> = Vec::new();
            for &i in round {
                let r = &requests[i];
                let Some(&(g, settled)) = granted.get(&(r.key_id.clone(), r.day)) else {
                    continue;
                };
                grants[i] = grant_of(r, g, settled);
                if g > 0 {
                    leases.push(NewLease {
                        key_id: &r.key_id,
                        day: r.day,
                        held: g,
                        committed: grants[i].committed.0,
                    });
                }
            }
            if !leases.is_empty() {
                pg_add_leases(&mut tx, holder, &leases).await?;
                if let Some(number) = batch {
                    let record: Vec<serde_json::Value> = leases
                        .iter()
                        .map(|l| serde_json::json!([l.key_id, l.day, l.held, l.committed]))
                        .collect();
                    sqlx::query(
                        "INSERT INTO lease_batches (holder, batch, round, at_ms, grants)
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(holder)
                    .bind(number)
                    .bind(n as i64)
                    .bind(now.saturating_mul(1000))
                    .bind(serde_json::Value::Array(record).to_string())
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(grants)
    }

    /// What a holder did with its leases, in one transaction, each row applied in order:
    /// `settled` is added to the key's settled spend; `spent` and `unreserved` leave the
    /// lease's committed part (`lease_commit_many`); `spent` and `returned` leave the
    /// lease, and the key's held budget, as far as the lease holds uncommitted budget
    /// (none of it when the lease was already given back because the holder was taken
    /// for dead): committed budget stays held until its call is reported.
    ///
    /// `batch` is the node session's number for these rows (see `MARK_REPORT_BATCH`):
    /// false, and nothing changed, when that batch (or a later one of the holder's) is
    /// already applied. `None` (the in-process ledger, a node older than the numbering)
    /// applies the rows every time.
    ///
    /// `lost` names the holder's lease batches whose answers it never got (see
    /// `lease_grant_many`): what each granted leaves the leases and the key's held budget,
    /// its committed part included (no call was forwarded on it), before the rows are
    /// applied; and each is marked lost, so a copy arriving later grants nothing.
    pub async fn lease_report_many(
        &self,
        holder: &str,
        batch: Option<u64>,
        reports: &[ReportRow],
        lost: &[u64],
    ) -> Result<bool> {
        if reports.is_empty() && lost.is_empty() {
            return Ok(true);
        }
        let lost: Vec<i64> = lost.iter().map(|&n| batch_number(n)).collect();
        in_transaction!(self, |tx| {
            // The mark first: on PostgreSQL it locks the holder's `report_batches` row, so
            // a copy of this batch given to another replica waits for this transaction,
            // then finds the batch applied (or, if this one rolled back, applies it).
            // Only reports of this holder take that lock, always before ledger rows.
            if let Some(number) = batch {
                let marked = sqlx::query(MARK_REPORT_BATCH)
                    .bind(holder)
                    .bind(batch_number(number))
                    .bind(self.now_ms())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if marked == 0 {
                    tx.rollback().await?;
                    return Ok(false);
                }
            }
            let lost_grants = if lost.is_empty() {
                Vec::new()
            } else {
                tx.take_lost_batches(holder, &lost, self.now_ms()).await?
            };
            let mut slots: Vec<(&str, i64)> = (reports.iter())
                .map(|r| (r.key_id.as_str(), r.day))
                .chain(lost_grants.iter().map(|g| (g.0.as_str(), g.1)))
                .collect();
            slots.sort_unstable();
            slots.dedup();
            // Ledger rows first, then leases: the order every transaction locks in.
            tx.lock_ledger_rows(&slots).await?;
            let mut leases = tx.held_leases(holder, &slots).await?;
            // Per (key, day): settled added, taken from the lease, uncommitted.
            let mut totals: HashMap<(String, i64), (i64, i64, i64)> = HashMap::new();
            // A lost grant first: its committed part leaves the lease's committed budget,
            // then as much as it granted leaves the lease, from what is not committed.
            // (A report that gave back the lease's uncommitted budget meanwhile, the node
            // in doubt, took part of it already: the lease never goes below what other
            // calls committed.) No lease: the holder's leases were reclaimed.
            for (key_id, day, granted, committed) in &lost_grants {
                let slot = (key_id.clone(), *day);
                if let Some((held, lease_committed)) = leases.get_mut(&slot) {
                    let uncommit = (*committed).clamp(0, (*lease_committed).max(0));
                    *lease_committed -= uncommit;
                    let take = (*granted).clamp(0, (*held - *lease_committed).max(0));
                    *held -= take;
                    let t = totals.entry(slot).or_default();
                    t.1 = t.1.saturating_add(take);
                    t.2 = t.2.saturating_add(uncommit);
                }
            }
            for r in reports {
                let slot = (r.key_id.clone(), r.day);
                let (take, uncommit, settle) = match leases.get_mut(&slot) {
                    Some((held, committed)) => {
                        let done = r.spent.0.max(0).saturating_add(r.unreserved.0.max(0));
                        let uncommit = done.clamp(0, (*committed).max(0));
                        *committed -= uncommit;
                        let leave = if r.return_uncommitted {
                            i64::MAX
                        } else {
                            r.spent.0.max(0).saturating_add(r.returned.0.max(0))
                        };
                        let take = leave.clamp(0, (*held - *committed).max(0));
                        *held -= take;
                        (take, uncommit, r.settled.0)
                    }
                    // No lease: spent from a lease that was reclaimed, whose committed
                    // budget (every call it forwarded) the reclaim settled already, or
                    // from none at all. Only what went beyond any lease (the overspent
                    // part, `settled` less `spent`) is new spend.
                    None => (0, 0, r.settled.0.saturating_sub(r.spent.0.max(0)).max(0)),
                };
                let t = totals.entry(slot).or_default();
                t.0 = t.0.saturating_add(settle);
                t.1 = t.1.saturating_add(take);
                t.2 = t.2.saturating_add(uncommit);
            }
            let mut totals: Vec<Report> = totals
                .into_iter()
                .map(|((key_id, day), (settled, taken, uncommitted))| Report {
                    key_id,
                    day,
                    settled,
                    taken,
                    uncommitted,
                })
                .collect();
            totals.sort_unstable_by(|a, b| (&a.key_id, a.day).cmp(&(&b.key_id, b.day)));
            tx.apply_reports(holder, &totals).await?;
            tx.commit().await?;
        });
        Ok(true)
    }

    /// Deletes the `lease_batches` rows written before `before_ms` (Unix ms): how many.
    pub async fn prune_lease_batches(&self, before_ms: i64) -> Result<u64> {
        self.delete_written_before("lease_batches", before_ms).await
    }

    /// Deletes the `report_batches` rows of sessions that reported nothing since
    /// `before_ms` (Unix ms): how many.
    pub async fn prune_report_batches(&self, before_ms: i64) -> Result<u64> {
        self.delete_written_before("report_batches", before_ms)
            .await
    }

    /// Deletes the rows of `table` (one of the batch marks, with an `at_ms` column) whose
    /// `at_ms` is before `before_ms`: how many.
    async fn delete_written_before(&self, table: &'static str, before_ms: i64) -> Result<u64> {
        let sql = format!("DELETE FROM {table} WHERE at_ms < $1");
        Ok(on_writer!(self, |pool| sqlx::query(&sql)
            .bind(before_ms)
            .execute(pool)
            .await?
            .rows_affected()))
    }
}

/// The grant answered for `request` when the ledger took `granted` for it (0: refused):
/// of it, up to the request's `commit` is committed; `settled` is the key's settled spend
/// that day as the grant's statement read it.
fn grant_of(request: &GrantRequest, granted: i64, settled: i64) -> Grant {
    let granted = granted.max(0);
    Grant {
        granted: Micros(granted),
        committed: Micros(request.commit.0.clamp(0, granted)),
        revoked: false,
        settled: Some(Micros(settled)),
    }
}

/// `Store::lease_grant_many` on SQLite: every round's statements in one script, one trip
/// to SQLite's thread (`store::sqlite_script`). `$3` is the batch's number (or NULL); each
/// round is a JSON parameter (`$4`, `$5`, …); its statements make the ledger rows, take
/// the grants (the answer rows, with the round's number), add them to the holder's leases
/// and record them under the batch, each only while the holder is alive and the batch not
/// named lost (so otherwise nothing is granted and nothing changes).
async fn grant_on_sqlite(
    writer: &sqlx::SqlitePool,
    holder: &str,
    now: i64,
    batch: Option<u64>,
    requests: &[GrantRequest],
    rounds: &[Vec<usize>],
) -> Result<Vec<Grant>> {
    const ALLOWED: &str = "NOT EXISTS (SELECT 1 FROM lease_batches
                                WHERE holder = $1 AND batch = $3 AND round = -1)";
    let mut script = String::from("BEGIN IMMEDIATE;");
    for n in 0..rounds.len() {
        let rows = GRANT_ROWS.replace("$N", &format!("${}", n + 4));
        let alive = format!("{HOLDER_ALIVE} AND {ALLOWED}");
        script.push_str(&format!(
            "INSERT INTO ledger (key_id, day) SELECT k, d FROM ({rows}) WHERE {alive}
                 ON CONFLICT (key_id, day) DO NOTHING;
             UPDATE ledger SET last_grant = {GRANT}, held = ledger.held + {GRANT}
                 FROM ({rows}) AS r
                 WHERE ledger.key_id = r.k AND ledger.day = r.d AND {alive}
                 RETURNING {n} AS round, key_id, day, last_grant, settled;
             INSERT INTO leases (holder, key_id, day, held, committed)
                 SELECT $1, r.k, r.d, l.last_grant, min(max(r.c, 0), l.last_grant)
                 FROM ({rows}) AS r JOIN ledger AS l ON l.key_id = r.k AND l.day = r.d
                 WHERE l.last_grant > 0 AND {alive}
                 ON CONFLICT (holder, key_id, day) DO UPDATE
                 SET held = leases.held + excluded.held,
                     committed = leases.committed + excluded.committed;
             INSERT INTO lease_batches (holder, batch, round, at_ms, grants)
                 SELECT $1, $3, {n}, $2 * 1000, json_group_array(json_array(
                     r.k, r.d, l.last_grant, min(max(r.c, 0), l.last_grant)))
                 FROM ({rows}) AS r JOIN ledger AS l ON l.key_id = r.k AND l.day = r.d
                 WHERE $3 IS NOT NULL AND l.last_grant > 0 AND {alive}
                 HAVING count(*) > 0;"
        ));
    }
    script.push_str("COMMIT;");
    let mut arguments = sqlx::sqlite::SqliteArguments::default();
    let bad = |e| anyhow::anyhow!("cannot bind a grant's parameter: {e}");
    arguments.add(holder.to_string()).map_err(bad)?;
    arguments.add(now).map_err(bad)?;
    arguments.add(batch.map(batch_number)).map_err(bad)?;
    for round in rounds {
        let rows: Vec<serde_json::Value> = round
            .iter()
            .map(|&i| {
                let r = &requests[i];
                serde_json::json!([r.key_id, r.day, r.cap.0, r.min.0, r.want.0, r.commit.0])
            })
            .collect();
        arguments
            .add(serde_json::Value::Array(rows).to_string())
            .map_err(bad)?;
    }
    let mut granted: HashMap<(i64, String, i64), (i64, i64)> = HashMap::new();
    for row in sqlite_script(writer, script, arguments).await? {
        granted.insert(
            (row.get("round"), row.get("key_id"), row.get("day")),
            (row.get("last_grant"), row.get("settled")),
        );
    }
    let mut grants = vec![Grant::NONE; requests.len()];
    for (n, round) in rounds.iter().enumerate() {
        for &i in round {
            let r = &requests[i];
            if let Some(&(g, settled)) = granted.get(&(n as i64, r.key_id.clone(), r.day)) {
                grants[i] = grant_of(r, g, settled);
            }
        }
    }
    Ok(grants)
}

/// A node's batch number as the tables keep it (a signed 64-bit column).
fn batch_number(number: u64) -> i64 {
    number.min(i64::MAX as u64) as i64
}

/// Marks a node's report batch applied, in the transaction that applies it: changes one
/// row, or none when that batch (or a later one of its session) is already applied. A
/// session sends its batches one at a time, numbered from 1, so the highest number
/// applied is all that is kept (table `report_batches`, migration 0003). On PostgreSQL,
/// `ON CONFLICT DO UPDATE … WHERE` waits for a concurrent transaction that inserted or
/// updated the same holder's row and then re-checks the condition on the committed row:
/// of two replicas given the same batch at once, exactly one applies it. The same text
/// on both backends.
const MARK_REPORT_BATCH: &str = "INSERT INTO report_batches (holder, last_batch, at_ms) \
     VALUES ($1, $2, $3) ON CONFLICT (holder) DO UPDATE \
     SET last_batch = excluded.last_batch, at_ms = excluded.at_ms \
     WHERE report_batches.last_batch < excluded.last_batch";

/// A (key, day)'s share of a round of reports: spend to settle, lease budget released,
/// committed budget uncommitted.
struct Report {
    key_id: String,
    day: i64,
    settled: i64,
    taken: i64,
    uncommitted: i64,
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
    /// Every uncommitted part of the lease leaves it (`LeaseReport::return_uncommitted`).
    pub return_uncommitted: bool,
}

impl Store {
    /// Write-ahead of reservations (`sync::LeaseCommit`), in one transaction: each
    /// (key, day)'s amounts, summed, are added to the holder's lease as committed if the
    /// lease holds that much uncommitted budget and the holder is alive at `now` (its
    /// leases not yet reclaimable). The answers, in the order of `commits`. On
    /// PostgreSQL the lease rows are locked in (key, day) order, like a report's; a
    /// reclaim that took them first leaves nothing to commit.
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
        let mut rows: Vec<(&str, i64, i64)> =
            sums.into_iter().map(|((k, d), a)| (k, d, a)).collect();
        rows.sort_unstable();
        let done = in_transaction!(self, |tx| {
            let alive: Option<i64> =
                sqlx::query_scalar("SELECT alive_until FROM holders WHERE id = $1")
                    .bind(holder)
                    .fetch_optional(&mut *tx)
                    .await?;
            if alive.is_none_or(|until| until < now) {
                tx.rollback().await?;
                std::collections::HashSet::new()
            } else {
                let done = tx.commit_leases(holder, &rows).await?;
                tx.commit().await?;
                done
            }
        });
        Ok(commits
            .iter()
            .map(|(k, d, _)| done.contains(&(k.clone(), *d)))
            .collect())
    }
}

/// A grant joining the holder's lease on (key, day): `held` more, `committed` of it
/// committed.
struct NewLease<'a> {
    key_id: &'a str,
    day: i64,
    held: i64,
    committed: i64,
}

/// The batch statements, per backend (the batch is a JSON array or a set of arrays).
#[allow(async_fn_in_trait)]
trait BatchConn {
    /// What the holder's leases on these (key, day)s hold now, and how much of it is
    /// committed (locked on PostgreSQL).
    async fn held_leases(
        &mut self,
        holder: &str,
        slots: &[(&str, i64)],
    ) -> Result<HashMap<(String, i64), (i64, i64)>>;
    /// Adds each (key, day, amount) to the holder's lease as committed where the lease
    /// holds that much uncommitted budget: the (key, day)s committed.
    async fn commit_leases(
        &mut self,
        holder: &str,
        rows: &[(&str, i64, i64)],
    ) -> Result<std::collections::HashSet<(String, i64)>>;
    /// Releases the taken budget from the leases (deleting emptied ones) and applies
    /// settled spend and releases to the ledger.
    async fn apply_reports(&mut self, holder: &str, totals: &[Report]) -> Result<()>;
    /// The grants recorded under the holder's lease `batches` (key, day, granted,
    /// committed), their records deleted and each batch marked lost (`at_ms` now).
    async fn take_lost_batches(
        &mut self,
        holder: &str,
        batches: &[i64],
        at_ms: i64,
    ) -> Result<Vec<LostGrant>>;
}

/// A grant of a lease batch named lost: key, day, granted, committed.
type LostGrant = (String, i64, i64, i64);

/// The grants of `lease_batches` rows (their `grants` column).
fn lost_grants(records: Vec<String>) -> Result<Vec<LostGrant>> {
    let mut grants = Vec::new();
    for record in records {
        grants.extend(serde_json::from_str::<Vec<LostGrant>>(&record)?);
    }
    Ok(grants)
}

impl BatchConn for SqliteConnection {
    async fn held_leases(
        &mut self,
        holder: &str,
        slots: &[(&str, i64)],
    ) -> Result<HashMap<(String, i64), (i64, i64)>> {
        let keys: Vec<serde_json::Value> = slots
            .iter()
            .map(|(k, d)| serde_json::json!([k, d]))
            .collect();
        Ok(sqlx::query(
            // CROSS JOIN keeps the batch the outer loop: one primary-key probe per row, not
            // a scan of all the holder's leases.
            "SELECT l.key_id, l.day, l.held, l.committed FROM json_each($2) AS r
             CROSS JOIN leases AS l
               ON l.holder = $1 AND l.key_id = json_extract(r.value, '$[0]')
                  AND l.day = json_extract(r.value, '$[1]')",
        )
        .bind(holder)
        .bind(serde_json::Value::Array(keys).to_string())
        .fetch_all(&mut *self)
        .await?
        .iter()
        .map(|r| {
            (
                (r.get("key_id"), r.get("day")),
                (r.get("held"), r.get("committed")),
            )
        })
        .collect())
    }

    async fn commit_leases(
        &mut self,
        holder: &str,
        rows: &[(&str, i64, i64)],
    ) -> Result<std::collections::HashSet<(String, i64)>> {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|(k, d, a)| serde_json::json!([k, d, a]))
            .collect();
        // Only rows read from `leases` are upserted (it never inserts); the batch drives,
        // one primary-key probe per row.
        Ok(sqlx::query(
            "INSERT INTO leases (holder, key_id, day, held, committed)
             SELECT l.holder, l.key_id, l.day, l.held, json_extract(r.value, '$[2]')
             FROM json_each($2) AS r
             CROSS JOIN leases AS l
               ON l.holder = $1 AND l.key_id = json_extract(r.value, '$[0]')
                  AND l.day = json_extract(r.value, '$[1]')
             WHERE l.committed + json_extract(r.value, '$[2]') <= l.held
             ON CONFLICT (holder, key_id, day)
             DO UPDATE SET committed = leases.committed + excluded.committed
             RETURNING key_id, day",
        )
        .bind(holder)
        .bind(serde_json::Value::Array(rows).to_string())
        .fetch_all(&mut *self)
        .await?
        .iter()
        .map(|r| (r.get("key_id"), r.get("day")))
        .collect())
    }

    async fn apply_reports(&mut self, holder: &str, totals: &[Report]) -> Result<()> {
        let rows: Vec<serde_json::Value> = totals
            .iter()
            .map(|r| serde_json::json!([r.key_id, r.day, r.settled, r.taken, r.uncommitted]))
            .collect();
        let rows = serde_json::Value::Array(rows).to_string();
        let report_rows = |param: &str| {
            format!(
                "SELECT json_extract(value, '$[0]') AS k, json_extract(value, '$[1]') AS d,
                        json_extract(value, '$[2]') AS s, json_extract(value, '$[3]') AS t,
                        json_extract(value, '$[4]') AS u
                 FROM json_each({param})"
            )
        };
        let rows2 = report_rows("$2");
        let rows1 = report_rows("$1");
        // An upsert, so the batch drives (an UPDATE ... FROM scans the holder's leases).
        // Only leases read above have a take or an uncommit, so it never inserts.
        sqlx::query(&format!(
            "INSERT INTO leases (holder, key_id, day, held, committed)
             SELECT $1, k, d, -t, -u FROM ({rows2})
             WHERE t > 0 OR u > 0
             ON CONFLICT (holder, key_id, day) DO UPDATE SET held = leases.held + excluded.held,
                 committed = leases.committed + excluded.committed"
        ))
        .bind(holder)
        .bind(&rows)
        .execute(&mut *self)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM leases WHERE holder = $1 AND held <= 0 AND committed <= 0
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
            "UPDATE ledger SET settled = {SETTLE}, held = max(held - r.t, 0)
             FROM ({rows1}) AS r WHERE ledger.key_id = r.k AND ledger.day = r.d"
        ))
        .bind(&rows)
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn take_lost_batches(
        &mut self,
        holder: &str,
        batches: &[i64],
        at_ms: i64,
    ) -> Result<Vec<LostGrant>> {
        let numbers = serde_json::json!(batches).to_string();
        let records: Vec<String> = sqlx::query_scalar(
            "DELETE FROM lease_batches WHERE holder = $1 AND round >= 0
               AND batch IN (SELECT value FROM json_each($2))
             RETURNING grants",
        )
        .bind(holder)
        .bind(&numbers)
        .fetch_all(&mut *self)
        .await?;
        sqlx::query(
            "INSERT INTO lease_batches (holder, batch, round, at_ms, grants)
             SELECT $1, value, -1, $3, '[]' FROM json_each($2) WHERE true
             ON CONFLICT (holder, batch, round) DO NOTHING",
        )
        .bind(holder)
        .bind(&numbers)
        .bind(at_ms)
        .execute(&mut *self)
        .await?;
        lost_grants(records)
    }
}

impl BatchConn for PgConnection {
    async fn held_leases(
        &mut self,
        holder: &str,
        slots: &[(&str, i64)],
    ) -> Result<HashMap<(String, i64), (i64, i64)>> {
        let keys: Vec<&str> = slots.iter().map(|s| s.0).collect();
        let days: Vec<i64> = slots.iter().map(|s| s.1).collect();
        Ok(sqlx::query(
            "SELECT l.key_id, l.day, l.held, l.committed
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
        .map(|r| {
            (
                (r.get("key_id"), r.get("day")),
                (r.get("held"), r.get("committed")),
            )
        })
        .collect())
    }

    async fn commit_leases(
        &mut self,
        holder: &str,
        rows: &[(&str, i64, i64)],
    ) -> Result<std::collections::HashSet<(String, i64)>> {
        let keys: Vec<&str> = rows.iter().map(|r| r.0).collect();
        let days: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let amounts: Vec<i64> = rows.iter().map(|r| r.2).collect();
        // Locked in (key, day) order first, like a report's leases, then updated.
        sqlx::query(
            "SELECT 1 FROM unnest($2::TEXT[], $3::BIGINT[]) AS r(k, d)
             JOIN leases AS l ON l.holder = $1 AND l.key_id = r.k AND l.day = r.d
             ORDER BY l.key_id, l.day
             FOR UPDATE OF l",
        )
        .bind(holder)
        .bind(&keys)
        .bind(&days)
        .fetch_all(&mut *self)
        .await?;
        Ok(sqlx::query(
            "UPDATE leases SET committed = leases.committed + r.a
             FROM unnest($2::TEXT[], $3::BIGINT[], $4::BIGINT[]) AS r(k, d, a)
             WHERE leases.holder = $1 AND leases.key_id = r.k AND leases.day = r.d
               AND leases.committed + r.a <= leases.held
             RETURNING leases.key_id, leases.day",
        )
        .bind(holder)
        .bind(&keys)
        .bind(&days)
        .bind(&amounts)
        .fetch_all(&mut *self)
        .await?
        .iter()
        .map(|r| (r.get("key_id"), r.get("day")))
        .collect())
    }

    async fn apply_reports(&mut self, holder: &str, totals: &[Report]) -> Result<()> {
        let keys: Vec<&str> = totals.iter().map(|t| t.key_id.as_str()).collect();
        let days: Vec<i64> = totals.iter().map(|t| t.day).collect();
        let settled: Vec<i64> = totals.iter().map(|t| t.settled).collect();
        let taken: Vec<i64> = totals.iter().map(|t| t.taken).collect();
        let uncommitted: Vec<i64> = totals.iter().map(|t| t.uncommitted).collect();
        const ROWS: &str = "unnest($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[],
                   $6::BIGINT[]) AS r(k, d, s, t, u)";
        for sql in [
            format!(
                "UPDATE leases SET held = leases.held - r.t,
                                   committed = leases.committed - r.u FROM {ROWS}
                 WHERE leases.holder = $5 AND leases.key_id = r.k AND leases.day = r.d
                   AND (r.t > 0 OR r.u > 0)"
            ),
            format!(
                "DELETE FROM leases USING {ROWS}
                 WHERE leases.holder = $5 AND leases.key_id = r.k AND leases.day = r.d
                   AND leases.held <= 0 AND leases.committed <= 0"
            ),
            format!(
                "INSERT INTO ledger (key_id, day) SELECT r.k, r.d FROM {ROWS}
                 WHERE $5::TEXT IS NOT NULL
                 ON CONFLICT (key_id, day) DO NOTHING"
            ),
            format!(
                "UPDATE ledger SET settled = {SETTLE},
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
                .bind(&uncommitted)
                .execute(&mut *self)
                .await?;
        }
        Ok(())
    }

    async fn take_lost_batches(
        &mut self,
        holder: &str,
        batches: &[i64],
        at_ms: i64,
    ) -> Result<Vec<LostGrant>> {
        // The holder's row exclusively: a grant of one of these batches under way (it
        // holds the row shared) commits first and is seen below; one that comes later
        // waits for this transaction and then finds its batch marked lost.
        sqlx::query("SELECT 1 FROM holders WHERE id = $1 FOR UPDATE")
            .bind(holder)
            .fetch_optional(&mut *self)
            .await?;
        let records: Vec<String> = sqlx::query_scalar(
            "DELETE FROM lease_batches WHERE holder = $1 AND round >= 0 AND batch = ANY($2)
             RETURNING grants",
        )
        .bind(holder)
        .bind(batches)
        .fetch_all(&mut *self)
        .await?;
        sqlx::query(
            "INSERT INTO lease_batches (holder, batch, round, at_ms, grants)
             SELECT $1, b, -1, $3, '[]' FROM unnest($2::BIGINT[]) AS b
             ON CONFLICT (holder, batch, round) DO NOTHING",
        )
        .bind(holder)
        .bind(batches)
        .bind(at_ms)
        .execute(&mut *self)
        .await?;
        lost_grants(records)
    }
}

/// Takes the grants of one round (each (key, day) at most once) on PostgreSQL: the grant
/// per (key, day), zero when nothing was granted, with the key's settled spend that day.
async fn pg_grant_round(
    conn: &mut PgConnection,
    asks: &[&GrantRequest],
) -> Result<HashMap<(String, i64), (i64, i64)>> {
    let keys: Vec<&str> = asks.iter().map(|r| r.key_id.as_str()).collect();
    let column = |f: fn(&GrantRequest) -> i64| -> Vec<i64> { asks.iter().map(|r| f(r)).collect() };
    let (days, caps, mins, wants) = (
        column(|r| r.day),
        column(|r| r.cap.0),
        column(|r| r.min.0),
        column(|r| r.want.0),
    );
    // Rows come into being in (key, day) order, then are locked in that order before
    // the grant reads them (`lock_ledger_rows`).
    let slots: Vec<(&str, i64)> = keys.iter().copied().zip(days.iter().copied()).collect();
    conn.lock_ledger_rows(&slots).await?;
    Ok(sqlx::query(&format!(
        "UPDATE ledger SET last_grant = {GRANT}, held = ledger.held + {GRANT}
         FROM ({PG_GRANT_ROWS}) AS r
         WHERE ledger.key_id = r.k AND ledger.day = r.d
         RETURNING ledger.key_id, ledger.day, ledger.last_grant, ledger.settled"
    ))
    .bind(&keys)
    .bind(&days)
    .bind(&caps)
    .bind(&mins)
    .bind(&wants)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| {
        (
            (r.get("key_id"), r.get("day")),
            (r.get("last_grant"), r.get("settled")),
        )
    })
    .collect())
}

/// Adds grants to the holder's lease rows on PostgreSQL.
async fn pg_add_leases(
    conn: &mut PgConnection,
    holder: &str,
    leases: &[NewLease<'_>],
) -> Result<()> {
    let keys: Vec<&str> = leases.iter().map(|l| l.key_id).collect();
    let days: Vec<i64> = leases.iter().map(|l| l.day).collect();
    let held: Vec<i64> = leases.iter().map(|l| l.held).collect();
    let committed: Vec<i64> = leases.iter().map(|l| l.committed).collect();
    sqlx::query(
        "INSERT INTO leases (holder, key_id, day, held, committed)
         SELECT $1, k, d, h, c
         FROM unnest($2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[]) AS r(k, d, h, c)
         ON CONFLICT (holder, key_id, day) DO UPDATE SET held = leases.held + excluded.held,
             committed = leases.committed + excluded.committed",
    )
    .bind(holder)
    .bind(keys)
    .bind(days)
    .bind(held)
    .bind(committed)
    .execute(&mut *conn)
    .await?;
    Ok(())
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

    fn row(key: &str, settled: i64, spent: i64, returned: i64, unreserved: i64) -> ReportRow {
        ReportRow {
            key_id: key.into(),
            day: 7,
            settled: Micros(settled),
            spent: Micros(spent),
            returned: Micros(returned),
            unreserved: Micros(unreserved),
            return_uncommitted: false,
        }
    }

    fn commit(key: &str, amount: i64) -> (String, i64, Micros) {
        (key.into(), 7, Micros(amount))
    }

    #[tokio::test]
    async fn committed_budget_stays_held_until_reported_and_is_settled_when_its_holder_dies() {
        committed_budget(store("commit-many").await).await;
        committed_budget(crate::control::store::tests::postgres().await).await;
    }

    async fn committed_budget(s: Store) {
        s.register_holder("h1", 0, 100).await.unwrap();
        let grants = s
            .lease_grant_many(
                "h1",
                50,
                None,
                &[ask("k_a", 10, 1, 10), ask("k_b", 10, 1, 4)],
            )
            .await
            .unwrap();
        assert_eq!(granted(grants), vec![Micros(10), Micros(4)]);
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
        s.lease_report_many("h1", None, &[row("k_a", 2, 2, 10, 1)], &[])
            .await
            .unwrap();
        let leases = s.leases_of("h1").await.unwrap();
        let held = leases.iter().find(|l| l.0 == "k_a").map(|l| l.2);
        assert_eq!(held, Some(Micros(2)));
        // Past its life, nothing more is committed.
        assert_eq!(
            s.lease_commit_many("h1", 101, &[commit("k_b", 1)])
                .await
                .unwrap(),
            vec![false]
        );
        // Reclaimed: the 2 committed are settled as spent (whatever the audit trail knew),
        // k_b's 4 (never committed) come back.
        let back = s
            .reclaim_holder("h1", &HashMap::new(), i64::MAX)
            .await
            .unwrap();
        assert_eq!(back, Micros(4));
        assert_eq!(s.ledger_row("k_a", 7).await.unwrap().settled, Micros(4));
        assert_eq!(s.ledger_row("k_a", 7).await.unwrap().held, Micros::ZERO);
        // The stalled holder wakes and reports those 2 as spent, and 1 spent beyond any
        // lease: the 2 were settled by the reclaim, only the 1 is new.
        let late = ReportRow {
            settled: Micros(3),
            ..row("k_a", 0, 2, 0, 0)
        };
        s.lease_report_many("h1", None, &[late], &[]).await.unwrap();
        assert_eq!(s.ledger_row("k_a", 7).await.unwrap().settled, Micros(5));
        s.register_holder("h2", 0, 100).await.unwrap();
        let again = s
            .lease_grant_many(
                "h2",
                50,
                None,
                &[ask("k_a", 10, 1, 10), ask("k_b", 10, 1, 10)],
            )
            .await
            .unwrap();
        let settled: Vec<Option<Micros>> = again.iter().map(|g| g.settled).collect();
        assert_eq!(granted(again), vec![Micros(5), Micros(10)]);
        // Each grant says what its key has settled that day; so does a refused one.
        assert_eq!(settled, vec![Some(Micros(5)), Some(Micros::ZERO)]);
        let refused = s
            .lease_grant_many("h2", 50, None, &[ask("k_a", 10, 1, 10)])
            .await
            .unwrap();
        assert_eq!(
            (refused[0].granted, refused[0].settled),
            (Micros::ZERO, Some(Micros(5)))
        );
    }

    fn ask(key: &str, cap: i64, min: i64, want: i64) -> GrantRequest {
        GrantRequest {
            key_id: key.into(),
            day: 7,
            cap: Micros(cap),
            min: Micros(min),
            want: Micros(want),
            commit: Micros::ZERO,
        }
    }

    /// `ask` on a $10 cap, `commit` of the grant committed by it.
    fn with_commit(key: &str, min: i64, want: i64, commit: i64) -> GrantRequest {
        GrantRequest {
            commit: Micros(commit),
            ..ask(key, 10, min, want)
        }
    }

    fn granted(grants: Vec<Grant>) -> Vec<Micros> {
        grants.into_iter().map(|g| g.granted).collect()
    }

    /// A grant whose caller stops waiting at any point (an edge node's request gone)
    /// leaves the store usable: its transaction runs to its end, never left open on the
    /// one writer connection. Every grant taken is in the key's held budget.
    #[tokio::test]
    async fn a_grant_whose_caller_stops_waiting_leaves_the_writer_usable() {
        let s = store("grant-cancelled").await;
        s.register_holder("h1", 0, i64::MAX).await.unwrap();
        let mut answered = 0;
        for i in 0..200u64 {
            let asks = [ask("k_c", 1_000_000, 1, 3)];
            let wait = std::time::Duration::from_micros(i * 7 % 400);
            if let Ok(grants) =
                tokio::time::timeout(wait, s.lease_grant_many("h1", 5, None, &asks)).await
            {
                answered += grants.unwrap()[0].granted.0;
            }
        }
        // The writer still takes a transaction of either kind.
        let grants = s
            .lease_grant_many("h1", 5, None, &[ask("k_c", 1_000_000, 1, 3)])
            .await
            .unwrap();
        assert_eq!(granted(grants), [Micros(3)]);
        s.register_holder("h2", 0, 10).await.unwrap();
        let held = s.ledger_row("k_c", 7).await.unwrap().held.0;
        assert!(
            held >= answered + 3 && held <= 3 * 201,
            "held {held}, answered {answered}"
        );
    }

    #[tokio::test]
    async fn a_batch_grants_like_one_by_one_and_never_beyond_a_cap() {
        batch_grants(store("grant-many").await).await;
        batch_grants(crate::control::store::tests::postgres().await).await;
    }

    async fn batch_grants(s: Store) {
        for h in ["h1", "h2", "h3"] {
            s.register_holder(h, 0, 100).await.unwrap();
        }
        s.lease_grant_many("h1", 50, None, &[ask("k_a", 10, 1, 8)])
            .await
            .unwrap();
        let grants = s
            .lease_grant_many(
                "h2",
                50,
                None,
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
            granted(grants),
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
            None,
            &[
                row("k_b", 7, 7, 0, 0),
                row("k_b", 0, 0, 3, 0),
                row("k_a", 1, 0, 2, 0),
            ],
            &[],
        )
        .await
        .unwrap();
        assert!(s.leases_of("h2").await.unwrap().is_empty());
        // k_b: 3 of 10 free again; k_a: 8 held by h1, 1 settled, 1 free.
        let again = s
            .lease_grant_many(
                "h3",
                50,
                None,
                &[ask("k_b", 10, 1, 10), ask("k_a", 10, 1, 10)],
            )
            .await
            .unwrap();
        assert_eq!(granted(again), vec![Micros(3), Micros(1)]);
    }

    #[tokio::test]
    async fn nothing_is_granted_to_a_holder_not_alive_and_settled_spend_never_overflows() {
        holders_and_saturation(store("holder-alive").await).await;
        holders_and_saturation(crate::control::store::tests::postgres().await).await;
    }

    async fn holders_and_saturation(s: Store) {
        s.register_holder("h1", 0, 100).await.unwrap();
        let one = [ask("k_a", 10, 1, 4)];
        // Never registered, past its life, reclaimed: a lease to it would never come back.
        assert_eq!(
            granted(
                s.lease_grant_many("h_unknown", 50, None, &one)
                    .await
                    .unwrap()
            ),
            [Micros::ZERO]
        );
        assert_eq!(
            granted(s.lease_grant_many("h1", 101, None, &one).await.unwrap()),
            [Micros::ZERO]
        );
        assert_eq!(
            granted(s.lease_grant_many("h1", 100, None, &one).await.unwrap()),
            [Micros(4)]
        );
        s.reclaim_holder("h1", &HashMap::new(), i64::MAX)
            .await
            .unwrap();
        assert_eq!(
            granted(s.lease_grant_many("h1", 50, None, &one).await.unwrap()),
            [Micros::ZERO]
        );
        assert_eq!(s.ledger_row("k_a", 7).await.unwrap().held, Micros::ZERO);
        // Settled spend saturates at 2^62 instead of wrapping around (or turning into a
        // REAL on SQLite): the row stays readable.
        let huge = Micros(i64::MAX / 4 * 3);
        for _ in 0..3 {
            s.lease_report_many("h1", None, &[row("k_a", huge.0, 0, 0, 0)], &[])
                .await
                .unwrap();
        }
        assert_eq!(
            s.ledger_row("k_a", 7).await.unwrap().settled,
            Micros(1 << 62)
        );
    }

    #[tokio::test]
    async fn a_numbered_report_batch_settles_once_however_often_it_arrives() {
        numbered_reports(store("report-batches").await).await;
        numbered_reports(crate::control::store::tests::postgres().await).await;
    }

    async fn numbered_reports(s: Store) {
        for h in ["h1", "h2"] {
            s.register_holder(h, 0, 100).await.unwrap();
        }
        let ledger = |s: &Store| {
            let s = s.clone();
            async move {
                let row = s.ledger_row("k_a", 7).await.unwrap();
                (row.settled.0, row.held.0)
            }
        };
        s.lease_grant_many("h1", 50, None, &[ask("k_a", 100, 1, 50)])
            .await
            .unwrap();
        let applied = |h: &'static str, batch: Option<u64>, spent: i64| {
            let s = s.clone();
            async move {
                s.lease_report_many(h, batch, &[row("k_a", spent, spent, 0, 0)], &[])
                    .await
                    .unwrap()
            }
        };
        assert!(applied("h1", Some(1), 10).await);
        assert_eq!(ledger(&s).await, (10, 40));
        // The same batch again (its answer was lost): answered, nothing applied.
        assert!(!applied("h1", Some(1), 10).await);
        assert_eq!(ledger(&s).await, (10, 40));
        // A higher number applies (2 was refused by the node's control plane and dropped).
        assert!(applied("h1", Some(3), 5).await);
        assert_eq!(ledger(&s).await, (15, 35));
        // A lower one is ignored.
        assert!(!applied("h1", Some(2), 7).await);
        assert_eq!(ledger(&s).await, (15, 35));
        // Each session numbers its own batches.
        s.lease_grant_many("h2", 50, None, &[ask("k_a", 100, 1, 10)])
            .await
            .unwrap();
        assert!(applied("h2", Some(1), 1).await);
        assert_eq!(ledger(&s).await, (16, 44));
        // Unnumbered (the in-process ledger, an older node): applied every time.
        assert!(applied("h1", None, 1).await);
        assert!(applied("h1", None, 1).await);
        assert_eq!(ledger(&s).await, (18, 42));
        let leases = s.leases_of("h1").await.unwrap();
        assert_eq!(leases.iter().map(|l| l.2 .0).collect::<Vec<_>>(), [33]);
        // The marks of sessions silent since a cutoff are deleted; a session's batch
        // after that is applied (its number is still higher than anything it sent).
        assert_eq!(s.prune_report_batches(0).await.unwrap(), 0);
        let now_ms = crate::token::unix_ms() as i64;
        assert_eq!(s.prune_report_batches(now_ms + 1).await.unwrap(), 2);
    }

    /// Two replicas given the same batch at once (a node that timed out on one and sent
    /// the batch again to the other): exactly one applies it, every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_given_the_same_report_batch_at_once_apply_it_once() {
        let dir = std::env::temp_dir().join(format!("keybrake-report-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sqlite = crate::database::Database::Sqlite { data_dir: dir };
        report_race(&sqlite).await;
        let url = crate::control::pg_test::database().await;
        let pg = crate::database::Database::Postgres {
            url: crate::database::DatabaseUrl::parse(&url).unwrap(),
        };
        report_race(&pg).await;
    }

    async fn report_race(database: &crate::database::Database) {
        let one = Store::open(database).await.unwrap();
        let two = Store::open(database).await.unwrap();
        one.register_holder("h1", 0, i64::MAX).await.unwrap();
        one.lease_grant_many("h1", 50, None, &[ask("k_a", 1_000, 1, 1_000)])
            .await
            .unwrap();
        const ROUNDS: u64 = 20;
        for batch in 1..=ROUNDS {
            let copies: Vec<_> = (0..4)
                .map(|i| {
                    let s = if i % 2 == 0 { one.clone() } else { two.clone() };
                    tokio::spawn(async move {
                        s.lease_report_many("h1", Some(batch), &[row("k_a", 3, 3, 0, 0)], &[])
                            .await
                            .unwrap()
                    })
                })
                .collect();
            let mut applied = 0;
            for c in copies {
                applied += c.await.unwrap() as u32;
            }
            assert_eq!(applied, 1, "batch {batch}");
        }
        let row = two.ledger_row("k_a", 7).await.unwrap();
        assert_eq!(
            (row.settled.0, row.held.0),
            (3 * ROUNDS as i64, 1_000 - 3 * ROUNDS as i64)
        );
    }

    #[tokio::test]
    async fn a_grant_commits_what_its_reservation_asked_in_the_same_statement() {
        grant_commits(store("grant-commit").await).await;
        grant_commits(crate::control::store::tests::postgres().await).await;
    }

    async fn grant_commits(s: Store) {
        s.register_holder("h1", 0, 100).await.unwrap();
        let grants = s
            .lease_grant_many(
                "h1",
                50,
                None,
                &[
                    with_commit("k_a", 3, 6, 3),   // 3 of the 6 committed
                    with_commit("k_b", 2, 4, 9),   // more than granted: all 4
                    with_commit("k_c", 11, 11, 5), // beyond the cap: nothing
                ],
            )
            .await
            .unwrap();
        let grant = |g: i64, c: i64| Grant {
            granted: Micros(g),
            committed: Micros(c),
            revoked: false,
            settled: Some(Micros::ZERO),
        };
        assert_eq!(grants, vec![grant(6, 3), grant(4, 4), grant(0, 0)]);
        // Committed at the grant is committed like a write-ahead: the rest of k_a's lease
        // (3) can still be committed, not more; k_b has nothing uncommitted left.
        let answers = s
            .lease_commit_many("h1", 50, &[commit("k_a", 4), commit("k_b", 1)])
            .await
            .unwrap();
        assert_eq!(answers, vec![false, false]);
        assert_eq!(
            s.lease_commit_many("h1", 50, &[commit("k_a", 3)])
                .await
                .unwrap(),
            vec![true]
        );
        // A holder that dies: all it committed is settled as spent, nothing comes back.
        let back = s
            .reclaim_holder("h1", &HashMap::new(), i64::MAX)
            .await
            .unwrap();
        assert_eq!(back, Micros::ZERO);
        assert_eq!(s.ledger_row("k_a", 7).await.unwrap().settled, Micros(6));
        assert_eq!(s.ledger_row("k_b", 7).await.unwrap().settled, Micros(4));
        assert_eq!(s.ledger_row("k_c", 7).await.unwrap().settled, Micros::ZERO);
    }

    #[tokio::test]
    async fn a_lease_batch_named_lost_comes_back_whole_and_a_late_copy_grants_nothing() {
        lost_batches(store("lost-batches").await).await;
        lost_batches(crate::control::store::tests::postgres().await).await;
    }

    async fn lost_batches(s: Store) {
        s.register_holder("h1", 0, 100).await.unwrap();
        s.register_holder("h2", 0, 100).await.unwrap();
        let lease = |s: &Store, key: &'static str| {
            let s = s.clone();
            async move {
                const SQL: &str =
                    "SELECT held, committed FROM leases WHERE holder = 'h1' AND key_id = $1";
                let row = match &s.backend {
                    Backend::Sqlite { writer, .. } => {
                        let r = sqlx::query(SQL).bind(key).fetch_one(writer).await.unwrap();
                        (r.get::<i64, _>(0), r.get::<i64, _>(1))
                    }
                    Backend::Postgres(pool) => {
                        let r = sqlx::query(SQL).bind(key).fetch_one(pool).await.unwrap();
                        (r.get::<i64, _>(0), r.get::<i64, _>(1))
                    }
                };
                row
            }
        };
        // Batch 1's answer never reaches the node: 6 granted on k_a, 3 committed for the
        // call that asked (never forwarded). Batch 2's does: 2 on k_a (1 committed), 4 on
        // k_b (2 committed); the node then commits 1 more of k_a's lease.
        let lost = s
            .lease_grant_many("h1", 50, Some(1), &[with_commit("k_a", 3, 6, 3)])
            .await
            .unwrap();
        assert_eq!(granted(lost), vec![Micros(6)]);
        let known = (s.lease_grant_many(
            "h1",
            50,
            Some(2),
            &[with_commit("k_a", 1, 2, 1), with_commit("k_b", 2, 4, 2)],
        ))
        .await
        .unwrap();
        assert_eq!(granted(known), vec![Micros(2), Micros(4)]);
        let answers = s.lease_commit_many("h1", 50, &[commit("k_a", 1)]).await;
        assert_eq!(answers.unwrap(), vec![true]);
        assert_eq!(lease(&s, "k_a").await, (8, 5));
        // Named lost (with batch 3, sent and not arrived yet): batch 1's 6 leave the lease
        // and the key's held budget, its 3 committed with them; what the node knows of
        // stays, committed as it was.
        s.lease_report_many("h1", Some(1), &[], &[1, 3])
            .await
            .unwrap();
        assert_eq!(lease(&s, "k_a").await, (2, 2));
        assert_eq!(s.ledger_row("k_a", 7).await.unwrap().held, Micros(2));
        assert_eq!(lease(&s, "k_b").await, (4, 2));
        // Batch 3 arrives late: it grants nothing. Named again: nothing more comes back.
        let late = s
            .lease_grant_many("h1", 50, Some(3), &[with_commit("k_c", 1, 5, 1)])
            .await
            .unwrap();
        assert_eq!(late, vec![Grant::NONE]);
        assert_eq!(s.ledger_row("k_c", 7).await.unwrap().held, Micros::ZERO);
        s.lease_report_many("h1", Some(2), &[], &[1]).await.unwrap();
        assert_eq!(lease(&s, "k_a").await, (2, 2));
        // The cap is whole again for everyone else: 8 of k_a's 10.
        let other = s
            .lease_grant_many("h2", 50, Some(1), &[ask("k_a", 10, 1, 10)])
            .await;
        assert_eq!(granted(other.unwrap()), vec![Micros(8)]);

        // A lost batch whose uncommitted part a doubt report gave back first (the node's
        // counter in doubt): only what is left of it comes back, never what other calls
        // committed. k_b: batch 4 grants 3 (1 committed), lost; the doubt report takes
        // the lease's 4 uncommitted; naming batch 4 then frees its 1 committed.
        let lost = s
            .lease_grant_many("h1", 50, Some(4), &[with_commit("k_b", 1, 3, 1)])
            .await
            .unwrap();
        assert_eq!(granted(lost), vec![Micros(3)]);
        assert_eq!(lease(&s, "k_b").await, (7, 3));
        let doubt = ReportRow {
            return_uncommitted: true,
            ..row("k_b", 0, 0, 0, 0)
        };
        s.lease_report_many("h1", Some(3), &[doubt], &[])
            .await
            .unwrap();
        assert_eq!(lease(&s, "k_b").await, (3, 3));
        s.lease_report_many("h1", Some(4), &[], &[4]).await.unwrap();
        assert_eq!(lease(&s, "k_b").await, (2, 2));
        assert_eq!(s.ledger_row("k_b", 7).await.unwrap().held, Micros(2));
        // The holder dies: only the 2 + 2 the node committed are settled as spent.
        s.reclaim_holder("h1", &HashMap::new(), i64::MAX)
            .await
            .unwrap();
        assert_eq!(s.ledger_row("k_a", 7).await.unwrap().settled, Micros(2));
        assert_eq!(s.ledger_row("k_b", 7).await.unwrap().settled, Micros(2));
        // Records are dated by their grant (second 50 here), lost marks by the report
        // that made them (now): h1's batch 2 and h2's batch 1, then h1's three marks.
        assert_eq!(s.prune_lease_batches(50_001).await.unwrap(), 2);
        assert_eq!(s.prune_lease_batches(i64::MAX).await.unwrap(), 3);
    }
}
