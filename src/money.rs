//! Money as a type: integer micro-USD with checked arithmetic, and the exact decimal
//! parsing used wherever a user hands us a dollar amount. No `f64` survives parsing.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One millionth of a US dollar. Every cap, lease, reservation and spend is one of these.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Micros(pub i64);

/// Largest cap or amount we accept: one billion dollars. Larger values are input mistakes
/// and would leave little headroom for arithmetic.
pub const MAX_USD: Micros = Micros(1_000_000_000 * 1_000_000);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoneyError {
    #[error("not a decimal number")]
    NotANumber,
    #[error("more than 6 decimal places")]
    TooPrecise,
    #[error("out of range")]
    OutOfRange,
}

impl Micros {
    pub const ZERO: Micros = Micros(0);

    pub fn checked_add(self, other: Micros) -> Option<Micros> {
        self.0.checked_add(other.0).map(Micros)
    }

    pub fn checked_sub(self, other: Micros) -> Option<Micros> {
        self.0.checked_sub(other.0).map(Micros)
    }

    pub fn saturating_sub(self, other: Micros) -> Micros {
        Micros(self.0.saturating_sub(other.0))
    }

    pub fn saturating_add(self, other: Micros) -> Micros {
        Micros(self.0.saturating_add(other.0))
    }

    /// `self × n`, `None` on overflow.
    pub fn checked_mul(self, n: i64) -> Option<Micros> {
        self.0.checked_mul(n).map(Micros)
    }

    /// `self / n` (n > 0), `None` for n ≤ 0.
    pub fn checked_div(self, n: i64) -> Option<Micros> {
        (n > 0).then(|| Micros(self.0 / n))
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// USD as a JSON number. `m / 1e6` is correctly rounded, so the shortest decimal that
    /// serializes is exactly the micro-dollar value (for anything below 2^53 micros).
    pub fn as_usd_f64(self) -> f64 {
        self.0 as f64 / 1_000_000.0
    }

    /// Parses a decimal USD amount such as `500`, `12.5`, `0.000001` or `1e3`, exactly.
    pub fn parse_usd(text: &str) -> Result<Micros, MoneyError> {
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(i) => (
                &text[..i],
                text[i + 1..]
                    .parse::<i32>()
                    .map_err(|_| MoneyError::NotANumber)?,
            ),
            None => (text, 0),
        };
        let (negative, mantissa) = match mantissa.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, mantissa),
        };
        let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if int_part.is_empty() && frac_part.is_empty()
            || !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(MoneyError::NotANumber);
        }
        // value = digits * 10^(exponent - frac_len); we want value * 10^6.
        let digits = format!("{int_part}{frac_part}");
        let digits = digits.trim_start_matches('0');
        // In i64: an exponent near i32's ends must not overflow.
        let scale = i64::from(exponent) - frac_part.len() as i64 + 6;
        let (digits, scale) = if scale < 0 {
            let cut = (-scale) as usize;
            if digits.len() < cut {
                if digits.is_empty() {
                    ("", 0)
                } else {
                    return Err(MoneyError::TooPrecise);
                }
            } else {
                let (keep, dropped) = digits.split_at(digits.len() - cut);
                if dropped.bytes().any(|b| b != b'0') {
                    return Err(MoneyError::TooPrecise);
                }
                (keep, 0)
            }
        } else {
            (digits, scale)
        };
        if digits.len() + scale as usize > 18 {
            return Err(MoneyError::OutOfRange);
        }
        let mut value: i64 = if digits.is_empty() {
            0
        } else {
            digits.parse().map_err(|_| MoneyError::OutOfRange)?
        };
        for _ in 0..scale {
            value = value.checked_mul(10).ok_or(MoneyError::OutOfRange)?;
        }
        if negative {
            value = -value;
        }
        let micros = Micros(value);
        if micros > MAX_USD {
            return Err(MoneyError::OutOfRange);
        }
        Ok(micros)
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let (whole, frac) = (abs / 1_000_000, abs % 1_000_000);
        if frac == 0 {
            write!(f, "{sign}${whole}")
        } else {
            let frac = format!("{frac:06}");
            write!(f, "{sign}${whole}.{}", frac.trim_end_matches('0'))
        }
    }
}

/// JSON text with every number in exponent form (`1e-6`, as serde_json writes a small
/// or large `f64`) written out in plain decimals (`0.000001`), the same value: money
/// below a cent reads as money. Strings are left as they are.
pub fn plain_numbers(json: String) -> String {
    if !json.contains(['e', 'E']) {
        return json;
    }
    let bytes = json.as_bytes();
    let mut out = String::with_capacity(json.len() + 16);
    let (mut i, mut copied) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Past the string, escapes included.
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                let number = &json[start..i];
                if number.contains(['e', 'E']) {
                    if let Ok(value) = number.parse::<f64>() {
                        out.push_str(&json[copied..start]);
                        // Display never uses an exponent; `.0` keeps it a float.
                        let plain = format!("{value}");
                        out.push_str(&plain);
                        if !plain.contains('.') {
                            out.push_str(".0");
                        }
                        copied = i;
                    }
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&json[copied.min(json.len())..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_usd_exactly() {
        assert_eq!(Micros::parse_usd("500"), Ok(Micros(500_000_000)));
        assert_eq!(Micros::parse_usd("12.5"), Ok(Micros(12_500_000)));
        assert_eq!(Micros::parse_usd("0.000001"), Ok(Micros(1)));
        assert_eq!(Micros::parse_usd("1e-6"), Ok(Micros(1)));
        assert_eq!(Micros::parse_usd("1.5E3"), Ok(Micros(1_500_000_000)));
        assert_eq!(Micros::parse_usd("0.10"), Ok(Micros(100_000)));
        assert_eq!(Micros::parse_usd("-2"), Ok(Micros(-2_000_000)));
    }

    #[test]
    fn rejects_what_is_not_exact_money() {
        assert_eq!(Micros::parse_usd("0.0000001"), Err(MoneyError::TooPrecise));
        assert_eq!(Micros::parse_usd("abc"), Err(MoneyError::NotANumber));
        assert_eq!(Micros::parse_usd(""), Err(MoneyError::NotANumber));
        assert_eq!(Micros::parse_usd("1e30"), Err(MoneyError::OutOfRange));
        assert_eq!(Micros::parse_usd("1000000001"), Err(MoneyError::OutOfRange));
        // Exponents at i32's ends: the right error, no overflow.
        let huge = Micros::parse_usd("1e2147483647");
        assert_eq!(huge, Err(MoneyError::OutOfRange));
        let tiny = Micros::parse_usd("1.5e-2147483648");
        assert_eq!(tiny, Err(MoneyError::TooPrecise));
        assert_eq!(Micros::parse_usd("0.000000e-2147483648"), Ok(Micros(0)));
    }

    #[test]
    fn prints_as_dollars_and_json_numbers_round_trip() {
        assert_eq!(Micros(12_500_000).to_string(), "$12.5");
        assert_eq!(Micros(1).to_string(), "$0.000001");
        assert_eq!(
            serde_json::json!(Micros(12_500_001).as_usd_f64()).to_string(),
            "12.500001"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Model: the decimal's digits scaled to micros with 128-bit integers.
        fn model(negative: bool, int: &str, frac: &str) -> Result<Micros, MoneyError> {
            if frac.trim_end_matches('0').len() > 6 {
                return Err(MoneyError::TooPrecise);
            }
            let mut digits = format!("{int}{frac:0<6}");
            digits.truncate(int.len() + 6);
            let value: i128 = digits.trim_start_matches('0').parse().unwrap_or(0);
            // Only the upper bound is checked: a negative amount is refused by its users.
            if !negative && value > MAX_USD.0 as i128 {
                return Err(MoneyError::OutOfRange);
            }
            Ok(Micros(if negative {
                -(value as i64)
            } else {
                value as i64
            }))
        }

        proptest! {
            #[test]
            fn decimal_usd_parses_exactly(
                negative in any::<bool>(),
                int in "[0-9]{1,12}",
                frac in prop::option::of("[0-9]{0,8}"),
            ) {
                let text = format!(
                    "{}{int}{}",
                    if negative { "-" } else { "" },
                    frac.as_ref().map(|f| format!(".{f}")).unwrap_or_default()
                );
                prop_assert_eq!(
                    Micros::parse_usd(&text),
                    model(negative, &int, frac.as_deref().unwrap_or("")),
                    "{}", text
                );
            }

            #[test]
            fn anything_else_is_not_a_number_or_in_range(text in "[0-9eE.+-]{0,12}") {
                if let Ok(m) = Micros::parse_usd(&text) {
                    prop_assert!(m <= MAX_USD);
                }
            }
        }
    }

    #[test]
    fn numbers_in_exponent_form_are_written_out() {
        let body = serde_json::json!({
            "spend_usd": Micros(1).as_usd_f64(),
            "held_usd": Micros(15).as_usd_f64(),
            "cap": Micros(500_000_000).as_usd_f64(),
            "big": 1e16,
            "label": "1e-6 \"e5\" stays",
            "list": [Micros(2).as_usd_f64(), 12.5, -0.000003],
        });
        let text = plain_numbers(body.to_string());
        assert_eq!(text.matches("e-").count(), 1, "only the label's: {text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["label"], "1e-6 \"e5\" stays");
        assert_eq!(back["spend_usd"], 0.000001);
        assert_eq!(back["held_usd"], 0.000015);
        assert_eq!(back["cap"], 500.0);
        assert_eq!(back["big"], 1e16);
        assert_eq!(back["list"], serde_json::json!([0.000002, 12.5, -0.000003]));
        assert!(text.contains("\"spend_usd\":0.000001"), "{text}");
        assert!(
            text.contains("\"cap\":500.0"),
            "unchanged without an exponent: {text}"
        );
        let pretty = plain_numbers(serde_json::to_string_pretty(&body).unwrap());
        assert!(pretty.contains("\"spend_usd\": 0.000001"), "{pretty}");
    }
}
