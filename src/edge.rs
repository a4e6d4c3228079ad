//! `keybrake proxy --control-url URL --node-token-file F`: an edge node. The proxy of
//! `serve`, fed over HTTP by a control plane instead of in-process (SPEC §1, §5, §6):
//! a long-poll keeps public keys, vendor credentials and revocations in memory (nothing
//! on disk), budget leases come from the control plane's ledger (`HttpLedger`), spend
//! reports (`ReportOutbox`) and audit events (`EdgeAudit`) go back in numbered batches,
//! each applied once, and a node that has not synced for
//! `max_staleness` refuses every request with 503 `control_unreachable`. The metrics
//! listener serves `/metrics`, `/healthz` and `/readyz` (ready only while fresh).

use crate::config::Config;
use crate::metrics::Metrics;
use crate::money::Micros;
use crate::proxy::fresh::SyncClock;
use crate::revocation::RevocationFilter;
use crate::secret::Secret;
use crate::sync::{
    AuditEvent, AuditSink, Budget, Credentials, Grant, LeaseCommit, LeaseReport, LeaseRequest,
    Ledger, LedgerError, Published,
};
use crate::token::{mono_ms, Verifier};
use anyhow::{anyhow, bail, Context, Result};
use prometheus::{IntCounter, IntGauge};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How an edge node reaches its control plane.
pub struct EdgeOptions {
    pub control_url: String,
    pub node_token_file: PathBuf,
    /// A private CA for an https:// control URL.
    pub ca_file: Option<PathBuf>,
    /// Refuse requests once the last successful sync is older than this.
    pub max_staleness: Duration,
}

/// Audit events held on the node while they wait for the control plane.
const AUDIT_BUFFER: usize = 50_000;
/// Largest audit batch body: under the control API's 64 KiB request limit.
const AUDIT_BATCH_BYTES: usize = 48 * 1024;
/// Largest audit event sent, serialized. `proxy::audit::bounded` keeps every event under
/// 10 KiB whatever the request; one larger still (never expected) is dropped and counted
/// rather than sent. A batch body is at most AUDIT_BATCH_BYTES, or one event when a single
/// event is larger: either way under the control plane's limit, so it is never refused
/// for its size.
const AUDIT_EVENT_MAX_BYTES: usize = 16 * 1024;
// 64: the framing, `{"batch":N,"events":[` and `]}`.
const _: () = assert!(AUDIT_BATCH_BYTES + 64 <= crate::control::api::MAX_BODY_BYTES);
const _: () = assert!(AUDIT_EVENT_MAX_BYTES + 64 <= crate::control::api::MAX_BODY_BYTES);
/// Most leases asked for in one request.
const LEASE_BATCH: usize = 200;
/// Most write-ahead rows in one request: well under the control API's 64 KiB body limit.
const COMMIT_BATCH: usize = 400;

/// Node metrics beside the shared ones (`keybrake_sync_lag_seconds`,
/// `keybrake_audit_dropped_total`).
struct EdgeMetrics {
    snapshot_version: IntGauge,
    lease_requests: IntCounter,
    lease_failures: IntCounter,
    /// Lease batches sent and not answered, named lost to the control plane.
    lease_batches_lost: IntCounter,
    /// HTTP calls carrying lease requests: requests per call is the batching.
    lease_calls: IntCounter,
    commit_rows: IntCounter,
    commit_calls: IntCounter,
}

impl EdgeMetrics {
    fn register() -> Result<EdgeMetrics> {
        Ok(EdgeMetrics {
            snapshot_version: prometheus::register_int_gauge!(
                "keybrake_sync_snapshot_version",
                "Version of the control plane's snapshot this node holds"
            )?,
            lease_requests: prometheus::register_int_counter!(
                "keybrake_lease_requests_total",
                "Budget leases this node asked the control plane for"
            )?,
            lease_failures: prometheus::register_int_counter!(
                "keybrake_lease_failures_total",
                "Budget lease requests that failed (control plane unreachable or refused)"
            )?,
            lease_batches_lost: prometheus::register_int_counter!(
                "keybrake_lease_batches_lost_total",
                "Lease calls sent and not answered: named lost in the next spend report, \
                 so the control plane gives back whatever they granted"
            )?,
            lease_calls: prometheus::register_int_counter!(
                "keybrake_lease_calls_total",
                "Calls to the control plane carrying lease requests (several keys per call)"
            )?,
            commit_rows: prometheus::register_int_counter!(
                "keybrake_commit_rows_total",
                "Write-ahead rows (one per key per batch) sent to the control plane"
            )?,
            commit_calls: prometheus::register_int_counter!(
                "keybrake_commit_calls_total",
                "Write-ahead calls to the control plane (each commits every reservation waiting)"
            )?,
        })
    }
}

#[derive(Debug)]
enum CallError {
    /// The node token is not (or no longer) accepted.
    Unauthorized,
    /// The control plane refused this body for good (400, 413, 422): sending it again
    /// cannot succeed.
    Refused(String),
    /// Anything else (transport, 5xx, 429, 408…): worth trying again.
    Other(String),
    /// The request never left: no connection (refused, no such host). Worth trying
    /// again, like `Other`, and surely not applied.
    Unsent(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unauthorized => f.write_str("the node token was refused"),
            CallError::Refused(why) | CallError::Other(why) | CallError::Unsent(why) => {
                f.write_str(why)
            }
        }
    }
}

/// HTTP to the control plane's `/v1/sync/` with the node token and this process's session.
struct SyncClient {
    base: String,
    token: Secret,
    session: String,
    agent: ureq::Agent,
    /// This node's clock against the control plane's, from its answers' `Date`.
    clock_offset: ClockOffset,
}

/// This node's wall clock against the control plane's, estimated from the `Date` header
/// of each answer (whole seconds: ±0.5 s). The UTC day a node's calls count on, key
/// expiry and the end of a revocation follow the node's clock, and leases are granted on
/// the control plane's day only: a node whose clock is off is said so, in its log and in
/// `keybrake_clock_offset_seconds`, before midnight shows it.
struct ClockOffset {
    gauge: prometheus::Gauge,
}

/// How far off a node's clock may be before it is warned about (beyond the estimate's
/// half-second resolution and a round trip).
const CLOCK_OFFSET_WARN_SECS: f64 = 2.0;

impl ClockOffset {
    fn new() -> Result<ClockOffset> {
        let this = ClockOffset::unregistered();
        prometheus::register(Box::new(this.gauge.clone()))?;
        Ok(this)
    }

    fn unregistered() -> ClockOffset {
        ClockOffset {
            gauge: prometheus::Gauge::new(
                "keybrake_clock_offset_seconds",
                "This node's wall clock minus the control plane's, estimated from the Date \
                 of its answers (±0.5 s); positive: the node is ahead",
            )
            .expect("a valid metric name"),
        }
    }

    /// An answer's `Date` header, received now.
    fn observe(&self, date: Option<&str>) {
        let Some(at) = date.and_then(|d| httpdate::parse_http_date(d).ok()) else {
            return;
        };
        let Ok(control) = at.duration_since(std::time::UNIX_EPOCH) else {
            return;
        };
        // The control plane's clock read somewhere in its second [date, date + 1).
        let control_ms = control.as_millis() as f64 + 500.0;
        let offset = (crate::token::unix_ms() as f64 - control_ms) / 1000.0;
        self.gauge.set((offset * 10.0).round() / 10.0);
        static WARN: crate::log_every::LogEvery =
            crate::log_every::LogEvery::new(Duration::from_secs(600));
        if offset.abs() > CLOCK_OFFSET_WARN_SECS && WARN.due().is_some() {
            log::warn!(
                "this node's clock is {:.1} s {} the control plane's: the UTC day its calls \
                 count on and key expiry follow this clock, and near midnight the control \
                 plane refuses leases for a day it is not in (503 ledger_unavailable); \
                 keep both clocks in sync (NTP)",
                offset.abs(),
                if offset > 0.0 { "ahead of" } else { "behind" }
            );
        }
    }
}

impl SyncClient {
    fn new(opts: &EdgeOptions) -> Result<SyncClient> {
        crate::secret::warn_if_shared(&opts.node_token_file, "node token");
        let token = std::fs::read_to_string(&opts.node_token_file)
            .with_context(|| {
                format!(
                    "cannot read the node token file {}",
                    opts.node_token_file.display()
                )
            })?
            .trim()
            .to_string();
        if token.is_empty() {
            bail!(
                "the node token file {} is empty",
                opts.node_token_file.display()
            );
        }
        // One kbn_… token and nothing else; what the file holds otherwise is never
        // printed (it may still be the secret, with other text around it).
        let well_formed = token.strip_prefix("kbn_").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        if !well_formed {
            bail!(
                "the node token file {} does not hold one node token (kbn_…): write only the \
                 node_token field of `keybrake node create NAME --json` to it",
                opts.node_token_file.display()
            );
        }
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .max_idle_connections_per_host(64);
        crate::tls::check_control_url(
            &opts.control_url,
            "the node token and the vendor credentials sent to the node",
        )?;
        if opts.control_url.starts_with("https://") {
            agent = agent.tls_config(crate::tls::client_config(opts.ca_file.as_deref())?);
        } else if opts.ca_file.is_some() {
            bail!("--ca-file is for an https:// control URL");
        }
        Ok(SyncClient {
            base: opts.control_url.trim_end_matches('/').to_string(),
            token: Secret::new(token),
            session: crate::ids::new_id("s"),
            agent: agent.build(),
            clock_offset: ClockOffset::new()?,
        })
    }

    /// One call with a JSON body (its text) or none; errors never carry the token (ureq
    /// names the URL only).
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let req = self
            .agent
            .request(method, &format!("{}{}", self.base, path))
            .timeout(timeout)
            .set("authorization", &format!("Bearer {}", self.token.expose()))
            .set("keybrake-node-session", &self.session);
        let result = match body {
            Some(b) => req.set("content-type", "application/json").send_string(b),
            None => req.call(),
        };
        match result {
            Ok(resp) => {
                self.clock_offset.observe(resp.header("date"));
                resp.into_json::<Value>()
                    .map_err(|e| CallError::Other(format!("unreadable answer from {path}: {e}")))
            }
            Err(ureq::Error::Status(401, _)) => Err(CallError::Unauthorized),
            Err(ureq::Error::Status(code, resp)) => {
                let body: Value = resp.into_json().unwrap_or(Value::Null);
                let error = body["error"]["code"].as_str().unwrap_or("");
                let hint = match error {
                    "storage_unavailable" => {
                        " (the control plane is up, its database is not: nodes go stale \
                         after max_staleness all the same, since a revocation made through \
                         another replica could not reach this one)"
                    }
                    _ => "",
                };
                let why = format!("{path} answered {code} {error}{hint}");
                if matches!(code, 400 | 413 | 422) {
                    Err(CallError::Refused(why))
                } else {
                    Err(CallError::Other(why))
                }
            }
            Err(ureq::Error::Transport(t)) => {
                let why = transport_error(path, &t);
                match t.kind() {
                    ureq::ErrorKind::Dns | ureq::ErrorKind::ConnectionFailed => {
                        Err(CallError::Unsent(why))
                    }
                    _ => Err(CallError::Other(why)),
                }
            }
        }
    }
}

/// A failed connection as `path: kind: message: cause`; ureq's own text would name the
/// control URL a second time (the caller's message names it once).
fn transport_error(path: &str, t: &ureq::Transport) -> String {
    let mut text = format!("{path}: {}", t.kind());
    if let Some(message) = t.message() {
        text = format!("{text}: {message}");
    }
    if let Some(cause) = std::error::Error::source(t) {
        text = format!("{text}: {cause}");
    }
    if text.contains("UnknownIssuer") {
        text.push_str(
            " (the node reads --ca-file / KEYBRAKE_CA_FILE at start: after a change of the \
             control plane's CA, reload the node, a graceful upgrade, to read it again)",
        );
    }
    text
}

/// Runs a blocking control-plane call off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// The node's ledger: leases from the control plane over HTTP, granted to this
/// process's session. A lease may be spent only until `leases_valid_until_ms`, counted from
/// the moment the last successful poll was SENT (the control plane extended the session's
/// life when it received it): the node's clock never has to agree with the control
/// plane's, only to run at the same rate within the margin.
pub struct HttpLedger {
    client: Arc<SyncClient>,
    valid_until_ms: AtomicI64,
    metrics: Arc<EdgeMetrics>,
    reports: ReportOutbox,
    /// The last lease batch number taken (docs/api.md, `/v1/sync/leases`).
    lease_batch: AtomicU64,
}

impl HttpLedger {
    async fn post_leases(&self, requests: Vec<LeaseRequest>) -> Vec<Result<Grant, LedgerError>> {
        let n = requests.len();
        self.metrics.lease_requests.inc_by(n as u64);
        self.metrics.lease_calls.inc();
        let batch = self.lease_batch.fetch_add(1, Ordering::Relaxed) + 1;
        let client = self.client.clone();
        let answer = blocking(move || {
            client.call(
                "POST",
                "/v1/sync/leases",
                Some(&json!({ "batch": batch, "requests": requests }).to_string()),
                Duration::from_secs(5),
            )
        })
        .await;
        // Sent, and no answer read: the control plane may have granted it. The next
        // report names it lost, and the ledger gives back whatever it granted (no call
        // is forwarded on it). A refusal (400, 401) was never applied, nor a call that
        // found no connection. An answer of errors only (its store failed, perhaps after
        // committing) is named lost too: nothing of it is used, so nothing the node knows
        // of is given back.
        let maybe_applied = match &answer {
            Some(Ok(v)) => v["grants"]
                .as_array()
                .is_none_or(|g| g.len() != n || g.iter().all(|x| x.get("error").is_some())),
            Some(Err(CallError::Unauthorized | CallError::Refused(_) | CallError::Unsent(_))) => {
                false
            }
            Some(Err(CallError::Other(_))) | None => true,
        };
        if maybe_applied {
            self.metrics.lease_batches_lost.inc();
            self.reports.lost_lease(batch);
        }
        let fail = |why: &str| {
            (0..n)
                .map(|_| Err(LedgerError(why.to_string())))
                .collect::<Vec<_>>()
        };
        let out = match answer {
            Some(Ok(v)) => match v["grants"].as_array() {
                Some(grants) if grants.len() == n => grants.iter().map(grant_of).collect(),
                _ => fail("the control plane's lease answer does not match the request"),
            },
            Some(Err(CallError::Unauthorized)) => fail("this node's token was refused"),
            Some(Err(CallError::Other(e) | CallError::Refused(e) | CallError::Unsent(e))) => {
                fail(&e)
            }
            None => fail("lease request task failed"),
        };
        let failed = out.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            static LOG: crate::log_every::LogEvery =
                crate::log_every::LogEvery::new(Duration::from_secs(10));
            if let (Some(Err(e)), Some(others)) = (out.iter().find(|r| r.is_err()), LOG.due()) {
                log::warn!(
                    "{failed} lease requests failed ({others} more failed calls since the last \
                     such line): {}",
                    e.0
                );
            }
        }
        self.metrics.lease_failures.inc_by(failed as u64);
        out
    }
}

/// One grant of a `/v1/sync/leases` answer. `committed` absent (a control plane that does
/// not commit with the grant) is nothing committed; one beyond the grant is no answer.
/// `settled`: the key's settled spend that day, when the control plane sent it.
fn grant_of(g: &Value) -> Result<Grant, LedgerError> {
    let granted = g["granted"].as_i64().filter(|m| *m >= 0);
    let committed = match &g["committed"] {
        Value::Null => Some(0),
        c => c.as_i64(),
    };
    match (granted, committed) {
        (Some(granted), Some(committed)) if (0..=granted).contains(&committed) => Ok(Grant {
            granted: Micros(granted),
            committed: Micros(committed),
            revoked: g["revoked"] == true,
            // Absent from a control plane older than it: nothing known.
            settled: g["settled"].as_i64().filter(|s| *s >= 0).map(Micros),
        }),
        (Some(_), _) => Err(LedgerError(
            "the control plane's lease answer commits more than it grants".into(),
        )),
        _ => Err(LedgerError(
            g["error"].as_str().unwrap_or("lease refused").to_string(),
        )),
    }
}

#[async_trait::async_trait]
impl Ledger for HttpLedger {
    async fn lease(&self, request: LeaseRequest) -> Result<Grant, LedgerError> {
        self.lease_many(vec![request])
            .await
            .pop()
            .unwrap_or_else(|| Err(LedgerError("no answer".into())))
    }

    /// One HTTP round trip per batch of up to `LEASE_BATCH` requests.
    async fn lease_many(&self, requests: Vec<LeaseRequest>) -> Vec<Result<Grant, LedgerError>> {
        let mut out = Vec::with_capacity(requests.len());
        let mut rest = requests;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(LEASE_BATCH));
            out.extend(self.post_leases(rest).await);
            rest = tail;
        }
        out
    }

    /// Hands the reports to the outbox, which sends them as numbered batches: `Ok` even
    /// when the control plane did not answer (the outbox sends the batch again next
    /// round), so the caller never reports the same rows a second time.
    async fn report(&self, reports: Vec<LeaseReport>) -> Result<(), LedgerError> {
        self.reports.send(&self.client, reports).await;
        Ok(())
    }

    /// One HTTP round trip per `COMMIT_BATCH` rows (`WriteAhead` sends one row per key).
    async fn commit(&self, commits: Vec<LeaseCommit>) -> Result<Vec<bool>, LedgerError> {
        let mut out = Vec::with_capacity(commits.len());
        for chunk in commits.chunks(COMMIT_BATCH) {
            let n = chunk.len();
            self.metrics.commit_rows.inc_by(n as u64);
            self.metrics.commit_calls.inc();
            let body = json!({ "commits": chunk }).to_string();
            let client = self.client.clone();
            let answer = blocking(move || {
                client.call(
                    "POST",
                    "/v1/sync/commits",
                    Some(&body),
                    Duration::from_secs(5),
                )
            })
            .await;
            match answer {
                Some(Ok(v)) => match v["committed"].as_array() {
                    Some(a) if a.len() == n => {
                        out.extend(a.iter().map(|b| b.as_bool() == Some(true)));
                    }
                    _ => {
                        return Err(LedgerError(
                            "the control plane's commit answer does not match the request".into(),
                        ))
                    }
                },
                Some(Err(CallError::Unauthorized)) => {
                    return Err(LedgerError("this node's token was refused".into()))
                }
                Some(Err(CallError::Other(e) | CallError::Refused(e) | CallError::Unsent(e))) => {
                    return Err(LedgerError(e))
                }
                None => return Err(LedgerError("commit task failed".into())),
            }
        }
        Ok(out)
    }

    fn leases_valid_until_ms(&self) -> i64 {
        self.valid_until_ms.load(Ordering::Acquire)
    }

    fn gives_back_lost_leases(&self) -> bool {
        true
    }
}

/// Spend reports on their way to the control plane, in batches numbered per session (1,
/// 2, 3…; docs/api.md, `/v1/sync/reports`): one batch in flight at a time, sent again with
/// the same number and body until the control plane answers, so a batch whose answer was
/// lost (a replica killed after its commit, a timeout) is applied once. Rows reported
/// meanwhile wait for the next batch, merged per (budget, key, day) as the proxy's
/// counters merge them: what waits stays one row per key however long the control plane
/// is away.
///
/// Lease batches whose answers were lost (`HttpLedger::post_leases`) are named in the next
/// batches formed (`lost_leases`, up to `LEASE_BATCH` per batch), with or without rows.
#[derive(Default)]
struct ReportOutbox {
    state: tokio::sync::Mutex<Outbox>,
    /// Lease batches named lost by no report batch yet: apart from `state`, whose lock a
    /// report in flight holds for seconds, so a lease call never waits for it.
    lost_leases: std::sync::Mutex<Vec<u64>>,
}

#[derive(Default)]
struct Outbox {
    /// The last batch number taken.
    number: u64,
    /// The batch sent and not answered: its number and body, sent again as they are.
    unanswered: Option<(u64, String)>,
    /// Rows for the next batches, in the order first reported.
    waiting: Vec<LeaseReport>,
    /// Where each (budget, key, day) is in `waiting`.
    index: crate::Map<(Budget, String, i64), usize>,
}

impl Outbox {
    fn add(&mut self, reports: Vec<LeaseReport>) {
        for r in reports {
            let slot = (r.budget, r.key_id.clone(), r.day);
            match self.index.get(&slot) {
                Some(&i) => {
                    let w = &mut self.waiting[i];
                    w.spent = w.spent.saturating_add(r.spent);
                    w.returned = w.returned.saturating_add(r.returned);
                    w.overspent = w.overspent.saturating_add(r.overspent);
                    w.unreserved = w.unreserved.saturating_add(r.unreserved);
                    w.return_uncommitted |= r.return_uncommitted;
                }
                None => {
                    self.index.insert(slot, self.waiting.len());
                    self.waiting.push(r);
                }
            }
        }
    }

    /// The batch to send: the unanswered one, else the next `LEASE_BATCH` rows waiting
    /// under a new number, naming up to `LEASE_BATCH` of the lease batches in `lost`
    /// (taken from it); `None` when nothing waits.
    fn batch(&mut self, lost: &std::sync::Mutex<Vec<u64>>) -> Option<(u64, String)> {
        if self.unanswered.is_none() {
            let lost: Vec<u64> = {
                let mut all = lost.lock().unwrap_or_else(|p| p.into_inner());
                let n = all.len().min(LEASE_BATCH);
                all.drain(..n).collect()
            };
            if self.waiting.is_empty() && lost.is_empty() {
                return None;
            }
            let rest = self.waiting.split_off(self.waiting.len().min(LEASE_BATCH));
            let rows = std::mem::replace(&mut self.waiting, rest);
            self.index = (self.waiting.iter().enumerate())
                .map(|(i, r)| ((r.budget, r.key_id.clone(), r.day), i))
                .collect();
            self.number += 1;
            let mut body = json!({ "batch": self.number, "reports": rows });
            if !lost.is_empty() {
                body["lost_leases"] = json!(lost);
            }
            self.unanswered = Some((self.number, body.to_string()));
        }
        self.unanswered.clone()
    }
}

impl ReportOutbox {
    /// Names lease batch `number` lost in the next report batch formed.
    fn lost_lease(&self, number: u64) {
        (self.lost_leases.lock().unwrap_or_else(|p| p.into_inner())).push(number);
    }

    /// Adds `reports` to what waits and sends batches until nothing waits or one is not
    /// answered (kept for the next call). The lock is held across each send: one report
    /// request in flight, whoever calls.
    async fn send(&self, client: &Arc<SyncClient>, reports: Vec<LeaseReport>) {
        let mut outbox = self.state.lock().await;
        outbox.add(reports);
        while let Some((number, body)) = outbox.batch(&self.lost_leases) {
            let client = client.clone();
            let answer = blocking(move || {
                client.call(
                    "POST",
                    "/v1/sync/reports",
                    Some(&body),
                    Duration::from_secs(5),
                )
            })
            .await;
            match answer {
                Some(Ok(_)) => outbox.unanswered = None,
                // Kept and sent again, like any failure: its rows are spend the ledger
                // must settle (overspent beyond any lease included), so it is never
                // dropped. A refusal that lasts (a control plane older than this node,
                // which does not know the batch number) holds every later report behind
                // it: the node's spend stays held against the caps, never lost.
                Some(Err(CallError::Refused(e))) => {
                    if let Some(others) = REPORT_FAILED.due() {
                        log::error!(
                            "the control plane refused spend report batch {number} ({e}): \
                             will send it again ({others} more failed tries since the last \
                             such line)"
                        );
                    }
                    return;
                }
                Some(Err(e)) => {
                    if let Some(others) = REPORT_FAILED.due() {
                        log::error!(
                            "spend report batch {number} failed, will send it again ({others} more failed tries since the last such line): {e}"
                        );
                    }
                    return;
                }
                None => {
                    if let Some(others) = REPORT_FAILED.due() {
                        log::error!(
                            "spend report batch {number} failed, will send it again ({others} more failed tries since the last such line)"
                        );
                    }
                    return;
                }
            }
        }
    }
}

/// Audit events from this node, sent to the control plane in batches by one thread. The
/// buffer is bounded: beyond it events are dropped and counted
/// (`keybrake_audit_dropped_total`), never allowed to block a request. Under
/// `audit.durability: strict` a response's event is recorded with `record_durably`, which
/// waits until the control plane answered that the batch holding it is written.
pub struct EdgeAudit {
    tx: std::sync::mpsc::SyncSender<Queued>,
    counts: AuditCounts,
    strict: bool,
    /// Set by the sender, read by `is_failing`.
    clocks: Arc<SendClocks>,
}

/// How long sending may fail before strict-mode responses stop waiting for it.
const AUDIT_FAILING_FAST_AFTER_MS: i64 = 1000;

/// How long one batch may wait for the control plane's answer before a strict node takes
/// its audit trail for failing: far above a healthy control plane's commit (milliseconds;
/// a loaded disk's worst seen 4.5 s is why a response itself waits 5 s).
const AUDIT_UNANSWERED_FAILING_MS: i64 = 2000;

/// An event waiting to be sent, and for a strict-mode event what its response waits on.
struct Queued {
    event: AuditEvent,
    outcome: Option<Arc<Outcome>>,
}

/// Whether a strict-mode event reached the control plane: set once by the sender (true:
/// the control plane answered that its batch is written; false: dropped), awaited by the
/// worker that holds the event's response.
#[derive(Default)]
struct Outcome {
    written: std::sync::Mutex<Option<bool>>,
    settled: std::sync::Condvar,
}

impl Outcome {
    fn set(&self, written: bool) {
        *self.written.lock().unwrap_or_else(|p| p.into_inner()) = Some(written);
        self.settled.notify_all();
    }

    /// True once the event is written; false when it was dropped or `timeout` passed.
    fn wait(&self, timeout: Duration) -> bool {
        let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let (written, _) = self
            .settled
            .wait_timeout_while(written, timeout, |w| w.is_none())
            .unwrap_or_else(|p| p.into_inner());
        written.unwrap_or(false)
    }
}

/// The node's audit events recorded and not yet settled (accepted by the control plane,
/// or dropped): read by `flush`, shown as `keybrake_audit_queue_depth`.
#[derive(Clone)]
struct AuditCounts {
    pending: Arc<AtomicU64>,
    depth: IntGauge,
    dropped: IntCounter,
}

impl AuditCounts {
    fn recorded(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.depth.inc();
    }

    /// `n` events the control plane took.
    fn settled(&self, n: u64) {
        self.pending.fetch_sub(n, Ordering::AcqRel);
        self.depth.sub(n as i64);
    }

    /// `n` events given up on: settled, and counted as dropped.
    fn dropped(&self, n: u64) {
        self.settled(n);
        self.dropped.inc_by(n);
    }
}

impl EdgeAudit {
    /// `cut_off`: set while the control plane refuses the node's token (the node was
    /// deleted); once a batch has been refused for `give_up` with it set, what is left to
    /// send is dropped, and counted.
    fn start(
        client: Arc<SyncClient>,
        depth: IntGauge,
        dropped: IntCounter,
        cut_off: Arc<AtomicBool>,
        give_up: Duration,
        strict: bool,
    ) -> Arc<EdgeAudit> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Queued>(AUDIT_BUFFER);
        let counts = AuditCounts {
            pending: Arc::new(AtomicU64::new(0)),
            depth,
            dropped,
        };
        let sender = counts.clone();
        let clocks = Arc::new(SendClocks::default());
        let sending = clocks.clone();
        std::thread::Builder::new()
            .name("edge-audit".into())
            .spawn(move || audit_sender(client, rx, sender, cut_off, give_up, &sending))
            .expect("spawn the audit thread");
        Arc::new(EdgeAudit {
            tx,
            counts,
            strict,
            clocks,
        })
    }

    /// Waits until every recorded event reached the control plane (or was given up on),
    /// at most `timeout`; `Err` with how many are still unsent after it.
    fn flush(&self, timeout: Duration) -> Result<(), u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self.counts.pending.load(Ordering::Acquire);
            if pending == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(pending);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl EdgeAudit {
    /// Queues `event` (dropped and counted when the buffer is full): false when dropped.
    fn queue(&self, event: AuditEvent, outcome: Option<Arc<Outcome>>) -> bool {
        self.counts.recorded();
        let queued = self.tx.try_send(Queued { event, outcome }).is_ok();
        if !queued {
            self.counts.dropped(1);
        }
        queued
    }
}

impl AuditSink for EdgeAudit {
    fn record(&self, event: AuditEvent) {
        self.queue(event, None);
    }

    fn is_strict(&self) -> bool {
        self.strict
    }

    /// Sending audit batches has failed for `AUDIT_FAILING_FAST_AFTER_MS`, or one batch has
    /// waited `AUDIT_UNANSWERED_FAILING_MS` for an answer: a strict node forwards nothing
    /// (503 `audit_unavailable`) until the control plane takes a batch again (the
    /// refusals' own events are sent meanwhile).
    fn is_failing(&self) -> bool {
        let now = mono_ms();
        let over = |since: &AtomicI64, bound: i64| {
            let since = since.load(Ordering::Acquire);
            since > 0 && now - since >= bound
        };
        over(&self.clocks.failing_since_ms, AUDIT_FAILING_FAST_AFTER_MS)
            || over(
                &self.clocks.unanswered_since_ms,
                AUDIT_UNANSWERED_FAILING_MS,
            )
    }

    /// Waits for the control plane's answer that the batch holding `event` is written
    /// (committed there, durable as the control plane's own `audit.durability` makes its
    /// writes). The sender sends as soon as an event waits, with whatever queued meanwhile,
    /// so concurrent responses share one round trip.
    fn record_durably(&self, event: AuditEvent, timeout: Duration) -> bool {
        if self.is_failing() {
            // Queued all the same: it is sent once the control plane is back.
            self.queue(event, None);
            return false;
        }
        let outcome = Arc::new(Outcome::default());
        self.queue(event, Some(outcome.clone())) && outcome.wait(timeout)
    }
}

/// Appends one serialized event to a batch body being built.
fn push_event(body: &mut String, n: &mut u64, event: &str) {
    if *n > 0 {
        body.push(',');
    }
    body.push_str(event);
    *n += 1;
}

/// What the audit sender tells `EdgeAudit::is_failing`.
#[derive(Default)]
struct SendClocks {
    /// Since when (`mono_ms`) sending has been failing, 0 while it works: a strict-mode
    /// response is then withheld at once rather than after the whole wait, so a control
    /// plane that is down does not hold a worker thread per request.
    failing_since_ms: AtomicI64,
    /// Since when (`mono_ms`) the batch being sent has waited for the control plane's
    /// answer, 0 between batches: a control plane that takes connections and stops
    /// answering (frozen, partitioned) fails a send only at its 5 s timeout.
    unanswered_since_ms: AtomicI64,
}

fn audit_sender(
    client: Arc<SyncClient>,
    rx: std::sync::mpsc::Receiver<Queued>,
    counts: AuditCounts,
    cut_off: Arc<AtomicBool>,
    give_up: Duration,
    clocks: &SendClocks,
) {
    let failing_since_ms = &clocks.failing_since_ms;
    // Each event is serialized once, straight into the batch's body text. One over the
    // bound would make a batch the control plane refuses: dropped instead (see
    // AUDIT_EVENT_MAX_BYTES; `proxy::audit::bounded` makes this unreachable).
    let json = |q: Queued| {
        let text = match serde_json::to_string(&q.event) {
            Ok(text) if text.len() <= AUDIT_EVENT_MAX_BYTES => return Some((text, q.outcome)),
            Ok(text) => format!(
                "an audit event of {} bytes is over the {AUDIT_EVENT_MAX_BYTES}-byte bound: dropped",
                text.len()
            ),
            Err(err) => format!("an audit event could not be serialized ({err}): dropped"),
        };
        log::warn!("{text}");
        counts.dropped(1);
        if let Some(outcome) = q.outcome {
            outcome.set(false);
        }
        None
    };
    let mut body = String::with_capacity(AUDIT_BATCH_BYTES + AUDIT_EVENT_MAX_BYTES);
    let mut carry: Option<(String, Option<Arc<Outcome>>)> = None;
    // The strict-mode events of the batch being built: told how it ended.
    let mut waiting: Vec<Arc<Outcome>> = Vec::new();
    // Batches are numbered per session, one in flight at a time: the control plane writes
    // a batch sent again (its answer lost) only once. A batch given up on leaves its
    // number unused; the next is still higher, which is all the control plane asks.
    let mut number: u64 = 0;
    loop {
        number += 1;
        body.clear();
        body.push_str(&format!(r#"{{"batch":{number},"events":["#));
        let mut n: u64 = 0;
        if let Some((event, outcome)) = carry.take() {
            push_event(&mut body, &mut n, &event);
            waiting.extend(outcome);
        }
        // Sent as soon as there is an event, with whatever else is queued by then (up to
        // the batch size): under load, batches form while the previous one is in flight,
        // and an event reaches the control plane within one round trip otherwise. The
        // control plane settles a dead node's leases from this trail (see
        // docs/architecture.md), so the sooner it arrives the less can be missed.
        while n == 0 {
            match rx.recv() {
                Ok(q) => {
                    if let Some((event, outcome)) = json(q) {
                        push_event(&mut body, &mut n, &event);
                        waiting.extend(outcome);
                    }
                }
                Err(_) => return,
            }
        }
        while body.len() < AUDIT_BATCH_BYTES {
            match rx.try_recv() {
                Ok(q) => {
                    let Some((event, outcome)) = json(q) else {
                        continue;
                    };
                    if body.len() + event.len() + 1 > AUDIT_BATCH_BYTES {
                        carry = Some((event, outcome));
                        break;
                    }
                    push_event(&mut body, &mut n, &event);
                    waiting.extend(outcome);
                }
                Err(_) => break,
            }
        }
        body.push_str("]}");
        // Kept and sent again until the control plane takes it: nodes lose audit events
        // only when their buffer overflows, the control plane refuses a batch for good, or
        // the process dies (the first two counted).
        // One warning when sending starts failing, then one a minute while it does (the
        // batch is tried every 500 ms).
        let mut warned: Option<std::time::Instant> = None;
        let mut refused_since: Option<std::time::Instant> = None;
        loop {
            let sent_at = mono_ms().max(1);
            clocks.unanswered_since_ms.store(sent_at, Ordering::Release);
            let answer = client.call(
                "POST",
                "/v1/sync/audit",
                Some(&body),
                Duration::from_secs(5),
            );
            clocks.unanswered_since_ms.store(0, Ordering::Release);
            match answer {
                Ok(_) => {
                    failing_since_ms.store(0, Ordering::Release);
                    if warned.is_some() {
                        log::info!("audit events reach the control plane again");
                    }
                    counts.settled(n);
                    waiting.drain(..).for_each(|o| o.set(true));
                    break;
                }
                // Sending the same body again would be refused again, forever, and every
                // later event would wait behind it: given up on, and the next batch sent.
                Err(CallError::Refused(e)) => {
                    failing_since_ms.store(0, Ordering::Release);
                    log::warn!(
                        "the control plane refused audit batch {number} for good ({e}): \
                         its {n} events are dropped"
                    );
                    counts.dropped(n);
                    waiting.drain(..).for_each(|o| o.set(false));
                    break;
                }
                // The node was deleted: its token refused here for `give_up` (longer than
                // a replica takes to learn of a new node) and by the sync loop too. Its
                // events can never be written: dropped and counted, not held forever out
                // of sight.
                Err(CallError::Unauthorized)
                    if cut_off.load(Ordering::Acquire)
                        && refused_since
                            .get_or_insert_with(std::time::Instant::now)
                            .elapsed()
                            >= give_up =>
                {
                    static ONCE: std::sync::Once = std::sync::Once::new();
                    ONCE.call_once(|| {
                        log::error!(
                            "the control plane refused this node's token: its audit events \
                             not yet sent are dropped (keybrake_audit_dropped_total); stop a \
                             node before deleting it to keep them"
                        )
                    });
                    counts.dropped(n);
                    waiting.drain(..).for_each(|o| o.set(false));
                    // Given up on, not failing: the next batch is judged on its own.
                    failing_since_ms.store(0, Ordering::Release);
                    break;
                }
                Err(e) => {
                    // Failing since the send began: a send that timed out has been
                    // unanswered all along (no moment between the two is not failing).
                    let _ = failing_since_ms.compare_exchange(
                        0,
                        sent_at,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        log::warn!(
                            "cannot send audit events to the control plane (trying again \
                             every 500 ms): {e}"
                        );
                        warned = Some(std::time::Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
}

/// How long a node's audit batch is refused for its token, the node cut off, before its
/// events are given up on: longer than a control replica takes to learn of a new node.
const AUDIT_REFUSED_GIVE_UP: Duration = Duration::from_secs(30);

/// A spend report that fails is tried again every round until the control plane is back:
/// one line per 10 s.
static REPORT_FAILED: crate::log_every::LogEvery =
    crate::log_every::LogEvery::new(Duration::from_secs(10));

/// The node's view of the control plane: last successful sync, and whether it was cut
/// off (its token refused).
struct SyncState {
    /// As of when the node's view is known current (read by the proxy on every request).
    clock: Arc<SyncClock>,
    ever_synced: AtomicBool,
    cut_off: Arc<AtomicBool>,
    /// The control plane took this node for dead and gave its leases back: it stops.
    lapsed: AtomicBool,
    /// Read by the proxy on every request with `clock` (`proxy::fresh`).
    stale: Arc<AtomicBool>,
    /// The node's refusing for staleness was logged (so is its end).
    stale_logged: AtomicBool,
}

impl SyncState {
    fn since_sync(&self) -> Duration {
        self.clock.since_sync()
    }

    fn is_fresh(&self) -> bool {
        self.ever_synced.load(Ordering::Acquire)
            && !self.cut_off.load(Ordering::Acquire)
            && !self.lapsed.load(Ordering::Acquire)
            && !self.clock.too_old()
    }

    /// Sets the flag the proxy reads; logs when the node starts refusing for staleness
    /// (a cut-off or a lapse log their own line) and when it serves again.
    fn refresh_flag(&self) {
        let stale = !self.is_fresh();
        let was = self.stale.swap(stale, Ordering::AcqRel);
        let too_old = self.ever_synced.load(Ordering::Acquire)
            && !self.cut_off.load(Ordering::Acquire)
            && !self.lapsed.load(Ordering::Acquire);
        if stale && !was && too_old {
            self.stale_logged.store(true, Ordering::Release);
            log::error!(
                "no sync with the control plane for {:.1}s (max_staleness {:?}): refusing every \
                 proxied request with 503 control_unreachable until it syncs again",
                self.since_sync().as_secs_f64(),
                self.clock.max_staleness()
            );
        } else if !stale && was && self.stale_logged.swap(false, Ordering::AcqRel) {
            log::info!("in sync with the control plane again: serving");
        }
    }
}

/// Applies one long-poll answer to what the proxy reads. Returns the answer's version.
fn apply(answer: &Value, published: &Published) -> Result<(String, u64)> {
    let epoch = answer["epoch"]
        .as_str()
        .ok_or_else(|| anyhow!("no epoch"))?
        .to_string();
    let version = answer["version"]
        .as_u64()
        .ok_or_else(|| anyhow!("no version"))?;
    let revoked: Vec<(String, i64)> = serde_json::from_value(answer["revoked"].clone())?;
    let mut changed = !revoked.is_empty();
    if answer["full"].as_bool() == Some(true) {
        let filter = RevocationFilter::with_capacity(revoked.len().max(1024));
        for (id, exp) in &revoked {
            filter.insert(id, *exp);
        }
        published.revocations.store(Arc::new(filter));
        changed = true;
    } else {
        let filter = published.revocations.load();
        for (id, exp) in &revoked {
            filter.insert(id, *exp);
        }
        // Only this thread inserts: the rebuilt filter misses nothing.
        if filter.is_over_capacity() {
            published.revocations.store(Arc::new(filter.grown()));
        }
    }
    Metrics::global()
        .revoked_keys
        .set(published.revocations.load().len() as i64);
    if !answer["jwks"].is_null() {
        let jwks: crate::token::Jwks = serde_json::from_value(answer["jwks"].clone())?;
        published.verifier.store(Arc::new(Verifier::new(&jwks)));
        changed = true;
    }
    if let Some(tenants) = answer["credentials"].as_object() {
        let mut map = Credentials::default();
        for (tenant, vendors) in tenants {
            let entry: &mut crate::Map<String, Secret> = map.entry(tenant.clone()).or_default();
            for (vendor, secret) in vendors.as_object().into_iter().flatten() {
                if let Some(s) = secret.as_str() {
                    entry.insert(vendor.clone(), Secret::new(s.to_string()));
                }
            }
        }
        published.credentials.store(Arc::new(map));
        changed = true;
    }
    if changed {
        published.generation.fetch_add(1, Ordering::AcqRel);
    }
    Ok((epoch, version))
}

/// Exit status of a node the control plane took for dead (EX_TEMPFAIL): started again by
/// its service manager, it says hello with a new session and serves.
const LAPSED_EXIT: i32 = 75;

/// The long-poll loop, on its own thread, for the life of the process.
/// The wait before sync try `failures + 1`: 200 ms, doubling to at most 1 s (a node is
/// back within 2 s of the control plane), less up to a fifth at random, so a fleet that
/// lost the control plane together does not poll it in step while it recovers.
fn retry_after(failures: u32) -> Duration {
    let base = Duration::from_millis(200)
        .saturating_mul(1 << failures.saturating_sub(1).min(3))
        .min(Duration::from_secs(1));
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    base - base / 5 * u32::from(byte[0]) / 255
}

/// Two changes of the control plane's epoch this close together: its answers come from
/// different processes in turn.
const EPOCH_FLAP: Duration = Duration::from_secs(5);

/// The control plane's epoch changed twice within `EPOCH_FLAP`: polls spread over
/// replicas (each with its own epoch) by a load balancer are each answered at once with
/// a whole snapshot, so the node would poll in a loop. Said, and the next poll waits.
fn epoch_flapping() {
    static LOG: crate::log_every::LogEvery =
        crate::log_every::LogEvery::new(Duration::from_secs(60));
    if LOG.due().is_some() {
        log::warn!(
            "the control plane's answers come from different processes in turn (its epoch \
             changed twice within {} s): each node's polls must reach one replica (sticky \
             sessions at the load balancer, or one replica's address); polling at most \
             twice a second meanwhile",
            EPOCH_FLAP.as_secs()
        );
    }
    std::thread::sleep(Duration::from_millis(500));
}

fn sync_loop(
    client: Arc<SyncClient>,
    published: Arc<Published>,
    ledger: Arc<HttpLedger>,
    state: Arc<SyncState>,
    metrics: Arc<EdgeMetrics>,
    mut epoch: String,
    mut version: u64,
) {
    // Shorter than the staleness limit, so an idle but healthy node never goes stale.
    let wait = (state.clock.max_staleness() / 3)
        .clamp(Duration::from_millis(200), Duration::from_secs(10));
    let mut failures = 0u32;
    let mut last_expiry_sweep = Instant::now();
    let mut epoch_changed_at: Option<Instant> = None;
    loop {
        let sent_mono_ms = mono_ms();
        let sent = state.clock.now();
        let path = format!(
            "/v1/sync/snapshot?epoch={}&since={version}&wait_ms={}",
            percent_encoding::utf8_percent_encode(&epoch, percent_encoding::NON_ALPHANUMERIC),
            wait.as_millis()
        );
        match client.call("GET", &path, None, wait + Duration::from_secs(5)) {
            Ok(answer) => match apply(&answer, &published) {
                Ok((e, v)) => {
                    if failures > 0 {
                        log::info!("synced with the control plane again");
                    }
                    // A refusal from a replica that had yet to learn of this node (not a
                    // deletion: a deleted node's token is refused everywhere).
                    if state.cut_off.swap(false, Ordering::AcqRel) {
                        log::info!("the control plane accepts this node's token again");
                    }
                    failures = 0;
                    let mut flapping = false;
                    if e != epoch {
                        let now = Instant::now();
                        flapping = epoch_changed_at.is_some_and(|at| now - at < EPOCH_FLAP);
                        epoch_changed_at = Some(now);
                    }
                    epoch = e;
                    version = v;
                    metrics.snapshot_version.set(v as i64);
                    let valid_for = answer["lease_valid_for_ms"].as_i64().unwrap_or(0);
                    let until = if answer["leases_lapsed"].as_bool() == Some(true) {
                        if !state.lapsed.swap(true, Ordering::AcqRel) {
                            log::error!(
                                "the control plane took this node for dead (no poll for \
                                 longer than the lease lifetime) and gave its leases back: \
                                 stopping, so that the service manager starts it again \
                                 with a new session (exit status {LAPSED_EXIT})"
                            );
                            // The graceful stop of SIGTERM: audit events sent, then exit.
                            // SAFETY: kill(2) on this process, no memory involved.
                            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                        }
                        0
                    } else {
                        sent_mono_ms + valid_for
                    };
                    if ledger.valid_until_ms.load(Ordering::Acquire) != 0 {
                        ledger.valid_until_ms.fetch_max(until, Ordering::AcqRel);
                    }
                    if until == 0 {
                        ledger.valid_until_ms.store(0, Ordering::Release);
                    }
                    // Current as of when the answer was built (it carries every change up
                    // to then; a change wakes a waiting poll at once): at least `held_ms`
                    // (how long the control plane held the poll) after it was sent. Not
                    // as of its arrival: an answer delayed on the way (a partition that
                    // heals) is older than that, and may miss a revocation.
                    let held = Duration::from_millis(answer["held_ms"].as_u64().unwrap_or(0));
                    state
                        .clock
                        .synced_as_of((sent + held).min(state.clock.now()));
                    state.ever_synced.store(true, Ordering::Release);
                    state.refresh_flag();
                    if flapping {
                        epoch_flapping();
                    }
                }
                Err(e) => {
                    log::error!("unreadable snapshot from the control plane: {e:#}");
                    std::thread::sleep(Duration::from_millis(500));
                }
            },
            Err(CallError::Unauthorized) => {
                if !state.cut_off.swap(true, Ordering::AcqRel) {
                    log::error!(
                        "the control plane refused this node's token (node deleted?): \
                         refusing every request"
                    );
                }
                state.refresh_flag();
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(CallError::Other(e) | CallError::Refused(e) | CallError::Unsent(e)) => {
                failures += 1;
                if failures == 1 || failures % 20 == 0 {
                    log::warn!("cannot sync with the control plane ({failures} tries): {e}");
                }
                std::thread::sleep(retry_after(failures));
            }
        }
        if state.cut_off.load(Ordering::Acquire) {
            continue;
        }
        if last_expiry_sweep.elapsed() > Duration::from_secs(60) {
            last_expiry_sweep = Instant::now();
            let now = crate::token::now_secs();
            let current = published.revocations.load();
            if current.has_past_keeping(now) {
                let next = current.without_expired(now);
                Metrics::global().revoked_keys.set(next.len() as i64);
                published.revocations.store(Arc::new(next));
            }
        }
    }
}

/// Keeps the staleness flag and the lag gauge current (every 50 ms).
fn freshness_loop(state: Arc<SyncState>, lag: prometheus::Gauge) {
    loop {
        state.refresh_flag();
        lag.set(state.since_sync().as_secs_f64());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `/metrics`, `/healthz` and `/readyz` (200 only while the node is fresh) on the metrics
/// listener.
fn health_server(addr: std::net::SocketAddr, state: Arc<SyncState>) -> Result<()> {
    let app = crate::serve::health_routes(crate::metrics::MetricsOf::Edge, move || {
        let state = state.clone();
        async move {
            if state.is_fresh() {
                (true, json!({"status": "ready"}))
            } else {
                let lag = state.since_sync().as_secs_f64();
                // Refused by the control plane (the node deleted, its token revoked), or
                // not synced within the staleness limit.
                let refused = state.cut_off.load(Ordering::Acquire);
                let body = json!({
                    "status": "not_ready",
                    "code": "control_unreachable",
                    "node_token_refused": refused,
                    "leases_lapsed": state.lapsed.load(Ordering::Acquire),
                    "seconds_since_sync": lag,
                });
                (false, body)
            }
        }
    });
    crate::serve::metrics_listener(addr, "edge-metrics", app)
}

/// Says hello to the control plane: the token must be accepted before anything starts.
fn hello(client: &SyncClient, url: &str, token_file: &Path) -> Result<String> {
    match client.call("POST", "/v1/sync/hello", None, Duration::from_secs(10)) {
        Ok(v) => Ok(v["node_id"].as_str().unwrap_or("?").to_string()),
        Err(CallError::Unauthorized) => bail!(
            "the control plane at {url} refused the node token in {} (wrong token, or the \
             node was deleted; create one with `keybrake node create NAME`)",
            token_file.display()
        ),
        Err(CallError::Other(e) | CallError::Refused(e) | CallError::Unsent(e)) => {
            let text = e.to_string();
            let hint = match crate::tls::connect_hint(url, &text) {
                "" if text.contains("answered 404") => {
                    " (is --control-url the control API's address, not a proxy's or a \
                     metrics listener's?)"
                }
                hint => hint,
            };
            bail!("cannot reach the control plane at {url}: {e}{hint}")
        }
    }
}

/// `keybrake proxy`: runs until stopped.
pub fn run_edge(
    config: Config,
    opts: EdgeOptions,
    upgrade: bool,
    ready: Option<std::fs::File>,
) -> Result<()> {
    config.check_files(true, false)?;
    if !upgrade {
        crate::serve::check_free(&[
            (config.proxy_listen, "proxy"),
            (config.metrics_listen, "metrics"),
        ])?;
    }
    let client = Arc::new(SyncClient::new(&opts)?);
    let node_id = hello(&client, &opts.control_url, &opts.node_token_file)?;
    let metrics = Metrics::global();
    let edge_metrics = Arc::new(EdgeMetrics::register()?);
    let published = Arc::new(Published::empty());
    let ledger = Arc::new(HttpLedger {
        client: client.clone(),
        valid_until_ms: AtomicI64::new(0),
        metrics: edge_metrics.clone(),
        reports: ReportOutbox::default(),
        lease_batch: AtomicU64::new(0),
    });
    let stale = Arc::new(AtomicBool::new(true));
    let clock = Arc::new(SyncClock::new(opts.max_staleness));
    let state = Arc::new(SyncState {
        clock: clock.clone(),
        ever_synced: AtomicBool::new(false),
        cut_off: Arc::new(AtomicBool::new(false)),
        lapsed: AtomicBool::new(false),
        stale: stale.clone(),
        stale_logged: AtomicBool::new(false),
    });
    // The first snapshot, before the proxy listens: a fresh node never serves without keys.
    let sent_mono_ms = mono_ms();
    let first = client
        .call("GET", "/v1/sync/snapshot", None, Duration::from_secs(10))
        .map_err(|e| match e {
            CallError::Unauthorized => anyhow!("the control plane refused the node token"),
            CallError::Other(e) | CallError::Refused(e) | CallError::Unsent(e) => {
                anyhow!("cannot fetch the first snapshot: {e}")
            }
        })?;
    let (epoch, version) = apply(&first, &published)?;
    let valid_for = first["lease_valid_for_ms"].as_i64().unwrap_or(0);
    ledger
        .valid_until_ms
        .store(sent_mono_ms + valid_for, Ordering::Release);
    state.ever_synced.store(true, Ordering::Release);
    state.refresh_flag();
    edge_metrics.snapshot_version.set(version as i64);
    log::info!(
        "edge node {node_id} synced with {} (snapshot {version})",
        opts.control_url
    );
    {
        let (c, p, l, s, m) = (
            client.clone(),
            published.clone(),
            ledger.clone(),
            state.clone(),
            edge_metrics.clone(),
        );
        std::thread::Builder::new()
            .name("edge-sync".into())
            .spawn(move || sync_loop(c, p, l, s, m, epoch, version))?;
        let (s, lag) = (state.clone(), metrics.sync_lag.clone());
        std::thread::Builder::new()
            .name("edge-fresh".into())
            .spawn(move || freshness_loop(s, lag))?;
    }
    health_server(config.metrics_listen, state.clone())?;
    log::info!(
        "metrics, /healthz and /readyz on http://{}",
        config.metrics_listen
    );
    let audit = EdgeAudit::start(
        client,
        metrics.audit_queue_depth.clone(),
        metrics.audit_dropped.clone(),
        state.cut_off.clone(),
        AUDIT_REFUSED_GIVE_UP,
        config.audit_durability == crate::config::AuditDurability::Strict,
    );
    let exit_audit = audit.clone();
    let exit_state = state.clone();
    let exit_queue = metrics.audit_queue_depth.clone();
    let parts = crate::serve::ProxyParts {
        ledger,
        audit,
        published,
        staleness: crate::proxy::fresh::Staleness::watched(stale, clock),
        on_drain: Box::new(|| {}),
        on_exit: Box::new(move || {
            if exit_state.cut_off.load(Ordering::Acquire) {
                // Its token is refused: what is buffered can never be sent.
                log::error!(
                    "{} audit events still buffered at exit are lost: the control plane \
                     refuses this node's token",
                    exit_queue.get()
                );
            } else if let Err(unsent) = exit_audit.flush(Duration::from_secs(5)) {
                log::error!(
                    "{unsent} audit events still buffered at exit could not be sent in 5 s: \
                     lost (the control plane unreachable?)"
                );
            }
            if exit_state.lapsed.load(Ordering::Acquire) {
                log::info!(
                    "keybrake stopped (exit status {LAPSED_EXIT}: start again for a new session)"
                );
                std::process::exit(LAPSED_EXIT);
            }
        }),
    };
    crate::serve::run_proxy(config, parts, upgrade, ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    use crate::proxy::audit::tests::event;

    /// A control plane on 127.0.0.1 that answers the calls it is sent (audit or report
    /// batches) with the statuses of `answers` in turn, then 200, and hands over each body
    /// it read.
    fn fake_control(answers: Vec<u16>) -> (Arc<SyncClient>, std::sync::mpsc::Receiver<Value>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut answers = answers.into_iter();
            for stream in listener.incoming() {
                let mut reader = BufReader::new(stream.unwrap());
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    match line.trim_end().split_once(':') {
                        Some((name, value)) if name.eq_ignore_ascii_case("content-length") => {
                            len = value.trim().parse().unwrap();
                        }
                        _ if line.trim_end().is_empty() => break,
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let _ = tx.send(serde_json::from_slice::<Value>(&body).unwrap());
                let status = answers.next().unwrap_or(200);
                let answer = if status == 200 {
                    r#"{"recorded":1}"#
                } else {
                    r#"{"code":"some_error"}"#
                };
                write!(
                    reader.get_mut(),
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                )
                .unwrap();
            }
        });
        (Arc::new(client_at(base)), rx)
    }

    /// A node's client of the control plane at `base`.
    fn client_at(base: String) -> SyncClient {
        SyncClient {
            base,
            token: Secret::new("kbn_test"),
            session: "s_test".into(),
            agent: ureq::AgentBuilder::new().build(),
            clock_offset: ClockOffset::unregistered(),
        }
    }

    #[test]
    fn the_clock_offset_is_read_from_the_control_planes_date() {
        let offset = ClockOffset::unregistered();
        let ten_ago = std::time::SystemTime::now() - Duration::from_secs(10);
        offset.observe(Some(&httpdate::fmt_http_date(ten_ago)));
        let read = offset.gauge.get();
        assert!((8.9..=10.6).contains(&read), "{read}");
        offset.observe(Some(&httpdate::fmt_http_date(std::time::SystemTime::now())));
        assert!(offset.gauge.get().abs() <= 1.1, "{}", offset.gauge.get());
        // No date, or an unreadable one: the last estimate stays.
        offset.observe(None);
        offset.observe(Some("yesterday"));
        assert!(offset.gauge.get().abs() <= 1.1);
    }

    /// A loopback port nothing listens on.
    fn unused_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn counters() -> (IntGauge, IntCounter) {
        (
            IntGauge::new("depth", "test").unwrap(),
            IntCounter::new("dropped", "test").unwrap(),
        )
    }

    const WAIT: Duration = Duration::from_secs(10);

    /// A node's audit sender to `client`, giving up at once on a token refused while
    /// `cut_off`.
    fn audit_to(
        client: Arc<SyncClient>,
        depth: &IntGauge,
        dropped: &IntCounter,
        cut_off: Arc<AtomicBool>,
    ) -> Arc<EdgeAudit> {
        EdgeAudit::start(
            client,
            depth.clone(),
            dropped.clone(),
            cut_off,
            Duration::ZERO,
            false,
        )
    }

    #[test]
    fn an_audit_batch_refused_for_good_is_dropped_and_the_next_is_numbered_higher() {
        let (client, bodies) = fake_control(vec![413]);
        let (depth, dropped) = counters();
        let audit = audit_to(client, &depth, &dropped, Default::default());
        audit.record(event("/stripe/one"));
        let first = bodies.recv_timeout(WAIT).unwrap();
        assert_eq!(first["batch"], 1);
        audit.record(event("/stripe/two"));
        let second = bodies.recv_timeout(WAIT).unwrap();
        assert_eq!(second["batch"], 2);
        assert_eq!(second["events"][0]["path"], "/stripe/two");
        assert_eq!(audit.flush(WAIT), Ok(()));
        assert_eq!((dropped.get(), depth.get()), (1, 0));
        // Nothing is sent again.
        assert!(bodies.recv_timeout(Duration::from_millis(800)).is_err());
    }

    #[test]
    fn audit_batches_of_a_deleted_node_are_dropped_and_counted_not_held_out_of_sight() {
        // A 401 while the node is not known to be cut off (a replica yet to learn of a
        // new node): sent again. Once the sync loop saw the token refused: dropped.
        let (client, bodies) = fake_control(vec![401, 401, 401]);
        let (depth, dropped) = counters();
        let cut_off = Arc::new(AtomicBool::new(false));
        let audit = audit_to(client, &depth, &dropped, cut_off.clone());
        audit.record(event("/stripe/one"));
        let first = bodies.recv_timeout(WAIT).unwrap();
        assert_eq!(bodies.recv_timeout(WAIT).unwrap(), first, "sent again");
        cut_off.store(true, Ordering::Release);
        assert_eq!(audit.flush(WAIT), Ok(()));
        assert_eq!((dropped.get(), depth.get()), (1, 0));
    }

    /// A strict-mode node's audit sender to `client`.
    fn strict_audit_to(
        client: Arc<SyncClient>,
        depth: &IntGauge,
        dropped: &IntCounter,
    ) -> Arc<EdgeAudit> {
        EdgeAudit::start(
            client,
            depth.clone(),
            dropped.clone(),
            Default::default(),
            Duration::ZERO,
            true,
        )
    }

    #[test]
    fn a_strict_event_is_durable_only_once_the_control_plane_took_its_batch() {
        // Batch 1: refused for now (sent again 500 ms later), then taken. Batch 2: refused
        // for good, its event dropped: the response that waits on it must not be released.
        let (client, bodies) = fake_control(vec![503, 200, 413]);
        let (depth, dropped) = counters();
        let audit = strict_audit_to(client, &depth, &dropped);
        assert!(audit.is_strict());
        let started = Instant::now();
        assert!(audit.record_durably(event("/stripe/one"), WAIT));
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "answered before the resend"
        );
        let sent: Vec<Value> = (0..2).map(|_| bodies.recv_timeout(WAIT).unwrap()).collect();
        assert!(sent
            .iter()
            .all(|b| b["batch"] == 1 && b["events"][0]["path"] == "/stripe/one"));
        assert!(!audit.record_durably(event("/stripe/two"), WAIT));
        assert_eq!(bodies.recv_timeout(WAIT).unwrap()["batch"], 2);
        assert_eq!((dropped.get(), depth.get()), (1, 0));
        // A plain record on the same node still goes out.
        audit.record(event("/stripe/three"));
        assert_eq!(
            bodies.recv_timeout(WAIT).unwrap()["events"][0]["path"],
            "/stripe/three"
        );
        assert_eq!(audit.flush(WAIT), Ok(()));
    }

    /// A strict node's audit sent to a control plane that accepts connections and never
    /// answers (while the listener lives).
    fn strict_audit_to_a_silent_control() -> (
        std::net::TcpListener,
        Arc<EdgeAudit>,
        (IntGauge, IntCounter),
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = client_at(format!("http://{}", listener.local_addr().unwrap()));
        let (depth, dropped) = counters();
        let audit = strict_audit_to(Arc::new(client), &depth, &dropped);
        (listener, audit, (depth, dropped))
    }

    #[test]
    fn a_strict_event_the_control_plane_does_not_answer_in_time_is_not_durable() {
        let (listener, audit, (depth, dropped)) = strict_audit_to_a_silent_control();
        let started = Instant::now();
        assert!(!audit.record_durably(event("/stripe/one"), Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(2));
        // Still queued (it is sent once the control plane answers), not counted dropped.
        assert_eq!((dropped.get(), depth.get()), (0, 1));
        drop(listener);
    }

    #[test]
    fn a_control_plane_that_stops_answering_fails_a_strict_trail_within_two_seconds() {
        // A frozen or partitioned control plane: a send fails only at its 5 s timeout, but
        // the node stops forwarding before that.
        let (listener, audit, _counters) = strict_audit_to_a_silent_control();
        assert!(!audit.is_failing());
        audit.record(event("/stripe/one"));
        std::thread::sleep(Duration::from_millis(1000));
        assert!(!audit.is_failing(), "failing after one second unanswered");
        let started = Instant::now();
        while !audit.is_failing() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let waited = Duration::from_millis(1000) + started.elapsed();
        assert!(
            audit.is_failing(),
            "not failing after {waited:?} unanswered"
        );
        // Through the send's 5 s timeout and the retries after it, never a moment not
        // failing.
        while started.elapsed() < Duration::from_millis(5500) {
            assert!(audit.is_failing(), "not failing at {:?}", started.elapsed());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            waited < Duration::from_millis(4000),
            "failing only after {waited:?}"
        );
        drop(listener);
    }

    #[test]
    fn strict_responses_stop_waiting_once_the_control_plane_has_been_unreachable_for_a_second() {
        // Nothing listens on the port: every send fails at once.
        let port = unused_port();
        let client = client_at(format!("http://127.0.0.1:{port}"));
        let (depth, dropped) = counters();
        let audit = strict_audit_to(Arc::new(client), &depth, &dropped);
        // The first waits its whole bound: sending has only started failing.
        let started = Instant::now();
        assert!(!audit.record_durably(event("/stripe/one"), Duration::from_millis(1300)));
        assert!(started.elapsed() >= Duration::from_millis(1200));
        // Failing for over a second now: the next is withheld at once, and kept to send.
        let started = Instant::now();
        assert!(!audit.record_durably(event("/stripe/two"), WAIT));
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!((dropped.get(), depth.get()), (0, 2));
    }

    #[test]
    fn an_audit_batch_refused_for_now_is_sent_again_with_its_number() {
        let (client, bodies) = fake_control(vec![503, 429]);
        let (depth, dropped) = counters();
        let audit = audit_to(client, &depth, &dropped, Default::default());
        audit.record(event("/stripe/one"));
        assert_eq!(depth.get(), 1);
        let sent: Vec<Value> = (0..3).map(|_| bodies.recv_timeout(WAIT).unwrap()).collect();
        assert!(sent.iter().all(|b| b == &sent[0] && b["batch"] == 1));
        assert_eq!(audit.flush(WAIT), Ok(()));
        assert_eq!((dropped.get(), depth.get()), (0, 0));
    }

    fn report(key: &str, spent: i64) -> LeaseReport {
        LeaseReport {
            key_id: key.into(),
            day: 7,
            spent: Micros(spent),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_report_batch_not_answered_is_sent_again_as_it_was_and_later_rows_wait() {
        let (client, bodies) = fake_control(vec![503, 503, 500]);
        let outbox = ReportOutbox::default();
        outbox.send(&client, vec![report("key_a", 5)]).await;
        let first = bodies.recv_timeout(WAIT).unwrap();
        assert_eq!(first["batch"], 1);
        assert_eq!(first["reports"].as_array().unwrap().len(), 1);
        assert_eq!(first["reports"][0]["key_id"], "key_a");
        assert_eq!(first["reports"][0]["spent"], 5);
        // Not answered: the next round sends batch 1 again, the same, whether it has
        // rows of its own (kept for batch 2) or not.
        outbox.send(&client, Vec::new()).await;
        assert_eq!(bodies.recv_timeout(WAIT).unwrap(), first);
        outbox.send(&client, vec![report("key_b", 2)]).await;
        assert_eq!(bodies.recv_timeout(WAIT).unwrap(), first);
        // Answered this time: batch 2 follows, with both rounds' rows (one row per key).
        outbox
            .send(&client, vec![report("key_b", 3), report("key_c", 1)])
            .await;
        assert_eq!(bodies.recv_timeout(WAIT).unwrap(), first);
        let second = bodies.recv_timeout(WAIT).unwrap();
        assert_eq!(second["batch"], 2);
        let rows: Vec<(&str, i64)> = (second["reports"].as_array().unwrap().iter())
            .map(|r| (r["key_id"].as_str().unwrap(), r["spent"].as_i64().unwrap()))
            .collect();
        assert_eq!(rows, vec![("key_b", 5), ("key_c", 1)]);
        // Nothing waits: nothing is sent.
        outbox.send(&client, Vec::new()).await;
        assert!(bodies.recv_timeout(Duration::from_millis(300)).is_err());
    }

    #[tokio::test]
    async fn report_batches_are_split_and_one_refused_is_kept_and_sent_again() {
        let (client, bodies) = fake_control(vec![200, 422, 400]);
        let outbox = ReportOutbox::default();
        let rows = (0..LEASE_BATCH + 50)
            .map(|i| report(&format!("key_{i}"), 1))
            .collect();
        outbox.send(&client, rows).await;
        let next = || {
            let b = bodies.recv_timeout(WAIT).unwrap();
            let keys: Vec<String> = (b["reports"].as_array().unwrap().iter())
                .map(|r| r["key_id"].as_str().unwrap().to_string())
                .collect();
            (b["batch"].as_u64().unwrap(), keys)
        };
        let (one, two) = (next(), next());
        assert_eq!((one.0, one.1.len()), (1, LEASE_BATCH));
        assert_eq!((two.0, two.1.len()), (2, 50));
        // Batch 2 was refused (422): its rows are spend the ledger must settle, so it is
        // sent again as it was (refused once more, then answered), before key_x's row.
        outbox.send(&client, vec![report("key_x", 1)]).await;
        assert_eq!(next(), two);
        outbox.send(&client, Vec::new()).await;
        assert_eq!(next(), two);
        assert_eq!(next(), (3, vec!["key_x".to_string()]));
        assert!(bodies.recv_timeout(Duration::from_millis(300)).is_err());
    }

    #[tokio::test]
    async fn a_lost_lease_batch_is_named_in_the_next_report_batch_formed_once() {
        let (client, bodies) = fake_control(vec![503, 200, 200]);
        let outbox = ReportOutbox::default();
        outbox.send(&client, vec![report("key_a", 5)]).await;
        let first = bodies.recv_timeout(WAIT).unwrap();
        assert!(first.get("lost_leases").is_none(), "{first}");
        // Lost while batch 1 waits for an answer: batch 1 goes again as it was, and
        // batch 2 (with no rows of its own) names both lost lease batches.
        outbox.lost_lease(7);
        outbox.lost_lease(9);
        outbox.send(&client, Vec::new()).await;
        assert_eq!(bodies.recv_timeout(WAIT).unwrap(), first);
        let second = bodies.recv_timeout(WAIT).unwrap();
        assert_eq!(second["batch"], 2);
        assert_eq!(second["lost_leases"], json!([7, 9]));
        assert_eq!(second["reports"], json!([]));
        // Named once: nothing more is sent.
        outbox.send(&client, Vec::new()).await;
        assert!(bodies.recv_timeout(Duration::from_millis(300)).is_err());
        // Many lost (a long outage): at most LEASE_BATCH per report batch.
        for n in 0..LEASE_BATCH as u64 + 5 {
            outbox.lost_lease(100 + n);
        }
        outbox.send(&client, Vec::new()).await;
        let sizes: Vec<usize> = (0..2)
            .map(|_| {
                bodies.recv_timeout(WAIT).unwrap()["lost_leases"]
                    .as_array()
                    .unwrap()
                    .len()
            })
            .collect();
        assert_eq!(sizes, vec![LEASE_BATCH, 5]);
    }

    #[test]
    fn a_call_that_finds_no_connection_is_told_apart_from_one_that_may_have_arrived() {
        // A port nobody listens on: the request never left.
        let port = unused_port();
        let client = client_at(format!("http://127.0.0.1:{port}"));
        let refused = client.call("POST", "/v1/sync/leases", Some("{}"), WAIT);
        assert!(matches!(refused, Err(CallError::Unsent(_))), "{refused:?}");
        // A connection closed with the request sent and no answer: it may have arrived.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
        });
        let client = SyncClient { base, ..client };
        let cut = client.call("POST", "/v1/sync/leases", Some("{}"), WAIT);
        assert!(matches!(cut, Err(CallError::Other(_))), "{cut:?}");
    }

    #[test]
    fn sync_retries_back_off_to_a_second_with_jitter() {
        for (failures, most) in [(1, 200), (2, 400), (3, 800), (4, 1000), (30, 1000)] {
            let d = retry_after(failures).as_millis();
            assert!((most * 4 / 5..=most).contains(&d), "{failures}: {d} ms");
        }
    }

    #[test]
    fn an_audit_batch_always_fits_the_control_planes_body_limit() {
        // The largest event proxy::audit lets through, its JSON escaping at worst.
        let mut e = event(&"\"".repeat(100_000));
        e.method = "X".repeat(1000);
        e.tenant_id = Some("t".repeat(64).into());
        e.key_id = Some("k".repeat(64).into());
        e.label = Some("\u{1}".repeat(1000).into());
        e.vendor_request_id = Some("\u{1}".repeat(1000));
        e.llm = Some(crate::sync::LlmAudit {
            model: "\u{1}".repeat(1000),
            input_tokens: Some(u64::MAX),
            cached_input_tokens: Some(u64::MAX),
            cache_write_tokens: Some(u64::MAX),
            output_tokens: Some(u64::MAX),
        });
        let e = crate::proxy::audit::bounded(e);
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.len() <= AUDIT_EVENT_MAX_BYTES, "{} bytes", json.len());
    }
}
