//! Stage 3, scope: is this key allowed here? Vendor, endpoint (method-aware, on the canonical
//! path) and, for Stripe Connect, the account header.

use super::deny::Denial;
use super::verify::VerifiedKey;
use crate::config::Vendor;
use http::{HeaderMap, Method};

pub fn check(
    key: &VerifiedKey,
    vendor: &Vendor,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<(), Denial> {
    if key.claims.ven != vendor.name {
        return Err(Denial::VendorMismatch);
    }
    // Methods are case-sensitive: `post` or an extension method would pass a pattern that
    // allows any method, yet match no metering rule. No vendor API needs one.
    if !is_standard(method) {
        return Err(Denial::MethodNotAllowed);
    }
    if !key.allowlist.allows(method, path) {
        return Err(if key.allowlist.allows_path_any_method(path) {
            Denial::MethodNotAllowed
        } else {
            Denial::EndpointNotAllowed
        });
    }
    // `Stripe_Account` is the same header to a server that reads names CGI-style.
    let twins = headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            name.contains('_')
                && vendor
                    .account_headers
                    .iter()
                    .any(|h| same_but_underscores(name, h.as_str()))
        })
        .map(|(_, value)| value);
    let values: Vec<_> = vendor
        .account_headers
        .iter()
        .flat_map(|h| headers.get_all(h))
        .chain(twins)
        .collect();
    // One account per call: of two, the vendor acts on one, and the call's idempotency
    // fingerprint could name the other.
    if values.len() > 1 {
        return Err(Denial::AccountNotAllowed);
    }
    for value in values {
        {
            let allowed = value.to_str().ok().is_some_and(|account| {
                key.claims
                    .acc
                    .as_ref()
                    .is_some_and(|acc| acc.iter().any(|a| a == account.trim()))
            });
            if !allowed {
                return Err(Denial::AccountNotAllowed);
            }
        }
    }
    Ok(())
}

/// Whether header `name` is `canonical` with some of its `-` written as `_`.
pub fn same_but_underscores(name: &str, canonical: &str) -> bool {
    name.len() == canonical.len()
        && name
            .bytes()
            .zip(canonical.bytes())
            .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
}

pub(super) fn is_standard(method: &Method) -> bool {
    [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
    ]
    .contains(method)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};
    use crate::pattern::Allowlist;
    use crate::token::tests::claims;

    fn key(eps: &[&str], acc: Option<Vec<String>>) -> VerifiedKey {
        let mut c = claims(60);
        c.eps = eps.iter().map(|s| s.to_string()).collect();
        c.acc = acc;
        VerifiedKey::new(c.clone(), Allowlist::parse(&c.eps).unwrap())
    }

    #[test]
    fn vendor_endpoint_method_and_account() {
        let config = Config::from_yaml("", None, &Overrides::default()).unwrap();
        let stripe = &config.vendors["stripe"];
        let openai = &config.vendors["openai"];
        let k = key(
            &["POST /v1/payment_intents", "GET /v1/payment_intents/*"],
            Some(vec!["acct_1".into()]),
        );
        let none = HeaderMap::new();
        assert_eq!(
            check(&k, stripe, &Method::POST, "/v1/payment_intents", &none),
            Ok(())
        );
        assert_eq!(
            check(&k, openai, &Method::POST, "/v1/payment_intents", &none),
            Err(Denial::VendorMismatch)
        );
        assert_eq!(
            check(&k, stripe, &Method::POST, "/v1/charges", &none),
            Err(Denial::EndpointNotAllowed)
        );
        assert_eq!(
            check(&k, stripe, &Method::POST, "/v1/payment_intents/pi_1", &none),
            Err(Denial::MethodNotAllowed)
        );
        let mut h = HeaderMap::new();
        h.insert("stripe-account", "acct_1".parse().unwrap());
        assert_eq!(
            check(&k, stripe, &Method::POST, "/v1/payment_intents", &h),
            Ok(())
        );
        h.insert("stripe-account", "acct_2".parse().unwrap());
        assert_eq!(
            check(&k, stripe, &Method::POST, "/v1/payment_intents", &h),
            Err(Denial::AccountNotAllowed)
        );
        // Two accounts in one call, even both allowed: refused.
        let two = key(
            &["/v1/payment_intents"],
            Some(vec!["acct_1".into(), "acct_3".into()]),
        );
        let mut h = HeaderMap::new();
        h.append("stripe-account", "acct_1".parse().unwrap());
        assert_eq!(
            check(&two, stripe, &Method::POST, "/v1/payment_intents", &h),
            Ok(())
        );
        h.append("stripe-account", "acct_3".parse().unwrap());
        assert_eq!(
            check(&two, stripe, &Method::POST, "/v1/payment_intents", &h),
            Err(Denial::AccountNotAllowed)
        );
        let any = key(&["/v1/payment_intents"], None);
        let lower = Method::from_bytes(b"post").unwrap();
        assert_eq!(
            check(&any, stripe, &lower, "/v1/payment_intents", &none),
            Err(Denial::MethodNotAllowed)
        );
        // Underscore twins are the same header.
        for twin in ["stripe_account", "stripe_context", "Stripe_Account"] {
            let mut h = HeaderMap::new();
            h.insert(
                http::HeaderName::from_bytes(twin.as_bytes()).unwrap(),
                "acct_VICTIM".parse().unwrap(),
            );
            assert_eq!(
                check(&k, stripe, &Method::POST, "/v1/payment_intents", &h),
                Err(Denial::AccountNotAllowed),
                "{twin}"
            );
        }
        let no_acc = key(&["/v1/**"], None);
        assert_eq!(
            check(&no_acc, stripe, &Method::GET, "/v1/x", &h),
            Err(Denial::AccountNotAllowed)
        );
    }
}
