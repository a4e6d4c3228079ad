//! Every way the proxy can refuse a request, and the one function that turns a refusal
//! into the SPEC §4 response: `{"code","message","error":{"type","code","message"}}`,
//! with a JSON content type and a length, whether the refusal happens in `request_filter`
//! or in `fail_to_proxy`. A denial never reaches the vendor.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    MissingKey,
    InvalidKey,
    KeyExpired,
    KeyRevoked,
    VendorMismatch,
    EndpointNotAllowed,
    MethodNotAllowed,
    AccountNotAllowed,
    EndpointUnmetered,
    /// A field that can move money the meter does not see (the catalog's `refuse_fields`).
    UnmeteredField,
    /// An LLM call asking for a server-side tool billed per use (`llm::request`).
    UnmeteredTool,
    /// An OpenAI background response with a tool that loops: no bound on its cost.
    UnmeteredBackground,
    UnmeteredMultiPass,
    InvalidPath,
    AmountRequired,
    InvalidAmount,
    /// What a response-metered call can charge could not be read from the vendor.
    AmountUnknown,
    UnsupportedCurrency,
    InvalidBody,
    UnknownVendor,
    BodyTooLarge,
    BodyTimeout,
    CapExhausted,
    VendorNotConfigured,
    LedgerUnavailable,
    UpstreamUnavailable,
    UnknownModel,
    InvalidLlmBody,
    /// An LLM `service_tier` billed above the price table's rates (OpenAI `priority`).
    UnmeteredServiceTier,
    /// An Anthropic beta billed above the price table's rates (`context-1m-…`).
    UnmeteredBeta,
    /// Anthropic's `speed: "fast"` or `inference_geo`, billed above the table's rates.
    UnmeteredSpeed,
    /// `audit.durability: strict` with an audit trail that cannot be written: nothing is
    /// forwarded whose answer could not be released.
    AuditUnavailable,
    /// An edge node that could not sync for longer than its staleness limit.
    ControlUnreachable,
    UpstreamTimeout,
}

impl Denial {
    /// Slots for per-decision tables: 0 is "allowed", `1 + denial as usize` a denial.
    /// `UpstreamTimeout` is the last variant (a later one would fall outside the tables,
    /// which then look its counter up each time: still counted, only slower).
    pub const SLOTS: usize = Denial::UpstreamTimeout as usize + 2;

    /// This denial's slot (see `SLOTS`).
    pub fn slot(self) -> usize {
        self as usize + 1
    }

    pub fn status(self) -> u16 {
        use Denial::*;
        match self {
            MissingKey | InvalidKey | KeyExpired | KeyRevoked => 401,
            VendorMismatch | EndpointNotAllowed | MethodNotAllowed | AccountNotAllowed
            | EndpointUnmetered | UnmeteredField | UnmeteredTool | UnmeteredBackground
            | UnmeteredMultiPass => 403,
            InvalidPath | AmountRequired | InvalidAmount | AmountUnknown | UnsupportedCurrency
            | InvalidBody => 400,
            UnknownModel | InvalidLlmBody | UnmeteredServiceTier | UnmeteredBeta
            | UnmeteredSpeed => 400,
            UnknownVendor => 404,
            BodyTimeout => 408,
            BodyTooLarge => 413,
            CapExhausted => 429,
            UpstreamUnavailable | VendorNotConfigured => 502,
            LedgerUnavailable | AuditUnavailable | ControlUnreachable => 503,
            UpstreamTimeout => 504,
        }
    }

    pub fn code(self) -> &'static str {
        use Denial::*;
        match self {
            MissingKey => "missing_key",
            InvalidKey => "invalid_key",
            KeyExpired => "key_expired",
            KeyRevoked => "key_revoked",
            VendorMismatch => "vendor_mismatch",
            EndpointNotAllowed | MethodNotAllowed => "endpoint_not_allowed",
            AccountNotAllowed => "account_not_allowed",
            EndpointUnmetered | UnmeteredField | UnmeteredTool | UnmeteredBackground
            | UnmeteredMultiPass => "endpoint_unmetered",
            InvalidPath => "invalid_path",
            AmountRequired => "amount_required",
            InvalidAmount | AmountUnknown => "invalid_amount",
            UnsupportedCurrency => "unsupported_currency",
            InvalidBody => "invalid_body",
            UnknownVendor => "unknown_vendor",
            BodyTooLarge => "body_too_large",
            BodyTimeout => "body_timeout",
            CapExhausted => "cap_exhausted",
            VendorNotConfigured => "vendor_not_configured",
            LedgerUnavailable => "ledger_unavailable",
            AuditUnavailable => "audit_unavailable",
            ControlUnreachable => "control_unreachable",
            UpstreamUnavailable => "upstream_unavailable",
            UpstreamTimeout => "upstream_timeout",
            UnknownModel => "unknown_model",
            InvalidLlmBody | UnmeteredServiceTier | UnmeteredBeta | UnmeteredSpeed => {
                "invalid_body"
            }
        }
    }

    pub fn message(self) -> &'static str {
        use Denial::*;
        match self {
            MissingKey => "No vault key: send it as Authorization: Bearer vk_…, x-api-key, or the Basic user name.",
            InvalidKey => "The vault key is not valid (bad format, signature, algorithm or signing key). Send a vault key (vk_…), never the vendor's own secret.",
            KeyExpired => "The vault key has expired; issue a new one.",
            KeyRevoked => "The vault key has been revoked.",
            VendorMismatch => "The vault key was issued for another vendor.",
            EndpointNotAllowed => "The vault key does not allow this endpoint (its patterns are the vendor's own paths: POST /v1/payment_intents allows POST /stripe/v1/payment_intents here).",
            MethodNotAllowed => "The vault key allows this endpoint, but not with this HTTP method.",
            AccountNotAllowed => "The vault key does not allow this Stripe account.",
            EndpointUnmetered => "This endpoint can move money and Keybrake does not meter it: a key with a spend cap cannot call it.",
            UnmeteredTool => "This call asks for a server-side tool billed per use or at another model's rates (web search, file search, code interpreter or execution, a hosted shell, image generation, an advisor, or a stored prompt that may name one), which Keybrake does not meter: a key with a spend cap cannot use it.",
            UnmeteredBackground => "A background response (background: true) with a tool that samples the model more than once (MCP, web fetch, tool search, compaction) is answered before its usage exists, so Keybrake cannot bound its cost: a key with a spend cap must run it in the foreground.",
            UnmeteredMultiPass => "This request has a tool that makes the vendor sample the model more than once in one call (MCP, web fetch, tool search, context_management compaction): no reservation bounds its cost, so a key with a spend cap cannot send it unless the operator allows such tools (llm_multi_pass_tools: allow), which are then charged after the fact.",
            UnmeteredField => "This call sends a field that can move money Keybrake does not meter (such as a customer's balance, or an invoice item's quantity or price): a key with a spend cap cannot send it.",
            InvalidPath => "The request path is not canonical (dot segments, encoded '/' or '\\', empty segments or control bytes).",
            AmountRequired => "This endpoint is metered: the body must carry an integer amount.",
            InvalidAmount => "The amount is not a non-negative integer in minor units, or the body is malformed.",
            AmountUnknown => "What this call can charge could not be read from the vendor (no such object, or no amount and known currency).",
            UnsupportedCurrency => "The currency is missing or not in Keybrake's currency table.",
            InvalidBody => "The request body could not be read (malformed framing, such as a bad chunk size) or, being JSON, has no form encoding for the vendor.",
            UnknownVendor => "No such vendor in the catalog: a proxied path starts with the vendor's name, as in /stripe/v1/… or /openai/v1/….",
            BodyTooLarge => "The request body is larger than the proxy's limit.",
            BodyTimeout => "The request body did not arrive in time.",
            CapExhausted => "This request would exceed the vault key's daily spend cap.",
            VendorNotConfigured => "No credential is registered for this vendor.",
            LedgerUnavailable => "The spend ledger is unavailable; metered requests are refused until it returns.",
            AuditUnavailable => "The audit trail cannot be written and audit.durability is strict; requests are refused until it can.",
            ControlUnreachable => "This edge proxy is out of sync with the control plane (unreachable for longer than the staleness limit, or this node's token was refused); requests are refused until it syncs again.",
            UpstreamUnavailable => "The vendor could not be reached.",
            UpstreamTimeout => "The vendor did not answer in time.",
            UnknownModel => "The model is not in Keybrake's price table for this vendor.",
            InvalidLlmBody => "The body must be a JSON object naming a model, with integer output limits, each field once.",
            UnmeteredServiceTier => "This service_tier is billed at rates Keybrake does not meter: omit service_tier or set it to \"default\" or \"flex\" (Anthropic: \"standard_only\").",
            UnmeteredSpeed => "A speed other than \"standard\" or an inference_geo other than \"global\" is billed above the rates Keybrake meters: omit them.",
            UnmeteredBeta => "The anthropic-beta context-1m option bills long inputs at rates Keybrake does not meter: remove it from the anthropic-beta header.",
        }
    }

    /// The budget a `cap_exhausted` refusal ran into, named in its body (`"budget"`):
    /// today always the key's own daily cap.
    pub fn budget(self) -> Option<&'static str> {
        match self {
            Denial::CapExhausted => Some("key"),
            _ => None,
        }
    }

    pub fn body(self) -> Bytes {
        self.body_saying(self.message())
    }

    /// The body with `message` in place of the denial's own (one naming what the client
    /// sent).
    pub fn body_saying(self, message: &str) -> Bytes {
        let code = self.code();
        let mut body = serde_json::json!({
            "code": code,
            "message": message,
            "error": {"type": "keybrake_error", "code": code, "message": message},
        });
        if let Some(budget) = self.budget() {
            body["budget"] = budget.into();
        }
        Bytes::from(body.to_string())
    }
}

/// The denial answered for an error of the proxy path (`fail_to_proxy`): `None` when
/// the client went away or sent garbage, so there is nobody to answer.
pub fn for_proxy_error(e: &pingora::Error) -> Option<Denial> {
    use pingora::{ErrorSource, ErrorType::*};
    match e.etype() {
        HTTPStatus(413) => Some(Denial::BodyTooLarge),
        // The client's side: a body that stopped coming; a response it stopped reading
        // (nobody to answer).
        ReadTimedout if e.esource() == &ErrorSource::Downstream => Some(Denial::BodyTimeout),
        WriteTimedout if e.esource() == &ErrorSource::Downstream => None,
        ConnectTimedout | ReadTimedout | WriteTimedout => Some(Denial::UpstreamTimeout),
        _ if e.esource() == &ErrorSource::Upstream
            || matches!(
                e.etype(),
                ConnectNoRoute | ConnectRefused | ConnectError | TLSHandshakeFailure
            ) =>
        {
            Some(Denial::UpstreamUnavailable)
        }
        _ => None,
    }
}

/// `upstream_unavailable`'s message, naming the kind of failure (never an address: the
/// proxy's log has the details).
pub fn unreachable(e: &pingora::Error) -> &'static str {
    use pingora::ErrorType::*;
    match e.etype() {
        ConnectRefused => "The vendor could not be reached: connection refused. The proxy's log has the details.",
        ConnectNoRoute => "The vendor could not be reached: no route to it, or its host name does not resolve (yet). The proxy's log has the details.",
        TLSHandshakeFailure => "The vendor could not be reached: the TLS handshake failed (its certificate, or the protocol). The proxy's log has the details.",
        ConnectError => "The vendor could not be reached: the connection failed. The proxy's log has the details.",
        _ => "The vendor closed or broke the connection before answering. The proxy's log has the details.",
    }
}

/// Writes the denial, with `message` in place of its own when given. The connection is
/// closed afterwards when a request body may be left unread, so the next request on it
/// cannot be confused with leftover bytes.
pub async fn respond(
    session: &mut Session,
    denial: Denial,
    key_id: Option<&str>,
    message: Option<&str>,
) -> pingora::Result<()> {
    let body = denial.body_saying(message.unwrap_or(denial.message()));
    let mut header = ResponseHeader::build(denial.status(), Some(4))?;
    header.insert_header("content-type", "application/json")?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("cache-control", "no-store")?;
    if let Some(id) = key_id {
        header.insert_header("x-keybrake-key-id", id)?;
    }
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_top_level_and_stripe_shaped_codes() {
        let v: serde_json::Value = serde_json::from_slice(&Denial::CapExhausted.body()).unwrap();
        assert_eq!(v["code"], "cap_exhausted");
        assert_eq!(v["error"]["code"], "cap_exhausted");
        assert_eq!(v["error"]["type"], "keybrake_error");
        assert_eq!(v["message"], v["error"]["message"]);
        assert_eq!(Denial::CapExhausted.status(), 429);
        assert_eq!(Denial::MethodNotAllowed.code(), "endpoint_not_allowed");
    }

    #[test]
    fn only_cap_exhausted_names_its_budget() {
        let v: serde_json::Value = serde_json::from_slice(&Denial::CapExhausted.body()).unwrap();
        assert_eq!(v["budget"], "key");
        let v: serde_json::Value = serde_json::from_slice(&Denial::InvalidKey.body()).unwrap();
        assert!(v.get("budget").is_none());
    }

    #[test]
    fn a_timeout_is_the_vendors_or_the_clients_by_its_side() {
        use pingora::ErrorType::*;
        let error = |t: pingora::ErrorType, down: bool| {
            let mut e = pingora::Error::new(t);
            if down {
                e.as_down();
            } else {
                e.as_up();
            }
            for_proxy_error(&e)
        };
        assert_eq!(error(ConnectTimedout, false), Some(Denial::UpstreamTimeout));
        assert_eq!(error(ReadTimedout, false), Some(Denial::UpstreamTimeout));
        assert_eq!(error(WriteTimedout, false), Some(Denial::UpstreamTimeout));
        assert_eq!(error(ReadTimedout, true), Some(Denial::BodyTimeout));
        assert_eq!(error(WriteTimedout, true), None);
    }
}
