//! Stage 5, plan the body: from the request's header alone, decide what its body is to
//! the proxy — streamed through, read whole to meter its amount and/or convert it from
//! JSON to the form the vendor reads, or read for an LLM call — and refuse the bodies
//! whose amount could be read differently by the vendor. `prepare` then turns a body
//! read whole into what is sent. Pure functions: no I/O.

use super::deny::Denial;
use super::llm;
use super::meter::{self, ParsedBody};
use crate::config::{MeterRule, MeterSource, Vendor};
use bytes::Bytes;
use pingora::http::RequestHeader;

/// What is done with a request's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    /// Streamed to the vendor as it arrives (only its size is held to the limit).
    Stream,
    /// Token-metered: read whole and planned by `llm`.
    Llm(llm::Api),
    /// Read whole first: to meter its amount (`metered`, a request-metered rule) and/or to
    /// convert JSON to the form the vendor reads (`convert`). One of them is true.
    Read { metered: bool, convert: bool },
}

/// The plan for a request to `vendor` at `path` (vendor-relative), metered by `rule`.
pub fn plan(
    req: &RequestHeader,
    vendor: &Vendor,
    path: &str,
    rule: Option<&MeterRule>,
    body_limit: usize,
) -> Result<BodyPlan, Denial> {
    let content_length = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if content_length.is_some_and(|n| n > body_limit) {
        return Err(Denial::BodyTooLarge);
    }
    if let Some(api) = vendor.llm_api(&req.method, path) {
        return Ok(BodyPlan::Llm(api));
    }
    let content_type = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("?"));
    let is_json = meter::is_json(content_type);
    let metered = rule.filter(|r| r.source != MeterSource::Response);
    if metered.is_some()
        && (req.headers.contains_key(http::header::CONTENT_ENCODING)
            // Two types: the vendor may parse the body as the other one.
            || req.headers.get_all(http::header::CONTENT_TYPE).iter().count() > 1
            || !(is_json || content_type.is_none_or(meter::is_form)))
    {
        // Only a plain form or JSON body is read here: a vendor that decodes another type
        // (multipart, a compressed body) could find another amount in it.
        return Err(Denial::InvalidAmount);
    }
    let convert = is_json && content_length != Some(0) && vendor.converts_json(path);
    if metered.is_none() && !convert {
        return Ok(BodyPlan::Stream);
    }
    // The amount is only read from the body: the same field in the query string could be
    // read by the vendor instead (or merged over it).
    if let (Some(query), Some(rule)) = (req.uri.query(), metered) {
        if ParsedBody::from_form(query.as_bytes(), &metered_fields(rule)).has_fields() {
            return Err(Denial::InvalidAmount);
        }
    }
    Ok(BodyPlan::Read {
        metered: metered.is_some(),
        convert,
    })
}

/// The form fields a request-metered rule reads its amount from.
pub fn metered_fields(rule: &MeterRule) -> Vec<&str> {
    match rule.source {
        MeterSource::Items => meter::ITEM_FIELDS.to_vec(),
        _ => rule.fields().to_vec(),
    }
}

/// The body read whole, made into what is metered and sent: `(bytes, converted to a
/// form)`.
pub fn prepare(body: Bytes, metered: bool, convert: bool) -> Result<(Bytes, bool), Denial> {
    if convert && !body.is_empty() {
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(|_| {
            if metered {
                Denial::InvalidAmount
            } else {
                Denial::InvalidBody
            }
        })?;
        // Metered from what the vendor receives: a nested key flattens to a bracketed
        // name (`{"": {"amount": …}}` → `[amount]=…`), refused there.
        return Ok((Bytes::from(meter::json_to_form(&value)?), true));
    }
    if metered && meter::looks_like_json(&body) {
        // A JSON body declared as something else: a vendor that parses it as JSON would
        // see another amount than the form fields read here.
        return Err(Denial::InvalidAmount);
    }
    Ok((body, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, uri.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn plan_for(r: &RequestHeader, vendor: &str) -> Result<BodyPlan, Denial> {
        let c = Config::from_yaml("", None, &Overrides::default()).unwrap();
        let v = &c.vendors[vendor];
        let path = r.uri.path().to_string();
        let rule = match v.classify(&r.method, &path) {
            crate::config::Class::Metered(rule) => Some(rule.clone()),
            _ => None,
        };
        plan(r, v, &path, rule.as_deref(), 1 << 20)
    }

    const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
    const JSON: (&str, &str) = ("content-type", "application/json");

    #[test]
    fn a_metered_create_is_read_and_a_json_one_converted() {
        let r = req("POST", "/v1/payment_intents", &[FORM]);
        let read = BodyPlan::Read {
            metered: true,
            convert: false,
        };
        assert_eq!(plan_for(&r, "stripe"), Ok(read));
        let r = req("POST", "/v1/payment_intents", &[JSON]);
        let converted = BodyPlan::Read {
            metered: true,
            convert: true,
        };
        assert_eq!(plan_for(&r, "stripe"), Ok(converted));
    }

    #[test]
    fn a_free_call_streams_and_an_llm_call_is_planned_by_llm() {
        let r = req("GET", "/v1/customers", &[]);
        assert_eq!(plan_for(&r, "stripe"), Ok(BodyPlan::Stream));
        let r = req("POST", "/v1/chat/completions", &[JSON]);
        assert!(matches!(plan_for(&r, "openai"), Ok(BodyPlan::Llm(_))));
    }

    #[test]
    fn bodies_the_vendor_could_read_another_amount_from_are_refused() {
        for headers in [
            vec![("content-type", "multipart/form-data; boundary=x")],
            vec![FORM, ("content-encoding", "gzip")],
        ] {
            let r = req("POST", "/v1/payment_intents", &headers);
            assert_eq!(plan_for(&r, "stripe"), Err(Denial::InvalidAmount));
        }
        let r = req("POST", "/v1/payment_intents?amount=1", &[FORM]);
        assert_eq!(plan_for(&r, "stripe"), Err(Denial::InvalidAmount));
        // Two content types: the vendor may parse the body as the multipart one.
        let mut r = req("POST", "/v1/payment_intents", &[FORM]);
        r.append_header("content-type", "multipart/form-data; boundary=BB")
            .unwrap();
        assert_eq!(plan_for(&r, "stripe"), Err(Denial::InvalidAmount));
        // A query string without the amount's fields is fine.
        let r = req("POST", "/v1/payment_intents?expand[]=customer", &[FORM]);
        assert!(plan_for(&r, "stripe").is_ok());
        let r = req(
            "POST",
            "/v1/payment_intents",
            &[FORM, ("content-length", "2000000")],
        );
        assert_eq!(plan_for(&r, "stripe"), Err(Denial::BodyTooLarge));
    }

    #[test]
    fn prepare_converts_json_and_refuses_json_posing_as_a_form() {
        let json = Bytes::from_static(br#"{"amount":100,"currency":"usd","metadata":{"a":"b"}}"#);
        let (form, converted) = prepare(json, true, true).unwrap();
        assert!(converted);
        assert_eq!(&form[..], b"amount=100&currency=usd&metadata%5Ba%5D=b");
        let bad = Bytes::from_static(b"{not json");
        assert_eq!(prepare(bad.clone(), true, true), Err(Denial::InvalidAmount));
        assert_eq!(prepare(bad, false, true), Err(Denial::InvalidBody));
        let posing = Bytes::from_static(br#"{"amount":1}"#);
        assert_eq!(prepare(posing, true, false), Err(Denial::InvalidAmount));
        let form = Bytes::from_static(b"amount=1&currency=usd");
        assert_eq!(prepare(form.clone(), true, false), Ok((form, false)));
    }
}
