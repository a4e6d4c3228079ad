//! The per-object charge memory (`skip_if_created_by_same_key`): which key was charged
//! how much for an object (a PaymentIntent it created, confirmed or captured through a
//! metered call), so a later confirm or capture of the same object by that key charges
//! only an increase. Bounded and in memory only: an object forgotten (a restart, a full
//! map) is charged in full again, never less. A full map is shared fairly between tenants
//! (`tenant_shares`).

use super::tenant_shares::{self, Evicted, TenantShares};
use crate::config::MeterRule;
use crate::money::Micros;
use dashmap::DashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Objects remembered at most.
pub const MAX_CREATED: usize = 200_000;

/// What one key has been charged for one object, the most of its amounts seen so far.
struct Charged {
    owner: Arc<str>,
    tenant: Arc<str>,
    /// The key's expiry: the entry is useless after it.
    exp: i64,
    charged: Micros,
    /// The object's currency (lower case), when known.
    currency: Option<Arc<str>>,
}

/// What a key was charged for an object, as remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub charged: Micros,
    pub currency: Option<Arc<str>>,
}

/// The key an object is remembered for.
pub struct Owner<'a> {
    pub jti: &'a Arc<str>,
    /// The key's tenant, whose share of a full memory the entry counts in.
    pub ten: &'a Arc<str>,
    /// The key's expiry (unix seconds).
    pub exp: i64,
}

pub struct ChargeMemory {
    objects: DashMap<String, Charged, ahash::RandomState>,
    /// When `objects` was last swept of expired entries (unix seconds).
    swept: AtomicI64,
    capacity: usize,
    /// Places taken in `objects`: taken before an entry goes in, given back after one
    /// goes out, so that concurrent calls never hold more than `capacity` (`len` alone,
    /// read shard by shard while others insert and evict, can be short).
    taken: AtomicUsize,
    shares: TenantShares<String>,
}

impl Default for ChargeMemory {
    fn default() -> Self {
        ChargeMemory::with_capacity(MAX_CREATED)
    }
}

impl ChargeMemory {
    pub fn with_capacity(capacity: usize) -> ChargeMemory {
        ChargeMemory {
            objects: DashMap::default(),
            swept: AtomicI64::new(0),
            capacity,
            taken: AtomicUsize::new(0),
            shares: TenantShares::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// What key `jti` was charged for the object the call acts on (the path segment
    /// under the rule's `*`), and the object's currency.
    pub fn charged_for(&self, rule: &MeterRule, path: &str, jti: &str) -> Option<Known> {
        let id = rule.object_id(path)?;
        self.objects
            .get(id)
            .filter(|e| *e.owner == *jti)
            .map(|e| Known {
                charged: e.charged,
                currency: e.currency.clone(),
            })
    }

    /// Records that `owner` was charged `charged` for object `id` (kept: the most charged
    /// so far; another key's entry is replaced, so its owner is charged in full from now
    /// on). When full, expired owners are swept out (at most once a second); if it is
    /// still full, the entry takes the place of one of the largest tenant's, or when
    /// `owner`'s tenant is that tenant, nothing is added.
    pub fn remember(
        &self,
        id: String,
        owner: Owner<'_>,
        charged: Micros,
        currency: Option<Arc<str>>,
        now: i64,
    ) {
        if self.taken.load(Ordering::Acquire) >= self.capacity {
            self.sweep(now);
        }
        let fresh = || Charged {
            owner: owner.jti.clone(),
            tenant: owner.ten.clone(),
            exp: owner.exp,
            charged,
            currency: currency.clone(),
        };
        // Decided before `entry` locks a shard: `len` reads every shard, and making room
        // removes from one.
        let existed = self.objects.contains_key(&id);
        let room = existed || self.take_place() || (self.make_room(owner.ten) && self.take_place());
        let key = id.clone();
        match self.objects.entry(id) {
            dashmap::Entry::Occupied(mut e) => {
                if room && !existed {
                    // Added by another call since: the place taken for it goes back.
                    self.taken.fetch_sub(1, Ordering::AcqRel);
                }
                let e = e.get_mut();
                if *e.owner == **owner.jti {
                    e.charged = e.charged.max(charged);
                    if currency.is_some() {
                        e.currency = currency.clone();
                    }
                } else {
                    self.shares.removed(&e.tenant);
                    self.shares.added(owner.ten, &key);
                    *e = fresh();
                }
            }
            // Gone since it was seen (another call made room with it, or swept it): no
            // room was made for it, and taking its place anyway would pass the bound a
            // little more each time. Not remembered: a later call on the object is
            // charged again (the safe side), as after an eviction.
            dashmap::Entry::Vacant(_) if existed => {}
            dashmap::Entry::Vacant(e) => {
                if room {
                    self.shares.added(owner.ten, &key);
                    e.insert(fresh());
                }
            }
        }
    }

    /// Takes a place for a new entry, if there is one.
    fn take_place(&self) -> bool {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    /// Evicts the oldest entry of the tenant holding the most, if it holds more than
    /// `tenant`.
    fn make_room(&self, tenant: &str) -> bool {
        let evict = |id: &String, largest: &str| match self
            .objects
            .remove_if(id, |_, e| &*e.tenant == largest)
        {
            Some((_, e)) => {
                self.shares.removed(&e.tenant);
                self.taken.fetch_sub(1, Ordering::AcqRel);
                Evicted::Yes
            }
            None => Evicted::Gone,
        };
        // The iterator's shard lock is released before the eviction takes it again.
        let scan = |largest: &str| {
            let mut entries = self.objects.iter().take(tenant_shares::SCAN);
            entries
                .find(|e| &*e.tenant == largest)
                .map(|e| e.key().clone())
        };
        tenant_shares::make_room(&self.shares, tenant, evict, scan)
    }

    /// Drops the entries of expired keys, at most once a second (one thread does it).
    fn sweep(&self, now: i64) {
        let last = self.swept.load(Ordering::Relaxed);
        if now > last
            && self
                .swept
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.objects.retain(|_, e| {
                let keep = e.exp > now;
                if !keep {
                    self.shares.removed(&e.tenant);
                    self.taken.fetch_sub(1, Ordering::AcqRel);
                }
                keep
            });
        }
    }
}

/// The one field read from a created object's JSON.
#[derive(serde::Deserialize)]
struct CreatedObject<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
}

/// The `id` of a created object. Stripe writes it first (`{\n  "id": "pi_…",`), so that
/// is read straight off the front; any other shape goes through a JSON parser, which
/// still builds no tree but has to scan the whole (often kilobytes long) object.
pub fn created_object_id(body: &[u8]) -> Option<String> {
    fn skip_ws(b: &[u8]) -> &[u8] {
        let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
        &b[n..]
    }
    let front = skip_ws(body)
        .strip_prefix(b"{")
        .map(skip_ws)
        .and_then(|b| b.strip_prefix(b"\"id\""))
        .map(skip_ws)
        .and_then(|b| b.strip_prefix(b":"))
        .map(skip_ws)
        .and_then(|b| b.strip_prefix(b"\""));
    if let Some(rest) = front {
        if let Some(end) = rest
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        {
            let followed = skip_ws(&rest[end + 1..]).first().copied();
            if rest[end] == b'"' && matches!(followed, Some(b',' | b'}')) {
                if let Ok(id) = std::str::from_utf8(&rest[..end]) {
                    return Some(id.to_string());
                }
            }
        }
    }
    serde_json::from_slice::<CreatedObject>(body)
        .ok()
        .and_then(|o| o.id)
        .map(|id| id.into_owned())
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_created_object_id_is_read_from_the_front_or_parsed() {
        use super::created_object_id as id;
        assert_eq!(
            id(b"{\n  \"id\": \"pi_1\",\n  \"object\": \"payment_intent\"}").as_deref(),
            Some("pi_1")
        );
        assert_eq!(id(br#"{"id":"pi_2","amount":5}"#).as_deref(), Some("pi_2"));
        // Not first, or escaped: the parser decides.
        assert_eq!(
            id(br#"{"object":"x","id":"pi_3"}"#).as_deref(),
            Some("pi_3")
        );
        assert_eq!(id(br#"{"id":"pi_\u0034"}"#).as_deref(), Some("pi_4"));
        assert_eq!(id(br#"{"id":null}"#), None);
        assert_eq!(id(b"not json"), None);
        assert_eq!(id(br#"{"ids":"pi_5"}"#), None);
        // Cut short right after the id (a truncated capture): not a document, no id.
        assert_eq!(id(br#"{"id":"pi_6""#), None);
        assert_eq!(id(br#"{"id":"pi_7"}"#).as_deref(), Some("pi_7"));
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn confirm_rule() -> Arc<MeterRule> {
        let c = Config::from_yaml("", None, &Overrides::default()).unwrap();
        let path = "/v1/payment_intents/pi_1/confirm";
        c.vendors["stripe"]
            .meter_rule(&http::Method::POST, path)
            .unwrap()
            .clone()
    }

    /// Tenant `tn_1`'s keys, unless a test names another.
    fn owner(jti: &Arc<str>) -> Owner<'_> {
        static TENANT: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "tn_1".into());
        Owner {
            jti,
            ten: &TENANT,
            exp: 2_000,
        }
    }

    #[test]
    fn a_key_is_credited_only_for_its_own_objects_and_the_most_it_paid() {
        let memory = ChargeMemory::default();
        let rule = confirm_rule();
        let (a, b): (Arc<str>, Arc<str>) = ("key_a".into(), "key_b".into());
        let usd = Some(Arc::from("usd"));
        memory.remember(
            "pi_1".into(),
            owner(&a),
            Micros(3_000_000),
            usd.clone(),
            1_000,
        );
        memory.remember("pi_1".into(), owner(&a), Micros(1_000_000), None, 1_000);
        let path = "/v1/payment_intents/pi_1/confirm";
        let known = memory.charged_for(&rule, path, "key_a");
        let expected = Known {
            charged: Micros(3_000_000),
            currency: usd,
        };
        assert_eq!(known, Some(expected));
        assert_eq!(memory.charged_for(&rule, path, "key_b"), None);
        assert_eq!(
            memory.charged_for(&rule, "/v1/payment_intents/pi_2/confirm", "key_a"),
            None
        );
        // Another key's charge replaces the entry: key_a is charged in full from now on.
        memory.remember("pi_1".into(), owner(&b), Micros(500_000), None, 1_000);
        assert_eq!(memory.charged_for(&rule, path, "key_a"), None);
        assert_eq!(
            memory.charged_for(&rule, path, "key_b").map(|k| k.charged),
            Some(Micros(500_000))
        );
    }

    #[test]
    fn a_full_memory_sweeps_expired_keys_and_else_adds_nothing() {
        let memory = ChargeMemory::with_capacity(2);
        let (a, b): (Arc<str>, Arc<str>) = ("key_a".into(), "key_b".into());
        let short = Owner {
            exp: 1_500,
            ..owner(&a)
        };
        memory.remember("pi_1".into(), short, Micros(1), None, 1_000);
        memory.remember("pi_2".into(), owner(&b), Micros(1), None, 1_000);
        // Full, nothing expired: not added (that object is later charged in full).
        memory.remember("pi_3".into(), owner(&b), Micros(1), None, 1_001);
        assert_eq!(memory.len(), 2);
        let rule = confirm_rule();
        let pi_3 = "/v1/payment_intents/pi_3/confirm";
        assert_eq!(memory.charged_for(&rule, pi_3, "key_b"), None);
        // key_a expired: swept, and pi_3 fits.
        memory.remember("pi_3".into(), owner(&b), Micros(1), None, 1_600);
        assert_eq!(memory.len(), 2);
        assert!(memory.charged_for(&rule, pi_3, "key_b").is_some());
    }

    #[test]
    fn a_tenant_that_fills_the_memory_cannot_keep_another_tenant_out() {
        let memory = ChargeMemory::with_capacity(4);
        let rule = confirm_rule();
        let (attacker, victim): (Arc<str>, Arc<str>) = ("tn_b".into(), "tn_a".into());
        let (b, a): (Arc<str>, Arc<str>) = ("key_b".into(), "key_a".into());
        let of = |jti, ten| Owner {
            jti,
            ten,
            exp: 2_000,
        };
        for i in 0..10 {
            memory.remember(
                format!("pi_b{i}"),
                of(&b, &attacker),
                Micros(1),
                None,
                1_000,
            );
        }
        assert_eq!(memory.len(), 4, "the bound holds");
        // The victim's objects are remembered, each in place of one of the attacker's.
        for i in 0..2 {
            memory.remember(format!("pi_a{i}"), of(&a, &victim), Micros(5), None, 1_000);
        }
        for i in 0..2 {
            let path = format!("/v1/payment_intents/pi_a{i}/confirm");
            let known = memory.charged_for(&rule, &path, "key_a").map(|k| k.charged);
            assert_eq!(known, Some(Micros(5)), "pi_a{i}");
        }
        assert_eq!(memory.len(), 4);
        // Two each: an equal share is kept; neither takes the other's room now.
        memory.remember("pi_a2".into(), of(&a, &victim), Micros(5), None, 1_000);
        memory.remember("pi_b10".into(), of(&b, &attacker), Micros(1), None, 1_000);
        assert_eq!(memory.len(), 4);
        assert_eq!(
            (memory.shares.held("tn_a"), memory.shares.held("tn_b")),
            (2, 2)
        );
        // The counts follow the entries through a sweep.
        memory.remember("pi_a3".into(), of(&a, &victim), Micros(5), None, 2_000);
        assert_eq!(
            (memory.shares.held("tn_a"), memory.shares.held("tn_b")),
            (1, 0)
        );
        assert_eq!(memory.len(), 1);
    }

    /// Tenants racing to remember objects (new ones, ones another key holds, as keys
    /// expire): the shares always count exactly the entries each tenant holds.
    #[test]
    fn tenant_counts_stay_exact_under_concurrent_use() {
        let memory = Arc::new(ChargeMemory::with_capacity(64));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let memory = memory.clone();
                std::thread::spawn(move || {
                    let ten: Arc<str> = format!("tn_{}", t % 3).into();
                    let jti: Arc<str> = format!("key_{t}").into();
                    for i in 0..5_000u64 {
                        let owner = Owner {
                            jti: &jti,
                            ten: &ten,
                            exp: 1_000 + (i / 500) as i64,
                        };
                        // Ids shared between threads: entries change owner too.
                        let id = format!("pi_{}", (i * 7 + t as u64 * 13) % 200);
                        memory.remember(id, owner, Micros(1), None, 1_000 + (i / 400) as i64);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for t in 0..3 {
            let tenant = format!("tn_{t}");
            let held = memory
                .objects
                .iter()
                .filter(|e| *e.tenant == *tenant)
                .count();
            assert_eq!(memory.shares.held(&tenant), held, "{tenant}");
        }
        assert!(memory.len() <= 64, "the bound holds: {}", memory.len());
        assert_eq!(memory.taken.load(Ordering::Acquire), memory.len());
    }
}
