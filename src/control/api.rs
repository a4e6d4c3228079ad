//! The control API over HTTP (SPEC §3): routing, input validation and JSON shapes. Who
//! may call a route is the extractor its handler takes (`auth.rs`); every failure is an
//! `ApiError` (`errors.rs`). Business rules live in `Control`; this file only translates.

use super::auth::{Admin, Tenant};
use super::errors::{ApiError, ApiResult};
use super::store::{KeyRow, KeyStatus};
use super::{Control, IssueError, KeyView, NewKey};
use crate::config::parse_duration;
use crate::money::{Micros, MAX_USD};
use crate::secret::Secret;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A JSON answer whose numbers are plain decimals (`money::plain_numbers`): money below a
/// cent reads `0.000001`, not `1e-6`.
pub(super) struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        match serde_json::to_string(&self.0) {
            Ok(text) => (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                crate::money::plain_numbers(text),
            )
                .into_response(),
            Err(_) => ApiError::Internal.into_response(),
        }
    }
}

const MAX_PAGE: i64 = 1000;
const DEFAULT_PAGE: i64 = 100;
const MAX_LABEL: usize = 200;
const MAX_PATTERNS: usize = 100;
/// The patterns' total size: they travel in the token, in a request header of every call,
/// which must stay well inside the proxy's header limit (Basic auth adds a third).
const MAX_PATTERN_BYTES: usize = 8 * 1024;
/// Most Stripe accounts: every one travels in the token, which goes in a request header
/// of every call.
const MAX_ACCOUNTS: usize = 20;
const MAX_METADATA_BYTES: usize = 8 * 1024;
/// Nesting of metadata at most: its readers (the CLI, other JSON parsers with a depth
/// limit, often 128) must be able to read the listing that wraps it.
const MAX_METADATA_DEPTH: usize = 32;
/// Largest request body: a key request with 100 long patterns and full metadata fits
/// many times over; a client cannot make the server buffer megabytes per connection.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct ApiState {
    pub control: Arc<Control>,
    /// The vendor catalog, for warnings at key issuance (patterns that reach endpoints
    /// the proxy refuses as unmetered).
    pub catalog: Arc<crate::Map<String, crate::config::Vendor>>,
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
        .route(
            "/v1/nodes",
            post(create_node).get(super::sync_api::list_nodes),
        )
        .merge(super::sync_api::routes())
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
        .fallback(|uri: axum::http::Uri| async move {
            // `/stripe/v1/…` (or `/v2/…`): a proxied call sent to the control API.
            let proxied = !uri.path().starts_with("/v1/")
                && uri.path().split('/').nth(2).is_some_and(|v| {
                    v.len() >= 2 && v.starts_with('v') && v[1..].bytes().all(|b| b.is_ascii_digit())
                });
            if proxied {
                ApiError::NotFoundHint(
                    "route not found: this is the control API; proxied vendor calls \
                     (/stripe/v1/…) go to the proxy listener (by default 127.0.0.1:8080)",
                )
            } else {
                ApiError::NotFound("route")
            }
        })
        .route_layer(axum::middleware::from_fn(name_route))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(head_limits))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// The route a request matched (`METHOD /template`), carried to the listener's log line
/// and metric: a bounded name, where the path itself holds ids.
#[derive(Debug, Clone)]
pub struct RouteName(pub String);

async fn name_route(
    matched: axum::extract::MatchedPath,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let name = RouteName(format!("{} {}", req.method(), matched.as_str()));
    let mut response = next.run(req).await;
    response.extensions_mut().insert(name);
    response
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
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge(MAX_BODY_BYTES),
        s if s.is_client_error() => ApiError::Unreadable(s),
        _ => ApiError::Internal,
    }
    .into_response()
}

/// Longest request target, and most header bytes (names and values) or headers, that the
/// API reads. Below hyper's own limits (64 KiB URI, ~400 KiB of head, 100 headers), so a
/// request over ours gets SPEC §3's JSON error rather than hyper's empty-bodied one.
const MAX_URI_BYTES: usize = 8 * 1024;
const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

async fn head_limits(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let uri_len = request
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return ApiError::UriTooLong(Some(MAX_URI_BYTES)).into_response();
    }
    let headers = request.headers();
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES || headers.len() > MAX_HEADERS {
        return ApiError::HeadersTooLarge(Some((MAX_HEADER_BYTES, MAX_HEADERS))).into_response();
    }
    next.run(request).await
}

// ----- input -----

pub(super) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::InvalidJson("a JSON body is required".into()));
    }
    // One pass that refuses a key given twice at any depth: serde keeps the last of two
    // `daily_usd_cap`s while a reviewer (or a proxy in front) may read the first.
    let shape: strict_json::Shape = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidJson(format!("malformed JSON: {e}")))?;
    // serde would also accept a struct written as an array; the API takes objects only.
    if shape != strict_json::Shape::Object {
        return Err(ApiError::InvalidRequest(
            "the body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid request body: {e}")))
}

/// The body of an endpoint that takes no fields: none, or `{}`. Anything else is refused
/// like an unknown field elsewhere, rather than silently ignored.
fn no_fields(body: &Bytes) -> ApiResult<()> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoFields {}
    if body.is_empty() {
        return Ok(());
    }
    parse_body::<NoFields>(body).map(drop)
}

/// A JSON document walked once to refuse duplicate object keys, keeping nothing but the
/// kind of its top-level value.
mod strict_json {
    use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::collections::HashSet;
    use std::fmt;

    #[derive(Debug, PartialEq, Eq)]
    pub enum Shape {
        Object,
        Other,
    }

    impl<'de> Deserialize<'de> for Shape {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(Walk)
        }
    }

    struct Walk;

    impl<'de> Visitor<'de> for Walk {
        type Value = Shape;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
            Ok(Shape::Other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
            Ok(Shape::Other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
            Ok(Shape::Other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
            Ok(Shape::Other)
        }
        fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
            Ok(Shape::Other)
        }
        fn visit_unit<E>(self) -> Result<Shape, E> {
            Ok(Shape::Other)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
            while seq.next_element::<Shape>()?.is_some() {}
            Ok(Shape::Other)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
            let mut seen = HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if seen.contains(&key) {
                    return Err(de::Error::custom(format!("duplicate key {key:?}")));
                }
                map.next_value::<Shape>()?;
                seen.insert(key);
            }
            Ok(Shape::Object)
        }
    }
}

fn name_field(name: &str, what: &str) -> ApiResult<String> {
    let name = name.trim();
    if name.is_empty()
        || name.len() > MAX_LABEL
        || name
            .chars()
            .any(|c| c.is_control() || is_invisible_format(c))
    {
        return Err(ApiError::InvalidRequest(format!(
            "{what} must be 1 to {MAX_LABEL} printable characters (no control, \
                 zero-width or bidirectional-override characters)"
        )));
    }
    Ok(name.to_string())
}

/// A Stripe account id as Stripe writes them: `acct_` and 1 to 59 ASCII letters and digits.
fn is_account_id(id: &str) -> bool {
    id.strip_prefix("acct_").is_some_and(|rest| {
        (1..=59).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// Unicode format characters (general category Cf): zero-width characters, bidi
/// embeddings, overrides and isolates, invisible operators, tags; and the line and
/// paragraph separators and Hangul fillers, which render as a line break or as nothing.
/// Shown in a listing,
/// the audit trail or a log line, they hide text or make it read in another order.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}'
        | '\u{0600}'..='\u{0605}'
        | '\u{061C}'
        | '\u{06DD}'
        | '\u{070F}'
        | '\u{0890}'..='\u{0891}'
        | '\u{08E2}'
        | '\u{115F}'..='\u{1160}'
        | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}'
        | '\u{3164}'
        | '\u{FEFF}'
        | '\u{FFA0}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{110BD}'
        | '\u{110CD}'
        | '\u{13430}'..='\u{1343F}'
        | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0001}'
        | '\u{E0020}'..='\u{E007F}')
}

/// Metadata keys (at any depth) follow the label's rule: no control or invisible
/// format characters, not empty.
fn metadata_keys_are_printable(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().all(|(k, v)| {
            !k.trim().is_empty()
                && !k.chars().any(|c| c.is_control() || is_invisible_format(c))
                && metadata_keys_are_printable(v)
        }),
        Value::Array(items) => items.iter().all(metadata_keys_are_printable),
        _ => true,
    }
}

/// Levels of objects and arrays in `value` (a scalar: 0).
fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn page_limit(query: &HashMap<String, String>) -> ApiResult<i64> {
    match query.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| ApiError::InvalidRequest(format!("limit must be 1 to {MAX_PAGE}"))),
    }
}

/// Which listing a cursor belongs to: a cursor of one is refused by the other.
#[derive(Clone, Copy)]
pub enum CursorKind {
    Keys,
    Audit,
}

/// The cursor of a page: opaque, and bound to its tenant and listing (see
/// `Control::seal_cursor`); `i64::MAX` (from the newest) when absent.
fn cursor(
    s: &ApiState,
    tenant: &str,
    kind: CursorKind,
    query: &HashMap<String, String>,
) -> ApiResult<i64> {
    match query.get("cursor").map(String::as_str) {
        None | Some("") => Ok(i64::MAX),
        Some(c) => s
            .control
            .open_cursor(kind, tenant, c)
            .filter(|n| *n > 0)
            .ok_or_else(|| ApiError::InvalidRequest("cursor is not one this API returned".into())),
    }
}

fn next_cursor(
    s: &ApiState,
    tenant: &str,
    kind: CursorKind,
    last_seq: Option<i64>,
    page_full: bool,
) -> Value {
    match (last_seq, page_full) {
        (Some(seq), true) => json!(s.control.seal_cursor(kind, tenant, seq)),
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

/// RFC 3339 UTC with exactly three fractional digits (`…T07:00:00.850Z`), so a listing's
/// times line up and sort as text.
fn rfc3339_ms(unix_ms: i64) -> String {
    const MS: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(MS).ok())
        .unwrap_or_default()
}

// ----- tenants, tokens, nodes, signing keys (admin) -----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameRequest {
    name: String,
}

async fn create_tenant(State(s): State<ApiState>, _: Admin, body: Bytes) -> ApiResult<Response> {
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

/// A listing's query parameters, each at most once: `?status=revoked&status=active` is
/// 400 `invalid_request`, not one of the two picked silently.
struct Params(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        let mut params = HashMap::new();
        let query = parts.uri.query().unwrap_or_default().as_bytes();
        for (name, value) in url::form_urlencoded::parse(query) {
            if params
                .insert(name.to_string(), value.into_owned())
                .is_some()
            {
                return Err(ApiError::InvalidRequest(format!(
                    "query parameter {name:?} is given more than once"
                )));
            }
        }
        Ok(Params(params))
    }
}

async fn list_tenants(
    State(s): State<ApiState>,
    _: Admin,
    Params(q): Params,
) -> ApiResult<Json<Value>> {
    let limit = page_limit(&q)?;
    let after = match q.get("cursor").map(String::as_str) {
        None | Some("") => None,
        Some(c) => Some(
            c.split_once(':')
                .and_then(|(ts, id)| {
                    Some((ts.strip_prefix("c_")?.parse::<i64>().ok()?, id.to_string()))
                })
                .ok_or_else(|| {
                    ApiError::InvalidRequest("cursor is not one this API returned".into())
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
    _: Admin,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    no_fields(&body)?;
    let (token_id, token) = s
        .control
        .create_api_token(&id)
        .await?
        .ok_or(ApiError::NotFound("tenant"))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": token_id, "api_token": token.expose()})),
    )
        .into_response())
}

async fn delete_api_token(
    State(s): State<ApiState>,
    _: Admin,
    Path((id, token_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    if !s.control.delete_api_token(&id, &token_id).await? {
        return Err(ApiError::NotFound("API token"));
    }
    Ok(Json(json!({"id": token_id, "deleted": true})))
}

async fn create_node(State(s): State<ApiState>, _: Admin, body: Bytes) -> ApiResult<Response> {
    let req: NameRequest = parse_body(&body)?;
    let name = name_field(&req.name, "name")?;
    let Some((id, token)) = s.control.create_node(&name).await? else {
        return Err(ApiError::NameTaken("node", name));
    };
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "name": name, "node_token": token.expose()})),
    )
        .into_response())
}

async fn rotate_signing_key(
    State(s): State<ApiState>,
    _: Admin,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    no_fields(&body)?;
    let kid = s.control.rotate_signing_key().await?;
    Ok(Json(json!({"kid": kid})))
}

async fn jwks(State(s): State<ApiState>) -> Json<Value> {
    Json(serde_json::to_value(&*s.control.jwks()).unwrap_or_default())
}

async fn readyz(State(s): State<ApiState>) -> Response {
    let (ok, body) = readiness(&s.control, s.proxy_addr).await;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Whether this process can serve: its storage answers, its audit writer runs, it holds a
/// signing key and, in `serve` (`proxy_addr`), its proxy listener accepts connections
/// (`proxy_listener`, absent on `control`). With the JSON that
/// `/readyz` answers, on the control API and on `serve`'s metrics listener alike.
pub(crate) async fn readiness(control: &Control, proxy_addr: Option<SocketAddr>) -> (bool, Value) {
    // Both at once, each within 1.5 s: a lost database makes `/readyz` answer 503 within
    // 2 s, not after one timeout and then the other.
    let within = Duration::from_millis(1500);
    let (storage, audit) = tokio::join!(
        tokio::time::timeout(within, control.store().ping()),
        tokio::time::timeout(within, control.audit.ping()),
    );
    let (storage, audit) = (storage.unwrap_or(false), audit.unwrap_or(false));
    let signing = !control.jwks().keys.is_empty();
    let proxy = match proxy_addr {
        None => None,
        Some(mut addr) => Some({
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
        }),
    };
    let ok = storage && audit && signing && proxy != Some(false);
    let mut body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "storage": storage,
        "audit": audit,
        "signing_keys": signing,
    });
    if let Some(proxy) = proxy {
        body["proxy_listener"] = json!(proxy);
    }
    (ok, body)
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
        Err(ApiError::UnknownVendor(vendor.to_string()))
    }
}

async fn put_credential(
    State(s): State<ApiState>,
    Tenant(tenant): Tenant,
    Path(vendor): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    known_vendor(&s, &vendor)?;
    let req: CredentialRequest = parse_body(&body)?;
    let secret = req.secret.trim();
    // Vendors' secrets are printable ASCII; anything else is a pasting mistake that would
    // only show as the vendor's 401 later (or an unsendable header).
    if secret.len() < 8 || secret.len() > 4096 || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::InvalidRequest(
            "secret must be 8 to 4096 printable ASCII characters without spaces".into(),
        ));
    }
    if let Some(why) = not_a_vendor_secret(&vendor, secret) {
        return Err(ApiError::InvalidRequest(why.into()));
    }
    let (last4, updated_at) = s
        .control
        .put_credential(&tenant, &vendor, Secret::new(secret))
        .await?;
    Ok(Json(
        json!({"vendor": vendor, "last4": last4, "updated_at": rfc3339(updated_at)}),
    ))
}

/// Why `secret` cannot be `vendor`'s API secret, when its form shows it (a mistake that
/// would only show later, as every proxied call failing at the vendor).
fn not_a_vendor_secret(vendor: &str, secret: &str) -> Option<&'static str> {
    if crate::ids::is_control_token(secret) || secret.starts_with("vk_") {
        return Some("this is a Keybrake token, not the vendor's secret");
    }
    if vendor == "stripe" && secret.starts_with("pk_") {
        return Some(
            "this is a Stripe publishable key (pk_…), which cannot call the API: give a \
             secret key (sk_…) or a restricted key (rk_…)",
        );
    }
    None
}

async fn get_credential(
    State(s): State<ApiState>,
    Tenant(tenant): Tenant,
    Path(vendor): Path<String>,
) -> ApiResult<Json<Value>> {
    let (last4, updated_at) = s
        .control
        .get_credential(&tenant, &vendor)
        .await?
        .ok_or_else(|| no_credential(&s, &vendor))?;
    Ok(Json(
        json!({"vendor": vendor, "last4": last4, "updated_at": rfc3339(updated_at)}),
    ))
}

async fn delete_credential(
    State(s): State<ApiState>,
    Tenant(tenant): Tenant,
    Path(vendor): Path<String>,
) -> ApiResult<Json<Value>> {
    if !s.control.delete_credential(&tenant, &vendor).await? {
        return Err(no_credential(&s, &vendor));
    }
    Ok(Json(json!({"vendor": vendor, "deleted": true})))
}

/// No credential stored: 404 `unknown_vendor` when the catalog has no such vendor either
/// (as `PUT` answers), else `not_found`. A credential of a vendor since removed from the
/// catalog can still be read and deleted.
fn no_credential(s: &ApiState, vendor: &str) -> ApiError {
    match known_vendor(s, vendor) {
        Err(unknown) => unknown,
        Ok(()) => ApiError::NotFound("credential"),
    }
}

// ----- vault keys (tenant) -----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueRequest {
    #[serde(default)]
    label: Option<String>,
    vendor: String,
    allowed_endpoints: Vec<String>,
    /// Kept as the JSON text: read as f64, 0.1000000000000000001 would become 0.1.
    daily_usd_cap: Box<serde_json::value::RawValue>,
    #[serde(default)]
    expires_in: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    stripe_accounts: Option<Vec<String>>,
}

/// The cap from its JSON text, exactly: a number with at most 6 decimals.
fn parse_cap(json_text: &str) -> ApiResult<Micros> {
    let bad = |why: &str| ApiError::InvalidDailyUsdCap(format!("daily_usd_cap {why}"));
    let text = json_text.trim();
    if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Err(bad("must be a JSON number of US dollars, like 500 or 12.5"));
    }
    let micros = Micros::parse_usd(text).map_err(|e| bad(&format!("is not valid: {e}")))?;
    if !micros.is_positive() {
        return Err(bad("must be greater than zero"));
    }
    if micros > MAX_USD {
        return Err(bad("is larger than 1,000,000,000"));
    }
    Ok(micros)
}

/// `expires_in` in the one duration syntax (`config::parse_duration`), or a JSON integer
/// of seconds: whole seconds (a token's `exp` is in seconds), not zero, at most `max`.
fn parse_ttl(value: Option<&Value>, default: Duration, max: Duration) -> ApiResult<Duration> {
    let bad = |why: String| ApiError::InvalidExpiresIn(why);
    let ttl = match value {
        None | Some(Value::Null) => return Ok(default),
        Some(Value::String(s)) => {
            parse_duration(s).map_err(|e| bad(format!("expires_in {s:?}: {e}")))?
        }
        Some(Value::Number(n)) => n.as_u64().map(Duration::from_secs).ok_or_else(|| {
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
    if ttl.is_zero() || ttl.subsec_nanos() != 0 {
        return Err(bad(
            "expires_in must be a positive whole number of seconds".into()
        ));
    }
    if ttl > max {
        return Err(bad(format!(
            "expires_in is longer than the maximum of {} seconds",
            max.as_secs()
        )));
    }
    Ok(ttl)
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
    Tenant(tenant): Tenant,
    body: Bytes,
) -> ApiResult<Response> {
    let req: IssueRequest = parse_body(&body)?;
    let label = match req.label.as_deref() {
        None | Some("") => String::new(),
        Some(l) => name_field(l, "label")?,
    };
    if req.allowed_endpoints.is_empty() || req.allowed_endpoints.len() > MAX_PATTERNS {
        return Err(ApiError::InvalidEndpointPattern(format!(
            "allowed_endpoints must list 1 to {MAX_PATTERNS} patterns"
        )));
    }
    if req.allowed_endpoints.iter().map(String::len).sum::<usize>() > MAX_PATTERN_BYTES {
        return Err(ApiError::InvalidEndpointPattern(format!(
            "allowed_endpoints must total at most {MAX_PATTERN_BYTES} bytes: every pattern \
             travels in the key, in a header of every call"
        )));
    }
    for p in &req.allowed_endpoints {
        crate::pattern::check_issuable(p)
            .map_err(|e| ApiError::InvalidEndpointPattern(format!("pattern {p:?}: {e}")))?;
    }
    let daily_cap = parse_cap(req.daily_usd_cap.get())?;
    let settings = s.control.settings();
    let ttl = parse_ttl(
        req.expires_in.as_ref(),
        settings.default_ttl,
        settings.max_ttl,
    )?;
    let metadata = req.metadata.unwrap_or_else(|| json!({}));
    if !metadata.is_object()
        || metadata.to_string().len() > MAX_METADATA_BYTES
        || depth(&metadata) > MAX_METADATA_DEPTH
    {
        return Err(ApiError::InvalidRequest(format!(
            "metadata must be a JSON object under 8 KiB, nested at most {MAX_METADATA_DEPTH} levels"
        )));
    }
    if !metadata_keys_are_printable(&metadata) {
        return Err(ApiError::InvalidRequest("metadata keys must be printable: no control, zero-width or bidirectional-override characters".into(),
        ));
    }
    if let Some(accounts) = &req.stripe_accounts {
        if accounts.is_empty()
            || accounts.len() > MAX_ACCOUNTS
            || accounts.iter().any(|a| !is_account_id(a))
        {
            return Err(ApiError::InvalidRequest(format!(
                "stripe_accounts must list 1 to {MAX_ACCOUNTS} acct_… ids"
            )));
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
        Ok((row, token)) => {
            let mut body = issued_json(&row, &token);
            // A pattern written as the proxy's path (`/stripe/v1/…`) matches no call:
            // patterns are the vendor's own paths.
            let prefix = format!("/{}", row.vendor);
            let (proxied, own): (Vec<String>, Vec<String>) =
                row.allowed_endpoints.iter().cloned().partition(|p| {
                    let path = p.rsplit(' ').next().unwrap_or(p);
                    path == prefix || path.starts_with(&format!("{prefix}/"))
                });
            let mut warnings: Vec<String> = proxied
                .iter()
                .map(|p| {
                    format!(
                        "{p:?} starts with the proxy's prefix {prefix}: patterns are the \
                         vendor's own paths (\"/v1/…\"), so this one matches no call"
                    )
                })
                .collect();
            // `{id}` as in API docs is a literal here: a segment wildcard is `*`.
            warnings.extend(own.iter().filter(|p| p.contains('{')).map(|p| {
                format!(
                    "{p:?} has a {{…}} segment, which matches only that literal text: \
                     one path segment is written `*` (\"/v1/payment_intents/*\")"
                )
            }));
            warnings.extend(
                s.catalog
                    .get(&row.vendor)
                    .map(|v| v.unmetered_reach(&own))
                    .unwrap_or_default(),
            );
            // A pattern listed twice is warned about once.
            let mut seen = std::collections::HashSet::new();
            warnings.retain(|w| seen.insert(w.clone()));
            if !warnings.is_empty() {
                body["warnings"] = json!(warnings);
            }
            Ok((StatusCode::CREATED, Json(body)).into_response())
        }
        Err(IssueError::VendorNotConfigured(v)) => Err(ApiError::VendorNotConfigured(v)),
        Err(IssueError::Storage(e)) => Err(e.into()),
    }
}

async fn get_key(
    State(s): State<ApiState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let view = s
        .control
        .get_key(&tenant, &id)
        .await?
        .ok_or(ApiError::NotFound("key"))?;
    Ok(Json(key_json(&view)))
}

async fn list_keys(
    State(s): State<ApiState>,
    Tenant(tenant): Tenant,
    Params(q): Params,
) -> ApiResult<Response> {
    let status = match q.get("status").map(String::as_str) {
        None | Some("") | Some("all") => None,
        Some("active") => Some(KeyStatus::Active),
        Some("revoked") => Some(KeyStatus::Revoked),
        Some("expired") => Some(KeyStatus::Expired),
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "status {other:?} is not active, revoked or expired"
            )))
        }
    };
    let limit = page_limit(&q)?;
    let before = cursor(&s, &tenant, CursorKind::Keys, &q)?;
    let _building = s.control.page_build(&tenant).await?;
    let (views, more) = s.control.list_keys(&tenant, status, before, limit).await?;
    let next = next_cursor(
        &s,
        &tenant,
        CursorKind::Keys,
        views.last().map(|v| v.row.seq),
        more,
    );
    // Written key by key: one key's JSON tree at a time, never the whole page's.
    let mut body = Vec::with_capacity(64 * 1024);
    body.extend_from_slice(b"{\"data\":[");
    for (i, view) in views.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut body, &key_json(view)).map_err(anyhow::Error::from)?;
    }
    drop(views);
    body.extend_from_slice(b"],\"next_cursor\":");
    serde_json::to_writer(&mut body, &next).map_err(anyhow::Error::from)?;
    body.push(b'}');
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

async fn revoke_key(
    State(s): State<ApiState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row = s
        .control
        .revoke_key(&tenant, &id)
        .await?
        .ok_or(ApiError::NotFound("key"))?;
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
        .map_err(|_| ApiError::InvalidRequest("since must be RFC 3339 or Unix seconds".into()))
}

async fn list_audit(
    State(s): State<ApiState>,
    Tenant(tenant): Tenant,
    Params(q): Params,
) -> ApiResult<Json<Value>> {
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
        .list(
            &tenant,
            key_id,
            since,
            cursor(&s, &tenant, CursorKind::Audit, &q)?,
            limit,
        )
        .await?;
    let next = next_cursor(
        &s,
        &tenant,
        CursorKind::Audit,
        rows.last().map(|(seq, _)| *seq),
        rows.len() as i64 == limit,
    );
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
    fn audit_times_have_three_fractional_digits() {
        assert_eq!(rfc3339_ms(1_764_831_600_850), "2025-12-04T07:00:00.850Z");
        assert_eq!(rfc3339_ms(1_764_831_600_000), "2025-12-04T07:00:00.000Z");
        assert_eq!(rfc3339_ms(5), "1970-01-01T00:00:00.005Z");
    }

    #[test]
    fn caps_are_exact_positive_bounded_numbers() {
        assert_eq!(parse_cap("500").unwrap(), Micros(500_000_000));
        assert_eq!(parse_cap("12.5").unwrap(), Micros(12_500_000));
        assert_eq!(parse_cap("1e2").unwrap(), Micros(100_000_000));
        for bad in [
            "0",
            "-1",
            "\"500\"",
            "1e12",
            "0.0000001",
            "0.1000000000000000001",
            "null",
            "true",
        ] {
            assert_eq!(
                parse_cap(bad).unwrap_err().code(),
                "invalid_daily_usd_cap",
                "{bad}"
            );
        }
    }

    #[test]
    fn a_key_given_twice_anywhere_in_a_body_is_refused() {
        let parse = |text: &str| parse_body::<Value>(&Bytes::from(text.to_string()));
        assert!(parse(r#"{"a":1,"b":{"c":2,"d":[{"e":3}]}}"#).is_ok());
        for dup in [
            r#"{"daily_usd_cap":1,"daily_usd_cap":999999}"#,
            r#"{"metadata":{"a":1,"a":2}}"#,
            r#"{"x":[{"k":1,"k":1}]}"#,
        ] {
            let e = parse(dup).unwrap_err();
            let (_, code, message) = e.parts();
            assert_eq!(code, "invalid_json", "{dup}");
            assert!(message.contains("duplicate key"), "{message}");
        }
        assert_eq!(parse("[1]").unwrap_err().code(), "invalid_request");
    }

    #[test]
    fn invisible_and_bidi_override_labels_are_refused() {
        for bad in [
            "\u{200b}",
            "pay\u{202e}fdp",
            "a\u{2066}b\u{2069}",
            "x\u{feff}",
            "\u{e0041}",
        ] {
            assert_eq!(
                name_field(bad, "label").unwrap_err().code(),
                "invalid_request",
                "{bad:?}"
            );
        }
        for good in ["deno-charge-1", "café ☕", "שלום", "日本語"] {
            assert_eq!(name_field(good, "label").unwrap(), good);
        }
        assert!(metadata_keys_are_printable(
            &json!({"a": {"b": [{"c": 1}]}})
        ));
        assert!(!metadata_keys_are_printable(&json!({"a\u{202e}": 1})));
        assert!(!metadata_keys_are_printable(
            &json!({"a": [{"\u{200b}": 1}]})
        ));
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
            json!("1500ms"),
            json!(0),
            json!(-5),
            json!(true),
        ] {
            assert_eq!(
                parse_ttl(Some(&bad), d, m).unwrap_err().code(),
                "invalid_expires_in",
                "{bad}"
            );
        }
    }
}
