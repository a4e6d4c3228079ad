//! The vault-key format (SPEC §2), the one thing the control plane and the proxy share:
//! `vk_` + an EdDSA JWT whose header names its signing key (`kid`).
//!
//! The control plane signs; the proxy only ever holds public keys and verifies.

use crate::secret::Secret;
use base64::Engine;
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub const TOKEN_PREFIX: &str = "vk_";

/// Leeway on `exp`. The spec allows up to 5 s; we allow none, so a key is dead the second
/// its TTL ends (clock skew between control and proxy is the operator's NTP problem).
pub const EXP_LEEWAY_SECS: u64 = 0;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Key id, `key_…`.
    pub jti: String,
    /// Tenant id, `tn_…`.
    pub ten: String,
    /// Vendor name from the catalog.
    pub ven: String,
    /// Allowed endpoint patterns.
    pub eps: Vec<String>,
    /// Daily cap, micro-USD.
    pub cap: i64,
    pub iat: i64,
    pub exp: i64,
    /// Label chosen by the issuer.
    pub lbl: String,
    /// Allowed Stripe Connect accounts, present only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc: Option<Vec<String>>,
}

/// A private signing key with its id. The key pair is parsed once: deriving it from the
/// seed costs as much as a signature, and issuance signs on every `POST /v1/keys`.
pub struct SigningKey {
    pub kid: String,
    pair: ring::signature::Ed25519KeyPair,
    /// The encoded JWT header, the same for every token of this key.
    header_b64: String,
}

impl SigningKey {
    /// From a PKCS#8 Ed25519 document (as `ring` generates and we store encrypted).
    pub fn from_pkcs8(kid: String, pkcs8: &[u8]) -> Result<Self, TokenError> {
        let pair =
            ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| TokenError::Invalid)?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.clone());
        let header_json = serde_json::to_vec(&header).map_err(|_| TokenError::Invalid)?;
        let header_b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header_json);
        Ok(SigningKey {
            kid,
            pair,
            header_b64,
        })
    }

    /// `vk_` + `base64url(header).base64url(claims).base64url(Ed25519 signature)`.
    pub fn sign(&self, claims: &Claims) -> Secret {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims_json = serde_json::to_vec(claims).expect("claims serialize");
        let mut out = String::with_capacity(TOKEN_PREFIX.len() + 400);
        out.push_str(TOKEN_PREFIX);
        out.push_str(&self.header_b64);
        out.push('.');
        b64.encode_string(claims_json, &mut out);
        let signature = self.pair.sign(&out.as_bytes()[TOKEN_PREFIX.len()..]);
        out.push('.');
        b64.encode_string(signature.as_ref(), &mut out);
        Secret::new(out)
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({}, [redacted])", self.kid)
    }
}

/// One public key as published in the JWKS (RFC 8037, OKP / Ed25519).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub kid: String,
    pub x: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub use_: String,
}

impl Jwk {
    pub fn ed25519(kid: &str, public_key: &[u8]) -> Self {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            kid: kid.into(),
            x: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public_key),
            alg: "EdDSA".into(),
            use_: "sig".into(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the key is not a valid Keybrake vault key")]
    Invalid,
    #[error("the key has expired")]
    Expired,
}

/// Verifies vault keys against a set of public keys. Immutable; a new one is built and
/// swapped in when the JWKS changes.
pub struct Verifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
}

impl Verifier {
    pub fn new(jwks: &Jwks) -> Self {
        let keys = jwks
            .keys
            .iter()
            .filter(|k| k.kty == "OKP" && k.crv == "Ed25519")
            .filter_map(|k| Some((k.kid.clone(), DecodingKey::from_ed_components(&k.x).ok()?)))
            .collect();
        // Only EdDSA: `alg: none`, HS*/RS* confusion all fail before any key is consulted.
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = EXP_LEEWAY_SECS;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Verifier { keys, validation }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let jwt = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Invalid)?;
        let header = jsonwebtoken::decode_header(jwt).map_err(|_| TokenError::Invalid)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid);
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.get(kid))
            .ok_or(TokenError::Invalid)?;
        match jsonwebtoken::decode::<Claims>(jwt, key, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => Err(TokenError::Expired),
            Err(_) => Err(TokenError::Invalid),
        }
    }
}

/// The claims of a token whose signature was already checked (the verified-token cache
/// holds its digest): the payload decoded, no signature check, no expiry check.
pub fn claims_of_verified(token: &str) -> Result<Claims, TokenError> {
    let jwt = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(TokenError::Invalid)?;
    let payload = jwt.split('.').nth(1).ok_or(TokenError::Invalid)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Invalid)?;
    serde_json::from_slice(&json).map_err(|_| TokenError::Invalid)
}

/// A fresh Ed25519 key pair: (PKCS#8 private document, raw 32-byte public key).
pub fn generate_ed25519() -> (Vec<u8>, Vec<u8>) {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .expect("Ed25519 key generation failed");
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .expect("freshly generated PKCS#8 parses");
    (pkcs8.as_ref().to_vec(), pair.public_key().as_ref().to_vec())
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn claims(exp_in: i64) -> Claims {
        let now = now_secs();
        Claims {
            jti: "key_test".into(),
            ten: "tn_test".into(),
            ven: "stripe".into(),
            eps: vec!["POST /v1/payment_intents".into()],
            cap: 50_000_000,
            iat: now,
            exp: now + exp_in,
            lbl: "test".into(),
            acc: None,
        }
    }

    fn signer() -> (SigningKey, Jwks) {
        let (private, public) = generate_ed25519();
        let jwks = Jwks {
            keys: vec![Jwk::ed25519("k1", &public)],
        };
        (SigningKey::from_pkcs8("k1".into(), &private).unwrap(), jwks)
    }

    #[test]
    fn a_signed_token_verifies_and_round_trips_claims() {
        let (key, jwks) = signer();
        let token = key.sign(&claims(60));
        assert!(token.expose().starts_with("vk_ey"));
        assert_eq!(Verifier::new(&jwks).verify(token.expose()), Ok(claims(60)));
    }

    #[test]
    fn expired_tampered_unknown_and_unprefixed_tokens_fail() {
        let (key, jwks) = signer();
        let verifier = Verifier::new(&jwks);
        assert_eq!(
            verifier.verify(key.sign(&claims(-1)).expose()),
            Err(TokenError::Expired)
        );

        let token = key.sign(&claims(60));
        let jwt = token.expose().strip_prefix("vk_").unwrap();
        assert_eq!(verifier.verify(jwt), Err(TokenError::Invalid));

        let parts: Vec<&str> = jwt.split('.').collect();
        let mut c = claims(60);
        c.cap *= 100;
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&c).unwrap());
        let tampered = format!("vk_{}.{}.{}", parts[0], forged, parts[2]);
        assert_eq!(verifier.verify(&tampered), Err(TokenError::Invalid));

        let (other, _) = signer();
        assert_eq!(
            Verifier::new(&Jwks::default()).verify(other.sign(&claims(60)).expose()),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn alg_none_and_hmac_confusion_fail() {
        let (_, jwks) = signer();
        let verifier = Verifier::new(&jwks);
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let body = b64(&serde_json::to_vec(&claims(60)).unwrap());
        let none = format!("vk_{}.{}.", b64(br#"{"alg":"none","kid":"k1"}"#), body);
        assert_eq!(verifier.verify(&none), Err(TokenError::Invalid));

        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&jwks.keys[0].x)
            .unwrap();
        let hs = jsonwebtoken::encode(
            &header,
            &claims(60),
            &jsonwebtoken::EncodingKey::from_secret(&x),
        )
        .unwrap();
        assert_eq!(
            verifier.verify(&format!("vk_{hs}")),
            Err(TokenError::Invalid)
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Model: a token verifies only if it is, byte for byte, one this signer
            /// issued. Any one byte changed, dropped or added fails.
            #[test]
            fn only_the_exact_signed_token_verifies(
                at in any::<prop::sample::Index>(),
                byte in any::<u8>(),
                edit in 0u8..3,
            ) {
                let (key, jwks) = signer();
                let verifier = Verifier::new(&jwks);
                let token = key.sign(&claims(60));
                let mut bytes = token.expose().as_bytes().to_vec();
                let i = at.index(bytes.len());
                match edit {
                    0 if bytes[i] != byte => bytes[i] = byte,
                    0 => return Ok(()),
                    1 => { bytes.remove(i); }
                    _ => bytes.insert(i, byte),
                }
                let Ok(text) = String::from_utf8(bytes) else { return Ok(()) };
                prop_assert!(verifier.verify(&text).is_err(), "{text}");
            }

            /// Arbitrary input never verifies (and never panics).
            #[test]
            fn arbitrary_strings_are_refused(text in "(vk_)?[A-Za-z0-9_.=-]{0,300}") {
                let (_, jwks) = signer();
                prop_assert!(Verifier::new(&jwks).verify(&text).is_err());
            }
        }
    }
}
