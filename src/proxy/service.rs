//! The Pingora `ProxyHttp` implementation. It only wires the stages, in order (`admit`):
//! route → authenticate → scope → credential → plan the body → price → reserve; then
//! inject → forward → settle → charge from the answer → record. Each stage is a plain
//! function or a short method in its own module; what the request carries between them
//! is `Ctx` (`ctx`).

use super::body_plan::{self, BodyPlan};
use super::body_read::read_body;
use super::charges::ChargeMemory;
use super::ctx::{Body, Capture, Ctx, Metering};
use super::deny::{self, Denial};
use super::forward::REPLAY_LIMIT;
use super::idempotency::IdempotencyBook;
use super::llm;
use super::path;
use super::price::{self, Lookups, Pricing};
use super::record::{self, AccessLogWriter};
use super::reserve::{refused, spender};
use super::spend::SpendBook;
use super::upstream::Upstreams;
use super::verify::{KeyVerifier, VerifiedKey};
use super::{extract, inject, scope};
use crate::config::{Currency, Vendor};
use crate::metrics::{Metrics, RequestCounters};
use crate::money::Micros;
use crate::secret::Secret;
use crate::sync::{AuditSink, Published};
use crate::token::now_secs;
use crate::Map;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Each write of the response to the client, at most (`proxy.write_timeout_ms`; the
    /// listener also checks it on the socket, for every write).
    pub client_write_timeout: Duration,
    /// The proxy listener's HTTP/2 connections: a stream marks its connection busy.
    pub h2_conns: Arc<crate::conns::H2Conns>,
    pub verifier: Arc<KeyVerifier>,
    pub spend: Arc<SpendBook>,
    pub upstreams: Arc<Upstreams>,
    pub published: Arc<Published>,
    pub audit: Arc<dyn AuditSink>,
    pub access_log: Option<AccessLogWriter>,
    pub metrics: Arc<Metrics>,
    /// `metrics.requests` by vendor and decision, kept (see `RequestCounters`).
    pub request_counters: RequestCounters,
    /// What each key was charged for the objects it created or confirmed
    /// (`skip_if_created_by_same_key`).
    pub charges: ChargeMemory,
    /// Upstream connections for `forward_read_body` and the lookups (built from the same
    /// server configuration as Pingora's own).
    pub connector: pingora::connectors::http::Connector,
    /// (key, `Idempotency-Key`) pairs already charged.
    pub idempotency: Arc<IdempotencyBook>,
    /// How long a duplicate waits for the first call of its idempotency key to settle.
    pub idempotent_wait: Duration,
    /// LLM prices (`conf/prices.yaml`).
    pub prices: Arc<llm::PriceTable>,
    /// `llm_multi_pass_tools: allow` (`llm::plan`).
    pub multi_pass_tools: bool,
}

/// `invalid_key`'s message for a control API token sent to the proxy.
const CONTROL_TOKEN_ON_PROXY: &str = "This is a Keybrake control API token (kb_…, kba_… or \
     kbn_…), not a vault key: ask the control API for a vault key (POST /v1/keys, or \
     keybrake key issue) and send that.";

impl KeybrakeProxy {
    /// Stages 1 to 7. On success the request may go upstream; on error nothing was sent.
    async fn admit(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), Denial> {
        let now = now_secs();
        inject::drop_connection_named_headers(session.req_header_mut());
        // 1. route
        if let Err(denial) = self.route_as_sent(session.req_header(), ctx) {
            // A key that tried a path trick is named in its tenant's audit, with the path
            // as it came (when the key verifies; nothing else of the request is looked at).
            let _ = self.authenticate(session.req_header(), ctx, now).await;
            return Err(denial);
        }
        // 2. authenticate
        let key = self.authenticate(session.req_header(), ctx, now).await?;
        // Told only to a valid key: the vendor's name does not say whether it exists.
        let vendor = ctx.vendor.clone().ok_or(Denial::UnknownVendor)?;
        let req = session.req_header();
        // A vault key anywhere else would reach the vendor (and its request logs) as sent.
        let presented = extract::vault_key(&req.headers);
        let stray = extract::stray_vault_key(
            &ctx.canonical,
            req.uri.query(),
            &req.headers,
            &vendor.strip_headers,
            presented.as_deref(),
        );
        if let Some(place) = stray {
            ctx.denial_message = Some(format!(
                "A vault key was found in {place}: the proxy reads keys only from \
                 Authorization, x-api-key or the Basic user name, and refuses a request \
                 that carries one anywhere else, where it could reach the vendor."
            ));
            return Err(Denial::InvalidKey);
        }
        // 3. scope
        scope::check(&key, &vendor, &req.method, ctx.path(), &req.headers).inspect_err(|d| {
            if *d == Denial::MethodNotAllowed && !scope::is_standard(&req.method) {
                ctx.denial_message = Some(format!(
                    "{:?} is not a method any vendor API uses (methods are case-sensitive): \
                     refused whatever the key allows.",
                    req.method.as_str()
                ));
            }
        })?;
        // 4. credential
        let secret = inject::credential(&self.published, &key)?;
        // 5. plan the body: the catalog's class first (an unmetered call is refused before
        // its body is waited for)
        let rule = price::classify(&vendor, &req.method, ctx.path())?;
        let refused = vendor.refused_fields(&req.method, ctx.path());
        let plan = body_plan::plan(
            req,
            &vendor,
            ctx.path(),
            rule.as_deref(),
            refused,
            self.body_limit,
        )?;
        let (metered, convert) = match plan {
            BodyPlan::Stream => (false, false),
            BodyPlan::Read {
                metered, convert, ..
            } => (metered, convert),
            BodyPlan::Llm(api) => {
                // Token-metered: planned, priced and reserved by its own stage.
                return Box::pin(self.admit_llm(session, ctx, api, &key, secret, now)).await;
            }
        };
        if plan != BodyPlan::Stream {
            let read = read_body(session, self.body_limit, self.body_timeout).await?;
            let (bytes, form) = body_plan::prepare(read, metered, convert, self.body_limit)?;
            body_plan::screen(&bytes, form, refused)?;
            ctx.body = Body::Read {
                bytes,
                form,
                sent: false,
            };
        }
        // 6. price (from objects the vendor reads first, only while the key has room)
        if let Some(rule) = rule.as_deref().filter(|r| r.reads_vendor()) {
            self.room_before_lookups(session.req_header(), ctx, &key, &secret, rule, now)
                .await?;
        }
        let pricing = Pricing {
            vendor: &vendor,
            path: ctx.path(),
            jti: &key.claims.jti,
            charges: &self.charges,
            currencies: &self.currencies,
            lookups: self.lookups(&vendor, &secret, session),
        };
        let (cost, metering) = pricing
            .price(rule.as_ref(), ctx.body.read().map(|b| &b[..]))
            .await?;
        ctx.metering = metering;
        // 7. reserve
        self.reserve(session.req_header(), ctx, &key, &secret, cost, now)
            .await?;
        ctx.secret = Some(secret);
        Ok(())
    }

    /// Stage 1, route: the canonical path, and the vendor it names (if known).
    fn route(&self, req: &RequestHeader, ctx: &mut Ctx) -> Result<(), Denial> {
        let canonical = path::canonicalize(req.uri.path()).map_err(|_| Denial::InvalidPath)?;
        let (vendor_name, rest) = path::split_vendor(&canonical).ok_or(Denial::InvalidPath)?;
        ctx.vendor = self.vendors.get(vendor_name).cloned();
        ctx.rest_at = canonical.len() - rest.len();
        ctx.canonical = canonical;
        Ok(())
    }

    /// `route`, and when the path is refused, the path as sent and the catalog vendor its
    /// first segment names, for the access log, the metrics and the audit.
    fn route_as_sent(&self, req: &RequestHeader, ctx: &mut Ctx) -> Result<(), Denial> {
        self.route(req, ctx).inspect_err(|_| {
            let raw = req.uri.path();
            ctx.canonical = path::as_sent(raw);
            // A catalog vendor's name is printable ASCII: `as_sent` kept it as it came.
            let named = path::split_vendor(raw)
                .and_then(|(v, _)| Some((v.len(), self.vendors.get(v)?.clone())));
            if let Some((len, vendor)) = named {
                ctx.rest_at = 1 + len;
                ctx.vendor = Some(vendor);
            }
        })
    }

    /// Stage 2, authenticate: the vault key, verified (a key that fails still names its
    /// id in the audit when its signature was good).
    async fn authenticate(
        &self,
        req: &RequestHeader,
        ctx: &mut Ctx,
        now: i64,
    ) -> Result<Arc<VerifiedKey>, Denial> {
        let token = extract::vault_key(&req.headers).ok_or(Denial::MissingKey)?;
        let key = self
            .verifier
            .verify(&token, now)
            .await
            .map_err(|(denial, key)| {
                ctx.key = key;
                if denial == Denial::InvalidKey && crate::ids::is_control_token(&token) {
                    ctx.denial_message = Some(CONTROL_TOKEN_ON_PROXY.into());
                }
                denial
            })?;
        ctx.key = Some(key.clone());
        Ok(key)
    }

    fn lookups<'a>(
        &'a self,
        vendor: &'a Vendor,
        secret: &'a Secret,
        s: &'a Session,
    ) -> Lookups<'a> {
        Lookups {
            connector: &self.connector,
            upstreams: &self.upstreams,
            vendor,
            secret,
            currencies: &self.currencies,
            headers: &s.req_header().headers,
        }
    }

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
        let headers = &session.req_header().headers;
        if headers.contains_key(http::header::CONTENT_ENCODING) {
            // A compressed body cannot be read for its model and limits.
            return Err(Denial::InvalidLlmBody);
        }
        llm::check_headers(api, headers)?;
        let body = read_body(session, self.body_limit, self.body_timeout).await?;
        let plan = llm::plan(
            api,
            &body,
            &self.prices,
            &key.claims.ven,
            self.multi_pass_tools,
        )
        .map_err(|r| {
            ctx.denial_message = r.message;
            r.denial
        })?;
        ctx.body = Body::Read {
            bytes: plan.body.unwrap_or(body),
            form: false,
            sent: false,
        };
        // The body may have taken until `body_read_timeout`: a key that expired or was
        // revoked meanwhile sends nothing (checked again after the reservation too).
        self.still_valid(key)?;
        let reserved = self.spend.reserve(&spender(key), plan.bound, now).await;
        let reservation = reserved.map_err(refused)?;
        if let Err(denial) = self.still_valid(key) {
            self.spend.release(reservation);
            return Err(denial);
        }
        ctx.spend = reservation.amount;
        let mut call = plan.call;
        call.hold(reservation, Micros(key.claims.cap), &key.claims.ten);
        ctx.metering = Metering::Llm(Box::new(call));
        ctx.secret = Some(secret);
        Ok(())
    }

    /// Answers a refusal: nothing was sent upstream, any reservation goes back.
    async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, denial: Denial) -> Result<()> {
        if let Some(r) = ctx.reservation.take() {
            self.spend.release(r);
        }
        ctx.denial = Some(denial);
        ctx.status = denial.status();
        ctx.spend = Micros::ZERO;
        self.audit_before_release(session, ctx)?;
        let key_id = ctx.key.as_ref().map(|k| k.claims.jti.clone());
        let message = ctx.denial_message.take();
        deny::respond(session, denial, key_id.as_deref(), message.as_deref()).await
    }
}

#[async_trait]
impl ProxyHttp for KeybrakeProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            session.set_keepalive(None);
        }
        // A client that stops reading would hold its connection (and the call's upstream
        // connection) for ever: Pingora sets no downstream write timeout of its own.
        session.set_write_timeout(Some(self.client_write_timeout));
        if session.is_http2() {
            let at = session
                .digest()
                .and_then(|d| d.socket_digest.as_ref())
                .map(|d| Arc::as_ptr(d) as usize);
            if let Some(count) = at.and_then(|at| self.h2_conns.get(at)) {
                count.begin();
                ctx.h2_stream = Some(crate::conns::StreamGuard(count));
            }
        }
        // The rare paths are boxed: async_trait boxes this hook's future on every request,
        // copying its full size, and inline they would make it ~11 KB instead of ~1 KB.
        let admitted = if self.staleness.is_stale() {
            // What was refused, for the access log and the metrics.
            let _ = self.route_as_sent(session.req_header(), ctx);
            Err(Denial::ControlUnreachable)
        } else if self.audit.is_strict() && self.audit.is_failing() {
            let _ = self.route_as_sent(session.req_header(), ctx);
            Err(Denial::AuditUnavailable)
        } else {
            self.admit(session, ctx).await
        };
        match admitted {
            Ok(()) if ctx.body.read_len() > REPLAY_LIMIT => {
                Box::pin(self.forward_read_body(session, ctx)).await;
                Ok(true)
            }
            Ok(()) => Ok(false),
            Err(denial) => {
                Box::pin(self.refuse(session, ctx, denial)).await?;
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
        if let Body::Read { bytes, form, sent } = &mut ctx.body {
            inject::set_body_length(upstream, bytes.len())?;
            // The whole body goes with the header: nothing to wait for a 100 for.
            upstream.remove_header(&http::header::EXPECT);
            if *form {
                let form_type = "application/x-www-form-urlencoded";
                upstream.insert_header(http::header::CONTENT_TYPE, form_type)?;
            }
            *sent = false;
        } else if let Body::Streamed { counted } = &mut ctx.body {
            // A retry replays what Pingora kept of the body: counted again from the start.
            *counted = 0;
        }
        if ctx.metering.reads_answer() {
            // The answer is read to meter it: it must arrive uncompressed.
            upstream.remove_header(&http::header::ACCEPT_ENCODING);
        }
        ctx.upstream_start = Some(Instant::now());
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _eos: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        match &mut ctx.body {
            Body::Read { bytes, sent, .. } => {
                // Our complete copy, once per attempt, whatever Pingora replays. Kept (a
                // reference count) for a retry on another connection.
                *body = (!*sent).then(|| bytes.clone());
                *sent = true;
            }
            Body::Streamed { counted } => {
                *counted += body.as_ref().map_or(0, Bytes::len);
                if *counted > self.body_limit {
                    ctx.denial = Some(Denial::BodyTooLarge);
                    return Error::e_explain(HTTPStatus(413), "request body over the limit");
                }
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
        inject::drop_hop_by_hop(upstream);
        if let Metering::Llm(call) = &mut ctx.metering {
            call.response_header(upstream);
        }
        ctx.status = upstream.status.as_u16();
        if super::settle::replayed(session.req_header(), upstream, ctx) {
            self.release_replay(ctx);
        }
        self.settle_on_answer(ctx, upstream.status);
        if let Some(h) = ctx
            .vendor
            .as_ref()
            .and_then(|v| v.request_id_header.as_ref())
        {
            let id = upstream.headers.get(h).and_then(|v| v.to_str().ok());
            ctx.vendor_request_id = id.map(str::to_string);
        }
        if upstream.status.is_success()
            && ctx.metering.captures()
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
        // Stopping since the request came in: its answer closes the connection too
        // (`Connection: close`), so the client does not send another one to it.
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            session.set_keepalive(None);
        }
        // A response without a body ends with its header: strict audit holds it here.
        let bodyless = session.req_header().method == http::Method::HEAD
            || matches!(response.status.as_u16(), 204 | 304)
            || response
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().parse::<u64>() == Ok(0));
        if bodyless {
            self.finish_capture(ctx);
            self.settle_before_release(ctx);
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
            self.settle_before_release(ctx);
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
        if let Metering::Llm(call) = &mut ctx.metering {
            call.response_body(body, eos);
        }
        if let Some(chunk) = body.as_ref() {
            Self::capture(ctx, chunk);
        }
        if eos {
            if let Some(start) = ctx.upstream_start {
                ctx.upstream_elapsed.get_or_insert(start.elapsed());
            }
            self.finish_capture(ctx);
        }
        Ok(None)
    }

    /// An error once the request may have gone upstream (Pingora's default retries an
    /// idempotent method on a reused connection even after it was written whole, and
    /// never a `POST` whose write failed): any method is tried again on another
    /// connection while the request was not written whole (a write to a stale pooled
    /// connection failed), and if no attempt reached the vendor whole its reservation
    /// goes back. Once written whole, only an idempotent method that cannot cost
    /// anything goes again: nothing reserved and no answer metered (a `PUT` or `DELETE`
    /// is idempotent by the RFC, but a vendor may bill each request, as a per-request
    /// price does any). A request written whole may have arrived, so a later attempt's
    /// connect failure does not give its reservation back.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        // A write to the vendor failed (not one to the client, which fails as WriteError
        // too): the request did not go out whole.
        // (A `100 Continue` the proxy answered a client's `Expect` with is no answer.)
        let unwritten = *e.etype() == WriteError
            && *e.esource() == pingora::ErrorSource::Upstream
            && session
                .response_written()
                .is_none_or(|r| r.status == http::StatusCode::CONTINUE);
        ctx.may_have_arrived |= !unwritten;
        if !ctx.may_have_arrived {
            // No attempt reached the vendor whole: unless a retry does, `logging`
            // releases the reservation (a retry's request filter sets it again).
            ctx.upstream_start = None;
        }
        let mut e = e.more_context(format!("Peer: {peer}"));
        let method = &session.req_header().method;
        let free = !ctx.spend.is_positive() && !ctx.metering.reads_answer();
        if session.as_ref().retry_buffer_truncated() {
            e.set_retry(false);
        } else if unwritten {
            // Whatever the method: the vendor got no whole request to act on. An I/O
            // error is never retried by its own decision: only on a reused connection
            // (the keep-alive race), as Pingora decides for the rest.
            e.set_retry(client_reused);
        } else if !method.is_idempotent() {
            e.set_retry(false);
        } else if free {
            e.retry.decide_reuse(client_reused);
        } else {
            e.set_retry(false);
        }
        e
    }

    /// Names the request in Pingora's error lines without its query string or headers,
    /// which may carry a token.
    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        record::summary(session.req_header().method.as_str(), &ctx.canonical)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let nobody = FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        };
        let Some(denial) = deny::for_proxy_error(e) else {
            // The client went away or sent garbage: nobody to answer. Before anything
            // went to the vendor, the request was unreadable; once it went (a streamed
            // body broken halfway, a client closing a finished or unwanted stream), the
            // call was allowed, and is recorded so (status 0 if no answer came).
            if ctx.upstream_start.is_none()
                && session
                    .response_written()
                    .is_none_or(|r| r.status.is_informational())
            {
                ctx.denial.get_or_insert(Denial::InvalidBody);
            }
            return nobody;
        };
        // The vendor's answer is late because it waits for a body the client has not
        // finished sending: the client's delay, not the vendor's. (A connect or write
        // timeout is the vendor's whatever the body.)
        let denial = match denial {
            Denial::UpstreamTimeout
                if *e.etype() == ErrorType::ReadTimedout && !session.is_body_done() =>
            {
                Denial::BodyTimeout
            }
            other => other,
        };
        ctx.denial = Some(denial);
        ctx.status = denial.status();
        // Nothing final sent yet (a `100 Continue` may have been).
        if session
            .response_written()
            .is_none_or(|r| r.status.is_informational())
        {
            self.settle_unanswered(ctx, Some(e));
            if let Err(err) = self.audit_before_release(session, ctx) {
                log::error!("error response withheld: {err}");
                return nobody;
            }
            let key_id = ctx.key.as_ref().map(|k| k.claims.jti.clone());
            let why = (denial == Denial::UpstreamUnavailable).then(|| deny::unreachable(e));
            if let Err(err) = deny::respond(session, denial, key_id.as_deref(), why).await {
                log::debug!("cannot send the error response: {err}");
            }
        }
        FailToProxy {
            error_code: denial.status(),
            can_reuse_downstream: false,
        }
    }

    /// The end of every request: settle, charge from the answer, record.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        // An answer cut short (client or vendor gone) is metered from what arrived; a
        // truncated or overflowed response-metered answer cannot be read, and is charged
        // as such.
        self.finish_capture(ctx);
        let llm = match ctx.settled_early.take() {
            Some(llm) => llm,
            None => self.settle(ctx, e, now_secs()).await,
        };
        self.record(session, ctx, llm);
    }
}
