//! Stage 1: the canonical path (SPEC §4). Only unreserved characters are percent-decoded;
//! dot segments (also encoded), encoded '/' or '\', empty segments, NUL and control bytes
//! are refused. What comes out is what gets matched and what gets forwarded.
//!
//! So is ';' (also encoded): no vendor path or object id holds one, and a server that
//! reads it as a segment's parameters (`/v1/charges/ch_1;x/capture`) would act on
//! another path than the one matched.

#[derive(Debug, PartialEq, Eq)]
pub struct InvalidPath;

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Canonicalizes a raw request path (without the query).
pub fn canonicalize(raw: &str) -> Result<String, InvalidPath> {
    let raw = raw.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(InvalidPath);
    }
    let mut out = String::with_capacity(raw.len());
    for segment in raw[1..].split(|&b| b == b'/') {
        if segment.is_empty() {
            return Err(InvalidPath);
        }
        let start = out.len();
        out.push('/');
        let mut i = 0;
        while i < segment.len() {
            let b = segment[i];
            if b == b'%' {
                let (hi, lo) = match (
                    segment.get(i + 1).copied().and_then(hex),
                    segment.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(InvalidPath),
                };
                let decoded = hi << 4 | lo;
                if decoded < 0x20 || matches!(decoded, 0x7f | b'/' | b'\\' | b';') {
                    return Err(InvalidPath);
                }
                if is_unreserved(decoded) {
                    out.push(decoded as char);
                } else {
                    out.push('%');
                    out.push(char::from(b"0123456789ABCDEF"[hi as usize]));
                    out.push(char::from(b"0123456789ABCDEF"[lo as usize]));
                }
                i += 3;
            } else if b < 0x20 || matches!(b, 0x7f | b'\\' | b';') || b >= 0x80 {
                return Err(InvalidPath);
            } else {
                out.push(b as char);
                i += 1;
            }
        }
        let seg = &out[start + 1..];
        if seg == "." || seg == ".." {
            return Err(InvalidPath);
        }
    }
    Ok(out)
}

/// A refused path as sent, for the access log and the audit: every byte but printable
/// ASCII percent-encoded, so no control, C1 or bidirectional-override character reaches
/// a terminal that shows a log line or an audit event.
pub fn as_sent(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for &b in raw.as_bytes() {
        if (0x21..=0x7e).contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[(b >> 4) as usize]));
            out.push(char::from(b"0123456789ABCDEF"[(b & 15) as usize]));
        }
    }
    out
}

/// A path as it may be shown (access log, audit, error lines): a token or secret a
/// client put in it is redacted to the end of its segment, its prefix kept
/// (`vk_[redacted]`), so no part of it (a JWT's payload or signature past an escape) can
/// be put together again. Recognized: a prefix followed by at least 20 token characters,
/// Keybrake's own anywhere (`vk_`, `kb_`, `kbn_`, `kba_`), and where a word starts a vault
/// key without its prefix (a JWT: `eyJ`) and the vendors' secrets (Stripe's `sk_live_`,
/// `sk_test_`, `rk_live_`, `rk_test_`, `whsec_`; OpenAI's and Anthropic's `sk-`). Only the
/// shown path: the one matched and forwarded is unchanged.
pub fn without_tokens(path: &str) -> std::borrow::Cow<'_, str> {
    const PREFIXES: [&[u8]; 4] = [b"vk_", b"kbn_", b"kba_", b"kb_"];
    const AT_WORD_START: [&[u8]; 7] = [
        b"eyJ",
        b"sk_live_",
        b"sk_test_",
        b"rk_live_",
        b"rk_test_",
        b"whsec_",
        b"sk-",
    ];
    const MIN_TOKEN_CHARS: usize = 20;
    let b = path.as_bytes();
    let is_token_char = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    let mut out = String::new();
    let (mut copied, mut i) = (0, 0);
    while i < b.len() {
        // A word starts after anything but a letter or digit, or after a percent-escape
        // (`Bearer%20eyJ…`, `key%3Dsk_live_…`: the shown path keeps reserved escapes).
        let after_escape = i >= 3
            && b[i - 3] == b'%'
            && b[i - 2].is_ascii_hexdigit()
            && b[i - 1].is_ascii_hexdigit();
        let word_start = i == 0 || !b[i - 1].is_ascii_alphanumeric() || after_escape;
        let prefix = PREFIXES.iter().find(|p| b[i..].starts_with(p)).or_else(|| {
            word_start
                .then(|| AT_WORD_START.iter().find(|p| b[i..].starts_with(p)))
                .flatten()
        });
        if let Some(prefix) = prefix {
            let start = i + prefix.len();
            let run = b[start..].iter().take_while(|c| is_token_char(c)).count();
            if run >= MIN_TOKEN_CHARS {
                // To the end of the segment (prefixes and `/` are ASCII: char boundaries).
                let end = b[start..]
                    .iter()
                    .position(|&c| c == b'/')
                    .map_or(b.len(), |n| start + n);
                out.push_str(&path[copied..start]);
                out.push_str("[redacted]");
                (copied, i) = (end, end);
                continue;
            }
        }
        i += 1;
    }
    if copied == 0 {
        return std::borrow::Cow::Borrowed(path);
    }
    out.push_str(&path[copied..]);
    std::borrow::Cow::Owned(out)
}

/// Splits `/{vendor}/{rest}` into the vendor and the vendor-relative path (`/` + rest).
pub fn split_vendor(canonical: &str) -> Option<(&str, &str)> {
    let rest = canonical.strip_prefix('/')?;
    match rest.find('/') {
        Some(i) => Some((&rest[..i], &rest[i..])),
        None => Some((rest, "")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_as_sent_shows_only_printable_ascii() {
        assert_eq!(as_sent("/stripe/v1/a%2Fb/.."), "/stripe/v1/a%2Fb/..");
        assert_eq!(
            as_sent("/stripe/x\u{9b}2J\u{202e}y z\u{1b}"),
            "/stripe/x%C2%9B2J%E2%80%AEy%20z%1B"
        );
    }

    #[test]
    fn keeps_ordinary_paths_and_decodes_unreserved_only() {
        assert_eq!(
            canonicalize("/stripe/v1/payment_intents").unwrap(),
            "/stripe/v1/payment_intents"
        );
        assert_eq!(
            canonicalize("/stripe/v1/%70ayment_intents").unwrap(),
            "/stripe/v1/payment_intents"
        );
        assert_eq!(
            canonicalize("/stripe/v1/a%3ab").unwrap(),
            "/stripe/v1/a%3Ab"
        );
        assert_eq!(
            canonicalize("/stripe/v1/a%20b").unwrap(),
            "/stripe/v1/a%20b"
        );
    }

    #[test]
    fn refuses_the_tricks() {
        for bad in [
            "/stripe/v1/../v1/charges",
            "/stripe/v1/./charges",
            "/stripe/v1/%2e%2e/charges",
            "/stripe/v1/%2E/charges",
            "/stripe/v1/.%2e/charges",
            "/stripe/v1%2Fcharges",
            "/stripe/v1%2fcharges",
            "/stripe//v1/charges",
            "/stripe/v1/charges/",
            "/stripe/v1\\charges",
            "/stripe/v1%5Ccharges",
            "/stripe/v1/%00",
            "/stripe/v1/a\0b",
            "/stripe/v1/%0a",
            "/stripe/v1/%zz",
            "/stripe/v1/%2",
            "stripe/v1",
            "/stripe/v1/caf\u{e9}",
            "/stripe/v1/charges/ch_1;x/capture",
            "/stripe/v1/charges/ch_1%3Bcapture",
            "/stripe/v1/charges;/ch_1",
        ] {
            assert_eq!(canonicalize(bad), Err(InvalidPath), "{bad:?}");
        }
    }

    #[test]
    fn a_token_a_client_put_in_the_path_is_not_shown() {
        let vk = "vk_eyJhbGciOiJFZERTQSJ9.eyJqdGkiOiJrZXlfMSJ9.c2lnbmF0dXJl";
        let kba = "kba_Q2xpZW50cyBwdXQgdG9rZW5zIGluIFVSTHMgYnkgbWlzdGFrZQ";
        assert_eq!(
            without_tokens(&format!("/stripe/v1/customers/{vk}")),
            "/stripe/v1/customers/vk_[redacted]"
        );
        assert_eq!(
            without_tokens(&format!("/stripe/v1/..%2F{kba}/x")),
            "/stripe/v1/..%2Fkba_[redacted]/x"
        );
        assert_eq!(
            without_tokens(&format!("/openai/v1/files/kb_{}", "a".repeat(43))),
            "/openai/v1/files/kb_[redacted]"
        );
        // Past an escape that splits it (a refused path as sent), and glued to text.
        assert_eq!(
            without_tokens(&format!("/stripe/v1/{}%2E{}/x", &vk[..30], &vk[31..])),
            "/stripe/v1/vk_[redacted]/x"
        );
        assert_eq!(
            without_tokens(&format!("/stripe/v1/abc{vk}")),
            "/stripe/v1/abcvk_[redacted]"
        );
        // Any string: no panic inside a multi-byte character.
        assert_eq!(
            without_tokens(&format!("/x/\u{e9}/{vk}")),
            "/x/\u{e9}/vk_[redacted]"
        );
        // A vault key without its prefix, and vendors' secrets, also after an escape.
        assert_eq!(
            without_tokens(&format!("/stripe/v1/customers/{}/x", &vk[3..])),
            "/stripe/v1/customers/eyJ[redacted]/x"
        );
        assert_eq!(
            without_tokens(&format!("/stripe/v1/Bearer%20{}", &vk[3..])),
            "/stripe/v1/Bearer%20eyJ[redacted]"
        );
        assert_eq!(
            without_tokens("/stripe/v1/key%3Dsk_live_51HxQ2bLkdIwHu7ixAbCdEfGh"),
            "/stripe/v1/key%3Dsk_live_[redacted]"
        );
        for secret in [
            "sk_live_51HxQ2bLkdIwHu7ixAbCdEfGh",
            "sk_test_51HxQ2bLkdIwHu7ixAbCdEfGh",
            "rk_live_51HxQ2bLkdIwHu7ixAbCdEfGh",
            "whsec_51HxQ2bLkdIwHu7ixAbCdEfGh",
            "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx",
            "sk-ant-api03-AbCdEfGhIjKlMnOpQrSt",
        ] {
            let path = format!("/openai/v1/files/{secret}");
            let shown = without_tokens(&path);
            assert!(shown.ends_with("[redacted]"), "{shown}");
            assert!(!shown.contains(&secret[secret.len() - 12..]), "{shown}");
        }
        // Ordinary ids and names stay as they are.
        for path in [
            "/stripe/v1/payment_intents/pi_3MtwBwLkdIwHu7ix28a3tqPa",
            "/stripe/v1/kb_articles",
            "/stripe/v1/customers/cus_vk_1",
            "/openai/v1/models/ft:gpt-4o:kb_org:x",
            "/openai/v1/files/task-AbCdEfGhIjKlMnOpQrStUvWx",
        ] {
            assert!(
                matches!(without_tokens(path), std::borrow::Cow::Borrowed(_)),
                "{path}"
            );
        }
    }

    #[test]
    fn splits_vendor() {
        assert_eq!(
            split_vendor("/stripe/v1/charges"),
            Some(("stripe", "/v1/charges"))
        );
        assert_eq!(split_vendor("/stripe"), Some(("stripe", "")));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Model: split on '/', decode each `%XX` of a segment, refuse what SPEC §4
        /// refuses, re-encode what is not unreserved, join again.
        fn model(raw: &str) -> Result<String, InvalidPath> {
            let rest = raw.strip_prefix('/').ok_or(InvalidPath)?;
            let mut out = String::new();
            for segment in rest.split('/') {
                let bytes = segment.as_bytes();
                let mut decoded = String::new();
                let mut i = 0;
                while i < bytes.len() {
                    let (b, escaped) = if bytes[i] == b'%' {
                        let hex = segment.get(i + 1..i + 3).ok_or(InvalidPath)?;
                        if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                            return Err(InvalidPath);
                        }
                        i += 3;
                        let b = u8::from_str_radix(hex, 16).map_err(|_| InvalidPath)?;
                        if b == b'/' {
                            return Err(InvalidPath);
                        }
                        (b, true)
                    } else {
                        i += 1;
                        if bytes[i - 1] >= 0x80 {
                            return Err(InvalidPath);
                        }
                        (bytes[i - 1], false)
                    };
                    if b.is_ascii_control() || b == b'\\' || b == b';' {
                        return Err(InvalidPath);
                    }
                    if escaped && !(b.is_ascii_alphanumeric() || b"-._~".contains(&b)) {
                        decoded.push_str(&format!("%{b:02X}"));
                    } else {
                        decoded.push(b as char);
                    }
                }
                if decoded.is_empty() || decoded == "." || decoded == ".." {
                    return Err(InvalidPath);
                }
                out.push('/');
                out.push_str(&decoded);
            }
            Ok(out)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn canonicalization_agrees_with_the_model(
                raw in "(/|a|b|\\.|%|2|e|E|f|F|5|c|C|0|7|~|-|:|;|3|B|\\\\|\u{0}|\u{e9}){0,14}"
            ) {
                prop_assert_eq!(canonicalize(&raw), model(&raw), "{:?}", raw);
                if let Ok(canonical) = canonicalize(&raw) {
                    // Canonical is a fixed point and has no empty or dot segment.
                    let again = canonicalize(&canonical);
                    prop_assert_eq!(again.as_deref(), Ok(canonical.as_str()));
                    for segment in canonical[1..].split('/') {
                        prop_assert!(!segment.is_empty() && segment != "." && segment != "..");
                    }
                }
            }
        }
    }
}
