//! Token metering of LLM vendors (SPEC §5): the stages `meter` and settlement take for an
//! OpenAI or Anthropic call. Before forwarding, `plan` reads the request and names the
//! upper bound to reserve; the answer, JSON or an SSE stream passed on as it arrives, is
//! read for its usage as it goes; at the end `Call::finish` says how much of the
//! reservation is spent: the usage × the price when the vendor reported it, else all of
//! it (fail closed). The rules are in docs/llm-metering.md.

pub mod held;
pub mod prices;
pub mod request;
pub mod usage;

use crate::money::Micros;
use crate::proxy::deny::Denial;
use crate::proxy::spend::Reservation;
use bytes::Bytes;
use pingora::http::ResponseHeader;
pub use prices::{ModelPrice, PriceTable};
use serde::Deserialize;
use usage::{SseMeter, Usage};

/// Which API an endpoint speaks (the vendor catalog names it per metered endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Api {
    #[serde(rename = "openai_chat")]
    OpenAiChat,
    #[serde(rename = "openai_responses")]
    OpenAiResponses,
    #[serde(rename = "openai_embeddings")]
    OpenAiEmbeddings,
    #[serde(rename = "anthropic_messages")]
    AnthropicMessages,
}

/// Most bytes of a JSON answer kept to read its usage. Past it the call is charged its
/// whole reservation.
pub const MAX_JSON: usize = 32 * 1024 * 1024;

/// What the proxy does with a metered LLM request: the body to forward and what to
/// reserve, with the call's metering state.
pub struct Plan {
    /// `Some` when Keybrake rewrote the body (the stream's usage was asked for).
    pub body: Option<Bytes>,
    pub bound: Micros,
    pub call: Call,
}

/// Refuses, before the body is read, a request whose headers ask for billing the price
/// table does not hold: an `anthropic-beta` listing `context-1m-…` (input above 200k
/// tokens at higher rates, beyond the table's context). Every `anthropic-beta` line is
/// read, each a comma-separated list; one that is not readable text is refused too.
pub fn check_headers(api: Api, headers: &http::HeaderMap) -> Result<(), Denial> {
    if api != Api::AnthropicMessages {
        return Ok(());
    }
    for value in headers.get_all("anthropic-beta") {
        // Anywhere in the value, whatever separates the betas (a comma, a space): how
        // the vendor splits a list it was sent oddly is not known.
        let text = value.to_str().map_err(|_| Denial::UnmeteredBeta)?;
        if text
            .as_bytes()
            .windows(10)
            .any(|w| w.eq_ignore_ascii_case(b"context-1m"))
        {
            return Err(Denial::UnmeteredBeta);
        }
    }
    Ok(())
}

/// A refusal of `plan`: its denial, and for `unknown_model` a message naming the model
/// and what the price table lacks for it (the client's to fix).
#[derive(Debug, PartialEq)]
pub struct Refused {
    pub denial: Denial,
    pub message: Option<String>,
}

impl From<Denial> for Refused {
    fn from(denial: Denial) -> Self {
        Refused {
            denial,
            message: None,
        }
    }
}

/// At most this many characters of a model's name are quoted back in a refusal.
const MODEL_QUOTED_CHARS: usize = 80;

/// 400 `unknown_model`, naming `model` (shortened) and `why`.
fn unknown_model(model: &str, why: &str) -> Refused {
    let mut quoted: String = model.chars().take(MODEL_QUOTED_CHARS).collect();
    if quoted.len() < model.len() {
        quoted.push('…');
    }
    Refused {
        denial: Denial::UnknownModel,
        message: Some(format!("The model {quoted:?} {why}")),
    }
}

/// Reads the request and prices its upper bound. Refusals are the client's to fix:
/// not a JSON object or no model (400 `invalid_body`), a `service_tier` priced above the
/// table (400 `invalid_body`), a model the table does not price or cannot bound (400
/// `unknown_model`, its message naming the model and what is missing).
///
/// A request the vendor may sample more than once for (`LlmRequest::samples_more`) has
/// no reservation that bounds it: refused unless `multi_pass_allowed`
/// (`llm_multi_pass_tools: allow`), when it is charged what its usage reports.
pub fn plan(
    api: Api,
    body: &[u8],
    prices: &PriceTable,
    vendor: &str,
    multi_pass_allowed: bool,
) -> Result<Plan, Refused> {
    let req = request::parse(api, body).map_err(|e| match e {
        request::RequestError::UnmeteredTier => Denial::UnmeteredServiceTier,
        request::RequestError::UnmeteredTool => Denial::UnmeteredTool,
        // Refused in the foreground too unless allowed: that is the refusal to tell.
        request::RequestError::UnmeteredBackground if !multi_pass_allowed => {
            Denial::UnmeteredMultiPass
        }
        request::RequestError::UnmeteredBackground => Denial::UnmeteredBackground,
        request::RequestError::UnmeteredSpeed => Denial::UnmeteredSpeed,
        _ => Denial::InvalidLlmBody,
    })?;
    if req.samples_more && !multi_pass_allowed {
        return Err(Denial::UnmeteredMultiPass.into());
    }
    let price = match prices.resolve(vendor, &req.model) {
        Some(price) => price.clone(),
        None => {
            return Err(unknown_model(
                &req.model,
                &format!(
                    "is not in Keybrake's price table for {vendor}: check its name, or have \
                     the operator price it."
                ),
            ))
        }
    };
    let output = match api {
        Api::OpenAiEmbeddings => 0,
        _ => match req.output_limit.or(price.max_output) {
            Some(limit) => limit
                .checked_mul(req.choices)
                .ok_or(Denial::InvalidLlmBody)?,
            None => {
                return Err(unknown_model(
                    &req.model,
                    &format!(
                        "has no output limit in Keybrake's price table (it is priced for input \
                         only, as an embeddings model is): send one ({}), or use a model \
                         priced for output.",
                        request::limit_fields(api).join(" or ")
                    ),
                ))
            }
        },
    };
    let strip = req.needs_usage_injected(api);
    let new_body = if strip {
        Some(Bytes::from(
            req.inject_include_usage(body)
                .ok_or(Denial::InvalidLlmBody)?,
        ))
    } else {
        None
    };
    let sent_len = new_body.as_ref().map_or(body.len(), Bytes::len);
    // A prediction's unused tokens bill as output: at most one token per byte of the
    // body, for each choice.
    let output = if req.predicted {
        (sent_len as u64)
            .checked_mul(req.choices)
            .and_then(|p| output.checked_add(p))
            .ok_or(Denial::InvalidLlmBody)?
    } else {
        output
    };
    let Some(input) = req.input_bound(api, sent_len, price.context) else {
        return Err(unknown_model(
            &req.model,
            "has no context size in Keybrake's price table (it is priced for input only, \
             as an embeddings model is), so a request with images, audio, files or an \
             earlier response cannot be bounded.",
        ));
    };
    let bound = price
        .bound(input, output)
        .ok_or(Refused::from(Denial::CapExhausted))?;
    Ok(Plan {
        body: new_body,
        bound,
        call: Call {
            api,
            model: req.model,
            price,
            strip,
            reservation: None,
            answer: Answer::Waiting,
            samples_more: req.samples_more,
            premium_tier: false,
            cap: Micros::ZERO,
            tenant: 0,
        },
    })
}

/// One metered LLM call in flight. It holds its own reservation, so the proxy's other
/// settlement paths never see it.
pub struct Call {
    pub api: Api,
    pub model: String,
    price: ModelPrice,
    strip: bool,
    reservation: Option<Reservation>,
    answer: Answer,
    /// The vendor may sample more than once (`LlmRequest::samples_more`): the reservation
    /// bounds nothing, so an answer whose usage cannot be read costs `cap`.
    samples_more: bool,
    /// The answer said it was served at a tier the table does not price
    /// (`Usage::premium_tier`), even if its usage could not be read: it costs `cap`.
    premium_tier: bool,
    /// The key's daily cap (`hold`).
    cap: Micros,
    /// The key's tenant, hashed: its share of the answer bytes held (`held::Pool`).
    tenant: u64,
}

enum Answer {
    /// No final answer header yet.
    Waiting,
    /// Not a 2xx: the vendor bills nothing.
    Refused,
    Json(Vec<u8>, held::Held),
    Stream(Box<SseMeter>),
    /// A JSON answer larger than `MAX_JSON`, or than what `held::MAX_HELD` left room for.
    TooLarge,
    /// The answer ended and its usage was read.
    Done(Option<Usage>),
}

/// What `finish` decided.
pub struct Outcome {
    pub reservation: Reservation,
    /// Spent out of the reservation (the rest goes back); can exceed it when the vendor
    /// billed more than the bound, or a call that may sample more than once is charged
    /// the key's cap (its usage unread).
    pub charge: Micros,
    pub usage: Option<Usage>,
}

impl Call {
    /// Holds the call's reservation, made for a key of `tenant` whose daily cap is `cap`.
    pub fn hold(&mut self, reservation: Reservation, cap: Micros, tenant: &str) {
        self.reservation = Some(reservation);
        self.cap = cap;
        self.tenant = crate::revocation::id_hash(tenant);
    }

    /// What the call holds reserved.
    pub fn held(&self) -> Micros {
        self.reservation.as_ref().map_or(Micros::ZERO, |r| r.amount)
    }

    /// The final answer's header (never a 1xx).
    pub fn response_header(&mut self, header: &mut ResponseHeader) {
        if !header.status.is_success() {
            self.answer = Answer::Refused;
            return;
        }
        let sse = header
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
            });
        self.answer = if sse {
            if self.strip {
                // Chunks are rewritten: the length is no longer the vendor's.
                header.remove_header(&http::header::CONTENT_LENGTH);
            }
            Answer::Stream(Box::new(SseMeter::new(
                self.api,
                self.strip,
                held::Held::new(self.tenant),
            )))
        } else {
            Answer::Json(Vec::new(), held::Held::new(self.tenant))
        };
    }

    /// One chunk of the answer, passed on (rewritten only as `SseMeter` says).
    pub fn response_body(&mut self, body: &mut Option<Bytes>, end: bool) {
        match &mut self.answer {
            Answer::Stream(meter) => {
                meter.feed(body, end);
                if end {
                    self.premium_tier = meter.premium_tier();
                    self.answer = Answer::Done(meter.usage());
                }
            }
            Answer::Json(buf, held) => {
                if let Some(chunk) = body {
                    let total = buf.len() + chunk.len();
                    if total > MAX_JSON {
                        self.answer = Answer::TooLarge;
                        return;
                    }
                    if total > buf.capacity() {
                        // Grown here, as a Vec would (doubling, or just enough when that
                        // does not fit), so that what is counted is what is allocated.
                        let doubled = total.max(buf.capacity() * 2).min(MAX_JSON);
                        let Some(capacity) = [doubled, total].into_iter().find(|&c| held.cover(c))
                        else {
                            self.answer = Answer::TooLarge;
                            return;
                        };
                        buf.reserve_exact(capacity - buf.len());
                    }
                    buf.extend_from_slice(chunk);
                }
                if end {
                    let usage = usage::from_json(self.api, buf);
                    self.premium_tier = match &usage {
                        Some(u) => u.premium_tier,
                        None => usage::premium_tier_in_json(buf),
                    };
                    self.answer = Answer::Done(usage);
                }
            }
            _ => {}
        }
    }

    /// The call is over. `never_sent`: the request did not leave (nothing to pay).
    /// A refused call is free; an answer whose usage was read costs that; anything else
    /// (cut short by either side, no usage, unreadable usage) costs the whole reservation,
    /// or the key's cap for a call that may sample more than once (`charge`).
    pub fn finish(mut self, never_sent: bool) -> Outcome {
        let (charge, usage) = self.charge(never_sent);
        Outcome {
            reservation: self.reservation.take().unwrap_or_else(Reservation::none),
            charge,
            usage,
        }
    }

    /// What the call costs given what has arrived so far (`finish` settles to it; strict
    /// audit records it before the response's last bytes leave).
    /// A call that may sample more than once and whose usage cannot be read costs the
    /// key's whole cap (fail closed, as an unreadable Stripe answer does): its reservation
    /// bounds nothing.
    pub fn charge(&self, never_sent: bool) -> (Micros, Option<Usage>) {
        let premium = match &self.answer {
            Answer::Stream(meter) => meter.premium_tier(),
            _ => self.premium_tier,
        };
        let unread = if self.samples_more || premium {
            self.held().max(self.cap)
        } else {
            self.held()
        };
        match &self.answer {
            _ if never_sent => (Micros::ZERO, None),
            Answer::Refused => (Micros::ZERO, None),
            Answer::Done(Some(u)) => self.priced(*u, unread),
            // Cut after the usage arrived (OpenAI's chunk comes before `[DONE]`).
            Answer::Stream(meter) => match meter.usage() {
                Some(u) => self.priced(u, unread),
                None => (unread, None),
            },
            _ => (unread, None),
        }
    }
}

impl Call {
    /// What usage `u` costs. Served at a tier billed above the table's rates, the call
    /// cannot be priced: it costs the key's whole cap (the key stops for the day), as a
    /// Stripe answer that cannot be read does.
    fn priced(&self, u: Usage, unread: Micros) -> (Micros, Option<Usage>) {
        if u.premium_tier {
            static LOG: crate::log_every::LogEvery =
                crate::log_every::LogEvery::new(std::time::Duration::from_secs(10));
            if let Some(others) = LOG.due() {
                log::warn!(
                    "a {} answer says it was served at a service tier the price table does not \
                     price: charging the key its daily cap ({others} more such calls since \
                     the last such line; keep capped keys on standard-tier projects)",
                    self.model
                );
            }
            return (self.held().max(self.cap), Some(u));
        }
        match self.price.cost(&u) {
            Some(cost) => (cost, Some(u)),
            None => (unread, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PriceTable {
        PriceTable::parse(
            r#"
openai:
  models:
    gpt-4o-mini: { input: "0.15", cached_input: "0.075", output: "0.60", context: 128000, max_output: 16384 }
    text-embedding-3-small: { input: "0.02" }
"#,
        )
        .unwrap()
    }

    #[test]
    fn the_bound_covers_the_bytes_the_output_limit_and_every_choice() {
        let t = table();
        let body = br#"{"model":"gpt-4o-mini-2024-07-18","max_tokens":100,"n":2}"#;
        let p = plan(Api::OpenAiChat, body, &t, "openai", false).unwrap();
        assert!(p.body.is_none());
        // (bytes + 1024) × 0.15 + 200 × 0.60 micro-USD, rounded up.
        let input = (body.len() as i64 + 1024) * 150_000;
        assert_eq!(
            p.bound,
            Micros((input + 200 * 600_000 + 999_999) / 1_000_000)
        );
        // No limit: the model's maximum output.
        let p = plan(
            Api::OpenAiChat,
            br#"{"model":"gpt-4o-mini"}"#,
            &t,
            "openai",
            false,
        )
        .unwrap();
        assert!(p.bound.0 >= 16_384 * 600_000 / 1_000_000);
        let e = plan(
            Api::OpenAiEmbeddings,
            br#"{"model":"text-embedding-3-small","input":"x"}"#,
            &t,
            "openai",
            false,
        )
        .unwrap();
        assert_eq!(e.bound, Micros(1));
        for (body, denial) in [
            (&br#"{"model":"gpt-5"}"#[..], Denial::UnknownModel),
            (br#"{"messages":[]}"#, Denial::InvalidLlmBody),
            (b"model=gpt-4o-mini", Denial::InvalidLlmBody),
        ] {
            assert_eq!(
                plan(Api::OpenAiChat, body, &t, "openai", false)
                    .err()
                    .map(|r| r.denial),
                Some(denial)
            );
        }
        // A stream that did not ask for usage: asked for, and the bound counts those bytes.
        let p = plan(
            Api::OpenAiChat,
            br#"{"model":"gpt-4o-mini","stream":true}"#,
            &t,
            "openai",
            false,
        )
        .unwrap();
        assert!(p
            .body
            .unwrap()
            .starts_with(br#"{"stream_options":{"include_usage":true},"#));
    }

    #[test]
    fn a_call_the_vendor_may_sample_more_than_once_for_is_refused_unless_allowed() {
        let t = table();
        let mcp = br#"{"model":"gpt-4o-mini","max_output_tokens":5,"input":"hi",
            "tools":[{"type":"mcp","server_url":"https://x","require_approval":"never"}]}"#;
        let refused = plan(Api::OpenAiResponses, mcp, &t, "openai", false);
        assert_eq!(refused.err().unwrap().denial, Denial::UnmeteredMultiPass);
        assert!(plan(Api::OpenAiResponses, mcp, &t, "openai", true).is_ok());
        let plain = br#"{"model":"gpt-4o-mini","max_output_tokens":5,"input":"hi"}"#;
        assert!(plan(Api::OpenAiResponses, plain, &t, "openai", false).is_ok());
    }

    #[test]
    fn an_unknown_model_refusal_names_the_model_and_what_the_table_lacks() {
        let t = table();
        let refused = |api, body: &str| {
            let r = plan(api, body.as_bytes(), &t, "openai", false)
                .err()
                .unwrap();
            assert_eq!(r.denial, Denial::UnknownModel);
            r.message.unwrap()
        };
        let m = refused(Api::OpenAiChat, r#"{"model":"gpt-9"}"#);
        assert!(
            m.starts_with(r#"The model "gpt-9" is not in Keybrake's price table for openai"#),
            "{m}"
        );
        // Quoted as a string literal (no raw control bytes), at most 80 characters of it.
        let m = refused(
            Api::OpenAiChat,
            &format!(r#"{{"model":"a\n{}"}}"#, "é".repeat(200)),
        );
        assert!(
            m.starts_with(r#"The model "a\n"#) && !m.contains('\n'),
            "{m}"
        );
        assert_eq!(m.matches('é').count(), 78, "{m}");
        assert!(m.contains("é…\""), "{m}");

        // An input-only (embeddings) model asked for output: it names what is missing.
        let m = refused(
            Api::OpenAiResponses,
            r#"{"model":"text-embedding-3-small"}"#,
        );
        assert!(
            m.contains(r#""text-embedding-3-small" has no output limit"#),
            "{m}"
        );
        assert!(m.contains("send one (max_output_tokens)"), "{m}");
        let m = refused(
            Api::OpenAiChat,
            r#"{"model":"text-embedding-3-small","max_tokens":5,"messages":[{"content":[{"type":"image_url"}]}]}"#,
        );
        assert!(m.contains("has no context size"), "{m}");
    }

    #[test]
    fn a_predicted_output_is_bounded_at_the_output_rate() {
        let t = table();
        let body = br#"{"model":"gpt-4o-mini","max_tokens":100,"prediction":{"type":"content","content":"x"}}"#;
        let p = plan(Api::OpenAiChat, body, &t, "openai", false).unwrap();
        // (bytes + 1024) × 0.15 + (100 + bytes) × 0.60 micro-USD, rounded up.
        let len = body.len() as i64;
        let want = ((len + 1024) * 150_000 + (100 + len) * 600_000 + 999_999) / 1_000_000;
        assert_eq!(p.bound, Micros(want));
        // `null` is no prediction; an escaped name is still one.
        let plain = br#"{"model":"gpt-4o-mini","max_tokens":100,"prediction":null}"#;
        let p = plan(Api::OpenAiChat, plain, &t, "openai", false).unwrap();
        let len = plain.len() as i64;
        assert_eq!(
            p.bound,
            Micros(((len + 1024) * 150_000 + 100 * 600_000 + 999_999) / 1_000_000)
        );
        let escaped = br#"{"model":"gpt-4o-mini","max_tokens":100,"prediction":{"content":"x"}}"#;
        let p = plan(Api::OpenAiChat, escaped, &t, "openai", false).unwrap();
        assert!(p.bound.0 >= (100 + escaped.len() as i64) * 600_000 / 1_000_000);
    }

    #[test]
    fn priority_tiers_and_the_1m_context_beta_are_refused() {
        let t = table();
        let body = br#"{"model":"gpt-4o-mini","max_tokens":5,"service_tier":"priority"}"#;
        assert_eq!(
            plan(Api::OpenAiChat, body, &t, "openai", false).err(),
            Some(Refused::from(Denial::UnmeteredServiceTier))
        );
        let body = br#"{"model":"gpt-4o-mini","max_tokens":5,"service_tier":"flex"}"#;
        assert!(plan(Api::OpenAiChat, body, &t, "openai", false).is_ok());

        let headers = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append("anthropic-beta", http::HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let anthropic = |values: &[&str]| check_headers(Api::AnthropicMessages, &headers(values));
        assert_eq!(anthropic(&[]), Ok(()));
        assert_eq!(anthropic(&["prompt-caching-2024-07-31"]), Ok(()));
        assert_eq!(
            anthropic(&[
                "interleaved-thinking-2025-05-14",
                "extended-cache-ttl-2025-04-11"
            ]),
            Ok(())
        );
        for refused in [
            &["context-1m-2025-08-07"][..],
            &["prompt-caching-2024-07-31,context-1m-2025-08-07"],
            &["a-beta , Context-1M-2025-08-07 ,b"],
            &["prompt-caching-2024-07-31", "context-1m-2025-08-07"],
            &["context-1m"],
            &["foo context-1m-2025-08-07"],
            &["foo;context-1m-2025-08-07"],
        ] {
            assert_eq!(
                anthropic(refused),
                Err(Denial::UnmeteredBeta),
                "{refused:?}"
            );
        }
        let mut h = http::HeaderMap::new();
        h.append(
            "anthropic-beta",
            http::HeaderValue::from_bytes(b"context-1m\xff").unwrap(),
        );
        assert_eq!(
            check_headers(Api::AnthropicMessages, &h),
            Err(Denial::UnmeteredBeta)
        );
        // Only Anthropic reads the header.
        assert_eq!(
            check_headers(Api::OpenAiChat, &headers(&["context-1m-2025-08-07"])),
            Ok(())
        );
    }

    fn finished(answer: &[(&str, bool)], status: u16, sse: bool) -> Outcome {
        let t = table();
        let mut call = plan(
            Api::OpenAiChat,
            br#"{"model":"gpt-4o-mini","max_tokens":10}"#,
            &t,
            "openai",
            false,
        )
        .unwrap()
        .call;
        let mut header = ResponseHeader::build(status, None).unwrap();
        if sse {
            header
                .insert_header("content-type", "text/event-stream; charset=utf-8")
                .unwrap();
        }
        call.response_header(&mut header);
        for (chunk, end) in answer {
            let mut body = Some(Bytes::copy_from_slice(chunk.as_bytes()));
            call.response_body(&mut body, *end);
        }
        call.finish(false)
    }

    #[test]
    fn settles_from_usage_else_refused_is_free_else_everything_is_charged() {
        let json = r#"{"usage":{"prompt_tokens":1000,"completion_tokens":10}}"#;
        let o = finished(&[(json, true)], 200, false);
        assert_eq!(o.charge, Micros(156));
        assert_eq!(o.usage.map(|u| u.output), Some(10));
        assert_eq!(finished(&[(json, true)], 400, false).charge, Micros::ZERO);
        // Cut short: no end of stream seen. Held is 0 here (no reservation was made).
        let o = finished(&[(json, false)], 200, false);
        assert!(o.usage.is_none());
        let o = finished(&[("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n", true)], 200, true);
        assert_eq!((o.charge, o.usage.map(|u| u.input)), (Micros(2), Some(3)));
    }

    #[test]
    fn a_cut_stream_costs_its_usage_if_it_came_else_the_whole_reservation() {
        let t = table();
        let body = br#"{"model":"gpt-4o-mini","max_tokens":10,"stream":true}"#;
        let start = |chunks: &[&str]| {
            let mut call = plan(Api::OpenAiChat, body, &t, "openai", false)
                .unwrap()
                .call;
            let mut held = Reservation::none();
            held.amount = Micros(500);
            call.hold(held, Micros(5_000_000), "ten_test");
            let mut header = ResponseHeader::build(200, None).unwrap();
            header
                .insert_header("content-type", "text/event-stream")
                .unwrap();
            header.insert_header("content-length", "999").unwrap();
            call.response_header(&mut header);
            // Keybrake rewrites this stream (it asked for the usage): no length of the vendor's.
            assert!(header.headers.get("content-length").is_none());
            let mut passed = String::new();
            for chunk in chunks {
                let mut b = Some(Bytes::copy_from_slice(chunk.as_bytes()));
                call.response_body(&mut b, false);
                passed.push_str(std::str::from_utf8(&b.unwrap()).unwrap());
            }
            (call.finish(false), passed)
        };
        let text = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n";
        let usage =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n";
        let (o, passed) = start(&[text]);
        assert_eq!((o.charge, o.usage), (Micros(500), None));
        assert_eq!(
            passed,
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n"
        );
        // The client left after the usage chunk, before `[DONE]`: the usage counts.
        let (o, passed) = start(&[text, usage]);
        assert_eq!((o.charge, o.usage.map(|u| u.output)), (Micros(2), Some(1)));
        assert!(!passed.contains("usage"));
        // Served at a tier the table does not price: the key's whole cap, also when the
        // stream is cut before its usage (the tier came in an earlier chunk).
        let premium_text =
            text.replace("{\"choices\"", "{\"service_tier\":\"priority\",\"choices\"");
        let (o, _) = start(&[&premium_text]);
        assert_eq!((o.charge, o.usage), (Micros(5_000_000), None));
        // Served at a tier the table does not price: the key's whole cap.
        let priority = usage.replace(
            "{\"choices\":[],",
            "{\"choices\":[],\"service_tier\":\"priority\",",
        );
        let (o, _) = start(&[text, &priority]);
        assert_eq!(o.charge, Micros(5_000_000));
        // Never sent: nothing.
        let mut call = plan(Api::OpenAiChat, body, &t, "openai", false)
            .unwrap()
            .call;
        let mut held = Reservation::none();
        held.amount = Micros(500);
        call.hold(held, Micros(5_000_000), "ten_test");
        assert_eq!(call.finish(true).charge, Micros::ZERO);
    }

    #[test]
    fn a_call_that_may_sample_more_than_once_costs_the_cap_when_its_usage_cannot_be_read() {
        let t = table();
        let looping = br#"{"model":"gpt-4o-mini","max_output_tokens":10,"stream":true,
            "tools":[{"type":"mcp","server_url":"https://x"}]}"#;
        let plain = br#"{"model":"gpt-4o-mini","max_output_tokens":10,"stream":true}"#;
        let cut = |body: &[u8], chunks: &[&str]| {
            let mut call = plan(Api::OpenAiResponses, body, &t, "openai", true)
                .unwrap()
                .call;
            let mut held = Reservation::none();
            held.amount = Micros(500);
            call.hold(held, Micros(7_000_000), "ten_test");
            let mut header = ResponseHeader::build(200, None).unwrap();
            header
                .insert_header("content-type", "text/event-stream")
                .unwrap();
            call.response_header(&mut header);
            for chunk in chunks {
                let mut b = Some(Bytes::copy_from_slice(chunk.as_bytes()));
                call.response_body(&mut b, false);
            }
            call.finish(false).charge
        };
        let text = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n";
        let done = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n";
        assert_eq!(cut(looping, &[text]), Micros(7_000_000));
        assert_eq!(cut(plain, &[text]), Micros(500));
        // Its usage read: what it reports, as any call.
        assert_eq!(cut(looping, &[text, done]), cut(plain, &[text, done]));
        assert!(cut(looping, &[text, done]) < Micros(500));
        // Refused by the vendor, or never sent: nothing.
        let mut call = plan(Api::OpenAiResponses, looping, &t, "openai", true)
            .unwrap()
            .call;
        call.hold(Reservation::none(), Micros(7_000_000), "ten_test");
        assert_eq!(call.finish(true).charge, Micros::ZERO);
    }
}
