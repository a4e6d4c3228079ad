//! Stage 10, settle: a call's reservation is settled once its outcome is known (SPEC §5):
//! on the answer's header (`settle_on_answer`: a 2xx or a 5xx stays spent, anything
//! else is released);
//! at the end for a response-metered call (to the charge read from its answer) or a
//! token-metered one (to its usage); and for a request that got no answer (released
//! only if it surely never reached the vendor).

use super::ctx::{Ctx, Metering};
use super::llm;
use super::reserve::spender;
use super::service::KeybrakeProxy;
use crate::metrics::Metrics;
use crate::money::Micros;
use crate::sync::LlmAudit;
use pingora::prelude::*;

impl KeybrakeProxy {
    /// The final answer's header arrived with `status`.
    pub(super) fn settle_on_answer(&self, ctx: &mut Ctx, status: http::StatusCode) {
        if status.is_success() && ctx.metering.is_response() {
            // Settled to the answer's amount once its body is read (`settle`).
            return;
        }
        if let Some(r) = ctx.reservation.take() {
            // A 5xx is an unknown outcome (the vendor may have acted, SPEC §5): the spend
            // stays. Anything else but a 2xx means it did not act.
            if status.is_success() || status.is_server_error() {
                self.spend.settle(r);
            } else {
                self.spend.release(r);
                ctx.spend = Micros::ZERO;
            }
        }
    }

    /// Settles whatever is still open at the end of the request, and tells the first call
    /// of an idempotency key whether it was charged. Returns an LLM call's audit part.
    pub(super) async fn settle(
        &self,
        ctx: &mut Ctx,
        e: Option<&Error>,
        now: i64,
    ) -> Option<LlmAudit> {
        let mut llm = None;
        match std::mem::replace(&mut ctx.metering, Metering::Fixed) {
            Metering::Llm(call) => llm = Some(self.settle_llm(*call, ctx, e, now).await),
            Metering::Response {
                charge: Some(charge),
                ..
            } => match (ctx.key.clone(), ctx.reservation.take()) {
                (Some(key), Some(r)) => {
                    let who = spender(&key);
                    ctx.spend = Box::pin(self.spend.settle_to(&who, r, charge, now)).await;
                }
                (_, r) => {
                    ctx.reservation = r;
                    self.settle_unanswered(ctx, e);
                }
            },
            _ => self.settle_unanswered(ctx, e),
        }
        if let Some(pending) = ctx.idempotent.take() {
            if ctx.spend.is_positive() {
                pending.charged();
            }
        }
        llm
    }

    /// A call whose answer charged more than it reserved (a response-metered amount over
    /// the one looked up, an unreadable answer charged the whole cap, an LLM usage over
    /// its bound) is settled before the answer's last bytes leave: the excess is committed
    /// in the ledger, or past the cap reported to it, first. A process killed right after
    /// its client has the answer (kill -9, an edge node between two audit batches) so
    /// cannot lose a charge the vendor made. Rare: it blocks this worker thread for the
    /// ledger's answer (a SQLite transaction, or a round trip to the control plane), as
    /// strict audit does. Without a multi-threaded runtime it is left to `logging`.
    pub(super) fn settle_before_release(&self, ctx: &mut Ctx) {
        if ctx.settled_early.is_some() || ctx.key.is_none() || !charged_over_reserved(ctx) {
            return;
        }
        let handle = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => h,
            _ => return,
        };
        let now = crate::token::now_secs();
        let llm = tokio::task::block_in_place(|| handle.block_on(self.settle(ctx, None, now)));
        ctx.settled_early = Some(llm);
    }

    /// A reservation still open when no response arrived: if the request never left
    /// (connect failure), the budget goes back; otherwise the vendor may have acted on
    /// it, so it stays spent.
    pub(super) fn settle_unanswered(&self, ctx: &mut Ctx, e: Option<&Error>) {
        if let Some(r) = ctx.reservation.take() {
            if never_sent(ctx, e) {
                self.spend.release(r);
                ctx.spend = Micros::ZERO;
            } else {
                self.spend.settle(r);
            }
        }
    }

    /// Settles an LLM call at its end: the usage's cost out of its reservation (the rest
    /// goes back), or all of it when no usage could be read; counts the tokens.
    async fn settle_llm(
        &self,
        call: llm::Call,
        ctx: &mut Ctx,
        e: Option<&Error>,
        now: i64,
    ) -> LlmAudit {
        let never_sent = never_sent(ctx, e);
        let model = call.model.clone();
        let outcome = call.finish(never_sent);
        ctx.spend = outcome.charge;
        match &ctx.key {
            Some(key) => {
                self.spend
                    .settle_part(outcome.reservation, outcome.charge, &spender(key), now)
                    .await
            }
            None => self.spend.release(outcome.reservation),
        }
        if let Some(u) = &outcome.usage {
            count_tokens(&self.metrics, ctx.vendor_name(), u);
        }
        llm_audit(model, outcome.usage)
    }
}

/// Whether the answer, read to its end, charged the call more than it has reserved.
fn charged_over_reserved(ctx: &Ctx) -> bool {
    match &ctx.metering {
        Metering::Response {
            charge: Some(charge),
            ..
        } => ctx.reservation.as_ref().is_some_and(|r| *charge > r.amount),
        Metering::Llm(call) => call.charge(false).0 > call.held(),
        _ => false,
    }
}

/// Whether a request that got no answer surely never reached the vendor: it was not
/// sent, or the connection to the vendor failed. Anything else may have been acted on.
pub fn never_sent(ctx: &Ctx, e: Option<&Error>) -> bool {
    ctx.upstream_start.is_none() || e.is_some_and(|e| is_connect_failure(e.etype()))
}

/// An error connecting to the vendor: the request surely did not reach it.
pub fn is_connect_failure(etype: &ErrorType) -> bool {
    matches!(
        etype,
        ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | TLSHandshakeFailure
    )
}

/// Counts an LLM call's tokens by kind.
fn count_tokens(metrics: &Metrics, vendor: &str, u: &llm::usage::Usage) {
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
            metrics
                .llm_tokens
                .with_label_values(&[vendor, kind])
                .inc_by(n);
        }
    }
}

/// The model and tokens an LLM call's audit event carries.
pub fn llm_audit(model: String, usage: Option<llm::usage::Usage>) -> LlmAudit {
    LlmAudit {
        model,
        input_tokens: usage.map(|u| u.input_total()),
        cached_input_tokens: usage.map(|u| u.cached_input),
        cache_write_tokens: usage.map(|u| u.cache_write.saturating_add(u.cache_write_1h)),
        output_tokens: usage.map(|u| u.output),
    }
}
