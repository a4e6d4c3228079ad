//! Prometheus metrics of SPEC §7, registered once in the default registry that the
//! metrics listener serves (`serve::metrics_routes`). Label values are bounded: vendor
//! names from the catalog and decision codes, never key ids or tenants.

use crate::proxy::deny::Denial;
use prometheus::{
    register_counter_vec, register_gauge, register_histogram, register_int_counter,
    register_int_counter_vec, register_int_gauge, CounterVec, Gauge, Histogram, IntCounter,
    IntCounterVec, IntGauge,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// Children of `keybrake_requests_total`, looked up by label once and then kept: a label
/// lookup hashes both values and takes the vector's lock on every request. Slots are made
/// lazily, so a series still appears only once it has counted something.
pub struct RequestCounters {
    vec: IntCounterVec,
    by_vendor: crate::Map<String, Box<[OnceLock<IntCounter>]>>,
    unknown: Box<[OnceLock<IntCounter>]>,
}

impl RequestCounters {
    /// For the catalog's `vendors`, and `unknown` for any other name.
    pub fn new(vec: IntCounterVec, vendors: impl IntoIterator<Item = String>) -> Self {
        let row = || {
            (0..Denial::SLOTS)
                .map(|_| OnceLock::new())
                .collect::<Box<[_]>>()
        };
        RequestCounters {
            by_vendor: vendors.into_iter().map(|v| (v, row())).collect(),
            unknown: row(),
            vec,
        }
    }

    /// Counts one request: allowed (`None`) or refused. `vendor` is the name from the path,
    /// `None` when the catalog has no such vendor.
    pub fn inc(&self, vendor: Option<&str>, denial: Option<Denial>) {
        let (label, row) = match vendor.and_then(|v| self.by_vendor.get_key_value(v)) {
            Some((v, row)) => (v.as_str(), row),
            None => ("unknown", &self.unknown),
        };
        let decision = denial.map_or("allowed", Denial::code);
        // Two denials may share a code: their slots then hold the same child.
        let slot = denial.map_or(0, Denial::slot);
        match row.get(slot) {
            Some(cell) => cell
                .get_or_init(|| self.vec.with_label_values(&[label, decision]))
                .inc(),
            None => self.vec.with_label_values(&[label, decision]).inc(),
        }
    }
}

pub struct Metrics {
    pub requests: IntCounterVec,
    pub upstream_duration: Histogram,
    pub overhead: Histogram,
    pub spend_usd: CounterVec,
    /// `keybrake_llm_tokens_total{vendor,kind}`: tokens of settled LLM calls, by how they
    /// are billed (input, cached_input, cache_write, output; reasoning is part of output).
    pub llm_tokens: IntCounterVec,
    pub keys_issued: IntCounter,
    pub keys_revoked: IntCounter,
    pub revoked_keys: IntGauge,
    pub sync_lag: Gauge,
    pub token_cache_hits: IntCounter,
    pub token_cache_misses: IntCounter,
    /// Signature checks run, one per batch of fresh keys' signatures (misses / batches is
    /// the mean batch size).
    pub token_signature_batches: IntCounter,
    /// Verified digests and keys in use held by the verified-token cache (set every second).
    pub token_cache_entries: IntGauge,
    pub token_cache_keys: IntGauge,
    pub audit_queue_depth: IntGauge,
    pub audit_dropped: IntCounter,
    pub store_wal_backlog: IntGauge,
    /// `keybrake_control_requests_total{route,status}`: control API answers by route
    /// (`METHOD /template`, or `unmatched`) and status code.
    pub control_requests: IntCounterVec,
}

/// Which process serves `/metrics`: each shows the metrics that describe it, so a
/// control plane does not list proxy latencies that stay empty, nor an edge node a WAL it
/// does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsOf {
    /// `keybrake serve`: control plane and proxy in one process, every metric.
    Serve,
    Control,
    Edge,
}

/// Metrics only a process that runs the control API (and its store) updates.
const CONTROL_ONLY: &[&str] = &[
    "keybrake_keys_issued_total",
    "keybrake_keys_revoked_total",
    "keybrake_store_wal_backlog_frames",
    "keybrake_control_requests_total",
];

/// Metrics only a process that runs the proxy updates.
const PROXY_ONLY: &[&str] = &[
    "keybrake_requests_total",
    "keybrake_upstream_duration_seconds",
    "keybrake_overhead_seconds",
    "keybrake_spend_usd_total",
    "keybrake_llm_tokens_total",
    "keybrake_sync_lag_seconds",
    "keybrake_token_cache_hits_total",
    "keybrake_token_cache_misses_total",
    "keybrake_token_signature_batches_total",
    "keybrake_token_cache_entries",
    "keybrake_token_cache_keys",
];

/// Whether this process's store has a WAL to checkpoint (SQLite): a PostgreSQL control
/// plane does not list `keybrake_store_wal_backlog_frames`, which would read 0 for ever.
static WAL_SHOWN: AtomicBool = AtomicBool::new(false);

/// Lists `keybrake_store_wal_backlog_frames` from now on (`Store::checkpoints`, SQLite).
pub fn show_wal_backlog() {
    WAL_SHOWN.store(true, Ordering::Relaxed);
}

impl MetricsOf {
    /// Whether this process shows the metric family `name`.
    pub fn shows(self, name: &str) -> bool {
        if name == "keybrake_store_wal_backlog_frames" && !WAL_SHOWN.load(Ordering::Relaxed) {
            return false;
        }
        match self {
            MetricsOf::Serve => true,
            MetricsOf::Control => !PROXY_ONLY.contains(&name),
            MetricsOf::Edge => !CONTROL_ONLY.contains(&name),
        }
    }

    /// The Prometheus text of every metric this process shows.
    pub fn render(self) -> String {
        let mut families: Vec<_> = prometheus::gather()
            .into_iter()
            .filter(|f| self.shows(f.name()))
            .collect();
        // The crate's process collector counts CPU in whole seconds (an idle process
        // reads 0 for minutes, `rate()` moves in steps): the kernel's figure, to the µs.
        if let Some(cpu) = cpu_seconds() {
            for family in &mut families {
                if family.name() == "process_cpu_seconds_total" {
                    for metric in family.mut_metric() {
                        let mut counter = prometheus::proto::Counter::default();
                        counter.set_value(cpu);
                        metric.set_counter(counter);
                    }
                }
            }
        }
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_default()
    }
}

/// User and system CPU time of this process, in seconds (`getrusage`).
fn cpu_seconds() -> Option<f64> {
    // SAFETY: `getrusage` only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

/// Token kinds of `keybrake_llm_tokens_total`.
pub const LLM_TOKEN_KINDS: [&str; 5] = [
    "input",
    "cached_input",
    "cache_write",
    "output",
    "reasoning",
];

const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    /// A proxy's per-vendor series, at zero until they count: `keybrake_spend_usd_total`
    /// and `keybrake_requests_total{decision="allowed"}` for each vendor of the catalog,
    /// `keybrake_llm_tokens_total` of each kind for each token-metered one. A dashboard or
    /// an alert on them finds them from the process's start, not from its first call.
    pub fn start_vendor_series<'a>(&self, vendors: impl IntoIterator<Item = (&'a str, bool)>) {
        for (vendor, llm) in vendors {
            self.spend_usd.with_label_values(&[vendor]);
            self.requests.with_label_values(&[vendor, "allowed"]);
            if llm {
                for kind in LLM_TOKEN_KINDS {
                    self.llm_tokens.with_label_values(&[vendor, kind]);
                }
            }
        }
    }

    pub fn global() -> Arc<Metrics> {
        static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
        METRICS
            .get_or_init(|| {
                Arc::new(Metrics {
                    requests: register_int_counter_vec!(
                        "keybrake_requests_total",
                        "Proxied requests by vendor and decision (allowed or the denial code).",
                        &["vendor", "decision"]
                    )
                    .unwrap(),
                    upstream_duration: register_histogram!(
                        "keybrake_upstream_duration_seconds",
                        "Time from sending the request upstream to the end of the response.",
                        LATENCY_BUCKETS.to_vec()
                    )
                    .unwrap(),
                    overhead: register_histogram!(
                        "keybrake_overhead_seconds",
                        "Time spent in Keybrake itself per request (total minus upstream).",
                        LATENCY_BUCKETS.to_vec()
                    )
                    .unwrap(),
                    spend_usd: register_counter_vec!(
                        "keybrake_spend_usd_total",
                        "Settled spend in USD by vendor.",
                        &["vendor"]
                    )
                    .unwrap(),
                    llm_tokens: register_int_counter_vec!(
                        "keybrake_llm_tokens_total",
                        "Tokens of settled LLM calls by vendor and kind (input, cached_input, cache_write, output, reasoning; reasoning is part of output).",
                        &["vendor", "kind"]
                    )
                    .unwrap(),
                    keys_issued: register_int_counter!(
                        "keybrake_keys_issued_total",
                        "Vault keys issued."
                    )
                    .unwrap(),
                    keys_revoked: register_int_counter!(
                        "keybrake_keys_revoked_total",
                        "Vault keys revoked."
                    )
                    .unwrap(),
                    revoked_keys: register_int_gauge!(
                        "keybrake_revoked_keys",
                        "Revoked key ids held (size of the revocation filter): until a day past their key's expiry."
                    )
                    .unwrap(),
                    sync_lag: register_gauge!(
                        "keybrake_sync_lag_seconds",
                        "Age of the proxy's view of the control plane (0 in-process)."
                    )
                    .unwrap(),
                    token_cache_hits: register_int_counter!(
                        "keybrake_token_cache_hits_total",
                        "Vault keys found already verified."
                    )
                    .unwrap(),
                    token_cache_misses: register_int_counter!(
                        "keybrake_token_cache_misses_total",
                        "Vault keys whose signature had to be verified."
                    )
                    .unwrap(),
                    token_signature_batches: register_int_counter!(
                        "keybrake_token_signature_batches_total",
                        "Signature checks of fresh vault keys, each of one or more keys checked together."
                    )
                    .unwrap(),
                    token_cache_entries: register_int_gauge!(
                        "keybrake_token_cache_entries",
                        "Verified-token digests held (bounded by token_cache_entries)."
                    )
                    .unwrap(),
                    token_cache_keys: register_int_gauge!(
                        "keybrake_token_cache_keys",
                        "Vault keys in use held with their claims and compiled allowlist (bounded by token_cache_entries / 16)."
                    )
                    .unwrap(),
                    audit_queue_depth: register_int_gauge!(
                        "keybrake_audit_queue_depth",
                        "Audit events waiting to be written."
                    )
                    .unwrap(),
                    audit_dropped: register_int_counter!(
                        "keybrake_audit_dropped_total",
                        "Audit events dropped: the queue was full, or their batch was refused for good."
                    )
                    .unwrap(),
                    store_wal_backlog: register_int_gauge!(
                        "keybrake_store_wal_backlog_frames",
                        "Frames of keybrake.db's WAL the last checkpoint could not copy into the database (0 normally)."
                    )
                    .unwrap(),
                    control_requests: register_int_counter_vec!(
                        "keybrake_control_requests_total",
                        "Control API answers by route (METHOD /template, or unmatched) and status code.",
                        &["route", "status"]
                    )
                    .unwrap(),
                })
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    #[test]
    fn kept_request_counters_count_what_label_lookups_count() {
        let vec = IntCounterVec::new(Opts::new("t_requests_total", "t"), &["vendor", "decision"])
            .unwrap();
        let counters = RequestCounters::new(vec.clone(), ["stripe".to_string()]);
        counters.inc(Some("stripe"), None);
        counters.inc(Some("stripe"), None);
        counters.inc(Some("stripe"), Some(Denial::CapExhausted));
        counters.inc(Some("stripe"), Some(Denial::EndpointNotAllowed));
        counters.inc(Some("stripe"), Some(Denial::MethodNotAllowed));
        counters.inc(Some("nope"), Some(Denial::UnknownVendor));
        counters.inc(None, Some(Denial::UnknownVendor));
        let get = |v: &str, d: &str| vec.with_label_values(&[v, d]).get();
        assert_eq!(get("stripe", "allowed"), 2);
        assert_eq!(get("stripe", "cap_exhausted"), 1);
        assert_eq!(get("stripe", "endpoint_not_allowed"), 2);
        assert_eq!(get("unknown", "unknown_vendor"), 2);
        // Nothing else was created: a series appears once it counted something.
        let series: usize = prometheus::core::Collector::collect(&vec)
            .iter()
            .map(|f| f.get_metric().len())
            .sum();
        assert_eq!(series, 4);
    }
}
