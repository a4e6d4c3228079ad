//! Stage 11: what happened, told three ways: the audit event (tenant-visible, through
//! the control plane's batched writer), one JSON access-log line (operators, journald)
//! and Prometheus counters. Nothing here ever holds a token or a secret.

use crate::config::AccessLog;
use crate::money::Micros;
use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

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

/// Access-log lines go through a bounded queue to one writer thread, so a slow stdout or
/// disk never stalls a request; a full queue drops lines (and says so once in a while).
pub struct AccessLogWriter {
    tx: SyncSender<String>,
}

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
        let (tx, rx) = sync_channel::<String>(16_384);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut buffered = std::io::BufWriter::new(&mut out);
                while let Ok(line) = rx.recv() {
                    let _ = writeln!(buffered, "{line}");
                    while let Ok(line) = rx.try_recv() {
                        let _ = writeln!(buffered, "{line}");
                    }
                    let _ = buffered.flush();
                }
            })?;
        Ok(Some(AccessLogWriter { tx }))
    }

    pub fn write(&self, line: &AccessLine<'_>) {
        if let Ok(text) = serde_json::to_string(line) {
            if let Err(TrySendError::Full(_)) = self.tx.try_send(text) {
                log::warn!("access log queue full; a line was dropped");
            }
        }
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn usd(m: Micros) -> f64 {
    m.as_usd_f64()
}
