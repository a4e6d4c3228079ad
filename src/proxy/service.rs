//! The Pingora `ProxyHttp` implementation. It only wires the stages together, in order:
//! path → key → verify → scope → classify (metered, free, or refused as unmetered) →
//! body & cost (or the vendor look-up of what the call can charge) → idempotent retry →
//! re-check of the key → reserve → inject → forward → settle → record. Each stage is a
//! plain function in its own module.

use super::deny::{self, Denial};
use super::idempotency::{self, Admission, IdempotencyBook, Pending};
use super::llm;
use super::meter::{self, ParsedBody};
use super::path;
use super::record::{AccessLine, AccessLogWriter};
use super::spend::{Reservation, SpendBook, SpendError, Spender};
use super::upstream::Upstreams;
use super::upstream_call::{self, LookupError};
use super::verify::{KeyVerifier, VerifiedKey};
use super::{extract, inject, scope};
use crate::config::{Class, Currency, MeterRule, MeterSource, UnmeteredPolicy, Vendor};
use crate::metrics::{Metrics, RequestCounters};
use crate::money::Micros;
use crate::secret::Secret;
use crate::sync::{AuditEvent, AuditSink, Published};
use crate::token::now_secs;
use crate::Map;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most response bytes kept to learn a created object's id.
const MAX_CAPTURE: usize = 256 * 1024;
/// Most response bytes kept to meter a response-metered call (an invoice with many lines
/// or an expanded object can be large). Past it the call is charged as unmeterable.
const MAX_METERED_CAPTURE: usize = 8 * 1024 * 1024;
/// Objects (e.g. PaymentIntents) remembered with what a key was charged for them, for
/// `skip_if_created_by_same_key`.
const MAX_CREATED: usize = 200_000;
/// The most of a body read in `request_filter` that Pingora replays upstream (its retry
/// buffer, STYLE.md). A larger read body goes out through `forward_read_body` instead.
const REPLAY_LIMIT: usize = 64 * 1024;
/// Longest a response waits for its audit event under `audit.durability: strict`.
const STRICT_AUDIT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct KeybrakeProxy {
    /// Set when a graceful upgrade or shutdown begins: connections are closed after their
    /// current response, so clients reconnect to the new process.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Edge nodes: refuse everything while the control plane's view is stale.
    pub staleness: super::fresh::Staleness,
    pub vendors: Map<String, Arc<Vendor>>,
    pub currencies: Map<String, Currency>,
    pub body_limit: usize,
    pub body_timeout: Duration,
    pub verifier: Arc<KeyVerifier>,
    pub spend: Arc<SpendBook>,
    pub upstreams: Arc<Upstreams>,
    pub published: Arc<Published>,
    pub audit: Arc<dyn AuditSink>,
    pub access_log: Option<AccessLogWriter>,
    pub metrics: Arc<Metrics>,
    /// `metrics.requests` by vendor and decision, kept (see `RequestCounters`).
    pub request_counters: RequestCounters,
    /// Object id → the key charged for it (through a metered create, confirm or capture)
    /// and how much, so that a later confirm or capture charges only any increase.
    pub created: DashMap<String, Charged, ahash::RandomState>,
    /// When `created` was last swept of expired entries (unix seconds).
    pub created_swept: std::sync::atomic::AtomicI64,
    /// Upstream connections for `forward_read_body` and the lookups (built from the same
    /// server configuration as Pingora's own).
    pub connector: pingora::connectors::http::Connector,
    /// (key, `Idempotency-Key`) pairs already charged.
    pub idempotency: Arc<IdempotencyBook>,
    /// How long a duplicate waits for the first call of its idempotency key to settle.
    pub idempotent_wait: Duration,
    /// LLM prices (`conf/prices.yaml`).
    pub prices: Arc<llm::PriceTable>,
}

/// What one key has been charged for one object, the most of its amounts seen so far.
pub struct Charged {
    owner: Arc<str>,
    /// The key's expiry: the entry is useless after it.
    exp: i64,
    charged: Micros,
    /// The object's currency (lower case), when known.
    currency: Option<Arc<str>>,
}

/// The response body kept to meter it or learn a created object's id.
#[derive(Debug, Default, PartialEq, Eq)]
enum Capture {
    #[default]
    Off,
    On(Vec<u8>),
    /// Larger than kept: a response-metered call is charged as unmeterable.
    Overflowed,
    /// Metered already (at the end of the body, or when the response was cut short).
    Done,
}

impl Capture {
    /// What arrived, once: `Ok` the body, `Err(())` an overflowed one, `None` nothing to
    /// meter (never started, or finished already).
    fn finish(&mut self) -> Option<Result<Vec<u8>, ()>> {
        match std::mem::replace(self, Capture::Done) {
            Capture::On(bytes) => Some(Ok(bytes)),
            Capture::Overflowed => Some(Err(())),
            Capture::Off => {
                *self = Capture::Off;
                None
            }
            Capture::Done => None,
        }
    }

    fn pending(&self) -> bool {
        matches!(self, Capture::On(_) | Capture::Overflowed)
    }
}

pub struct Ctx {
    start: Instant,
    /// The canonical path, `/{vendor}/{rest}`; empty until it is known to be one.
    canonical: String,
    /// Where `{rest}` (the vendor-relative path, from its `/`) starts in `canonical`.
    rest_at: usize,
    vendor: Option<Arc<Vendor>>,
    key: Option<Arc<VerifiedKey>>,
    secret: Option<Secret>,
    denial: Option<Denial>,
    reservation: Option<Reservation>,
    /// The full body to send upstream (read, possibly converted), replacing Pingora's
    /// replay buffer, which holds at most 64 KiB (a larger one goes out through
    /// `forward_read_body`).
    body: Option<Bytes>,
    body_was_read: bool,
    /// Our copy of the body went out on the current upstream attempt (reset by
    /// `upstream_request_filter`, which runs once per attempt, retries included).
    body_sent: bool,
    converted_to_form: bool,
    streamed: usize,
    response_rule: Option<Arc<MeterRule>>,
    /// For a response-metered call on an object this key was already charged for: that
    /// charge, taken off the response's amount.
    credit: Micros,
    /// The currency a request-metered call was counted in, remembered with its object.
    charged_currency: Option<Arc<str>>,
    track_created: bool,
    capture: Capture,
    /// A response-metered call's charge, read from its 2xx answer (net of what the key
    /// already paid for the object): its reservation is settled to it.
    response_charge: Option<Micros>,
    /// The first call of its (key, `Idempotency-Key`): told whether it was charged.
    idempotent: Option<Pending>,
    upstream_start: Option<Instant>,
    upstream_elapsed: Option<Duration>,
    status: u16,
    spend: Micros,
    vendor_request_id: Option<String>,
    /// Strict audit: the event was made durable before the response was released.
    audited: bool,
    /// A token-metered (LLM) call: its own reservation and metering (`llm`).
    llm: Option<Box<llm::Call>>,
}

impl Ctx {
    /// The canonical vendor-relative path (`/v1/…`).
    fn path(&self) -> &str {
        &self.canonical[self.rest_at..]
    }

    /// The vendor named by the path, known or not.
    fn vendor_name(&self) -> &str {
        self.canonical.get(1..self.rest_at).unwrap_or("")
    }
}

impl KeybrakeProxy {
    /// Stages 1 to 7. On success the request may go upstream; on error nothing was sent.
    async fn admit(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), Denial> {
        let now = now_secs();
        let req = session.req_header();
        let canonical = path::canonicalize(req.uri.path()).map_err(|_| Denial::InvalidPath)?;
        let (vendor_name, rest) = path::split_vendor(&canonical).ok_or(Denial::InvalidPath)?;
        ctx.vendor = self.vendors.get(vendor_name).cloned();
        ctx.rest_at = canonical.len() - rest.len();
        ctx.canonical = canonical;

        let token = extract::vault_key(&req.headers).ok_or(Denial::MissingKey)?;
        let key = self.verifier.verify(&token, now).map_err(|(denial, key)| {
            ctx.key = key;
            denial
        })?;
        ctx.key = Some(key.clone());

        let vendor = ctx.vendor.clone().ok_or(Denial::UnknownVendor)?;
        let method = req.method.clone();
        scope::check(&key, &vendor, &method, ctx.path(), &req.headers)?;
        let secret = self
            .published
            .credentials
            .load()
            .get(key.claims.ten.as_str())
            .and_then(|vendors| vendors.get(key.claims.ven.as_str()))
            .cloned()
            .ok_or(Denial::VendorNotConfigured)?;

        let rule = match vendor.classify(&method, ctx.path()) {
            Class::Metered(rule) => Some(rule.clone()),
            Class::Free => None,
            // Every key has a cap: a call that could move money unseen is refused.
            Class::Unmetered if vendor.unmetered == UnmeteredPolicy::Refuse => {
                return Err(Denial::EndpointUnmetered)
            }
            Class::Unmetered => None,
        };

        let content_length = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if content_length.is_some_and(|n| n > self.body_limit) {
            return Err(Denial::BodyTooLarge);
        }
        if let Some(api) = vendor.llm_api(&method, ctx.path()) {
            // Token-metered: priced and reserved by its own stage.
            return Box::pin(self.admit_llm(session, ctx, api, &key, secret, now)).await;
        }
        let content_type = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("?"));
        let is_json = meter::is_json(content_type);
        let body_metered = rule
            .as_ref()
            .is_some_and(|r| r.source != MeterSource::Response);
        if body_metered
            && (req.headers.contains_key(http::header::CONTENT_ENCODING)
                || !(is_json || content_type.is_none_or(meter::is_form)))
        {
            // Only a plain form or JSON body is read here: a vendor that decodes another
            // type (multipart, a compressed body) could find another amount in it.
            return Err(Denial::InvalidAmount);
        }
        let convert = is_json && content_length != Some(0) && vendor.converts_json(ctx.path());

        let mut cost = vendor.cost_per_request;
        if body_metered || convert {
            let fields;
            let keep: &[&str] = match rule.as_ref().filter(|_| body_metered) {
                Some(rule) if rule.source == MeterSource::Items => &meter::ITEM_FIELDS,
                Some(rule) => {
                    fields = rule.fields();
                    &fields
                }
                None => &[],
            };
            // The amount is only read from the body: the same field in the query string
            // could be read by the vendor instead (or merged over it).
            if let Some(query) = session.req_header().uri.query() {
                if ParsedBody::from_form(query.as_bytes(), keep).has_fields() {
                    return Err(Denial::InvalidAmount);
                }
            }
            let body = self.read_body(session).await?;
            let form = if convert && !body.is_empty() {
                let value: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
                    if body_metered {
                        Denial::InvalidAmount
                    } else {
                        Denial::InvalidBody
                    }
                })?;
                // Metered from what the vendor receives: a nested key flattens to a
                // bracketed name (`{"": {"amount": …}}` → `[amount]=…`), refused there.
                ctx.converted_to_form = true;
                Bytes::from(meter::json_to_form(&value)?)
            } else {
                if body_metered && meter::looks_like_json(&body) {
                    // A JSON body declared as something else: a vendor that parses it as
                    // JSON would see another amount than the form fields read here.
                    return Err(Denial::InvalidAmount);
                }
                body
            };
            ctx.body_was_read = true;
            if let Some(rule) = rule.as_ref().filter(|_| body_metered) {
                let amount = match rule.source {
                    MeterSource::Items => {
                        let items = meter::subscription_items(&form)?;
                        Box::pin(self.price_items(&items, rule, &vendor, &secret, session)).await?
                    }
                    _ => {
                        let parsed = ParsedBody::from_form(&form, keep);
                        let known = rule
                            .skip_if_created_by_same_key
                            .then(|| self.charged_for(rule, ctx.path(), &key.claims.jti))
                            .flatten();
                        let object_currency = known.as_ref().and_then(|k| k.1.as_deref());
                        let (amount, currency) =
                            meter::request_cost(rule, &parsed, object_currency, &self.currencies)?;
                        // An amount that is a new total (increment_authorization): only the
                        // increase over what this key was charged for the object costs.
                        ctx.credit = known.map_or(Micros::ZERO, |k| k.0);
                        ctx.track_created = true;
                        ctx.charged_currency = currency.map(Arc::from);
                        amount.saturating_sub(ctx.credit).max(Micros::ZERO)
                    }
                };
                cost = cost.checked_add(amount).ok_or(Denial::InvalidAmount)?;
            }
            ctx.body = Some(form);
        }
        if let Some(rule) = rule.filter(|r| r.source == MeterSource::Response) {
            if rule.skip_if_created_by_same_key {
                // What this key was already charged for the object (its create, or an
                // earlier confirm): only an amount above it is charged again.
                ctx.credit = self
                    .charged_for(&rule, ctx.path(), &key.claims.jti)
                    .map_or(Micros::ZERO, |k| k.0);
            }
            // What the call can charge, read from the vendor now, is reserved: concurrent
            // calls never take the key past its cap.
            // Boxed, like every rare await here: inline, its state would grow the future
            // that async_trait boxes and copies on every request.
            let can_charge =
                Box::pin(self.look_up_charge(&rule, &vendor, &secret, session, ctx)).await?;
            cost = cost
                .checked_add(can_charge.saturating_sub(ctx.credit).max(Micros::ZERO))
                .ok_or(Denial::InvalidAmount)?;
            ctx.response_rule = Some(rule);
        }

        let spender = Spender {
            key_id: &key.claims.jti,
            tenant_id: &key.claims.ten,
            vendor: &key.claims.ven,
            cap: Micros(key.claims.cap),
            exp: key.claims.exp,
        };
        let refused = |e| match e {
            SpendError::CapExhausted => Denial::CapExhausted,
            SpendError::LedgerUnavailable => Denial::LedgerUnavailable,
        };
        if ctx.response_rule.is_some() && ctx.credit.is_positive() && cost == Micros::ZERO {
            // An object the key already paid for (its own intent): allowed at the cap
            // unless a charge already went past it today.
            if self.spend.is_over_cap(&spender, now) {
                return Err(Denial::CapExhausted);
            }
        }
        if cost.is_positive() || ctx.response_rule.is_some() {
            if let Some(idem) = session
                .req_header()
                .headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
            {
                let fingerprint = idempotency::fingerprint(
                    method.as_str(),
                    ctx.path(),
                    ctx.body.as_deref().unwrap_or_default(),
                );
                match Box::pin(self.idempotency.admit(
                    &key.jti,
                    idem,
                    fingerprint,
                    key.claims.exp,
                    now,
                    self.idempotent_wait,
                ))
                .await
                {
                    // Stripe answers with its first answer and does not act again.
                    Admission::Replay => {
                        cost = Micros::ZERO;
                        ctx.response_rule = None;
                        ctx.track_created = false;
                    }
                    Admission::First(pending) => ctx.idempotent = Some(pending),
                    Admission::Untracked => {}
                }
            }
        }
        // The body read and the lookups may have taken a while: a key revoked or expired
        // meanwhile sends nothing (checked again after the reservation, which may wait).
        self.still_valid(&key)?;
        let reservation = self
            .spend
            .reserve(&spender, cost, now)
            .await
            .map_err(refused)?;
        ctx.spend = reservation.amount;
        ctx.reservation = Some(reservation);
        self.still_valid(&key)?;
        ctx.secret = Some(secret);
        Ok(())
    }

    /// The key's expiry and revocation, checked again right before forwarding.
    fn still_valid(&self, key: &VerifiedKey) -> Result<(), Denial> {
        if key.claims.exp <= now_secs() {
            return Err(Denial::KeyExpired);
        }
        if self
            .published
            .revocations
            .load()
            .is_revoked(&key.claims.jti)
        {
            return Err(Denial::KeyRevoked);
        }
        Ok(())
    }

    /// What a response-metered call can charge: the largest of the rule's lookup amounts
    /// of the object it acts on, read from the vendor with the real credential.
    async fn look_up_charge(
        &self,
        rule: &MeterRule,
        vendor: &Vendor,
        secret: &Secret,
        session: &Session,
        ctx: &Ctx,
    ) -> Result<Micros, Denial> {
        let lookup = rule.reserve.as_ref().ok_or(Denial::AmountUnknown)?;
        let segments: Vec<&str> = ctx.path().split('/').skip(1).collect();
        let path = lookup
            .path
            .fill(|i| segments.get(i).copied())
            .ok_or(Denial::AmountUnknown)?;
        let object = self.get_json(vendor, secret, &path, session).await?;
        meter::largest_amount(&object, &lookup.amount_fields, &self.currencies)
            .ok_or(Denial::AmountUnknown)
    }

    /// Σ unit price × quantity of a subscription's items, each price read from the
    /// vendor.
    async fn price_items(
        &self,
        items: &[meter::Item],
        rule: &MeterRule,
        vendor: &Vendor,
        secret: &Secret,
        session: &Session,
    ) -> Result<Micros, Denial> {
        let lookup = rule.reserve.as_ref().ok_or(Denial::AmountUnknown)?;
        let mut total = Micros::ZERO;
        for item in items {
            let path = lookup
                .path
                .fill(|_| Some(item.price.as_str()))
                .ok_or(Denial::AmountUnknown)?;
            let price = self.get_json(vendor, secret, &path, session).await?;
            let unit = meter::largest_amount(&price, &lookup.amount_fields, &self.currencies)
                .ok_or(Denial::AmountUnknown)?;
            total = unit
                .checked_mul(item.quantity)
                .and_then(|m| total.checked_add(m))
                .ok_or(Denial::InvalidAmount)?;
        }
        Ok(total)
    }

    async fn get_json(
        &self,
        vendor: &Vendor,
        secret: &Secret,
        path: &str,
        session: &Session,
    ) -> Result<serde_json::Value, Denial> {
        let peer = self
            .upstreams
            .peer(vendor)
            .ok_or(Denial::UpstreamUnavailable)?;
        upstream_call::get_json(
            &self.connector,
            &peer,
            vendor,
            secret,
            path,
            &session.req_header().headers,
        )
        .await
        .map_err(|e| match e {
            LookupError::Unreachable { timeout: true } => Denial::UpstreamTimeout,
            LookupError::Unreachable { timeout: false } => Denial::UpstreamUnavailable,
            LookupError::NoObject => Denial::AmountUnknown,
        })
    }

    /// Reads the whole request body within the size limit and the deadline. Pingora keeps
    /// (up to 64 KiB of) it for replay; `request_body_filter` sends our full copy instead.
    async fn read_body(&self, session: &mut Session) -> Result<Bytes, Denial> {
        session.enable_retry_buffering();
        if expects_continue(session.req_header()) {
            // The client waits for this before it sends the body we are about to read
            // (the vendor, which would answer it otherwise, is not asked yet). Pingora
            // would mark the connection to close for a header written before the body is
            // read; a 100 is not an early answer, so that is switched off around it.
            session.set_close_on_response_before_downstream_finish(false);
            let sent = session.write_continue_response().await;
            session.set_close_on_response_before_downstream_finish(true);
            sent.map_err(|_| Denial::InvalidBody)?;
        }
        let deadline = tokio::time::Instant::now() + self.body_timeout;
        // Usually the whole body is one chunk that came with the headers: it is kept as
        // is, and copied into `buf` only when a second chunk follows.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        loop {
            let chunk = read_before(deadline, session.read_request_body())
                .await
                .map_err(|_| Denial::BodyTimeout)?
                .map_err(|_| Denial::InvalidBody)?;
            let Some(chunk) = chunk else {
                return Ok(match first {
                    Some(only) if buf.is_empty() => only,
                    _ => buf.freeze(),
                });
            };
            if first.as_ref().map_or(0, Bytes::len) + buf.len() + chunk.len() > self.body_limit {
                return Err(Denial::BodyTooLarge);
            }
            match first.take() {
                None if buf.is_empty() => first = Some(chunk),
                earlier => {
                    if let Some(earlier) = earlier {
                        buf.extend_from_slice(&earlier);
                    }
                    buf.extend_from_slice(&chunk);
                }
            }
        }
    }

    /// Forwards a request whose body was read and is larger than Pingora replays: the same
    /// hooks in the same order as Pingora's proxy path (peer, request header, response
    /// header, body filter), over a connection from our own connector. Errors are answered
    /// as `fail_to_proxy` answers Pingora's.
    async fn forward_read_body(&self, session: &mut Session, ctx: &mut Ctx) {
        if let Err(e) = self.exchange_read_body(session, ctx).await {
            session.set_keepalive(None);
            self.fail_to_proxy(session, &e, ctx).await;
        }
    }

    async fn exchange_read_body(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let peer = self.upstream_peer(session, ctx).await?;
        let mut req = session.req_header().clone();
        // The whole body goes with the header: nothing to wait for a 100 for.
        req.remove_header(&http::header::EXPECT);
        self.upstream_request_filter(session, &mut req, ctx).await?;
        let body = ctx.body.take().unwrap_or_default();
        // A stale pooled connection is retried on another, as Pingora does for its path.
        let (mut upstream, mut resp) = upstream_call::send(&self.connector, &peer, &req, &body)
            .await
            .inspect_err(|e| {
                if matches!(
                    e.etype(),
                    ConnectTimedout
                        | ConnectRefused
                        | ConnectNoRoute
                        | ConnectError
                        | TLSHandshakeFailure
                ) {
                    // Never sent: `logging` releases the reservation.
                    ctx.upstream_start = None;
                }
            })?;
        for hop in inject::HOP_BY_HOP {
            resp.remove_header(hop);
        }
        self.upstream_response_filter(session, &mut resp, ctx)
            .await?;
        self.response_filter(session, &mut resp, ctx).await?;
        session.write_response_header(Box::new(resp), false).await?;
        loop {
            let mut chunk = if upstream.response_done() {
                None
            } else {
                upstream.read_response_body().await?
            };
            let end = chunk.is_none() || upstream.response_done();
            self.upstream_response_body_filter(session, &mut chunk, end, ctx)?;
            self.response_body_filter(session, &mut chunk, end, ctx)?;
            session.write_response_body(chunk, end).await?;
            if end {
                break;
            }
        }
        self.connector
            .release_http_session(upstream, &*peer, peer.options.idle_timeout)
            .await;
        Ok(())
    }

    /// A reservation still open when no response arrived: if the request never left
    /// (connect failure), the budget goes back; otherwise the vendor may have acted on it,
    /// so it stays spent.
    fn settle_unanswered(&self, ctx: &mut Ctx, e: Option<&Error>) {
        if let Some(r) = ctx.reservation.take() {
            let never_sent = never_sent(ctx, e);
            if never_sent {
                self.spend.release(r);
                ctx.spend = Micros::ZERO;
            } else {
                self.spend.settle(r);
            }
        }
    }

    /// `audit.durability: strict` (docs/storage.md): the response's audit event is made
    /// durable before the response's last bytes leave; `logging` then records nothing
    /// more. The wait (a group commit, a few ms) blocks this worker thread, handed over to
    /// the runtime meanwhile. An event that cannot be made durable withholds the response.
    fn audit_before_release(&self, session: &Session, ctx: &mut Ctx) -> Result<()> {
        if ctx.audited || !self.audit.is_strict() {
            return Ok(());
        }
        ctx.audited = true;
        let llm = ctx.llm.as_ref().map(|call| {
            let (charge, usage) = call.charge(false);
            (charge, llm_audit(call.model.clone(), usage))
        });
        let key = ctx.key.as_ref();
        let status = final_status(session, ctx);
        let event = AuditEvent {
            ts_ms: unix_ms(std::time::SystemTime::now()),
            tenant_id: key.map(|k| k.ten.clone()),
            key_id: key.map(|k| k.jti.clone()),
            label: key.map(|k| k.lbl.clone()),
            vendor: if ctx.vendor.is_some() {
                ctx.vendor_name()
            } else {
                "unknown"
            }
            .to_string(),
            method: session.req_header().method.as_str().to_string(),
            path: ctx.canonical.clone(),
            status,
            decision: ctx.denial.map_or("allowed", Denial::code).to_string(),
            // A response- or token-metered call is settled to this charge in `logging`.
            spend: llm
                .as_ref()
                .map_or(ctx.response_charge.unwrap_or(ctx.spend), |l| l.0),
            vendor_request_id: ctx.vendor_request_id.clone(),
            duration_ms: ctx.start.elapsed().as_millis() as u64,
            llm: llm.map(|(_, audit)| audit),
        };
        let audit = self.audit.clone();
        let wait = move || audit.record_durably(event, STRICT_AUDIT_TIMEOUT);
        let durable = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        };
        if durable {
            Ok(())
        } else {
            Error::e_explain(
                InternalError,
                "audit.durability is strict and the audit event could not be made durable",
            )
        }
    }

    /// What key `jti` was charged for the object the call acts on (the path segment under
    /// the rule's `*`), and the object's currency.
    fn charged_for(
        &self,
        rule: &MeterRule,
        path: &str,
        jti: &str,
    ) -> Option<(Micros, Option<Arc<str>>)> {
        let id = rule.object_id(path)?;
        self.created
            .get(id)
            .filter(|e| *e.owner == *jti)
            .map(|e| (e.charged, e.currency.clone()))
    }

    /// Meters the captured response, once: a response-metered call's charge (net of what
    /// the key already paid for the object), and the object the key was charged for.
    fn finish_capture(&self, ctx: &mut Ctx) {
        let bytes = match ctx.capture.finish() {
            None => return,
            Some(Ok(bytes)) => bytes,
            Some(Err(())) => {
                if ctx.response_rule.is_some() {
                    self.charge_unmeterable(ctx, "larger than the metering limit");
                }
                return;
            }
        };
        let (id, charged, currency) = if let Some(rule) = ctx.response_rule.clone() {
            let Ok(body) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                self.charge_unmeterable(ctx, "not JSON");
                return;
            };
            let Some(cost) = meter::response_cost(&rule, &body, &self.currencies) else {
                self.charge_unmeterable(ctx, "without a known amount and currency");
                return;
            };
            ctx.response_charge = Some(cost.saturating_sub(ctx.credit).max(Micros::ZERO));
            let id = body.get("id").and_then(|v| v.as_str()).map(str::to_string);
            let currency = body
                .get("currency")
                .and_then(|v| v.as_str())
                .map(|c| Arc::from(c.to_ascii_lowercase()));
            (
                id.filter(|_| rule.skip_if_created_by_same_key),
                cost.max(ctx.credit),
                currency,
            )
        } else if ctx.track_created {
            let charged = ctx.credit.checked_add(ctx.spend).unwrap_or(ctx.spend);
            (
                created_object_id(&bytes),
                charged,
                ctx.charged_currency.take(),
            )
        } else {
            return;
        };
        if let (Some(id), Some(key)) = (id, &ctx.key) {
            self.remember_charged(id, key, charged, currency);
        }
    }

    /// Fail closed: the vendor acted on a response-metered call whose cost cannot be read,
    /// so the key is charged its whole daily cap and can spend nothing more today.
    fn charge_unmeterable(&self, ctx: &mut Ctx, why: &str) {
        if let Some(key) = &ctx.key {
            log::warn!(
                "{} response for key {} is {why}: charging the key's daily cap",
                ctx.vendor_name(),
                key.claims.jti
            );
            ctx.response_charge = Some(Micros(key.claims.cap.max(0)));
        }
    }

    /// Records that `key` was charged `charged` for object `id` (kept: the most charged so
    /// far). The map is bounded: when full, expired owners are swept out (at most once a
    /// second); if it is still full, nothing is added and a later confirm of that object
    /// is metered from its response in full.
    fn remember_charged(
        &self,
        id: String,
        key: &VerifiedKey,
        charged: Micros,
        currency: Option<Arc<str>>,
    ) {
        if self.created.len() >= MAX_CREATED {
            let now = now_secs();
            let last = self
                .created_swept
                .load(std::sync::atomic::Ordering::Relaxed);
            if now > last
                && self
                    .created_swept
                    .compare_exchange(
                        last,
                        now,
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                    )
                    .is_ok()
            {
                self.created.retain(|_, e| e.exp > now);
            }
        }
        let fresh = || Charged {
            owner: key.jti.clone(),
            exp: key.claims.exp,
            charged,
            currency: currency.clone(),
        };
        // Counted before `entry` locks a shard: `len` reads every shard.
        let full = self.created.len() >= MAX_CREATED;
        match self.created.entry(id) {
            dashmap::Entry::Occupied(mut e) => {
                let e = e.get_mut();
                if *e.owner == *key.jti {
                    e.charged = e.charged.max(charged);
                    if currency.is_some() {
                        e.currency = currency.clone();
                    }
                } else {
                    // Another key's object: from now on its owner is charged in full.
                    *e = fresh();
                }
            }
            dashmap::Entry::Vacant(e) => {
                if !full {
                    e.insert(fresh());
                }
            }
        }
    }
}

// ---- LLM metering (stages in `llm`): admit, settle.
impl KeybrakeProxy {
    /// The LLM half of `admit`: read the body, plan the call (model, price, bound) and
    /// reserve its bound. Nothing is sent when this fails.
    async fn admit_llm(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        api: llm::Api,
        key: &VerifiedKey,
        secret: Secret,
        now: i64,
    ) -> Result<(), Denial> {
        if session
            .req_header()
            .headers
            .contains_key(http::header::CONTENT_ENCODING)
        {
            // A compressed body cannot be read for its model and limits.
            return Err(Denial::InvalidLlmBody);
        }
        let body = self.read_body(session).await?;
        let plan = llm::plan(api, &body, &self.prices, &key.claims.ven)?;
        ctx.body = Some(plan.body.unwrap_or(body));
        ctx.body_was_read = true;
        let spender = Spender {
            key_id: &key.claims.jti,
            tenant_id: &key.claims.ten,
            vendor: &key.claims.ven,
            cap: Micros(key.claims.cap),
            exp: key.claims.exp,
        };
        let reservation = self
            .spend
            .reserve(&spender, plan.bound, now)
            .await
            .map_err(|e| match e {
                SpendError::CapExhausted => Denial::CapExhausted,
                SpendError::LedgerUnavailable => Denial::LedgerUnavailable,
            })?;
        ctx.spend = reservation.amount;
        let mut call = plan.call;
        call.hold(reservation);
        ctx.llm = Some(Box::new(call));
        ctx.secret = Some(secret);
        Ok(())
    }

    /// Settles an LLM call at its end: the usage's cost out of its reservation (the rest
    /// goes back), or all of it when no usage could be read; counts the tokens.
    async fn settle_llm(
        &self,
        call: llm::Call,
        ctx: &mut Ctx,
        e: Option<&Error>,
        now: i64,
    ) -> crate::sync::LlmAudit {
        let never_sent = never_sent(ctx, e);
        let model = call.model.clone();
        let outcome = call.finish(never_sent);
        ctx.spend = outcome.charge;
        if let Some(key) = &ctx.key {
            let spender = Spender {
                key_id: &key.claims.jti,
                tenant_id: &key.claims.ten,
                vendor: &key.claims.ven,
                cap: Micros(key.claims.cap),
                exp: key.claims.exp,
            };
            self.spend
                .settle_part(outcome.reservation, outcome.charge, &spender, now)
                .await;
        } else {
            self.spend.release(outcome.reservation);
        }
        if let Some(u) = &outcome.usage {
            let vendor = ctx.vendor_name();
            for (kind, n) in [
                ("input", u.input),
                ("cached_input", u.cached_input),
                (
                    "cache_write",
                    u.cache_write.saturating_add(u.cache_write_1h),
                ),
                ("output", u.output),
                ("reasoning", u.reasoning),
            ] {
                if n > 0 {
                    self.metrics
                        .llm_tokens
                        .with_label_values(&[vendor, kind])
                        .inc_by(n);
                }
            }
        }
        llm_audit(model, outcome.usage)
    }
}

/// The status the client was answered (0 when nothing final was sent).
fn final_status(session: &Session, ctx: &Ctx) -> u16 {
    if ctx.status != 0 {
        return ctx.status;
    }
    session
        .response_written()
        .filter(|r| !r.status.is_informational())
        .map_or(0, |r| r.status.as_u16())
}

/// Milliseconds since the Unix epoch, for audit events.
fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Whether a request that got no answer surely never reached the vendor: it was not sent,
/// or the connection to the vendor failed. Anything else may have been acted on.
fn never_sent(ctx: &Ctx, e: Option<&Error>) -> bool {
    ctx.upstream_start.is_none()
        || e.is_some_and(|e| {
            matches!(
                e.etype(),
                ConnectTimedout
                    | ConnectRefused
                    | ConnectNoRoute
                    | ConnectError
                    | TLSHandshakeFailure
            )
        })
}

/// The model and tokens an LLM call's audit event carries.
fn llm_audit(model: String, usage: Option<llm::usage::Usage>) -> crate::sync::LlmAudit {
    crate::sync::LlmAudit {
        model,
        input_tokens: usage.map(|u| u.input_total()),
        cached_input_tokens: usage.map(|u| u.cached_input),
        cache_write_tokens: usage.map(|u| u.cache_write.saturating_add(u.cache_write_1h)),
        output_tokens: usage.map(|u| u.output),
    }
}

/// An HTTP/1.1 request with `Expect: 100-continue`: its client may hold the body back
/// until it gets `100 Continue`.
fn expects_continue(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// `read` with a deadline. It is polled once first: a read that is already complete (the
/// body arrived with the headers) then costs no timer registration.
async fn read_before<F: std::future::Future>(
    deadline: tokio::time::Instant,
    read: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut read = std::pin::pin!(read);
    let ready = std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
    match ready {
        std::task::Poll::Ready(output) => Ok(output),
        // Boxed: the timer is only needed on this (rarer) path, and inline it would grow
        // every request's boxed `request_filter` future.
        std::task::Poll::Pending => Box::pin(tokio::time::timeout_at(deadline, read)).await,
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
fn created_object_id(body: &[u8]) -> Option<String> {
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

#[async_trait]
impl ProxyHttp for KeybrakeProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            canonical: String::new(),
            rest_at: 0,
            vendor: None,
            key: None,
            secret: None,
            denial: None,
            reservation: None,
            body: None,
            body_was_read: false,
            body_sent: false,
            converted_to_form: false,
            streamed: 0,
            response_rule: None,
            credit: Micros::ZERO,
            charged_currency: None,
            track_created: false,
            capture: Capture::Off,
            response_charge: None,
            idempotent: None,
            upstream_start: None,
            upstream_elapsed: None,
            status: 0,
            spend: Micros::ZERO,
            vendor_request_id: None,
            audited: false,
            llm: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            session.set_keepalive(None);
        }
        // The rare paths are boxed: async_trait boxes this hook's future on every request,
        // copying its full size, and inline they would make it ~11 KB instead of ~1 KB.
        let admitted = if self.staleness.is_stale() {
            Err(Denial::ControlUnreachable)
        } else {
            self.admit(session, ctx).await
        };
        match admitted {
            Ok(()) if ctx.body.as_ref().is_some_and(|b| b.len() > REPLAY_LIMIT) => {
                Box::pin(self.forward_read_body(session, ctx)).await;
                Ok(true)
            }
            Ok(()) => Ok(false),
            Err(denial) => {
                if let Some(r) = ctx.reservation.take() {
                    self.spend.release(r);
                }
                ctx.denial = Some(denial);
                ctx.status = denial.status();
                ctx.spend = Micros::ZERO;
                self.audit_before_release(session, ctx)?;
                let key_id = ctx.key.as_ref().map(|k| k.claims.jti.clone());
                Box::pin(deny::respond(session, denial, key_id.as_deref())).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let vendor = ctx
            .vendor
            .as_ref()
            .ok_or_else(|| Error::explain(InternalError, "no vendor"))?;
        self.upstreams
            .peer(vendor)
            .map(Box::new)
            .ok_or_else(|| Error::explain(ConnectNoRoute, "vendor host not resolved yet"))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let vendor = ctx
            .vendor
            .as_ref()
            .ok_or_else(|| Error::explain(InternalError, "no vendor"))?;
        let secret = ctx
            .secret
            .as_ref()
            .ok_or_else(|| Error::explain(InternalError, "no credential"))?;
        let uri = inject::upstream_uri(vendor, ctx.path(), session.req_header().uri.query())?;
        upstream.set_uri(uri);
        upstream.insert_header(http::header::HOST, vendor.upstream.host_header.clone())?;
        inject::strip_client_headers(upstream, vendor);
        inject::inject_credential(upstream, vendor, secret)?;
        if let Some(body) = &ctx.body {
            // The body goes out whole, with its length: framing is rewritten unless the
            // client's already says exactly that.
            let mut lengths = upstream
                .headers
                .get_all(http::header::CONTENT_LENGTH)
                .iter();
            let declared = match (lengths.next(), lengths.next()) {
                (Some(only), None) => only.to_str().ok().and_then(|v| v.parse::<usize>().ok()),
                _ => None,
            };
            if declared != Some(body.len())
                || upstream
                    .headers
                    .contains_key(http::header::TRANSFER_ENCODING)
            {
                upstream.remove_header(&http::header::TRANSFER_ENCODING);
                upstream.insert_header(
                    http::header::CONTENT_LENGTH,
                    http::HeaderValue::from(body.len()),
                )?;
            }
        }
        if ctx.body_was_read {
            // The whole body goes with the header: nothing to wait for a 100 for.
            upstream.remove_header(&http::header::EXPECT);
        }
        if ctx.converted_to_form {
            upstream.insert_header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )?;
        }
        if ctx.response_rule.is_some() || ctx.track_created {
            // The response is read to meter it; it must arrive uncompressed.
            upstream.remove_header(&http::header::ACCEPT_ENCODING);
        }
        if ctx.llm.is_some() {
            // The answer is read for its usage.
            upstream.remove_header(&http::header::ACCEPT_ENCODING);
        }
        ctx.upstream_start = Some(Instant::now());
        ctx.body_sent = false;
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _eos: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.body_was_read {
            // Send our complete copy once per attempt, whatever Pingora replays. Kept (a
            // reference count) for a retry on another connection.
            *body = if ctx.body_sent {
                None
            } else {
                ctx.body.clone()
            };
            ctx.body_sent = true;
            return Ok(());
        }
        if let Some(chunk) = body {
            ctx.streamed += chunk.len();
            if ctx.streamed > self.body_limit {
                ctx.denial = Some(Denial::BodyTooLarge);
                return Error::e_explain(HTTPStatus(413), "request body over the limit");
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if upstream.status.is_informational() {
            // `100 Continue`, `103 Early Hints`: the final answer is still to come, and it
            // alone settles or releases the reservation.
            return Ok(());
        }
        if let Some(call) = ctx.llm.as_mut() {
            call.response_header(upstream);
        }
        ctx.status = upstream.status.as_u16();
        let success = upstream.status.is_success();
        if success && ctx.response_rule.is_some() {
            // Settled to the answer's amount once its body is read (`logging`).
        } else if let Some(r) = ctx.reservation.take() {
            // A 5xx is an unknown outcome (the vendor may have acted, SPEC §5): the spend
            // stays. Anything else but a 2xx means it did not act.
            if success || upstream.status.is_server_error() {
                self.spend.settle(r);
            } else {
                self.spend.release(r);
                ctx.spend = Micros::ZERO;
            }
        }
        if let Some(h) = ctx
            .vendor
            .as_ref()
            .and_then(|v| v.request_id_header.as_ref())
        {
            ctx.vendor_request_id = upstream
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        if success
            && (ctx.response_rule.is_some() || ctx.track_created)
            && session.req_header().method != http::Method::HEAD
        {
            ctx.capture = Capture::On(Vec::new());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(value) = ctx.key.as_ref().and_then(|k| k.id_header.clone()) {
            response.insert_header("x-keybrake-key-id", value)?;
        }
        // A response without a body ends with its header: strict audit holds it here.
        let bodyless = session.req_header().method == http::Method::HEAD
            || matches!(response.status.as_u16(), 204 | 304)
            || response
                .headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0");
        if bodyless {
            self.audit_before_release(session, ctx)?;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if end_of_stream {
            self.audit_before_release(session, ctx)?;
        }
        Ok(None)
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        eos: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(call) = ctx.llm.as_mut() {
            call.response_body(body, eos);
        }
        if let (Capture::On(buf), Some(chunk)) = (&mut ctx.capture, body.as_ref()) {
            let limit = if ctx.response_rule.is_some() {
                MAX_METERED_CAPTURE
            } else {
                MAX_CAPTURE
            };
            if buf.len() + chunk.len() <= limit {
                buf.extend_from_slice(chunk);
            } else {
                ctx.capture = Capture::Overflowed;
            }
        }
        if eos {
            if let Some(start) = ctx.upstream_start {
                ctx.upstream_elapsed.get_or_insert(start.elapsed());
            }
            self.finish_capture(ctx);
        }
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let denial = match e.etype() {
            HTTPStatus(413) => Denial::BodyTooLarge,
            ConnectTimedout | ReadTimedout | WriteTimedout => Denial::UpstreamTimeout,
            _ if e.esource() == &ErrorSource::Upstream
                || matches!(
                    e.etype(),
                    ConnectNoRoute | ConnectRefused | ConnectError | TLSHandshakeFailure
                ) =>
            {
                Denial::UpstreamUnavailable
            }
            _ => {
                // The client went away or sent garbage: nobody to answer.
                ctx.denial.get_or_insert(Denial::InvalidBody);
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
        };
        ctx.denial = Some(denial);
        ctx.status = denial.status();
        let key_id = ctx.key.as_ref().map(|k| k.claims.jti.clone());
        // Nothing final sent yet (a `100 Continue` may have been).
        if session
            .response_written()
            .is_none_or(|r| r.status.is_informational())
        {
            self.settle_unanswered(ctx, Some(e));
            if let Err(err) = self.audit_before_release(session, ctx) {
                log::error!("error response withheld: {err}");
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            if let Err(err) = deny::respond(session, denial, key_id.as_deref()).await {
                log::debug!("cannot send the error response: {err}");
            }
        }
        FailToProxy {
            error_code: denial.status(),
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let now = now_secs();
        let llm = match ctx.llm.take() {
            Some(call) => Some(self.settle_llm(*call, ctx, e, now).await),
            None => None,
        };
        if ctx.capture.pending() {
            // The response was cut short (client or vendor gone): meter what arrived; a
            // truncated (or overflowed) response-metered answer cannot be read and is
            // charged as such.
            self.finish_capture(ctx);
        }
        match (ctx.response_charge.take(), &ctx.key, ctx.reservation.take()) {
            (Some(charge), Some(key), Some(r)) => {
                let spender = Spender {
                    key_id: &key.claims.jti,
                    tenant_id: &key.claims.ten,
                    vendor: &key.claims.ven,
                    cap: Micros(key.claims.cap),
                    exp: key.claims.exp,
                };
                ctx.spend = Box::pin(self.spend.settle_to(&spender, r, charge, now)).await;
            }
            (_, _, r) => {
                ctx.reservation = r;
                self.settle_unanswered(ctx, e);
            }
        }
        if let Some(pending) = ctx.idempotent.take() {
            if ctx.spend.is_positive() {
                pending.charged();
            }
        }

        let total = ctx.start.elapsed();
        let upstream = ctx
            .upstream_elapsed
            .or_else(|| ctx.upstream_start.map(|s| s.elapsed()));
        if let Some(u) = upstream {
            self.metrics.upstream_duration.observe(u.as_secs_f64());
        }
        self.metrics.overhead.observe(
            total
                .saturating_sub(upstream.unwrap_or_default())
                .as_secs_f64(),
        );
        let decision = ctx.denial.map_or("allowed", Denial::code);
        let status = final_status(session, ctx);
        // Label values stay bounded: unknown vendor names are folded into one.
        let vendor_label = if ctx.vendor.is_some() {
            ctx.vendor_name()
        } else {
            "unknown"
        };
        self.request_counters
            .inc(ctx.vendor.is_some().then_some(vendor_label), ctx.denial);

        let wall = std::time::SystemTime::now();
        let method = session.req_header().method.as_str().to_string();
        let key = ctx.key.as_ref().map(|k| &k.claims);
        if let Some(log) = &self.access_log {
            log.write(&AccessLine {
                ts: wall,
                key_id: key.map(|c| c.jti.as_str()),
                label: key.map(|c| c.lbl.as_str()),
                tenant: key.map(|c| c.ten.as_str()),
                vendor: vendor_label,
                method: &method,
                path: &ctx.canonical,
                status,
                decision,
                spend: ctx.spend,
                duration: total,
                vendor_request_id: ctx.vendor_request_id.as_deref(),
            });
        }
        if ctx.audited {
            return;
        }
        let vendor = vendor_label.to_string();
        self.audit.record(AuditEvent {
            ts_ms: unix_ms(wall),
            tenant_id: ctx.key.as_ref().map(|k| k.ten.clone()),
            key_id: ctx.key.as_ref().map(|k| k.jti.clone()),
            label: ctx.key.as_ref().map(|k| k.lbl.clone()),
            vendor,
            method,
            path: std::mem::take(&mut ctx.canonical),
            status,
            decision: decision.to_string(),
            spend: ctx.spend,
            vendor_request_id: ctx.vendor_request_id.take(),
            duration_ms: total.as_millis() as u64,
            llm,
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_capture_is_metered_once() {
        use super::Capture;
        let mut overflowed = Capture::Overflowed;
        assert_eq!(overflowed.finish(), Some(Err(())));
        // At the end of the body, then again in `logging`: nothing the second time.
        assert!(!overflowed.pending());
        assert_eq!(overflowed.finish(), None);
        let mut on = Capture::On(b"{}".to_vec());
        assert_eq!(on.finish(), Some(Ok(b"{}".to_vec())));
        assert_eq!(on.finish(), None);
        let mut off = Capture::Off;
        assert_eq!(off.finish(), None);
        assert!(!off.pending());
    }

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
