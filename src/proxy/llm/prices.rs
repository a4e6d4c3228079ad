//! The LLM price table (`conf/prices.yaml`): USD per million tokens by vendor and model,
//! how a dated snapshot finds its family's price, and the two sums metering needs: the
//! upper bound reserved before forwarding and the cost settled from the vendor's usage.

use super::usage::Usage;
use crate::money::Micros;
use crate::Map;
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVendorPrices {
    /// Price of a model absent from `models` (none: such a model is refused).
    default: Option<FileModelPrice>,
    #[serde(default)]
    models: BTreeMap<String, FileModelPrice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModelPrice {
    input: String,
    cached_input: Option<String>,
    cache_write: Option<String>,
    cache_write_1h: Option<String>,
    #[serde(default)]
    output: Option<String>,
    context: Option<u64>,
    max_output: Option<u64>,
}

/// One model's prices, in micro-USD per million tokens, and its limits in tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrice {
    pub input: Micros,
    /// Input read from the vendor's prompt cache (OpenAI cached tokens, Anthropic cache
    /// reads). Defaults to `input`.
    pub cached_input: Micros,
    /// Input written to Anthropic's prompt cache (5-minute TTL). Defaults to `input`.
    pub cache_write: Micros,
    /// Input written to Anthropic's prompt cache with the 1-hour TTL. Defaults to
    /// `cache_write`.
    pub cache_write_1h: Micros,
    /// Output tokens, reasoning tokens included (billed as output by both vendors).
    pub output: Micros,
    /// Most input tokens one call can take (the context window); none: no such bound.
    pub context: Option<u64>,
    /// Most output tokens the model writes: reserved when a request names no limit.
    pub max_output: Option<u64>,
}

/// Prices by vendor, then model.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    vendors: Map<String, VendorPrices>,
}

#[derive(Debug, Clone, Default)]
struct VendorPrices {
    default: Option<ModelPrice>,
    models: Map<String, ModelPrice>,
}

/// Largest token count accepted anywhere (a billion): larger is an input mistake, and
/// it keeps every product below far from `i128`'s range.
const MAX_TOKENS: u64 = 1_000_000_000;

impl PriceTable {
    pub fn parse(text: &str) -> Result<PriceTable> {
        let raw: BTreeMap<String, FileVendorPrices> =
            yaml_serde::from_str(text).map_err(|e| crate::config::yaml_error("price table", e))?;
        let mut vendors = Map::default();
        for (vendor, v) in raw {
            let price = |model: &str, p: &FileModelPrice| {
                model_price(p).map_err(|e| anyhow!("prices {vendor}/{model}: {e}"))
            };
            let default = v
                .default
                .as_ref()
                .map(|p| price("default", p))
                .transpose()?;
            let mut models = Map::default();
            for (name, p) in &v.models {
                if name.is_empty() || name.chars().any(|c| c.is_whitespace()) {
                    bail!("prices {vendor}: {name:?} is not a model name");
                }
                models.insert(name.clone(), price(name, p)?);
            }
            vendors.insert(vendor, VendorPrices { default, models });
        }
        Ok(PriceTable { vendors })
    }

    pub fn has_vendor(&self, vendor: &str) -> bool {
        self.vendors.contains_key(vendor)
    }

    pub fn models(&self) -> usize {
        self.vendors.values().map(|v| v.models.len()).sum()
    }

    /// The price of `model` at `vendor`: its own entry, else its family's (the name
    /// without a dated snapshot suffix, `-2024-08-06`, `-20241022`, or `-latest`), else the
    /// vendor's default. `None`: an unknown model, refused. A snapshot whose list price
    /// differs from its family's (`gpt-4o-2024-05-13`) needs its own entry in the table,
    /// else it is priced at the family's rates.
    pub fn resolve(&self, vendor: &str, model: &str) -> Option<&ModelPrice> {
        let v = self.vendors.get(vendor)?;
        v.models
            .get(model)
            .or_else(|| family(model).and_then(|f| v.models.get(f)))
            .or(v.default.as_ref())
    }
}

/// `model` without its snapshot suffix, when it has one: `-YYYY-MM-DD` (OpenAI),
/// `-YYYYMMDD` (Anthropic) or `-latest`.
pub fn family(model: &str) -> Option<&str> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(f) = model.strip_suffix("-latest") {
        return Some(f).filter(|f| !f.is_empty());
    }
    let (head, last) = model.rsplit_once('-')?;
    if last.len() == 8 && digits(last) {
        return Some(head).filter(|h| !h.is_empty());
    }
    // -YYYY-MM-DD: three dash-separated numeric parts of 4, 2 and 2 digits.
    let (head, month) = head.rsplit_once('-')?;
    let (head, year) = head.rsplit_once('-')?;
    (year.len() == 4 && month.len() == 2 && last.len() == 2)
        .then_some(())
        .filter(|_| digits(year) && digits(month) && digits(last) && !head.is_empty())
        .map(|_| head)
}

fn model_price(p: &FileModelPrice) -> Result<ModelPrice> {
    let usd = |field: &str, text: &str| -> Result<Micros> {
        Micros::parse_usd(text)
            .ok()
            .filter(|m| m.0 >= 0 && m.0 <= 1_000_000_000)
            .ok_or_else(|| {
                anyhow!("{field} {text:?} is not a USD amount per million tokens (0 to 1000)")
            })
    };
    let input = usd("input", &p.input)?;
    let cache_write = match &p.cache_write {
        Some(t) => usd("cache_write", t)?,
        None => input,
    };
    let limit = |field: &str, v: Option<u64>| -> Result<Option<u64>> {
        match v {
            Some(n) if n == 0 || n > MAX_TOKENS => bail!("{field} {n} is not 1..={MAX_TOKENS}"),
            v => Ok(v),
        }
    };
    let output = match &p.output {
        Some(t) => usd("output", t)?,
        None => Micros::ZERO,
    };
    if output.is_positive() && (p.context.is_none() || p.max_output.is_none()) {
        // Both bound what a call can cost (docs/llm-metering.md).
        bail!("a model priced for output needs context and max_output");
    }
    Ok(ModelPrice {
        input,
        cached_input: match &p.cached_input {
            Some(t) => usd("cached_input", t)?,
            None => input,
        },
        cache_write,
        cache_write_1h: match &p.cache_write_1h {
            Some(t) => usd("cache_write_1h", t)?,
            None => cache_write,
        },
        output,
        context: limit("context", p.context)?,
        max_output: limit("max_output", p.max_output)?,
    })
}

/// `tokens × micro-USD per million`, summed, to micro-USD rounded up (in the cap's
/// favour, once, on the sum).
fn sum_micros(terms: &[(u64, Micros)]) -> Option<Micros> {
    let mut total: i128 = 0;
    for &(tokens, per_million) in terms {
        if tokens > MAX_TOKENS {
            return None;
        }
        total = total.checked_add(tokens as i128 * per_million.0 as i128)?;
    }
    let micros = (total + 999_999) / 1_000_000;
    i64::try_from(micros).ok().map(Micros)
}

impl ModelPrice {
    /// The most a call of at most `input` input tokens and `output` output tokens can
    /// cost: input at its dearest rate (cache writes cost more than plain input).
    pub fn bound(&self, input: u64, output: u64) -> Option<Micros> {
        let dearest = self
            .input
            .max(self.cached_input)
            .max(self.cache_write)
            .max(self.cache_write_1h);
        sum_micros(&[(input, dearest), (output, self.output)])
    }

    /// What the vendor bills for `usage`.
    pub fn cost(&self, u: &Usage) -> Option<Micros> {
        sum_micros(&[
            (u.input, self.input),
            (u.cached_input, self.cached_input),
            (u.cache_write, self.cache_write),
            (u.cache_write_1h, self.cache_write_1h),
            (u.output, self.output),
        ])
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
    gpt-4o: { input: "2.50", cached_input: "1.25", output: "10", context: 128000, max_output: 16384 }
    gpt-4o-mini: { input: "0.15", cached_input: "0.075", output: "0.60", context: 128000, max_output: 16384 }
anthropic:
  default: { input: "3", output: "15", context: 200000, max_output: 8192 }
  models:
    claude-3-5-haiku: { input: "0.80", cached_input: "0.08", cache_write: "1", output: "4", context: 200000, max_output: 8192 }
"#,
        )
        .unwrap()
    }

    #[test]
    fn snapshots_resolve_to_their_family_and_nothing_else_does() {
        let t = table();
        let input = |v: &str, m: &str| t.resolve(v, m).map(|p| p.input.0);
        assert_eq!(input("openai", "gpt-4o"), Some(2_500_000));
        assert_eq!(input("openai", "gpt-4o-2024-08-06"), Some(2_500_000));
        assert_eq!(input("openai", "gpt-4o-mini-2024-07-18"), Some(150_000));
        assert_eq!(input("openai", "gpt-4o-latest"), Some(2_500_000));
        // A prefix is not a family: unknown models are refused.
        assert_eq!(input("openai", "gpt-4o-audio-preview"), None);
        assert_eq!(input("openai", "gpt-4o-2024-8-06"), None);
        assert_eq!(input("openai", "gpt-4"), None);
        assert_eq!(input("openai", "2024-08-06"), None);
        assert_eq!(
            input("anthropic", "claude-3-5-haiku-20241022"),
            Some(800_000)
        );
        assert_eq!(input("anthropic", "claude-3-5-haiku-latest"), Some(800_000));
        // Anthropic names a default price: any other model costs that.
        assert_eq!(input("anthropic", "claude-x"), Some(3_000_000));
        assert_eq!(input("generic", "gpt-4o"), None);
        assert_eq!(family("-20241022"), None);
        assert_eq!(family("-latest"), None);
    }

    #[test]
    fn the_shipped_table_prices_snapshots_with_their_own_list_price() {
        let t = PriceTable::parse(crate::config::EMBEDDED_PRICES).unwrap();
        let price = |m: &str| {
            let p = t.resolve("openai", m).unwrap();
            (p.input.0, p.cached_input.0, p.output.0, p.max_output)
        };
        // gpt-4o-2024-05-13 is billed $5 / $15 per million, not gpt-4o's $2.50 / $10.
        assert_eq!(
            price("gpt-4o-2024-05-13"),
            (5_000_000, 5_000_000, 15_000_000, Some(4_096))
        );
        assert_eq!(price("gpt-4o-2024-08-06").0, 2_500_000);
    }

    #[test]
    fn costs_round_up_once_on_the_sum_and_bounds_take_the_dearest_input() {
        let t = table();
        let mini = t.resolve("openai", "gpt-4o-mini").unwrap();
        // 1000 × 0.15 + 200 × 0.075 + 50 × 0.60 = 150 + 15 + 30 micro-USD.
        let u = Usage {
            input: 1000,
            cached_input: 200,
            output: 50,
            ..Usage::default()
        };
        assert_eq!(mini.cost(&u), Some(Micros(195)));
        // 7 × 0.15 = 1.05 micro-USD → 2.
        let u = Usage {
            input: 7,
            ..Usage::default()
        };
        assert_eq!(mini.cost(&u), Some(Micros(2)));
        assert_eq!(mini.cost(&Usage::default()), Some(Micros::ZERO));
        let haiku = t.resolve("anthropic", "claude-3-5-haiku").unwrap();
        assert_eq!(haiku.cache_write_1h, Micros(1_000_000));
        // Input bound at the cache-write price (1 > 0.80).
        assert_eq!(haiku.bound(1_000_000, 1_000), Some(Micros(1_004_000)));
        assert_eq!(haiku.bound(MAX_TOKENS + 1, 0), None);
    }

    #[test]
    fn bad_tables_are_refused_with_the_entry_named() {
        for (text, needle) in [
            ("openai: {models: {m: {input: x}}}", "openai/m"),
            ("openai: {models: {m: {input: \"-1\"}}}", "openai/m"),
            (
                "openai: {models: {m: {input: \"1\", max_output: 0}}}",
                "max_output",
            ),
            (
                "openai: {models: {m: {input: \"1\", colour: 1}}}",
                "unknown field",
            ),
            (
                "openai: {models: {\"a b\": {input: \"1\"}}}",
                "not a model name",
            ),
            (
                "openai: {models: {m: {input: \"1\", output: \"2\"}}}",
                "needs context",
            ),
        ] {
            let err = PriceTable::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
