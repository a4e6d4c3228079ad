//! Many Ed25519 signatures checked at once: the first calls of fresh keys.
//!
//! A fresh vault key's first call costs one signature check (~35 µs here), more than half
//! of a hot key's whole request. n signatures `(R_i, s_i)` over messages `M_i` by keys
//! `A_i` are checked together as
//!
//! ```text
//! Σ [z_i] R_i  +  Σ_A [Σ_{i: A_i = A} z_i·k_i] A  -  [Σ z_i·s_i] B  =  identity,
//! k_i = SHA-512(R_i ‖ A_i ‖ M_i) mod L
//! ```
//!
//! with each z_i a random 128-bit scalar drawn afresh for every batch: one multiscalar
//! multiplication, half-length scalars for the R_i and one term per distinct key (the
//! tokens of a JWKS key share it), ~15 µs a signature in batches of 16
//! (`cargo bench --bench hot_path -- token_check_batch`).
//!
//! What it accepts:
//! - a signature that holds alone (RFC 8032's cofactorless rule, [`SignatureCheck::holds`])
//!   makes its term the identity, so a batch of good signatures always holds;
//! - a batch with a bad signature fails, except with probability about 2^-128 (the z_i
//!   are unknown to whoever made the signatures); the one exception is a signature whose
//!   error is a small-order point, which takes the private key to make: only the control
//!   plane could, and it signs by RFC 8032;
//! - an `R` that is not a point's canonical encoding fails the batch, as the single rule
//!   (which compares `R` as bytes) refuses it.
//!
//! When a batch fails nothing is accepted from it: each signature is then checked alone,
//! by the single rule.

use super::SignatureCheck;
use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use ring::rand::SecureRandom;

/// True when every signature holds (see the module comment); false when one may not, or
/// when no randomness could be had.
pub fn all_hold(checks: &[&SignatureCheck]) -> bool {
    let mut random = vec![0u8; 16 * checks.len()];
    if ring::rand::SystemRandom::new().fill(&mut random).is_err() {
        return false;
    }
    let mut scalars = Vec::with_capacity(checks.len() + 2);
    let mut points = Vec::with_capacity(checks.len() + 2);
    // Per distinct public key: its bytes, its point and its coefficient.
    let mut keys: Vec<(&[u8; 32], EdwardsPoint, Scalar)> = Vec::with_capacity(1);
    let mut base = Scalar::ZERO;
    for (check, z) in checks.iter().zip(random.chunks_exact(16)) {
        let z = Scalar::from(u128::from_le_bytes(z.try_into().expect("16 bytes")));
        let (r_bytes, s_bytes) = check.signature.split_at(32);
        let r_bytes: [u8; 32] = r_bytes.try_into().expect("32 bytes");
        let s_bytes: [u8; 32] = s_bytes.try_into().expect("32 bytes");
        let Some(s) = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes)) else {
            return false;
        };
        // The single rule compares `R` as bytes, so it accepts only a point's canonical
        // encoding: a batch never takes another.
        if !is_canonical(&r_bytes) {
            return false;
        }
        let Some(r) = CompressedEdwardsY(r_bytes).decompress() else {
            return false;
        };
        let a = check.key.as_bytes();
        let mut hash = ring::digest::Context::new(&ring::digest::SHA512);
        hash.update(&r_bytes);
        hash.update(a);
        hash.update(&check.message);
        let k =
            Scalar::from_bytes_mod_order_wide(hash.finish().as_ref().try_into().expect("64 bytes"));
        base += z * s;
        let zk = z * k;
        match keys.iter_mut().find(|(bytes, _, _)| *bytes == a) {
            Some((_, _, coefficient)) => *coefficient += zk,
            None => keys.push((a, check.key.to_edwards(), zk)),
        }
        scalars.push(z);
        points.push(r);
    }
    scalars.push(-base);
    points.push(ED25519_BASEPOINT_POINT);
    for (_, a, coefficient) in keys {
        scalars.push(coefficient);
        points.push(a);
    }
    EdwardsPoint::vartime_multiscalar_mul(scalars, points).is_identity()
}

/// An encoded point is canonical: its y below p = 2^255 - 19, and no sign bit on a point
/// whose x is 0 (y = 1 or y = p - 1), the two encodings `decompress` takes that no point
/// compresses to.
fn is_canonical(bytes: &[u8; 32]) -> bool {
    let sign = bytes[31] & 0x80 != 0;
    let mut y = *bytes;
    y[31] &= 0x7f;
    // y >= p: the top 250 bits all set and the lowest byte at least 0xed.
    let at_least_p = y[0] >= 0xed && y[1..31].iter().all(|&b| b == 0xff) && y[31] == 0x7f;
    let one = y[0] == 1 && y[1..].iter().all(|&b| b == 0);
    let minus_one = y[0] == 0xec && y[1..31].iter().all(|&b| b == 0xff) && y[31] == 0x7f;
    !at_least_p && !(sign && (one || minus_one))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::tests::claims;
    use crate::token::{generate_ed25519, Jwk, Jwks, SigningKey, Verifier};
    use base64::Engine;

    fn signer(kid: &str) -> (SigningKey, Jwks) {
        let (private, public) = generate_ed25519();
        let jwks = Jwks {
            keys: vec![Jwk::ed25519(kid, &public)],
        };
        (SigningKey::from_pkcs8(kid.into(), &private).unwrap(), jwks)
    }

    /// Every way of spoiling a token's signature part that still parses: a bit of `R`, of
    /// `s` (kept reduced), or of the signed claims, flipped.
    fn spoiled(token: &str, how: usize) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let mut sig = b64.decode(signature).unwrap();
        match how % 3 {
            0 => sig[how % 32] ^= 1 << (how % 8),
            1 => sig[32 + how % 31] ^= 1 << (how % 8),
            _ => {
                let (header, payload) = signed.split_once('.').unwrap();
                let mut claims: crate::token::Claims =
                    serde_json::from_slice(&b64.decode(payload).unwrap()).unwrap();
                claims.cap += 1 + how as i64;
                let payload = b64.encode(serde_json::to_vec(&claims).unwrap());
                return format!("{header}.{payload}.{signature}");
            }
        }
        format!("{signed}.{}", b64.encode(sig))
    }

    #[test]
    fn a_batch_holds_exactly_when_every_signature_holds_alone() {
        let (one, jwks_one) = signer("k1");
        let (two, jwks_two) = signer("k2");
        let verifier = Verifier::new(&Jwks {
            keys: jwks_one.keys.into_iter().chain(jwks_two.keys).collect(),
        });
        let mut refused = 0;
        for round in 0..60usize {
            let size = 1 + round % 17;
            let tokens: Vec<String> = (0..size)
                .map(|i| {
                    let key = if (round + i) % 3 == 0 { &two } else { &one };
                    let mut c = claims(60);
                    c.jti = format!("key_{round}_{i}");
                    let token = key.sign(&c).expose().to_string();
                    // Some rounds spoil one or two tokens.
                    if round % 4 != 0 && (i == round % size || i == (round * 7) % size) {
                        spoiled(&token, round * 31 + i)
                    } else {
                        token
                    }
                })
                .collect();
            let parsed: Vec<_> = tokens
                .iter()
                .filter_map(|t| verifier.parse(t).ok())
                .collect();
            let checks: Vec<&SignatureCheck> = parsed.iter().map(|p| &p.check).collect();
            let alone = checks.iter().all(|c| c.holds());
            assert_eq!(all_hold(&checks), alone, "round {round}");
            refused += usize::from(!alone);
        }
        assert!(refused >= 30, "the test spoiled too few batches: {refused}");
    }

    #[test]
    fn only_canonical_point_encodings_are_taken() {
        let mut p_minus_1 = [0xff; 32];
        p_minus_1[0] = 0xec;
        p_minus_1[31] = 0x7f;
        let mut one = [0; 32];
        one[0] = 1;
        for y in [one, p_minus_1] {
            assert!(is_canonical(&y));
            let mut signed = y;
            signed[31] |= 0x80;
            assert!(!is_canonical(&signed), "{signed:?}");
        }
        for low in 0xed..=0xff {
            let mut y = [0xff; 32];
            y[0] = low;
            y[31] = 0x7f;
            assert!(!is_canonical(&y), "y = p + {}", low - 0xed);
            y[31] = 0xff;
            assert!(!is_canonical(&y));
        }
        // Every point's own encoding is canonical.
        let mut point = ED25519_BASEPOINT_POINT;
        for _ in 0..64 {
            let bytes = point.compress().to_bytes();
            assert!(is_canonical(&bytes));
            assert_eq!(CompressedEdwardsY(bytes).decompress(), Some(point));
            point += ED25519_BASEPOINT_POINT;
        }
    }

    #[test]
    fn one_good_signature_cannot_carry_another_tokens_claims() {
        // The same signature moved onto other claims: each part holds somewhere, the pair
        // does not hold together.
        let (key, jwks) = signer("k1");
        let verifier = Verifier::new(&jwks);
        let good = key.sign(&claims(60)).expose().to_string();
        let mut other = claims(60);
        other.cap *= 1000;
        let other = key.sign(&other).expose().to_string();
        let (signed, _) = other.rsplit_once('.').unwrap();
        let (_, signature) = good.rsplit_once('.').unwrap();
        let forged = format!("{signed}.{signature}");
        let (a, b) = (
            verifier.parse(&good).unwrap(),
            verifier.parse(&forged).unwrap(),
        );
        assert!(all_hold(&[&a.check]));
        assert!(!all_hold(&[&a.check, &b.check]));
        assert!(!all_hold(&[&b.check, &a.check, &a.check]));
    }
}
