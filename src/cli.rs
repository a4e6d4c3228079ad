//! The `keybrake` client commands: the control API without hand-written curl. Each talks
//! HTTP to `--control-url` with the token from `KEYBRAKE_TOKEN` (admin commands: from
//! `KEYBRAKE_ADMIN_TOKEN`), prints a short human answer or `--json`, and fails with
//! one clear line and a non-zero exit.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    /// `ca_file`: a private CA trusted for an `https://` control URL, besides the system's
    /// roots; the certificate and its host name are always verified.
    /// `admin_token_file`: where an admin command reads the admin token, instead of
    /// `KEYBRAKE_ADMIN_TOKEN`.
    pub fn new(
        control_url: &str,
        admin: bool,
        token_file: Option<&Path>,
        ca_file: Option<&Path>,
    ) -> Result<Client> {
        let whose = if admin { "admin" } else { "tenant API" };
        let token = match token_file {
            Some(file) => {
                let token = std::fs::read_to_string(file).with_context(|| {
                    format!("cannot read the {whose} token file {}", file.display())
                })?;
                warn_if_others_can_read(file, &format!("the {whose} token file"));
                token
            }
            // Never KEYBRAKE_TOKEN: that is the tenant's, and an admin call with it would
            // only say "invalid_token" while the cause is the variable not set.
            None if admin => std::env::var("KEYBRAKE_ADMIN_TOKEN").map_err(|_| {
                anyhow!(
                    "set KEYBRAKE_ADMIN_TOKEN to the admin token, or give --admin-token-file \
                     (serve writes it to DATA_DIR/admin.token on first start)"
                )
            })?,
            None => std::env::var("KEYBRAKE_TOKEN").map_err(|_| {
                anyhow!("set KEYBRAKE_TOKEN to a tenant API token (kb_…), or give --token-file")
            })?,
        };
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            bail!(
                "the {whose} token is empty or has characters no token has (spaces, non-ASCII \
                 such as `…`): give the whole token as it was printed"
            );
        }
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        crate::tls::check_control_url(control_url, &format!("the {whose} token"))?;
        if control_url.starts_with("https://") {
            agent = agent.tls_config(crate::tls::client_config(ca_file)?);
        } else if ca_file.is_some() {
            bail!("--ca-file is for an https:// control URL; {control_url} is plain HTTP");
        }
        let agent = agent.build();
        Ok(Client {
            base: control_url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            agent,
        })
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut retries = 0;
        let result = loop {
            let req = self
                .agent
                .request(method, &url)
                .set("authorization", &format!("Bearer {}", self.token));
            let result = match &body {
                Some(b) => req.send_json(b.clone()),
                None => req.call(),
            };
            // A listing refused for now (429: the tenant's listings are being built
            // already): a read, so asked again, a few times, after the second it says.
            if method == "GET" && retries < 5 && matches!(&result, Err(ureq::Error::Status(429, _)))
            {
                retries += 1;
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
            break result;
        };
        match result {
            Ok(resp) => resp
                .into_json()
                .context("the control API answered with something that is not JSON"),
            Err(ureq::Error::Status(status, resp)) => {
                let body: Value = resp.into_json().unwrap_or(Value::Null);
                // The control API's errors are `{"error":{"code",…}}` and nothing else; a
                // top-level `code` is the proxy's denial, no JSON the metrics listener.
                if body.get("code").is_some() || body["error"]["code"].as_str().is_none() {
                    bail!(
                        "{status} from {}: not Keybrake's control API (is --control-url the \
                         proxy's or the metrics listener's address?)",
                        self.base
                    );
                }
                let code = body["error"]["code"].as_str().unwrap_or("error");
                let message = body["error"]["message"].as_str().unwrap_or("");
                bail!("{status} {code}: {message}")
            }
            Err(e) => {
                let hint = crate::tls::connect_hint(&self.base, &e.to_string());
                bail!("cannot reach the control API at {}: {e}{hint}", self.base)
            }
        }
    }
}

pub fn print(value: &Value, json_out: bool, human: impl FnOnce(&Value) -> String) {
    if json_out {
        println!(
            "{}",
            crate::money::plain_numbers(serde_json::to_string_pretty(value).unwrap_or_default())
        );
    } else {
        // An empty list prints nothing, not an empty line.
        let text = human(value);
        if !text.is_empty() {
            println!("{text}");
        }
    }
}

/// An answer that creates something holding a secret shown once: `{what} {id}` then
/// `{secret_name} (shown once): {value of field}`.
pub fn print_created(value: &Value, json_out: bool, what: &str, field: &str, secret_name: &str) {
    print(value, json_out, |v| {
        format!(
            "{what} {}\n{secret_name} (shown once): {}",
            v["id"].as_str().unwrap_or("?"),
            v[field].as_str().unwrap_or("?")
        )
    });
}

/// A page of a list: a line per item; on stderr, "none found" for an empty page (an
/// unknown or other tenant's key id lists nothing too), and how to get more.
pub fn print_page(list: &Value, json_out: bool, line: fn(&Value) -> String) {
    print(list, json_out, |l| data_lines(l, line));
    let empty = list["data"].as_array().is_none_or(|d| d.is_empty());
    if !json_out && empty {
        eprintln!("none found");
    }
    if let (false, Some(cursor)) = (json_out, list["next_cursor"].as_str()) {
        eprintln!("more: --cursor {cursor}");
    }
}

/// One line per item of a list answer's `data`.
pub fn data_lines(list: &Value, line: fn(&Value) -> String) -> String {
    list["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(line)
        .collect::<Vec<_>>()
        .join("\n")
}

/// An id or vendor name given on the command line, checked before it becomes a segment
/// of a control API path: letters, digits, `_` and `-` only, so that an argument such as
/// `../vendors/stripe/credential` can never address another object (the HTTP client
/// would resolve the `..` before sending).
pub fn segment(s: &str) -> Result<&str> {
    if s.is_empty()
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        bail!(
            "{:?} is not an id or a vendor name (those are letters, digits, `_` and `-`)",
            s
        );
    }
    Ok(s)
}

/// `path?k=v&…` with the values percent-encoded (an RFC 3339 `+01:00` stays a `+`).
pub fn with_query(path: &str, params: &[(&str, Option<String>)]) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        if let Some(v) = v {
            query.append_pair(k, v);
        }
    }
    format!("{path}?{}", query.finish())
}

pub fn read_secret_file(path: &Path) -> Result<String> {
    let text = if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        warn_if_others_can_read(path, "the secret file");
        text
    };
    let secret = text.trim().to_string();
    if secret.is_empty() {
        bail!("{} is empty", path.display());
    }
    if secret.starts_with("vk_") {
        bail!(
            "{} holds a Keybrake vault key (vk_…): give the vendor's own secret",
            path.display()
        );
    }
    Ok(secret)
}

/// A warning on stderr when group or others may read a file of secrets.
fn warn_if_others_can_read(path: &Path, what: &str) {
    if let Some(mode) = crate::secret::mode_open_to_others(path) {
        eprintln!(
            "keybrake: warning: {what} {} has mode {mode:03o}: other users can read it; \
             chmod go-rwx",
            path.display()
        );
    }
}

/// A USD amount of an answer as `$12.5`, `$0.000008` (exact: micro-dollars), `-` if absent.
fn usd(v: &Value) -> String {
    match v.as_number() {
        None => "-".to_string(),
        // Beyond what micro-dollars hold exactly (over $1B): the number as sent.
        Some(n) => crate::money::Micros::parse_usd(&n.to_string())
            .map_or_else(|_| format!("${n}"), |m| m.to_string()),
    }
}

pub fn key_line(k: &Value) -> String {
    format!(
        "{}  {:<8}  {:<10}  spent {} (held {}) of {}  expires {}  {}",
        k["id"].as_str().unwrap_or("?"),
        k["status"].as_str().unwrap_or("?"),
        k["vendor"].as_str().unwrap_or("?"),
        usd(&k["spent_today_usd"]),
        usd(&k["held_usd"]),
        usd(&k["daily_usd_cap"]),
        k["expires_at"].as_str().unwrap_or("?"),
        k["label"].as_str().unwrap_or(""),
    )
}

pub fn key_details(k: &Value) -> String {
    let endpoints: Vec<&str> = k["allowed_endpoints"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    format!(
        "id:              {}\nstatus:          {}\nvendor:          {}\nlabel:           {}\nallowed:         {}\ndaily cap:       {}\nspent today:     {} (held {})\ncreated:         {}\nexpires:         {}\nrevoked:         {}",
        k["id"].as_str().unwrap_or("?"),
        k["status"].as_str().unwrap_or("?"),
        k["vendor"].as_str().unwrap_or("?"),
        k["label"].as_str().unwrap_or(""),
        endpoints.join(", "),
        usd(&k["daily_usd_cap"]),
        usd(&k["spent_today_usd"]),
        usd(&k["held_usd"]),
        k["created_at"].as_str().unwrap_or("?"),
        k["expires_at"].as_str().unwrap_or("?"),
        k["revoked_at"].as_str().unwrap_or("-"),
    )
}

pub fn audit_line(e: &Value) -> String {
    let text =
        |field: &str, missing: &'static str| terminal_safe(e[field].as_str().unwrap_or(missing));
    format!(
        "{}  {:<6} {:<40} {:>3}  {:<22} {}  {}",
        text("ts", "?"),
        text("method", "?"),
        text("path", "?"),
        e["status"],
        text("decision", "?"),
        usd(&e["spend_usd"]),
        text("vendor_request_id", "-"),
    )
}

/// `text` with control characters (escape sequences, line breaks) and the line and
/// paragraph separators written as `\u{…}`, so what the trail says cannot move the cursor,
/// recolour the terminal or print a line of its own.
fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    use crate::proxy::audit::is_unprintable as unsafe_char;
    if !text.chars().any(unsafe_char) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if unsafe_char(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Builds the `POST /v1/keys` body from the CLI flags.
pub fn issue_body(
    vendor: &str,
    endpoints: &[String],
    cap: &str,
    ttl: Option<&str>,
    label: Option<&str>,
    accounts: &[String],
) -> Result<Value> {
    // Exact: a float would turn 0.1000000000000000001 into 0.1 before the server could
    // refuse it. Up to 6 decimals, the JSON number round-trips to the same micro-dollars.
    let micros = crate::money::Micros::parse_usd(cap.trim())
        .map_err(|e| anyhow!("--cap {cap:?} is not a number of US dollars: {e}"))?;
    let cap = json!(micros.as_usd_f64());
    let mut body = json!({"vendor": vendor, "allowed_endpoints": endpoints, "daily_usd_cap": cap});
    if let Some(ttl) = ttl {
        body["expires_in"] = json!(ttl);
    }
    if let Some(label) = label {
        body["label"] = json!(label);
    }
    if !accounts.is_empty() {
        body["stripe_accounts"] = json!(accounts);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_argument_that_is_not_an_id_never_becomes_a_path() {
        for ok in ["key_01h2x3", "tn_abc-9", "stripe", "node_Z_1"] {
            assert_eq!(segment(ok).unwrap(), ok);
        }
        for bad in [
            "",
            "..",
            ".",
            "../vendors/stripe/credential",
            "key_1/../../tenants",
            "key%2F1",
            "key_1?x=1",
            "key_1#f",
            "k ey",
            "clé",
        ] {
            assert!(segment(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn amounts_print_exactly_in_dollars() {
        let v: Value = serde_json::from_str(r#"[8e-06, 40.0, 25, 0.5, null, 2e9]"#).unwrap();
        let shown: Vec<String> = v.as_array().unwrap().iter().map(usd).collect();
        assert_eq!(
            shown,
            ["$0.000008", "$40", "$25", "$0.5", "-", "$2000000000.0"]
        );
    }

    #[test]
    fn an_audit_line_cannot_drive_the_terminal() {
        let e = json!({"ts": "2026-12-04T07:00:00Z", "method": "POST", "status": 200,
            "path": "/v1/charges\n2026-12-04 POST /v1/refunds 200 allowed",
            "decision": "allowed", "spend_usd": 1,
            "vendor_request_id": "req_\u{1b}[2J\u{2028}x"});
        let line = audit_line(&e);
        assert!(
            !line.chars().any(|c| c.is_control() || c == '\u{2028}'),
            "{line:?}"
        );
        assert!(line.contains("/v1/charges\\u{a}2026"), "{line:?}");
        assert!(line.contains("req_\\u{1b}[2J\\u{2028}x"), "{line:?}");
    }

    #[test]
    fn the_cap_flag_is_sent_exactly_or_refused() {
        let body = |cap: &str| issue_body("stripe", &["/v1/x".into()], cap, None, None, &[]);
        assert_eq!(
            body("12.000001").unwrap()["daily_usd_cap"].to_string(),
            "12.000001"
        );
        assert_eq!(body("500").unwrap()["daily_usd_cap"].to_string(), "500.0");
        assert!(body("0.1000000000000000001").is_err());
        assert!(body("abc").is_err());
    }
}
