//! The vault-key format (SPEC §2), the one thing the control plane and the proxy share:
//! `vk_` + an EdDSA JWT whose header names its signing key (`kid`).
//!
//! The control plane signs; the proxy only ever holds public keys and verifies.

use crate::secret::Secret;
use base64::Engine;
use jsonwebtoken::{Algorithm, Header};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub mod batch;

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
///
/// The JWT is taken apart here rather than by `jsonwebtoken::decode`, which decodes the
/// header twice and the claims twice and hands the signature to ring, which decompresses
/// the public key on every call: each key's point is decompressed once, when the JWKS
/// arrives, and ed25519-dalek checks the signature against it. The acceptance rule is
/// ring's (and RFC 8032's cofactorless equation): `s` must be canonical and `[s]B - [k]A`
/// must encode to exactly the signature's `R`.
pub struct Verifier {
    keys: HashMap<String, ed25519_dalek::VerifyingKey>,
}

/// The part of a JWT header that matters here; any other field is ignored.
#[derive(Deserialize)]
struct JwtHeader {
    alg: Algorithm,
    kid: Option<String>,
}

impl Verifier {
    pub fn new(jwks: &Jwks) -> Self {
        let keys = jwks
            .keys
            .iter()
            .filter(|k| k.kty == "OKP" && k.crv == "Ed25519")
            .filter_map(|k| Some((k.kid.clone(), public_key(&k.x)?)))
            .collect();
        Verifier { keys }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let Unverified { payload, check } = self.parse(token)?;
        if !check.holds() {
            return Err(TokenError::Invalid);
        }
        payload.claims()
    }

    /// The token taken apart and checked for everything but its signature: the
    /// signature is then checked alone ([`SignatureCheck::holds`]) or with others
    /// ([`batch::all_hold`]).
    pub fn parse<'a>(&self, token: &'a str) -> Result<Unverified<'a>, TokenError> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwt = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Invalid)?;
        // `header.claims.signature`: exactly three parts; what is signed is the first two.
        let (signed, signature) = jwt.rsplit_once('.').ok_or(TokenError::Invalid)?;
        let (header, payload) = signed.split_once('.').ok_or(TokenError::Invalid)?;
        if payload.contains('.') {
            return Err(TokenError::Invalid);
        }
        let header: JwtHeader = b64
            .decode(header)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(TokenError::Invalid)?;
        // Only EdDSA: `alg: none`, HS*/RS* confusion all fail before any key is consulted.
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid);
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.get(kid))
            .ok_or(TokenError::Invalid)?;
        let mut bytes = [0u8; 64];
        match b64.decode_slice(signature, &mut bytes) {
            Ok(64) => {}
            _ => return Err(TokenError::Invalid),
        }
        // ed25519-dalek refuses an unreduced `s` too, unless a crate in the build turns on
        // its `legacy_compatibility` feature: checked here whatever the features.
        if !is_reduced(&bytes[32..]) {
            return Err(TokenError::Invalid);
        }
        Ok(Unverified {
            payload: Payload(payload),
            check: SignatureCheck {
                message: signed.as_bytes().to_vec(),
                signature: bytes,
                key: *key,
            },
        })
    }
}

/// A token whose signature is still to be checked.
pub struct Unverified<'a> {
    pub payload: Payload<'a>,
    pub check: SignatureCheck,
}

/// A token's claims part, still encoded.
pub struct Payload<'a>(&'a str);

impl Payload<'_> {
    /// The claims, once the signature held: decoded, and refused when expired.
    pub fn claims(&self) -> Result<Claims, TokenError> {
        let claims = self.decoded()?;
        if claims.exp < now_secs().saturating_sub(EXP_LEEWAY_SECS as i64) {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// The claims, once the signature held, expired or not (the proxy refuses an expired
    /// key itself, and names it in the audit trail).
    pub fn decoded(&self) -> Result<Claims, TokenError> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(self.0)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(TokenError::Invalid)
    }
}

/// One Ed25519 signature to check: the signed bytes, the signature (`s` known to be
/// reduced), and the public key it must verify against.
pub struct SignatureCheck {
    message: Vec<u8>,
    signature: [u8; 64],
    key: ed25519_dalek::VerifyingKey,
}

impl SignatureCheck {
    /// The signature checked alone, by RFC 8032's cofactorless rule: `[s]B - [k]A` must
    /// encode to exactly the signature's `R`.
    pub fn holds(&self) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(&self.signature);
        ed25519_dalek::Verifier::verify(&self.key, &self.message, &signature).is_ok()
    }
}

/// The order of the Ed25519 group, L = 2^252 + 27742317777372353535851937790883648493,
/// little-endian.
const GROUP_ORDER: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// A signature's `s` (32 bytes, little-endian) is below L: the only encoding RFC 8032
/// accepts, so no token has a second valid signature.
fn is_reduced(s: &[u8]) -> bool {
    s.iter().rev().cmp(GROUP_ORDER.iter().rev()) == std::cmp::Ordering::Less
}

/// A JWK's `x`: a 32-byte Ed25519 public key that decodes to a curve point of large
/// order; anything else is no key (`None`), so no token can verify against it.
fn public_key(x: &str) -> Option<ed25519_dalek::VerifyingKey> {
    let bytes: [u8; 32] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(x)
        .ok()?
        .try_into()
        .ok()?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()?;
    (!key.is_weak()).then_some(key)
}

/// The claims of a token whose signature was already checked (the verified-token cache
/// holds its digest): the payload decoded, no signature check, no expiry check.
pub fn claims_of_verified(token: &str) -> Result<Claims, TokenError> {
    let jwt = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(TokenError::Invalid)?;
    Payload(jwt.split('.').nth(1).ok_or(TokenError::Invalid)?).decoded()
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

/// Milliseconds on a clock that only moves forward, and keeps counting while the host is
/// suspended (Linux's `CLOCK_BOOTTIME`; never 0): for deadlines that a wall clock set back
/// or forward must not move, and that a suspend must not stretch (how long leases may be
/// spent).
pub fn mono_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(
        rc, 0,
        "CLOCK_BOOTTIME is readable on every Linux since 2.6.39"
    );
    ts.tv_sec
        .saturating_mul(1000)
        .saturating_add(ts.tv_nsec / 1_000_000)
        .saturating_add(1)
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

    /// A token re-encoded with its signature's two halves replaced.
    fn with_signature(token: &str, r: &[u8], s: &[u8]) -> String {
        let (signed, _) = token.rsplit_once('.').unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{signed}.{}", b64.encode([r, s].concat()))
    }

    fn signature_of(token: &str) -> Vec<u8> {
        let (_, sig) = token.rsplit_once('.').unwrap();
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap()
    }

    #[test]
    fn a_signature_with_s_not_reduced_is_refused_as_ring_refuses_it() {
        // s + L satisfies the verification equation just as s does: accepting it would
        // make a second valid token out of every issued one.
        let (key, jwks) = signer();
        let token = key.sign(&claims(60));
        let sig = signature_of(token.expose());
        let order = GROUP_ORDER;
        let mut s_plus_l = [0u8; 32];
        let mut carry = 0u16;
        for i in 0..32 {
            let sum = sig[32 + i] as u16 + order[i] as u16 + carry;
            s_plus_l[i] = sum as u8;
            carry = sum >> 8;
        }
        assert_eq!(carry, 0, "s + L fits in 256 bits");
        let forged = with_signature(token.expose(), &sig[..32], &s_plus_l);
        assert_eq!(
            Verifier::new(&jwks).verify(&forged),
            Err(TokenError::Invalid)
        );
        let (signed, _) = forged["vk_".len()..].rsplit_once('.').unwrap();
        let public = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&jwks.keys[0].x)
            .unwrap();
        let mut full = sig[..32].to_vec();
        full.extend_from_slice(&s_plus_l);
        assert!(
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public)
                .verify(signed.as_bytes(), &full)
                .is_err()
        );
        // The untouched token still verifies.
        assert!(Verifier::new(&jwks).verify(token.expose()).is_ok());
    }

    #[test]
    fn a_weak_public_key_in_the_jwks_verifies_nothing() {
        // With the identity as public key, [k]A vanishes and R = [s]B "signs" any message.
        use curve25519_dalek::{constants::ED25519_BASEPOINT_TABLE, Scalar};
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let jwks = Jwks {
            keys: vec![Jwk::ed25519("weak", &identity)],
        };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"EdDSA","kid":"weak"}"#);
        let body = b64.encode(serde_json::to_vec(&claims(60)).unwrap());
        let s = Scalar::from(7u64);
        let r = (ED25519_BASEPOINT_TABLE * &s).compress();
        let forged = with_signature(&format!("vk_{header}.{body}.x"), r.as_bytes(), s.as_bytes());
        assert_eq!(
            Verifier::new(&jwks).verify(&forged),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn s_is_reduced_exactly_below_the_group_order() {
        let mut below = GROUP_ORDER;
        below[0] -= 1;
        assert!(is_reduced(&below));
        assert!(is_reduced(&[0; 32]));
        assert!(!is_reduced(&GROUP_ORDER));
        let mut above = GROUP_ORDER;
        above[16] = 1;
        assert!(!is_reduced(&above));
        assert!(!is_reduced(&[0xff; 32]));
    }

    #[test]
    fn tokens_with_other_shapes_are_refused() {
        let (key, jwks) = signer();
        let verifier = Verifier::new(&jwks);
        let token = key.sign(&claims(60));
        let t = token.expose();
        let (signed, sig) = t.rsplit_once('.').unwrap();
        let (header, body) = signed.split_once('.').unwrap();
        let sig_bytes = signature_of(t);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        for bad in [
            format!("{header}.{body}.{body}.{sig}"),
            format!("{header}.{body}"),
            format!("{header}.{body}.{}", b64.encode(&sig_bytes[..63])),
            format!(
                "{header}.{body}.{}",
                b64.encode([&sig_bytes[..], &[0]].concat())
            ),
            format!("{header}.{body}.{sig}="),
            format!("{header}={body}.{sig}"),
            format!("{header}.{body}.{sig}.{sig}"),
        ] {
            assert_eq!(verifier.verify(&bad), Err(TokenError::Invalid), "{bad}");
        }
        assert!(verifier.verify(t).is_ok());
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
