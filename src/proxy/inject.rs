//! Stage 4, credential (the tenant's vendor secret for the key), and stage 8: the
//! request the vendor sees. Every client credential and hop-by-hop header
//! is removed, the vendor's real secret is injected the vendor's way, and the path is the
//! canonical one under the vendor's base path.

use super::deny::Denial;
use super::verify::VerifiedKey;
use crate::config::{AuthStyle, Vendor};
use crate::secret::Secret;
use crate::sync::Published;
use base64::Engine;
use pingora::http::RequestHeader;

/// Hop-by-hop headers (RFC 9110 §7.6.1) a proxy must not forward (either way).
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
];

/// A vendor's answer loses its hop-by-hop headers and those its `Connection` header
/// names (not its framing, which Pingora reads and writes itself): Pingora writes the
/// client connection's own.
pub fn drop_hop_by_hop(resp: &mut pingora::http::ResponseHeader) {
    let named: Vec<String> = resp
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty() && n != "content-length" && n != "transfer-encoding")
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        resp.remove_header(name);
    }
}

/// Stage 4, credential: the vendor secret the key's tenant configured for its vendor.
pub fn credential(published: &Published, key: &VerifiedKey) -> Result<Secret, Denial> {
    published
        .credentials
        .load()
        .get(key.claims.ten.as_str())
        .and_then(|vendors| vendors.get(key.claims.ven.as_str()))
        .cloned()
        .ok_or(Denial::VendorNotConfigured)
}

/// A body read whole goes out with its length: framing is rewritten unless the client's
/// already says exactly that.
pub fn set_body_length(upstream: &mut RequestHeader, len: usize) -> pingora::Result<()> {
    let mut lengths = upstream
        .headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter();
    let declared = match (lengths.next(), lengths.next()) {
        (Some(only), None) => only.to_str().ok().and_then(|v| v.parse::<usize>().ok()),
        _ => None,
    };
    if declared != Some(len)
        || upstream
            .headers
            .contains_key(http::header::TRANSFER_ENCODING)
    {
        upstream.remove_header(&http::header::TRANSFER_ENCODING);
        upstream.insert_header(http::header::CONTENT_LENGTH, http::HeaderValue::from(len))?;
    }
    Ok(())
}

/// The header names a request's `Connection` header lists (lower case).
fn connection_named(req: &RequestHeader) -> Vec<String> {
    req.headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect()
}

/// Removes, before anything reads the request, the headers its `Connection` header names:
/// they are hop-by-hop, so the vendor never gets them, and what the proxy checks must be
/// what the vendor reads (`Connection: Idempotency-Key` made a charged call look like a
/// free replay, `Connection: Stripe-Account` made the lookups read another account than
/// the one charged). The body's framing headers stay where Pingora read them;
/// `strip_client_headers` drops them from what is forwarded.
pub fn drop_connection_named_headers(req: &mut RequestHeader) {
    let named = connection_named(req);
    for name in named {
        let framing = [
            http::header::CONTENT_LENGTH,
            http::header::TRANSFER_ENCODING,
            http::header::HOST,
            http::header::CONNECTION,
        ];
        if !framing.iter().any(|f| f.as_str() == name) {
            req.remove_header(&name);
        }
    }
}

pub fn strip_client_headers(req: &mut RequestHeader, vendor: &Vendor) {
    // Headers named by Connection are hop-by-hop too.
    let named = connection_named(req);
    // One pass over the headers present (names are lower case in `http`), then only the
    // ones found are removed.
    let doomed: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|h| {
            let h = h.as_str();
            HOP_BY_HOP.contains(&h)
                || METHOD_OVERRIDES.contains(&h)
                || is_keybrakes_own(h)
                || named.iter().any(|n| n == h)
                || vendor.strip_headers.iter().any(|n| n.as_str() == h)
                || (h.contains('_') && is_twin_of_a_checked_header(h, vendor))
        })
        .cloned()
        .collect();
    for name in doomed {
        req.remove_header(&name);
    }
}

/// Keybrake's own header names (`x-keybrake-key-id` on answers), in either spelling: a
/// client's are its own words about Keybrake, nothing a vendor should be shown.
fn is_keybrakes_own(h: &str) -> bool {
    h.starts_with("x-keybrake-") || h.starts_with("x_keybrake_")
}

/// Headers some servers read as the request's real method (a `GET`, free, sent on as a
/// `POST`): the method Keybrake checked is the one the vendor gets.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Headers Keybrake reads, checks or injects besides the vendor's own lists: their
/// underscore spellings (`Idempotency_Key`), which a CGI-style server reads as the same
/// header, never reach the vendor.
const CHECKED: [&str; 7] = [
    "idempotency-key",
    "anthropic-beta",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "host",
];

/// `name` (with a `_`) spells a header Keybrake checks or injects with underscores.
fn is_twin_of_a_checked_header(name: &str, vendor: &Vendor) -> bool {
    let twin = |canonical: &str| super::scope::same_but_underscores(name, canonical);
    CHECKED.iter().any(|c| twin(c))
        || METHOD_OVERRIDES.iter().any(|m| twin(m))
        || twin(vendor.auth_header.as_str())
        || vendor.strip_headers.iter().any(|h| twin(h.as_str()))
        || vendor.account_headers.iter().any(|h| twin(h.as_str()))
        || HOP_BY_HOP.iter().any(|h| twin(h))
}

pub fn inject_credential(
    req: &mut RequestHeader,
    vendor: &Vendor,
    secret: &Secret,
) -> pingora::Result<()> {
    let value = match vendor.auth {
        AuthStyle::Bearer => {
            let mut v = String::with_capacity(7 + secret.expose().len());
            v.push_str("Bearer ");
            v.push_str(secret.expose());
            v
        }
        AuthStyle::Basic => format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{}:", secret.expose()))
        ),
        AuthStyle::Header => secret.expose().to_string(),
    };
    // From the String itself: its buffer becomes the header's, no second copy.
    let mut value = http::HeaderValue::try_from(value).map_err(|_| {
        pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "vendor secret is not a valid header value",
        )
    })?;
    value.set_sensitive(true);
    req.insert_header(vendor.auth_header.clone(), value)?;
    for (name, value) in &vendor.default_headers {
        if !req.headers.contains_key(name) {
            req.insert_header(name.clone(), value.clone())?;
        }
    }
    Ok(())
}

/// `{base path}{vendor-relative canonical path}?{query}`.
pub fn upstream_uri(
    vendor: &Vendor,
    path: &str,
    query: Option<&str>,
) -> pingora::Result<http::Uri> {
    let mut uri = String::with_capacity(vendor.upstream.base_path.len() + path.len() + 1);
    uri.push_str(&vendor.upstream.base_path);
    uri.push_str(if path.is_empty() { "/" } else { path });
    if let Some(q) = query {
        uri.push('?');
        uri.push_str(q);
    }
    uri.parse().map_err(|_| {
        pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "cannot build the upstream URI",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    #[test]
    fn client_credentials_out_vendor_credential_in() {
        let c = Config::from_yaml("", None, &Overrides::default()).unwrap();
        let stripe = &c.vendors["stripe"];
        let mut req = RequestHeader::build("POST", b"/stripe/v1/payment_intents", None).unwrap();
        req.insert_header("authorization", "Bearer vk_secret_token")
            .unwrap();
        req.insert_header("x-api-key", "vk_secret_token").unwrap();
        req.insert_header("connection", "keep-alive, x-trace")
            .unwrap();
        req.insert_header("x-trace", "1").unwrap();
        req.insert_header("idempotency-key", "abc").unwrap();
        for twin in [
            "idempotency_key",
            "x_api_key",
            "stripe_account",
            "proxy_authorization",
        ] {
            req.insert_header(http::HeaderName::from_bytes(twin.as_bytes()).unwrap(), "x")
                .unwrap();
        }
        req.insert_header("x_custom_note", "kept").unwrap();
        strip_client_headers(&mut req, stripe);
        for twin in [
            "idempotency_key",
            "x_api_key",
            "stripe_account",
            "proxy_authorization",
        ] {
            assert!(req.headers.get(twin).is_none(), "{twin} forwarded");
        }
        assert_eq!(req.headers["x_custom_note"], "kept");
        inject_credential(&mut req, stripe, &Secret::new("sk_test_123")).unwrap();
        assert_eq!(req.headers["authorization"], "Bearer sk_test_123");
        assert!(req.headers.get("x-api-key").is_none());
        assert!(req.headers.get("x-trace").is_none() && req.headers.get("connection").is_none());
        assert_eq!(req.headers["idempotency-key"], "abc");

        let anthropic = &c.vendors["anthropic"];
        let mut req = RequestHeader::build("POST", b"/v1/messages", None).unwrap();
        req.insert_header("x-api-key", "vk_x").unwrap();
        // Checked by the LLM stage under its dashed name only: the twin never goes on.
        req.insert_header("anthropic_beta", "context-1m-2025-08-07")
            .unwrap();
        for header in [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            // Their CGI-style spellings, read by such a server as the same headers.
            "x_http_method_override",
            "x_http_method",
            "x_method_override",
        ] {
            req.insert_header(header, "POST").unwrap();
        }
        req.insert_header("x-keybrake-key-id", "key_someone_else")
            .unwrap();
        req.insert_header("x_keybrake_tenant", "tn_someone_else")
            .unwrap();
        strip_client_headers(&mut req, anthropic);
        assert!(req.headers.get("anthropic_beta").is_none());
        assert!(req.headers.keys().all(|h| !h.as_str().contains("keybrake")));
        assert!(req.headers.keys().all(|h| !h.as_str().contains("method")));
        inject_credential(&mut req, anthropic, &Secret::new("sk-ant-1")).unwrap();
        assert_eq!(req.headers["x-api-key"], "sk-ant-1");
        assert_eq!(req.headers["anthropic-version"], "2023-06-01");
        assert!(req.headers.get("authorization").is_none());
    }
}
