//! Stage 11: what happened, told three ways: the audit event (tenant-visible, through
//! the control plane's batched writer), one JSON access-log line (operators, journald)
//! and Prometheus counters. Nothing here ever holds a token or a secret.

use crate::config::AccessLog;
use crate::money::Micros;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// One line of the access log.
#[derive(serde::Serialize)]
pub struct AccessLine<'a> {
    pub ts: String,
    pub key_id: Option<&'a str>,
    pub label: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub vendor: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub decision: &'a str,
    pub spend_usd: f64,
    pub duration_ms: f64,
    pub vendor_request_id: Option<&'a str>,
}

/// Access-log lines are appended to a shared buffer that one writer thread swaps out and
/// writes every 20 ms: a request pays a short lock and a push, never a wake-up or a write;
/// a slow stdout or disk never stalls it. Past 65,536 pending lines, lines are dropped.
pub struct AccessLogWriter {
    pending: Arc<Mutex<Vec<String>>>,
}

const MAX_PENDING: usize = 65_536;

impl AccessLogWriter {
    pub fn start(target: &AccessLog) -> std::io::Result<Option<AccessLogWriter>> {
        let mut out: Box<dyn Write + Send> = match target {
            AccessLog::Off => return Ok(None),
            AccessLog::Stdout => Box::new(std::io::stdout()),
            AccessLog::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let pending: Arc<Mutex<Vec<String>>> = Default::default();
        let shared = pending.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut buffered = std::io::BufWriter::with_capacity(1 << 16, &mut out);
                let mut spare = Vec::new();
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    std::mem::swap(
                        &mut *shared.lock().unwrap_or_else(|p| p.into_inner()),
                        &mut spare,
                    );
                    if spare.is_empty() {
                        continue;
                    }
                    for line in spare.drain(..) {
                        let _ = buffered.write_all(line.as_bytes());
                        let _ = buffered.write_all(b"\n");
                    }
                    let _ = buffered.flush();
                }
            })?;
        Ok(Some(AccessLogWriter { pending }))
    }

    pub fn write(&self, line: &AccessLine<'_>) {
        if let Ok(text) = serde_json::to_string(line) {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.len() < MAX_PENDING {
                pending.push(text);
            } else {
                drop(pending);
                log::warn!("access log backlog full; a line was dropped");
            }
        }
    }
}

pub fn rfc3339(at: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn usd(m: Micros) -> f64 {
    m.as_usd_f64()
}
