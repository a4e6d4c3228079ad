//! The fleet's HTTP surface (SPEC §6): node administration (`GET /v1/nodes`,
//! `DELETE /v1/nodes/{id}`, admin token) and the sync channel under `/v1/sync/`,
//! authenticated by a node token (`auth::Node`). Shapes are in docs/api.md.

use super::api::{parse_body, rfc3339, ApiState};
use super::auth::{Admin, Node};
use super::errors::{ApiError, ApiResult};
use super::fleet::SyncAnswer;
use crate::money::{Micros, MAX_USD};
use crate::sync::{AuditEvent, LeaseCommit, LeaseReport, LeaseRequest};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

/// Longest long-poll a node may ask for.
const MAX_WAIT: Duration = Duration::from_secs(25);
/// Most leases or audit events in one request.
const MAX_BATCH: usize = 1000;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/nodes/{id}", axum::routing::delete(delete_node))
        .route("/v1/sync/hello", post(hello))
        .route("/v1/sync/snapshot", get(snapshot))
        .route("/v1/sync/leases", post(leases))
        .route("/v1/sync/reports", post(reports))
        .route("/v1/sync/commits", post(commits))
        .route("/v1/sync/audit", post(audit))
}

pub(super) async fn list_nodes(State(s): State<ApiState>, _: Admin) -> ApiResult<Json<Value>> {
    let data: Vec<Value> = s
        .control
        .list_nodes()
        .await?
        .into_iter()
        .map(|(id, name, created, last)| {
            json!({
                "id": id,
                "name": name,
                "created_at": rfc3339(created),
                "last_sync_at": last.map(|ms| rfc3339(ms.div_euclid(1000))),
            })
        })
        .collect();
    Ok(Json(json!({"data": data, "next_cursor": null})))
}

async fn delete_node(
    State(s): State<ApiState>,
    _: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    if !s.control.delete_node(&id).await? {
        return Err(ApiError::NotFound("node"));
    }
    Ok(Json(json!({"id": id, "deleted": true})))
}

async fn hello(State(s): State<ApiState>, node: Node) -> ApiResult<Json<Value>> {
    s.control.node_hello(&node.id, &node.session).await?;
    Ok(Json(json!({"node_id": node.id})))
}

#[derive(Deserialize)]
struct PollQuery {
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    since: u64,
    #[serde(default)]
    wait_ms: u64,
}

async fn snapshot(
    State(s): State<ApiState>,
    node: Node,
    Query(q): Query<PollQuery>,
) -> ApiResult<Json<SyncAnswer>> {
    let wait = Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    s.control
        .node_poll(&node.id, &node.session, &q.epoch, q.since, wait)
        .await?
        .map(Json)
        .ok_or(ApiError::InvalidToken(super::errors::Credential::Node))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeasesBody {
    /// The node session's number for this batch (1, 2, 3…): what it grants is recorded
    /// under it, so the node can name it lost in a report if the answer never reaches it.
    /// Absent from nodes older than the numbering.
    #[serde(default)]
    batch: Option<u64>,
    requests: Vec<LeaseRequest>,
}

async fn leases(State(s): State<ApiState>, node: Node, raw: Bytes) -> ApiResult<Json<Value>> {
    let body: LeasesBody = parse_body(&raw)?;
    if body.requests.len() > MAX_BATCH {
        return Err(too_many());
    }
    // A request with an amount out of range is answered an error of its own: a batch
    // holds many tenants' keys, and one key's figure must not refuse the others'.
    let mut grants = vec![Value::Null; body.requests.len()];
    let (mut asked, mut requests) = (Vec::new(), Vec::new());
    for (i, r) in body.requests.into_iter().enumerate() {
        if in_range([&r.cap, &r.min, &r.want, &r.commit]) {
            asked.push(i);
            requests.push(r);
        } else {
            grants[i] = json!({ "error": out_of_range() });
        }
    }
    let answers = s
        .control
        .node_leases(&node.id, &node.session, body.batch, requests)
        .await;
    debug_assert_eq!(asked.len(), answers.len(), "one answer per lease request");
    for (i, g) in asked.into_iter().zip(answers) {
        grants[i] = match g {
            Ok(g) if g.revoked => json!({ "granted": 0, "committed": 0, "revoked": true }),
            Ok(g) => {
                let mut grant = json!({ "granted": g.granted.0, "committed": g.committed.0 });
                if let Some(settled) = g.settled {
                    grant["settled"] = json!(settled.0);
                }
                grant
            }
            Err(e) => json!({ "error": e.0 }),
        };
    }
    Ok(Json(json!({ "grants": grants })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportsBody {
    /// The node session's number for this batch (1, 2, 3…; the same when sent again):
    /// applied once however often it arrives. Absent from nodes older than the numbering.
    #[serde(default)]
    batch: Option<u64>,
    reports: Vec<LeaseReport>,
    /// Numbers of the session's lease batches whose answers never reached the node: what
    /// they granted is given back whole (no call was forwarded on it).
    #[serde(default)]
    lost_leases: Vec<u64>,
}

async fn reports(State(s): State<ApiState>, node: Node, raw: Bytes) -> ApiResult<Json<Value>> {
    let body: ReportsBody = parse_body(&raw)?;
    if body.reports.len() > MAX_BATCH || body.lost_leases.len() > MAX_BATCH {
        return Err(too_many());
    }
    amounts_in_range(
        body.reports
            .iter()
            .flat_map(|r| [&r.spent, &r.returned, &r.overspent, &r.unreserved]),
    )?;
    match s
        .control
        .node_report(
            &node.id,
            &node.session,
            body.batch,
            body.reports,
            &body.lost_leases,
        )
        .await
    {
        Ok(true) => {}
        // Its first copy was applied and the answer lost: answered as then.
        Ok(false) => log::info!(
            "report batch {} of node {} (session {}) was applied already: not again",
            body.batch.unwrap_or_default(),
            node.id,
            node.session
        ),
        Err(e) => {
            // The node keeps the report and sends it again; a database that is down now
            // is a 503 it can wait out, anything else a bug.
            if !s.control.store().ping().await {
                log::warn!(
                    "cannot record a node's spend report, storage unavailable: {}",
                    e.0
                );
                return Err(ApiError::StorageUnavailable);
            }
            log::error!("cannot record a node's spend report: {}", e.0);
            return Err(ApiError::Internal);
        }
    }
    Ok(Json(json!({ "ok": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitsBody {
    commits: Vec<LeaseCommit>,
}

/// Write-ahead of a node's reservations: `committed[i]` answers `commits[i]`.
async fn commits(State(s): State<ApiState>, node: Node, raw: Bytes) -> ApiResult<Json<Value>> {
    let body: CommitsBody = parse_body(&raw)?;
    if body.commits.len() > MAX_BATCH {
        return Err(too_many());
    }
    amounts_in_range(body.commits.iter().map(|c| &c.amount))?;
    let committed = match s
        .control
        .node_commit(&node.id, &node.session, body.commits)
        .await
    {
        Ok(committed) => committed,
        // The node refuses those calls either way; a database that is down now is a 503
        // (as for reports), anything else a bug.
        Err(e) if !s.control.store().ping().await => {
            log::warn!(
                "cannot record a node's write-ahead, storage unavailable: {}",
                e.0
            );
            return Err(ApiError::StorageUnavailable);
        }
        Err(e) => {
            log::error!("cannot record a node's write-ahead: {}", e.0);
            return Err(ApiError::Internal);
        }
    };
    Ok(Json(json!({ "committed": committed })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditBody {
    /// The node session's number for this batch (1, 2, 3…; the same when sent again):
    /// written once however often it arrives. Absent from nodes older than the numbering.
    #[serde(default)]
    batch: Option<u64>,
    events: Vec<AuditEvent>,
}

async fn audit(State(s): State<ApiState>, node: Node, raw: Bytes) -> ApiResult<Json<Value>> {
    let body: AuditBody = parse_body(&raw)?;
    if body.events.len() > MAX_BATCH {
        return Err(too_many());
    }
    let n = body.events.len();
    // Acknowledged only once written (a replica that dies after answering has kept
    // them); refused while stopping. Either way the node keeps the batch and resends it.
    if !s
        .control
        .node_audit(&node.id, &node.session, body.batch, body.events)
        .await
    {
        return Err(ApiError::StorageUnavailable);
    }
    Ok(Json(json!({ "recorded": n })))
}

/// Every amount a node sends is micro-USD between 0 and `MAX_USD`: a negative spend
/// would give budget back, and a huge one overflow the ledger.
fn amounts_in_range<'a>(amounts: impl IntoIterator<Item = &'a Micros>) -> Result<(), ApiError> {
    if in_range(amounts) {
        Ok(())
    } else {
        Err(ApiError::InvalidRequest(out_of_range()))
    }
}

fn in_range<'a>(amounts: impl IntoIterator<Item = &'a Micros>) -> bool {
    amounts
        .into_iter()
        .all(|a| (Micros::ZERO..=MAX_USD).contains(a))
}

fn out_of_range() -> String {
    format!("amounts must be 0 to {} micro-USD", MAX_USD.0)
}

fn too_many() -> ApiError {
    ApiError::InvalidRequest(format!("at most {MAX_BATCH} items per request"))
}
