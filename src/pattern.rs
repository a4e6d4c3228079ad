//! Endpoint patterns of SPEC §2, shared by the control plane (which validates them at
//! issuance) and the proxy (which matches canonical paths against them).
//!
//! `"/v1/payment_intents"` allows any method; `"POST /v1/payment_intents"` only POST.
//! A `*` segment matches exactly one segment; a trailing `**` matches zero or more.
//!
//! `EndpointPattern::parse` is what a token may carry; `check_issuable` adds the rules
//! `POST /v1/keys` enforces on top (patterns that parse but could never match).

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    One,
    Rest,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPattern {
    method: Option<http::Method>,
    segments: Vec<Segment>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("pattern is empty")]
    Empty,
    #[error("unknown HTTP method {0:?}")]
    BadMethod(String),
    #[error("path must start with '/'")]
    NoLeadingSlash,
    #[error("empty path segment")]
    EmptySegment,
    #[error("'**' is only allowed as the last segment")]
    RestNotLast,
    #[error("'.' and '..' segments are not allowed")]
    DotSegment,
    #[error("invalid character in path")]
    BadCharacter,
}

const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

impl EndpointPattern {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        let (method, path) = match text.split_once(' ') {
            Some((m, p)) => {
                if !METHODS.contains(&m) {
                    return Err(PatternError::BadMethod(m.to_string()));
                }
                (Some(m.parse().expect("known method")), p.trim())
            }
            None => (None, text),
        };
        let rest = path.strip_prefix('/').ok_or(PatternError::NoLeadingSlash)?;
        if rest
            .bytes()
            .any(|b| b <= b' ' || b == 0x7f || b == b'\\' || b == b'?' || b == b'%')
        {
            return Err(PatternError::BadCharacter);
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "" => return Err(PatternError::EmptySegment),
                "." | ".." => return Err(PatternError::DotSegment),
                "*" => Segment::One,
                "**" if i + 1 == parts.len() => Segment::Rest,
                p if p.contains("**") => return Err(PatternError::RestNotLast),
                p => Segment::Literal(p.into()),
            };
            segments.push(segment);
        }
        Ok(EndpointPattern { method, segments })
    }

    /// Does `method path` match? `path` must be canonical (see `proxy::path`), starting
    /// with '/', with no empty segments.
    pub fn matches(&self, method: &http::Method, path: &str) -> bool {
        if let Some(m) = &self.method {
            if m != method {
                return false;
            }
        }
        // The path's segments, as `split('/')` yields them; `None` once all are taken. A
        // literal is compared in place (no search for the next '/').
        let mut rest = Some(path.strip_prefix('/').unwrap_or(path).as_bytes());
        for segment in &self.segments {
            let Some(here) = rest else {
                return matches!(segment, Segment::Rest);
            };
            match segment {
                Segment::Rest => return true,
                Segment::One => {
                    rest = here.iter().position(|&b| b == b'/').map(|i| &here[i + 1..]);
                }
                Segment::Literal(lit) => {
                    let lit = lit.as_bytes();
                    if !here.starts_with(lit) {
                        return false;
                    }
                    rest = match here.get(lit.len()) {
                        None => None,
                        Some(b'/') => Some(&here[lit.len() + 1..]),
                        Some(_) => return false,
                    };
                }
            }
        }
        rest.is_none()
    }
}

impl EndpointPattern {
    /// The method the pattern names (`None`: any).
    pub fn method(&self) -> Option<&http::Method> {
        self.method.as_ref()
    }

    /// The path part, as written (`/v1/x/*`).
    pub fn path_pattern(&self) -> String {
        let mut p = self.clone();
        p.method = None;
        p.to_string()
    }

    /// The one path a pattern without wildcards matches.
    pub fn concrete_path(&self) -> Option<String> {
        self.fill(|_| None)
    }

    /// The path segment under the pattern's first `*`, when `path` matches it (any
    /// method).
    pub fn first_wildcard<'p>(&self, path: &'p str) -> Option<&'p str> {
        let at = self.segments.iter().position(|s| *s == Segment::One)?;
        let method = self.method.clone().unwrap_or(http::Method::GET);
        if !self.matches(&method, path) {
            return None;
        }
        path.strip_prefix('/')?.split('/').nth(at)
    }

    /// The concrete path of a pattern of literals and `*`s: each `*` replaced by the
    /// segment `value` gives for its index (`None` for a pattern with `**`, or a value that
    /// is not one plain segment).
    pub fn fill<'v>(&self, mut value: impl FnMut(usize) -> Option<&'v str>) -> Option<String> {
        let mut out = String::new();
        for (i, segment) in self.segments.iter().enumerate() {
            out.push('/');
            match segment {
                Segment::Literal(l) => out.push_str(l),
                Segment::One => {
                    let v = value(i)?;
                    if v.is_empty() || v.contains(['/', '?', '#', '%']) || v == "." || v == ".." {
                        return None;
                    }
                    out.push_str(v);
                }
                Segment::Rest => return None,
            }
        }
        Some(out)
    }
}

impl fmt::Display for EndpointPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(m) = &self.method {
            write!(f, "{m} ")?;
        }
        for s in &self.segments {
            match s {
                Segment::Literal(l) => write!(f, "/{l}")?,
                Segment::One => f.write_str("/*")?,
                Segment::Rest => f.write_str("/**")?,
            }
        }
        Ok(())
    }
}

/// Longest pattern accepted at issuance: every pattern travels in the token, which goes
/// in a request header of every call.
pub const MAX_ISSUED_PATTERN_BYTES: usize = 256;

/// Why `POST /v1/keys` refuses a pattern.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotIssuable {
    #[error(transparent)]
    Invalid(#[from] PatternError),
    #[error("longer than {MAX_ISSUED_PATTERN_BYTES} bytes")]
    TooLong,
    #[error(
        "non-ASCII characters never match: canonical paths keep them percent-encoded, \
         and '%' is not allowed in a pattern"
    )]
    NonAscii,
    #[error("'*' matches a whole segment only ('/v1/payment_intents/*'), not part of one")]
    PartialWildcard,
    #[error("'#' never reaches a server: a fragment is not part of a request's path")]
    Fragment,
}

/// A pattern a new key may carry. Stricter than `EndpointPattern::parse`, which keeps
/// accepting these in tokens already issued: the refused ones parse but could never
/// match a canonical path, so the caller surely meant something else.
pub fn check_issuable(text: &str) -> Result<(), NotIssuable> {
    EndpointPattern::parse(text)?;
    if text.len() > MAX_ISSUED_PATTERN_BYTES {
        Err(NotIssuable::TooLong)
    } else if !text.is_ascii() {
        Err(NotIssuable::NonAscii)
    } else if text.contains('#') {
        Err(NotIssuable::Fragment)
    } else if text
        .split('/')
        .any(|seg| seg.contains('*') && seg != "*" && seg != "**")
    {
        Err(NotIssuable::PartialWildcard)
    } else {
        Ok(())
    }
}

/// The compiled allowlist of one vault key.
#[derive(Clone, Debug, Default)]
pub struct Allowlist(Vec<EndpointPattern>);

impl Allowlist {
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PatternError> {
        if patterns.is_empty() {
            return Err(PatternError::Empty);
        }
        patterns
            .iter()
            .map(|p| EndpointPattern::parse(p.as_ref()))
            .collect::<Result<_, _>>()
            .map(Allowlist)
    }

    pub fn allows(&self, method: &http::Method, path: &str) -> bool {
        self.0.iter().any(|p| p.matches(method, path))
    }

    /// Does any pattern match the path, whatever its method? Tells "wrong method" apart
    /// from "wrong path" in the denial message.
    pub fn allows_path_any_method(&self, path: &str) -> bool {
        self.0.iter().any(|p| {
            p.matches(&http::Method::GET, path)
                || p.method.as_ref().is_some_and(|m| p.matches(m, path))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn issuance_refuses_patterns_that_parse_but_never_match() {
        assert_eq!(check_issuable("POST /v1/payment_intents/*/confirm"), Ok(()));
        assert_eq!(check_issuable("/v1/**"), Ok(()));
        for (text, why) in [
            ("/v1/pay*", NotIssuable::PartialWildcard),
            ("/v1/caf\u{e9}", NotIssuable::NonAscii),
            ("GET /v1/x#y", NotIssuable::Fragment),
            ("/v1/a/..", NotIssuable::Invalid(PatternError::DotSegment)),
        ] {
            assert!(EndpointPattern::parse(text).is_ok() || matches!(why, NotIssuable::Invalid(_)));
            assert_eq!(check_issuable(text), Err(why), "{text}");
        }
        let long = format!("/{}", "a".repeat(MAX_ISSUED_PATTERN_BYTES));
        assert!(EndpointPattern::parse(&long).is_ok());
        assert_eq!(check_issuable(&long), Err(NotIssuable::TooLong));
    }

    fn allows(pattern: &str, method: Method, path: &str) -> bool {
        EndpointPattern::parse(pattern)
            .unwrap()
            .matches(&method, path)
    }

    #[test]
    fn spec_examples() {
        assert!(allows(
            "/v1/payment_intents",
            Method::POST,
            "/v1/payment_intents"
        ));
        assert!(allows(
            "/v1/payment_intents",
            Method::GET,
            "/v1/payment_intents"
        ));
        assert!(!allows(
            "/v1/payment_intents",
            Method::GET,
            "/v1/payment_intents/pi_1"
        ));
        assert!(allows(
            "/v1/payment_intents/*",
            Method::GET,
            "/v1/payment_intents/pi_123"
        ));
        assert!(!allows(
            "/v1/payment_intents/*",
            Method::POST,
            "/v1/payment_intents/pi_123/confirm"
        ));
        assert!(!allows(
            "/v1/payment_intents/*",
            Method::GET,
            "/v1/payment_intents"
        ));
        assert!(allows(
            "POST /v1/payment_intents",
            Method::POST,
            "/v1/payment_intents"
        ));
        assert!(!allows(
            "POST /v1/payment_intents",
            Method::GET,
            "/v1/payment_intents"
        ));
        assert!(allows("/v1/**", Method::GET, "/v1"));
        assert!(allows("/v1/**", Method::GET, "/v1/a/b/c"));
        assert!(!allows("/v1/**", Method::GET, "/v2/a"));
        assert!(!allows("/v1/charges", Method::GET, "/v1/charges_extra"));
    }

    /// The matcher, written the obvious way (split on '/'), to compare against.
    fn matches_by_split(p: &EndpointPattern, method: &Method, path: &str) -> bool {
        if p.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
        for segment in &p.segments {
            match segment {
                Segment::Rest => return true,
                Segment::One if parts.next().is_none() => return false,
                Segment::One => {}
                Segment::Literal(lit) if parts.next() != Some(&**lit) => return false,
                Segment::Literal(_) => {}
            }
        }
        parts.next().is_none()
    }

    #[test]
    fn matching_agrees_with_a_split_on_every_path_of_a_small_alphabet() {
        let patterns = [
            "/a",
            "/ab",
            "/a/b",
            "/a/*",
            "/*",
            "/*/b",
            "/a/**",
            "/**",
            "/*/**",
            "/a/*/b",
            "/ab/*/**",
            "POST /a/*",
            "/b/a",
        ];
        // Every path of up to 5 characters over 'a', 'b', '/', after a leading '/'.
        let mut paths = vec![String::from("/")];
        let mut frontier = paths.clone();
        for _ in 0..5 {
            frontier = frontier
                .iter()
                .flat_map(|p| ["a", "b", "/"].map(|c| format!("{p}{c}")))
                .collect();
            paths.extend(frontier.iter().cloned());
        }
        for pattern in patterns {
            let p = EndpointPattern::parse(pattern).unwrap();
            for path in &paths {
                for method in [Method::GET, Method::POST] {
                    assert_eq!(
                        p.matches(&method, path),
                        matches_by_split(&p, &method, path),
                        "{pattern} against {method} {path}"
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_malformed_patterns() {
        assert_eq!(EndpointPattern::parse(""), Err(PatternError::Empty));
        assert_eq!(
            EndpointPattern::parse("v1/x"),
            Err(PatternError::NoLeadingSlash)
        );
        assert_eq!(
            EndpointPattern::parse("/v1/**/x"),
            Err(PatternError::RestNotLast)
        );
        assert_eq!(
            EndpointPattern::parse("/v1//x"),
            Err(PatternError::EmptySegment)
        );
        assert_eq!(
            EndpointPattern::parse("/v1/../x"),
            Err(PatternError::DotSegment)
        );
        assert_eq!(
            EndpointPattern::parse("FETCH /v1"),
            Err(PatternError::BadMethod("FETCH".into()))
        );
        assert!(Allowlist::parse::<&str>(&[]).is_err());
    }

    #[test]
    fn the_object_id_and_lookup_paths_come_from_the_wildcards() {
        let p = EndpointPattern::parse("POST /v1/payment_intents/*/confirm").unwrap();
        assert_eq!(
            p.first_wildcard("/v1/payment_intents/pi_1/confirm"),
            Some("pi_1")
        );
        // The id, not any other segment that happens to name an object.
        assert_eq!(
            p.first_wildcard("/v1/payment_intents/confirm/confirm"),
            Some("confirm")
        );
        assert_eq!(p.first_wildcard("/v1/payment_intents/pi_1/capture"), None);
        let lookup = EndpointPattern::parse("/v1/payment_intents/*").unwrap();
        let segments = ["v1", "payment_intents", "pi_1", "confirm"];
        assert_eq!(
            lookup.fill(|i| segments.get(i).copied()).as_deref(),
            Some("/v1/payment_intents/pi_1")
        );
        for bad in ["", "a/b", "..", "a?b", "a%2Fb"] {
            assert_eq!(lookup.fill(|_| Some(bad)), None, "{bad}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn pattern() -> impl Strategy<Value = String> {
            let segment = prop_oneof![Just("a"), Just("b"), Just("ab"), Just("*")];
            (
                prop::option::of(prop_oneof![Just("GET "), Just("POST ")]),
                prop::collection::vec(segment, 1..4),
                any::<bool>(),
            )
                .prop_map(|(method, segments, rest)| {
                    let mut p = method.unwrap_or("").to_string();
                    for s in segments {
                        p.push('/');
                        p.push_str(s);
                    }
                    if rest {
                        p.push_str("/**");
                    }
                    p
                })
        }

        proptest! {
            /// Model: split the path on '/' and compare segment by segment.
            #[test]
            fn matching_agrees_with_splitting(
                pattern in pattern(),
                path in "(/(a|b|ab|c)){0,5}",
                post in any::<bool>(),
            ) {
                let p = EndpointPattern::parse(&pattern).unwrap();
                let method = if post { Method::POST } else { Method::GET };
                let path = if path.is_empty() { "/".to_string() } else { path };
                prop_assert_eq!(p.matches(&method, &path), matches_by_split(&p, &method, &path));
                if let Some(id) = p.first_wildcard(&path) {
                    let at = p.segments.iter().position(|s| *s == Segment::One).unwrap();
                    prop_assert_eq!(Some(id), path[1..].split('/').nth(at));
                }
            }

            /// Parsing never panics; what parses prints back as itself.
            #[test]
            fn parsing_round_trips(text in "(GET |POST |FETCH )?(/[a-z*.%]{0,3}){0,4}") {
                if let Ok(p) = EndpointPattern::parse(&text) {
                    prop_assert_eq!(p.to_string(), text.trim());
                }
            }
        }
    }
}
