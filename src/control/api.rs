//! The control API over HTTP (SPEC §3): routing, authentication, input validation and
//! JSON shapes. Business rules live in `Control`; this file only translates.

use super::errors::{ApiError, ApiResult};
use super::store::{KeyRow, KeyStatus};
use super::{Control, IssueError, KeyView, NewKey};
use crate::config::parse_duration;
use crate::money::{Micros, MAX_USD};
use crate::pattern::Allowlist;
use crate::secret::Secret;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const MAX_PAGE: i64 = 1000;
const DEFAULT_PAGE: i64 = 100;
const MAX_LABEL: usize = 200;
const MAX_PATTERNS: usize = 100;
/// Longest pattern, and most Stripe accounts: every one travels in the token, which goes
/// in a request header of every call.
const MAX_PATTERN_BYTES: usize = 256;
const MAX_ACCOUNTS: usize = 20;
const MAX_METADATA_BYTES: usize = 8 * 1024;
/// Largest request body: a key request with 100 long patterns and full metadata fits
/// many times over; a client cannot make the server buffer megabytes per connection.
const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct ApiState {
    pub control: Arc<Control>,
    /// The proxy listener, probed by `/readyz`.
    pub proxy_addr: Option<SocketAddr>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/tenants", post(create_tenant).get(list_tenants))
        .route("/v1/tenants/{id}/api_tokens", post(create_api_token))
        .route(
            "/v1/tenants/{id}/api_tokens/{token_id}",
            axum::routing::delete(delete_api_token),
        )
        .route("/v1/nodes", post(create_node))
        .route("/v1/admin/signing-keys/rotate", post(rotate_signing_key))
        .route(
            "/v1/vendors/{vendor}/credential",
            get(get_credential)
                .put(put_credential)
                .delete(delete_credential),
        )
        .route("/v1/keys", post(issue_key).get(list_keys))
        .route("/v1/keys/{id}", get(get_key).delete(revoke_key))
        .route("/v1/audit", get(list_audit))
        .route("/v1/jwks", get(jwks))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this path",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// Errors raised by axum itself (a body over the limit, an undecodable path or query)
/// come as text; they get the one error body of SPEC §3 like every other error.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "body_too_large",
            format!("the request body is over {} KiB", MAX_BODY_BYTES / 1024),
        ),
        s if s.is_client_error() => (
            "invalid_request",
            "the request's path, query or headers could not be read".to_string(),
        ),
        _ => (
            "internal_error",
            "internal error; see the server log".to_string(),
        ),
    };
    ApiError::new(status, code, message).into_response()
}

// ----- authentication -----

fn bearer(headers: &HeaderMap) -> ApiResult<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(ApiError::missing_token)?
        .to_str()
        .map_err(|_| ApiError::invalid_token("token"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(ApiError::missing_token)?;
    Ok(token)
}

fn admin(state: &ApiState, headers: &HeaderMap) -> ApiResult<()> {
    if state.control.is_admin(bearer(headers)?) {
        Ok(())
    } else {
        Err(ApiError::invalid_token("admin token"))
    }
}

fn tenant(state: &ApiState, headers: &HeaderMap) -> ApiResult<String> {
    state
        .control
        .tenant_for_token(bearer(headers)?)
        .ok_or_else(|| ApiError::invalid_token("tenant API token"))
}

// ----- input -----

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "a JSON body is required",
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("malformed JSON: {e}")))?;
    // serde would also accept a struct written as an array; the API takes objects only.
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "the body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request("invalid_request", format!("invalid request body: {e}")))
}

fn name_field(name: &str, what: &str) -> ApiResult<String> {
    let name = name.trim();
    if name.is_empty() || name.len() > MAX_LABEL || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("{what} must be 1 to {MAX_LABEL} printable characters"),
        ));
    }
    Ok(name.to_string())
}

fn page_limit(query: &HashMap<String, String>) -> ApiResult<i64> {
    match query.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request("invalid_request", format!("limit must be 1 to {MAX_PAGE}"))
            }),
    }
}

/// Cursors are opaque to clients; inside they are the last row's sequence number.
fn cursor(query: &HashMap<String, String>) -> ApiResult<i64> {
    match query.get("cursor").map(String::as_str) {
        None | Some("") => Ok(i64::MAX),
        Some(c) => c
            .strip_prefix("c_")
            .and_then(|n| n.parse::<i64>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ApiError::bad_request("invalid_request", "cursor is not one this API returned")
            }),
    }
}

fn next_cursor(last_seq: Option<i64>, page_full: bool) -> Value {
    match (last_seq, page_full) {
        (Some(seq), true) => json!(format!("c_{seq}")),
        _ => Value::Null,
    }
}

pub fn rfc3339(unix_secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn rfc3339_ms(unix_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

// ----- tenants, tokens, nodes, signing keys (admin) -----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameRequest {
    name: String,
}

async fn create_tenant(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    admin(&s, &headers)?;
    let req: NameRequest = parse_body(&body)?;
    let name = name_field(&req.name, "name")?;
    let (id, token_id, token, created_at) = s.control.create_tenant(&name).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": id,
            "name": name,
            "api_token": token.expose(),
            "api_token_id": token_id,
            "created_at": rfc3339(created_at),
        })),
    )
        .into_response())
}

async fn list_tenants(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    admin(&s, &headers)?;
    let limit = page_limit(&q)?;
    let after = match q.get("cursor").map(String::as_str) {
        None | Some("") => None,
        Some(c) => Some(
            c.split_once(':')
                .and_then(|(ts, id)| {
                    Some((ts.strip_prefix("c_")?.parse::<i64>().ok()?, id.to_string()))
                })
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_request", "cursor is not one this API returned")
                })?,
        ),
    };
    let rows = s.control.list_tenants(after, limit).await?;
    let next = match rows.last() {
        Some((id, _, ts)) if rows.len() as i64 == limit => json!(format!("c_{ts}:{id}")),
        _ => Value::Null,
    };
    let data: Vec<Value> = rows
        .iter()
        .map(|(id, name, ts)| json!({"id": id, "name": name, "created_at": rfc3339(*ts)}))
        .collect();
    Ok(Json(json!({"data": data, "next_cursor": next})))
}

async fn create_api_token(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    admin(&s, &headers)?;
    let (token_id, token) = s
        .control
        .create_api_token(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": token_id, "api_token": token.expose()})),
    )
        .into_response())
}

async fn delete_api_token(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path((id, token_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    admin(&s, &headers)?;
    if !s.control.delete_api_token(&id, &token_id).await? {
        return Err(ApiError::not_found("API token"));
    }
    Ok(Json(json!({"id": token_id, "deleted": true})))
}

async fn create_node(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    admin(&s, &headers)?;
    let req: NameRequest = parse_body(&body)?;
    let name = name_field(&req.name, "name")?;
    let (id, token) = s.control.create_node(&name).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "name": name, "node_token": token.expose()})),
    )
        .into_response())
}

async fn rotate_signing_key(
    State(s): State<ApiState>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    admin(&s, &headers)?;
    let kid = s.control.rotate_signing_key().await?;
    Ok(Json(json!({"kid": kid})))
}

async fn jwks(State(s): State<ApiState>) -> Json<Value> {
    Json(serde_json::to_value(&*s.control.jwks()).unwrap_or_default())
}

async fn readyz(State(s): State<ApiState>) -> Response {
    let storage = s.control.store().ping().await && s.control.audit.ping().await;
    let signing = !s.control.jwks().keys.is_empty();
    let proxy = match s.proxy_addr {
        None => true,
        Some(mut addr) => {
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            matches!(
                tokio::time::timeout(
                    Duration::from_millis(500),
                    tokio::net::TcpStream::connect(addr)
                )
                .await,
                Ok(Ok(_))
            )
        }
    };
    let ok = storage && signing && proxy;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"status": if ok {"ready"} else {"not_ready"}, "storage": storage, "signing_keys": signing, "proxy_listener": proxy})),
    )
        .into_response()
}

// ----- vendor credentials (tenant) -----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialRequest {
    secret: String,
}

fn known_vendor(s: &ApiState, vendor: &str) -> ApiResult<()> {
    if s.control.is_known_vendor(vendor) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_vendor",
            format!("vendor {vendor:?} is not in the catalog"),
        ))
    }
}

async fn put_credential(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(vendor): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let tenant = tenant(&s, &headers)?;
    known_vendor(&s, &vendor)?;
    let req: CredentialRequest = parse_body(&body)?;
    let secret = req.secret.trim();
    if secret.len() < 8 || secret.len() > 4096 || secret.chars().any(|c| c.is_control() || c == ' ')
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            "secret must be 8 to 4096 characters without spaces",
        ));
    }
    let (last4, updated_at) = s
        .control
        .put_credential(&tenant, &vendor, Secret::new(secret))
        .await?;
    Ok(Json(
        json!({"vendor": vendor, "last4": last4, "updated_at": rfc3339(updated_at)}),
    ))
}

async fn get_credential(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(vendor): Path<String>,
) -> ApiResult<Json<Value>> {
    let tenant = tenant(&s, &headers)?;
    let (last4, updated_at) = s
        .control
        .get_credential(&tenant, &vendor)
        .await?
        .ok_or_else(|| ApiError::not_found("credential"))?;
    Ok(Json(
        json!({"vendor": vendor, "last4": last4, "updated_at": rfc3339(updated_at)}),
    ))
}

async fn delete_credential(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(vendor): Path<String>,
) -> ApiResult<Json<Value>> {
    let tenant = tenant(&s, &headers)?;
    if !s.control.delete_credential(&tenant, &vendor).await? {
        return Err(ApiError::not_found("credential"));
    }
    Ok(Json(json!({"vendor": vendor, "deleted": true})))
}

// ----- vault keys (tenant) -----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueRequest {
    #[serde(default)]
    label: Option<String>,
    vendor: String,
    allowed_endpoints: Vec<String>,
    daily_usd_cap: Value,
    #[serde(default)]
    expires_in: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    stripe_accounts: Option<Vec<String>>,
}

fn parse_cap(value: &Value) -> ApiResult<Micros> {
    let bad =
        |why: &str| ApiError::bad_request("invalid_daily_usd_cap", format!("daily_usd_cap {why}"));
    let Value::Number(n) = value else {
        return Err(bad("must be a JSON number of US dollars, like 500 or 12.5"));
    };
    let micros =
        Micros::parse_usd(&n.to_string()).map_err(|e| bad(&format!("is not valid: {e}")))?;
    if !micros.is_positive() {
        return Err(bad("must be greater than zero"));
    }
    if micros > MAX_USD {
        return Err(bad("is larger than 1,000,000,000"));
    }
    Ok(micros)
}

fn parse_ttl(value: Option<&Value>, default: Duration, max: Duration) -> ApiResult<Duration> {
    let bad = |why: String| ApiError::bad_request("invalid_expires_in", why);
    let secs = match value {
        None | Some(Value::Null) => return Ok(default),
        Some(Value::String(s)) => {
            parse_duration(s).map_err(|e| bad(format!("expires_in {s:?}: {e}")))?
        }
        Some(Value::Number(n)) => n.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            bad(format!(
                "expires_in {n} must be a positive whole number of seconds"
            ))
        })?,
        Some(_) => {
            return Err(bad(
                "expires_in must be like \"30s\", \"5m\", \"2h\", \"1d\" or seconds".into(),
            ))
        }
    };
    if secs > max.as_secs() {
        return Err(bad(format!(
            "expires_in is longer than the maximum of {} seconds",
            max.as_secs()
        )));
    }
    Ok(Duration::from_secs(secs))
}

fn key_json(view: &KeyView) -> Value {
    let row = &view.row;
    let spent = view
        .ledger
        .settled
        .checked_add(view.ledger.held)
        .unwrap_or(view.ledger.settled);
    let mut v = json!({
        "id": row.id,
        "vendor": row.vendor,
        "label": row.label,
        "allowed_endpoints": row.allowed_endpoints,
        "daily_usd_cap": row.daily_cap.as_usd_f64(),
        "metadata": row.metadata,
        "status": view.status.as_str(),
        "spent_today_usd": spent.as_usd_f64(),
        "held_usd": view.ledger.held.as_usd_f64(),
        "created_at": rfc3339(row.created_at),
        "expires_at": rfc3339(row.expires_at),
        "revoked_at": row.revoked_at.map(rfc3339),
    });
    if let Some(acc) = &row.stripe_accounts {
        v["stripe_accounts"] = json!(acc);
    }
    v
}

fn issued_json(row: &KeyRow, token: &Secret) -> Value {
    let mut v = json!({
        "id": row.id,
        "token": token.expose(),
        "vendor": row.vendor,
        "label": row.label,
        "allowed_endpoints": row.allowed_endpoints,
        "daily_usd_cap": row.daily_cap.as_usd_f64(),
        "metadata": row.metadata,
        "created_at": rfc3339(row.created_at),
        "expires_at": rfc3339(row.expires_at),
    });
    if let Some(acc) = &row.stripe_accounts {
        v["stripe_accounts"] = json!(acc);
    }
    v
}

async fn issue_key(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let tenant = tenant(&s, &headers)?;
    let req: IssueRequest = parse_body(&body)?;
    let label = match req.label.as_deref() {
        None | Some("") => String::new(),
        Some(l) => name_field(l, "label")?,
    };
    if req.allowed_endpoints.is_empty() || req.allowed_endpoints.len() > MAX_PATTERNS {
        return Err(ApiError::bad_request(
            "invalid_endpoint_pattern",
            format!("allowed_endpoints must list 1 to {MAX_PATTERNS} patterns"),
        ));
    }
    for p in &req.allowed_endpoints {
        Allowlist::parse(std::slice::from_ref(p)).map_err(|e| {
            ApiError::bad_request("invalid_endpoint_pattern", format!("pattern {p:?}: {e}"))
        })?;
        // Accepted by the parser (tokens already issued keep working) but refused here:
        // they could never match a canonical path, and the caller surely meant
        // something else.
        let dead = if p.len() > MAX_PATTERN_BYTES {
            Some(format!("longer than {MAX_PATTERN_BYTES} bytes"))
        } else if !p.is_ascii() {
            Some("non-ASCII characters never match: canonical paths keep them percent-encoded, and '%' is not allowed in a pattern".into())
        } else if p
            .split('/')
            .any(|seg| seg.contains('*') && seg != "*" && seg != "**")
        {
            Some(
                "'*' matches a whole segment only ('/v1/payment_intents/*'), not part of one"
                    .into(),
            )
        } else {
            None
        };
        if let Some(why) = dead {
            return Err(ApiError::bad_request(
                "invalid_endpoint_pattern",
                format!("pattern {p:?}: {why}"),
            ));
        }
    }
    let daily_cap = parse_cap(&req.daily_usd_cap)?;
    let settings = s.control.settings();
    let ttl = parse_ttl(
        req.expires_in.as_ref(),
        settings.default_ttl,
        settings.max_ttl,
    )?;
    let metadata = req.metadata.unwrap_or_else(|| json!({}));
    if !metadata.is_object() || metadata.to_string().len() > MAX_METADATA_BYTES {
        return Err(ApiError::bad_request(
            "invalid_request",
            "metadata must be a JSON object under 8 KiB",
        ));
    }
    if let Some(accounts) = &req.stripe_accounts {
        if accounts.is_empty()
            || accounts.len() > MAX_ACCOUNTS
            || accounts
                .iter()
                .any(|a| !a.starts_with("acct_") || a.len() > 64)
        {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("stripe_accounts must list 1 to {MAX_ACCOUNTS} acct_… ids"),
            ));
        }
    }
    let new = NewKey {
        label,
        vendor: req.vendor,
        allowed_endpoints: req
            .allowed_endpoints
            .iter()
            .map(|p| p.trim().to_string())
            .collect(),
        daily_cap,
        ttl,
        metadata,
        stripe_accounts: req.stripe_accounts,
    };
    match s.control.issue_key(&tenant, new).await {
        Ok((row, token)) => Ok((StatusCode::CREATED, Json(issued_json(&row, &token))).into_response()),
        Err(IssueError::VendorNotConfigured(v)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "vendor_not_configured",
            format!("vendor {v:?} is unknown or has no credential registered (PUT /v1/vendors/{v}/credential)"),
        )),
        Err(IssueError::Storage(e)) => Err(e.into()),
    }
}

async fn get_key(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let tenant = tenant(&s, &headers)?;
    let view = s
        .control
        .get_key(&tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("key"))?;
    Ok(Json(key_json(&view)))
}

async fn list_keys(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let tenant = tenant(&s, &headers)?;
    let status = match q.get("status").map(String::as_str) {
        None | Some("") | Some("all") => None,
        Some("active") => Some(KeyStatus::Active),
        Some("revoked") => Some(KeyStatus::Revoked),
        Some("expired") => Some(KeyStatus::Expired),
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("status {other:?} is not active, revoked or expired"),
            ))
        }
    };
    let limit = page_limit(&q)?;
    let views = s
        .control
        .list_keys(&tenant, status, cursor(&q)?, limit)
        .await?;
    let next = next_cursor(views.last().map(|v| v.row.seq), views.len() as i64 == limit);
    Ok(Json(
        json!({"data": views.iter().map(key_json).collect::<Vec<_>>(), "next_cursor": next}),
    ))
}

async fn revoke_key(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let tenant = tenant(&s, &headers)?;
    let row = s
        .control
        .revoke_key(&tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("key"))?;
    Ok(Json(
        json!({"id": row.id, "status": "revoked", "revoked_at": row.revoked_at.map(rfc3339)}),
    ))
}

// ----- audit (tenant) -----

fn parse_since(text: &str) -> ApiResult<i64> {
    if let Ok(secs) = text.parse::<i64>() {
        return Ok(secs.saturating_mul(1000));
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| {
            ApiError::bad_request("invalid_request", "since must be RFC 3339 or Unix seconds")
        })
}

async fn list_audit(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let tenant = tenant(&s, &headers)?;
    let limit = page_limit(&q)?;
    let since = q
        .get("since")
        .map(|t| parse_since(t))
        .transpose()?
        .unwrap_or(0);
    let key_id = q
        .get("key_id")
        .map(String::as_str)
        .filter(|k| !k.is_empty());
    let rows = s
        .control
        .audit
        .list(&tenant, key_id, since, cursor(&q)?, limit)
        .await?;
    let next = next_cursor(rows.last().map(|(seq, _)| *seq), rows.len() as i64 == limit);
    let data: Vec<Value> = rows
        .iter()
        .map(|(_, e)| {
            json!({
                "ts": rfc3339_ms(e.ts_ms),
                "key_id": e.key_id,
                "label": e.label,
                "vendor": e.vendor,
                "method": e.method,
                "path": e.path,
                "status": e.status,
                "decision": e.decision,
                "spend_usd": e.spend.as_usd_f64(),
                "vendor_request_id": e.vendor_request_id,
                "duration_ms": e.duration_ms,
                "model": e.llm.as_ref().map(|l| l.model.as_str()),
                "input_tokens": e.llm.as_ref().and_then(|l| l.input_tokens),
                "cached_input_tokens": e.llm.as_ref().and_then(|l| l.cached_input_tokens),
                "cache_write_tokens": e.llm.as_ref().and_then(|l| l.cache_write_tokens),
                "output_tokens": e.llm.as_ref().and_then(|l| l.output_tokens),
            })
        })
        .collect();
    Ok(Json(json!({"data": data, "next_cursor": next})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_exact_positive_bounded_numbers() {
        assert_eq!(parse_cap(&json!(500)).unwrap(), Micros(500_000_000));
        assert_eq!(parse_cap(&json!(12.5)).unwrap(), Micros(12_500_000));
        for bad in [
            json!(0),
            json!(-1),
            json!("500"),
            json!(1e12),
            json!(0.0000001),
            json!(null),
        ] {
            assert_eq!(
                parse_cap(&bad).unwrap_err().code,
                "invalid_daily_usd_cap",
                "{bad}"
            );
        }
    }

    #[test]
    fn ttls_follow_the_spec() {
        let (d, m) = (Duration::from_secs(900), Duration::from_secs(86_400));
        assert_eq!(parse_ttl(None, d, m).unwrap(), d);
        assert_eq!(
            parse_ttl(Some(&json!("5m")), d, m).unwrap(),
            Duration::from_secs(300)
        );
        assert_eq!(
            parse_ttl(Some(&json!(30)), d, m).unwrap(),
            Duration::from_secs(30)
        );
        for bad in [
            json!("5x"),
            json!("-1m"),
            json!("0s"),
            json!("2d"),
            json!(-5),
            json!(true),
        ] {
            assert_eq!(
                parse_ttl(Some(&bad), d, m).unwrap_err().code,
                "invalid_expires_in",
                "{bad}"
            );
        }
    }
}
