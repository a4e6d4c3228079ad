//! What the control plane and the proxy exchange, and nothing else (SPEC §5, §6):
//! published snapshots (public keys, vendor credentials, revocations), budget leases, and
//! audit events. `serve` wires the in-process implementations; edge nodes (`edge`)
//! implement the same traits over HTTP.

use crate::money::Micros;
use crate::revocation::RevocationFilter;
use crate::secret::Secret;
use crate::token::Verifier;
use crate::Map;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Vendor secrets by (tenant, vendor), decrypted, in memory only.
/// Vendor secrets by tenant id, then vendor name (two lookups by `&str`, no key to build).
pub type Credentials = Map<String, Map<String, Secret>>;

/// Immutable snapshots the proxy reads on every request; the control plane swaps in new
/// ones when something changes.
pub struct Published {
    pub verifier: ArcSwap<Verifier>,
    pub credentials: ArcSwap<Credentials>,
    pub revocations: ArcSwap<RevocationFilter>,
    /// Bumped on every key rotation or revocation, so caches know when to look again.
    pub generation: std::sync::atomic::AtomicU64,
}

impl Published {
    pub fn empty() -> Self {
        Published {
            verifier: ArcSwap::from_pointee(Verifier::new(&Default::default())),
            credentials: ArcSwap::from_pointee(Map::default()),
            revocations: ArcSwap::from_pointee(RevocationFilter::with_capacity(1024)),
            generation: Default::default(),
        }
    }
}

/// The UTC day number (days since 1970-01-01): the cap window.
pub fn utc_day(unix_secs: i64) -> i64 {
    unix_secs.div_euclid(86_400)
}

/// Which budget a lease, a report or a commit is about. Today one budget binds a request:
/// its key's daily cap (`key_daily`, also what a message without the field means).
/// Budgets above the key (SPEC §9: tenant, label prefix, per vendor) will be more
/// variants; a request bound by several will send one row per budget in the same call,
/// granted or committed all or nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    #[default]
    KeyDaily,
}

/// Ask for a slice of a key's remaining budget for `day`. The ledger grants either
/// nothing or between `min` and `want`, and counts the grant as spent until returned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRequest {
    #[serde(default)]
    pub budget: Budget,
    pub key_id: String,
    pub tenant_id: String,
    pub day: i64,
    pub cap: Micros,
    pub min: Micros,
    pub want: Micros,
    /// Of the grant, at most this much is recorded as committed in the same statement:
    /// the write-ahead of the reservation that asked for the lease, so a fresh key's
    /// first call waits for one ledger round trip, not two. `Grant::committed` says how
    /// much was; a ledger that does not know the field commits nothing.
    #[serde(default)]
    pub commit: Micros,
}

/// A lease granted: `granted` joins the holder's lease, and `committed` of it (at most
/// `LeaseRequest::commit`) is already committed, as `Ledger::commit` would have done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grant {
    pub granted: Micros,
    pub committed: Micros,
    /// The key has been revoked (nothing granted): the call is refused as revoked, not as
    /// over its cap, by a node whose revocation list has not caught up yet.
    pub revoked: bool,
    /// The key's settled spend for the day as the ledger read it when answering (None:
    /// not known). Settled spend never decreases within a day, so no grant that day can
    /// make room for a call beyond `cap - settled`: a proxy refuses such calls without
    /// asking again (an exhausted key's flood costs the ledger nothing).
    pub settled: Option<Micros>,
}

impl Grant {
    pub const NONE: Grant = Grant {
        granted: Micros::ZERO,
        committed: Micros::ZERO,
        revoked: false,
        settled: None,
    };

    /// `granted`, nothing committed.
    pub fn uncommitted(granted: Micros) -> Grant {
        Grant {
            granted,
            committed: Micros::ZERO,
            revoked: false,
            settled: None,
        }
    }
}

/// What a proxy did with its leases: `spent` moved from held to settled, `returned`
/// went back to the key's remaining budget. `overspent` is spend metered from a vendor's
/// response beyond any lease (the vendor already charged it): it is recorded as settled.
/// `unreserved` is committed budget (`LeaseCommit`) whose call was refused, never sent or
/// cost less than reserved: it went back into the holder's own lease, no longer committed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LeaseReport {
    #[serde(default)]
    pub budget: Budget,
    pub key_id: String,
    pub day: i64,
    pub spent: Micros,
    pub returned: Micros,
    pub overspent: Micros,
    #[serde(default)]
    pub unreserved: Micros,
    /// Give back all of the holder's uncommitted budget on the key, whatever `returned`
    /// says: the holder may have been granted budget whose answer it never got (a lease
    /// call that failed after the ledger granted), which it cannot name, and it has
    /// given up every part of the lease it knows of (`returned` holds it all).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub return_uncommitted: bool,
}

/// Write-ahead of reservations: before a proxy forwards a call it reserved `amount` for,
/// the ledger records that much of the holder's lease on the key as committed. Should the
/// holder die, committed budget is settled as spent when its leases are reclaimed; only
/// the uncommitted rest goes back to the key (SPEC §5: a dead proxy loses only its unused
/// lease). Settled spend and `unreserved` in a later `LeaseReport` uncommit it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseCommit {
    #[serde(default)]
    pub budget: Budget,
    pub key_id: String,
    pub day: i64,
    pub amount: Micros,
}

#[derive(Debug, thiserror::Error)]
#[error("ledger unavailable: {0}")]
pub struct LedgerError(pub String);

/// A ledger grants leases to one holder (this process). A lease stays the holder's only
/// while the holder proves it is alive: past `leases_valid_until_ms` (`token::mono_ms`) the
/// proxy must not spend budget it holds, because from shortly after that moment another
/// process may take the holder for dead, settle what the audit trail shows it spent and
/// give the rest of its leases back to the keys.
#[async_trait::async_trait]
pub trait Ledger: Send + Sync + 'static {
    async fn lease(&self, request: LeaseRequest) -> Result<Grant, LedgerError>;

    /// `lease` for each request, the answers in the same order: a ledger that can should
    /// grant a batch in one round trip (one transaction, one HTTP call), since every
    /// fresh key needs a first lease before its first call.
    async fn lease_many(&self, requests: Vec<LeaseRequest>) -> Vec<Result<Grant, LedgerError>> {
        let mut answers = Vec::with_capacity(requests.len());
        for request in requests {
            answers.push(self.lease(request).await);
        }
        answers
    }

    /// Records what the proxy did with its leases. `Ok` once the ledger has the reports:
    /// applied, or (an edge node's `HttpLedger`) kept in a numbered batch it sends again
    /// until the control plane answers, so they are applied exactly once. `Err` when it
    /// took none of them: the caller keeps them and reports them again (merged with what
    /// it reports next). The proxy calls it every report round, with no rows when it has
    /// nothing new: that call is when an edge node sends an unanswered batch again.
    async fn report(&self, reports: Vec<LeaseReport>) -> Result<(), LedgerError>;

    /// Records each commit durably before answering, atomically per (key, day): `true`
    /// when the holder's lease holds that much uncommitted budget (so the caller may
    /// forward), `false` when it does not (the lease was reclaimed: the holder was taken
    /// for dead). Every commit of one (key, day) in a call gets the same answer. An error
    /// means the outcome is unknown: the caller forwards nothing.
    async fn commit(&self, commits: Vec<LeaseCommit>) -> Result<Vec<bool>, LedgerError>;

    /// Counted in milliseconds: whole seconds would cut up to a second off each renewal,
    /// and with a short lease lifetime leave gaps between renewals in which every metered
    /// call is refused.
    fn leases_valid_until_ms(&self) -> i64 {
        i64::MAX
    }

    /// Most rows the proxy hands to one `report` call: a ledger that applies each call
    /// as one transaction on a writer that first leases also wait for (the in-process
    /// one) says how many, so a round of thousands of keys goes in several short ones.
    /// `None`: the whole round at once (an edge node's outbox batches it itself).
    fn report_rows_per_call(&self) -> Option<usize> {
        None
    }

    /// A `lease_many` call that fails after the ledger may have granted is given back
    /// whole by this ledger itself (an edge node names the batch lost in its next
    /// report): the proxy need not doubt the counters it asked for. `false`: what such a
    /// grant left unknown comes back only through a counter in doubt.
    fn gives_back_lost_leases(&self) -> bool {
        false
    }
}

/// One proxied (or denied) request, as `GET /v1/audit` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditEvent {
    pub ts_ms: i64,
    pub tenant_id: Option<Arc<str>>,
    pub key_id: Option<Arc<str>>,
    pub label: Option<Arc<str>>,
    pub vendor: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub decision: String,
    pub spend: Micros,
    pub vendor_request_id: Option<String>,
    pub duration_ms: u64,
    /// Token-metered (LLM) calls: the model and the tokens the vendor reported.
    pub llm: Option<LlmAudit>,
}

/// The model of an LLM call and its tokens (`None`: no usage could be read, the call was
/// charged its whole reservation). `input_tokens` counts every input token, cached and
/// cache writes included.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LlmAudit {
    pub model: String,
    pub input_tokens: Option<u64>,
    pub cached_input_tokens: Option<u64>,
    pub cache_write_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

/// Where the proxy drops audit events. `record` never blocks or fails the request path.
pub trait AuditSink: Send + Sync + 'static {
    fn record(&self, event: AuditEvent);

    /// `audit.durability: strict`: the proxy records a response's event with this before
    /// it releases the response's last bytes.
    fn is_strict(&self) -> bool {
        false
    }

    /// Whether the trail cannot be written now (its last write gave events up, or its
    /// writer is stuck retrying): a strict proxy then forwards nothing, since no answer
    /// could be released (503 `audit_unavailable`).
    fn is_failing(&self) -> bool {
        false
    }

    /// Records the event and blocks the calling thread until it is durable, at most
    /// `timeout`. False when it is not (timed out, queue full, write failed): the caller
    /// must not release its response.
    fn record_durably(&self, event: AuditEvent, _timeout: std::time::Duration) -> bool {
        self.record(event);
        true
    }
}

pub type SharedPublished = Arc<Published>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ledger_message_names_its_budget_and_only_known_budgets_are_read() {
        let commit = LeaseCommit {
            budget: Budget::KeyDaily,
            key_id: "key_1".into(),
            day: 20_000,
            amount: Micros(5),
        };
        let json = serde_json::to_value(&commit).unwrap();
        assert_eq!(json["budget"], "key_daily");
        let report = serde_json::to_value(LeaseReport::default()).unwrap();
        assert_eq!(report["budget"], "key_daily");
        // A message from a node that predates the field binds the key's daily cap.
        let old: LeaseRequest = serde_json::from_str(
            r#"{"key_id":"key_1","tenant_id":"tn_1","day":1,"cap":10,"min":1,"want":2}"#,
        )
        .unwrap();
        assert_eq!(old.budget, Budget::KeyDaily);
        // A budget this ledger does not know is refused, never taken for the key's.
        let unknown = r#"{"budget":"tenant_monthly","key_id":"key_1","day":1,"amount":5}"#;
        assert!(serde_json::from_str::<LeaseCommit>(unknown).is_err());
    }
}
