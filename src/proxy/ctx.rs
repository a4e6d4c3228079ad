//! `Ctx`, what the proxy knows about one request as it passes the stages: where it goes
//! (path, vendor, key, credential), what its body is (`Body`), how it is metered
//! (`Metering`), what is kept of the answer (`Capture`), and what it was charged and
//! answered. Each of those is one enum, so a combination that cannot happen cannot be
//! written down.

use super::deny::Denial;
use super::idempotency::Pending;
use super::llm;
use super::spend::Reservation;
use super::verify::VerifiedKey;
use crate::config::{MeterRule, Vendor};
use crate::money::Micros;
use crate::secret::Secret;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The request body, as the proxy handles it.
#[derive(Debug)]
pub enum Body {
    /// Streamed to the vendor as it arrives (Pingora's path); `counted` bytes so far,
    /// held to the size limit.
    Streamed { counted: usize },
    /// Read whole before forwarding (to meter, convert or plan it). Our copy goes out
    /// once per upstream attempt, in place of Pingora's replay buffer (64 KiB at most).
    Read {
        bytes: Bytes,
        /// Converted from JSON to the form the vendor reads: sent as a form.
        form: bool,
        /// Sent on the current upstream attempt (reset for each attempt, retries too).
        sent: bool,
    },
}

impl Body {
    /// The length of a body read whole, 0 for a streamed one.
    pub fn read_len(&self) -> usize {
        match self {
            Body::Read { bytes, .. } => bytes.len(),
            Body::Streamed { .. } => 0,
        }
    }

    /// The body read whole, if it was.
    pub fn read(&self) -> Option<&Bytes> {
        match self {
            Body::Read { bytes, .. } => Some(bytes),
            Body::Streamed { .. } => None,
        }
    }
}

/// How the call is charged, and so what is read of its answer.
pub enum Metering {
    /// Priced before it was sent (a flat cost, free, or an idempotent replay): the
    /// answer is not read.
    Fixed,
    /// Request-metered on an object it creates or confirms: the answer's `id` is
    /// remembered as costing the key `credit` (what it paid for the object before) plus
    /// this call's spend, in `currency` (the one the amount was counted in).
    Tracked {
        credit: Micros,
        currency: Option<Arc<str>>,
    },
    /// Response-metered: charged the 2xx answer's amount net of `credit` (what the key
    /// already paid for the object); `charge` once the answer was read.
    Response {
        rule: Arc<MeterRule>,
        credit: Micros,
        charge: Option<Micros>,
    },
    /// Token-metered (LLM): its own reservation and metering (`llm`).
    Llm(Box<llm::Call>),
}

impl Metering {
    /// Whether the answer is read (so it must come uncompressed).
    pub fn reads_answer(&self) -> bool {
        !matches!(self, Metering::Fixed)
    }

    /// Whether the answer's body is captured to meter it or learn its object.
    pub fn captures(&self) -> bool {
        matches!(self, Metering::Tracked { .. } | Metering::Response { .. })
    }

    pub fn is_response(&self) -> bool {
        matches!(self, Metering::Response { .. })
    }
}

/// The response body kept to meter it or learn a created object's id.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Capture {
    #[default]
    Off,
    On(Vec<u8>),
    /// Larger than kept: a response-metered call is charged as unmeterable.
    Overflowed,
    /// Metered already (at the end of the body, or when the response was cut short).
    Done,
}

impl Capture {
    /// Keeps `chunk`, or overflows past `limit` bytes.
    pub fn push(&mut self, chunk: &[u8], limit: usize) {
        if let Capture::On(buf) = self {
            if buf.len() + chunk.len() <= limit {
                buf.extend_from_slice(chunk);
            } else {
                *self = Capture::Overflowed;
            }
        }
    }

    /// What arrived, once: `Ok` the body, `Err(())` an overflowed one, `None` nothing to
    /// meter (never started, or finished already).
    pub fn finish(&mut self) -> Option<Result<Vec<u8>, ()>> {
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
}

pub struct Ctx {
    pub start: Instant,
    /// The canonical path, `/{vendor}/{rest}`; empty until it is known to be one.
    pub canonical: String,
    /// Where `{rest}` (the vendor-relative path, from its `/`) starts in `canonical`.
    pub rest_at: usize,
    pub vendor: Option<Arc<Vendor>>,
    pub key: Option<Arc<VerifiedKey>>,
    pub secret: Option<Secret>,
    pub denial: Option<Denial>,
    /// The denial's message when it names what the client sent (`unknown_model`).
    pub denial_message: Option<String>,
    pub reservation: Option<Reservation>,
    pub body: Body,
    pub metering: Metering,
    pub capture: Capture,
    /// The first call of its (key, `Idempotency-Key`): told whether it was charged.
    pub idempotent: Option<Pending>,
    /// When the request went upstream (`None`: it never did, or surely never arrived).
    pub upstream_start: Option<Instant>,
    /// An attempt failed after its connection was made: the call may have reached the
    /// vendor, whatever a later attempt's error says.
    pub may_have_arrived: bool,
    pub upstream_elapsed: Option<Duration>,
    /// The final status answered (0 until known).
    pub status: u16,
    pub spend: Micros,
    pub vendor_request_id: Option<String>,
    /// Strict audit: the event was made durable before the response was released.
    pub audited: bool,
    /// Settled before the answer's end was released (`settle_before_release`), with an
    /// LLM call's audit part: nothing is left to settle at the end.
    pub settled_early: Option<Option<crate::sync::LlmAudit>>,
    /// HTTP/2: this stream keeps its connection busy until the request ends.
    pub h2_stream: Option<crate::conns::StreamGuard>,
}

impl Ctx {
    pub fn new() -> Ctx {
        Ctx {
            start: Instant::now(),
            canonical: String::new(),
            rest_at: 0,
            vendor: None,
            key: None,
            secret: None,
            denial: None,
            denial_message: None,
            reservation: None,
            body: Body::Streamed { counted: 0 },
            metering: Metering::Fixed,
            capture: Capture::Off,
            idempotent: None,
            upstream_start: None,
            may_have_arrived: false,
            upstream_elapsed: None,
            status: 0,
            spend: Micros::ZERO,
            vendor_request_id: None,
            audited: false,
            settled_early: None,
            h2_stream: None,
        }
    }

    /// The canonical vendor-relative path (`/v1/…`).
    pub fn path(&self) -> &str {
        &self.canonical[self.rest_at..]
    }

    /// The vendor named by the path, known or not.
    pub fn vendor_name(&self) -> &str {
        self.canonical.get(1..self.rest_at).unwrap_or("")
    }

    /// The vendor for labels and records: unknown names fold into one, so label values
    /// stay bounded.
    pub fn vendor_label(&self) -> &str {
        if self.vendor.is_some() {
            self.vendor_name()
        } else {
            "unknown"
        }
    }

    /// What the answer charged a response-metered call, else the spend reserved.
    pub fn expected_spend(&self) -> Micros {
        match &self.metering {
            Metering::Response {
                charge: Some(charge),
                ..
            } => *charge,
            _ => self.spend,
        }
    }
}

impl Default for Ctx {
    fn default() -> Self {
        Ctx::new()
    }
}

#[cfg(test)]
mod tests {
    use super::Capture;

    #[test]
    fn a_capture_is_metered_once() {
        let mut overflowed = Capture::Overflowed;
        assert_eq!(overflowed.finish(), Some(Err(())));
        // At the end of the body, then again in `logging`: nothing the second time.
        assert_eq!(overflowed.finish(), None);
        let mut on = Capture::On(b"{}".to_vec());
        assert_eq!(on.finish(), Some(Ok(b"{}".to_vec())));
        assert_eq!(on.finish(), None);
        let mut off = Capture::Off;
        assert_eq!(off.finish(), None);
        assert_eq!(off, Capture::Off);
    }

    #[test]
    fn a_capture_overflows_past_its_limit_and_stays_so() {
        let mut c = Capture::On(Vec::new());
        c.push(b"12345", 8);
        assert_eq!(c, Capture::On(b"12345".to_vec()));
        c.push(b"6789", 8);
        assert_eq!(c, Capture::Overflowed);
        c.push(b"x", 8);
        assert_eq!(c, Capture::Overflowed);
        let mut off = Capture::Off;
        off.push(b"ignored", 8);
        assert_eq!(off, Capture::Off);
    }
}
