//! The amounts of stage 6 (price) and of the answer's charge, read from bodies. Reads `amount` and `currency` from a metered request's
//! body (Stripe form encoding, or JSON), converts minor units to micro-USD with the
//! currency table, and converts JSON bodies to Stripe's form encoding.
//!
//! Anything ambiguous fails closed: a repeated `amount`, a fractional or negative amount,
//! an unknown currency.

use super::deny::Denial;
use crate::config::{Currency, MeterRule};
use crate::money::Micros;
use crate::Map;
use serde_json::Value;

/// Largest amount in minor units we meter (Stripe's own limit is far below).
const MAX_MINOR_UNITS: i64 = 1_000_000_000_000;

/// The body as the vendor will receive it, and its top-level fields.
pub struct ParsedBody<'k> {
    /// Top-level scalar fields (`amount`, `currency`, …) as text. `None` marks a field
    /// that appeared more than once. A rule reads two fields: a list, not a map.
    fields: Vec<(&'k str, Option<String>)>,
}

/// The kept field `name` stands for, exactly or as an alias: compared by key path
/// (whitespace around segments and empty bracket segments dropped, letters in either
/// case), a kept field covering every name below it (`" amount"`, `"[amount]"`,
/// `"amount[x]"`, `"amount "`, `"AMOUNT"` are `amount`; `"[a][b]]"` and `"a[b][c]"` are
/// `a[b]`); a name with a NUL or a byte-order mark is also read cut at the NUL and with
/// them dropped (`"amount\0x"`, `"am\0ount"`, `"\u{feff}amount"`). A lenient parser (one
/// that trims names, folds their case, stops at or drops a NUL) may read any of them as
/// the field.
fn kept_field<'k>(name: &str, keep: &[&'k str]) -> Option<&'k str> {
    if let Some(exact) = keep.iter().find(|k| !k.is_empty() && **k == name) {
        return Some(exact);
    }
    if name.contains(['\0', '\u{feff}']) {
        let cut = name
            .split('\0')
            .next()
            .unwrap_or("")
            .replace('\u{feff}', "");
        let dropped = name.replace(['\0', '\u{feff}'], "");
        return by_key_path(&cut, keep).or_else(|| by_key_path(&dropped, keep));
    }
    by_key_path(name, keep)
}

/// `kept_field` by key path, as a bracket parser reads names: `[a][b]]` is `a[b]`, and a
/// kept `a[b]` also covers `a[b][c]`.
fn by_key_path<'k>(name: &str, keep: &[&'k str]) -> Option<&'k str> {
    fn path(n: &str) -> impl Iterator<Item = &str> {
        n.split(['[', ']']).map(str::trim).filter(|s| !s.is_empty())
    }
    keep.iter()
        .find(|k| {
            let mut name = path(name);
            let mut any = false;
            path(k).all(|segment| {
                any = true;
                name.next().is_some_and(|n| n.eq_ignore_ascii_case(segment))
            }) && any
        })
        .copied()
}

/// Whether `form` names a field other than the ones in `allowed` (by base name:
/// `expand[]` is `expand`; read as `kept_field` reads names, so no alias slips by).
pub fn form_names_other_than(form: &[u8], allowed: &[&str]) -> bool {
    form.split(|&b| b == b'&' || b == b';')
        .filter(|p| !p.is_empty())
        .any(|pair| {
            let name = pair.split(|&b| b == b'=').next().unwrap_or(b"");
            kept_field(&form_decode(name), allowed).is_none()
        })
}

/// Whether `form` names one of `fields` (by base name, aliases included, as
/// `kept_field` reads names).
pub fn form_names_any_of(form: &[u8], fields: &[String]) -> bool {
    if fields.is_empty() {
        return false;
    }
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    ParsedBody::from_form(form, &fields).has_fields()
}

/// One `application/x-www-form-urlencoded` name or value: `+` is a space, `%XX` a byte,
/// invalid UTF-8 replaced (as the `url` crate does). Borrowed when nothing is encoded.
fn form_decode(raw: &[u8]) -> std::borrow::Cow<'_, str> {
    if !raw.iter().any(|&b| b == b'+' || b == b'%') {
        // Valid UTF-8 (the usual case) is checked by the faster validator.
        return match std::str::from_utf8(raw) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(raw),
        };
    }
    let plus_as_space: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    let decoded: Vec<u8> = percent_encoding::percent_decode(&plus_as_space).collect();
    std::borrow::Cow::Owned(String::from_utf8_lossy(&decoded).into_owned())
}

/// A body that is a JSON object or array (first byte past whitespace, and past a UTF-8
/// byte-order mark, which a lenient JSON reader skips): refused as a form body on a
/// metered endpoint, where a lenient vendor could parse it as JSON.
pub fn looks_like_json(body: &[u8]) -> bool {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    matches!(
        body.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

/// A `Content-Type` without its parameters.
fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// Whether a `Content-Type`'s `charset` (if any) is one of `read_as`: the ones whose
/// ASCII bytes read as the same characters as here. A body declared in another (`utf-16`)
/// would be read by the vendor as other characters than the ones metered.
fn charset_is_one_of(content_type: &str, read_as: &[&str]) -> bool {
    content_type.split(';').skip(1).all(|param| {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        !name.trim().eq_ignore_ascii_case("charset")
            || read_as
                .iter()
                .any(|ok| value.trim().trim_matches('"').eq_ignore_ascii_case(ok))
    })
}

/// Charsets in which a body is read here as the vendor reads it: UTF-8 and ASCII, and
/// for a form (ASCII on the wire, its other bytes percent-encoded) the single-byte
/// charsets some clients declare by default (Apache HttpClient: ISO-8859-1).
const UTF8: [&str; 3] = ["utf-8", "utf8", "us-ascii"];
const FORM_CHARSETS: [&str; 6] = [
    "utf-8",
    "utf8",
    "us-ascii",
    "iso-8859-1",
    "latin1",
    "windows-1252",
];

/// `application/x-www-form-urlencoded` in an ASCII-compatible charset, parameters and
/// case aside.
pub fn is_form(content_type: &str) -> bool {
    media_type(content_type).eq_ignore_ascii_case("application/x-www-form-urlencoded")
        && charset_is_one_of(content_type, &FORM_CHARSETS)
}

/// JSON (`application/json`, `…+json`) in UTF-8, parameters and case aside.
pub fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let media = media_type(ct).as_bytes();
        (media.eq_ignore_ascii_case(b"application/json")
            || (media.len() >= 5 && media[media.len() - 5..].eq_ignore_ascii_case(b"+json")))
            && charset_is_one_of(ct, &UTF8)
    })
}

impl<'k> ParsedBody<'k> {
    /// The fields named in `keep` (the ones a meter rule reads), each decoded once; other
    /// fields are skipped without being decoded further.
    ///
    /// Fail closed on names a server might read as the same field: Stripe's form parser
    /// (Rack) ignores spaces after a separator, older versions also split on `;`, and
    /// `amount]` or `[amount]` both mean `amount` there. Such an alias of a kept field
    /// makes the field ambiguous (refused), exactly like a repeated field.
    pub fn from_form(body: &[u8], keep: &[&'k str]) -> ParsedBody<'k> {
        let mut parsed = ParsedBody { fields: Vec::new() };
        for pair in body
            .split(|&b| b == b'&' || b == b';')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            let name = form_decode(name);
            let Some(field) = kept_field(&name, keep) else {
                continue;
            };
            let value = (name == field).then(|| form_decode(value).into_owned());
            parsed.add(field, value);
        }
        parsed
    }

    /// Whether any kept field (or an alias of one) appeared.
    pub fn has_fields(&self) -> bool {
        !self.fields.is_empty()
    }

    /// Records one occurrence of `field`; a second one, or a `None` value, leaves it
    /// ambiguous.
    fn add(&mut self, field: &'k str, value: Option<String>) {
        match self.fields.iter_mut().find(|(name, _)| *name == field) {
            Some((_, seen)) => *seen = None,
            None => self.fields.push((field, value)),
        }
    }

    fn field(&self, name: &str) -> Result<Option<&str>, Denial> {
        match self.fields.iter().find(|(field, _)| *field == name) {
            None => Ok(None),
            Some((_, None)) => Err(Denial::InvalidAmount),
            Some((_, Some(v))) => Ok(Some(v.as_str())),
        }
    }
}

/// The micro-USD cost of a request-metered call, and the currency it was counted in: the
/// body's, else the object's (`object_currency`, known when this key was charged for the
/// object before), else the rule's default (`None`: not known, counted as the costliest).
pub fn request_cost<'c>(
    rule: &MeterRule,
    body: &ParsedBody<'_>,
    object_currency: Option<&str>,
    currencies: &'c Map<String, Currency>,
) -> Result<(Micros, Option<&'c str>), Denial> {
    let amount = body
        .field(&rule.amount_field)?
        .ok_or(Denial::AmountRequired)?;
    let amount = parse_minor_units(amount).ok_or(Denial::InvalidAmount)?;
    let named = match body.field(&rule.currency_field)? {
        // Only ASCII blanks around it go: a code with any other character (`usd` and a
        // no-break space) is not in the table, and refused.
        Some(c) => Some(
            c.trim_matches(|ch: char| ch.is_ascii_whitespace())
                .to_ascii_lowercase(),
        ),
        None => object_currency.map(str::to_string),
    };
    let (code, currency) = match named.as_deref().or(rule.default_currency.as_deref()) {
        Some(HIGHEST) if named.is_none() => costliest(currencies).map(|c| (None, c)),
        Some(c) => currencies
            .get_key_value(c)
            .map(|(code, c)| (Some(code.as_str()), c)),
        None => None,
    }
    .ok_or(Denial::UnsupportedCurrency)?;
    Ok((to_usd(amount, currency).ok_or(Denial::InvalidAmount)?, code))
}

/// `default_currency: highest`: the table's currency whose minor unit is worth the most,
/// for an amount whose currency is not known (fail closed: never under-counted).
pub const HIGHEST: &str = "highest";

fn costliest(currencies: &Map<String, Currency>) -> Option<&Currency> {
    // usd_per_unit / 10^decimals, compared without division.
    currencies.values().max_by(|a, b| {
        let a_value = a.usd_per_unit.0 as i128 * 10i128.pow(b.decimals);
        let b_value = b.usd_per_unit.0 as i128 * 10i128.pow(a.decimals);
        a_value.cmp(&b_value)
    })
}

/// The cost of a response-metered call: the largest of `amount_fields` in the 2xx body.
/// The largest, not the first: a confirmed PaymentIntent still `processing` (bank debits)
/// or awaiting 3-D Secure has `amount_received: 0`, yet its `amount` is on its way.
pub fn response_cost(
    rule: &MeterRule,
    body: &Value,
    currencies: &Map<String, Currency>,
) -> Option<Micros> {
    largest_amount(body, &rule.amount_fields, currencies)
}

/// The largest of an object's integer `fields` (minor units of its `currency`) in USD.
pub fn largest_amount(
    object: &Value,
    fields: &[String],
    currencies: &Map<String, Currency>,
) -> Option<Micros> {
    let amount = fields
        .iter()
        .filter_map(|f| object.get(f)?.as_i64())
        .max()?;
    let currency = object.get("currency")?.as_str()?.to_ascii_lowercase();
    to_usd(amount.max(0), currencies.get(&currency)?)
}

/// Stripe's limit on a subscription's items.
const MAX_ITEMS: usize = 20;

/// One item of a subscription: a price id and its quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub price: String,
    pub quantity: i64,
}

/// The items of a `POST /v1/subscriptions` form: `items[i][price]` and
/// `items[i][quantity]` (default 1). Fail closed on whatever could make the first
/// invoice larger than Σ price × quantity or hide an item: inline `price_data`, tax
/// rates, automatic tax, extra invoice items, a repeated field, an aliased name.
pub fn subscription_items(form: &[u8]) -> Result<Vec<Item>, Denial> {
    let mut prices: Vec<(usize, String)> = Vec::new();
    let mut quantities: Vec<(usize, i64)> = Vec::new();
    for pair in form
        .split(|&b| b == b'&' || b == b';')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        let name = form_decode(name);
        let base = kept_field(
            &name,
            &[
                "items",
                "add_invoice_items",
                "default_tax_rates",
                "automatic_tax",
                // Bills the price's `currency_options` amount in that currency, not the
                // one read here.
                "currency",
                // The first invoice covers every period since the backdated start.
                "backdate_start_date",
                // Bills several periods at once.
                "prebilling",
                // The single price of API versions before items (a client chooses its
                // version with `Stripe-Version`).
                "plan",
                "quantity",
                // A tax on top of the items (before 2020-08-27).
                "tax_percent",
            ],
        );
        match base {
            None => continue,
            Some("items") => {}
            Some(_) => return Err(Denial::InvalidAmount),
        }
        let Some((index, field)) = item_field(&name) else {
            return Err(Denial::InvalidAmount);
        };
        let value = form_decode(value);
        match field {
            "price" if !prices.iter().any(|(i, _)| *i == index) => {
                prices.push((index, value.into_owned()))
            }
            "quantity" if !quantities.iter().any(|(i, _)| *i == index) => quantities.push((
                index,
                parse_minor_units(&value).ok_or(Denial::InvalidAmount)?,
            )),
            "metadata" => {}
            _ => return Err(Denial::InvalidAmount),
        }
    }
    if prices.is_empty()
        || prices.len() > MAX_ITEMS
        || quantities
            .iter()
            .any(|(i, _)| !prices.iter().any(|(p, _)| p == i))
    {
        return Err(Denial::InvalidAmount);
    }
    Ok(prices
        .into_iter()
        .map(|(index, price)| Item {
            price,
            quantity: quantities
                .iter()
                .find(|(i, _)| *i == index)
                .map_or(1, |(_, q)| *q),
        })
        .collect())
}

/// `items[N][field]` (or `items[N][metadata][…]`, as `metadata`) → (N, field).
fn item_field(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("items[")?;
    let (index, rest) = rest.split_once("][")?;
    if index.is_empty() || index.len() > 2 || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let index: usize = index.parse().ok()?;
    if let Some(key) = rest.strip_prefix("metadata][") {
        return (key.ends_with(']') && !key[..key.len() - 1].contains(['[', ']']))
            .then_some((index, "metadata"));
    }
    let field = rest.strip_suffix(']')?;
    (!field.contains(['[', ']'])).then_some((index, field))
}

fn parse_minor_units(text: &str) -> Option<i64> {
    if text.is_empty() || text.len() > 15 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|n| *n <= MAX_MINOR_UNITS)
}

/// Minor units → micro-USD, rounded up (in the cap's favour).
pub fn to_usd(minor_units: i64, currency: &Currency) -> Option<Micros> {
    let numerator = minor_units as i128 * currency.usd_per_unit.0 as i128;
    let divisor = 10i128.pow(currency.decimals);
    let micros = (numerator + divisor - 1) / divisor;
    i64::try_from(micros).ok().map(Micros)
}

/// Stripe's form encoding of a JSON object: nested objects and arrays in bracket
/// notation (`automatic_payment_methods[enabled]=true`, `items[0][price]=…`), at most
/// `limit` bytes (413 `body_too_large` past it). The bracketed names repeat every parent
/// name, so a small JSON body can make a form many times its size: the form is held to
/// the body limit as it is written, never built whole first.
pub fn json_to_form(value: &Value, limit: usize) -> Result<String, Denial> {
    let object = value.as_object().ok_or(Denial::InvalidBody)?;
    let mut form = FormWriter {
        out: String::new(),
        name: String::new(),
        limit,
    };
    for (k, v) in object {
        form.name.clear();
        form.name.push_str(k);
        form.encode(v)?;
    }
    Ok(form.out)
}

/// The form being written, and the name of the field being encoded (one buffer, grown
/// and cut back as the encoder goes down and up the JSON).
struct FormWriter {
    out: String,
    name: String,
    limit: usize,
}

impl FormWriter {
    fn encode(&mut self, value: &Value) -> Result<(), Denial> {
        if self.name.len() > self.limit {
            return Err(Denial::BodyTooLarge);
        }
        match value {
            Value::Null => self.pair(""),
            Value::Bool(b) => self.pair(if *b { "true" } else { "false" }),
            Value::Number(n) => self.pair(&n.to_string()),
            Value::String(s) => self.pair(s),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.nested(&i.to_string(), item)?;
                }
                Ok(())
            }
            Value::Object(map) => {
                for (k, v) in map {
                    self.nested(k, v)?;
                }
                Ok(())
            }
        }
    }

    /// `name[key]`, encoded, then the name cut back.
    fn nested(&mut self, key: &str, value: &Value) -> Result<(), Denial> {
        let parent = self.name.len();
        self.name.push('[');
        self.name.push_str(key);
        self.name.push(']');
        let result = self.encode(value);
        self.name.truncate(parent);
        result
    }

    fn pair(&mut self, value: &str) -> Result<(), Denial> {
        if !self.out.is_empty() {
            self.out.push('&');
        }
        self.out
            .extend(url::form_urlencoded::byte_serialize(self.name.as_bytes()));
        self.out.push('=');
        self.out
            .extend(url::form_urlencoded::byte_serialize(value.as_bytes()));
        if self.out.len() > self.limit {
            return Err(Denial::BodyTooLarge);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};
    use serde_json::json;

    fn config() -> Config {
        Config::from_yaml("", None, &Overrides::default()).unwrap()
    }

    fn cost(body: &str) -> Result<Micros, Denial> {
        let c = config();
        let rule = c.vendors["stripe"]
            .meter_rule(&http::Method::POST, "/v1/payment_intents")
            .unwrap()
            .clone();
        request_cost(
            &rule,
            &ParsedBody::from_form(body.as_bytes(), &rule.fields()),
            None,
            &c.currencies,
        )
        .map(|(m, _)| m)
    }

    #[test]
    fn an_increment_counts_in_its_intents_currency_else_the_costliest() {
        let c = config();
        let rule = c.vendors["stripe"]
            .meter_rule(
                &http::Method::POST,
                "/v1/payment_intents/pi_1/increment_authorization",
            )
            .unwrap()
            .clone();
        let cost = |body: &str, object: Option<&str>| {
            request_cost(
                &rule,
                &ParsedBody::from_form(body.as_bytes(), &rule.fields()),
                object,
                &c.currencies,
            )
        };
        assert_eq!(
            cost("amount=1000", Some("jpy")),
            Ok((Micros(6_700_000), Some("jpy")))
        );
        // Unknown intent: the pound's penny is the table's most valuable minor unit.
        assert_eq!(cost("amount=1000", None), Ok((Micros(12_700_000), None)));
        assert_eq!(
            cost("amount=1000&currency=usd", Some("gbp")),
            Ok((Micros(10_000_000), Some("usd")))
        );
        assert_eq!(
            cost("amount=1000&currency=highest", None),
            Err(Denial::UnsupportedCurrency)
        );
    }

    #[test]
    fn converts_minor_units_of_each_kind_of_currency() {
        assert_eq!(cost("amount=1500&currency=usd"), Ok(Micros(15_000_000)));
        assert_eq!(cost("amount=1000&currency=JPY"), Ok(Micros(6_700_000)));
        assert_eq!(cost("amount=1000&currency=kwd"), Ok(Micros(3_250_000)));
        assert_eq!(cost("amount=1&currency=vnd"), Ok(Micros(39)));
    }

    #[test]
    fn decodes_form_encoding_like_stripe_does() {
        assert_eq!(cost("amount=1%30%30&currency=us%64"), Ok(Micros(1_000_000)));
        assert_eq!(
            cost("descr+iption=a+b&amount=100&currency=USD&x"),
            Ok(Micros(1_000_000))
        );
        // An encoded name is the same field: a second `amount` is still a duplicate.
        assert_eq!(
            cost("amount=100&%61mount=9&currency=usd"),
            Err(Denial::InvalidAmount)
        );
        assert_eq!(cost("amount=+100&currency=usd"), Err(Denial::InvalidAmount));
        // Names Stripe's parser may read as `amount`: refused, never metered as the first.
        for body in [
            "amount=100&currency=usd&+amount=99999999",
            "amount=100&currency=usd&%20amount=99999999",
            "amount=100&currency=usd;amount=99999999",
            "amount=100&currency=usd&amount]=99999999",
            "amount=100&currency=usd&[amount]=99999999",
            "amount=100&currency=usd&amount[x]=1",
            "[amount]=99999999&currency=usd",
            // Trimmed, case-folded or cut at a NUL by a lenient parser.
            "amount=100&currency=usd&amount%20=99999999",
            "amount=100&currency=usd&AMOUNT=99999999",
            "Amount=99999999&currency=usd",
            "amount=100&currency=usd&amount%00x=99999999",
            "amount=100&currency=usd&am%00ount=99999999",
            "%EF%BB%BFamount=99999999&currency=usd",
        ] {
            assert_eq!(cost(body), Err(Denial::InvalidAmount), "{body}");
        }
        assert_eq!(
            cost("amount=100&currency=usd&usd=1&amounts=3"),
            Ok(Micros(1_000_000))
        );
        assert_eq!(
            cost("amount=100&currency=usd%ff"),
            Err(Denial::UnsupportedCurrency)
        );
    }

    #[test]
    fn fails_closed_on_anything_ambiguous() {
        assert_eq!(cost("currency=usd"), Err(Denial::AmountRequired));
        assert_eq!(cost("amount=-5&currency=usd"), Err(Denial::InvalidAmount));
        assert_eq!(cost("amount=1.5&currency=usd"), Err(Denial::InvalidAmount));
        assert_eq!(
            cost("amount=1&amount=100000&currency=usd"),
            Err(Denial::InvalidAmount)
        );
        assert_eq!(
            cost("amount=100&currency=xyz"),
            Err(Denial::UnsupportedCurrency)
        );
        assert_eq!(cost("amount=100"), Err(Denial::UnsupportedCurrency));
        for odd in ["usd%C2%A0", "%E2%80%8Busd", "us%C4%8F", "usd%00"] {
            assert_eq!(
                cost(&format!("amount=100&currency={odd}")),
                Err(Denial::UnsupportedCurrency),
                "{odd}"
            );
        }
        assert!(cost("amount=100&currency=%20USD%09").is_ok());
    }

    #[test]
    fn json_content_types_are_recognised_without_regard_to_case_or_parameters() {
        for ct in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " application/json ",
            "application/vnd.api+json",
            "application/problem+JSON;x=1",
        ] {
            assert!(is_json(Some(ct)), "{ct}");
        }
        for ct in [
            "application/x-www-form-urlencoded",
            "text/plain",
            "json",
            "+jso",
            "",
            "application/jsonx",
        ] {
            assert!(!is_json(Some(ct)), "{ct}");
        }
        assert!(!is_json(None));
        for ct in [
            "application/x-www-form-urlencoded",
            "Application/X-WWW-Form-Urlencoded; charset=utf-8",
        ] {
            assert!(is_form(ct), "{ct}");
        }
        for ct in [
            "multipart/form-data; boundary=x",
            "text/plain",
            "",
            // Read as UTF-8 here, as other characters by the vendor.
            "application/x-www-form-urlencoded; charset=utf-16",
            "application/x-www-form-urlencoded; Charset=\"UTF-16LE\"",
        ] {
            assert!(!is_form(ct), "{ct}");
        }
        assert!(is_form(
            "application/x-www-form-urlencoded; charset=\"UTF-8\""
        ));
        assert!(is_form(
            "application/x-www-form-urlencoded; charset=ISO-8859-1"
        ));
        assert!(!is_json(Some("application/json; charset=utf-32")));
    }

    #[test]
    fn reads_json_bodies_too() {
        let c = config();
        let rule = c.vendors["stripe"]
            .meter_rule(&http::Method::POST, "/v1/payment_intents")
            .unwrap()
            .clone();
        for aliased in [
            json!({"amount": 100, "currency": "usd", "amount]": 99999999}),
            json!({"amount": 100, "currency": "usd", " amount": 99999999}),
            json!({"amount": {"x": 1}, "currency": "usd"}),
            json!({"amount": 100, "currency": ["usd"]}),
            // Nested keys flatten to bracketed names that Stripe's parser may fold.
            json!({"amount": 100, "currency": "usd", "": {"amount": 99999999}}),
            json!({"amount": 100, "currency": "usd", "]": {"amount": 99999999}}),
        ] {
            assert_eq!(
                request_cost(
                    &rule,
                    &ParsedBody::from_form(
                        json_to_form(&aliased, 1 << 20).unwrap().as_bytes(),
                        &rule.fields()
                    ),
                    None,
                    &c.currencies
                )
                .map(|(m, _)| m),
                Err(Denial::InvalidAmount),
                "{aliased}"
            );
        }
        let body = json!({"amount": 2000, "currency": "eur"});
        assert_eq!(
            request_cost(
                &rule,
                &ParsedBody::from_form(
                    json_to_form(&body, 1 << 20).unwrap().as_bytes(),
                    &rule.fields()
                ),
                None,
                &c.currencies
            )
            .map(|(m, _)| m),
            Ok(Micros(21_600_000))
        );
        let float = json!({"amount": 20.5, "currency": "usd"});
        assert_eq!(
            request_cost(
                &rule,
                &ParsedBody::from_form(
                    json_to_form(&float, 1 << 20).unwrap().as_bytes(),
                    &rule.fields()
                ),
                None,
                &c.currencies
            )
            .map(|(m, _)| m),
            Err(Denial::InvalidAmount)
        );
    }

    #[test]
    fn a_confirm_costs_the_largest_of_its_amounts() {
        let c = config();
        let rule = c.vendors["stripe"]
            .meter_rule(&http::Method::POST, "/v1/payment_intents/pi_1/confirm")
            .unwrap()
            .clone();
        let cost = |body: serde_json::Value| response_cost(&rule, &body, &c.currencies);
        // Still processing (a bank debit) or awaiting 3-D Secure: nothing received yet.
        for status in ["processing", "requires_action", "requires_capture"] {
            let body =
                json!({"status": status, "amount": 5000, "amount_received": 0, "currency": "usd"});
            assert_eq!(cost(body), Some(Micros(50_000_000)), "{status}");
        }
        let body = json!({"amount": 5000, "amount_received": 5000, "currency": "eur"});
        assert_eq!(cost(body), Some(Micros(54_000_000)));
        assert_eq!(
            cost(json!({"amount_received": 700, "currency": "usd"})),
            Some(Micros(7_000_000))
        );
        assert_eq!(cost(json!({"amount": "5000", "currency": "usd"})), None);
        assert_eq!(cost(json!({"amount": 5000})), None);
    }

    #[test]
    fn json_looking_bodies_are_told_apart_from_forms() {
        // A byte-order mark, which lenient JSON readers skip, hides nothing.
        for body in [
            &b"{\"amount\":1}"[..],
            b" \n[1]",
            b"\t{",
            b"\xEF\xBB\xBF{\"amount\":1}",
        ] {
            assert!(looks_like_json(body));
        }
        for body in [&b"amount=1&currency=usd"[..], b"", b"  ", b"x={"] {
            assert!(!looks_like_json(body));
        }
    }

    #[test]
    fn json_becomes_stripe_form_encoding() {
        let body = json!({
            "amount": 2000, "currency": "usd", "confirm": true,
            "automatic_payment_methods": {"enabled": true},
            "items": [{"price": "price_1", "quantity": 2}],
            "metadata": {"order": "a b&c"}
        });
        let form = json_to_form(&body, 1 << 20).unwrap();
        let pairs: Vec<(String, String)> = url::form_urlencoded::parse(form.as_bytes())
            .into_owned()
            .collect();
        for expected in [
            ("amount", "2000"),
            ("confirm", "true"),
            ("automatic_payment_methods[enabled]", "true"),
            ("items[0][price]", "price_1"),
            ("items[0][quantity]", "2"),
            ("metadata[order]", "a b&c"),
        ] {
            assert!(
                pairs.contains(&(expected.0.into(), expected.1.into())),
                "{expected:?} in {form}"
            );
        }
        assert_eq!(
            json_to_form(&json!([1, 2]), 1 << 20),
            Err(Denial::InvalidBody)
        );
    }

    #[test]
    fn a_subscription_costs_its_items_and_anything_that_could_add_to_it_is_refused() {
        let items = |form: &str| subscription_items(form.as_bytes());
        assert_eq!(
            items("customer=cus_1&items[0][price]=price_a&items[0][quantity]=3&items[1][price]=price_b&items[1][metadata][k]=v"),
            Ok(vec![
                Item { price: "price_a".into(), quantity: 3 },
                Item { price: "price_b".into(), quantity: 1 },
            ])
        );
        for bad in [
            "customer=cus_1",
            "items[0][quantity]=2",
            "items[0][price]=a&items[0][price]=b",
            "items[0][price]=a&items[0][quantity]=1.5",
            "items[0][price_data][unit_amount]=100&items[0][price_data][currency]=usd",
            "items[0][price]=a&items[0][tax_rates][0]=txr_1",
            "items[0][price]=a&add_invoice_items[0][price]=b",
            "items[0][price]=a&default_tax_rates[0]=txr_1",
            "items[0][price]=a&automatic_tax[enabled]=true",
            "items[0][price]=a&+items[1][price]=b",
            "items[0][price]=a&[items][1][price]=b",
            "items[0][price]=a&items[x][price]=b",
            "items[0][price]=a&currency=jpy",
            "items[0][price]=a&backdate_start_date=1700000000",
            "items[0][price]=a&prebilling[iterations]=12",
            "items[0][price]=a&plan=price_big&quantity=1000",
            "items[0][price]=a&quantity=1000",
            "items[0][price]=a&items[0][plan]=plan_big",
            "items[0][price]=a&tax_percent=100",
        ] {
            assert_eq!(items(bad), Err(Denial::InvalidAmount), "{bad}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Model of how a lenient (Rack-style) server may read a form: pairs split on `&`
        /// and `;`, names and values decoded, a name standing for `base` once leading
        /// spaces and brackets are dropped and it is cut at its first bracket.
        fn model(body: &str, keep: &[&str]) -> Vec<(String, Option<String>)> {
            let mut seen: Vec<(String, Option<String>)> = Vec::new();
            for pair in body.split(['&', ';']).filter(|p| !p.is_empty()) {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                let decode = |t: &str| -> String {
                    url::form_urlencoded::parse(format!("x={t}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                };
                let name = decode(name);
                let base = name
                    .trim_start()
                    .trim_start_matches(['[', ']'])
                    .split(['[', ']'])
                    .next()
                    .unwrap_or("")
                    .to_string();
                let Some(field) = keep.iter().find(|k| **k == name || **k == base) else {
                    continue;
                };
                let value = (name == *field).then(|| decode(value));
                match seen.iter_mut().find(|(n, _)| n == field) {
                    Some((_, v)) => *v = None,
                    None => seen.push((field.to_string(), value)),
                }
            }
            seen
        }

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                "[a-z &=\\[\\]%+]{0,6}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map("[a-z \\[\\]]{0,4}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Model of Stripe's bracket notation: every scalar under its path of keys.
        fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
            match value {
                Value::Null => out.push((prefix.into(), String::new())),
                Value::Bool(b) => out.push((prefix.into(), b.to_string())),
                Value::Number(n) => out.push((prefix.into(), n.to_string())),
                Value::String(s) => out.push((prefix.into(), s.clone())),
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        flatten(&format!("{prefix}[{i}]"), item, out);
                    }
                }
                Value::Object(map) => {
                    for (k, v) in map {
                        flatten(&format!("{prefix}[{k}]"), v, out);
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn form_fields_and_aliases_agree_with_the_model(
                body in "((amount|currency|x|\\[amount\\]|amount\\]|%61mount| amount|\\+amount|amount\\[x\\])(=[0-9a-z%+]{0,4})?[&;]?){0,6}"
            ) {
                let keep = ["amount", "currency"];
                let parsed = ParsedBody::from_form(body.as_bytes(), &keep);
                let got: Vec<(String, Option<String>)> = parsed
                    .fields
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.clone()))
                    .collect();
                prop_assert_eq!(got, model(&body, &keep), "{:?}", body);
            }

            #[test]
            fn json_becomes_the_bracket_notation_of_the_model(
                object in prop::collection::btree_map("[a-z\\[\\] ]{0,5}", json(), 0..5)
            ) {
                let value = Value::Object(object.into_iter().collect());
                let form = json_to_form(&value, 1 << 20).unwrap();
                let got: Vec<(String, String)> = url::form_urlencoded::parse(form.as_bytes())
                    .into_owned()
                    .collect();
                let mut expected = Vec::new();
                for (k, v) in value.as_object().unwrap() {
                    flatten(k, v, &mut expected);
                }
                prop_assert_eq!(got, expected);
            }

            /// Model: exact rational arithmetic, rounded up.
            #[test]
            fn minor_units_convert_to_micro_usd_rounding_up(
                minor in 0i64..=MAX_MINOR_UNITS,
                decimals in 0u32..=4,
                usd_per_unit in 1i64..=10_000_000_000,
            ) {
                let currency = Currency { decimals, usd_per_unit: Micros(usd_per_unit) };
                let exact = minor as u128 * usd_per_unit as u128;
                let divisor = 10u128.pow(decimals);
                let expected = exact.div_ceil(divisor);
                prop_assert_eq!(
                    to_usd(minor, &currency),
                    i64::try_from(expected).ok().map(Micros)
                );
                let text = minor.to_string();
                prop_assert_eq!(parse_minor_units(&text), Some(minor));
            }

            #[test]
            fn only_plain_digit_amounts_parse(text in "[0-9+ .eE-]{0,16}") {
                let model = (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| text.parse::<u64>().ok())
                    .flatten()
                    .filter(|n| *n <= MAX_MINOR_UNITS as u64 && text.len() <= 15)
                    .map(|n| n as i64);
                prop_assert_eq!(parse_minor_units(&text), model);
            }
        }
    }
}
