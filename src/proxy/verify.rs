//! Stage 2, authenticate (second half): signature, expiry and revocation of the vault key, without a database.
//!
//! A token already verified is found in a bounded cache (no second Ed25519 check);
//! expiry is checked on every hit, revocation on every request through the published
//! filter. Expired and revoked entries are swept out every second.

use super::deny::Denial;
use crate::metrics::Metrics;
use crate::pattern::Allowlist;
use crate::sync::Published;
use crate::token::{Claims, TokenError};
use dashmap::DashMap;
use std::sync::Arc;

/// A vault key whose signature has been checked, with its allowlist compiled.
#[derive(Debug)]
pub struct VerifiedKey {
    pub claims: Claims,
    pub allowlist: Allowlist,
    /// Key id, tenant id and label, shared with every audit event of the key.
    pub jti: Arc<str>,
    pub ten: Arc<str>,
    pub lbl: Arc<str>,
    /// The key id as the `x-keybrake-key-id` response header value, built once.
    pub id_header: Option<http::HeaderValue>,
}

impl VerifiedKey {
    pub fn new(claims: Claims, allowlist: Allowlist) -> VerifiedKey {
        VerifiedKey {
            jti: claims.jti.as_str().into(),
            ten: claims.ten.as_str().into(),
            lbl: claims.lbl.as_str().into(),
            id_header: http::HeaderValue::from_str(&claims.jti).ok(),
            claims,
            allowlist,
        }
    }
}

pub struct KeyVerifier {
    published: Arc<Published>,
    /// Keyed by the whole token; hashed with aHash (keyed per process, so attacker-chosen
    /// tokens cannot aim at one bucket), several times faster than SipHash on ~400 bytes.
    cache: DashMap<Box<str>, Arc<VerifiedKey>, ahash::RandomState>,
    max_entries: usize,
    metrics: Arc<Metrics>,
}

impl KeyVerifier {
    pub fn new(published: Arc<Published>, max_entries: usize, metrics: Arc<Metrics>) -> Self {
        KeyVerifier {
            published,
            cache: DashMap::with_hasher(ahash::RandomState::new()),
            max_entries,
            metrics,
        }
    }

    /// The verified key, or the denial, with the key when its signature was good (so a
    /// refused expired or revoked key is still attributed in the audit trail).
    pub fn verify(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Arc<VerifiedKey>, (Denial, Option<Arc<VerifiedKey>>)> {
        let key = match self.cache.get(token) {
            Some(hit) => {
                self.metrics.token_cache_hits.inc();
                hit.clone()
            }
            None => {
                self.metrics.token_cache_misses.inc();
                let claims = self
                    .published
                    .verifier
                    .load()
                    .verify(token)
                    .map_err(|e| match e {
                        TokenError::Expired => (Denial::KeyExpired, None),
                        TokenError::Invalid => (Denial::InvalidKey, None),
                    })?;
                // A signed token with an allowlist we cannot parse was not minted by us.
                let allowlist =
                    Allowlist::parse(&claims.eps).map_err(|_| (Denial::InvalidKey, None))?;
                let key = Arc::new(VerifiedKey::new(claims, allowlist));
                if self.cache.len() < self.max_entries {
                    self.cache.insert(token.into(), key.clone());
                }
                key
            }
        };
        if key.claims.exp <= now {
            return Err((Denial::KeyExpired, Some(key)));
        }
        if self
            .published
            .revocations
            .load()
            .is_revoked(&key.claims.jti)
        {
            return Err((Denial::KeyRevoked, Some(key)));
        }
        Ok(key)
    }

    /// Drops expired and revoked entries. Runs every second in the background.
    pub fn sweep(&self, now: i64) {
        let revocations = self.published.revocations.load();
        self.cache
            .retain(|_, k| k.claims.exp > now && !revocations.is_revoked(&k.claims.jti));
    }

    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}
