//! Stage 2, authenticate (second half): signature, expiry and revocation of the vault key, without a database.
//!
//! A token already verified is found in the verified-token cache (no second Ed25519
//! check); expiry is checked on every hit, revocation on every request through the
//! published filter. The cache has two tiers, both keyed by the token's SHA-256 (first
//! 128 bits: 16 bytes instead of the ~450-byte token, and no one can aim a token at
//! another's entry):
//!
//! - verified digests, bounded by `token_cache_entries` (default 1,048,576, sized for
//!   a fleet's live keys): 16 bytes and an expiry each, so a million live keys cost tens
//!   of MiB. A hit skips the signature check; the claims are decoded again (a few µs);
//! - the keys in use, with claims and compiled allowlist, bounded by a sixteenth of it:
//!   a hit costs a lookup.
//!
//! Each tier evicts by generations: it is split in shards, each holding a current and a
//! previous map; a full current map becomes the previous one and the previous one is
//! dropped, and a hit in the previous map moves the entry back. So the least recently
//! used half goes first, in O(1), and a tier never holds more than its bound. Expired
//! and revoked entries are swept out every second.
//!
//! A token in neither tier has its signature checked, together with those of the other
//! fresh keys that arrive at the same moment ([`SignatureBatches`]).

use super::deny::Denial;
use crate::metrics::Metrics;
use crate::pattern::Allowlist;
use crate::sync::Published;
use crate::token::{batch, claims_of_verified, Claims, SignatureCheck, TokenError, Unverified};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::oneshot;

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
    /// `revocation::id_hash` of the key id: every request and sweep asks whether the key
    /// is revoked.
    pub revocation_hash: u64,
}

impl VerifiedKey {
    pub fn new(claims: Claims, allowlist: Allowlist) -> VerifiedKey {
        VerifiedKey {
            jti: claims.jti.as_str().into(),
            ten: claims.ten.as_str().into(),
            lbl: claims.lbl.as_str().into(),
            id_header: http::HeaderValue::from_str(&claims.jti).ok(),
            revocation_hash: crate::revocation::id_hash(&claims.jti),
            claims,
            allowlist,
        }
    }
}

/// The first 128 bits of the token's SHA-256.
type Digest = u128;

fn digest(token: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&d.as_ref()[..16]);
    u128::from_le_bytes(first)
}

const SHARDS: usize = 64;

struct Shard<V> {
    current: HashMap<Digest, V, ahash::RandomState>,
    previous: HashMap<Digest, V, ahash::RandomState>,
}

/// A map bounded by generations (see the module comment).
struct Generations<V> {
    shards: Box<[RwLock<Shard<V>>]>,
    /// Entries of one shard's current map before it becomes the previous one.
    per_generation: usize,
}

impl<V: Clone> Generations<V> {
    fn new(bound: usize) -> Self {
        let hasher = ahash::RandomState::new();
        Generations {
            shards: (0..SHARDS)
                .map(|_| {
                    RwLock::new(Shard {
                        current: HashMap::with_hasher(hasher.clone()),
                        previous: HashMap::with_hasher(hasher.clone()),
                    })
                })
                .collect(),
            per_generation: (bound / SHARDS / 2).max(1),
        }
    }

    fn shard(&self, d: Digest) -> &RwLock<Shard<V>> {
        &self.shards[(d >> 64) as usize % SHARDS]
    }

    fn get(&self, d: Digest) -> Option<V> {
        let shard = self.shard(d);
        let old = {
            let s = shard.read().unwrap_or_else(|p| p.into_inner());
            if let Some(v) = s.current.get(&d) {
                return Some(v.clone());
            }
            s.previous.get(&d)?.clone()
        };
        // Used again: back into the current generation.
        let mut s = shard.write().unwrap_or_else(|p| p.into_inner());
        if s.previous.remove(&d).is_some() {
            self.insert_locked(&mut s, d, old.clone());
        }
        Some(old)
    }

    fn insert(&self, d: Digest, v: V) {
        let mut s = self.shard(d).write().unwrap_or_else(|p| p.into_inner());
        self.insert_locked(&mut s, d, v);
    }

    fn insert_locked(&self, s: &mut Shard<V>, d: Digest, v: V) {
        if s.current.len() >= self.per_generation && !s.current.contains_key(&d) {
            s.previous = std::mem::replace(
                &mut s.current,
                HashMap::with_capacity_and_hasher(
                    self.per_generation.min(1024),
                    s.previous.hasher().clone(),
                ),
            );
        }
        s.current.insert(d, v);
    }

    fn retain(&self, keep: impl Fn(&V) -> bool) {
        for shard in self.shards.iter() {
            let mut s = shard.write().unwrap_or_else(|p| p.into_inner());
            s.current.retain(|_, v| keep(v));
            s.previous.retain(|_, v| keep(v));
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.read().unwrap_or_else(|p| p.into_inner());
                s.current.len() + s.previous.len()
            })
            .sum()
    }
}

/// Fresh keys' signature checks, gathered so that those arriving together are checked in
/// one batch (`token::batch`: ~15 µs a signature in batches of 16 against ~35 µs alone).
///
/// Each check joins the queue and yields once, so that the requests ready on the runtime
/// at that moment join too; whichever of them resumes first checks everything queued and
/// hands each waiting request its answer (the others find theirs waiting), and the check
/// that fills a batch runs it at once. Nothing waits on a timer: a lone request is checked
/// alone after one turn of the scheduler. A batch that fails is checked again one by one
/// (each token gets the single check's verdict), and the next [`ALONE_AFTER_FAILURE_MS`] go
/// one by one, so that a stream of bad signatures costs the good ones at most a few failed
/// batches a second.
struct SignatureBatches {
    queue: Mutex<Vec<Waiting>>,
    /// The clock of `alone_until_ms` (monotonic: a wall clock set back cannot stop
    /// batching).
    started: Instant,
    /// Until when (ms after `started`) checks go one by one, after a batch failed.
    alone_until_ms: AtomicU64,
    /// `keybrake_token_signature_batches_total`.
    batches: prometheus::IntCounter,
}

struct Waiting {
    check: SignatureCheck,
    answer: oneshot::Sender<bool>,
}

/// Signatures checked in one multiscalar multiplication at most (past ~32 a signature
/// costs no less).
const MAX_BATCH: usize = 32;

const ALONE_AFTER_FAILURE_MS: u64 = 200;

/// Below this many queued signatures, a check waits one more turn of the runtime.
const SMALL_BATCH: usize = 8;

impl SignatureBatches {
    fn new(batches: prometheus::IntCounter) -> Self {
        SignatureBatches {
            queue: Mutex::new(Vec::new()),
            started: Instant::now(),
            alone_until_ms: AtomicU64::new(0),
            batches,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn check(&self, check: SignatureCheck) -> bool {
        if self.now_ms() < self.alone_until_ms.load(Ordering::Relaxed) {
            self.batches.inc();
            return check.holds();
        }
        let (answer, verdict) = oneshot::channel();
        let queued = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.push(Waiting { check, answer });
            queue.len()
        };
        if queued >= MAX_BATCH {
            // A full batch goes at once.
            self.run();
        } else {
            // Checks what is queued when dropped: after the yield, or if this request is
            // dropped while yielding (the others are answered all the same).
            let _turn = Turn(self);
            tokio::task::yield_now().await;
            // Still a small batch: once more, so the fresh keys of the next moment join
            // it (under load a signature costs ~23 µs in batches of 4, ~17 in batches
            // of 8); with nothing else to run, a yield costs about a microsecond.
            let queued = self.queue.lock().unwrap_or_else(|p| p.into_inner()).len();
            if (1..SMALL_BATCH).contains(&queued) {
                tokio::task::yield_now().await;
            }
        }
        verdict.await.unwrap_or(false)
    }

    /// Checks everything queued, in batches of at most [`MAX_BATCH`].
    fn run(&self) {
        let mut queued = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        while !queued.is_empty() {
            let rest = queued.split_off(queued.len().min(MAX_BATCH));
            self.batches.inc();
            let checks: Vec<&SignatureCheck> = queued.iter().map(|w| &w.check).collect();
            let batched = checks.len() > 1;
            let all_hold = batched && batch::all_hold(&checks);
            for waiting in queued {
                let holds = all_hold || waiting.check.holds();
                // A request gone meanwhile no longer listens.
                let _ = waiting.answer.send(holds);
            }
            if batched && !all_hold {
                self.alone_until_ms
                    .store(self.now_ms() + ALONE_AFTER_FAILURE_MS, Ordering::Relaxed);
            }
            queued = rest;
        }
    }
}

/// A queued check's turn: runs the queue when it ends.
struct Turn<'a>(&'a SignatureBatches);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.run();
    }
}

pub struct KeyVerifier {
    published: Arc<Published>,
    signatures: SignatureBatches,
    /// Digests of tokens whose signature was good, with their expiry.
    verified: Generations<i64>,
    /// The keys in use, ready to serve, each with its expiry beside it (a sweep reads it
    /// without following the pointer).
    keys: Generations<(i64, Arc<VerifiedKey>)>,
    metrics: Arc<Metrics>,
}

impl KeyVerifier {
    /// `max_entries`: the bound of verified digests; the keys in use are bounded by a
    /// sixteenth of it (at least 1,024).
    pub fn new(published: Arc<Published>, max_entries: usize, metrics: Arc<Metrics>) -> Self {
        KeyVerifier {
            published,
            verified: Generations::new(max_entries),
            keys: Generations::new((max_entries / 16).max(1024)),
            signatures: SignatureBatches::new(metrics.token_signature_batches.clone()),
            metrics,
        }
    }

    /// The verified key, or the denial, with the key when its signature was good (so a
    /// refused expired or revoked key is still attributed in the audit trail).
    pub async fn verify(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Arc<VerifiedKey>, (Denial, Option<Arc<VerifiedKey>>)> {
        let d = digest(token);
        let key = match self.keys.get(d).map(|(_, key)| key) {
            Some(hit) => {
                self.metrics.token_cache_hits.inc();
                hit
            }
            None => {
                let claims = if self.verified.get(d).is_some() {
                    self.metrics.token_cache_hits.inc();
                    claims_of_verified(token)
                } else {
                    self.metrics.token_cache_misses.inc();
                    self.check_signature(token).await
                }
                .map_err(|e| match e {
                    TokenError::Expired => (Denial::KeyExpired, None),
                    TokenError::Invalid => (Denial::InvalidKey, None),
                })?;
                // A signed token with an allowlist we cannot parse was not minted by us.
                let allowlist =
                    Allowlist::parse(&claims.eps).map_err(|_| (Denial::InvalidKey, None))?;
                let key = Arc::new(VerifiedKey::new(claims, allowlist));
                // An expired key is not cached: a flood of old tokens must not push the
                // keys in use out.
                if key.claims.exp > now {
                    self.verified.insert(d, key.claims.exp);
                    self.keys.insert(d, (key.claims.exp, key.clone()));
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
            .is_revoked_hashed(&key.claims.jti, key.revocation_hash)
        {
            return Err((Denial::KeyRevoked, Some(key)));
        }
        Ok(key)
    }

    /// The claims of a token not seen before, once its signature held.
    async fn check_signature(&self, token: &str) -> Result<Claims, TokenError> {
        let Unverified { payload, check } = self.published.verifier.load().parse(token)?;
        if !self.signatures.check(check).await {
            return Err(TokenError::Invalid);
        }
        // Expired or not: `verify` refuses an expired key with its claims, so that the
        // refusal is in its tenant's audit trail (the signature held: they are ours).
        payload.decoded()
    }

    /// Drops expired entries, and the revoked keys in use, and updates the cache-size
    /// gauges. (A revoked key's digest stays until it expires: every request is checked
    /// against the revocations anyway.) Runs every second in the background.
    pub fn sweep(&self, now: i64) {
        let revocations = self.published.revocations.load();
        self.keys.retain(|(exp, k)| {
            *exp > now && !revocations.is_revoked_hashed(&k.claims.jti, k.revocation_hash)
        });
        self.verified.retain(|exp| *exp > now);
        self.metrics.token_cache_entries.set(self.cached() as i64);
        self.metrics.token_cache_keys.set(self.cached_keys() as i64);
    }

    /// Verified digests held.
    pub fn cached(&self) -> usize {
        self.verified.len()
    }

    /// Keys in use held (claims and allowlist).
    pub fn cached_keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_map_never_holds_more_than_its_bound_and_keeps_what_is_used() {
        let g: Generations<u32> = Generations::new(SHARDS * 2 * 4);
        // Digest 0 lands in shard 0 with every other multiple of 2^64 * SHARDS.
        let in_shard0 = |i: u128| (i * SHARDS as u128) << 64;
        for i in 0..4 {
            g.insert(in_shard0(i), i as u32);
        }
        for i in 4..8 {
            g.insert(in_shard0(i), i as u32);
            // Entry 0 is used all along: each use moves it back to the current map.
            assert_eq!(g.get(in_shard0(0)), Some(0));
        }
        for i in 8..40 {
            g.insert(in_shard0(i), i as u32);
            assert!(g.len() <= 8, "bound of shard 0 exceeded");
        }
        assert_eq!(g.get(in_shard0(39)), Some(39));
        assert_eq!(
            g.get(in_shard0(1)),
            None,
            "the least recently used are evicted"
        );
    }

    fn tokens(n: usize) -> (crate::token::Verifier, Vec<String>) {
        let (private, public) = crate::token::generate_ed25519();
        let signer = crate::token::SigningKey::from_pkcs8("k1".into(), &private).unwrap();
        let jwks = crate::token::Jwks {
            keys: vec![crate::token::Jwk::ed25519("k1", &public)],
        };
        let tokens = (0..n)
            .map(|i| {
                let mut c = crate::token::tests::claims(60);
                c.jti = format!("key_{i}");
                signer.sign(&c).expose().to_string()
            })
            .collect();
        (crate::token::Verifier::new(&jwks), tokens)
    }

    /// A good token's check with the signature of another (still a well-formed token).
    fn with_signature_of(token: &str, other: &str) -> String {
        let (signed, _) = token.rsplit_once('.').unwrap();
        format!("{signed}.{}", other.rsplit_once('.').unwrap().1)
    }

    fn counter() -> prometheus::IntCounter {
        prometheus::IntCounter::new("batches", "batches").unwrap()
    }

    #[tokio::test]
    async fn fresh_keys_arriving_together_are_checked_in_one_batch_and_each_gets_its_verdict() {
        let (verifier, tokens) = tokens(12);
        let batches = Arc::new(SignatureBatches::new(counter()));
        let run = |tokens: Vec<String>| {
            let tasks: Vec<_> = tokens
                .into_iter()
                .map(|t| {
                    let check = verifier.parse(&t).unwrap().check;
                    let batches = batches.clone();
                    tokio::spawn(async move { batches.check(check).await })
                })
                .collect();
            async move {
                let mut verdicts = Vec::new();
                for t in tasks {
                    verdicts.push(t.await.unwrap());
                }
                verdicts
            }
        };
        // All good: one batch (the runtime runs every task up to the check before the
        // first one's turn comes back).
        assert_eq!(run(tokens.clone()).await, vec![true; 12]);
        assert_eq!(batches.batches.get(), 1);
        assert_eq!(batches.alone_until_ms.load(Ordering::Relaxed), 0);

        // Two bad ones among them: the batch fails, each is judged alone.
        let mut mixed = tokens.clone();
        mixed[3] = with_signature_of(&tokens[3], &tokens[4]);
        mixed[9] = with_signature_of(&tokens[9], &tokens[0]);
        let mut expected = vec![true; 12];
        expected[3] = false;
        expected[9] = false;
        assert_eq!(run(mixed.clone()).await, expected);
        assert_eq!(batches.batches.get(), 2);
        // ... and for a while checks go one by one.
        assert!(batches.alone_until_ms.load(Ordering::Relaxed) > batches.now_ms());
        assert_eq!(run(mixed).await, expected);
        // (Checks alone are slow in a debug build: the window may close before all 12.)
        assert!(batches.batches.get() >= 4, "{}", batches.batches.get());
    }

    #[tokio::test]
    async fn a_check_dropped_while_yielding_still_answers_the_others() {
        let (verifier, tokens) = tokens(3);
        let batches = Arc::new(SignatureBatches::new(counter()));
        let checks: Vec<_> = tokens
            .iter()
            .map(|t| verifier.parse(t).unwrap().check)
            .collect();
        let mut checks = checks.into_iter();
        // The first check is polled once (queued, yielding), then dropped.
        use std::future::Future;
        let mut first = Box::pin(batches.check(checks.next().unwrap()));
        let waker = std::task::Waker::from(Arc::new(NoWake));
        assert!(first
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker))
            .is_pending());
        let followers: Vec<_> = checks
            .map(|c| {
                let batches = batches.clone();
                tokio::spawn(async move { batches.check(c).await })
            })
            .collect();
        tokio::task::yield_now().await;
        drop(first);
        for f in followers {
            assert!(f.await.unwrap());
        }
        assert_eq!(batches.batches.get(), 1);
    }

    struct NoWake;

    impl std::task::Wake for NoWake {
        fn wake(self: Arc<Self>) {}
    }
}
