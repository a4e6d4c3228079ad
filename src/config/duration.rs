//! The one duration syntax of Keybrake, for the config file, the CLI and the control API:
//! a whole number followed by `ms`, `s`, `m`, `h` or `d` (`"500ms"`, `"30s"`, `"5m"`,
//! `"2h"`, `"1d"`), or a bare whole number of seconds (`"90"`, SPEC §3's `expires_in`).
//!
//! In the config file an integer (not a string) means the unit the field's name states:
//! `header_timeout_ms: 10000` is 10 s, `lifetime_seconds: 30` is 30 s, and unit-less
//! names (`default_key_ttl`) take seconds. So every file written before strings were
//! accepted keeps its meaning, and `header_timeout_ms: "10s"` is the same value.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// Parses the one duration syntax. Zero is a valid duration here; whoever needs a
/// positive one says so with its own message.
pub fn parse_duration(text: &str) -> Result<Duration, &'static str> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    if digits.is_empty() {
        return Err("expected a whole number followed by ms, s, m, h or d");
    }
    let n: u64 = digits.parse().map_err(|_| "number too large")?;
    let millis_per = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ if unit.starts_with(['.', ',']) => {
            return Err("a whole number is needed: no fractions (1500ms, not 1.5s)")
        }
        _ => return Err("unit must be ms, s, m, h or d"),
    };
    n.checked_mul(millis_per)
        .map(Duration::from_millis)
        .ok_or("number too large")
}

/// A `*_ms` field: an integer of milliseconds, or a duration string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(pub Duration);

/// A `*_seconds` field (or a unit-less one): an integer of seconds, or a duration string
/// of whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

struct FieldVisitor {
    /// What an integer counts.
    unit: Duration,
    whole_seconds: bool,
}

impl Visitor<'_> for FieldVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let unit = if self.unit == Duration::from_millis(1) {
            "milliseconds"
        } else {
            "seconds"
        };
        write!(
            f,
            "a whole number of {unit} or a duration like \"500ms\", \"30s\", \"5m\", \"2h\", \"1d\""
        )
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
        u32::try_from(n)
            .ok()
            .and_then(|n| self.unit.checked_mul(n))
            .ok_or_else(|| E::custom(format!("duration {n} is too large")))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::custom(format!("duration {n} is negative"))),
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        let d = parse_duration(text).map_err(|e| E::custom(format!("duration {text:?}: {e}")))?;
        if self.whole_seconds && d.subsec_nanos() != 0 {
            return Err(E::custom(format!(
                "duration {text:?}: this field takes whole seconds"
            )));
        }
        Ok(d)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor {
            unit: Duration::from_millis(1),
            whole_seconds: false,
        })
        .map(Millis)
    }
}

/// A unit-less field whose integer counts seconds and whose duration string may be finer
/// than a second (`"1500ms"`), as its command-line flag takes it: `edge.max_staleness`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FineSeconds(pub Duration);

impl<'de> Deserialize<'de> for FineSeconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor {
            unit: Duration::from_secs(1),
            whole_seconds: false,
        })
        .map(FineSeconds)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor {
            unit: Duration::from_secs(1),
            whole_seconds: true,
        })
        .map(Seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_syntax_with_units_or_bare_seconds() {
        let ok = |t: &str| parse_duration(t).unwrap();
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("2h"), Duration::from_secs(7200));
        assert_eq!(ok("1d"), Duration::from_secs(86_400));
        assert_eq!(ok("90"), Duration::from_secs(90));
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok(" 0s "), Duration::ZERO);
        for bad in [
            "5x",
            "-1m",
            "",
            "s",
            "1.5s",
            "1 s",
            "99999999999999999999",
            "1e3",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("0.5s").unwrap_err().contains("no fractions"));
        assert!(parse_duration(&format!("{}d", u64::MAX / 1000)).is_err());
    }

    #[test]
    fn integers_count_the_unit_of_the_field_name_and_strings_the_one_syntax() {
        #[derive(Deserialize)]
        struct F {
            a_ms: Millis,
            b_seconds: Seconds,
        }
        let f = |text: &str| yaml_serde::from_str::<F>(text).map(|f| (f.a_ms.0, f.b_seconds.0));
        let (s, ms) = (Duration::from_secs, Duration::from_millis);
        assert_eq!(f("{a_ms: 1500, b_seconds: 30}").unwrap(), (ms(1500), s(30)));
        assert_eq!(
            f("{a_ms: \"1500ms\", b_seconds: \"30s\"}").unwrap(),
            (ms(1500), s(30))
        );
        assert_eq!(
            f("{a_ms: \"2m\", b_seconds: \"1h\"}").unwrap(),
            (s(120), s(3600))
        );
        for (bad, why) in [
            ("{a_ms: -1, b_seconds: 1}", "negative"),
            ("{a_ms: 1.5, b_seconds: 1}", "whole number of milliseconds"),
            ("{a_ms: \"1x\", b_seconds: 1}", "unit must be"),
            ("{a_ms: 1, b_seconds: \"1500ms\"}", "whole seconds"),
            ("{a_ms: 1, b_seconds: true}", "whole number of seconds"),
        ] {
            let e = f(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
