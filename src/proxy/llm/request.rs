//! Reading an LLM request body before it is forwarded: the model, the output limit, the
//! number of choices, whether it streams, and the upper bound on its input tokens; and
//! the one rewrite Keybrake makes, asking OpenAI's chat stream for its usage chunk.
//!
//! Only the top level of the JSON object is decoded (each member kept as raw text), so a
//! large prompt is scanned once and never rebuilt: the body goes out byte for byte, or
//! with `stream_options` inserted or replaced in place.

use super::Api;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Tokens added to the byte bound of a chat-style request for what the vendor wraps
/// around it (message framing, the system prompt that describes tools).
pub const OVERHEAD_TOKENS: u64 = 1_024;

/// Added to `OVERHEAD_TOKENS` when the request lists tools: the vendor's tool-use system
/// prompt and its built-in tools' definitions are not in the body (Anthropic's: ~350
/// tokens, plus ~250 for bash and ~700 for the text editor), with room to spare.
pub const TOOL_OVERHEAD_TOKENS: u64 = 2_048;

/// Quoted names that bring input the body's bytes do not bound: images, files, audio,
/// documents, stored conversations, prompts and items (`item_reference`), server-side
/// tools. Any of them (or an
/// ASCII letter written as a `\u00XX` escape, which could hide one) and the input bound
/// is the model's whole context window.
const RICH_MARKERS: &[&[u8]] = &[
    b"\"image",
    b"\"input_image",
    b"\"file",
    b"\"input_file",
    b"\"document",
    b"\"audio",
    b"\"input_audio",
    b"\"previous_response_id\"",
    // A Responses input item `{"type":"item_reference","id":"msg_…"}`: a stored item
    // of any size, like `previous_response_id`.
    b"\"item_reference",
    b"\"conversation\"",
    b"\"prompt\"",
    b"\"container\"",
    b"\"mcp",
    b"\"web_search",
    b"\"web_fetch",
    b"\"code_interpreter",
    b"\"code_execution",
    b"\"computer",
    // Server-side loops that sample more than once in one request: Anthropic's
    // `context_management` (a compaction pass reads the whole conversation), tool search
    // (Anthropic's `tool_search_tool_*`, OpenAI's `tool_search`).
    b"\"context_management\"",
    b"\"tool_search",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the body is not a JSON object")]
    NotJson,
    #[error("the body names no model")]
    NoModel,
    #[error("a field Keybrake meters has the wrong type or appears twice")]
    BadField,
    /// A `service_tier` billed at rates the price table does not hold (OpenAI's
    /// `priority`, or `auto`/`scale`/unknown values that may resolve to it).
    #[error("a service_tier Keybrake cannot price")]
    UnmeteredTier,
    /// A server-side tool billed per use (`FEE_TOOLS`), or what may bring one.
    #[error("a tool billed per use, which Keybrake does not meter")]
    UnmeteredTool,
    /// A background response that may sample more than once: charged before any usage
    /// exists, with no bound.
    #[error("a background response with a looping tool, which Keybrake cannot bound")]
    UnmeteredBackground,
    /// Anthropic's `speed` other than `standard`, or an `inference_geo`: billed at a
    /// premium over the table's rates.
    #[error("a speed or inference region Keybrake cannot price")]
    UnmeteredSpeed,
}

/// Server-side tools the vendor bills per use (a search, a container session, an
/// image) on top of tokens, by `type` prefix (`web_search_preview`,
/// `web_search_20250305`): no usage the proxy reads carries that fee, so a capped key
/// cannot ask for them. Also Anthropic's `advisor_*`, which runs another model billed at
/// that model's rates (its passes are not priced apart). Tools billed only in tokens of
/// the request's model (functions, MCP, web fetch, computer use) pass; OpenAI's `shell`
/// passes only in a local environment (a hosted one runs in a container billed per
/// session).
const FEE_TOOLS: &[&str] = &[
    "web_search",
    "file_search",
    "code_interpreter",
    "image_generation",
    "code_execution",
    "advisor",
];

/// Server-side tools that loop, sampling the model more than once in one request, by
/// `type` prefix: such a call can cost more than one context window, so its reservation
/// is no bound (see `LlmRequest::samples_more`).
const LOOPING_TOOLS: &[&str] = &["mcp", "web_fetch", "tool_search"];

/// Refuses a request that may use a tool billed per use: one in `tools`, a chat's
/// `web_search_options` (search models bill each search), or a Responses stored
/// `prompt` (its tools are set in the vendor's dashboard, out of sight). Otherwise
/// `(whether it lists any tool, whether one of them loops (`LOOPING_TOOLS`))`.
fn check_tools(
    api: Api,
    tools: Option<&RawValue>,
    search: bool,
    prompt: bool,
) -> Result<(bool, bool), RequestError> {
    #[derive(serde::Deserialize)]
    struct Tool<'a> {
        #[serde(rename = "type")]
        kind: Option<String>,
        /// An object for `shell`; a string for OpenAI's computer use.
        #[serde(borrow)]
        environment: Option<&'a RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Environment {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    if search || (api == Api::OpenAiResponses && prompt) {
        return Err(RequestError::UnmeteredTool);
    }
    let Some(tools) = tools.filter(|t| t.get().trim() != "null") else {
        return Ok((false, false));
    };
    let tools: Vec<&RawValue> =
        serde_json::from_str(tools.get()).map_err(|_| RequestError::BadField)?;
    let listed = !tools.is_empty();
    let mut loops = false;
    for tool in tools {
        // A repeated `type` is an error here: the vendor may read either.
        let tool: Tool = serde_json::from_str(tool.get()).map_err(|_| RequestError::BadField)?;
        // In any case: a vendor that matched types without it would run the tool.
        let Some(kind) = tool.kind.map(|k| k.to_ascii_lowercase()) else {
            continue;
        };
        let hosted_shell = kind == "shell"
            && match tool.environment.filter(|e| e.get().trim() != "null") {
                None => false,
                Some(e) => serde_json::from_str::<Environment>(e.get())
                    .map_err(|_| RequestError::BadField)?
                    .kind
                    .as_deref()
                    .is_none_or(|k| k != "local"),
            };
        if hosted_shell || FEE_TOOLS.iter().any(|f| kind.starts_with(f)) {
            return Err(RequestError::UnmeteredTool);
        }
        loops |= LOOPING_TOOLS.iter().any(|t| kind.starts_with(t));
    }
    Ok((listed, loops))
}

/// The `service_tier` values priced at (or below) the table's rates: OpenAI's `default`
/// and `flex` (half price), Anthropic's `standard_only`. Anything else may be billed
/// at priority rates and is refused. Absent or `null`: the account's default tier.
fn metered_tiers(api: Api) -> &'static [&'static str] {
    match api {
        Api::AnthropicMessages => &["standard_only"],
        _ => &["default", "flex"],
    }
}

/// What metering needs from a request.
#[derive(Debug, PartialEq, Eq)]
pub struct LlmRequest {
    pub model: String,
    /// The largest output limit the body sets (`max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`), none when it sets none.
    pub output_limit: Option<u64>,
    /// Choices asked for (OpenAI chat `n`): each may write up to the output limit.
    pub choices: u64,
    pub stream: bool,
    /// The client asked for the stream's usage chunk itself.
    pub wants_usage: bool,
    /// The body may carry input its bytes do not bound (see `RICH_MARKERS`).
    pub rich_input: bool,
    /// A chat's predicted output (`prediction`): what the model does not use of it is
    /// billed at the output rate, on top of what it writes.
    pub predicted: bool,
    /// It lists tools (`TOOL_OVERHEAD_TOKENS`).
    pub has_tools: bool,
    /// The vendor may sample the model more than once for it (a looping server-side
    /// tool, MCP servers, a compaction pass): its reservation is no bound.
    pub samples_more: bool,
    /// Where `stream_options` is in the body (byte range of its value), if present.
    stream_options: Option<(usize, usize)>,
    /// Where the object's `{` is.
    open_brace: usize,
}

/// The body's top-level members, in order, each value as raw JSON text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The names of the fields metering reads, per API.
pub fn limit_fields(api: Api) -> &'static [&'static str] {
    match api {
        Api::OpenAiChat => &["max_tokens", "max_completion_tokens"],
        Api::OpenAiResponses => &["max_output_tokens"],
        Api::AnthropicMessages => &["max_tokens"],
        Api::OpenAiEmbeddings => &[],
    }
}

pub fn parse(api: Api, body: &[u8]) -> Result<LlmRequest, RequestError> {
    let text = std::str::from_utf8(body).map_err(|_| RequestError::NotJson)?;
    let Members(members) = serde_json::from_str(text).map_err(|_| RequestError::NotJson)?;
    let open_brace = text.find('{').ok_or(RequestError::NotJson)?;
    // A metered field given twice: the vendor's parser may read either. Refused.
    let find = |name: &str| -> Result<Option<&RawValue>, RequestError> {
        let mut found = members.iter().filter(|(k, _)| k == name).map(|(_, v)| *v);
        match (found.next(), found.next()) {
            (_, Some(_)) => Err(RequestError::BadField),
            (v, None) => Ok(v),
        }
    };
    let model = match find("model")? {
        None => return Err(RequestError::NoModel),
        Some(v) => match serde_json::from_str::<serde_json::Value>(v.get()) {
            Ok(serde_json::Value::String(m)) if !m.is_empty() => m,
            Ok(serde_json::Value::Null) => return Err(RequestError::NoModel),
            _ => return Err(RequestError::BadField),
        },
    };
    let number = |v: Option<&RawValue>| -> Result<Option<u64>, RequestError> {
        match v.map(|v| serde_json::from_str::<Option<u64>>(v.get())) {
            None => Ok(None),
            Some(Ok(n)) => Ok(n),
            Some(Err(_)) => Err(RequestError::BadField),
        }
    };
    let mut output_limit: Option<u64> = None;
    for name in limit_fields(api) {
        if let Some(n) = number(find(name)?)? {
            output_limit = Some(output_limit.map_or(n, |m| m.max(n)));
        }
    }
    let choices = if api == Api::OpenAiChat {
        number(find("n")?)?.unwrap_or(1).max(1)
    } else {
        1
    };
    let stream = match find("stream")?.map(|v| serde_json::from_str::<Option<bool>>(v.get())) {
        None => false,
        Some(Ok(s)) => s.unwrap_or(false),
        Some(Err(_)) => return Err(RequestError::BadField),
    };
    match find("service_tier")?.map(|v| serde_json::from_str::<Option<String>>(v.get())) {
        None | Some(Ok(None)) => {}
        Some(Ok(Some(tier))) if metered_tiers(api).contains(&tier.as_str()) => {}
        Some(Ok(Some(_))) => return Err(RequestError::UnmeteredTier),
        Some(Err(_)) => return Err(RequestError::BadField),
    }
    let (mut wants_usage, mut stream_options) = (false, None);
    if api == Api::OpenAiChat {
        if let Some(v) = find("stream_options")? {
            #[derive(serde::Deserialize)]
            struct Options {
                include_usage: Option<bool>,
            }
            let options = serde_json::from_str::<Option<Options>>(v.get())
                .map_err(|_| RequestError::BadField)?;
            wants_usage = options.and_then(|o| o.include_usage).unwrap_or(false);
            let at = v.get().as_ptr() as usize - text.as_ptr() as usize;
            stream_options = Some((at, at + v.get().len()));
        }
    }
    let present = |name: &str| -> Result<bool, RequestError> {
        Ok(find(name)?.is_some_and(|v| v.get().trim() != "null"))
    };
    let (has_tools, looping_tool) = check_tools(
        api,
        find("tools")?,
        api == Api::OpenAiChat && present("web_search_options")?,
        present("prompt")?,
    )?;
    let samples_more = looping_tool
        || present("mcp_servers")?
        || present("context_management")?
        || (api == Api::OpenAiResponses && has_mcp_item(find("input")?));
    // Anthropic's `speed: "fast"` bills a premium over the table's rates; `inference_geo`
    // one for a pinned region.
    if api == Api::AnthropicMessages {
        match find("speed")?.map(|v| serde_json::from_str::<Option<String>>(v.get())) {
            None | Some(Ok(None)) => {}
            Some(Ok(Some(speed))) if speed == "standard" => {}
            Some(Ok(Some(_))) => return Err(RequestError::UnmeteredSpeed),
            Some(Err(_)) => return Err(RequestError::BadField),
        }
        match find("inference_geo")?.map(|v| serde_json::from_str::<Option<String>>(v.get())) {
            None | Some(Ok(None)) => {}
            Some(Ok(Some(geo))) if geo == "global" => {}
            Some(Ok(Some(_))) => return Err(RequestError::UnmeteredSpeed),
            Some(Err(_)) => return Err(RequestError::BadField),
        }
    }
    // A background response answers before any usage exists, so it is charged its
    // reservation: no bound when the vendor may sample more than once.
    if api == Api::OpenAiResponses && samples_more {
        match find("background")?.map(|v| serde_json::from_str::<Option<bool>>(v.get())) {
            None | Some(Ok(None | Some(false))) => {}
            Some(Ok(Some(true))) => return Err(RequestError::UnmeteredBackground),
            Some(Err(_)) => return Err(RequestError::BadField),
        }
    }
    let predicted =
        api == Api::OpenAiChat && find("prediction")?.is_some_and(|v| v.get().trim() != "null");
    let rich_input = api != Api::OpenAiEmbeddings
        && (has_rich_input(body)
            || (api == Api::OpenAiResponses && has_bare_reference(find("input")?)));
    Ok(LlmRequest {
        model,
        output_limit,
        choices,
        stream,
        wants_usage,
        rich_input,
        predicted,
        has_tools,
        samples_more,
        stream_options,
        open_brace,
    })
}

/// Responses input items whose content is all in the body even when they carry the `id`
/// of the output item they echo back.
const SELF_CONTAINED_ITEMS: &[&str] = &[
    "message",
    "function_call",
    "function_call_output",
    "custom_tool_call",
    "custom_tool_call_output",
    "local_shell_call",
    "local_shell_call_output",
    "shell_call",
    "shell_call_output",
    "apply_patch_call",
    "apply_patch_call_output",
];

/// Whether a Responses `input` list holds an item that may bring stored content by its
/// `id`: an item reference written without its type (`{"id":"msg_…"}`: the `type` of an
/// item reference is optional); a `reasoning` item without its `encrypted_content` (the
/// vendor loads the stored reasoning, tokens the body does not show); any other type with
/// an `id` that is not known to be self-contained; or an item Keybrake cannot read for
/// that (a repeated or non-string `type`). Fail closed: such an item is a stored item of
/// any size.
fn has_bare_reference(input: Option<&RawValue>) -> bool {
    #[derive(serde::Deserialize)]
    struct Item<'a> {
        #[serde(rename = "type")]
        kind: Option<String>,
        #[serde(borrow)]
        id: Option<&'a RawValue>,
        #[serde(borrow)]
        encrypted_content: Option<&'a RawValue>,
    }
    let present = |v: Option<&RawValue>| v.is_some_and(|v| v.get() != "null");
    let Some(items) = input.and_then(|v| serde_json::from_str::<Vec<&RawValue>>(v.get()).ok())
    else {
        return false;
    };
    items.iter().any(|item| {
        item.get().starts_with('{')
            && match serde_json::from_str::<Item>(item.get()) {
                Ok(i) if !present(i.id) => false,
                Ok(i) => match i.kind.as_deref() {
                    None => true,
                    Some("reasoning") => !present(i.encrypted_content),
                    Some(kind) => !SELF_CONTAINED_ITEMS.contains(&kind),
                },
                Err(_) => true,
            }
    })
}

/// Whether a Responses `input` list holds an MCP item (`mcp_call`, `mcp_list_tools`,
/// `mcp_approval_response`, any `mcp…` type in any case): the vendor may go on with the
/// MCP call it continues, sampling more than once, even with no `tools` in the request.
/// An item whose type cannot be read counts (fail closed).
fn has_mcp_item(input: Option<&RawValue>) -> bool {
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let Some(items) = input.and_then(|v| serde_json::from_str::<Vec<&RawValue>>(v.get()).ok())
    else {
        return false;
    };
    items.iter().any(|item| {
        item.get().starts_with('{')
            && serde_json::from_str::<Item>(item.get()).map_or(true, |i| {
                i.kind
                    .is_some_and(|k| k.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("mcp")))
            })
    })
}

/// One pass over the body, looking only where a marker can start (a quote or a backslash).
fn has_rich_input(body: &[u8]) -> bool {
    body.iter().enumerate().any(|(i, &b)| match b {
        b'"' => RICH_MARKERS.iter().any(|m| body[i..].starts_with(m)),
        // `\u0069mage`: an escaped printable ASCII character, which no client needs.
        b'\\' => matches!(
            body.get(i + 1..i + 6),
            Some([b'u', b'0', b'0', b'2'..=b'7', h]) if h.is_ascii_hexdigit()
        ),
        _ => false,
    })
}

impl LlmRequest {
    /// The most input tokens the call can be billed for: the body's bytes plus the
    /// vendor's framing (a token is at least one byte of UTF-8 text), within the context
    /// window; the whole window when the body may bring more than its bytes.
    /// `None`: no bound known (the price table gives no context window).
    pub fn input_bound(&self, api: Api, body_len: usize, context: Option<u64>) -> Option<u64> {
        let bytes = body_len as u64;
        if api == Api::OpenAiEmbeddings {
            return Some(bytes);
        }
        let overhead = if self.has_tools {
            OVERHEAD_TOKENS + TOOL_OVERHEAD_TOKENS
        } else {
            OVERHEAD_TOKENS
        };
        let text = bytes.saturating_add(overhead);
        match (self.rich_input, context) {
            (true, context) => context,
            (false, Some(c)) => Some(text.min(c)),
            (false, None) => Some(text),
        }
    }

    /// Whether Keybrake must ask for the usage chunk (OpenAI chat streams only).
    pub fn needs_usage_injected(&self, api: Api) -> bool {
        api == Api::OpenAiChat && self.stream && !self.wants_usage
    }

    /// The body with `stream_options.include_usage` set to true, everything else as sent.
    pub fn inject_include_usage(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(body.len() + 40);
        match self.stream_options {
            None => {
                out.extend_from_slice(&body[..=self.open_brace]);
                out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
                out.extend_from_slice(&body[self.open_brace + 1..]);
            }
            Some((start, end)) => {
                let mut options = match serde_json::from_slice(&body[start..end]).ok()? {
                    serde_json::Value::Object(o) => o,
                    _ => serde_json::Map::new(),
                };
                options.insert("include_usage".into(), serde_json::Value::Bool(true));
                out.extend_from_slice(&body[..start]);
                out.extend_from_slice(serde_json::to_string(&options).ok()?.as_bytes());
                out.extend_from_slice(&body[end..]);
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<LlmRequest, RequestError> {
        parse(Api::OpenAiChat, body.as_bytes())
    }

    #[test]
    fn reads_model_limits_choices_and_stream() {
        let r = chat(r#"{"model":"gpt-4o","max_tokens":50,"max_completion_tokens":80,"n":3,"stream":true,"messages":[]}"#).unwrap();
        assert_eq!(r.model, "gpt-4o");
        assert_eq!(r.output_limit, Some(80));
        assert_eq!(r.choices, 3);
        assert!(r.stream && !r.wants_usage && r.needs_usage_injected(Api::OpenAiChat));
        let r = chat(r#"{"model":"m","stream_options":{"include_usage":true},"stream":true,"max_tokens":null}"#).unwrap();
        assert!(r.wants_usage && !r.needs_usage_injected(Api::OpenAiChat));
        assert_eq!(r.output_limit, None);
        let r = parse(
            Api::OpenAiResponses,
            br#"{"model":"m","max_output_tokens":9,"max_tokens":99999,"n":5}"#,
        )
        .unwrap();
        assert_eq!((r.output_limit, r.choices), (Some(9), 1));
        let r = parse(
            Api::AnthropicMessages,
            br#"{"model":"c","max_tokens":1024,"stream":false}"#,
        )
        .unwrap();
        assert_eq!((r.output_limit, r.stream), (Some(1024), false));
    }

    #[test]
    fn refuses_what_cannot_be_metered() {
        assert_eq!(chat("not json"), Err(RequestError::NotJson));
        assert_eq!(chat("[1]"), Err(RequestError::NotJson));
        assert_eq!(chat(r#"{"model":"m""#), Err(RequestError::NotJson));
        assert_eq!(chat(r#"{"messages":[]}"#), Err(RequestError::NoModel));
        assert_eq!(chat(r#"{"model":null}"#), Err(RequestError::NoModel));
        assert_eq!(chat(r#"{"model":7}"#), Err(RequestError::BadField));
        assert_eq!(chat(r#"{"model":""}"#), Err(RequestError::BadField));
        assert_eq!(
            chat(r#"{"model":"m","model":"n"}"#),
            Err(RequestError::BadField)
        );
        assert_eq!(
            chat(r#"{"model":"m","max_tokens":-1}"#),
            Err(RequestError::BadField)
        );
        assert_eq!(
            chat(r#"{"model":"m","max_tokens":1.5}"#),
            Err(RequestError::BadField)
        );
        assert_eq!(
            chat(r#"{"model":"m","max_tokens":"9"}"#),
            Err(RequestError::BadField)
        );
        assert_eq!(
            chat(r#"{"model":"m","max_tokens":1,"max_tokens":1000000}"#),
            Err(RequestError::BadField)
        );
        assert_eq!(
            chat(r#"{"model":"m","stream":"yes"}"#),
            Err(RequestError::BadField)
        );
        assert_eq!(
            chat(r#"{"model":"m","stream_options":3}"#),
            Err(RequestError::BadField)
        );
    }

    #[test]
    fn a_service_tier_priced_above_the_table_is_refused() {
        let responses = |b: &str| parse(Api::OpenAiResponses, b.as_bytes());
        let anthropic = |b: &str| parse(Api::AnthropicMessages, b.as_bytes());
        for ok in [
            r#"{"model":"m"}"#,
            r#"{"model":"m","service_tier":null}"#,
            r#"{"model":"m","service_tier":"default"}"#,
            r#"{"model":"m","service_tier":"flex"}"#,
        ] {
            assert!(chat(ok).is_ok(), "{ok}");
            assert!(responses(ok).is_ok(), "{ok}");
        }
        for refused in [
            r#"{"model":"m","service_tier":"priority"}"#,
            r#"{"model":"m","service_tier":"auto"}"#,
            r#"{"model":"m","service_tier":"scale"}"#,
            r#"{"model":"m","service_tier":"Default"}"#,
            r#"{"model":"m","service_tier":"turbo"}"#,
            r#"{"model":"m","service_tier":"\u0070riority"}"#,
            r#"{"model":"m","service_\u0074ier":"priority"}"#,
        ] {
            assert_eq!(chat(refused), Err(RequestError::UnmeteredTier), "{refused}");
            assert_eq!(responses(refused), Err(RequestError::UnmeteredTier));
        }
        assert_eq!(
            chat(r#"{"model":"m","service_tier":1}"#),
            Err(RequestError::BadField)
        );
        assert_eq!(
            chat(r#"{"model":"m","service_tier":"default","service_tier":"priority"}"#),
            Err(RequestError::BadField)
        );
        assert!(anthropic(r#"{"model":"c","service_tier":"standard_only"}"#).is_ok());
        assert_eq!(
            anthropic(r#"{"model":"c","service_tier":"auto"}"#),
            Err(RequestError::UnmeteredTier)
        );
    }

    #[test]
    fn a_request_listing_tools_reserves_room_for_the_vendors_tool_prompt() {
        let plain = r#"{"model":"c","tools":[]}"#;
        let tools = r#"{"model":"c","tools":[{"type":"bash_20250124","name":"bash"}]}"#;
        let bound = |b: &str| {
            parse(Api::AnthropicMessages, b.as_bytes())
                .unwrap()
                .input_bound(Api::AnthropicMessages, 100, None)
        };
        assert_eq!(bound(plain), Some(100 + OVERHEAD_TOKENS));
        assert_eq!(
            bound(tools),
            Some(100 + OVERHEAD_TOKENS + TOOL_OVERHEAD_TOKENS)
        );
    }

    #[test]
    fn tool_types_in_any_case_and_mcp_input_items_are_known() {
        let responses = |b: &str| parse(Api::OpenAiResponses, b.as_bytes());
        let anthropic = |b: &str| parse(Api::AnthropicMessages, b.as_bytes());
        for looping in [
            r#"{"model":"c","tools":[{"type":"WEB_FETCH_20250910","name":"x"}]}"#,
            r#"{"model":"c","tools":[{"type":"Tool_Search_Tool_Regex_20251119","name":"x"}]}"#,
        ] {
            assert!(anthropic(looping).unwrap().samples_more, "{looping}");
        }
        assert!(
            responses(r#"{"model":"m","tools":[{"type":"MCP","server_url":"https://x"}]}"#)
                .unwrap()
                .samples_more
        );
        assert_eq!(
            anthropic(r#"{"model":"c","tools":[{"type":"Web_Search_20250305","name":"s"}]}"#).err(),
            Some(RequestError::UnmeteredTool)
        );
        for item in [
            r#"{"type":"mcp_approval_response","approve":true,"approval_request_id":"a"}"#,
            r#"{"type":"mcp_list_tools","server_label":"x","tools":[]}"#,
            r#"{"type":"McP_call","id":"c"}"#,
            r#"{"type":"mcp_call","type":"message"}"#,
        ] {
            let body = format!(r#"{{"model":"m","previous_response_id":"r","input":[{item}]}}"#);
            assert!(responses(&body).unwrap().samples_more, "{item}");
        }
        let plain = r#"{"model":"m","input":[{"type":"message","role":"user","content":"mcp"}]}"#;
        assert!(!responses(plain).unwrap().samples_more);
    }

    #[test]
    fn advisors_hosted_shells_premium_speeds_and_unbounded_background_calls_are_refused() {
        let responses = |b: &str| parse(Api::OpenAiResponses, b.as_bytes());
        let anthropic = |b: &str| parse(Api::AnthropicMessages, b.as_bytes());
        let advisor = r#"{"model":"c","tools":[{"type":"advisor_20260301","name":"advisor","model":"claude-opus-4-6"}]}"#;
        assert_eq!(anthropic(advisor).err(), Some(RequestError::UnmeteredTool));
        for hosted in [
            r#"{"model":"m","tools":[{"type":"shell","environment":{"type":"container_auto"}}]}"#,
            r#"{"model":"m","tools":[{"type":"shell","environment":{"type":"container_reference","container_id":"cntr_1"}}]}"#,
            r#"{"model":"m","tools":[{"type":"shell","environment":{}}]}"#,
        ] {
            assert_eq!(
                responses(hosted).err(),
                Some(RequestError::UnmeteredTool),
                "{hosted}"
            );
        }
        for local in [
            r#"{"model":"m","tools":[{"type":"shell","environment":{"type":"local"}}]}"#,
            r#"{"model":"m","tools":[{"type":"shell"}]}"#,
        ] {
            assert!(!responses(local).unwrap().samples_more, "{local}");
        }
        for premium in [
            r#"{"model":"c","max_tokens":5,"speed":"fast"}"#,
            r#"{"model":"c","max_tokens":5,"inference_geo":"us"}"#,
        ] {
            assert_eq!(
                anthropic(premium).err(),
                Some(RequestError::UnmeteredSpeed),
                "{premium}"
            );
        }
        assert!(anthropic(r#"{"model":"c","speed":"standard","inference_geo":null}"#).is_ok());
        assert!(anthropic(r#"{"model":"c","inference_geo":"global"}"#).is_ok());
        // Computer use names its environment with a string: it passes.
        let computer = r#"{"model":"m","tools":[{"type":"computer_use_preview","environment":"browser","display_width":1024,"display_height":768}]}"#;
        assert!(responses(computer).is_ok());
        assert_eq!(
            responses(r#"{"model":"m","tools":[{"type":"shell","environment":"container_auto"}]}"#)
                .err(),
            Some(RequestError::BadField)
        );
        assert_eq!(
            anthropic(r#"{"model":"c","speed":1}"#).err(),
            Some(RequestError::BadField)
        );
        // Calls the vendor may sample more than once are known as such; in the background
        // (charged before any usage exists) they are refused.
        let mcp = r#""tools":[{"type":"mcp","server_url":"https://x","require_approval":"never"}]"#;
        assert!(
            responses(&format!(r#"{{"model":"m",{mcp}}}"#))
                .unwrap()
                .samples_more
        );
        assert_eq!(
            responses(&format!(r#"{{"model":"m","background":true,{mcp}}}"#)).err(),
            Some(RequestError::UnmeteredBackground)
        );
        assert!(responses(&format!(r#"{{"model":"m","background":false,{mcp}}}"#)).is_ok());
        let background = responses(
            r#"{"model":"m","background":true,"tools":[{"type":"function","name":"f"}]}"#,
        );
        assert!(!background.unwrap().samples_more);
        for looping in [
            r#"{"model":"c","tools":[{"type":"web_fetch_20250910","name":"web_fetch"}]}"#,
            r#"{"model":"c","tools":[{"type":"tool_search_tool_regex_20251119","name":"s"}]}"#,
            r#"{"model":"c","mcp_servers":[{"type":"url","url":"https://x","name":"x"}]}"#,
            r#"{"model":"c","context_management":{"edits":[{"type":"compact_20260112"}]}}"#,
        ] {
            assert!(anthropic(looping).unwrap().samples_more, "{looping}");
        }
        assert!(
            !anthropic(r#"{"model":"c","tools":[{"type":"bash_20250124","name":"bash"}]}"#)
                .unwrap()
                .samples_more
        );
    }

    #[test]
    fn tools_billed_per_use_are_refused_and_others_pass() {
        let responses = |b: &str| parse(Api::OpenAiResponses, b.as_bytes());
        for refused in [
            r#"{"model":"m","tools":[{"type":"function","name":"f"},{"type":"web_search"}]}"#,
            r#"{"model":"m","tools":[{"type":"web_search_preview_2025_03_11"}]}"#,
            r#"{"model":"m","tools":[{"type":"file_search","vector_store_ids":["vs_1"]}]}"#,
            r#"{"model":"m","tools":[{"type":"code_interpreter","container":{"type":"auto"}}]}"#,
            r#"{"model":"m","tools":[{"type":"image_generation"}]}"#,
            r#"{"model":"m","tools":[{"type":"\u0077eb_search"}]}"#,
            r#"{"model":"m","prompt":{"id":"pmpt_1"}}"#,
        ] {
            assert_eq!(
                responses(refused).err(),
                Some(RequestError::UnmeteredTool),
                "{refused}"
            );
        }
        // The vendor may read either of two `type`s; tools not a list of objects.
        for bad in [
            r#"{"model":"m","tools":[{"type":"function","type":"web_search"}]}"#,
            r#"{"model":"m","tools":{"type":"web_search"}}"#,
            r#"{"model":"m","tools":["web_search"]}"#,
        ] {
            assert_eq!(responses(bad).err(), Some(RequestError::BadField), "{bad}");
        }
        let anthropic = |b: &str| parse(Api::AnthropicMessages, b.as_bytes());
        for refused in [
            r#"{"model":"c","tools":[{"type":"web_search_20250305","name":"web_search","max_uses":3}]}"#,
            r#"{"model":"c","tools":[{"type":"code_execution_20250825","name":"code_execution"}]}"#,
        ] {
            assert_eq!(
                anthropic(refused).err(),
                Some(RequestError::UnmeteredTool),
                "{refused}"
            );
        }
        assert_eq!(
            chat(r#"{"model":"m","web_search_options":{}}"#).err(),
            Some(RequestError::UnmeteredTool)
        );
        for fine in [
            r#"{"model":"m","tools":[{"type":"function","name":"f"},{"type":"mcp","server_url":"https://x"}],"prompt":null}"#,
            r#"{"model":"m","tools":null}"#,
            r#"{"model":"m","tools":[]}"#,
        ] {
            assert!(responses(fine).is_ok(), "{fine}");
        }
        assert!(anthropic(
            r#"{"model":"c","tools":[{"name":"get","input_schema":{}},{"type":"web_fetch_20250910","name":"web_fetch"},{"type":"bash_20250124","name":"bash"}]}"#
        )
        .is_ok());
        assert!(chat(r#"{"model":"m","web_search_options":null}"#).is_ok());
    }

    #[test]
    fn input_is_bounded_by_bytes_unless_the_body_brings_more() {
        let plain =
            chat(r#"{"model":"m","messages":[{"role":"user","content":"profile"}]}"#).unwrap();
        assert!(!plain.rich_input);
        assert_eq!(
            plain.input_bound(Api::OpenAiChat, 100, Some(128_000)),
            Some(1_124)
        );
        assert_eq!(
            plain.input_bound(Api::OpenAiChat, 1_000_000, Some(128_000)),
            Some(128_000)
        );
        for rich in [
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x"}}]}]}"#,
            r#"{"model":"m","previous_response_id":"resp_1","input":"go on"}"#,
            r#"{"model":"m","input":[{"type":"item_reference","id":"msg_1"}]}"#,
            r#"{"model":"m","input":[{"id":"msg_1","type":"item_reference"},{"role":"user","content":"go on"}]}"#,
            r#"{"model":"m","tools":[{"type":"mcp","server_url":"https://x"}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"\u0069mage"}]}]}"#,
            r#"{"model":"c","context_management":{"edits":[{"type":"compact_20260112"}]}}"#,
            r#"{"model":"c","tools":[{"type":"tool_search_tool_regex_20251119","name":"s"}]}"#,
        ] {
            let r = chat(rich).unwrap();
            assert!(r.rich_input, "{rich}");
            assert_eq!(
                r.input_bound(Api::OpenAiChat, 100, Some(128_000)),
                Some(128_000)
            );
            assert_eq!(r.input_bound(Api::OpenAiChat, 100, None), None);
        }
        // An item reference needs no type in the Responses API: `{"id":"msg_…"}`.
        let responses = |b: &str| parse(Api::OpenAiResponses, b.as_bytes()).unwrap();
        for rich in [
            r#"{"model":"m","input":[{"id":"msg_1"},{"role":"user","content":"go on"}]}"#,
            r#"{"model":"m","input":[{"id":"msg_1","type":null}]}"#,
            r#"{"model":"m","input":[{"id":"msg_1","type":"message","type":null}]}"#,
            // Stored reasoning, loaded by its id.
            r#"{"model":"m","input":[{"type":"reasoning","id":"rs_1","summary":[]}]}"#,
            r#"{"model":"m","input":[{"type":"reasoning","id":"rs_1","summary":[],"encrypted_content":null}]}"#,
            // A type Keybrake does not know, with an id.
            r#"{"model":"m","input":[{"type":"compaction","id":"cmp_1"}]}"#,
        ] {
            assert!(responses(rich).rich_input, "{rich}");
        }
        for plain in [
            r#"{"model":"m","input":"an id"}"#,
            r#"{"model":"m","input":[{"role":"user","content":"hi"}]}"#,
            r#"{"model":"m","input":[{"type":"message","id":"msg_1","role":"assistant","content":"hi"}]}"#,
            r#"{"model":"m","input":[{"role":"user","content":"hi","id":null}]}"#,
            r#"{"model":"m","input":[{"type":"function_call","id":"fc_1","call_id":"c","name":"f","arguments":"{}"}]}"#,
            r#"{"model":"m","input":[{"type":"reasoning","id":"rs_1","summary":[],"encrypted_content":"gAAA"}]}"#,
        ] {
            assert!(!responses(plain).rich_input, "{plain}");
        }
        // Non-ASCII text escaped by the client is fine.
        assert!(
            !chat(r#"{"model":"m","messages":[{"content":"\u00e9\u4e2d"}]}"#)
                .unwrap()
                .rich_input
        );
        let e = parse(
            Api::OpenAiEmbeddings,
            br#"{"model":"e","input":"an image file"}"#,
        )
        .unwrap();
        assert_eq!(e.input_bound(Api::OpenAiEmbeddings, 40, None), Some(40));
    }

    #[test]
    fn usage_is_asked_for_in_place_and_the_rest_kept_byte_for_byte() {
        let body = br#"  {"model":"m", "stream":true,"messages":[{"content":"{x}"}]}"#;
        let r = parse(Api::OpenAiChat, body).unwrap();
        let out = r.inject_include_usage(body).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"  {"stream_options":{"include_usage":true},"model":"m", "stream":true,"messages":[{"content":"{x}"}]}"#
        );
        let body =
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1},"z":2}"#;
        let r = parse(Api::OpenAiChat, body).unwrap();
        let out = r.inject_include_usage(body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        assert!(out.ends_with(br#","z":2}"#));
        let body = br#"{"model":"m","stream":true,"stream_options":null}"#;
        let out = parse(Api::OpenAiChat, body)
            .unwrap()
            .inject_include_usage(body)
            .unwrap();
        assert_eq!(
            &out[..],
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
        );
    }
}
