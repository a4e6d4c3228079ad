//! Stage 6, price: what a call is reserved before it is forwarded. The catalog
//! classifies it (metered, free, or refused as unmetered); a request-metered call costs
//! the amount in its body (less what the key already paid for the object, from the
//! charge memory); a subscription the sum of its items' prices and a response-metered
//! call the largest amount it can charge, both read from the vendor first with the real
//! credential (`Lookups`). Also says how the answer is then metered (`Metering`).

use super::charges::{ChargeMemory, Known};
use super::ctx::Metering;
use super::deny::Denial;
use super::meter::{self, ParsedBody};
use super::upstream::Upstreams;
use super::upstream_call::{self, LookupError};
use crate::config::{Class, Currency, MeterRule, MeterSource, UnmeteredPolicy, Vendor};
use crate::money::Micros;
use crate::secret::Secret;
use crate::Map;
use std::sync::Arc;

/// The catalog's rule for the call, `None` for a free one. Every key has a cap: a call
/// that could move money unseen is refused, unless the vendor allows them.
pub fn classify(
    vendor: &Vendor,
    method: &http::Method,
    path: &str,
) -> Result<Option<Arc<MeterRule>>, Denial> {
    match vendor.classify(method, path) {
        Class::Metered(rule) => Ok(Some(rule.clone())),
        Class::TokenMetered | Class::Free => Ok(None),
        Class::Unmetered if vendor.unmetered == UnmeteredPolicy::Refuse => {
            Err(Denial::EndpointUnmetered)
        }
        Class::Unmetered => Ok(None),
    }
}

/// A request-metered call's price, from its body (`form`, what the vendor receives):
/// the amount less `known.charged` (an amount that is a new total, like
/// increment_authorization, costs only its increase over what the key was charged for
/// the object), and how its answer is then tracked.
pub fn request_price(
    rule: &MeterRule,
    form: &[u8],
    known: Option<Known>,
    currencies: &Map<String, Currency>,
) -> Result<(Micros, Metering), Denial> {
    let fields = rule.fields();
    let parsed = ParsedBody::from_form(form, &fields);
    let object_currency = known.as_ref().and_then(|k| k.currency.as_deref());
    let (amount, currency) = meter::request_cost(rule, &parsed, object_currency, currencies)?;
    let credit = known.map_or(Micros::ZERO, |k| k.charged);
    Ok((
        amount.saturating_sub(credit).max(Micros::ZERO),
        Metering::Tracked {
            credit,
            currency: currency.map(Arc::from),
        },
    ))
}

/// What the pricing of one call needs.
pub struct Pricing<'a> {
    pub vendor: &'a Vendor,
    /// The vendor-relative canonical path.
    pub path: &'a str,
    /// The key's id: the charge memory is per key.
    pub jti: &'a str,
    pub charges: &'a ChargeMemory,
    pub currencies: &'a Map<String, Currency>,
    pub lookups: Lookups<'a>,
}

impl Pricing<'_> {
    /// The call's cost (the vendor's per-request cost plus its metered amount) and how
    /// its answer is metered. `form` is the body as sent, when it was read.
    pub async fn price(
        &self,
        rule: Option<&Arc<MeterRule>>,
        form: Option<&[u8]>,
    ) -> Result<(Micros, Metering), Denial> {
        let (amount, metering) = match rule {
            None => (Micros::ZERO, Metering::Fixed),
            Some(rule) => match rule.source {
                MeterSource::Response => Box::pin(self.response_bound(rule)).await?,
                MeterSource::Items => {
                    let items = meter::subscription_items(form.unwrap_or_default())?;
                    let total = Box::pin(self.lookups.price_items(&items, rule)).await?;
                    (total, Metering::Fixed)
                }
                _ => {
                    let known = self.known(rule);
                    request_price(rule, form.unwrap_or_default(), known, self.currencies)?
                }
            },
        };
        let cost = self
            .vendor
            .cost_per_request
            .checked_add(amount)
            .ok_or(Denial::InvalidAmount)?;
        Ok((cost, metering))
    }

    /// What this key was already charged for the object, if the rule keeps track.
    fn known(&self, rule: &MeterRule) -> Option<Known> {
        rule.skip_if_created_by_same_key
            .then(|| self.charges.charged_for(rule, self.path, self.jti))
            .flatten()
    }

    /// A response-metered call: what it can charge, read from the vendor now, less what
    /// the key already paid for the object (its create, or an earlier confirm). It is
    /// reserved: concurrent calls never take the key past its cap.
    async fn response_bound(&self, rule: &Arc<MeterRule>) -> Result<(Micros, Metering), Denial> {
        let credit = self.known(rule).map_or(Micros::ZERO, |k| k.charged);
        let can_charge = self.lookups.largest_amount(rule, self.path).await?;
        let metering = Metering::Response {
            rule: rule.clone(),
            credit,
            charge: None,
        };
        Ok((
            can_charge.saturating_sub(credit).max(Micros::ZERO),
            metering,
        ))
    }
}

/// Reads objects from the vendor with the real credential, before forwarding.
pub struct Lookups<'a> {
    pub connector: &'a pingora::connectors::http::Connector,
    pub upstreams: &'a Upstreams,
    pub vendor: &'a Vendor,
    pub secret: &'a Secret,
    pub currencies: &'a Map<String, Currency>,
    /// The client's request headers (some are passed on, like `Stripe-Account`).
    pub headers: &'a http::HeaderMap,
}

impl Lookups<'_> {
    /// The largest of the rule's lookup amounts of the object the call acts on.
    async fn largest_amount(&self, rule: &MeterRule, path: &str) -> Result<Micros, Denial> {
        let lookup = rule.reserve.as_ref().ok_or(Denial::AmountUnknown)?;
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let path = lookup
            .path
            .fill(|i| segments.get(i).copied())
            .ok_or(Denial::AmountUnknown)?;
        let object = self.get_json(&path).await?;
        meter::largest_amount(&object, &lookup.amount_fields, self.currencies)
            .ok_or(Denial::AmountUnknown)
    }

    /// Σ unit price × quantity of a subscription's items, each distinct price read from
    /// the vendor once, all at the same time: the call waits for one round trip, not one
    /// per item (up to 20).
    async fn price_items(&self, items: &[meter::Item], rule: &MeterRule) -> Result<Micros, Denial> {
        let lookup = rule.reserve.as_ref().ok_or(Denial::AmountUnknown)?;
        let mut prices: Vec<&str> = items.iter().map(|i| i.price.as_str()).collect();
        prices.sort_unstable();
        prices.dedup();
        let units = futures_util::future::try_join_all(prices.iter().map(|&id| async move {
            let path = lookup
                .path
                .fill(|_| Some(id))
                .ok_or(Denial::AmountUnknown)?;
            let price = self.get_json(&path).await?;
            meter::largest_amount(&price, &lookup.amount_fields, self.currencies)
                .map(|unit| (id, unit))
                .ok_or(Denial::AmountUnknown)
        }))
        .await?;
        let mut total = Micros::ZERO;
        for item in items {
            let unit = units
                .iter()
                .find_map(|&(id, unit)| (id == item.price).then_some(unit))
                .ok_or(Denial::AmountUnknown)?;
            total = unit
                .checked_mul(item.quantity)
                .and_then(|m| total.checked_add(m))
                .ok_or(Denial::InvalidAmount)?;
        }
        Ok(total)
    }

    async fn get_json(&self, path: &str) -> Result<serde_json::Value, Denial> {
        let peer = self
            .upstreams
            .peer(self.vendor)
            .ok_or(Denial::UpstreamUnavailable)?;
        upstream_call::get_json(
            self.connector,
            &peer,
            self.vendor,
            self.secret,
            path,
            self.headers,
        )
        .await
        .map_err(|e| match e {
            LookupError::Unreachable { timeout: true } => Denial::UpstreamTimeout,
            LookupError::Unreachable { timeout: false } => Denial::UpstreamUnavailable,
            LookupError::NoObject => Denial::AmountUnknown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn stripe() -> (Config, Arc<Vendor>) {
        let c = Config::from_yaml("", None, &Overrides::default()).unwrap();
        let v = Arc::new(c.vendors["stripe"].clone());
        (c, v)
    }

    #[test]
    fn the_catalog_classifies_metered_free_and_unmetered_calls() {
        let (_, v) = stripe();
        let post = http::Method::POST;
        assert!(classify(&v, &post, "/v1/payment_intents")
            .unwrap()
            .is_some());
        assert!(classify(&v, &http::Method::GET, "/v1/payment_intents")
            .unwrap()
            .is_none());
        // A mutating endpoint the catalog says nothing about could move money unseen.
        assert_eq!(
            classify(&v, &post, "/v1/something_new").unwrap_err(),
            Denial::EndpointUnmetered
        );
    }

    #[test]
    fn a_request_metered_amount_is_converted_and_net_of_the_objects_credit() {
        let (c, v) = stripe();
        let post = http::Method::POST;
        let create = classify(&v, &post, "/v1/payment_intents").unwrap().unwrap();
        let (cost, m) =
            request_price(&create, b"amount=1234&currency=usd", None, &c.currencies).unwrap();
        assert_eq!(cost, Micros(12_340_000));
        assert!(
            matches!(m, Metering::Tracked { credit: Micros::ZERO, currency: Some(ref c) } if &**c == "usd")
        );
        // increment_authorization names a new total: only its increase over the $10 the
        // key paid for the intent costs, in the intent's currency when the body has none.
        let path = "/v1/payment_intents/pi_1/increment_authorization";
        let inc = classify(&v, &post, path).unwrap().unwrap();
        let known = Known {
            charged: Micros(10_000_000),
            currency: Some(Arc::from("usd")),
        };
        let (cost, _) =
            request_price(&inc, b"amount=1500", Some(known.clone()), &c.currencies).unwrap();
        assert_eq!(cost, Micros(5_000_000));
        // Less than already paid costs nothing, never a negative amount.
        let (cost, _) = request_price(&inc, b"amount=500", Some(known), &c.currencies).unwrap();
        assert_eq!(cost, Micros::ZERO);
        assert_eq!(
            request_price(&create, b"currency=usd", None, &c.currencies).err(),
            Some(Denial::AmountRequired)
        );
    }
}
