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

/// Where else in the request a vault key sits, besides the headers the proxy removes
/// (`dropped`: the vendor's `strip_headers`, which hold every place `vault_key` reads):
/// the path (`canonical`, as it is forwarded), the query string or another header.
/// Found, as sent or percent-decoded, by its shape (`vk_eyJ` at a word's start), or for
/// the key the request presents (`presented`), by its signature, whatever surrounds it
/// (its JWT without the prefix, or behind `VK_`). Not verified.
pub fn stray_vault_key(
    canonical: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    dropped: &[http::HeaderName],
    presented: Option<&str>,
) -> Option<String> {
    // An Ed25519 signature is 86 characters of base64url: nothing shorter is looked for,
    // and its first 24 (144 random bits) are what is looked for.
    let signature = presented
        .and_then(|t| t.rsplit('.').next())
        .filter(|s| s.len() >= 64)
        .map(|s| memchr::memmem::Finder::new(&s.as_bytes()[..24]));
    let holds = |text: &[u8]| holds_vault_key(text, signature.as_ref());
    if holds(canonical.as_bytes()) {
        return Some("the path".into());
    }
    if query.is_some_and(|q| holds(q.as_bytes())) {
        return Some("the query string".into());
    }
    headers
        .iter()
        .find(|(name, value)| !dropped.contains(name) && holds(value.as_bytes()))
        .map(|(name, _)| format!("header {name}"))
}

/// `text` holds a vault key (see `stray_vault_key`), as it is or once percent-decoded
/// (twice: a vendor that decoded once more would read it).
fn holds_vault_key(text: &[u8], signature: Option<&memchr::memmem::Finder<'_>>) -> bool {
    let holds = |t: &[u8]| {
        memchr::memchr_iter(b'v', t)
            .any(|i| t[i..].starts_with(b"vk_eyJ") && (i == 0 || !t[i - 1].is_ascii_alphanumeric()))
            || signature.is_some_and(|s| s.find(t).is_some())
    };
    if holds(text) {
        return true;
    }
    if memchr::memchr(b'%', text).is_none() {
        return false;
    }
    let decoded = |t: &[u8]| percent_encoding::percent_decode(t).collect::<Vec<u8>>();
    let once = decoded(text);
    holds(&once) || (memchr::memchr(b'%', &once).is_some() && holds(&decoded(&once)))
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

    #[test]
    fn a_vault_key_anywhere_the_vendor_would_see_it_is_found() {
        let dropped = [
            http::header::AUTHORIZATION,
            http::HeaderName::from_static("x-api-key"),
        ];
        let key = "vk_eyJhbGciOiJFZERTQSJ9.e30.sig";
        let found = |uri: &str, pairs: &[(&'static str, &str)]| {
            let (path, query) = uri
                .split_once('?')
                .map_or((uri, None), |(p, q)| (p, Some(q)));
            stray_vault_key(path, query, &headers(pairs), &dropped, None)
        };
        let read = [
            ("authorization", &*format!("Bearer {key}")),
            ("x-api-key", key),
        ];
        assert_eq!(found("/stripe/v1/charges?limit=3", &read), None);
        assert_eq!(
            found(&format!("/stripe/v1/charges?api_key={key}"), &[]).as_deref(),
            Some("the query string")
        );
        assert_eq!(
            found("/stripe/v1/charges?key=vk%5FeyJhbGci", &[]).as_deref(),
            Some("the query string")
        );
        assert_eq!(
            found(&format!("/stripe/v1/customers/{key}"), &[]).as_deref(),
            Some("the path")
        );
        assert_eq!(
            found("/openai/v1/models", &[("x-goog-api-key", key)]).as_deref(),
            Some("header x-goog-api-key")
        );
        assert_eq!(
            found("/openai/v1/models", &[("cookie", &format!("s=1; k={key}"))]).as_deref(),
            Some("header cookie")
        );
        // After an escape (`Bearer%20…`, `%22…%22`), or itself escaped, once or twice.
        for query in [
            "auth=Bearer%20vk_eyJhbGci",
            "q=%22vk_eyJhbGci%22",
            "x=token%3Dvk_eyJhbGci",
            "k=%76k_eyJhbGci",
            "k=vk%255FeyJhbGci",
        ] {
            assert_eq!(
                found(&format!("/stripe/v1/charges?{query}"), &[]).as_deref(),
                Some("the query string"),
                "{query}"
            );
        }
        // Not at a word's start, or not a JWT after the prefix: not a key.
        assert_eq!(
            found(
                "/stripe/v1/charges?q=avk_eyJx&r=vk_abc",
                &[("x-id", "dvk_eyJ")]
            ),
            None
        );
    }

    #[test]
    fn the_presented_keys_signature_is_found_whatever_surrounds_it() {
        let sig = "A".repeat(86);
        let token = format!("vk_eyJhbGciOiJFZERTQSJ9.eyJqdGkiOiJ4In0.{sig}");
        let jwt = &token[3..];
        let dropped = [http::header::AUTHORIZATION];
        let found = |path: &str, query: Option<&str>, pairs: &[(&'static str, &str)]| {
            stray_vault_key(path, query, &headers(pairs), &dropped, Some(&token))
        };
        let auth = format!("Bearer {token}");
        assert_eq!(
            found(
                "/openai/v1/models",
                Some("limit=1"),
                &[("authorization", &auth)]
            ),
            None
        );
        for (path, query, pairs, place) in [
            (format!("/openai/v1/models/{jwt}"), None, vec![], "the path"),
            (
                "/openai/v1/models".into(),
                Some(format!("k=VK_{jwt}")),
                vec![],
                "the query string",
            ),
            (
                "/openai/v1/models".into(),
                Some(format!("s={sig}")),
                vec![],
                "the query string",
            ),
        ] {
            assert_eq!(
                found(&path, query.as_deref(), &pairs).as_deref(),
                Some(place),
                "{path} {query:?}"
            );
        }
        let header = format!("x {jwt}");
        assert_eq!(
            found("/openai/v1/models", None, &[("x-foo", &header)]).as_deref(),
            Some("header x-foo")
        );
    }
}
