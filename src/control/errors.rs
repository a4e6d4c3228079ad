//! The control API's one error type and its one mapping to HTTP: every failure, whether a
//! handler, an authentication extractor (`auth.rs`), axum's own rejections, the router's
//! middleware or the listener raises it, is `{"error":{"code","message"}}` with the
//! status of SPEC §3, written by `ApiError::parts`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::time::Duration;

/// The credential an endpoint asks for, named in the `invalid_token` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Admin,
    Tenant,
    Node,
}

impl Credential {
    /// The prefix of this credential's tokens.
    pub fn prefix(self) -> &'static str {
        match self {
            Credential::Admin => "kba_",
            Credential::Tenant => "kb_",
            Credential::Node => "kbn_",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Credential::Admin => "admin token",
            Credential::Tenant => "tenant API token",
            Credential::Node => "node token",
        }
    }
}

/// Why a control API request failed. The `String`s are messages for the caller: they
/// name the field and the rule, never a secret.
#[derive(Debug)]
pub enum ApiError {
    /// 400: no body, or not JSON, or a key given twice.
    InvalidJson(String),
    /// 400: a field, path, query or header out of its rules.
    InvalidRequest(String),
    /// 400: axum refused the request's path, query or headers before a handler ran; its
    /// 4xx status is kept.
    Unreadable(StatusCode),
    /// 400: a bad hyper-level request (hyper answered before any handler could run).
    Unparsable,
    /// 400: `allowed_endpoints` empty, too long or with a bad pattern.
    InvalidEndpointPattern(String),
    /// 400: `expires_in` not a duration of SPEC §3 or over the maximum.
    InvalidExpiresIn(String),
    /// 400: `daily_usd_cap` not a positive, bounded, exact USD amount.
    InvalidDailyUsdCap(String),
    /// 401: no `Authorization: Bearer` token.
    MissingToken,
    /// 401: a token that is not the credential this endpoint needs.
    InvalidToken(Credential),
    /// 401: a token of another kind than this endpoint needs (which, by its prefix).
    WrongToken(Credential, &'static str),
    /// 404: no such object (also another tenant's), or no such route.
    NotFound(&'static str),
    /// 404: no such route, with what the caller probably meant.
    NotFoundHint(&'static str),
    /// 404: a vendor that is not in the catalog.
    UnknownVendor(String),
    /// 405.
    MethodNotAllowed,
    /// 409: a (kind, name) that names a live object already, e.g. ("node", "edge-1").
    NameTaken(&'static str, String),
    /// 408: the request (body read and handler) took longer than this.
    RequestTimeout(Duration),
    /// 413: a body over this many bytes.
    BodyTooLarge(usize),
    /// 414: a request target over this many bytes (`None`: over hyper's own limit).
    UriTooLong(Option<usize>),
    /// 431: headers over (bytes, fields) (`None`: over hyper's own limit).
    HeadersTooLarge(Option<(usize, usize)>),
    /// 422: a vendor unknown or without a registered credential.
    VendorNotConfigured(String),
    /// 429: this many requests of the kind are being served for the tenant already.
    RateLimited(&'static str, usize),
    /// 503: the database cannot be reached (or refuses work) now; try again later.
    StorageUnavailable,
    /// 500: logged where it was raised; the caller learns nothing of it.
    Internal,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// The one mapping to status, SPEC §3 code and message.
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
        use ApiError::*;
        let bad = StatusCode::BAD_REQUEST;
        match self {
            InvalidJson(m) => (bad, "invalid_json", m.clone()),
            InvalidRequest(m) => (bad, "invalid_request", m.clone()),
            Unreadable(status) => (
                *status,
                "invalid_request",
                "the request's path, query or headers could not be read".into(),
            ),
            Unparsable => (
                bad,
                "invalid_request",
                "the request could not be parsed".into(),
            ),
            InvalidEndpointPattern(m) => (bad, "invalid_endpoint_pattern", m.clone()),
            InvalidExpiresIn(m) => (bad, "invalid_expires_in", m.clone()),
            InvalidDailyUsdCap(m) => (bad, "invalid_daily_usd_cap", m.clone()),
            MissingToken => (
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "an Authorization: Bearer token is required".into(),
            ),
            InvalidToken(needed) => (
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                format!("this endpoint needs a valid {}", needed.name()),
            ),
            WrongToken(needed, given) => (
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                format!("this endpoint needs a valid {}; this is {given}", needed.name()),
            ),
            NotFound(what) => (
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            NotFoundHint(message) => (StatusCode::NOT_FOUND, "not_found", message.to_string()),
            UnknownVendor(v) => (
                StatusCode::NOT_FOUND,
                "unknown_vendor",
                format!("vendor {v:?} is not in the catalog"),
            ),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this path".into(),
            ),
            NameTaken(kind, name) => (
                StatusCode::CONFLICT,
                "name_taken",
                format!("a {kind} named {name:?} exists already: delete it first, or choose another name"),
            ),
            RequestTimeout(limit) => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request was not complete within {} ms",
                    limit.as_millis()
                ),
            ),
            BodyTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is over {} KiB", limit / 1024),
            ),
            UriTooLong(limit) => (
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                match limit {
                    Some(l) => format!("the request target is over {} KiB", l / 1024),
                    None => "the request target is too long".into(),
                },
            ),
            HeadersTooLarge(limit) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                match limit {
                    Some((bytes, fields)) => format!(
                        "the request headers are over {} KiB or {fields} fields",
                        bytes / 1024
                    ),
                    None => "the request headers are too large".into(),
                },
            ),
            VendorNotConfigured(v) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "vendor_not_configured",
                format!(
                    "vendor {v:?} has no credential registered for this tenant, or is not in \
                     the catalog: set one with PUT /v1/vendors/{v}/credential (CLI: keybrake \
                     vendor set {v} --secret-file FILE)"
                ),
            ),
            RateLimited(what, n) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("{n} {what} of this tenant are being served already: retry after a second"),
            ),
            StorageUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "the control plane's database is unavailable; try again shortly".into(),
            ),
            Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal error; see the server log".into(),
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    pub fn code(&self) -> &'static str {
        self.parts().1
    }

    /// SPEC §3's body: `{"error":{"code","message"}}`.
    pub fn body(&self) -> serde_json::Value {
        let (_, code, message) = self.parts();
        serde_json::json!({"error": {"code": code, "message": message}})
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        // Storage errors carry SQL and ids, never secrets (those are sealed or hashed first).
        if super::store::is_unavailable(&e) {
            // At most one line every 10 s (a full disk fails every write): the count of
            // the others with it.
            static LOG: crate::log_every::LogEvery =
                crate::log_every::LogEvery::new(std::time::Duration::from_secs(10));
            if let Some(others) = LOG.due() {
                log::warn!(
                    "control API call failed, storage unavailable ({others} more since the \
                     last such line): {e:#}"
                );
            }
            return ApiError::StorageUnavailable;
        }
        log::error!("control API internal error: {e:#}");
        ApiError::Internal
    }
}

/// The code of an error answer, carried to the listener's log line (`listener::observe`).
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = matches!(self, ApiError::RateLimited(..));
        let code = ErrorCode(self.code());
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        response.extensions_mut().insert(code);
        if retry {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Also: each (status, code) has its row in the API reference's table.
    #[test]
    fn each_error_has_the_status_and_code_of_spec_section_3() {
        let docs = include_str!("../../docs/api.md");
        let table = docs
            .split("### Control API error codes")
            .nth(1)
            .and_then(|t| t.split("\n## ").next())
            .expect("docs/api.md has a control API error table");
        let m = || "m".to_string();
        let cases = [
            (ApiError::InvalidJson(m()), 400, "invalid_json"),
            (ApiError::InvalidRequest(m()), 400, "invalid_request"),
            (
                ApiError::Unreadable(StatusCode::BAD_REQUEST),
                400,
                "invalid_request",
            ),
            (ApiError::Unparsable, 400, "invalid_request"),
            (
                ApiError::InvalidEndpointPattern(m()),
                400,
                "invalid_endpoint_pattern",
            ),
            (ApiError::InvalidExpiresIn(m()), 400, "invalid_expires_in"),
            (
                ApiError::InvalidDailyUsdCap(m()),
                400,
                "invalid_daily_usd_cap",
            ),
            (ApiError::MissingToken, 401, "missing_token"),
            (
                ApiError::InvalidToken(Credential::Admin),
                401,
                "invalid_token",
            ),
            (ApiError::NotFound("key"), 404, "not_found"),
            (ApiError::UnknownVendor(m()), 404, "unknown_vendor"),
            (ApiError::MethodNotAllowed, 405, "method_not_allowed"),
            (ApiError::NameTaken("node", m()), 409, "name_taken"),
            (
                ApiError::RequestTimeout(Duration::from_secs(1)),
                408,
                "request_timeout",
            ),
            (ApiError::BodyTooLarge(65536), 413, "body_too_large"),
            (ApiError::UriTooLong(None), 414, "uri_too_long"),
            (ApiError::HeadersTooLarge(None), 431, "headers_too_large"),
            (
                ApiError::VendorNotConfigured(m()),
                422,
                "vendor_not_configured",
            ),
            (
                ApiError::RateLimited("key listings", 2),
                429,
                "rate_limited",
            ),
            (ApiError::StorageUnavailable, 503, "storage_unavailable"),
            (ApiError::Internal, 500, "internal_error"),
        ];
        for (error, status, code) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.code(), code, "{error:?}");
            let body = error.body();
            assert_eq!(body["error"]["code"], code);
            assert!(body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
            assert_eq!(body.as_object().unwrap().len(), 1);
            assert!(
                table
                    .lines()
                    .any(|row| row.starts_with(&format!("| {status} |"))
                        && row.contains(&format!("`{code}`"))),
                "docs/api.md's control error table has no {status} `{code}` row"
            );
        }
    }

    #[test]
    fn an_internal_error_tells_the_caller_nothing_of_its_cause() {
        let e: ApiError = anyhow::anyhow!("UNIQUE constraint failed: keys.secret_hash").into();
        assert_eq!(e.code(), "internal_error");
        assert!(!e.body().to_string().contains("UNIQUE"));
    }
}
