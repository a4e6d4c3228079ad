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

/// Most bytes of an audit event's `path`. The request line can be tens of KiB, and the
/// canonical path keeps `"`, which JSON doubles: unbounded, one request (even one with no
/// key) makes an event bigger than an edge node may send the control plane in a batch
/// (64 KiB), and the node's audit upload would stall behind it.
pub const MAX_PATH_BYTES: usize = 2048;
/// Most bytes of `method`: any HTTP token is accepted as a method, of any length.
pub const MAX_METHOD_BYTES: usize = 32;
/// Most bytes of the other free text: `llm.model` (from the request body, any string when
/// the vendor has a default price), `vendor_request_id` (an upstream response header) and
/// `label` (capped at 200 by the control API, bounded here all the same).
pub const MAX_TEXT_BYTES: usize = 256;
/// Ends a cut text, so a reader sees it was cut.
const CUT_MARK: &str = "…";

/// The audit event of the request `ctx` describes, at `wall`, charged `spend`.
pub fn event(
    session: &Session,
    ctx: &Ctx,
    wall: SystemTime,
    spend: Micros,
    llm: Option<LlmAudit>,
) -> AuditEvent {
    let key = ctx.key.as_ref();
    bounded(AuditEvent {
        ts_ms: unix_ms(wall),
        tenant_id: key.map(|k| k.ten.clone()),
        key_id: key.map(|k| k.jti.clone()),
        label: key.map(|k| k.lbl.clone()),
        vendor: ctx.vendor_label().to_string(),
        method: session.req_header().method.as_str().to_string(),
        path: super::path::without_tokens(&ctx.canonical).into_owned(),
        status: final_status(session, ctx),
        decision: ctx.denial.map_or("allowed", Denial::code).to_string(),
        spend,
        vendor_request_id: ctx.vendor_request_id.clone(),
        duration_ms: ctx.start.elapsed().as_millis() as u64,
        llm,
    })
}

/// `event` with every text a request (or its upstream) controls cut to its bound, so an
/// event's size is bounded whatever the request: its JSON is under 10 KiB.
pub fn bounded(mut event: AuditEvent) -> AuditEvent {
    cut(&mut event.path, MAX_PATH_BYTES);
    cut(&mut event.method, MAX_METHOD_BYTES);
    cut(&mut event.vendor, MAX_TEXT_BYTES);
    cut(&mut event.decision, MAX_TEXT_BYTES);
    if let Some(id) = &mut event.vendor_request_id {
        cut(id, MAX_TEXT_BYTES);
    }
    if let Some(llm) = &mut event.llm {
        cut(&mut llm.model, MAX_TEXT_BYTES);
    }
    if let Some(label) = event.label.as_mut().filter(|l| l.len() > MAX_TEXT_BYTES) {
        let mut text = label.to_string();
        cut(&mut text, MAX_TEXT_BYTES);
        *label = text.into();
    }
    event
}

/// Characters an audit text must not carry as they are: control characters (escape
/// sequences, line breaks) and the line and paragraph separators. Shown in a terminal or a
/// log, they move the cursor, recolour the screen or start a line of their own.
pub fn is_unprintable(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Cuts `text` to at most `max` bytes (the mark included) on a character boundary,
/// ending it with `…` when it was longer.
fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max - CUT_MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(CUT_MARK);
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
        if matches!(
            ctx.denial,
            Some(Denial::ControlUnreachable | Denial::AuditUnavailable)
        ) {
            // An edge node cut off from its control plane, or a trail that cannot be
            // written: the event could not be made durable anyway, and the 503 must still
            // be answered. Nothing was forwarded and no money moved: recorded after the
            // answer, as in `normal` (the write that clears `is_failing`).
            return Ok(());
        }
        ctx.audited = true;
        // A response- or token-metered call is settled to this charge at the end (or was
        // just now, `settle_before_release`: its metering is then `Fixed`, its charge
        // `ctx.spend`).
        let (spend, llm) = match &ctx.metering {
            Metering::Llm(call) => {
                let (charge, usage) = call.charge(false);
                (charge, Some(llm_audit(call.model.clone(), usage)))
            }
            _ => (ctx.expected_spend(), ctx.settled_early.clone().flatten()),
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An unauthenticated request's event (also the edge's audit tests').
    pub(crate) fn event(path: &str) -> AuditEvent {
        AuditEvent {
            ts_ms: 0,
            tenant_id: None,
            key_id: None,
            label: None,
            vendor: "stripe".into(),
            method: "GET".into(),
            path: path.into(),
            status: 401,
            decision: "missing_key".into(),
            spend: Micros::ZERO,
            vendor_request_id: None,
            duration_ms: 0,
            llm: None,
        }
    }

    #[test]
    fn audit_text_within_its_bound_is_kept_whole() {
        let path = format!("/stripe/{}", "a".repeat(MAX_PATH_BYTES - 8));
        let e = bounded(event(&path));
        assert_eq!(e.path, path);
        assert_eq!(e.method, "GET");
    }

    #[test]
    fn a_long_audit_path_is_cut_on_a_char_boundary_with_a_mark() {
        // The attack: ~32 KiB of `"` after the vendor, which JSON doubles.
        let e = bounded(event(&format!("/stripe/{}", "\"".repeat(32_700))));
        assert_eq!(e.path.len(), MAX_PATH_BYTES);
        assert!(e.path.starts_with("/stripe/\"\""));
        assert!(e.path.ends_with("\"…"));
        // A cut that would split a character backs off to the character's start.
        let mut text = format!("{}é", "a".repeat(MAX_PATH_BYTES - CUT_MARK.len() - 1));
        text.push_str("tail");
        cut(&mut text, MAX_PATH_BYTES);
        assert_eq!(text, format!("{}…", "a".repeat(MAX_PATH_BYTES - 4)));
    }

    #[test]
    fn every_request_controlled_audit_text_is_bounded() {
        let mut e = event(&format!("/openai/{}", "\"".repeat(60_000)));
        e.method = "X".repeat(10_000);
        e.label = Some("\"".repeat(10_000).into());
        e.vendor_request_id = Some("\\".repeat(10_000));
        e.llm = Some(LlmAudit {
            model: "\u{1}".repeat(100_000),
            ..LlmAudit::default()
        });
        let e = bounded(e);
        assert_eq!(e.method.len(), MAX_METHOD_BYTES);
        assert!(e.method.ends_with(CUT_MARK));
        assert_eq!(e.label.as_deref().map(str::len), Some(MAX_TEXT_BYTES));
        assert_eq!(
            e.vendor_request_id.as_ref().map(String::len),
            Some(MAX_TEXT_BYTES)
        );
        assert_eq!(e.llm.as_ref().map(|l| l.model.len()), Some(MAX_TEXT_BYTES));
        // Worst-case JSON escaping (control characters become \u0001): under 10 KiB.
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.len() < 10 * 1024, "{} bytes", json.len());
    }
}
