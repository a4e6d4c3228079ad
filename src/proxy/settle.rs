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
use super::spend::{Reservation, SpendBook};
use super::verify::VerifiedKey;
use crate::log_every::LogEvery;
use crate::metrics::Metrics;
use crate::money::Micros;
use crate::sync::LlmAudit;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Whether the vendor answered `upstream` as its replay of an earlier call's answer to
/// `req` (`Vendor::idempotent_replayed_header` set to `true`), `req` carrying one
/// `Idempotency-Key`. Not for a token-metered call, whose usage says what it spent.
pub(super) fn replayed(req: &RequestHeader, upstream: &ResponseHeader, ctx: &Ctx) -> bool {
    let Some(header) = (ctx.vendor.as_ref()).and_then(|v| v.idempotent_replayed_header.as_ref())
    else {
        return false;
    };
    !matches!(ctx.metering, Metering::Llm(_))
        && req.headers.get_all("idempotency-key").iter().count() == 1
        && (upstream.headers.get(header))
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

impl KeybrakeProxy {
    /// A replayed answer moved no money (the call that made it was counted then, by
    /// this process or another, or settled as spent when its holder died): the call's
    /// reservation goes back and nothing is charged from the answer.
    pub(super) fn release_replay(&self, ctx: &mut Ctx) {
        if let Some(r) = ctx.reservation.take() {
            self.spend.release(r);
        }
        ctx.spend = Micros::ZERO;
        ctx.metering = Metering::Fixed;
    }

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
        let (llm, settlement) = self.decide(ctx, e);
        if let Some(settlement) = settlement {
            Box::pin(settlement.run(&self.spend, now)).await;
        }
        llm
    }

    /// Decides how the call ends: what it spent (`ctx.spend`; the first call of an
    /// idempotency key is told), an LLM call's tokens and audit part, and what is left
    /// for the ledger (`Settlement`), which no longer needs the request.
    fn decide(&self, ctx: &mut Ctx, e: Option<&Error>) -> (Option<LlmAudit>, Option<Settlement>) {
        let mut llm = None;
        let mut settlement = None;
        match std::mem::replace(&mut ctx.metering, Metering::Fixed) {
            Metering::Llm(call) => {
                let model = call.model.clone();
                let outcome = call.finish(never_sent(ctx, e));
                ctx.spend = outcome.charge;
                if outcome.usage.is_none() && outcome.charge > outcome.reservation.amount {
                    log::warn!(
                        "{} answer for key {} has no readable usage, and the vendor may have \
                         sampled the model more than once: charging the key's daily cap",
                        ctx.vendor_name(),
                        ctx.key.as_ref().map_or("?", |k| &*k.jti)
                    );
                }
                if let Some(u) = &outcome.usage {
                    count_tokens(&self.metrics, ctx.vendor_name(), u);
                }
                match &ctx.key {
                    Some(key) => {
                        settlement = Some(Settlement::Part {
                            key: key.clone(),
                            reservation: outcome.reservation,
                            charge: outcome.charge,
                        })
                    }
                    None => self.spend.release(outcome.reservation),
                }
                llm = Some(llm_audit(model, outcome.usage));
            }
            Metering::Response {
                charge: Some(charge),
                ..
            } => match (ctx.key.clone(), ctx.reservation.take()) {
                (Some(key), Some(reservation)) => {
                    ctx.spend = charge.max(Micros::ZERO);
                    settlement = Some(Settlement::To {
                        key,
                        reservation,
                        charge,
                    });
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
        (llm, settlement)
    }

    /// A call whose answer charged more than it reserved (a response-metered amount over
    /// the one looked up, an unreadable answer charged the whole cap, an LLM usage over
    /// its bound) is settled before the answer's last bytes leave: the excess is committed
    /// in the ledger, or past the cap reported to it, first. A process killed right after
    /// its client has the answer (kill -9, an edge node between two audit batches) so
    /// cannot lose a charge the vendor made.
    ///
    /// Rare, and bounded: this worker thread waits for the ledger (as strict audit waits
    /// for the trail) at most `HOLD_AT_MOST`, and at most `MAX_HELD_ANSWERS` answers wait
    /// at once (each holds a thread of the runtime's blocking pool, which an edge node's
    /// ledger calls need too). Past either, the answer goes and its settlement goes on
    /// after it, as every other call's does. Without a multi-threaded runtime, too.
    pub(super) fn settle_before_release(&self, ctx: &mut Ctx) {
        if ctx.settled_early.is_some() || ctx.key.is_none() || !charged_over_reserved(ctx) {
            return;
        }
        let handle = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => h,
            _ => return,
        };
        let Some(_held) = HeldAnswer::take() else {
            if let Some(left_out) = HOLD_SKIPPED_LOG.due() {
                log::warn!(
                    "{MAX_HELD_ANSWERS} answers already wait for their charge to reach the \
                     ledger: this one goes first ({left_out} more since the last line)"
                );
            }
            return;
        };
        let (llm, settlement) = self.decide(ctx, None);
        ctx.settled_early = Some(llm);
        let Some(settlement) = settlement else { return };
        let spend = self.spend.clone();
        let now = crate::token::now_secs();
        let task = handle.spawn(async move { settlement.run(&spend, now).await });
        let waited = tokio::task::block_in_place(|| {
            handle.block_on(tokio::time::timeout(HOLD_AT_MOST, task))
        });
        if waited.is_err() {
            if let Some(left_out) = HOLD_SKIPPED_LOG.due() {
                log::warn!(
                    "the ledger took longer than {HOLD_AT_MOST:?} to take a charge learned \
                     from an answer: the answer went first, the charge follows \
                     ({left_out} more since the last line)"
                );
            }
        }
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
}

/// At most this many answers wait for their charge at once (`settle_before_release`).
const MAX_HELD_ANSWERS: usize = 64;

/// An answer waits at most this long for its charge to reach the ledger.
const HOLD_AT_MOST: std::time::Duration = std::time::Duration::from_secs(5);

static HELD_ANSWERS: AtomicUsize = AtomicUsize::new(0);

static HOLD_SKIPPED_LOG: LogEvery = LogEvery::new(std::time::Duration::from_secs(60));

/// One of the `MAX_HELD_ANSWERS` places, given back when dropped.
struct HeldAnswer;

impl HeldAnswer {
    fn take() -> Option<HeldAnswer> {
        HELD_ANSWERS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_HELD_ANSWERS).then_some(n + 1)
            })
            .ok()
            .map(|_| HeldAnswer)
    }
}

impl Drop for HeldAnswer {
    fn drop(&mut self) {
        HELD_ANSWERS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What is left of a call's end for the spend book once it is decided (`decide`): it owns
/// what it needs, so it can finish after the request.
enum Settlement {
    /// A response-metered call: to the answer's charge.
    To {
        key: Arc<VerifiedKey>,
        reservation: Reservation,
        charge: Micros,
    },
    /// An LLM call: the charge out of its reservation, the rest back.
    Part {
        key: Arc<VerifiedKey>,
        reservation: Reservation,
        charge: Micros,
    },
}

impl Settlement {
    async fn run(self, spend: &SpendBook, now: i64) {
        match self {
            Settlement::To {
                key,
                reservation,
                charge,
            } => {
                spend
                    .settle_to(&spender(&key), reservation, charge, now)
                    .await;
            }
            Settlement::Part {
                key,
                reservation,
                charge,
            } => {
                spend
                    .settle_part(reservation, charge, &spender(&key), now)
                    .await
            }
        }
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
    ctx.upstream_start.is_none()
        || (!ctx.may_have_arrived && e.is_some_and(|e| is_connect_failure(e.etype())))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_held_answers_wait_at_once_and_a_place_comes_back_when_dropped() {
        let held: Vec<HeldAnswer> = std::iter::from_fn(HeldAnswer::take).take(1000).collect();
        assert_eq!(held.len(), MAX_HELD_ANSWERS);
        assert!(HeldAnswer::take().is_none());
        drop(held);
        assert!(HeldAnswer::take().is_some());
    }
}
