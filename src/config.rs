//! Configuration: the YAML files of `conf/` (or the copies embedded in the binary) and the
//! command-line overrides are turned into one validated `Config` before anything starts.
//! Unknown keys, bad addresses and incomplete vendors are errors with a message naming
//! the problem (`keybrake check`). Every default lives in `config/defaults.rs`, and every
//! duration key parses through `config/duration.rs`.

use crate::money::Micros;
use crate::pattern::EndpointPattern;
use crate::Map;
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod defaults;
mod duration;
pub use duration::parse_duration;
use duration::{FineSeconds, Millis, Seconds};

/// The configuration file read when no `--config` is given, relative to the working
/// directory (the embedded defaults when it does not exist).
pub const DEFAULT_PATH: &str = "conf/keybrake.yaml";
pub const EMBEDDED_CONFIG: &str = include_str!("../conf/keybrake.yaml");
pub const EMBEDDED_VENDORS: &str = include_str!("../conf/vendors.yaml");
pub const EMBEDDED_CURRENCIES: &str = include_str!("../conf/currencies.yaml");
pub const EMBEDDED_PRICES: &str = include_str!("../conf/prices.yaml");

// ---------- the file formats ----------

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    proxy_listen: Option<String>,
    control_listen: Option<String>,
    metrics_listen: Option<String>,
    data_dir: Option<PathBuf>,
    database_url: Option<crate::database::DatabaseUrl>,
    vendors_file: Option<PathBuf>,
    currencies_file: Option<PathBuf>,
    prices_file: Option<PathBuf>,
    body_limit_bytes: Option<usize>,
    body_read_timeout_ms: Option<Millis>,
    token_cache_entries: Option<usize>,
    default_key_ttl: Option<Seconds>,
    max_key_ttl: Option<Seconds>,
    expired_key_retention: Option<Seconds>,
    access_log: Option<String>,
    llm_multi_pass_tools: Option<String>,
    #[serde(default)]
    upstream: FileUpstream,
    #[serde(default)]
    leases: FileLeases,
    #[serde(default)]
    pingora: FilePingora,
    #[serde(default)]
    audit: FileAudit,
    #[serde(default)]
    proxy: FileListener,
    #[serde(default)]
    control: FileListener,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    edge: FileEdge,
}

/// `edge:`: settings of an edge node (`keybrake proxy`).
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEdge {
    max_staleness: Option<FineSeconds>,
}

/// `proxy:` and `control:`: TLS and the limits that keep a listener available.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListener {
    tls: Option<FileTls>,
    plaintext: Option<bool>,
    header_timeout_ms: Option<Millis>,
    keepalive_timeout_ms: Option<Millis>,
    request_timeout_ms: Option<Millis>,
    write_timeout_ms: Option<Millis>,
    max_header_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    watch_interval_ms: Option<Millis>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAudit {
    durability: Option<AuditDurability>,
}

/// When an audit event is safe (docs/storage.md): `normal` writes it within ~10 ms of the
/// response, `strict` releases the response only once its event is committed and synced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditDurability {
    #[default]
    Normal,
    Strict,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    plaintext: Option<bool>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    connect_timeout_ms: Option<Millis>,
    total_connection_timeout_ms: Option<Millis>,
    read_timeout_ms: Option<Millis>,
    write_timeout_ms: Option<Millis>,
    idle_timeout_ms: Option<Millis>,
    dns_refresh_seconds: Option<Seconds>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLeases {
    slices_per_cap: Option<i64>,
    return_idle_after_seconds: Option<Seconds>,
    report_interval_ms: Option<Millis>,
    lifetime_seconds: Option<Seconds>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePingora {
    threads: Option<usize>,
    grace_period_seconds: Option<Seconds>,
    graceful_shutdown_timeout_seconds: Option<Seconds>,
    upgrade_sock: Option<String>,
    pid_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVendor {
    upstream: Option<String>,
    auth: AuthStyle,
    auth_header: Option<String>,
    #[serde(default)]
    strip_headers: Vec<String>,
    #[serde(default)]
    default_headers: BTreeMap<String, String>,
    /// Paths (patterns, any method) whose JSON bodies are converted to a form.
    #[serde(default)]
    json_to_form: JsonToForm,
    #[serde(default)]
    account_headers: Vec<String>,
    request_id_header: Option<String>,
    /// The answer header by which the vendor says it replayed an idempotent request's
    /// first answer without acting again (Stripe's `Idempotent-Replayed: true`).
    idempotent_replayed_header: Option<String>,
    #[serde(default)]
    metered: Vec<FileMeterRule>,
    /// Endpoints known not to move money (reads need no entry).
    #[serde(default)]
    free: Vec<String>,
    /// Fields that would move money the meter does not see, refused where they are named.
    #[serde(default)]
    refuse_fields: Vec<FileRefuseFields>,
    /// What a capped key may do on any other mutating endpoint.
    #[serde(default)]
    unmetered: UnmeteredPolicy,
    /// Endpoints metered by tokens (LLM vendors), priced from the price table.
    #[serde(default)]
    llm_metered: Vec<FileLlmRule>,
    cost_per_request_usd: Option<String>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRefuseFields {
    endpoint: String,
    fields: Vec<String>,
}

/// `json_to_form`: a list of path patterns, or (the earlier form, still read) a boolean:
/// `true` converts on every path.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum JsonToForm {
    All(bool),
    Paths(Vec<String>),
}

impl Default for JsonToForm {
    fn default() -> Self {
        JsonToForm::All(false)
    }
}

impl JsonToForm {
    fn paths(&self) -> Vec<String> {
        match self {
            JsonToForm::All(true) => vec!["/**".into()],
            JsonToForm::All(false) => Vec::new(),
            JsonToForm::Paths(p) => p.clone(),
        }
    }
}

/// A mutating call (POST, PUT, PATCH, DELETE) that is neither metered nor listed as free.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnmeteredPolicy {
    /// Forwarded (a vendor whose calls do not move money, or are not metered yet).
    #[default]
    Allow,
    /// 403 `endpoint_unmetered` for a capped key: the call could move money unseen.
    Refuse,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLlmRule {
    endpoint: String,
    api: crate::proxy::llm::Api,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthStyle {
    Bearer,
    Basic,
    Header,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MeterSource {
    /// `amount` + `currency` in the request body.
    Request,
    /// The 2xx response's amount; what the call can charge is looked up and reserved
    /// before forwarding (`reserve`).
    Response,
    /// Σ price × quantity over the request's `items[i][price]` / `items[i][quantity]`,
    /// each price looked up from the vendor (`reserve.lookup`) before forwarding.
    Items,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMeterRule {
    endpoint: String,
    from: MeterSource,
    #[serde(default = "default_amount_field")]
    amount_field: String,
    #[serde(default = "default_currency_field")]
    currency_field: String,
    default_currency: Option<String>,
    #[serde(default)]
    amount_fields: Vec<String>,
    #[serde(default)]
    skip_if_created_by_same_key: bool,
    reserve: Option<FileLookup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLookup {
    lookup: String,
    amount_fields: Vec<String>,
}

fn default_amount_field() -> String {
    "amount".into()
}
fn default_currency_field() -> String {
    "currency".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCurrency {
    decimals: u32,
    usd: String,
}

// ---------- the validated, internal form ----------

#[derive(Debug, Clone)]
pub struct Config {
    pub proxy_listen: SocketAddr,
    pub control_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `keybrake control` on PostgreSQL (SPEC §1); `None`: SQLite in `data_dir`.
    pub database_url: Option<crate::database::DatabaseUrl>,
    pub body_limit_bytes: usize,
    pub body_read_timeout: Duration,
    /// Bound of the verified-token cache (`proxy::verify`): entries beyond it are evicted.
    pub token_cache_entries: usize,
    /// The proxy's listener: TLS, deadlines, connection bounds.
    pub proxy: ListenerSettings,
    /// The control API's listener.
    pub control: ListenerSettings,
    pub default_key_ttl: Duration,
    pub max_key_ttl: Duration,
    /// A key's row and its ledger rows are deleted this long after it expired.
    pub expired_key_retention: Duration,
    pub access_log: AccessLog,
    pub upstream: UpstreamTimeouts,
    pub leases: LeaseSettings,
    pub audit_durability: AuditDurability,
    pub pingora: PingoraSettings,
    /// An edge node stops serving once its last sync is older than this (SPEC §6).
    pub max_staleness: Duration,
    pub vendors: Map<String, Vendor>,
    pub currencies: Map<String, Currency>,
    pub prices: std::sync::Arc<crate::proxy::llm::PriceTable>,
    /// `llm_multi_pass_tools: allow`: LLM calls with a tool that has the vendor sample
    /// the model more than once (no reservation bounds them) are forwarded and charged
    /// after the fact; refused by default (`proxy::llm::plan`).
    pub llm_multi_pass_tools: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Stdout,
    Stderr,
    Off,
    File(PathBuf),
}

impl std::fmt::Display for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessLog::Stdout => f.write_str("stdout"),
            AccessLog::Stderr => f.write_str("stderr"),
            AccessLog::Off => f.write_str("off"),
            AccessLog::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// One listener's TLS and limits (SPEC §8; the exhaustion limits of docs/operations.md).
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// HTTPS from these files; `None`: plain HTTP (loopback, or `plaintext: true`).
    pub tls: Option<crate::tls::TlsFiles>,
    /// From a connection's accept (TLS handshake included), or from the first byte of a
    /// kept-alive connection's next request, to its complete request header.
    pub header_timeout: Duration,
    /// A kept-alive connection with no byte of a next request for this long is closed
    /// (the control API: `header_timeout` covers that wait too).
    pub keepalive_timeout: Duration,
    /// A request (header read to response) of the control API takes at most this long.
    pub request_timeout: Duration,
    /// Each write of a proxy response to the client completes within this long, or the
    /// connection is closed (a client that stops reading frees its place).
    pub write_timeout: Duration,
    /// A larger request header is answered 431 and the connection closed.
    pub max_header_bytes: usize,
    pub limits: crate::conns::ConnLimits,
    /// `plaintext: true`: plain HTTP allowed on a non-loopback address.
    pub plaintext_allowed: bool,
}

#[derive(Debug, Clone)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    pub total_connection: Duration,
    pub read: Duration,
    pub write: Duration,
    pub idle: Duration,
    pub dns_refresh: Duration,
    /// A CA trusted for every vendor, besides the system's roots.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub slices_per_cap: i64,
    pub return_idle_after: Duration,
    pub report_interval: Duration,
    /// How long a process's leases stay its own without a heartbeat (docs/storage.md).
    pub lifetime: Duration,
}

#[derive(Debug, Clone)]
pub struct PingoraSettings {
    pub threads: usize,
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    pub upgrade_sock: String,
    pub pid_file: String,
}

/// Where a vendor lives: scheme, host, port and an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub base_path: String,
    /// The `Host` header sent upstream: the port only when not the scheme's default, an
    /// IPv6 address in brackets. Built once here rather than per request.
    pub host_header: http::HeaderValue,
}

impl UpstreamUrl {
    pub fn parse(text: &str) -> Result<Self> {
        let url = url::Url::parse(text).with_context(|| format!("{text:?} is not a URL"))?;
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => bail!("{text:?}: scheme {other:?} is not http or https"),
        };
        let host = url
            .host_str()
            .ok_or_else(|| anyhow!("{text:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        if url.query().is_some() || url.fragment().is_some() {
            bail!("{text:?}: an upstream URL takes no query or fragment");
        }
        let base_path = url.path().trim_end_matches('/').to_string();
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let host_header = if port == if tls { 443 } else { 80 } {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        let host_header = http::HeaderValue::from_str(&host_header)
            .with_context(|| format!("{text:?}: the host is not a valid Host header"))?;
        Ok(UpstreamUrl {
            tls,
            host,
            port,
            base_path,
            host_header,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Vendor {
    pub name: String,
    pub upstream: UpstreamUrl,
    pub auth: AuthStyle,
    pub auth_header: http::HeaderName,
    pub strip_headers: Vec<http::HeaderName>,
    pub default_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// JSON bodies on these paths are converted to a form (Stripe v1; v2 takes JSON).
    pub json_to_form: Vec<EndpointPattern>,
    pub account_headers: Vec<http::HeaderName>,
    pub request_id_header: Option<http::HeaderName>,
    /// An answer with this header set to `true`, to a request with one `Idempotency-Key`,
    /// is the vendor's replay of a first answer: it moved no money again, so the call's
    /// reservation is released (the first call was counted when it was made).
    pub idempotent_replayed_header: Option<http::HeaderName>,
    /// Shared: a request holds its rule by reference count, never by copy.
    pub metered: Vec<std::sync::Arc<MeterRule>>,
    /// Mutating endpoints known not to move money.
    pub free: Vec<EndpointPattern>,
    /// Form fields refused on an endpoint (metered or free): ones that move money the
    /// meter does not see, like a Stripe customer's `balance`.
    pub refuse_fields: Vec<(EndpointPattern, Vec<String>)>,
    pub unmetered: UnmeteredPolicy,
    pub llm_metered: Vec<LlmRule>,
    pub cost_per_request: Micros,
    /// A CA trusted for this vendor's certificate, besides the system's roots (and the
    /// `upstream.ca_file`, which this one replaces).
    pub ca_file: Option<PathBuf>,
}

/// How the catalog classifies one call (SPEC §5).
#[derive(Debug, Clone, Copy)]
pub enum Class<'a> {
    Metered(&'a std::sync::Arc<MeterRule>),
    /// Metered by tokens (`llm_metered`): the LLM stage reserves and settles it.
    TokenMetered,
    /// A read (GET, HEAD, OPTIONS), or a mutating endpoint listed as free.
    Free,
    /// A mutating endpoint the catalog says nothing about.
    Unmetered,
}

/// Where to read, before forwarding, what a call can charge: `GET {lookup}` with the
/// request path's segments put in place of the pattern's `*`s.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub path: EndpointPattern,
    pub amount_fields: Vec<String>,
}

/// An endpoint metered by tokens, and the API it speaks.
#[derive(Debug, Clone)]
pub struct LlmRule {
    pub endpoint: EndpointPattern,
    pub api: crate::proxy::llm::Api,
}

#[derive(Debug, Clone)]
pub struct MeterRule {
    pub endpoint: EndpointPattern,
    pub source: MeterSource,
    pub amount_field: String,
    pub currency_field: String,
    pub default_currency: Option<String>,
    pub amount_fields: Vec<String>,
    pub skip_if_created_by_same_key: bool,
    pub reserve: Option<Lookup>,
}

impl MeterRule {
    /// Whether pricing a call reads objects from the vendor first (`reserve`'s lookups).
    pub fn reads_vendor(&self) -> bool {
        matches!(self.source, MeterSource::Response | MeterSource::Items)
    }

    /// The request fields the rule reads.
    pub fn fields(&self) -> [&str; 2] {
        [&self.amount_field, &self.currency_field]
    }

    /// The id of the object the call acts on: the path segment under the endpoint's
    /// first `*` (`pi_1` in `/v1/payment_intents/pi_1/confirm`).
    pub fn object_id<'p>(&self, path: &'p str) -> Option<&'p str> {
        self.endpoint.first_wildcard(path)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Currency {
    pub decimals: u32,
    /// Micro-USD per major unit.
    pub usd_per_unit: Micros,
}

impl Vendor {
    /// The API of a token-metered endpoint.
    pub fn llm_api(&self, method: &http::Method, path: &str) -> Option<crate::proxy::llm::Api> {
        self.llm_metered
            .iter()
            .find(|r| r.endpoint.matches(method, path))
            .map(|r| r.api)
    }

    pub fn meter_rule(
        &self,
        method: &http::Method,
        path: &str,
    ) -> Option<&std::sync::Arc<MeterRule>> {
        self.metered
            .iter()
            .find(|r| r.endpoint.matches(method, path))
    }

    /// The fields refused on this call (the first `refuse_fields` entry that matches).
    pub fn refused_fields(&self, method: &http::Method, path: &str) -> &[String] {
        self.refuse_fields
            .iter()
            .find(|(endpoint, _)| endpoint.matches(method, path))
            .map_or(&[], |(_, fields)| fields)
    }

    /// Metered, free (a read, or listed as not moving money) or unmetered.
    pub fn classify(&self, method: &http::Method, path: &str) -> Class<'_> {
        if let Some(rule) = self.meter_rule(method, path) {
            return Class::Metered(rule);
        }
        if self.llm_api(method, path).is_some() {
            return Class::TokenMetered;
        }
        let read = [http::Method::GET, http::Method::HEAD, http::Method::OPTIONS];
        if read.contains(method) || self.free.iter().any(|p| p.matches(method, path)) {
            Class::Free
        } else {
            Class::Unmetered
        }
    }

    /// For key issuance: the patterns of `allowed` that reach mutating endpoints this
    /// vendor refuses as unmetered (each with why), so the caller can be warned. A
    /// pattern with wildcards is covered only where it is itself a metered or free entry.
    pub fn unmetered_reach(&self, allowed: &[String]) -> Vec<String> {
        if self.unmetered != UnmeteredPolicy::Refuse {
            return Vec::new();
        }
        let mut warnings = Vec::new();
        for text in allowed {
            let Ok(pattern) = EndpointPattern::parse(text) else {
                continue;
            };
            let methods = match pattern.method() {
                Some(m) => vec![m.clone()],
                None => vec![http::Method::POST, http::Method::DELETE],
            };
            let path = pattern.path_pattern();
            let reached: Vec<String> = methods
                .into_iter()
                .filter(|m| {
                    ![http::Method::GET, http::Method::HEAD, http::Method::OPTIONS].contains(m)
                })
                .filter(|m| match pattern.concrete_path() {
                    Some(concrete) => matches!(self.classify(m, &concrete), Class::Unmetered),
                    None => {
                        let exact = format!("{m} {path}");
                        !self
                            .metered
                            .iter()
                            .map(|r| &r.endpoint)
                            .chain(self.llm_metered.iter().map(|r| &r.endpoint))
                            .chain(&self.free)
                            .any(|p| p.to_string() == exact)
                    }
                })
                .map(|m| m.to_string())
                .collect();
            if !reached.is_empty() {
                warnings.push(format!(
                    "{text:?} reaches {} calls Keybrake does not meter (they may move \
                     money): a capped key's calls to them are refused with 403 endpoint_unmetered",
                    reached.join("/")
                ));
            }
        }
        warnings
    }

    /// Whether a JSON body on `path` is converted to a form.
    pub fn converts_json(&self, path: &str) -> bool {
        self.json_to_form
            .iter()
            .any(|p| p.matches(&http::Method::POST, path))
    }
}

/// Command-line values that win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub proxy_listen: Option<String>,
    pub control_listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<crate::database::DatabaseUrl>,
    pub vendor_upstreams: Vec<String>,
}

impl Config {
    /// Where the control plane keeps its data: PostgreSQL when a database URL is set,
    /// else SQLite in the data dir.
    pub fn database(&self) -> crate::database::Database {
        match &self.database_url {
            Some(url) => crate::database::Database::Postgres { url: url.clone() },
            None => crate::database::Database::Sqlite {
                data_dir: self.data_dir.clone(),
            },
        }
    }

    /// Where `load(path)` reads the configuration from, for messages.
    pub fn source(path: Option<&Path>) -> String {
        match path {
            Some(p) => std::path::absolute(p)
                .unwrap_or(p.to_path_buf())
                .display()
                .to_string(),
            None if Path::new(DEFAULT_PATH).exists() => {
                let p = Path::new(DEFAULT_PATH);
                std::path::absolute(p)
                    .unwrap_or(p.to_path_buf())
                    .display()
                    .to_string()
            }
            None => "the embedded defaults".into(),
        }
    }

    /// Loads `path`; `None` means `conf/keybrake.yaml` if it exists, else the embedded
    /// defaults. Everything is validated here.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config> {
        let default_path = Path::new(DEFAULT_PATH);
        let (text, base_dir) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config {}", p.display()))?,
                Some(p.parent().unwrap_or(Path::new(".")).to_path_buf()),
            ),
            None if default_path.exists() => (
                std::fs::read_to_string(default_path)
                    .with_context(|| format!("cannot read {DEFAULT_PATH}"))?,
                Some(PathBuf::from("conf")),
            ),
            None => (EMBEDDED_CONFIG.to_string(), None),
        };
        Self::from_yaml(&text, base_dir.as_deref(), overrides)
    }

    pub fn from_yaml(text: &str, base_dir: Option<&Path>, overrides: &Overrides) -> Result<Config> {
        let file: FileConfig = if text.trim().is_empty() {
            FileConfig::default()
        } else {
            yaml_serde::from_str(text).map_err(|e| yaml_error("config", e))?
        };
        // A side file (`key`) the config names is read from beside the config file; one it
        // does not name is the default file there, or, when there is none, the embedded
        // copy (as with no config file at all).
        let side_file = |key: &str,
                         name: &Option<PathBuf>,
                         embedded: &'static str,
                         default: &str|
         -> Result<String> {
            let path = match (base_dir, name) {
                (Some(dir), Some(name)) => dir.join(name),
                (Some(dir), None) if dir.join(default).exists() => dir.join(default),
                // Embedded config: its default side files are embedded too.
                (None, Some(name)) if name != Path::new(default) => name.clone(),
                _ => return Ok(embedded.to_string()),
            };
            std::fs::read_to_string(&path).with_context(|| {
                let shown = std::path::absolute(&path).unwrap_or(path.clone());
                format!(
                    "{key}: cannot read {} (relative to the config file's directory; leave \
                     {key} out to use {default} beside the config file, or the embedded \
                     copy when there is none)",
                    shown.display()
                )
            })
        };
        // The file's own values first, so an error names them rather than a side file.
        for (value, what) in [
            (&file.proxy_listen, "proxy_listen"),
            (&file.control_listen, "control_listen"),
            (&file.metrics_listen, "metrics_listen"),
        ] {
            if let Some(text) = value {
                text.parse::<SocketAddr>().map_err(|_| {
                    anyhow!("{what}: {text:?} is not a socket address like 127.0.0.1:8080")
                })?;
            }
        }
        let vendors_text = side_file(
            "vendors_file",
            &file.vendors_file,
            EMBEDDED_VENDORS,
            defaults::VENDORS_FILE,
        )?;
        let currencies_text = side_file(
            "currencies_file",
            &file.currencies_file,
            EMBEDDED_CURRENCIES,
            defaults::CURRENCIES_FILE,
        )?;
        let prices_text = side_file(
            "prices_file",
            &file.prices_file,
            EMBEDDED_PRICES,
            defaults::PRICES_FILE,
        )?;
        let prices = crate::proxy::llm::PriceTable::parse(&prices_text)?;

        let addr = |flag: &Option<String>,
                    file: &Option<String>,
                    default: &str,
                    what: &str|
         -> Result<SocketAddr> {
            let text = flag.as_deref().or(file.as_deref()).unwrap_or(default);
            text.parse().map_err(|_| {
                anyhow!("{what}: {text:?} is not a socket address like 127.0.0.1:8080")
            })
        };
        let ms = |v: Option<Millis>, d: Duration| v.map_or(d, |v| v.0);
        let secs = |v: Option<Seconds>, d: Duration| v.map_or(d, |v| v.0);

        let mut vendors = parse_vendors(&vendors_text)?;
        for (name, v) in &vendors {
            if !v.llm_metered.is_empty() && !prices.has_vendor(name) {
                bail!("vendor {name:?} meters tokens but the price table has no {name:?}");
            }
        }
        // Files named in the config are relative to it (the working directory without one).
        let relative = |p: PathBuf| match base_dir {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        };
        for v in vendors.values_mut() {
            v.ca_file = v.ca_file.take().map(relative);
        }
        for spec in &overrides.vendor_upstreams {
            let (name, url) = spec
                .split_once('=')
                .ok_or_else(|| anyhow!("--vendor-upstream {spec:?}: expected VENDOR=URL"))?;
            let vendor = vendors
                .get_mut(name)
                .ok_or_else(|| anyhow!("--vendor-upstream: unknown vendor {name:?}"))?;
            vendor.upstream =
                UpstreamUrl::parse(url).with_context(|| format!("--vendor-upstream {name}"))?;
        }

        let access_log = file.access_log.as_deref().unwrap_or(defaults::ACCESS_LOG);
        // The words in any case (`OFF` is not meant as a file name); `./OFF` is a file.
        let access_log = match access_log.to_ascii_lowercase().as_str() {
            "stdout" => AccessLog::Stdout,
            "stderr" => AccessLog::Stderr,
            "off" => AccessLog::Off,
            "" => bail!("access_log: empty; use \"stdout\", \"stderr\", \"off\" or a file path"),
            _ => AccessLog::File(access_log.into()),
        };
        let multi_pass = file
            .llm_multi_pass_tools
            .as_deref()
            .map(str::to_ascii_lowercase);
        let llm_multi_pass_tools = match multi_pass.as_deref() {
            None | Some("refuse") => false,
            Some("allow") => true,
            Some(other) => {
                bail!("llm_multi_pass_tools: {other:?}; use \"refuse\" (the default) or \"allow\"")
            }
        };
        let default_key_ttl = secs(file.default_key_ttl, defaults::DEFAULT_KEY_TTL);
        let max_key_ttl = secs(file.max_key_ttl, defaults::MAX_KEY_TTL);
        if default_key_ttl.is_zero() || max_key_ttl.is_zero() {
            bail!("default_key_ttl and max_key_ttl must be longer than zero");
        }
        if max_key_ttl > Duration::from_secs(366 * 86_400) {
            // Vault keys are short-lived by design; a longer bound is a typo.
            bail!("max_key_ttl is longer than a year");
        }
        if default_key_ttl > max_key_ttl {
            bail!("default_key_ttl is longer than max_key_ttl");
        }
        let expired_key_retention =
            secs(file.expired_key_retention, defaults::EXPIRED_KEY_RETENTION);
        if expired_key_retention < defaults::MIN_EXPIRED_KEY_RETENTION {
            // A node's spend report may arrive a week late: its key must still be there.
            bail!("expired_key_retention must be at least 8d");
        }
        let max_staleness = file
            .edge
            .max_staleness
            .map_or(defaults::EDGE_MAX_STALENESS, |v| v.0);
        if max_staleness < Duration::from_secs(1) {
            bail!("edge.max_staleness must be at least 1s");
        }
        let token_cache_entries = file
            .token_cache_entries
            .unwrap_or(defaults::TOKEN_CACHE_ENTRIES);
        if !(1024..=1 << 28).contains(&token_cache_entries) {
            bail!("token_cache_entries must be between 1024 and 268435456");
        }
        let body_limit_bytes = file.body_limit_bytes.unwrap_or(defaults::BODY_LIMIT_BYTES);
        if body_limit_bytes == 0 {
            bail!("body_limit_bytes must be positive");
        }
        let threads = file.pingora.threads.unwrap_or(defaults::PINGORA_THREADS);
        let data_dir: PathBuf = overrides
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| defaults::DATA_DIR.into());
        if data_dir.as_os_str().is_empty() {
            bail!("data_dir must name a directory (it is empty)");
        }
        let in_data_dir = |name: &str| data_dir.join(name).to_string_lossy().into_owned();
        // A zero upstream timeout would fail every call at once (504 upstream_timeout).
        let upstream_ms = |key: &str, v: Option<Millis>, d: Duration| -> Result<Duration> {
            at_least(
                &format!("upstream.{key}"),
                ms(v, d),
                Duration::from_millis(1),
            )
        };
        if threads == 0 {
            bail!("pingora.threads must be at least 1");
        }
        let slices_per_cap = file
            .leases
            .slices_per_cap
            .unwrap_or(defaults::LEASE_SLICES_PER_CAP);
        if !(1..=1_000_000).contains(&slices_per_cap) {
            bail!("leases.slices_per_cap must be between 1 and 1000000");
        }
        let listener =
            |f: FileListener, what: &str, d: defaults::Listener| -> Result<ListenerSettings> {
                let positive = |v: Option<Millis>, d: Duration, key: &str| -> Result<Duration> {
                    match ms(v, d) {
                        d if d.is_zero() => bail!("{what}.{key} must be positive"),
                        d => Ok(d),
                    }
                };
                let refused = |v: &Option<Millis>, d: Option<Duration>, key: &str| match (v, d) {
                    (Some(_), None) => bail!("{what}.{key}: not a setting of this listener"),
                    _ => Ok(()),
                };
                refused(
                    &f.keepalive_timeout_ms,
                    d.keepalive_timeout,
                    "keepalive_timeout_ms",
                )?;
                refused(
                    &f.request_timeout_ms,
                    d.request_timeout,
                    "request_timeout_ms",
                )?;
                refused(&f.write_timeout_ms, d.write_timeout, "write_timeout_ms")?;
                let max_header_bytes = f.max_header_bytes.unwrap_or(d.max_header_bytes);
                if !(d.min_header_bytes..=1 << 20).contains(&max_header_bytes) {
                    bail!(
                        "{what}.max_header_bytes must be between {} and 1048576",
                        d.min_header_bytes
                    );
                }
                let max_connections = f.max_connections.unwrap_or(d.max_connections);
                if max_connections == 0 {
                    bail!("{what}.max_connections must be positive");
                }
                let tls = f
                    .tls
                    .map(|t| -> Result<_> {
                        Ok(crate::tls::TlsFiles {
                            cert_file: relative(t.cert_file),
                            key_file: relative(t.key_file),
                            watch_interval: at_least(
                                &format!("{what}.tls.watch_interval_ms"),
                                ms(t.watch_interval_ms, defaults::TLS_WATCH_INTERVAL),
                                Duration::from_millis(50),
                            )?,
                        })
                    })
                    .transpose()?;
                if tls.is_some() && f.plaintext == Some(true) {
                    bail!("{what}: both tls and plaintext: true are set; keep one");
                }
                let header_timeout =
                    positive(f.header_timeout_ms, d.header_timeout, "header_timeout_ms")?;
                Ok(ListenerSettings {
                    plaintext_allowed: f.plaintext.unwrap_or(d.plaintext),
                    tls,
                    header_timeout,
                    // Without a keep-alive setting, the header deadline covers that wait.
                    keepalive_timeout: match d.keepalive_timeout {
                        Some(d) => positive(f.keepalive_timeout_ms, d, "keepalive_timeout_ms")?,
                        None => header_timeout,
                    },
                    request_timeout: match d.request_timeout {
                        Some(d) => positive(f.request_timeout_ms, d, "request_timeout_ms")?,
                        None => Duration::ZERO,
                    },
                    write_timeout: match d.write_timeout {
                        Some(d) => positive(f.write_timeout_ms, d, "write_timeout_ms")?,
                        None => Duration::ZERO,
                    },
                    max_header_bytes,
                    limits: crate::conns::ConnLimits {
                        max_total: max_connections,
                        max_per_client: f
                            .max_connections_per_client
                            .unwrap_or(d.max_connections_per_client),
                    },
                })
            };
        let proxy = listener(file.proxy, "proxy", defaults::PROXY)?;
        let control = listener(file.control, "control", defaults::CONTROL)?;
        let upstream_ca_file = file.upstream.ca_file.clone().map(relative);
        let (u, l, p) = (&file.upstream, &file.leases, file.pingora);

        let config = Config {
            proxy_listen: addr(
                &overrides.proxy_listen,
                &file.proxy_listen,
                defaults::PROXY_LISTEN,
                "proxy_listen",
            )?,
            control_listen: addr(
                &overrides.control_listen,
                &file.control_listen,
                defaults::CONTROL_LISTEN,
                "control_listen",
            )?,
            metrics_listen: addr(
                &overrides.metrics_listen,
                &file.metrics_listen,
                defaults::METRICS_LISTEN,
                "metrics_listen",
            )?,
            data_dir: data_dir.clone(),
            database_url: overrides.database_url.clone().or(file.database_url),
            body_limit_bytes,
            token_cache_entries,
            body_read_timeout: ms(file.body_read_timeout_ms, defaults::BODY_READ_TIMEOUT),
            proxy,
            control,
            default_key_ttl,
            max_key_ttl,
            expired_key_retention,
            access_log,
            llm_multi_pass_tools,
            upstream: UpstreamTimeouts {
                connect: upstream_ms(
                    "connect_timeout_ms",
                    u.connect_timeout_ms,
                    defaults::UPSTREAM_CONNECT_TIMEOUT,
                )?,
                total_connection: upstream_ms(
                    "total_connection_timeout_ms",
                    u.total_connection_timeout_ms,
                    defaults::UPSTREAM_TOTAL_CONNECTION_TIMEOUT,
                )?,
                read: upstream_ms(
                    "read_timeout_ms",
                    u.read_timeout_ms,
                    defaults::UPSTREAM_READ_TIMEOUT,
                )?,
                write: upstream_ms(
                    "write_timeout_ms",
                    u.write_timeout_ms,
                    defaults::UPSTREAM_WRITE_TIMEOUT,
                )?,
                idle: upstream_ms(
                    "idle_timeout_ms",
                    u.idle_timeout_ms,
                    defaults::UPSTREAM_IDLE_TIMEOUT,
                )?,
                dns_refresh: at_least(
                    "upstream.dns_refresh_seconds",
                    secs(u.dns_refresh_seconds, defaults::UPSTREAM_DNS_REFRESH),
                    Duration::from_secs(1),
                )?,
                ca_file: upstream_ca_file,
            },
            audit_durability: file.audit.durability.unwrap_or(defaults::AUDIT_DURABILITY),
            leases: LeaseSettings {
                slices_per_cap,
                return_idle_after: secs(
                    l.return_idle_after_seconds,
                    defaults::LEASE_RETURN_IDLE_AFTER,
                ),
                report_interval: at_least(
                    "leases.report_interval_ms",
                    ms(l.report_interval_ms, defaults::LEASE_REPORT_INTERVAL),
                    Duration::from_millis(10),
                )?,
                lifetime: at_least(
                    "leases.lifetime_seconds",
                    secs(l.lifetime_seconds, defaults::LEASE_LIFETIME),
                    Duration::from_secs(3),
                )?,
            },
            pingora: PingoraSettings {
                threads,
                grace_period_seconds: secs(p.grace_period_seconds, defaults::PINGORA_GRACE_PERIOD)
                    .as_secs(),
                graceful_shutdown_timeout_seconds: secs(
                    p.graceful_shutdown_timeout_seconds,
                    defaults::PINGORA_GRACEFUL_SHUTDOWN_TIMEOUT,
                )
                .as_secs(),
                upgrade_sock: p
                    .upgrade_sock
                    .unwrap_or_else(|| in_data_dir(defaults::PINGORA_UPGRADE_SOCK_IN_DATA_DIR)),
                pid_file: p
                    .pid_file
                    .unwrap_or_else(|| in_data_dir(defaults::PINGORA_PID_FILE_IN_DATA_DIR)),
            },
            max_staleness,
            vendors,
            currencies: parse_currencies(&currencies_text)?,
            prices: std::sync::Arc::new(prices),
        };
        // The proxy's and the control API's listeners are checked by the commands that
        // open them (`check_files`): an edge host's config need not say how a control
        // listener it never opens would be served, nor a control host's a proxy's.
        plaintext_rule(
            "metrics",
            config.metrics_listen,
            false,
            file.metrics
                .plaintext
                .unwrap_or(defaults::METRICS_PLAINTEXT),
        )?;
        let up = &config.upstream;
        if up.total_connection < up.connect {
            bail!(
                "upstream.total_connection_timeout_ms ({} ms) is shorter than \
                 upstream.connect_timeout_ms ({} ms), which it includes",
                up.total_connection.as_millis(),
                up.connect.as_millis()
            );
        }
        Ok(config)
    }

    /// Loads every certificate, key and CA file the configuration names (`keybrake check`
    /// and start-up), so a missing or mismatched file is reported before anything runs.
    /// `with_proxy`: the proxy's files too (not for `keybrake control`).
    /// Reads the TLS and CA files of the listeners this process runs: an edge node
    /// (`with_control` false) needs neither the control listener's certificate nor its
    /// private key, which stay on the control host.
    ///
    /// First, the listeners this process runs must not share a port: one would be taken
    /// by the other (a proxy answering with the control API's 404s, or never listening).
    pub fn check_files(&self, with_proxy: bool, with_control: bool) -> Result<()> {
        let mut listeners = vec![("metrics_listen", self.metrics_listen)];
        if with_proxy {
            listeners.push(("proxy_listen", self.proxy_listen));
        }
        if with_control {
            listeners.push(("control_listen", self.control_listen));
        }
        // Same port, and addresses that overlap: equal (an IPv4-mapped IPv6 address is its
        // IPv4 one), or a wildcard of the other's family; `[::]` takes IPv4 too (Linux's
        // default dual stack). Port 0 picks a free port.
        let overlap = |a: std::net::IpAddr, b: std::net::IpAddr| {
            let (a, b) = (a.to_canonical(), b.to_canonical());
            a == b
                || (a.is_unspecified() && (a.is_ipv6() || b.is_ipv4()))
                || (b.is_unspecified() && (b.is_ipv6() || a.is_ipv4()))
        };
        for (i, (a_name, a)) in listeners.iter().enumerate() {
            for (b_name, b) in &listeners[i + 1..] {
                if a.port() == b.port() && a.port() != 0 && overlap(a.ip(), b.ip()) {
                    bail!("{b_name} {b} and {a_name} {a} share a port: give each its own");
                }
            }
        }
        // Only the listeners this process opens: plain HTTP off loopback must be asked for
        // (SPEC §8), and certificates must load.
        for (what, addr, l, runs) in [
            ("proxy", self.proxy_listen, &self.proxy, with_proxy),
            ("control", self.control_listen, &self.control, with_control),
        ] {
            if !runs {
                continue;
            }
            plaintext_rule(what, addr, l.tls.is_some(), l.plaintext_allowed)?;
            if let Some(files) = &l.tls {
                crate::tls::ReloadingCert::load(what, files)
                    .with_context(|| format!("{what}.tls"))?;
            }
        }
        if !with_proxy {
            return Ok(());
        }
        if let AccessLog::File(path) = &self.access_log {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let shown = std::path::absolute(path).unwrap_or(path.clone());
            if dir.is_some_and(|d| !d.is_dir()) {
                bail!(
                    "access_log: the directory of {} does not exist (a relative access_log \
                     is relative to the working directory)",
                    shown.display()
                );
            }
            // This user must be able to append to it, or to create it: said before any
            // listener opens, not once the others already serve.
            let writable = if path.exists() {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(path)
                    .map(|_| ())
            } else {
                crate::secret::writable_dir(dir.unwrap_or(Path::new(".")))
            };
            writable.with_context(|| format!("access_log: cannot write {}", shown.display()))?;
        }
        if let Some(ca) = &self.upstream.ca_file {
            crate::tls::read_certs(ca).context("upstream.ca_file")?;
        }
        for v in self.vendors.values() {
            if let Some(ca) = &v.ca_file {
                crate::tls::read_certs(ca).with_context(|| format!("vendor {} ca_file", v.name))?;
            }
        }
        Ok(())
    }
}

/// SPEC §8: a plain-HTTP listener on a non-loopback address must be asked for.
fn plaintext_rule(what: &str, addr: SocketAddr, tls: bool, plaintext: bool) -> Result<()> {
    if tls || plaintext || addr.ip().is_loopback() {
        return Ok(());
    }
    let fix = if what == "metrics" {
        "keep it on a loopback address, or set metrics.plaintext: true if only a trusted \
         network reaches it"
            .to_string()
    } else {
        format!(
            "set {what}.tls (cert_file, key_file), or {what}.plaintext: true if a \
             TLS-terminating load balancer is in front"
        )
    };
    bail!("{what} listener {addr} would serve plain HTTP on a non-loopback address: {fix}")
}

/// A YAML error for an operator: `what: key.path: message at line L column C`, with serde's
/// Rust type names (`expected struct FileTls`, `expected usize`) said in YAML's words.
pub(crate) fn yaml_error(what: &str, e: yaml_serde::Error) -> anyhow::Error {
    let mut text = e.to_string();
    for (rust, yaml) in [
        ("usize", "a whole number (0 or more)"),
        ("u64", "a whole number (0 or more)"),
        ("u32", "a whole number (0 or more)"),
        ("u16", "a whole number (0 or more)"),
        ("u8", "a whole number (0 or more)"),
        ("i64", "a whole number"),
        ("i32", "a whole number"),
        ("f64", "a number"),
    ] {
        text = text.replace(&format!("expected {rust} "), &format!("expected {yaml} "));
        if text.ends_with(&format!("expected {rust}")) {
            text.truncate(text.len() - rust.len());
            text.push_str(yaml);
        }
    }
    // `expected struct FileTls` (a section) or `expected a map` → `expected a mapping`.
    while let Some(at) = text.find("expected struct ") {
        let name_end = text[at + 16..]
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .map_or(text.len(), |n| at + 16 + n);
        text.replace_range(at..name_end, "expected a mapping (key: value lines)");
    }
    anyhow!("{what}: {text}")
}

fn header_name(text: &str, what: &str) -> Result<http::HeaderName> {
    http::HeaderName::from_bytes(text.to_ascii_lowercase().as_bytes())
        .map_err(|_| anyhow!("{what}: {text:?} is not a header name"))
}

fn parse_vendors(text: &str) -> Result<Map<String, Vendor>> {
    let raw: BTreeMap<String, FileVendor> =
        yaml_serde::from_str(text).map_err(|e| yaml_error("vendor catalog", e))?;
    let mut vendors = Map::default();
    for (name, v) in raw {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            bail!("vendor {name:?}: names are lowercase letters, digits, '-' and '_'");
        }
        let upstream = v
            .upstream
            .as_deref()
            .ok_or_else(|| anyhow!("vendor {name:?} has no upstream"))?;
        let upstream =
            UpstreamUrl::parse(upstream).with_context(|| format!("vendor {name:?} upstream"))?;
        let auth_header = match (v.auth, v.auth_header.as_deref()) {
            (AuthStyle::Header, None) => {
                bail!("vendor {name:?}: auth \"header\" needs auth_header")
            }
            (AuthStyle::Header, Some(h)) => {
                header_name(h, &format!("vendor {name:?} auth_header"))?
            }
            _ => http::header::AUTHORIZATION,
        };
        let mut strip_headers: Vec<_> = v
            .strip_headers
            .iter()
            .map(|h| header_name(h, &format!("vendor {name:?} strip_headers")))
            .collect::<Result<_>>()?;
        // Every way a client may present a vault key is removed, whatever the catalog says.
        for always in ["authorization", "x-api-key", "proxy-authorization"] {
            let h = http::HeaderName::from_static(always);
            if !strip_headers.contains(&h) {
                strip_headers.push(h);
            }
        }
        let default_headers = v
            .default_headers
            .iter()
            .map(|(k, val)| {
                Ok((
                    header_name(k, &format!("vendor {name:?} default_headers"))?,
                    http::HeaderValue::from_str(val)
                        .map_err(|_| anyhow!("vendor {name:?}: bad header value for {k}"))?,
                ))
            })
            .collect::<Result<_>>()?;
        let patterns = |list: &[String], what: &str| -> Result<Vec<EndpointPattern>> {
            list.iter()
                .map(|p| {
                    EndpointPattern::parse(p)
                        .map_err(|e| anyhow!("vendor {name:?} {what} {p:?}: {e}"))
                })
                .collect()
        };
        let metered = v
            .metered
            .into_iter()
            .map(|r| {
                let endpoint = EndpointPattern::parse(&r.endpoint).map_err(|e| {
                    anyhow!("vendor {name:?} metered endpoint {:?}: {e}", r.endpoint)
                })?;
                if r.from == MeterSource::Response && r.amount_fields.is_empty() {
                    bail!(
                        "vendor {name:?} metered endpoint {:?}: from: response needs amount_fields",
                        r.endpoint
                    );
                }
                if r.from != MeterSource::Request && r.reserve.is_none() {
                    // Charged after the fact, without a reservation, concurrent calls
                    // could pass the cap (SPEC §5).
                    bail!(
                        "vendor {name:?} metered endpoint {:?}: from: {:?} needs reserve",
                        r.endpoint,
                        r.from
                    );
                }
                let reserve = r
                    .reserve
                    .map(|l| -> Result<Lookup> {
                        let path = EndpointPattern::parse(&l.lookup).map_err(|e| {
                            anyhow!(
                                "vendor {name:?} metered endpoint {:?} lookup: {e}",
                                r.endpoint
                            )
                        })?;
                        if l.amount_fields.is_empty() {
                            bail!("vendor {name:?} lookup {:?} needs amount_fields", l.lookup);
                        }
                        Ok(Lookup {
                            path,
                            amount_fields: l.amount_fields,
                        })
                    })
                    .transpose()?;
                Ok(std::sync::Arc::new(MeterRule {
                    endpoint,
                    source: r.from,
                    amount_field: r.amount_field,
                    currency_field: r.currency_field,
                    default_currency: r.default_currency.map(|c| c.to_ascii_lowercase()),
                    amount_fields: r.amount_fields,
                    skip_if_created_by_same_key: r.skip_if_created_by_same_key,
                    reserve,
                }))
            })
            .collect::<Result<_>>()?;
        let cost_per_request = match v.cost_per_request_usd.as_deref() {
            None => Micros::ZERO,
            Some(t) => Micros::parse_usd(t)
                .ok()
                .filter(|m| m.0 >= 0)
                .ok_or_else(|| {
                    anyhow!("vendor {name:?}: cost_per_request_usd {t:?} is not a USD amount")
                })?,
        };
        vendors.insert(
            name.clone(),
            Vendor {
                name: name.clone(),
                upstream,
                auth: v.auth,
                auth_header,
                strip_headers,
                default_headers,
                json_to_form: patterns(&v.json_to_form.paths(), "json_to_form")?,
                account_headers: v
                    .account_headers
                    .iter()
                    .map(|h| header_name(h, &format!("vendor {name:?} account_headers")))
                    .collect::<Result<_>>()?,
                request_id_header: v
                    .request_id_header
                    .as_deref()
                    .map(|h| header_name(h, &format!("vendor {name:?} request_id_header")))
                    .transpose()?,
                idempotent_replayed_header: v
                    .idempotent_replayed_header
                    .as_deref()
                    .map(|h| {
                        header_name(h, &format!("vendor {name:?} idempotent_replayed_header"))
                    })
                    .transpose()?,
                metered,
                free: patterns(&v.free, "free")?,
                refuse_fields: v
                    .refuse_fields
                    .iter()
                    .map(|r| {
                        let endpoint = EndpointPattern::parse(&r.endpoint).map_err(|e| {
                            anyhow!("vendor {name:?} refuse_fields endpoint {:?}: {e}", r.endpoint)
                        })?;
                        if r.fields.is_empty() || r.fields.iter().any(|f| f.is_empty()) {
                            bail!("vendor {name:?} refuse_fields {:?}: name at least one field, none empty", r.endpoint);
                        }
                        Ok((endpoint, r.fields.clone()))
                    })
                    .collect::<Result<_>>()?,
                unmetered: v.unmetered,
                llm_metered: v
                    .llm_metered
                    .iter()
                    .map(|r| {
                        Ok(LlmRule {
                            endpoint: EndpointPattern::parse(&r.endpoint).map_err(|e| {
                                anyhow!(
                                    "vendor {name:?} llm_metered endpoint {:?}: {e}",
                                    r.endpoint
                                )
                            })?,
                            api: r.api,
                        })
                    })
                    .collect::<Result<_>>()?,
                cost_per_request,
                ca_file: v.ca_file,
            },
        );
    }
    Ok(vendors)
}

/// `value`, or an error naming `setting` when it is below `min`: a setting is never
/// silently raised to what the program can work with.
fn at_least(setting: &str, value: Duration, min: Duration) -> Result<Duration> {
    let shown = |d: Duration| match d.subsec_millis() {
        0 => format!("{}s", d.as_secs()),
        _ => format!("{}ms", d.as_millis()),
    };
    if value < min {
        bail!("{setting}: at least {} (got {})", shown(min), shown(value));
    }
    Ok(value)
}

fn parse_currencies(text: &str) -> Result<Map<String, Currency>> {
    let raw: BTreeMap<String, FileCurrency> =
        yaml_serde::from_str(text).map_err(|e| yaml_error("currency table", e))?;
    raw.into_iter()
        .map(|(code, c)| {
            if c.decimals > 4 {
                bail!("currency {code}: decimals {} is not 0..=4", c.decimals);
            }
            let usd_per_unit = Micros::parse_usd(&c.usd)
                .ok()
                .filter(|m| m.is_positive())
                .ok_or_else(|| {
                    anyhow!("currency {code}: usd {:?} is not a positive amount", c.usd)
                })?;
            Ok((
                code.to_ascii_lowercase(),
                Currency {
                    decimals: c.decimals,
                    usd_per_unit,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_of_one_process_sharing_a_port_are_refused() {
        let load = |yaml: &str| Config::from_yaml(yaml, None, &Overrides::default()).unwrap();
        let c = load("proxy_listen: \"127.0.0.1:18180\"\ncontrol_listen: \"127.0.0.1:18180\"");
        let err = c.check_files(true, true).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "control_listen 127.0.0.1:18180 and proxy_listen 127.0.0.1:18180 share a port: give each its own"
        );
        // An edge node runs no control listener, a control plane no proxy.
        c.check_files(true, false).unwrap();
        c.check_files(false, true).unwrap();
        let c = load(
            "proxy_listen: \"0.0.0.0:18181\"\nproxy: {plaintext: true}\nmetrics_listen: \"127.0.0.1:18181\"",
        );
        let err = c.check_files(true, false).unwrap_err();
        assert!(format!("{err:#}").contains("share a port"), "{err:#}");
        load("proxy_listen: \"127.0.0.1:18182\"\nmetrics_listen: \"127.0.0.2:18182\"")
            .check_files(true, true)
            .unwrap();
        let shared = |a: &str, b: &str| {
            let yaml = format!(
                "proxy_listen: \"{a}\"\nproxy: {{plaintext: true}}\nmetrics_listen: \"{b}\"\nmetrics: {{plaintext: true}}"
            );
            load(&yaml).check_files(true, false).is_err()
        };
        assert!(shared("[::ffff:127.0.0.1]:18183", "127.0.0.1:18183"));
        assert!(shared("[::]:18183", "127.0.0.1:18183"));
        assert!(!shared("0.0.0.0:18183", "[::1]:18183"));
        assert!(!shared("127.0.0.1:0", "127.0.0.1:0"));
    }

    #[test]
    fn host_header_names_the_port_only_when_not_the_default_and_brackets_ipv6() {
        let host = |url: &str| UpstreamUrl::parse(url).unwrap().host_header;
        assert_eq!(host("https://api.stripe.com"), "api.stripe.com");
        assert_eq!(
            host("https://api.stripe.com:8443/v1"),
            "api.stripe.com:8443"
        );
        assert_eq!(host("http://127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host("http://127.0.0.1:12111"), "127.0.0.1:12111");
        assert_eq!(host("http://[::1]:12111"), "[::1]:12111");
        assert_eq!(host("https://[::1]"), "[::1]");
    }

    #[test]
    fn embedded_defaults_validate() {
        let c = Config::from_yaml(EMBEDDED_CONFIG, None, &Overrides::default()).unwrap();
        assert_eq!(c.proxy_listen.to_string(), "127.0.0.1:8080");
        assert!(c.vendors["stripe"].converts_json("/v1/payment_intents"));
        assert!(!c.vendors["stripe"].converts_json("/v2/core/event_destinations"));
        // The earlier boolean form is still read.
        let v =
            parse_vendors("x: {upstream: 'http://a', auth: bearer, json_to_form: true}").unwrap();
        assert!(v["x"].converts_json("/v2/anything"));
        assert_eq!(c.currencies["jpy"].decimals, 0);
    }

    #[test]
    fn upgrade_socket_and_pid_file_default_to_the_data_dir() {
        let c = Config::from_yaml(EMBEDDED_CONFIG, None, &Overrides::default()).unwrap();
        assert_eq!(c.pingora.upgrade_sock, "./data/upgrade.sock");
        assert_eq!(c.pingora.pid_file, "./data/keybrake.pid");
        let moved = Overrides {
            data_dir: Some("/var/lib/kb".into()),
            ..Overrides::default()
        };
        let c = Config::from_yaml("", None, &moved).unwrap();
        assert_eq!(c.pingora.upgrade_sock, "/var/lib/kb/upgrade.sock");
        let c = Config::from_yaml("pingora: {upgrade_sock: /run/k.sock}", None, &moved).unwrap();
        assert_eq!(c.pingora.upgrade_sock, "/run/k.sock");
    }

    #[test]
    fn key_lifetimes_are_bounded() {
        assert!(Config::from_yaml("max_key_ttl: 30d", None, &Overrides::default()).is_ok());
        let err = Config::from_yaml("max_key_ttl: 400d", None, &Overrides::default());
        assert!(err.unwrap_err().to_string().contains("longer than a year"));
    }

    #[test]
    fn expired_keys_are_kept_at_least_eight_days() {
        let none = Overrides::default();
        let c = Config::from_yaml("", None, &none).unwrap();
        assert_eq!(c.expired_key_retention, Duration::from_secs(30 * 86_400));
        let c = Config::from_yaml("expired_key_retention: 8d", None, &none).unwrap();
        assert_eq!(c.expired_key_retention, Duration::from_secs(8 * 86_400));
        let err = Config::from_yaml("expired_key_retention: 7d", None, &none).unwrap_err();
        assert!(err.to_string().contains("at least 8d"), "{err:#}");
    }

    #[test]
    fn an_edge_nodes_staleness_limit_comes_from_the_file_and_is_at_least_a_second() {
        let none = Overrides::default();
        let c = Config::from_yaml("edge: {max_staleness: 2m}", None, &none).unwrap();
        assert_eq!(c.max_staleness, Duration::from_secs(120));
        let c = Config::from_yaml("edge: {max_staleness: 5}", None, &none).unwrap();
        assert_eq!(c.max_staleness, Duration::from_secs(5));
        // As `--max-staleness` takes it.
        let c = Config::from_yaml("edge: {max_staleness: 1500ms}", None, &none).unwrap();
        assert_eq!(c.max_staleness, Duration::from_millis(1500));
        let err = Config::from_yaml("edge: {max_staleness: 0s}", None, &none).unwrap_err();
        assert!(err.to_string().contains("at least 1s"), "{err}");
        assert!(Config::from_yaml("edge: {stale: 5}", None, &none).is_err());
    }

    #[test]
    fn every_file_shipped_in_conf_validates() {
        // Every main config (keybrake*.yaml) loads with the vendor catalog and currency
        // table beside it; together they cover every file in conf/.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("keybrake") && name.ends_with(".yaml") {
                let c = Config::load(Some(&path), &Overrides::default())
                    .unwrap_or_else(|e| panic!("{name}: {e:#}"));
                assert!(
                    c.vendors.contains_key("stripe") && c.vendors.contains_key("openai"),
                    "{name}"
                );
                assert!(c.currencies.contains_key("usd"), "{name}");
                // The LLM vendors meter tokens, priced from prices.yaml.
                for vendor in ["openai", "anthropic"] {
                    assert!(!c.vendors[vendor].llm_metered.is_empty(), "{name} {vendor}");
                    assert!(c.prices.has_vendor(vendor), "{name} {vendor}");
                }
                assert!(c
                    .prices
                    .resolve("openai", "gpt-4o-mini-2024-07-18")
                    .is_some());
                assert!(c
                    .prices
                    .resolve("anthropic", "claude-sonnet-4-5-20250929")
                    .is_some());
                checked += 1;
            }
        }
        assert!(
            checked >= 2,
            "expected keybrake.yaml and keybrake-systemd.yaml"
        );
    }

    #[test]
    fn type_errors_name_the_key_in_yaml_words_not_rust_types() {
        let cases = [
            ("proxy:\n  tls: 5\n", "proxy.tls", "expected a mapping"),
            ("[1]\n", "invalid type: sequence", "expected a mapping"),
            (
                "pingora:\n  threads: 1.5\n",
                "pingora.threads",
                "a whole number (0 or more)",
            ),
            (
                "proxy:\n  max_connections: -1\n",
                "proxy.max_connections",
                "whole number",
            ),
        ];
        for (yaml, key, words) in cases {
            let err = Config::from_yaml(yaml, None, &Overrides::default()).unwrap_err();
            let text = format!("{err:#}");
            assert!(
                text.contains(key) && text.contains(words),
                "{yaml:?}: {text}"
            );
            assert!(
                !text.contains("struct") && !text.contains("usize"),
                "{text}"
            );
        }
        let err = parse_currencies("usd: 2").unwrap_err();
        assert!(
            format!("{err:#}")
                .contains("currency table: usd: invalid type: integer `2`, expected a mapping"),
            "{err:#}"
        );
    }

    #[test]
    fn rejects_unknown_keys_bad_addresses_and_vendors_without_upstream() {
        let err = Config::from_yaml("proxy_lisen: 1", None, &Overrides::default()).unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `proxy_lisen`"),
            "{err:#}"
        );
        let err =
            Config::from_yaml("proxy_listen: nowhere", None, &Overrides::default()).unwrap_err();
        assert!(format!("{err:#}").contains("proxy_listen"), "{err:#}");
        let err = parse_vendors("acme: { auth: bearer }").unwrap_err();
        assert!(
            format!("{err:#}").contains("\"acme\" has no upstream"),
            "{err:#}"
        );
    }

    #[test]
    fn plain_http_on_a_non_loopback_address_must_be_asked_for() {
        let o = Overrides::default();
        // Checked for the listeners a command opens (`check_files(proxy, control)`).
        let opened = |yaml: &str, proxy: bool, control: bool| {
            Config::from_yaml(yaml, None, &o)
                .and_then(|c| c.check_files(proxy, control))
                .map_err(|e| format!("{e:#}"))
        };
        let text = opened("proxy_listen: \"0.0.0.0:8080\"", true, false).unwrap_err();
        assert!(
            text.contains("proxy listener 0.0.0.0:8080 would serve plain HTTP")
                && text.contains("proxy.plaintext: true"),
            "{text}"
        );
        assert!(opened("proxy_listen: \"0.0.0.0:8080\"", true, true).is_err());
        assert!(opened(
            "proxy_listen: \"0.0.0.0:8080\"\nproxy: {plaintext: true}",
            true,
            true
        )
        .is_ok());
        // A control host does not open the proxy's listener, nor an edge host the
        // control API's: what their config says of it is not held against them.
        assert!(opened("proxy_listen: \"0.0.0.0:8080\"", false, true).is_ok());
        assert!(opened("control_listen: \"0.0.0.0:8081\"", true, false).is_ok());
        let tls = "proxy_listen: \"[::]:8443\"\nproxy: {tls: {cert_file: a.pem, key_file: a.key}}";
        // (no side files in /etc/kb: the embedded catalog, currencies and prices apply)
        let c = Config::from_yaml(tls, Some(Path::new("/etc/kb")), &o).unwrap();
        assert_eq!(
            c.proxy.tls.as_ref().unwrap().cert_file,
            Path::new("/etc/kb/a.pem"),
            "relative to the config file's directory"
        );
        let named = "vendors_file: my-vendors.yaml";
        let e = format!(
            "{:#}",
            Config::from_yaml(named, Some(Path::new("/nonexistent-kb")), &o).unwrap_err()
        );
        assert!(
            e.starts_with("vendors_file: cannot read /nonexistent-kb/my-vendors.yaml"),
            "{e}"
        );
        let c = Config::from_yaml(tls, None, &o).unwrap();
        assert_eq!(
            c.proxy.tls.as_ref().unwrap().cert_file,
            Path::new("a.pem"),
            "relative to the working directory without a config file"
        );
        let both = "proxy: {plaintext: true, tls: {cert_file: a, key_file: b}}";
        assert!(
            format!("{:#}", Config::from_yaml(both, None, &o).unwrap_err())
                .contains("both tls and plaintext")
        );
        let err = opened("control_listen: \"10.0.0.1:8081\"", false, true).unwrap_err();
        assert!(err.contains("control.tls"), "{err}");
        let err = Config::from_yaml("metrics_listen: \"10.0.0.1:9090\"", None, &o).unwrap_err();
        assert!(format!("{err:#}").contains("metrics.plaintext"), "{err:#}");
        let overridden = Overrides {
            proxy_listen: Some("0.0.0.0:1".into()),
            ..Overrides::default()
        };
        assert!(
            Config::from_yaml("", None, &overridden)
                .and_then(|c| c.check_files(true, false))
                .is_err(),
            "a flag is held to it too"
        );
    }

    #[test]
    fn listener_limits_have_bounded_defaults_and_are_validated() {
        let o = Overrides::default();
        let c = Config::from_yaml("", None, &o).unwrap();
        assert_eq!(c.proxy.header_timeout, Duration::from_secs(10));
        assert_eq!(c.proxy.max_header_bytes, 32 * 1024);
        assert_eq!(c.control.header_timeout, Duration::from_secs(5));
        assert_eq!(c.control.limits.max_total, 1024);
        assert_eq!(c.control.limits.max_per_client, 64);
        for bad in [
            "proxy: {header_timeout_ms: 0}",
            "proxy: {max_connections: 0}",
            "control: {max_header_bytes: 4096}",
            "proxy: {request_timeout_ms: 5}",
            "control: {keepalive_timeout_ms: 5}",
            "proxy: {max_header_bytes: 2000000}",
        ] {
            assert!(Config::from_yaml(bad, None, &o).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_vendor_may_name_its_own_ca_file() {
        let v = parse_vendors(
            "acme: {upstream: \"https://acme.example\", auth: bearer, ca_file: acme-ca.pem}",
        )
        .unwrap();
        assert_eq!(v["acme"].ca_file.as_deref(), Some(Path::new("acme-ca.pem")));
        let c = Config::from_yaml(
            "upstream: {ca_file: /etc/ca.pem}",
            None,
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.upstream.ca_file.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );
        assert!(c.vendors["stripe"].ca_file.is_none());
    }

    #[test]
    fn duration_fields_take_the_one_syntax_or_an_integer_in_their_unit() {
        let load = |text: &str| Config::from_yaml(text, None, &Overrides::default());
        let c = load(
            "default_key_ttl: 300\nmax_key_ttl: \"2h\"\nbody_read_timeout_ms: \"3s\"\n\
             upstream: {read_timeout_ms: 1500, dns_refresh_seconds: \"1m\"}\n\
             pingora: {grace_period_seconds: \"4s\"}",
        )
        .unwrap();
        assert_eq!(c.default_key_ttl, Duration::from_secs(300));
        assert_eq!(c.max_key_ttl, Duration::from_secs(7200));
        assert_eq!(c.body_read_timeout, Duration::from_secs(3));
        assert_eq!(c.upstream.read, Duration::from_millis(1500));
        assert_eq!(c.upstream.dns_refresh, Duration::from_secs(60));
        assert_eq!(c.pingora.grace_period_seconds, 4);
        for (bad, why) in [
            ("default_key_ttl: \"0s\"", "longer than zero"),
            ("max_key_ttl: \"5x\"", "unit must be"),
            (
                "pingora: {grace_period_seconds: \"2500ms\"}",
                "whole seconds",
            ),
            ("control: {header_timeout_ms: \"0ms\"}", "must be positive"),
            ("upstream: {idle_timeout_ms: -1}", "negative"),
        ] {
            let e = format!("{:#}", load(bad).unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn settings_below_their_minimum_are_errors_not_raised_in_silence() {
        for (yaml, named) in [
            ("leases: {lifetime_seconds: 2}", "leases.lifetime_seconds"),
            (
                "leases: {report_interval_ms: 5}",
                "leases.report_interval_ms",
            ),
            (
                "upstream: {dns_refresh_seconds: 0}",
                "upstream.dns_refresh_seconds",
            ),
            ("upstream: {read_timeout_ms: 0}", "upstream.read_timeout_ms"),
            (
                "upstream: {connect_timeout_ms: 0}",
                "upstream.connect_timeout_ms",
            ),
            (
                "upstream: {write_timeout_ms: 0}",
                "upstream.write_timeout_ms",
            ),
            ("data_dir: \"\"", "data_dir must name a directory"),
            (
                "upstream: {connect_timeout_ms: 10000, total_connection_timeout_ms: 1000}",
                "upstream.total_connection_timeout_ms (1000 ms) is shorter",
            ),
            (
                "proxy: {tls: {cert_file: c.pem, key_file: k.pem, watch_interval_ms: 10}}",
                "tls.watch_interval_ms",
            ),
        ] {
            let err = Config::from_yaml(yaml, None, &Overrides::default()).unwrap_err();
            assert!(format!("{err:#}").contains(named), "{yaml}: {err:#}");
        }
        let c = Config::from_yaml("leases: {lifetime_seconds: 3}", None, &Overrides::default())
            .unwrap();
        assert_eq!(c.leases.lifetime, Duration::from_secs(3));
    }

    #[test]
    fn vendor_upstream_override() {
        let o = Overrides {
            vendor_upstreams: vec!["stripe=http://127.0.0.1:8420".into()],
            ..Default::default()
        };
        let c = Config::from_yaml("", None, &o).unwrap();
        let u = &c.vendors["stripe"].upstream;
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 8420));
    }

    #[test]
    fn stripe_endpoints_are_metered_free_or_unmetered() {
        let c = Config::from_yaml("", None, &Overrides::default()).unwrap();
        let stripe = &c.vendors["stripe"];
        let class = |m: &str, p: &str| match stripe.classify(&m.parse().unwrap(), p) {
            Class::Metered(_) | Class::TokenMetered => "metered",
            Class::Free => "free",
            Class::Unmetered => "unmetered",
        };
        assert_eq!(stripe.unmetered, UnmeteredPolicy::Refuse);
        for (m, p, expected) in [
            ("POST", "/v1/payment_intents", "metered"),
            ("POST", "/v1/payment_intents/pi_1/confirm", "metered"),
            ("POST", "/v1/subscriptions", "metered"),
            ("POST", "/v1/invoices/in_1/pay", "metered"),
            ("POST", "/v1/invoices/in_1/finalize", "metered"),
            ("GET", "/v1/anything/at/all", "free"),
            ("POST", "/v1/customers", "free"),
            ("POST", "/v1/payment_intents/pi_1", "free"),
            ("POST", "/v1/refunds", "free"),
            ("POST", "/v1/subscriptions/sub_1", "unmetered"),
            ("POST", "/v1/subscription_items", "unmetered"),
            ("POST", "/v1/subscription_schedules", "unmetered"),
            ("POST", "/v1/invoices", "unmetered"),
            ("POST", "/v1/quotes/qt_1/accept", "unmetered"),
            ("POST", "/v1/checkout/sessions", "unmetered"),
            ("POST", "/v1/payment_links", "unmetered"),
            ("POST", "/v1/topups", "unmetered"),
            ("POST", "/v1/charges/ch_1/capture", "unmetered"),
            ("POST", "/v1/treasury/outbound_payments", "unmetered"),
            (
                "POST",
                "/v1/issuing/authorizations/iauth_1/approve",
                "unmetered",
            ),
            (
                "POST",
                "/v2/money_management/outbound_payments",
                "unmetered",
            ),
            ("DELETE", "/v1/subscriptions/sub_1", "unmetered"),
            ("PUT", "/v1/customers", "unmetered"),
        ] {
            assert_eq!(class(m, p), expected, "{m} {p}");
        }
        // Response- and item-metered rules must say what to reserve.
        let err = parse_vendors(
            "x: {upstream: 'http://a', auth: bearer, metered: [{endpoint: 'POST /a/*/pay', from: response, amount_fields: [amount]}]}",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("needs reserve"), "{err:#}");
        assert_eq!(c.vendors["openai"].unmetered, UnmeteredPolicy::Refuse);
        assert_eq!(c.vendors["anthropic"].unmetered, UnmeteredPolicy::Refuse);
        // No vendor ships with a placeholder upstream that would receive a secret.
        assert!(!c.vendors.contains_key("generic"));
        assert!(c
            .vendors
            .values()
            .all(|v| !v.upstream.host.contains("example")));
        let openai = &c.vendors["openai"];
        let anthropic = &c.vendors["anthropic"];
        let of = |v: &Vendor, m: &str, p: &str| match v.classify(&m.parse().unwrap(), p) {
            Class::Metered(_) | Class::TokenMetered => "metered",
            Class::Free => "free",
            Class::Unmetered => "unmetered",
        };
        for (v, m, p, expected) in [
            (openai, "POST", "/v1/chat/completions", "metered"),
            (openai, "POST", "/v1/moderations", "free"),
            (openai, "POST", "/v1/images/generations", "unmetered"),
            (openai, "POST", "/v1/batches", "unmetered"),
            (openai, "POST", "/v1/completions", "unmetered"),
            (openai, "POST", "/v1/audio/speech", "unmetered"),
            (openai, "POST", "/v1/fine_tuning/jobs", "unmetered"),
            (anthropic, "POST", "/v1/messages/count_tokens", "free"),
            (anthropic, "POST", "/v1/messages/batches", "unmetered"),
            (anthropic, "POST", "/v1/complete", "unmetered"),
        ] {
            assert_eq!(of(v, m, p), expected, "{} {m} {p}", v.name);
        }
        let reach = |p: &[&str]| {
            stripe.unmetered_reach(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert!(reach(&[
            "POST /v1/payment_intents",
            "GET /v1/**",
            "POST /v1/customers/*"
        ])
        .is_empty());
        assert_eq!(reach(&["/v1/**"]).len(), 1);
        assert_eq!(
            reach(&["POST /v1/subscriptions/*", "POST /v1/topups"]).len(),
            2
        );
        assert_eq!(
            c.vendors["openai"]
                .unmetered_reach(&["/v1/**".into()])
                .len(),
            1
        );
        assert!(c.vendors["openai"]
            .unmetered_reach(&["POST /v1/chat/completions".into(), "GET /v1/**".into()])
            .is_empty());
    }
}
