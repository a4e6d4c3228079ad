//! Part of stage 7 (reserve): retries are not charged twice (SPEC §5). Stripe SDKs retry a POST after a
//! reset connection or a 5xx with the same `Idempotency-Key`, and Stripe answers the
//! retry with its first answer without acting again. So a metered call of a key whose
//! (key, `Idempotency-Key`, method, path, body) was already charged is forwarded without
//! a charge; a duplicate that arrives while the first is still in flight waits until the
//! first is settled. Only the same request is let through free: another body under the
//! same key is charged (Stripe refuses it anyway).
//!
//! Entries live until their key expires, and at most 24 hours: Stripe keeps an
//! idempotency key at least that long, and may forget it after, when a retry would be a
//! new charge. The map is bounded, and shared fairly between tenants when it is full
//! (`tenant_shares`); a call it cannot remember is simply charged (a retry then costs
//! again: fail closed). So is a call whose `Idempotency-Key` is blank or longer than
//! Stripe's 255 characters: the vendor may take it for no key at all.

use super::tenant_shares::{self, Evicted, TenantShares};
use dashmap::DashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Most remembered (key, idempotency key) pairs.
const MAX_ENTRIES: usize = 200_000;

/// How long after its first call a retry is let through free: Stripe prunes idempotency
/// keys once they are at least 24 hours old.
const REPLAYED_FOR_SECS: i64 = 24 * 3600;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    InFlight,
    Charged,
}

struct Entry {
    /// `IdempotencyBook::credential_id` of the vendor secret the call was sent with.
    credential: u64,
    fingerprint: u64,
    tenant: Arc<str>,
    exp: i64,
    state: watch::Sender<State>,
}

#[derive(Default)]
pub struct IdempotencyBook {
    entries: DashMap<(Arc<str>, Box<str>), Arc<Entry>, ahash::RandomState>,
    swept: std::sync::atomic::AtomicI64,
    shares: TenantShares<(Arc<str>, Box<str>)>,
    /// The fingerprints' seeds, random per process: a client cannot craft two requests
    /// with one fingerprint, to have the second let through free as the first's retry.
    seeds: ahash::RandomState,
}

/// What to do with a metered call that carries an `Idempotency-Key`.
pub enum Admission {
    /// The same request was charged already: forward it, charge nothing.
    Replay,
    /// The first of its kind: charge it; `Pending` records the outcome.
    First(Pending),
    /// Not remembered (another body under the same key, or the book is full): charge it.
    Untracked,
}

/// The first call of a (key, idempotency key): `charged()` once it cost money; dropped
/// otherwise, which forgets the pair (a retry is then charged like a new call).
pub struct Pending {
    book: Arc<IdempotencyBook>,
    id: (Arc<str>, Box<str>),
    entry: Arc<Entry>,
    charged: bool,
}

impl Pending {
    pub fn charged(mut self) {
        self.charged = true;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.charged {
            self.entry.state.send_replace(State::Charged);
        } else {
            self.book.remove(&self.id, &self.entry);
            // Waiters see the sender gone or the state unchanged, and look again.
            self.entry.state.send_replace(State::InFlight);
        }
    }
}

/// The longest `Idempotency-Key` Stripe accepts.
const MAX_KEY_LEN: usize = 255;

/// The call of a key, as the idempotency book tells it from others.
pub struct Call<'a> {
    pub jti: &'a Arc<str>,
    /// The key's tenant, whose share of a full book the entry counts in.
    pub ten: &'a Arc<str>,
    /// The key's expiry (unix seconds).
    pub exp: i64,
    pub idempotency_key: &'a str,
    /// `IdempotencyBook::credential_id` of the vendor secret it is sent with.
    pub credential: u64,
    /// `IdempotencyBook::fingerprint` of the request.
    pub fingerprint: u64,
}

impl IdempotencyBook {
    /// What tells the vendor secrets calls are sent with apart: the vendor keeps
    /// idempotency keys per account and mode, so after the tenant replaced its secret (say
    /// test for live) a retry may be a new charge there. Only this process's randomly
    /// seeded hash of the secret is kept.
    pub fn credential_id(&self, secret: &str) -> u64 {
        self.seeds.hash_one(secret)
    }

    /// A fingerprint of what makes two calls the same request: method, path, the
    /// connected account it acts on (`Stripe-Account`, empty for the platform's own) and
    /// body.
    pub fn fingerprint(&self, method: &str, path: &str, account: &[u8], body: &[u8]) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = self.seeds.build_hasher();
        h.write(method.as_bytes());
        h.write_u8(0);
        h.write(path.as_bytes());
        h.write_u8(0);
        h.write(account);
        h.write_u8(0);
        h.write(body);
        h.finish()
    }

    /// Whether `call` is a retry of a call charged or still in flight, which `admit`
    /// would let through free or have wait for the first (a look, without waiting or
    /// recording anything).
    pub fn is_retry(&self, call: &Call<'_>, now: i64) -> bool {
        let id = (call.jti.clone(), Box::<str>::from(call.idempotency_key));
        self.entries.get(&id).is_some_and(|e| {
            e.exp > now && e.credential == call.credential && e.fingerprint == call.fingerprint
        })
    }

    /// Admits a metered call carrying an `Idempotency-Key`. Waits (at most `wait`) while
    /// the same request of the same key is in flight.
    pub async fn admit(self: &Arc<Self>, call: Call<'_>, now: i64, wait: Duration) -> Admission {
        let idempotency_key = call.idempotency_key;
        if idempotency_key.trim().is_empty() || idempotency_key.len() > MAX_KEY_LEN {
            return Admission::Untracked;
        }
        let fingerprint = call.fingerprint;
        let id: (Arc<str>, Box<str>) = (call.jti.clone(), idempotency_key.into());
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let existing = self.entries.get(&id).map(|e| e.clone());
            let entry = match existing {
                Some(entry)
                    if entry.exp <= now
                        || (entry.credential != call.credential
                            && *entry.state.borrow() == State::Charged) =>
                {
                    // Past what the vendor is sure to remember, or sent with a secret the
                    // tenant has since replaced: a new call, remembered in its place.
                    self.remove(&id, &entry);
                    continue;
                }
                // The first call, under the replaced secret, is still at the vendor: this
                // one is charged, and not remembered (a waiter on the first is not
                // displaced).
                Some(entry) if entry.credential != call.credential => {
                    return Admission::Untracked;
                }
                Some(entry) => entry,
                None => {
                    if self.entries.len() >= MAX_ENTRIES {
                        self.sweep(now);
                        if self.entries.len() >= MAX_ENTRIES && !self.make_room(call.ten) {
                            return Admission::Untracked;
                        }
                    }
                    let fresh = Arc::new(Entry {
                        credential: call.credential,
                        fingerprint,
                        tenant: call.ten.clone(),
                        exp: call.exp.min(now.saturating_add(REPLAYED_FOR_SECS)),
                        state: watch::channel(State::InFlight).0,
                    });
                    match self.entries.entry(id.clone()) {
                        dashmap::Entry::Vacant(v) => {
                            self.shares.added(call.ten, &id);
                            v.insert(fresh.clone());
                            return Admission::First(Pending {
                                book: self.clone(),
                                id,
                                entry: fresh,
                                charged: false,
                            });
                        }
                        // Another call got there first: look at it.
                        dashmap::Entry::Occupied(o) => o.get().clone(),
                    }
                }
            };
            if entry.fingerprint != fingerprint {
                return Admission::Untracked;
            }
            let mut state = entry.state.subscribe();
            if *state.borrow_and_update() == State::Charged {
                return Admission::Replay;
            }
            // In flight: wait for its outcome (a change, or its end), then look again.
            match tokio::time::timeout_at(deadline, state.changed()).await {
                Ok(_) => continue,
                // Still in flight after the vendor's own read timeout: charge this one.
                Err(_) => return Admission::Untracked,
            }
        }
    }

    /// Drops the pairs of expired keys (at most once a second).
    fn sweep(&self, now: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.swept.load(Relaxed);
        if now > last
            && self
                .swept
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.entries.retain(|_, e| {
                let keep = e.exp > now;
                if !keep {
                    self.shares.removed(&e.tenant);
                }
                keep
            });
        }
    }

    /// Removes `entry` if it is still the one under `id`.
    fn remove(&self, id: &(Arc<str>, Box<str>), entry: &Arc<Entry>) {
        if let Some((_, e)) = self.entries.remove_if(id, |_, e| Arc::ptr_eq(e, entry)) {
            self.shares.removed(&e.tenant);
        }
    }

    /// Evicts the oldest settled entry of the tenant holding the most, if it holds more
    /// than `tenant`: one in flight is kept (its retry, or a duplicate waiting on it, is
    /// about to need it).
    fn make_room(&self, tenant: &str) -> bool {
        let settled = |e: &Entry| *e.state.borrow() == State::Charged;
        let evict = |id: &(Arc<str>, Box<str>), largest: &str| {
            let removed = self
                .entries
                .remove_if(id, |_, e| &*e.tenant == largest && settled(e));
            match removed {
                Some((_, e)) => {
                    self.shares.removed(&e.tenant);
                    Evicted::Yes
                }
                None if self.entries.get(id).is_some_and(|e| &*e.tenant == largest) => {
                    Evicted::InUse
                }
                None => Evicted::Gone,
            }
        };
        // The iterator's shard lock is released before the eviction takes it again.
        let scan = |largest: &str| {
            let mut entries = self.entries.iter().take(tenant_shares::SCAN);
            entries
                .find(|e| &*e.tenant == largest && settled(e))
                .map(|e| e.key().clone())
        };
        tenant_shares::make_room(&self.shares, tenant, evict, scan)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_body_on_another_account_is_another_request() {
        let book = IdempotencyBook::default();
        let on =
            |account: &[u8]| book.fingerprint("POST", "/v1/payment_intents", account, b"amount=1");
        assert_eq!(on(b"acct_A"), on(b"acct_A"));
        assert_ne!(on(b"acct_A"), on(b"acct_B"));
        assert_ne!(on(b""), on(b"acct_A"));
        // Seeds of their own: another process's fingerprint of the same request differs.
        let other = IdempotencyBook::default();
        assert_ne!(
            on(b""),
            other.fingerprint("POST", "/v1/payment_intents", b"", b"amount=1")
        );
    }

    /// The call of `jti` (tenant `ten`) under `idem`, with fingerprint `fp`, at `now`.
    async fn call_of(
        book: &Arc<IdempotencyBook>,
        (jti, ten): (&str, &str),
        idem: &str,
        fp: u64,
        now: i64,
    ) -> Admission {
        let (jti, ten): (Arc<str>, Arc<str>) = (jti.into(), ten.into());
        let call = Call {
            jti: &jti,
            ten: &ten,
            exp: i64::MAX,
            idempotency_key: idem,
            credential: 1,
            fingerprint: fp,
        };
        book.admit(call, now, Duration::from_secs(5)).await
    }

    fn admit(book: &Arc<IdempotencyBook>, fp: u64) -> impl std::future::Future<Output = Admission> {
        let book = book.clone();
        async move { call_of(&book, ("key_1", "tn_1"), "idem-1", fp, 0).await }
    }

    #[tokio::test]
    async fn a_retry_under_a_replaced_secret_is_a_new_call_whose_own_retries_are_free() {
        let book = Arc::new(IdempotencyBook::default());
        let (jti, ten): (Arc<str>, Arc<str>) = ("key_1".into(), "tn_1".into());
        let call = |credential: &str| Call {
            jti: &jti,
            ten: &ten,
            exp: i64::MAX,
            idempotency_key: "idem-1",
            credential: book.credential_id(credential),
            fingerprint: 7,
        };
        let wait = Duration::from_secs(5);
        let Admission::First(first) = book.admit(call("sk_test_1"), 0, wait).await else {
            panic!("a first call")
        };
        first.charged();
        assert!(book.is_retry(&call("sk_test_1"), 0));
        assert!(matches!(
            book.admit(call("sk_test_1"), 0, wait).await,
            Admission::Replay
        ));
        // The tenant replaced its secret: charged again, and remembered under the new one.
        assert!(!book.is_retry(&call("sk_live_1"), 0));
        let Admission::First(again) = book.admit(call("sk_live_1"), 0, wait).await else {
            panic!("a new call under the new secret")
        };
        // Its retry while it is in flight is one (it waits for the first), then free.
        assert!(book.is_retry(&call("sk_live_1"), 0));
        // A call under yet another secret meanwhile is charged, and displaces nothing.
        assert!(matches!(
            book.admit(call("sk_live_2"), 0, wait).await,
            Admission::Untracked
        ));
        again.charged();
        assert!(matches!(
            book.admit(call("sk_live_1"), 0, wait).await,
            Admission::Replay
        ));
    }

    #[tokio::test]
    async fn a_blank_or_overlong_idempotency_key_is_no_key_at_all() {
        let book = Arc::new(IdempotencyBook::default());
        for idem in ["", " ", "\t", &"k".repeat(256)] {
            for _ in 0..2 {
                let admitted = call_of(&book, ("key_1", "tn_1"), idem, 7, 0).await;
                assert!(matches!(admitted, Admission::Untracked), "{idem:?}");
            }
        }
        let Admission::First(first) =
            call_of(&book, ("key_1", "tn_1"), &"k".repeat(255), 7, 0).await
        else {
            panic!("255 characters is a key")
        };
        first.charged();
        assert_eq!(book.len(), 1);
    }

    #[tokio::test]
    async fn a_tenant_that_fills_the_book_cannot_keep_another_tenant_out() {
        let book = Arc::new(IdempotencyBook::default());
        for i in 0..MAX_ENTRIES + 10 {
            if let Admission::First(p) =
                call_of(&book, ("key_b", "tn_b"), &format!("b{i}"), 1, 0).await
            {
                p.charged();
            }
        }
        assert_eq!(book.len(), MAX_ENTRIES, "the bound holds");
        // The other tenant's call is remembered, in place of one of the filler's, and its
        // retry is free.
        let Admission::First(first) = call_of(&book, ("key_a", "tn_a"), "a1", 7, 0).await else {
            panic!("another tenant's first call is remembered")
        };
        first.charged();
        assert!(matches!(
            call_of(&book, ("key_a", "tn_a"), "a1", 7, 0).await,
            Admission::Replay
        ));
        assert_eq!(book.len(), MAX_ENTRIES);
        assert_eq!(
            (book.shares.held("tn_a"), book.shares.held("tn_b")),
            (1, MAX_ENTRIES - 1)
        );
        // The filler, still the largest holder, adds nothing more.
        let more = call_of(&book, ("key_b", "tn_b"), "b-more", 1, 0).await;
        assert!(matches!(more, Admission::Untracked));
    }

    #[tokio::test]
    async fn a_charged_request_is_replayed_free_and_a_refused_one_is_forgotten() {
        let book = Arc::new(IdempotencyBook::default());
        let Admission::First(first) = admit(&book, 7).await else {
            panic!("first")
        };
        drop(first); // refused by the vendor: not charged
        let Admission::First(second) = admit(&book, 7).await else {
            panic!("a refused call is forgotten")
        };
        second.charged();
        assert!(matches!(admit(&book, 7).await, Admission::Replay));
        // Another body under the same idempotency key is charged.
        assert!(matches!(admit(&book, 8).await, Admission::Untracked));
        // Another key's identical request is its own.
        let other = call_of(&book, ("key_2", "tn_1"), "idem-1", 7, 0).await;
        assert!(matches!(other, Admission::First(_)));
    }

    #[tokio::test]
    async fn a_retry_is_free_only_while_the_vendor_surely_remembers_the_key() {
        let book = Arc::new(IdempotencyBook::default());
        let at = |now: i64| {
            let book = book.clone();
            async move { call_of(&book, ("key_1", "tn_1"), "idem-1", 7, now).await }
        };
        let Admission::First(first) = at(1_000).await else {
            panic!("first")
        };
        first.charged();
        assert!(matches!(at(1_000 + 86_399).await, Admission::Replay));
        // A day after the first call, Stripe may have forgotten it: charged again.
        let Admission::First(again) = at(1_000 + 86_400).await else {
            panic!("a day later the retry is a new call")
        };
        again.charged();
        assert!(matches!(at(1_000 + 86_401).await, Admission::Replay));
    }

    #[tokio::test]
    async fn a_concurrent_duplicate_waits_for_the_first_to_settle() {
        let book = Arc::new(IdempotencyBook::default());
        let Admission::First(first) = admit(&book, 7).await else {
            panic!("first")
        };
        let waiting = tokio::spawn(admit(&book, 7));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the duplicate must wait");
        first.charged();
        assert!(matches!(waiting.await.unwrap(), Admission::Replay));
    }
}
