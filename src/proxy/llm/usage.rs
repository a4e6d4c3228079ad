//! Token usage as the vendors report it, from a JSON answer or from an SSE stream read as
//! it passes: OpenAI chat's final usage chunk, the Responses API's `response.completed`
//! (or `.incomplete`, `.failed`), Anthropic's `message_start` + `message_delta`.
//!
//! The stream scanner never holds the answer back, with one exception: when Keybrake
//! asked for OpenAI's usage chunk on a client's behalf, it removes that chunk (and the
//! `"usage":null` it adds to every other chunk), so it passes complete lines only.

use super::Api;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// Tokens by how they are billed. `input` excludes cached and cache-write tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub cache_write_1h: u64,
    /// Output tokens, reasoning included.
    pub output: u64,
    /// The reasoning part of `output` (reported, billed as output).
    pub reasoning: u64,
    /// The answer says it was served at a tier billed above the table's rates (OpenAI's
    /// `priority` or `scale`, Anthropic's `priority`; any tier not known to be priced at
    /// or below them): these tokens cannot be priced here.
    pub premium_tier: bool,
}

/// Whether an answer's reported service tier is billed above the price table's rates:
/// any but OpenAI's `default` and `flex`, Anthropic's `standard` and `batch`.
fn billed_above_the_table(tier: Option<&str>) -> bool {
    tier.is_some_and(|t| !matches!(t, "default" | "flex" | "standard" | "batch"))
}

impl Usage {
    /// Every input token, however billed.
    pub fn input_total(&self) -> u64 {
        self.input
            .saturating_add(self.cached_input)
            .saturating_add(self.cache_write)
            .saturating_add(self.cache_write_1h)
    }
}

/// The usage object of any of the APIs; which fields must be there depends on the API.
#[derive(Debug, Default, Clone, Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
    /// Anthropic: the tier that served the request.
    service_tier: Option<String>,
    /// Anthropic: each sampling pass of the request (a compaction pass, then the
    /// message), when there was more than the message's. Billed in total; the top-level
    /// fields count only the message's pass.
    iterations: Option<Vec<RawUsage>>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
struct CacheCreation {
    ephemeral_1h_input_tokens: Option<u64>,
}

impl RawUsage {
    fn to_usage(&self, api: Api) -> Option<Usage> {
        let detail = |d: &Option<Details>, f: fn(&Details) -> Option<u64>| {
            d.as_ref().and_then(f).unwrap_or(0)
        };
        match api {
            Api::OpenAiChat | Api::OpenAiEmbeddings => {
                let prompt = self.prompt_tokens?;
                let cached = detail(&self.prompt_tokens_details, |d| d.cached_tokens);
                let output = match api {
                    Api::OpenAiChat => self.completion_tokens?,
                    _ => self.completion_tokens.unwrap_or(0),
                };
                Some(Usage {
                    input: prompt.checked_sub(cached)?,
                    cached_input: cached,
                    output,
                    reasoning: detail(&self.completion_tokens_details, |d| d.reasoning_tokens),
                    ..Usage::default()
                })
            }
            Api::OpenAiResponses => {
                let input = self.input_tokens?;
                let cached = detail(&self.input_tokens_details, |d| d.cached_tokens);
                Some(Usage {
                    input: input.checked_sub(cached)?,
                    cached_input: cached,
                    output: self.output_tokens?,
                    reasoning: detail(&self.output_tokens_details, |d| d.reasoning_tokens),
                    ..Usage::default()
                })
            }
            Api::AnthropicMessages => {
                let top = self.anthropic_pass()?;
                let Some(passes) = self.iterations.as_ref().filter(|p| !p.is_empty()) else {
                    return Some(top);
                };
                // Every pass is billed: their sum, and never less than the top level
                // says, field by field.
                let mut sum = Usage::default();
                for pass in passes {
                    let p = pass.anthropic_pass()?;
                    sum.input = sum.input.saturating_add(p.input);
                    sum.cached_input = sum.cached_input.saturating_add(p.cached_input);
                    sum.cache_write = sum.cache_write.saturating_add(p.cache_write);
                    sum.cache_write_1h = sum.cache_write_1h.saturating_add(p.cache_write_1h);
                    sum.output = sum.output.saturating_add(p.output);
                }
                Some(Usage {
                    input: sum.input.max(top.input),
                    cached_input: sum.cached_input.max(top.cached_input),
                    cache_write: sum.cache_write.max(top.cache_write),
                    cache_write_1h: sum.cache_write_1h.max(top.cache_write_1h),
                    output: sum.output.max(top.output),
                    reasoning: 0,
                    premium_tier: top.premium_tier,
                })
            }
        }
    }

    /// One Anthropic sampling pass's tokens (the top level, or one of `iterations`).
    /// Cache writes without their breakdown by lifetime (`cache_creation`) are priced as
    /// 1-hour writes, the dearer: the request may have asked for that lifetime.
    fn anthropic_pass(&self) -> Option<Usage> {
        let writes = self.cache_creation_input_tokens.unwrap_or(0);
        let long = match self.cache_creation {
            Some(c) => c.ephemeral_1h_input_tokens.unwrap_or(0),
            None => writes,
        };
        Some(Usage {
            input: self.input_tokens?,
            cached_input: self.cache_read_input_tokens.unwrap_or(0),
            cache_write: writes.checked_sub(long)?,
            cache_write_1h: long,
            output: self.output_tokens?,
            reasoning: 0,
            premium_tier: billed_above_the_table(self.service_tier.as_deref()),
        })
    }

    /// Anthropic's `message_delta` usage is cumulative and may name only some fields:
    /// they replace those of `message_start`.
    fn merge(&mut self, later: RawUsage) {
        macro_rules! take {
            ($($f:ident),*) => { $( if later.$f.is_some() { self.$f = later.$f; } )* };
        }
        take!(
            input_tokens,
            output_tokens,
            cache_creation_input_tokens,
            cache_read_input_tokens,
            cache_creation,
            service_tier,
            iterations
        );
    }
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<RawUsage>,
    /// OpenAI: the tier that served the request, beside the usage.
    service_tier: Option<String>,
}

impl WithUsage {
    fn to_usage(&self, api: Api) -> Option<Usage> {
        let mut usage = self.usage.as_ref()?.to_usage(api)?;
        usage.premium_tier |= billed_above_the_table(self.service_tier.as_deref());
        Some(usage)
    }
}

/// Whether a complete JSON answer whose usage could not be read says it was served at a
/// tier the table does not price (OpenAI's top-level `service_tier`, Anthropic's
/// `usage.service_tier`).
pub fn premium_tier_in_json(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Tiers {
        service_tier: Option<String>,
        usage: Option<TierOnly>,
    }
    #[derive(Deserialize)]
    struct TierOnly {
        service_tier: Option<String>,
    }
    serde_json::from_slice::<Tiers>(body).is_ok_and(|t| {
        billed_above_the_table(t.service_tier.as_deref())
            || billed_above_the_table(t.usage.and_then(|u| u.service_tier).as_deref())
    })
}

/// The usage of a complete JSON answer; `None` when it has none that can be read.
pub fn from_json(api: Api, body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<WithUsage>(body)
        .ok()?
        .to_usage(api)
}

/// Most bytes of one SSE line kept while waiting for its end (a Responses API
/// `response.completed` event carries the whole answer). Past it the stream cannot be
/// metered and is charged as such.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// Reads usage from an SSE stream chunk by chunk.
pub struct SseMeter {
    api: Api,
    /// Remove the usage chunk Keybrake asked for (and `"usage":null`).
    strip: bool,
    /// The unfinished last line of what came so far.
    line: Vec<u8>,
    /// Its bytes, counted against what all calls may hold at once.
    held: super::held::Held,
    /// The event being passed is the removed usage chunk: its blank line goes too.
    dropping: bool,
    /// Anthropic: the usage of `message_start`, until `message_delta` completes it.
    started: Option<RawUsage>,
    usage: Option<Usage>,
    /// Something that should have carried usage could not be read.
    malformed: bool,
    /// An event said the answer is served at a tier the table does not price (kept even
    /// when the usage is never read).
    premium_tier: bool,
}

impl SseMeter {
    pub fn new(api: Api, strip: bool, held: super::held::Held) -> Self {
        SseMeter {
            api,
            strip,
            line: Vec::new(),
            held,
            dropping: false,
            started: None,
            usage: None,
            malformed: false,
            premium_tier: false,
        }
    }

    /// Whether an event so far said the answer is served at a tier the table does not
    /// price.
    pub fn premium_tier(&self) -> bool {
        self.premium_tier
    }

    /// The final usage, when the stream delivered one that could be read.
    pub fn usage(&self) -> Option<Usage> {
        self.usage.filter(|_| !self.malformed)
    }

    /// Meters one chunk of the stream; in strip mode, rewrites it (complete lines only).
    pub fn feed(&mut self, body: &mut Option<Bytes>, end: bool) {
        let Some(chunk) = body.as_ref() else {
            if end && self.strip && !self.line.is_empty() {
                // The stream ended inside a line: pass what is left as it came.
                *body = Some(Bytes::from(std::mem::take(&mut self.line)));
            }
            return;
        };
        if !self.strip {
            self.scan(chunk);
            return;
        }
        let mut out = BytesMut::with_capacity(chunk.len() + self.line.len());
        let mut rest: &[u8] = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (piece, after) = rest.split_at(nl + 1);
            rest = after;
            let whole;
            let line: &[u8] = if self.line.is_empty() {
                piece
            } else {
                self.line.extend_from_slice(piece);
                whole = std::mem::take(&mut self.line);
                &whole
            };
            self.pass_line(line, &mut out);
        }
        if !self.room_for(rest.len()) {
            // Too long to hold back: it goes on as it came, and so does the rest of the
            // stream, unfiltered (charged as unmeterable). Nothing the vendor sent is lost.
            self.malformed = true;
            self.strip = false;
            out.extend_from_slice(&std::mem::take(&mut self.line));
            out.extend_from_slice(rest);
            *body = Some(out.freeze());
            return;
        }
        self.line.extend_from_slice(rest);
        if end && !self.line.is_empty() {
            out.extend_from_slice(&std::mem::take(&mut self.line));
        }
        *body = Some(out.freeze());
    }

    /// Non-strip mode: the chunk goes on untouched; complete lines are read as they end.
    fn scan(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (piece, after) = rest.split_at(nl + 1);
            rest = after;
            if self.line.is_empty() {
                self.read_line(piece);
            } else {
                let mut whole = std::mem::take(&mut self.line);
                whole.extend_from_slice(piece);
                self.read_line(&whole);
            }
        }
        self.keep_partial(rest);
    }

    /// Whether the unfinished line may grow by `more` bytes: within `MAX_LINE`, and
    /// within what all calls may hold at once.
    fn room_for(&mut self, more: usize) -> bool {
        let total = self.line.len() + more;
        total <= MAX_LINE && self.held.cover(total)
    }

    fn keep_partial(&mut self, rest: &[u8]) {
        if !self.room_for(rest.len()) {
            self.malformed = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(rest);
        }
    }

    fn pass_line(&mut self, line: &[u8], out: &mut BytesMut) {
        let content = trim_eol(line);
        if self.dropping {
            if content.is_empty() {
                self.dropping = false;
                return;
            }
            self.dropping = false;
        }
        match self.read_line(line) {
            LineKind::UsageOnly => {
                self.dropping = true;
            }
            LineKind::NullUsage => {
                let eol = &line[content.len()..];
                let suffix: &[u8] = br#","usage":null}"#;
                if content.ends_with(suffix) {
                    out.extend_from_slice(&content[..content.len() - suffix.len()]);
                    out.extend_from_slice(b"}");
                    out.extend_from_slice(eol);
                } else {
                    out.extend_from_slice(line);
                }
            }
            LineKind::Other => out.extend_from_slice(line),
        }
    }

    /// Reads one complete line (with its end-of-line bytes).
    fn read_line(&mut self, line: &[u8]) -> LineKind {
        let content = trim_eol(line);
        let Some(data) = content.strip_prefix(b"data:") else {
            return LineKind::Other;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if !contains(data, b"\"usage\"") && !contains(data, b"\"service_tier\"") {
            return LineKind::Other;
        }
        match self.api {
            Api::OpenAiChat | Api::OpenAiEmbeddings => {
                #[derive(Deserialize)]
                struct Chunk {
                    choices: Option<Vec<serde::de::IgnoredAny>>,
                    usage: Option<RawUsage>,
                    service_tier: Option<String>,
                }
                let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
                    self.malformed = true;
                    return LineKind::Other;
                };
                self.premium_tier |= billed_above_the_table(chunk.service_tier.as_deref());
                match chunk.usage {
                    None => LineKind::NullUsage,
                    Some(raw) => {
                        match raw.to_usage(self.api) {
                            Some(mut u) => {
                                u.premium_tier |=
                                    billed_above_the_table(chunk.service_tier.as_deref());
                                self.usage = Some(u);
                            }
                            None => self.malformed = true,
                        }
                        if chunk.choices.is_some_and(|c| c.is_empty()) {
                            LineKind::UsageOnly
                        } else {
                            LineKind::Other
                        }
                    }
                }
            }
            Api::OpenAiResponses => {
                #[derive(Deserialize)]
                struct Event {
                    #[serde(rename = "type")]
                    kind: Option<String>,
                    response: Option<WithUsage>,
                }
                let Ok(event) = serde_json::from_slice::<Event>(data) else {
                    self.malformed = true;
                    return LineKind::Other;
                };
                let last = matches!(
                    event.kind.as_deref(),
                    Some("response.completed" | "response.incomplete" | "response.failed")
                );
                // An earlier event (`response.created`, `.in_progress`) names the tier
                // asked for (`auto` before the vendor picks one): a premium one named
                // there already costs the cap, should the stream end before its last event.
                if let Some(r) = event.response.as_ref().filter(|_| !last) {
                    self.premium_tier |=
                        matches!(r.service_tier.as_deref(), Some("priority" | "scale"));
                }
                if last {
                    if let Some(r) = &event.response {
                        self.premium_tier |= billed_above_the_table(r.service_tier.as_deref());
                    }
                    match event.response.and_then(|r| r.to_usage(self.api)) {
                        Some(u) => self.usage = Some(u),
                        None => self.malformed = true,
                    }
                }
                LineKind::Other
            }
            Api::AnthropicMessages => {
                #[derive(Deserialize)]
                struct Event {
                    #[serde(rename = "type")]
                    kind: Option<String>,
                    message: Option<WithUsage>,
                    usage: Option<RawUsage>,
                }
                let Ok(event) = serde_json::from_slice::<Event>(data) else {
                    self.malformed = true;
                    return LineKind::Other;
                };
                match event.kind.as_deref() {
                    Some("message_start") => match event.message.and_then(|m| m.usage) {
                        Some(u) => {
                            self.premium_tier |= billed_above_the_table(u.service_tier.as_deref());
                            self.started = Some(u);
                        }
                        None => self.malformed = true,
                    },
                    Some("message_delta") => {
                        let mut total = self.started.clone().unwrap_or_default();
                        match event.usage {
                            // The final output count is what the delta is for: without
                            // it, only `message_start`'s placeholder would be priced.
                            Some(later) if later.output_tokens.is_some() => total.merge(later),
                            _ => self.malformed = true,
                        }
                        match total.to_usage(self.api) {
                            Some(u) => self.usage = Some(u),
                            None => self.malformed = true,
                        }
                    }
                    _ => {}
                }
                LineKind::Other
            }
        }
    }
}

enum LineKind {
    /// OpenAI's usage chunk: no choices, only usage.
    UsageOnly,
    /// A chunk whose `usage` is null (present when usage was asked for).
    NullUsage,
    Other,
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` cut into pieces of `size` bytes; returns what passed and the usage.
    fn run(api: Api, strip: bool, stream: &str, size: usize) -> (String, Option<Usage>) {
        let mut meter = SseMeter::new(api, strip, super::super::held::Held::new(0));
        let mut out = Vec::new();
        let pieces: Vec<&[u8]> = stream.as_bytes().chunks(size).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let mut body = Some(Bytes::copy_from_slice(piece));
            meter.feed(&mut body, i + 1 == pieces.len());
            out.extend_from_slice(&body.unwrap());
        }
        (String::from_utf8(out).unwrap(), meter.usage())
    }

    const CHAT_WITH_USAGE: &str = concat!(
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":7,",
        "\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n",
        "data: [DONE]\n\n"
    );

    #[test]
    fn openai_usage_chunk_is_read_and_removed_only_when_keybrake_asked_for_it() {
        let want = Usage {
            input: 16,
            cached_input: 4,
            output: 7,
            reasoning: 2,
            ..Usage::default()
        };
        let without = concat!(
            "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        for size in [1, 2, 7, 64, 10_000] {
            assert_eq!(
                run(Api::OpenAiChat, true, CHAT_WITH_USAGE, size),
                (without.to_string(), Some(want)),
                "pieces of {size}"
            );
            assert_eq!(
                run(Api::OpenAiChat, false, CHAT_WITH_USAGE, size),
                (CHAT_WITH_USAGE.to_string(), Some(want)),
                "pieces of {size}"
            );
        }
        let crlf = CHAT_WITH_USAGE.replace('\n', "\r\n");
        let (out, usage) = run(Api::OpenAiChat, true, &crlf, 5);
        assert_eq!((out, usage), (without.replace('\n', "\r\n"), Some(want)));
    }

    #[test]
    fn a_stream_without_readable_usage_has_none() {
        // Cut before the usage chunk.
        let cut = &CHAT_WITH_USAGE[..150];
        assert_eq!(run(Api::OpenAiChat, true, cut, 9).1, None);
        // Complete lines lose their `"usage":null`; the unfinished one passes as it came.
        assert_eq!(
            run(Api::OpenAiChat, true, cut, 9).0,
            cut.replacen(",\"usage\":null", "", 1)
        );
        let bad =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":\"many\"}}\n\ndata: [DONE]\n\n";
        assert_eq!(run(Api::OpenAiChat, false, bad, 4).1, None);
        // Cached above the prompt: not a usage.
        let bad = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"prompt_tokens_details\":{\"cached_tokens\":2}}}\n\n";
        assert_eq!(run(Api::OpenAiChat, false, bad, 4).1, None);
        // A later unreadable usage line spoils an earlier good one.
        let twice = format!("{CHAT_WITH_USAGE}data: {{\"usage\":{{\"prompt_tokens\":-1}}}}\n\n");
        assert_eq!(run(Api::OpenAiChat, false, &twice, 50).1, None);
    }

    #[test]
    fn responses_api_usage_comes_with_its_last_event() {
        let stream = concat!(
            "event: response.created\n",
            "data: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"delta\":\"usage\"}\n\n",
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"usage\":{\"input_tokens\":30,",
            "\"input_tokens_details\":{\"cached_tokens\":10},\"output_tokens\":12,",
            "\"output_tokens_details\":{\"reasoning_tokens\":5},\"total_tokens\":42}}}\n\n"
        );
        let (out, usage) = run(Api::OpenAiResponses, false, stream, 3);
        assert_eq!(out, stream);
        assert_eq!(
            usage,
            Some(Usage {
                input: 20,
                cached_input: 10,
                output: 12,
                reasoning: 5,
                ..Usage::default()
            })
        );
        assert_eq!(run(Api::OpenAiResponses, false, &stream[..200], 3).1, None);
    }

    #[test]
    fn anthropic_usage_is_message_start_completed_by_message_delta() {
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg\",\"usage\":{\"input_tokens\":25,",
            "\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":50,",
            "\"cache_creation\":{\"ephemeral_5m_input_tokens\":60,\"ephemeral_1h_input_tokens\":40},\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n"
        );
        let want = Usage {
            input: 25,
            cached_input: 50,
            cache_write: 60,
            cache_write_1h: 40,
            output: 15,
            ..Usage::default()
        };
        assert_eq!(
            run(Api::AnthropicMessages, false, stream, 11),
            (stream.to_string(), Some(want))
        );
        // Cut after message_start: the output is not known.
        let cut = stream.split("event: message_delta").next().unwrap();
        assert_eq!(run(Api::AnthropicMessages, false, cut, 11).1, None);
        // A delta without the final output count: only the start's placeholder would
        // be known, so the usage cannot be read (the call costs its reservation).
        for delta in ["{}", "{\"input_tokens\":25}", "{\"output_tokens\":null}"] {
            let partial = stream.replace("{\"output_tokens\":15}", delta);
            assert_eq!(
                run(Api::AnthropicMessages, false, &partial, 11).1,
                None,
                "{delta}"
            );
        }
    }

    #[test]
    fn cache_writes_without_their_lifetimes_are_priced_as_the_dearer() {
        let body =
            br#"{"usage":{"input_tokens":5,"cache_creation_input_tokens":100,"output_tokens":2}}"#;
        let u = from_json(Api::AnthropicMessages, body).unwrap();
        assert_eq!((u.cache_write, u.cache_write_1h), (0, 100));
        let body =
            br#"{"usage":{"input_tokens":5,"cache_creation_input_tokens":100,"output_tokens":2,
            "cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":0}}}"#;
        let u = from_json(Api::AnthropicMessages, body).unwrap();
        assert_eq!((u.cache_write, u.cache_write_1h), (100, 0));
    }

    #[test]
    fn an_answer_served_at_a_tier_above_the_table_is_marked() {
        let chat = |tier: &str| {
            let body = format!(
                r#"{{"service_tier":{tier},"usage":{{"prompt_tokens":3,"completion_tokens":2}}}}"#
            );
            from_json(Api::OpenAiChat, body.as_bytes())
                .unwrap()
                .premium_tier
        };
        assert!(!chat("null") && !chat(r#""default""#) && !chat(r#""flex""#));
        assert!(chat(r#""priority""#) && chat(r#""scale""#) && chat(r#""turbo""#));
        let anthropic = |tier: &str| {
            let body = format!(
                r#"{{"usage":{{"input_tokens":3,"output_tokens":2,"service_tier":"{tier}"}}}}"#
            );
            from_json(Api::AnthropicMessages, body.as_bytes())
                .unwrap()
                .premium_tier
        };
        assert!(!anthropic("standard") && anthropic("priority"));
        // In a stream: the chat usage chunk, and Anthropic's message_start.
        let stream = concat!(
            "data: {\"choices\":[],\"service_tier\":\"priority\",",
            "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n"
        );
        let (_, usage) = run(Api::OpenAiChat, false, stream, 7);
        assert!(usage.unwrap().premium_tier);
        let stream = concat!(
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,",
            "\"output_tokens\":1,\"service_tier\":\"priority\"}}}\n\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n"
        );
        let (_, usage) = run(Api::AnthropicMessages, false, stream, 7);
        assert!(usage.unwrap().premium_tier);
        // A Responses stream cut after `response.created` named a premium tier: marked
        // (not for `auto`, which is what an early event says before the vendor picks).
        for (tier, premium) in [("priority", true), ("scale", true), ("auto", false)] {
            let stream = format!(
                "data: {{\"type\":\"response.created\",\"response\":{{\"id\":\"r\",\
                 \"service_tier\":\"{tier}\"}}}}\n\n\
                 data: {{\"type\":\"response.output_text.delta\",\"delta\":\"x\"}}\n\n"
            );
            let mut meter = SseMeter::new(
                Api::OpenAiResponses,
                false,
                super::super::held::Held::new(0),
            );
            meter.feed(&mut Some(Bytes::from(stream)), false);
            assert_eq!(meter.premium_tier(), premium, "{tier}");
            assert!(meter.usage().is_none());
        }
        // A JSON answer whose usage cannot be read still tells its tier.
        assert!(premium_tier_in_json(
            br#"{"service_tier":"priority","usage":{"prompt_tokens":"x"}}"#
        ));
        assert!(premium_tier_in_json(
            br#"{"usage":{"service_tier":"priority"}}"#
        ));
        assert!(!premium_tier_in_json(br#"{"service_tier":"default"}"#));
    }

    #[test]
    fn a_line_too_long_to_filter_reaches_the_client_whole() {
        let head = "data: {\"choices\":[{\"delta\":{\"content\":\"";
        let mut stream = String::from("data: {\"choices\":[],\"usage\":null}\n\n");
        stream.push_str(head);
        stream.push_str(&"A".repeat(MAX_LINE + (3 << 20)));
        stream.push_str("\"}}],\"usage\":null}\n\ndata: [DONE]\n\n");
        let (out, usage) = run(Api::OpenAiChat, true, &stream, 1 << 20);
        assert_eq!(usage, None);
        // The first line was filtered (its usage:null removed) before the long one came;
        // from the long line on, everything passes as sent.
        let long_at = stream.find(head).unwrap();
        assert!(
            out.ends_with(&stream[long_at..]),
            "the long line or what follows was cut"
        );
    }

    #[test]
    fn anthropic_passes_are_all_charged_compaction_included() {
        let msg = br#"{"id":"m","usage":{"input_tokens":23000,"output_tokens":1000,"iterations":[
            {"type":"compaction","input_tokens":180000,"output_tokens":3500},
            {"type":"message","input_tokens":23000,"output_tokens":1000,"cache_read_input_tokens":7}]}}"#;
        assert_eq!(
            from_json(Api::AnthropicMessages, msg),
            Some(Usage {
                input: 203_000,
                cached_input: 7,
                output: 4_500,
                ..Usage::default()
            })
        );
        // A pass that cannot be read makes the usage unreadable (charged as such).
        let bad = br#"{"usage":{"input_tokens":1,"output_tokens":1,"iterations":[{"type":"compaction"}]}}"#;
        assert_eq!(from_json(Api::AnthropicMessages, bad), None);
        // In a stream the passes come with message_delta's cumulative usage.
        let stream = concat!(
            "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n\n",
            "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9,\"iterations\":[",
            "{\"type\":\"compaction\",\"input_tokens\":500,\"output_tokens\":40},",
            "{\"type\":\"message\",\"input_tokens\":20,\"output_tokens\":9}]}}\n\n",
        );
        let (_, usage) = run(Api::AnthropicMessages, false, stream, 7);
        assert_eq!(
            usage,
            Some(Usage {
                input: 520,
                output: 49,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn json_answers() {
        let chat = br#"{"id":"c","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":null}}"#;
        assert_eq!(
            from_json(Api::OpenAiChat, chat),
            Some(Usage {
                input: 9,
                output: 3,
                ..Usage::default()
            })
        );
        let emb = br#"{"object":"list","data":[],"model":"e","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(
            from_json(Api::OpenAiEmbeddings, emb),
            Some(Usage {
                input: 8,
                ..Usage::default()
            })
        );
        let msg = br#"{"id":"m","usage":{"input_tokens":5,"output_tokens":6,"cache_read_input_tokens":2}}"#;
        assert_eq!(
            from_json(Api::AnthropicMessages, msg),
            Some(Usage {
                input: 5,
                cached_input: 2,
                output: 6,
                ..Usage::default()
            })
        );
        assert_eq!(
            from_json(Api::OpenAiChat, br#"{"usage":{"prompt_tokens":9}}"#),
            None
        );
        assert_eq!(from_json(Api::OpenAiChat, br#"{"usage":null}"#), None);
        assert_eq!(
            from_json(Api::OpenAiChat, b"{\"usage\":{\"prompt_tokens\":9,"),
            None
        );
        assert_eq!(
            from_json(
                Api::AnthropicMessages,
                br#"{"usage":{"input_tokens":1.5,"output_tokens":1}}"#
            ),
            None
        );
    }
}
