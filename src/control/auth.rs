//! Who is calling the control API: axum extractors that read the `Authorization: Bearer`
//! token once, before a handler runs. A handler that takes `Admin` runs only for the admin
//! token; one that takes `Tenant` gets the tenant owning the API token. A rejection is an
//! `ApiError` (401 `missing_token` / `invalid_token`), so it has SPEC §3's JSON body.
//!
//! An edge node's calls (`/v1/sync/`) take `Node`: the node owning the node token, and the
//! node process's session from the `keybrake-node-session` header.

use super::api::ApiState;
use super::errors::{ApiError, Credential};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;

/// The caller holds the admin token.
#[derive(Debug)]
pub struct Admin;

/// The caller holds an API token of this tenant (its id).
#[derive(Debug)]
pub struct Tenant(pub String);

impl FromRequestParts<ApiState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers, Credential::Admin)?;
        if s.control.is_admin(token) {
            Ok(Admin)
        } else {
            Err(refused(Credential::Admin, token))
        }
    }
}

impl FromRequestParts<ApiState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers, Credential::Tenant)?;
        s.control
            .tenant_for_token(token)
            .map(Tenant)
            .ok_or_else(|| refused(Credential::Tenant, token))
    }
}

/// The caller holds a node token: the node's id, and its process's session (the lease
/// holder).
#[derive(Debug)]
pub struct Node {
    pub id: String,
    pub session: String,
}

impl FromRequestParts<ApiState> for Node {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers, Credential::Node)?;
        let id = s
            .control
            .node_for_token(token)
            .ok_or_else(|| refused(Credential::Node, token))?;
        let session = parts
            .headers
            .get("keybrake-node-session")
            .and_then(|v| v.to_str().ok())
            .filter(|v| super::fleet::valid_session(v))
            .ok_or_else(|| {
                ApiError::InvalidRequest(
                    "a keybrake-node-session header (8-64 of [A-Za-z0-9_-]) is required".into(),
                )
            })?
            .to_string();
        Ok(Node { id, session })
    }
}

/// The refusal of `token` where `needed` is asked for: naming what it is when its prefix
/// shows another kind of token (a tenant's API token on an admin endpoint, a vault key),
/// never any of its characters beyond the prefix.
fn refused(needed: Credential, token: &str) -> ApiError {
    match crate::ids::token_kind(token) {
        Some(kind) if !token.starts_with(needed.prefix()) => ApiError::WrongToken(needed, kind),
        _ => ApiError::InvalidToken(needed),
    }
}

/// The bearer token of a request; `needed` names the credential when the header is there
/// but unreadable.
/// Two `Authorization` headers are refused: which one counts would be a guess.
pub fn bearer(headers: &HeaderMap, needed: Credential) -> Result<&str, ApiError> {
    let mut all = headers.get_all(axum::http::header::AUTHORIZATION).iter();
    let value = all.next().ok_or(ApiError::MissingToken)?;
    if all.next().is_some() {
        return Err(ApiError::InvalidToken(needed));
    }
    let value = value.to_str().map_err(|_| ApiError::InvalidToken(needed))?;
    // The scheme is case-insensitive (RFC 9110 §11.1).
    value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::MissingToken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::crypto::MasterKey;
    use crate::control::{Control, ControlSettings};
    use crate::secret::Secret;
    use axum::http::{HeaderValue, Request};
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use std::time::Duration;

    /// Routes of each kind answered through the router: the extractor's rejection is SPEC
    /// §3's JSON body, and a tenant's token does not pass as the admin's.
    #[tokio::test]
    async fn extractors_let_only_their_credential_through_with_the_json_error_body() {
        let dir = std::env::temp_dir().join(format!("keybrake-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let settings = ControlSettings {
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(3600),
            vendors: ["stripe".to_string()].into(),
            lease_lifetime: Duration::from_secs(3),
            audit_durability: Default::default(),
            expired_key_retention: crate::config::defaults::EXPIRED_KEY_RETENTION,
        };
        let master = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        let control = Control::open(
            settings,
            &crate::database::Database::Sqlite {
                data_dir: dir.clone(),
            },
            master,
            Secret::new("the-admin-token"),
            Arc::new(crate::sync::Published::empty()),
            crate::metrics::Metrics::global(),
        )
        .await
        .unwrap();
        let (_, _, tenant_token, _) = control.create_tenant("t").await.unwrap();
        let mut app = crate::control::api::router(ApiState {
            control,
            catalog: Arc::new(Default::default()),
            proxy_addr: None,
        });
        let mut call = async |path: &str, token: Option<&str>| {
            let mut req = Request::get(path);
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let req = req.body(axum::body::Body::empty()).unwrap();
            let res = tower_service::Service::call(&mut app, req).await.unwrap();
            let status = res.status().as_u16();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        };
        let tenant = tenant_token.expose();
        for (path, token, status, code) in [
            ("/v1/tenants", None, 401, "missing_token"),
            ("/v1/tenants", Some(tenant), 401, "invalid_token"),
            ("/v1/tenants", Some("the-admin-token"), 200, ""),
            ("/v1/keys", None, 401, "missing_token"),
            ("/v1/keys", Some("the-admin-token"), 401, "invalid_token"),
            ("/v1/keys", Some("kb_unknown"), 401, "invalid_token"),
            ("/v1/keys", Some(tenant), 200, ""),
        ] {
            assert_eq!(
                call(path, token).await,
                (status, code.to_string()),
                "{path} {}",
                token.map_or("no token", |t| if t == tenant { "tenant" } else { t })
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_bearer_token_is_read_from_the_authorization_header_only() {
        let mut h = HeaderMap::new();
        assert_eq!(
            bearer(&h, Credential::Admin).unwrap_err().code(),
            "missing_token"
        );
        for (value, expect) in [
            ("Bearer abc", Ok("abc")),
            ("bearer  abc ", Ok("abc")),
            ("Bearer ", Err("missing_token")),
            ("Basic YWJj", Err("missing_token")),
            ("abc", Err("missing_token")),
        ] {
            h.insert("authorization", HeaderValue::from_static(value));
            let got = bearer(&h, Credential::Admin).map_err(|e| e.code());
            assert_eq!(got, expect, "{value:?}");
        }
        h.insert(
            "authorization",
            HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
        );
        assert_eq!(
            bearer(&h, Credential::Tenant).unwrap_err().code(),
            "invalid_token"
        );
    }
}
