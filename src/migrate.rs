//! `keybrake migrate --from sqlite:DIR --to postgres://…`: copies a SQLite data dir (every
//! table of `keybrake.db`, and the audit trail of `audit.db`) into a PostgreSQL database
//! for `keybrake control --database-url`, when a team outgrows one host (SPEC §1).
//!
//! - The source must be at rest: refused while a process holds the data dir's lock (every
//!   `serve` and SQLite `control` does, for its whole life) or the PID file names a live
//!   process. Its schema is brought up to this binary's version first (as a start would).
//! - The target gets the schema if it lacks it (the store's and the trail's migrations)
//!   and must be empty: a table that holds rows is refused, naming it.
//! - Rows are read from one snapshot of each file and written in batches (one `INSERT …
//!   SELECT FROM UNNEST(arrays)` per batch, each column cast to the target's type), all
//!   in one PostgreSQL transaction: the copy lands whole or not at all. Sealed credentials
//!   and signing keys are copied as they are: the PostgreSQL control needs the same
//!   master key. Identity sequences (`keys.seq`, the trail's `seq`) continue after the
//!   copied maxima, so cursors and ordering carry over.
//! - Holders and leases are copied as they stand: the PostgreSQL control finds the
//!   holders dead, settles what the trail shows they spent and gives the rest back.
//!
//! Prints the rows copied per table.

use crate::control::audit;
use crate::control::store::{self, Store};
use crate::database::{Database, DatabaseUrl};
use anyhow::{anyhow, bail, Context, Result};
use rusqlite::types::ValueRef;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Rows per INSERT.
const BATCH: usize = 2_000;

/// `keybrake.db`'s tables in an order their references allow (a table not listed here
/// is copied after these, by name). SQLite's own tables are not copied.
const STORE_ORDER: &[&str] = &[
    "tenants",
    "api_tokens",
    "nodes",
    "credentials",
    "signing_keys",
    "keys",
    "ledger",
    "holders",
    "leases",
];

/// What was copied, per table, in copy order.
pub struct Copied(pub Vec<(String, u64)>);

/// Parses the two locations, checks them and copies; prints the counts.
pub fn run(from: &str, to: &str) -> Result<()> {
    let url = DatabaseUrl::parse(to).context("--to")?;
    let dir = parse_from(from)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let copied = copy(&runtime, &dir, &url)?;
    for (table, rows) in &copied.0 {
        println!("{table:14} {rows:>10}");
    }
    // From now on the database is the truth: a start on this dir is refused.
    let marker = dir.join(crate::serve::MIGRATED_FILE);
    let note = format!(
        "copied to {url} at {}\n",
        crate::control::api::rfc3339(crate::token::now_secs())
    );
    if let Err(e) = std::fs::write(&marker, note) {
        eprintln!(
            "warning: could not write {} ({e}): nothing stops a later start on this data dir; \
             keep it from being served again",
            marker.display()
        );
    }
    println!(
        "copied {} into {url}; start `keybrake control --database-url …` with the master key \
         that sealed it ({}, or the KEYBRAKE_MASTER_KEY / --master-key-file serve ran with)",
        dir.display(),
        dir.join("master.key").display()
    );
    Ok(())
}

fn parse_from(from: &str) -> Result<PathBuf> {
    let Some(dir) = from.strip_prefix("sqlite:") else {
        bail!("--from must be sqlite:DIR (the data dir of a stopped keybrake serve or control)");
    };
    let dir = PathBuf::from(dir.strip_prefix("//").unwrap_or(dir));
    if !dir.join(store::FILE).is_file() {
        bail!(
            "--from: no {} in {} (expected the data dir of keybrake serve or control)",
            store::FILE,
            dir.display()
        );
    }
    Ok(dir)
}

/// The whole copy; the counts per table.
pub fn copy(runtime: &tokio::runtime::Runtime, dir: &Path, url: &DatabaseUrl) -> Result<Copied> {
    // Inside the runtime, so an error that drops the open transaction can still hand its
    // rollback to the driver (nothing is committed until the end either way).
    let _runtime = runtime.enter();
    let _lock = refuse_if_running(dir)?;
    // The source's schema up to this binary's (what starting it would do), then the
    // target's: both end on the same version, so their columns match.
    runtime.block_on(async {
        Store::open(&Database::Sqlite {
            data_dir: dir.to_path_buf(),
        })
        .await
        .context("cannot open the source store")
    })?;
    let store_db = rusqlite::Connection::open_with_flags(
        dir.join(store::FILE),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
    )
    .with_context(|| format!("cannot open {}", dir.join(store::FILE).display()))?;
    note_recent_holders(&store_db)?;
    let audit_path = dir.join(audit::FILE);
    let audit_db = if audit_path.is_file() {
        let mut conn = rusqlite::Connection::open(&audit_path)
            .with_context(|| format!("cannot open {}", audit_path.display()))?;
        audit::sqlite::migrate(&mut conn)?;
        Some(conn)
    } else {
        None
    };

    let pool = runtime.block_on(async {
        let options = PgConnectOptions::from_str(url.expose())
            .context("--to does not parse")?
            .application_name("keybrake-migrate")
            .options([("client_min_messages", "warning")]);
        // The store first: it connects once with a short timeout and says why it could
        // not (the pool would only time out after 30 s).
        Store::open(&Database::Postgres { url: url.clone() })
            .await
            .context("cannot apply the schema to the target")?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .with_context(|| format!("cannot connect to PostgreSQL at {url}"))?;
        audit::migrate_postgres(&pool)
            .await
            .context("cannot apply the audit schema to the target")?;
        anyhow::Ok(pool)
    })?;

    // One snapshot per file for the whole copy.
    store_db.execute_batch("BEGIN")?;
    let mut plan: Vec<(&rusqlite::Connection, String)> = store_tables(&store_db)?
        .into_iter()
        .map(|t| (&store_db, t))
        .collect();
    if let Some(conn) = &audit_db {
        conn.execute_batch("BEGIN")?;
        // The spans are SQLite's index of the trail; PostgreSQL indexes the rows.
        plan.push((conn, "audit".to_string()));
    }

    let mut tx = runtime.block_on(pool.begin())?;
    let mut checked: Vec<&str> = plan.iter().map(|(_, t)| t.as_str()).collect();
    if audit_db.is_none() {
        checked.push("audit");
    }
    for table in checked {
        let target = runtime.block_on(target_columns(&mut tx, table))?;
        if target.is_empty() {
            bail!("the target has no table {table}: is it a keybrake database of another version?");
        }
        let rows: i64 = runtime.block_on(
            sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&mut *tx),
        )?;
        if rows > 0 {
            if table == "tenants" {
                bail!(
                    "the target already holds {rows} tenant{}: migrate copies into an empty \
                     database only (nothing was written)",
                    if rows == 1 { "" } else { "s" }
                );
            }
            bail!(
                "the target's table {table} already holds {rows} row{}: migrate copies into \
                 an empty database only (nothing was written)",
                if rows == 1 { "" } else { "s" }
            );
        }
    }
    let mut copied = Vec::new();
    for (conn, table) in &plan {
        let n = copy_table(runtime, conn, &mut tx, table)?;
        copied.push((table.clone(), n));
    }
    runtime.block_on(continue_sequences(&mut tx, &store_db))?;
    runtime.block_on(tx.commit())?;
    runtime.block_on(pool.close());
    Ok(Copied(copied))
}

/// A live process holds the data dir's lock, or is named by the default PID file.
/// Otherwise the lock, for the copy to hold: no process starts on the dir meanwhile.
fn refuse_if_running(dir: &Path) -> Result<std::fs::File> {
    let Some(lock) = crate::serve::hold_data_dir(dir)? else {
        bail!(
            "{} is in use by a running keybrake process; stop it before migrating",
            dir.display()
        );
    };
    let pid_file = dir.join(crate::config::defaults::PINGORA_PID_FILE_IN_DATA_DIR);
    let Ok(text) = std::fs::read_to_string(&pid_file) else {
        return Ok(lock);
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(lock);
    };
    // SAFETY: signal 0 only checks that the process exists.
    let alive = pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
    if alive {
        bail!(
            "{} is in use: process {pid} ({}) is running; stop it before migrating",
            dir.display(),
            pid_file.display()
        );
    }
    Ok(lock)
}

/// With the lock held no process runs on the file, so a holder still dated alive is one
/// that stopped within its lease lifetime: copied as it stands, the PostgreSQL control
/// takes it for dead once that moment passes (its leases were returned at a clean stop;
/// after a crash they are settled from the trail then).
fn note_recent_holders(conn: &rusqlite::Connection) -> Result<()> {
    let now = crate::token::now_secs();
    let recent: i64 = conn.query_row(
        "SELECT count(*) FROM holders WHERE alive_until >= ?1",
        [now],
        |r| r.get(0),
    )?;
    if recent > 0 {
        log::info!(
            "{recent} lease holder(s) of a process that stopped within its lease lifetime: \
             copied; the PostgreSQL control plane gives back what they hold once it lapses"
        );
    }
    Ok(())
}

/// `keybrake.db`'s tables, in copy order.
fn store_tables(conn: &rusqlite::Connection) -> Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'
         ORDER BY name",
    )?;
    let mut names: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    // Names go into SQL text: only plain lower-case identifiers, as keybrake creates.
    if let Some(odd) = names.iter().find(|n| {
        !n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }) {
        bail!("keybrake.db has a table keybrake does not create ({odd:?}): not copied");
    }
    names.sort_by_key(|n| {
        STORE_ORDER
            .iter()
            .position(|o| o == n)
            .unwrap_or(STORE_ORDER.len())
    });
    Ok(names)
}

/// How a column's values travel: as an array of this element type, cast to the column's
/// own type on insert.
#[derive(Clone, Copy, PartialEq)]
enum Carrier {
    Int,
    Text,
    Bytes,
}

/// The target table's columns: (name, carrier, the column's type as SQL).
async fn target_columns(
    tx: &mut Transaction<'_, Postgres>,
    table: &str,
) -> Result<Vec<(String, Carrier, String)>> {
    let rows = sqlx::query(
        "SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS sql_type,
                t.typname AS base
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(table)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| {
            let name: String = r.get("name");
            let base: String = r.get("base");
            let carrier = match base.as_str() {
                "int2" | "int4" | "int8" => Carrier::Int,
                "text" | "varchar" | "json" | "jsonb" => Carrier::Text,
                "bytea" => Carrier::Bytes,
                other => bail!("{table}.{name}: column type {other} is not one migrate copies"),
            };
            Ok((name, carrier, r.get("sql_type")))
        })
        .collect()
}

/// One column's values of a batch.
enum Values {
    Int(Vec<Option<i64>>),
    Text(Vec<Option<String>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

/// Copies one table in batches; the rows copied.
fn copy_table(
    runtime: &tokio::runtime::Runtime,
    source: &rusqlite::Connection,
    tx: &mut Transaction<'_, Postgres>,
    table: &str,
) -> Result<u64> {
    let target = runtime.block_on(target_columns(tx, table))?;
    let mut stmt = source.prepare(&format!("SELECT * FROM {table}"))?;
    let source_columns: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
    // Every source column must land somewhere; a target column the source lacks keeps
    // its default (or refuses, if it has none).
    let mut columns = Vec::new();
    for (i, name) in source_columns.iter().enumerate() {
        let Some((_, carrier, sql_type)) = target.iter().find(|(n, _, _)| n == name) else {
            bail!("the target's table {table} has no column {name}: versions differ");
        };
        columns.push((i, name.clone(), *carrier, sql_type.clone()));
    }
    let arrays: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(k, (_, _, carrier, _))| {
            let element = match carrier {
                Carrier::Int => "bigint",
                Carrier::Text => "text",
                Carrier::Bytes => "bytea",
            };
            format!("${}::{element}[]", k + 1)
        })
        .collect();
    let names: Vec<&str> = columns.iter().map(|c| c.1.as_str()).collect();
    let casts: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(k, (_, _, _, sql_type))| format!("u.c{k}::{sql_type}"))
        .collect();
    let aliases: Vec<String> = (0..columns.len()).map(|k| format!("c{k}")).collect();
    let insert = format!(
        "INSERT INTO {table} ({}) SELECT {} FROM UNNEST({}) AS u({})",
        names.join(", "),
        casts.join(", "),
        arrays.join(", "),
        aliases.join(", ")
    );

    let new_batch = || -> Vec<Values> {
        columns
            .iter()
            .map(|(_, _, carrier, _)| match carrier {
                Carrier::Int => Values::Int(Vec::with_capacity(BATCH)),
                Carrier::Text => Values::Text(Vec::with_capacity(BATCH)),
                Carrier::Bytes => Values::Bytes(Vec::with_capacity(BATCH)),
            })
            .collect()
    };
    let flush = |batch: Vec<Values>, tx: &mut Transaction<'_, Postgres>| -> Result<()> {
        let mut q = sqlx::query(&insert);
        for values in batch {
            q = match values {
                Values::Int(v) => q.bind(v),
                Values::Text(v) => q.bind(v),
                Values::Bytes(v) => q.bind(v),
            };
        }
        runtime
            .block_on(q.execute(&mut **tx))
            .with_context(|| format!("cannot copy rows of {table}"))?;
        Ok(())
    };

    let mut rows = stmt.query([])?;
    let mut batch = new_batch();
    let mut in_batch = 0;
    let mut total = 0u64;
    while let Some(row) = rows.next()? {
        for ((i, name, _, _), values) in columns.iter().zip(batch.iter_mut()) {
            let value = row.get_ref(*i)?;
            let mismatch = || anyhow!("{table}.{name}: a value of an unexpected type ({value:?})");
            match values {
                Values::Int(v) => v.push(match value {
                    ValueRef::Null => None,
                    ValueRef::Integer(n) => Some(n),
                    _ => return Err(mismatch()),
                }),
                Values::Text(v) => v.push(match value {
                    ValueRef::Null => None,
                    ValueRef::Text(t) => {
                        Some(String::from_utf8(t.to_vec()).map_err(|_| mismatch())?)
                    }
                    _ => return Err(mismatch()),
                }),
                Values::Bytes(v) => v.push(match value {
                    ValueRef::Null => None,
                    ValueRef::Blob(b) | ValueRef::Text(b) => Some(b.to_vec()),
                    _ => return Err(mismatch()),
                }),
            }
        }
        in_batch += 1;
        total += 1;
        if in_batch == BATCH {
            flush(std::mem::replace(&mut batch, new_batch()), tx)?;
            in_batch = 0;
        }
    }
    if in_batch > 0 {
        flush(batch, tx)?;
    }
    Ok(total)
}

/// Every identity column's sequence continues after the largest value copied (and after
/// SQLite's AUTOINCREMENT high-water mark, which can be above it), so new keys and events
/// sort after the copied ones.
async fn continue_sequences(
    tx: &mut Transaction<'_, Postgres>,
    store_db: &rusqlite::Connection,
) -> Result<()> {
    let identities: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND is_identity = 'YES'",
    )
    .fetch_all(&mut **tx)
    .await?;
    for (table, column) in identities {
        let high_water: Option<i64> = store_db
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = ?1",
                [&table],
                |r| r.get(0),
            )
            .ok();
        sqlx::query(&format!(
            "SELECT setval(pg_get_serial_sequence($1, $2), m, true)
             FROM (SELECT GREATEST(max({column}), $3) AS m FROM {table}) s WHERE m IS NOT NULL"
        ))
        .bind(&table)
        .bind(&column)
        .bind(high_water)
        .fetch_optional(&mut **tx)
        .await?;
    }
    Ok(())
}
