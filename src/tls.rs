//! TLS of every hop (SPEC §8): the certificates the proxy and the control API serve,
//! renewed without a restart; the roots the CLI trusts for the control API; the extra CA
//! a vendor's connections may trust. rustls with the ring provider, as Pingora uses.
//!
//! Renewal: a watcher thread reads the certificate and key files every `watch_interval`
//! and, when their bytes changed and load as a matching pair, publishes the new pair.
//! Handshakes read the current pair per connection, so connections already open keep
//! theirs and every new one gets the new certificate; nothing is dropped. A pair that
//! does not load (a half-written renewal) is logged and the old one kept, and so is an
//! expired one while the current certificate is still valid. An expired or not yet valid
//! certificate, one that expires within 14 days, and a key file other users can read are
//! logged at start and by `keybrake check`; `keybrake_tls_certificate_expiry_timestamp_seconds`
//! tells Prometheus when each listener's certificate runs out.

use anyhow::{anyhow, bail, Context, Result};
use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// A certificate this close to its end is logged at every load.
const EXPIRY_WARNING_SECS: i64 = 14 * 86_400;

/// The certificate chain and key files of a listener (`proxy.tls`, `control.tls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the leaf first, then intermediates.
    pub cert_file: PathBuf,
    /// PEM: PKCS#8, PKCS#1 or SEC1.
    pub key_file: PathBuf,
    /// How often the files are checked for a renewal.
    pub watch_interval: Duration,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in the file", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| {
            let encrypted = pem.windows(21).any(|w| w == b"ENCRYPTED PRIVATE KEY");
            anyhow!(
                "{}: no PEM private key in the file{}",
                path.display(),
                if encrypted {
                    " (it holds an encrypted one: give the key unencrypted, readable by the \
                     service user only, e.g. `openssl pkey -in KEY -out KEY.plain`)"
                } else {
                    ""
                }
            )
        })
}

/// Loads a certificate chain and its key, checking that they belong together.
fn load_pair(files: &TlsFiles) -> Result<CertifiedKey> {
    let certs = read_certs(&files.cert_file)?;
    let key = read_key(&files.key_file)?;
    let key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow!("{}: unusable private key: {e}", files.key_file.display()))?;
    let pair = CertifiedKey::new(certs, key);
    pair.keys_match().map_err(|e| {
        anyhow!(
            "{} and {} do not belong together: {e} (the certificate file must start with \
             the certificate of this key, followed by its chain)",
            files.cert_file.display(),
            files.key_file.display()
        )
    })?;
    Ok(pair)
}

/// The leaf certificate's validity, unix seconds: (not before, not after).
fn validity(pair: &CertifiedKey) -> Option<(i64, i64)> {
    let leaf = pair.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

fn utc(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// `keybrake_tls_certificate_expiry_timestamp_seconds{listener}`.
fn expiry_gauge() -> Option<&'static prometheus::IntGaugeVec> {
    static GAUGE: OnceLock<Option<prometheus::IntGaugeVec>> = OnceLock::new();
    GAUGE
        .get_or_init(|| {
            prometheus::register_int_gauge_vec!(
                "keybrake_tls_certificate_expiry_timestamp_seconds",
                "When the certificate a TLS listener serves expires (unix seconds)",
                &["listener"]
            )
            .ok()
        })
        .as_ref()
}

/// A listener's certificate, replaced when its files change.
pub struct ReloadingCert {
    /// `proxy` or `control`, for the logs and the metric.
    listener: &'static str,
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    /// The current certificate's end of validity (unix s; 0 if unreadable).
    not_after: AtomicI64,
    /// The bytes of both files when last loaded (or last found unloadable).
    seen: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_file", &self.files.cert_file)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair for the `listener` (`proxy`, `control`), logging what an operator
    /// must fix soon: dates, a key file others can read.
    pub fn load(listener: &'static str, files: &TlsFiles) -> Result<Arc<Self>> {
        let seen = Self::fingerprint(files);
        let pair = load_pair(files)?;
        crate::secret::warn_if_world_readable(&files.key_file, "TLS key");
        let cert = Arc::new(ReloadingCert {
            listener,
            files: files.clone(),
            not_after: AtomicI64::new(0),
            current: ArcSwap::from_pointee(pair),
            seen: Mutex::new(seen),
        });
        cert.published(&cert.current.load());
        Ok(cert)
    }

    /// Records (and logs, if they need care) the dates of the pair just published.
    fn published(&self, pair: &CertifiedKey) {
        let (not_before, not_after) = validity(pair).unwrap_or((0, 0));
        self.not_after.store(not_after, Ordering::Release);
        if let Some(g) = expiry_gauge() {
            g.with_label_values(&[self.listener]).set(not_after);
        }
        let now = crate::token::now_secs();
        let (listener, file) = (self.listener, self.files.cert_file.display());
        if not_after == 0 {
            log::warn!("{listener} TLS certificate {file}: its dates could not be read");
        } else if not_after < now {
            log::error!(
                "{listener} TLS certificate {file} expired at {}: clients refuse it; renew it \
                 (the new files are picked up without a restart)",
                utc(not_after)
            );
        } else if not_before > now {
            log::error!(
                "{listener} TLS certificate {file} is not valid before {}: clients refuse it",
                utc(not_before)
            );
        } else if not_after - now < EXPIRY_WARNING_SECS {
            log::warn!(
                "{listener} TLS certificate {file} expires at {}, in {} days: renew it",
                utc(not_after),
                (not_after - now) / 86_400
            );
        }
    }

    /// Both files' bytes (the key is kept only in this process's memory, as it is by
    /// rustls anyway); empty when either cannot be read.
    fn fingerprint(files: &TlsFiles) -> Vec<u8> {
        let mut bytes = std::fs::read(&files.cert_file).unwrap_or_default();
        bytes.extend(std::fs::read(&files.key_file).unwrap_or_default());
        bytes
    }

    /// Loads the files again if they changed; true if a new pair was published.
    pub fn reload_if_changed(&self) -> bool {
        let now = Self::fingerprint(&self.files);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if now.is_empty() || *seen == now {
            return false;
        }
        let listener = self.listener;
        *seen = now;
        match load_pair(&self.files) {
            Ok(pair) => {
                // An expired renewal would only replace a certificate clients still take.
                let expired =
                    |not_after: i64| not_after != 0 && not_after < crate::token::now_secs();
                let new_end = validity(&pair).map_or(0, |v| v.1);
                if expired(new_end) && !expired(self.not_after.load(Ordering::Acquire)) {
                    log::error!(
                        "{listener} TLS certificate {} not reloaded: the new one expired at {}; \
                         keeping the current one",
                        self.files.cert_file.display(),
                        utc(new_end)
                    );
                    return false;
                }
                crate::secret::warn_if_world_readable(&self.files.key_file, "TLS key");
                let pair = Arc::new(pair);
                self.current.store(pair.clone());
                log::info!(
                    "{listener} TLS certificate {} reloaded (valid until {})",
                    self.files.cert_file.display(),
                    utc(new_end)
                );
                self.published(&pair);
                true
            }
            Err(e) => {
                // Probably a renewal caught halfway: tried again when the bytes change.
                log::warn!(
                    "{listener} TLS certificate not reloaded, keeping the current one: {e:#}"
                );
                false
            }
        }
    }

    pub fn watch_interval(&self) -> Duration {
        self.files.watch_interval
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Checks every certificate for renewal on its own interval, on a thread of its own (file
/// reads never run on a request runtime).
pub fn watch(certs: Vec<Arc<ReloadingCert>>) {
    if certs.is_empty() {
        return;
    }
    let tick = certs
        .iter()
        .map(|c| c.watch_interval())
        .min()
        .unwrap_or(Duration::from_secs(10))
        .max(Duration::from_millis(50));
    let spawned = std::thread::Builder::new()
        .name("tls-watch".into())
        .spawn(move || loop {
            std::thread::sleep(tick);
            for c in &certs {
                c.reload_if_changed();
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the TLS certificate watcher: {e}");
    }
}

/// A server configuration (TLS 1.2 and 1.3) serving `cert`, offering `alpn` in order.
pub fn server_config(
    cert: Arc<ReloadingCert>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The system's trusted roots (honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`), plus the
/// certificates of `ca_file` when given.
pub fn roots_with(ca_file: Option<&Path>) -> Result<Vec<CertificateDer<'static>>> {
    let mut roots = match rustls_native_certs_load() {
        Ok(r) => r,
        Err(e) if ca_file.is_some() => {
            log::warn!("system CA certificates unavailable ({e}); trusting the CA file only");
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    if let Some(file) = ca_file {
        roots.extend(read_certs(file)?);
    }
    Ok(roots)
}

fn rustls_native_certs_load() -> Result<Vec<CertificateDer<'static>>> {
    pingora::tls::load_native_certs()
        .map_err(|e| anyhow!("cannot load the system CA certificates: {e}"))
}

/// The client configuration of the CLI (and of anything else that calls the control API):
/// certificate and host-name verification against the system roots plus `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>> {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots_with(ca_file)? {
        // A system root rustls cannot parse is skipped, as rustls-native-certs users do.
        let _ = store.add(cert);
    }
    if store.is_empty() {
        bail!("no trusted CA certificate (set --ca-file or KEYBRAKE_CA_FILE)");
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(store)
            .with_no_client_auth(),
    ))
}

/// What to do about a failed call to the control plane at `url`, from the error's text
/// (empty when there is nothing to add).
pub fn connect_hint(url: &str, error: &str) -> &'static str {
    if url.starts_with("http://") && error.contains("[21, 3,") {
        // A TLS alert record (0x15 0x03) read as an HTTP answer: the listener speaks TLS.
        " (it answers in TLS: use an https:// --control-url)"
    } else if url.starts_with("https://")
        && (error.contains("InvalidContentType") || error.contains("corrupt message"))
    {
        // An HTTP answer read as a TLS record: the listener speaks plain HTTP.
        " (it answers in plain HTTP, not TLS: give its TLS files in control.tls, or use an \
         http:// --control-url on this host)"
    } else if error.contains("UnknownIssuer") {
        " (a certificate from a private CA: give the CA with --ca-file or KEYBRAKE_CA_FILE)"
    } else {
        ""
    }
}

/// A control URL's scheme, refused when it would carry a secret in clear text off this
/// host: `https://` anywhere; `http://` only to a loopback address or `localhost` (the
/// same rule as the plain-HTTP listeners, from the client's side). `what` names the secret.
pub fn check_control_url(url: &str, what: &str) -> Result<()> {
    // Parsed as the HTTP client parses it (the WHATWG rules of the `url` crate, where
    // `\` ends the authority like `/`): the host checked is the host connected to.
    let parsed = url::Url::parse(url).ok();
    match parsed.as_ref().map(url::Url::scheme) {
        Some("https") => return Ok(()),
        Some("http") => {}
        _ => bail!("--control-url must be an http:// or https:// URL, not {url}"),
    }
    let loopback = match parsed.as_ref().and_then(url::Url::host) {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if !loopback {
        bail!(
            "--control-url {url} is plain HTTP to another host: {what} would cross the network \
             in clear text. Use https:// (the control plane's TLS, or the TLS-terminating \
             balancer in front of it; --ca-file for a private CA)"
        );
    }
    Ok(())
}

/// The CA list Pingora checks a vendor's certificate against when the vendor (or the
/// `upstream` section) names a `ca_file`: the system roots plus that file's certificates.
pub fn upstream_ca(ca_file: &Path) -> Result<Arc<pingora::protocols::tls::CaType>> {
    let roots = roots_with(Some(ca_file))?;
    let list: Vec<pingora::utils::tls::WrappedX509> = roots
        .into_iter()
        .map(|der| {
            pingora::utils::tls::WrappedX509::new(der.to_vec(), pingora::utils::tls::parse_x509)
        })
        .collect();
    Ok(list.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_allowed_only_to_this_host() {
        for ok in [
            "https://control.internal:8081",
            "http://127.0.0.1:8081",
            "http://127.8.9.10:8081/",
            "http://[::1]:8081",
            "http://localhost:8081",
            "http://LocalHost",
        ] {
            assert!(check_control_url(ok, "the token").is_ok(), "{ok}");
        }
        for refused in [
            "http://10.0.0.5:8081",
            "http://control.internal:8081",
            "http://[2001:db8::1]:8081",
            "http://127.0.0.1@evil.example:8081",
            "http://localhost.evil.example",
            "http://0.0.0.0:8081\\@127.0.0.1",
            "http://evil.example\\@127.0.0.1:8081",
            "http://10.0.0.5:8081\\.127.0.0.1",
            "ftp://127.0.0.1",
            "127.0.0.1:8081",
        ] {
            let e = check_control_url(refused, "the token")
                .unwrap_err()
                .to_string();
            assert!(e.contains(refused), "{refused}: {e}");
        }
    }

    #[test]
    fn a_failed_call_says_which_side_speaks_tls() {
        let plain =
            "tls connection init failed: received corrupt message of type InvalidContentType";
        assert!(connect_hint("https://127.0.0.1:8081", plain).contains("plain HTTP"));
        assert!(
            connect_hint("http://127.0.0.1:8081", "bad header [21, 3, 3, 0]").contains("https://")
        );
        assert!(
            connect_hint("https://c:8081", "invalid peer certificate: UnknownIssuer")
                .contains("--ca-file")
        );
        assert_eq!(connect_hint("https://c:8081", "Connection refused"), "");
    }

    #[test]
    fn a_missing_or_empty_file_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("kb-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = read_certs(&empty).unwrap_err().to_string();
        assert!(err.contains("no certificate"), "{err}");
        let files = TlsFiles {
            cert_file: dir.join("absent.pem"),
            key_file: dir.join("absent.key"),
            watch_interval: Duration::from_secs(1),
        };
        let err = format!("{:#}", ReloadingCert::load("proxy", &files).unwrap_err());
        assert!(err.contains("absent.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
