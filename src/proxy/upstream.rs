//! Stage 9: where a vendor's requests go. Host names are resolved in the background and
//! published as socket addresses, because Pingora's `HttpPeer::new` resolves DNS
//! synchronously (and panics on failure) if handed a name. Every timeout is explicit.

use crate::config::{UpstreamTimeouts, Vendor};
use crate::Map;
use arc_swap::ArcSwapOption;
use pingora::upstreams::peer::HttpPeer;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct Upstreams {
    addrs: Map<String, ArcSwapOption<SocketAddr>>,
    timeouts: UpstreamTimeouts,
    /// The CAs a vendor's certificate is checked against when the vendor or the upstream
    /// section names a `ca_file` (else Pingora's: the system roots).
    cas: Map<String, Arc<pingora::protocols::tls::CaType>>,
    /// Vendors whose last resolution failed: a failure is logged when it starts, not on
    /// every refresh (a host without a route to an unused vendor would warn forever).
    failing: Map<String, AtomicBool>,
}

impl Upstreams {
    pub fn new(vendors: &Map<String, Vendor>, timeouts: UpstreamTimeouts) -> anyhow::Result<Self> {
        let mut cas = Map::default();
        for v in vendors.values() {
            if let Some(file) = v.ca_file.as_ref().or(timeouts.ca_file.as_ref()) {
                let ca = crate::tls::upstream_ca(file)
                    .map_err(|e| anyhow::anyhow!("vendor {} ca_file: {e:#}", v.name))?;
                cas.insert(v.name.clone(), ca);
            }
        }
        let addrs = vendors
            .values()
            .map(|v| {
                let fixed = v
                    .upstream
                    .host
                    .parse::<IpAddr>()
                    .ok()
                    .map(|ip| Arc::new(SocketAddr::new(ip, v.upstream.port)));
                (v.name.clone(), ArcSwapOption::new(fixed))
            })
            .collect();
        let failing = vendors
            .keys()
            .map(|name| (name.clone(), AtomicBool::new(false)))
            .collect();
        Ok(Upstreams {
            addrs,
            timeouts,
            cas,
            failing,
        })
    }

    /// The peer for a vendor, or `None` while its name has never resolved.
    pub fn peer(&self, vendor: &Vendor) -> Option<HttpPeer> {
        let addr = *self.addrs.get(&vendor.name)?.load_full()?;
        let mut peer = HttpPeer::new(addr, vendor.upstream.tls, vendor.upstream.host.clone());
        let t = &self.timeouts;
        peer.options.connection_timeout = Some(t.connect);
        peer.options.total_connection_timeout = Some(t.total_connection);
        peer.options.read_timeout = Some(t.read);
        peer.options.write_timeout = Some(t.write);
        peer.options.idle_timeout = Some(t.idle);
        // Certificate and host-name verification stay on (Pingora's defaults).
        peer.options.ca = self.cas.get(&vendor.name).cloned();
        Some(peer)
    }

    /// Resolves every vendor host named by DNS; keeps the last good address on failure.
    pub async fn refresh(&self, vendors: &Map<String, Vendor>) {
        for v in vendors.values() {
            if v.upstream.host.parse::<IpAddr>().is_ok() {
                continue;
            }
            let target = (v.upstream.host.as_str(), v.upstream.port);
            let failure =
                match tokio::time::timeout(self.timeouts.connect, tokio::net::lookup_host(target))
                    .await
                {
                    Ok(Ok(mut found)) => match found.next() {
                        Some(addr) => {
                            if let Some(slot) = self.addrs.get(&v.name) {
                                slot.store(Some(Arc::new(addr)));
                            }
                            None
                        }
                        None => Some("no address".to_string()),
                    },
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("timed out".to_string()),
                };
            self.note_resolution(v, failure);
        }
    }

    /// Logs a vendor's resolution when it starts failing and when it works again.
    fn note_resolution(&self, v: &Vendor, failure: Option<String>) {
        let Some(failing) = self.failing.get(&v.name) else {
            return;
        };
        match failure {
            Some(why) if !failing.swap(true, Ordering::Relaxed) => log::warn!(
                "cannot resolve {} for vendor {}: {why} (tried again every refresh, \
                 logged again once it resolves)",
                v.upstream.host,
                v.name
            ),
            None if failing.swap(false, Ordering::Relaxed) => {
                log::info!("{} resolves again for vendor {}", v.upstream.host, v.name)
            }
            _ => {}
        }
    }
}
