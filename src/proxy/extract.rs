//! Stage 2, authenticate (first half): find the vault key. `Authorization: Bearer`, then `x-api-key` (Anthropic
//! SDKs), then HTTP Basic with the key as the user name (`curl -u vk_…:`).

use base64::Engine;
use http::HeaderMap;
use std::borrow::Cow;

/// Borrowed from the header, except for Basic, whose user name is decoded.
pub fn vault_key(headers: &HeaderMap) -> Option<Cow<'_, str>> {
    if let Some(auth) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, value) = auth.trim().split_once(' ').unwrap_or((auth, ""));
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !value.is_empty() {
            return Some(Cow::Borrowed(value));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value)
                .ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            let user = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
            return (!user.is_empty()).then(|| Cow::Owned(user.to_string()));
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(Cow::Borrowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn finds_the_key_wherever_a_client_puts_it() {
        assert_eq!(
            vault_key(&headers(&[("authorization", "Bearer vk_abc")])).as_deref(),
            Some("vk_abc")
        );
        assert_eq!(
            vault_key(&headers(&[("x-api-key", "vk_abc")])).as_deref(),
            Some("vk_abc")
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("vk_abc:");
        assert_eq!(
            vault_key(&headers(&[("authorization", &format!("Basic {basic}"))])).as_deref(),
            Some("vk_abc")
        );
        assert_eq!(vault_key(&headers(&[])), None);
        assert_eq!(vault_key(&headers(&[("authorization", "Bearer ")])), None);
    }
}
