//! Stage 11, record: what happened, told three ways (`KeybrakeProxy::record`): the audit
//! event (tenant-visible, built by `audit::event`, through the control plane's batched
//! writer), one JSON access-log line (operators, journald; `AccessLogWriter`) and
//! Prometheus counters. Nothing here ever holds a token or a secret; `summary` names a
//! request in Pingora's own error lines the same way the access log does.

use crate::config::AccessLog;
use crate::money::Micros;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One line of the access log.
pub struct AccessLine<'a> {
    pub ts: std::time::SystemTime,
    pub key_id: Option<&'a str>,
    pub label: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub vendor: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub decision: &'a str,
    pub spend: Micros,
    pub duration: std::time::Duration,
    pub vendor_request_id: Option<&'a str>,
}

/// Access-log lines are written straight into one shared text buffer, which a writer
/// thread swaps out and writes every 20 ms: a request pays a short lock and the
/// formatting, never an allocation, a wake-up or a write; a slow stdout or disk never
/// stalls it. Past 16 MiB pending, lines are dropped (and counted in the error log).
pub struct AccessLogWriter {
    pending: Arc<Mutex<String>>,
}

const MAX_PENDING_BYTES: usize = 16 << 20;

/// Set by SIGHUP: the access-log thread reopens its file (log rotation).
static HANGUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_hangup(_: libc::c_int) {
    HANGUP.store(true, Ordering::Relaxed);
}

/// SIGHUP no longer ends the process (its default action): it asks for the access log
/// file to be reopened, as log rotation expects (`postrotate … kill -HUP`). Nothing else
/// is reloaded. Called at start, before a `--daemon` fork (the child inherits it).
pub fn reopen_access_log_on_hangup() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
    // struct is zeroed (a valid empty `sigaction`) before its fields are set.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_hangup as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGHUP, &action, std::ptr::null_mut());
    }
}

fn open_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl AccessLogWriter {
    pub fn start(target: &AccessLog) -> std::io::Result<Option<AccessLogWriter>> {
        let mut out: Box<dyn Write + Send> = match target {
            AccessLog::Off => return Ok(None),
            AccessLog::Stdout => Box::new(std::io::stdout()),
            AccessLog::Stderr => Box::new(std::io::stderr()),
            AccessLog::File(path) => Box::new(open_append(path)?),
        };
        let file = match target {
            AccessLog::File(path) => Some(path.clone()),
            _ => None,
        };
        let pending = Arc::new(Mutex::new(String::with_capacity(1 << 16)));
        let shared = pending.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut spare = String::with_capacity(1 << 16);
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    if HANGUP.swap(false, Ordering::Relaxed) {
                        match &file {
                            // What is pending goes to the new file.
                            Some(path) => match open_append(path) {
                                Ok(f) => {
                                    let _ = out.flush();
                                    out = Box::new(f);
                                    log::info!("SIGHUP: access log {} reopened", path.display());
                                }
                                Err(e) => log::error!(
                                    "SIGHUP: cannot reopen the access log {} (still writing to \
                                     the old file): {e}",
                                    path.display()
                                ),
                            },
                            None => log::info!(
                                "SIGHUP: the access log is not a file; nothing to reopen"
                            ),
                        }
                    }
                    std::mem::swap(
                        &mut *shared.lock().unwrap_or_else(|p| p.into_inner()),
                        &mut spare,
                    );
                    if spare.is_empty() {
                        continue;
                    }
                    let _ = out.write_all(spare.as_bytes());
                    let _ = out.flush();
                    spare.clear();
                    spare.shrink_to(1 << 16);
                }
            })?;
        Ok(Some(AccessLogWriter { pending }))
    }

    pub fn write(&self, line: &AccessLine<'_>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() < MAX_PENDING_BYTES {
            line.write_json(&mut pending);
            pending.push('\n');
        } else {
            drop(pending);
            log::warn!("access log backlog full; a line was dropped");
        }
    }
}

impl AccessLine<'_> {
    /// Appends the line as one JSON object. Written by hand (fixed fields, strings escaped
    /// here, numbers without the formatting machinery): it runs for every request.
    pub fn write_json(&self, out: &mut String) {
        out.push_str("{\"ts\":\"");
        push_rfc3339_micros(out, self.ts);
        out.push('"');
        for (name, value) in [
            (",\"key_id\":", self.key_id),
            (",\"label\":", self.label),
            (",\"tenant\":", self.tenant),
            (",\"vendor\":", Some(self.vendor)),
            (",\"method\":", Some(self.method)),
            (",\"path\":", Some(self.path)),
        ] {
            out.push_str(name);
            json_opt_str(out, value);
        }
        out.push_str(",\"status\":");
        push_u64(out, u64::from(self.status));
        out.push_str(",\"decision\":");
        json_str(out, self.decision);
        out.push_str(",\"spend_usd\":");
        push_decimal(out, self.spend.0, 1_000_000);
        out.push_str(",\"duration_ms\":");
        let micros = i64::try_from(self.duration.as_micros()).unwrap_or(i64::MAX);
        push_decimal(out, micros, 1_000);
        out.push_str(",\"vendor_request_id\":");
        json_opt_str(out, self.vendor_request_id);
        out.push('}');
    }
}

fn json_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
}

/// Bytes that JSON strings escape: control characters, `"` and `\`.
static ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Does `s` hold a byte that JSON escapes? Eight bytes at a time: a byte below 0x20, or
/// equal to `"` or `\`, leaves its high bit set in the classic "has a zero byte" test
/// (which has no false answer for the word as a whole).
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS != 0;
    let mut words = s.chunks_exact(8);
    for word in &mut words {
        let x = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        // Below 0x20: such a byte minus 0x20 wraps to a value with its high bit set; `& !x`
        // drops bytes that had it set already (0x80 and up).
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS != 0;
        if control
            || has_zero(x ^ (ONES * u64::from(b'"')))
            || has_zero(x ^ (ONES * u64::from(b'\\')))
        {
            return true;
        }
    }
    words.remainder().iter().any(|&b| ESCAPED[usize::from(b)])
}

/// Appends `s` as a JSON string: quotes, backslashes and control characters escaped.
fn json_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    if !needs_escape(s.as_bytes()) {
        out.push_str(s);
    } else {
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => {
                    out.push_str("\\u00");
                    out.push(char::from(b"0123456789abcdef"[(c as usize) >> 4]));
                    out.push(char::from(b"0123456789abcdef"[(c as usize) & 15]));
                }
                c => out.push(c),
            }
        }
    }
    out.push('"');
}

fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[i..]).unwrap_or("0"));
}

/// `value / scale` as an exact JSON number, always with a fraction (log pipelines that
/// guess a field's type from its first value then see a float): with scale 1,000,000,
/// 1500000 is `1.5`, 1 is `0.000001`, 0 is `0.0`. `scale` is a power of ten.
fn push_decimal(out: &mut String, value: i64, scale: u64) {
    if value < 0 {
        out.push('-');
    }
    let abs = value.unsigned_abs();
    push_u64(out, abs / scale);
    let mut frac = abs % scale;
    if frac == 0 {
        out.push_str(".0");
        return;
    }
    out.push('.');
    let mut unit = scale / 10;
    while frac > 0 {
        out.push(char::from(b'0' + (frac / unit) as u8));
        frac %= unit;
        unit /= 10;
    }
}

/// Appends `at` as RFC 3339 UTC with microseconds (`2023-11-14T22:13:20.123000Z`), by
/// hand: the general formatter cost more than the rest of the line.
fn push_rfc3339_micros(out: &mut String, at: std::time::SystemTime) {
    let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, in_day) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's days_to_civil, for days >= 0).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut digits = |value: u64, width: u32, sep: char| {
        let mut div = 10u64.pow(width - 1);
        while div > 0 {
            out.push(char::from(b'0' + (value / div % 10) as u8));
            div /= 10;
        }
        out.push(sep);
    };
    digits(year, 4, '-');
    digits(month, 2, '-');
    digits(day, 2, 'T');
    digits(in_day / 3_600, 2, ':');
    digits(in_day / 60 % 60, 2, ':');
    digits(in_day % 60, 2, '.');
    digits(u64::from(since_epoch.subsec_micros()), 6, 'Z');
}

/// How Pingora's error lines (`Fail to proxy: …`) name a request: its method and
/// canonical path, as in the access log. Pingora's default prints the raw URI with its
/// query string and the `Host`, and a query string may carry a token
/// (`?access_token=…`); a token in the path is redacted. `-` when the path was not
/// canonical (nothing was forwarded).
pub fn summary(method: &str, canonical: &str) -> String {
    let path = super::path::without_tokens(canonical);
    let path = if path.is_empty() { "-" } else { &path };
    format!("{method} {path}")
}

impl super::service::KeybrakeProxy {
    /// Tells what happened to the request `ctx` describes, once it is settled: the
    /// latency histograms, the request counter, the access-log line and (unless strict
    /// audit recorded it already) the audit event.
    pub(super) fn record(
        &self,
        session: &pingora::proxy::Session,
        ctx: &super::ctx::Ctx,
        llm: Option<crate::sync::LlmAudit>,
    ) {
        let total = ctx.start.elapsed();
        let upstream = ctx
            .upstream_elapsed
            .or_else(|| ctx.upstream_start.map(|s| s.elapsed()));
        if let Some(u) = upstream {
            self.metrics.upstream_duration.observe(u.as_secs_f64());
        }
        self.metrics.overhead.observe(
            total
                .saturating_sub(upstream.unwrap_or_default())
                .as_secs_f64(),
        );
        let vendor = ctx.vendor_label();
        self.request_counters
            .inc(ctx.vendor.is_some().then_some(vendor), ctx.denial);
        let wall = std::time::SystemTime::now();
        if let Some(log) = &self.access_log {
            let key = ctx.key.as_ref().map(|k| &k.claims);
            log.write(&AccessLine {
                ts: wall,
                key_id: key.map(|c| c.jti.as_str()),
                label: key.map(|c| c.lbl.as_str()),
                tenant: key.map(|c| c.ten.as_str()),
                vendor,
                method: session.req_header().method.as_str(),
                path: &super::path::without_tokens(&ctx.canonical),
                status: super::audit::final_status(session, ctx),
                decision: ctx.denial.map_or("allowed", super::deny::Denial::code),
                spend: ctx.spend,
                duration: total,
                vendor_request_id: ctx.vendor_request_id.as_deref(),
            });
        }
        if !ctx.audited {
            let event = super::audit::event(session, ctx, wall, ctx.spend, llm);
            self.audit.record(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_summary_is_the_method_and_canonical_path_only() {
        assert_eq!(summary("GET", "/generic/v1/x"), "GET /generic/v1/x");
        assert_eq!(summary("POST", ""), "POST -");
    }

    #[test]
    fn the_word_at_a_time_escape_test_agrees_with_the_table() {
        // Every byte value at every position of strings of 1 to 17 bytes, in a background
        // of each "near miss" byte (just above or below the ones that need escaping).
        for len in 1..=17 {
            for background in [b'a', b' ', b'!', b'#', b'[', b']', 0x7f, 0x80, 0xff] {
                for at in 0..len {
                    for b in 0..=255u8 {
                        let mut s = vec![background; len];
                        s[at] = b;
                        let want = s.iter().any(|&c| ESCAPED[usize::from(c)]);
                        assert_eq!(needs_escape(&s), want, "{s:?}");
                    }
                }
            }
        }
        assert!(!needs_escape(b""));
    }

    #[test]
    fn access_line_is_json_with_every_field_and_escapes() {
        let line = AccessLine {
            ts: std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            key_id: Some("key_1"),
            label: Some("say \"hi\"\\ \n\u{1}é"),
            tenant: None,
            vendor: "stripe",
            method: "POST",
            path: "/stripe/v1/payment_intents",
            status: 200,
            decision: "allowed",
            spend: Micros(1_500_000),
            duration: std::time::Duration::from_micros(250),
            vendor_request_id: Some("req_1"),
        };
        let v: serde_json::Value = {
            let mut text = String::new();
            line.write_json(&mut text);
            serde_json::from_str(&text).unwrap()
        };
        assert_eq!(v["ts"], "2023-11-14T22:13:20.123000Z");
        // The hand-written date agrees with the `time` crate's across leap years and
        // century rules.
        for secs in [
            0u64,
            951_782_400,
            4_107_542_399,
            1_709_164_800,
            253_402_300_799,
        ] {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(secs * 1_000_000 + 7);
            let mut ours = String::new();
            push_rfc3339_micros(&mut ours, at);
            let theirs = time::OffsetDateTime::from(at)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            assert_eq!(ours, theirs, "{secs}");
        }
        assert_eq!(v["key_id"], "key_1");
        assert_eq!(v["label"], "say \"hi\"\\ \n\u{1}é");
        assert!(v["tenant"].is_null());
        assert_eq!(v["vendor"], "stripe");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/stripe/v1/payment_intents");
        assert_eq!(v["status"], 200);
        assert_eq!(v["decision"], "allowed");
        assert_eq!(v["spend_usd"], 1.5);
        assert_eq!(v["duration_ms"], 0.25);
        assert_eq!(v["vendor_request_id"], "req_1");
        assert_eq!(v.as_object().unwrap().len(), 12);
        let decimal = |v, scale| {
            let mut s = String::new();
            push_decimal(&mut s, v, scale);
            s
        };
        assert_eq!(decimal(0, 1_000_000), "0.0");
        assert_eq!(decimal(1, 1_000_000), "0.000001");
        assert_eq!(decimal(1_050_000, 1_000_000), "1.05");
        assert_eq!(decimal(-2_000_000, 1_000_000), "-2.0");
        assert_eq!(decimal(12_345, 1_000), "12.345");
    }
}
