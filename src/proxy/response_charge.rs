//! Stage 10, settle (the answer's charge): the 2xx answer of a response-metered or object-tracking
//! call is captured (bounded) as it streams to the client, then metered once, at its end
//! or when it was cut short. A response-metered call is charged the answer's amount net
//! of what the key already paid for the object; an answer that cannot be read (not
//! JSON, no amount, too large, truncated) charges the key's whole daily cap, fail
//! closed. The object the key was charged for goes into the charge memory.

use super::charges::{created_object_id, Owner};
use super::ctx::{Ctx, Metering};
use super::meter;
use super::service::KeybrakeProxy;
use crate::config::Currency;
use crate::money::Micros;
use crate::token::now_secs;
use crate::Map;
use std::sync::Arc;

/// Most response bytes kept to learn a created object's id.
pub const MAX_CAPTURE: usize = 256 * 1024;
/// Most response bytes kept to meter a response-metered call (an invoice with many lines
/// or an expanded object can be large). Past it the call is charged as unmeterable.
pub const MAX_METERED_CAPTURE: usize = 8 * 1024 * 1024;

/// What a captured answer comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A response-metered call's charge (net of its credit).
    Charge(Micros),
    /// The answer of a response-metered call cannot be read: why.
    Unmeterable(&'static str),
    /// Nothing to charge from it.
    Nothing,
}

/// An object to remember as charged to the key: id, total charged, currency.
pub type Object = (String, Micros, Option<Arc<str>>);

/// Meters a captured answer (`Err(())`: larger than kept) of a call metered as
/// `metering` that reserved `spend`.
pub fn meter_answer(
    metering: &Metering,
    captured: Result<&[u8], ()>,
    spend: Micros,
    currencies: &Map<String, Currency>,
) -> (Answer, Option<Object>) {
    match metering {
        Metering::Response { rule, credit, .. } => {
            let Ok(bytes) = captured else {
                return (Answer::Unmeterable("larger than the metering limit"), None);
            };
            let Ok(body) = serde_json::from_slice::<serde_json::Value>(bytes) else {
                return (Answer::Unmeterable("not JSON"), None);
            };
            let Some(cost) = meter::response_cost(rule, &body, currencies) else {
                return (
                    Answer::Unmeterable("without a known amount and currency"),
                    None,
                );
            };
            let charge = cost.saturating_sub(*credit).max(Micros::ZERO);
            let object = body
                .get("id")
                .and_then(|v| v.as_str())
                .filter(|_| rule.skip_if_created_by_same_key)
                .map(|id| {
                    let currency = body
                        .get("currency")
                        .and_then(|v| v.as_str())
                        .map(|c| Arc::from(c.to_ascii_lowercase()));
                    (id.to_string(), cost.max(*credit), currency)
                });
            (Answer::Charge(charge), object)
        }
        Metering::Tracked { credit, currency } => {
            let object = captured.ok().and_then(created_object_id).map(|id| {
                let charged = credit.checked_add(spend).unwrap_or(spend);
                (id, charged, currency.clone())
            });
            (Answer::Nothing, object)
        }
        Metering::Fixed | Metering::Llm(_) => (Answer::Nothing, None),
    }
}

impl KeybrakeProxy {
    /// Keeps a chunk of the answer's body, if it is captured.
    pub(super) fn capture(ctx: &mut Ctx, chunk: &[u8]) {
        let limit = if ctx.metering.is_response() {
            MAX_METERED_CAPTURE
        } else {
            MAX_CAPTURE
        };
        ctx.capture.push(chunk, limit);
    }

    /// Meters the captured answer, once: a response-metered call's charge, and the
    /// object the key was charged for.
    pub(super) fn finish_capture(&self, ctx: &mut Ctx) {
        let captured = match ctx.capture.finish() {
            None => return,
            Some(c) => c,
        };
        let bytes = captured.as_deref().map_err(|_| ());
        let (answer, object) = meter_answer(&ctx.metering, bytes, ctx.spend, &self.currencies);
        let Some(key) = ctx.key.clone() else {
            return;
        };
        let charge = match answer {
            Answer::Nothing => None,
            Answer::Charge(charge) => Some(charge),
            Answer::Unmeterable(why) => {
                // Fail closed: the vendor acted on a call whose cost cannot be read, so
                // the key is charged its whole daily cap and can spend nothing more today.
                log::warn!(
                    "{} response for key {} is {why}: charging the key's daily cap",
                    ctx.vendor_name(),
                    key.claims.jti
                );
                Some(Micros(key.claims.cap.max(0)))
            }
        };
        if let (Some(c), Metering::Response { charge, .. }) = (charge, &mut ctx.metering) {
            *charge = Some(c);
        }
        if let Some((id, charged, currency)) = object {
            let owner = Owner {
                jti: &key.jti,
                ten: &key.ten,
                exp: key.claims.exp,
            };
            self.charges
                .remember(id, owner, charged, currency, now_secs());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn response_metering(credit: i64) -> (Metering, Map<String, Currency>) {
        let c = Config::from_yaml("", None, &Overrides::default()).unwrap();
        let rule = c.vendors["stripe"]
            .meter_rule(&http::Method::POST, "/v1/payment_intents/pi_1/confirm")
            .unwrap()
            .clone();
        let metering = Metering::Response {
            rule,
            credit: Micros(credit),
            charge: None,
        };
        (metering, c.currencies.clone())
    }

    #[test]
    fn a_confirm_is_charged_its_amount_net_of_what_the_key_paid_for_the_intent() {
        let (m, currencies) = response_metering(1_000_000);
        let answer = br#"{"id":"pi_1","object":"payment_intent","amount":250,"amount_received":250,"currency":"USD"}"#;
        let (charge, object) = meter_answer(&m, Ok(answer), Micros(2_500_000), &currencies);
        assert_eq!(charge, Answer::Charge(Micros(1_500_000)));
        let usd = Some(Arc::from("usd"));
        assert_eq!(object, Some(("pi_1".to_string(), Micros(2_500_000), usd)));
    }

    #[test]
    fn an_answer_that_cannot_be_read_is_unmeterable() {
        let (m, currencies) = response_metering(0);
        let cases: [(Result<&[u8], ()>, &str); 3] = [
            (Err(()), "larger than the metering limit"),
            (Ok(b"<html>"), "not JSON"),
            (
                Ok(br#"{"id":"pi_1"}"#),
                "without a known amount and currency",
            ),
        ];
        for (captured, why) in cases {
            let (answer, object) = meter_answer(&m, captured, Micros(1), &currencies);
            assert_eq!((answer, object), (Answer::Unmeterable(why), None));
        }
    }

    #[test]
    fn a_tracked_create_remembers_its_object_with_the_credit_and_spend() {
        let currencies = Map::default();
        let m = Metering::Tracked {
            credit: Micros(300),
            currency: Some(Arc::from("eur")),
        };
        let created = b"{\n  \"id\": \"pi_9\",\n  \"amount\": 100}";
        let (answer, object) = meter_answer(&m, Ok(created), Micros(700), &currencies);
        assert_eq!(answer, Answer::Nothing);
        let eur = Some(Arc::from("eur"));
        assert_eq!(object, Some(("pi_9".to_string(), Micros(1_000), eur)));
        // A truncated answer: no object learnt, nothing charged from it.
        let (answer, object) = meter_answer(&m, Err(()), Micros(700), &currencies);
        assert_eq!((answer, object), (Answer::Nothing, None));
        let (answer, object) = meter_answer(&Metering::Fixed, Ok(created), Micros(1), &currencies);
        assert_eq!((answer, object), (Answer::Nothing, None));
    }
}
