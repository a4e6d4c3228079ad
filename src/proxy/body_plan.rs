//! Stage 5, plan the body: from the request's header alone, decide what its body is to
//! the proxy — streamed through, read whole to meter its amount and/or convert it from
//! JSON to the form the vendor reads, or read for an LLM call — and refuse the bodies
//! whose amount could be read differently by the vendor. `prepare` then turns a body
//! read whole into what is sent. Pure functions: no I/O.

use super::deny::Denial;
use super::llm;
use super::meter;
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
    /// Read whole first: to meter its amount (`metered`, a request-metered rule), to
    /// convert JSON to the form the vendor reads (`convert`) and/or to refuse the fields
    /// the catalog refuses on this endpoint (`screened`, see `screen`). A call charged
    /// from its answer (a confirm, a capture) is read whole too, with all three false:
    /// what it may charge is looked up once its body is in, so a client cannot hold the
    /// body back while it raises the object's amount behind the lookup.
    Read {
        metered: bool,
        convert: bool,
        screened: bool,
    },
}

/// The plan for a request to `vendor` at `path` (vendor-relative), metered by `rule`,
/// where the catalog refuses the form fields `refused`.
pub fn plan(
    req: &RequestHeader,
    vendor: &Vendor,
    path: &str,
    rule: Option<&MeterRule>,
    refused: &[String],
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
    let screened = !refused.is_empty();
    if (metered.is_some() || screened)
        && (req.headers.contains_key(http::header::CONTENT_ENCODING)
            // Two types: the vendor may parse the body as the other one.
            || req.headers.get_all(http::header::CONTENT_TYPE).iter().count() > 1
            || !(is_json || content_type.is_none_or(meter::is_form)))
    {
        // Only a plain form or JSON body is read here: a vendor that decodes another type
        // (multipart, a compressed body) could find another amount, or a refused field,
        // in it.
        return Err(if metered.is_some() {
            Denial::InvalidAmount
        } else {
            Denial::UnmeteredField
        });
    }
    let convert = is_json && content_length != Some(0) && vendor.converts_json(path);
    let looked_up = rule.is_some_and(|r| r.source == MeterSource::Response);
    if metered.is_none() && !screened && !convert && !looked_up {
        return Ok(BodyPlan::Stream);
    }
    if let Some(query) = req.uri.query().map(str::as_bytes) {
        // The amount is only read from the body (or, for a call metered from the vendor's
        // object, from that object): a vendor may read fields from the query string too
        // (or merge them over the body's), so a metered call's query may carry nothing but
        // `expand`: not the amount, and not a field that adds to it (a subscription's
        // `add_invoice_items`, a capture's `amount_to_capture`, …).
        if rule.is_some() && meter::form_names_other_than(query, QUERY_FIELDS) {
            return Err(Denial::InvalidAmount);
        }
        if meter::form_names_any_of(query, refused) {
            return Err(Denial::UnmeteredField);
        }
    }
    Ok(BodyPlan::Read {
        metered: metered.is_some(),
        convert,
        screened,
    })
}

/// A body read for a call whose endpoint has refused fields (`BodyPlan::Read::screened`),
/// as it is sent (`form`: converted from JSON): refused when it names one of `refused`,
/// or when it is JSON the proxy did not convert (its fields are not read here).
pub fn screen(body: &[u8], form: bool, refused: &[String]) -> Result<(), Denial> {
    if refused.is_empty() {
        return Ok(());
    }
    if (!form && meter::looks_like_json(body)) || meter::form_names_any_of(body, refused) {
        return Err(Denial::UnmeteredField);
    }
    Ok(())
}

/// What the query string of a metered call may carry: which related objects the answer
/// expands, nothing that changes what the call costs.
const QUERY_FIELDS: &[&str] = &["expand"];

/// The body read whole, made into what is metered and sent: `(bytes, converted to a
/// form)`. A converted form is held to `body_limit` too: what reaches the vendor is never
/// larger than the limit, however the JSON's nesting multiplies its names.
pub fn prepare(
    body: Bytes,
    metered: bool,
    convert: bool,
    body_limit: usize,
) -> Result<(Bytes, bool), Denial> {
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
        return Ok((Bytes::from(meter::json_to_form(&value, body_limit)?), true));
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
        plan(
            r,
            v,
            &path,
            rule.as_deref(),
            v.refused_fields(&r.method, &path),
            1 << 20,
        )
    }

    const LIMIT: usize = 1 << 20;
    const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
    const JSON: (&str, &str) = ("content-type", "application/json");

    #[test]
    fn a_metered_create_is_read_and_a_json_one_converted() {
        let r = req("POST", "/v1/charges", &[FORM]);
        let read = BodyPlan::Read {
            metered: true,
            convert: false,
            screened: false,
        };
        assert_eq!(plan_for(&r, "stripe"), Ok(read));
        let r = req("POST", "/v1/charges", &[JSON]);
        let converted = BodyPlan::Read {
            metered: true,
            convert: true,
            screened: false,
        };
        assert_eq!(plan_for(&r, "stripe"), Ok(converted));
        // A create whose body is screened too (overcapture is refused on it).
        let r = req("POST", "/v1/payment_intents", &[FORM]);
        let screened = BodyPlan::Read {
            metered: true,
            convert: false,
            screened: true,
        };
        assert_eq!(plan_for(&r, "stripe"), Ok(screened));
    }

    #[test]
    fn a_call_charged_from_its_answer_is_read_whole_before_its_lookup() {
        let whole = BodyPlan::Read {
            metered: false,
            convert: false,
            screened: false,
        };
        for uri in [
            "/v1/payment_intents/pi_1/capture",
            "/v1/invoices/in_1/pay",
            "/v1/invoices/in_1/finalize",
        ] {
            let r = req("POST", uri, &[FORM]);
            assert_eq!(plan_for(&r, "stripe"), Ok(whole), "{uri}");
        }
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
        // A query string that only expands the answer is fine; any other field is not:
        // the vendor may read it as part of the call.
        let r = req("POST", "/v1/payment_intents?expand[]=customer", &[FORM]);
        assert!(plan_for(&r, "stripe").is_ok());
        let r = req(
            "POST",
            "/v1/payment_intents/pi_1/confirm?expand[]=latest_charge",
            &[FORM],
        );
        assert!(plan_for(&r, "stripe").is_ok());
        for uri in [
            "/v1/payment_intents?currency=eur",
            "/v1/payment_intents?expand[]=customer&amount]=1",
            "/v1/payment_intents?%61mount=1",
            "/v1/subscriptions?add_invoice_items[0][price]=price_big",
            "/v1/subscriptions?backdate_start_date=1",
            "/v1/subscriptions?currency=eur",
            "/v1/subscriptions?default_tax_rates[0]=txr_1",
            "/v1/subscriptions?plan=price_big&quantity=1000",
            "/v1/subscriptions?items[0][price]=price_big",
            // Metered from the vendor's object: the same rule.
            "/v1/payment_intents/pi_1/capture?amount_to_capture=5",
            "/v1/payment_intents/pi_1/confirm?capture_method=manual",
        ] {
            let r = req("POST", uri, &[FORM]);
            assert_eq!(plan_for(&r, "stripe"), Err(Denial::InvalidAmount), "{uri}");
        }
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
        let (form, converted) = prepare(json, true, true, LIMIT).unwrap();
        assert!(converted);
        assert_eq!(&form[..], b"amount=100&currency=usd&metadata%5Ba%5D=b");
        let bad = Bytes::from_static(b"{not json");
        assert_eq!(
            prepare(bad.clone(), true, true, LIMIT),
            Err(Denial::InvalidAmount)
        );
        assert_eq!(prepare(bad, false, true, LIMIT), Err(Denial::InvalidBody));
        let posing = Bytes::from_static(br#"{"amount":1}"#);
        assert_eq!(
            prepare(posing, true, false, LIMIT),
            Err(Denial::InvalidAmount)
        );
        let form = Bytes::from_static(b"amount=1&currency=usd");
        assert_eq!(prepare(form.clone(), true, false, LIMIT), Ok((form, false)));
    }

    #[test]
    fn a_json_body_whose_form_outgrows_the_limit_is_refused_as_too_large() {
        // 40 KB of JSON: every one of its 20,000 items repeats its 50 parents' names in
        // the form (`a[0][0]…[0][i]=1`), ~7 MB.
        let depth = 50;
        let items = vec!["1"; 20_000].join(",");
        let json = format!(
            "{{\"a\":{}{}{}}}",
            "[".repeat(depth),
            items,
            "]".repeat(depth)
        );
        assert!(json.len() < 50_000);
        let body = Bytes::from(json);
        assert_eq!(
            prepare(body.clone(), false, true, LIMIT),
            Err(Denial::BodyTooLarge)
        );
        assert_eq!(prepare(body, true, true, LIMIT), Err(Denial::BodyTooLarge));
        // Within the limit it converts as before.
        let small = Bytes::from_static(br#"{"a":[[1,2]]}"#);
        let (form, _) = prepare(small, false, true, LIMIT).unwrap();
        assert_eq!(&form[..], b"a%5B0%5D%5B0%5D=1&a%5B0%5D%5B1%5D=2");
    }

    #[test]
    fn fields_that_move_unmetered_money_are_refused_in_the_body_and_the_query() {
        let screened = BodyPlan::Read {
            metered: false,
            convert: false,
            screened: true,
        };
        // A customer update is free, but its body is read: it may not set a balance.
        let r = req("POST", "/v1/customers/cus_1", &[FORM]);
        assert_eq!(plan_for(&r, "stripe"), Ok(screened));
        for uri in [
            "/v1/customers?balance=100",
            "/v1/customers/cus_1?b%61lance=1",
        ] {
            let r = req("POST", uri, &[FORM]);
            assert_eq!(plan_for(&r, "stripe"), Err(Denial::UnmeteredField), "{uri}");
        }
        let r = req(
            "POST",
            "/v1/customers",
            &[("content-type", "multipart/form-data; boundary=x")],
        );
        assert_eq!(plan_for(&r, "stripe"), Err(Denial::UnmeteredField));
        // Other free calls still stream.
        let r = req("POST", "/v1/customers/cus_1/sources", &[FORM]);
        assert_eq!(plan_for(&r, "stripe"), Ok(BodyPlan::Stream));

        let overcapture = ["payment_method_options[card][request_overcapture]".to_string()];
        for body in [
            &b"payment_method_options[card][request_overcapture]=if_available"[..],
            b"payment_method_options[card][request_overcapture]]=if_available",
            b"[payment_method_options][card][request_overcapture]=if_available",
            b"payment_method_options%5Bcard%5D%5Brequest_overcapture%5D=if_available",
            b"payment_method_options[card][request_overcapture][x]=1",
        ] {
            assert_eq!(
                screen(body, false, &overcapture),
                Err(Denial::UnmeteredField),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for body in [
            &b"payment_method_options[card][request_three_d_secure]=any"[..],
            b"payment_method_options[card]=x",
            b"amount=100",
        ] {
            assert_eq!(screen(body, false, &overcapture), Ok(()));
        }
        let balance = ["balance".to_string()];
        assert_eq!(screen(b"email=a%40b.c&name=A", false, &balance), Ok(()));
        for body in [
            &b"email=a&balance=1000000"[..],
            b"balance]=1",
            b"+balance=1",
            b"b%61lance=1",
            b"name=x;balance=1",
        ] {
            assert_eq!(
                screen(body, false, &balance),
                Err(Denial::UnmeteredField),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // JSON is screened as the form it was converted to; JSON not converted is refused.
        let (form, converted) =
            prepare(Bytes::from_static(br#"{"balance":5}"#), false, true, LIMIT).unwrap();
        assert_eq!(
            screen(&form, converted, &balance),
            Err(Denial::UnmeteredField)
        );
        assert_eq!(
            screen(br#"{"name":"x"}"#, false, &balance),
            Err(Denial::UnmeteredField)
        );
        // No refused fields: nothing to screen.
        assert_eq!(screen(b"balance=1", false, &[]), Ok(()));
    }

    #[test]
    fn an_invoice_item_costs_its_amount_and_nothing_can_multiply_it() {
        let r = req("POST", "/v1/invoiceitems", &[FORM]);
        let read = BodyPlan::Read {
            metered: true,
            convert: false,
            screened: true,
        };
        assert_eq!(plan_for(&r, "stripe"), Ok(read));
        let c = Config::from_yaml("", None, &Overrides::default()).unwrap();
        let refused = c.vendors["stripe"].refused_fields(&http::Method::POST, "/v1/invoiceitems");
        assert_eq!(
            screen(b"customer=cus_1&amount=100&currency=usd", false, refused),
            Ok(())
        );
        for body in [
            "customer=cus_1&amount=1&currency=usd&quantity=100000",
            "customer=cus_1&amount=1&currency=usd&price=price_1",
            "customer=cus_1&amount=1&currency=usd&price_data[unit_amount]=100000",
            "customer=cus_1&amount=1&currency=usd&unit_amount_decimal=100000",
            "customer=cus_1&amount=1&currency=usd&tax_rates[0]=txr_1",
        ] {
            assert_eq!(
                screen(body.as_bytes(), false, refused),
                Err(Denial::UnmeteredField),
                "{body}"
            );
        }
    }
}
