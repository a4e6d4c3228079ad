//! Stage 11, record (the audit part): the audit event of a request (SPEC §6), built in one place (`event`), and recorded
//! either after the response (`record`) or, under `audit.durability: strict`
//! (docs/storage.md), made durable before the response's last bytes leave
//! (`audit_before_release`).

use super::ctx::{Ctx, Metering};
use super::deny::Denial;
use super::service::KeybrakeProxy;
use super::settle::llm_audit;
use crate::money::Micros;
use crate::sync::{AuditEvent, LlmAudit};
use pingora::prelude::*;
use pingora::proxy::Session;
use std::time::{Duration, SystemTime};

/// Longest a response waits for its audit event under `audit.durability: strict`.
const STRICT_AUDIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The audit event of the request `ctx` describes, at `wall`, charged `spend`.
pub fn event(
    session: &Session,
    ctx: &Ctx,
    wall: SystemTime,
    spend: Micros,
    llm: Option<LlmAudit>,
) -> AuditEvent {
    let key = ctx.key.as_ref();
    AuditEvent {
        ts_ms: unix_ms(wall),
        tenant_id: key.map(|k| k.ten.clone()),
        key_id: key.map(|k| k.jti.clone()),
        label: key.map(|k| k.lbl.clone()),
        vendor: ctx.vendor_label().to_string(),
        method: session.req_header().method.as_str().to_string(),
        path: ctx.canonical.clone(),
        status: final_status(session, ctx),
        decision: ctx.denial.map_or("allowed", Denial::code).to_string(),
        spend,
        vendor_request_id: ctx.vendor_request_id.clone(),
        duration_ms: ctx.start.elapsed().as_millis() as u64,
        llm,
    }
}

/// The status the client was answered (0 when nothing final was sent).
pub fn final_status(session: &Session, ctx: &Ctx) -> u16 {
    if ctx.status != 0 {
        return ctx.status;
    }
    session
        .response_written()
        .filter(|r| !r.status.is_informational())
        .map_or(0, |r| r.status.as_u16())
}

/// Milliseconds since the Unix epoch, for audit events.
fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl KeybrakeProxy {
    /// Strict durability: the event is made durable before the response is released;
    /// `record` then writes no event. The wait (a group commit, a few ms) blocks this
    /// worker thread, handed over to the runtime meanwhile. An event that cannot be made
    /// durable withholds the response.
    pub(super) fn audit_before_release(&self, session: &Session, ctx: &mut Ctx) -> Result<()> {
        if ctx.audited || !self.audit.is_strict() {
            return Ok(());
        }
        ctx.audited = true;
        // A response- or token-metered call is settled to this charge at the end.
        let (spend, llm) = match &ctx.metering {
            Metering::Llm(call) => {
                let (charge, usage) = call.charge(false);
                (charge, Some(llm_audit(call.model.clone(), usage)))
            }
            _ => (ctx.expected_spend(), None),
        };
        let event = event(session, ctx, SystemTime::now(), spend, llm);
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
}
