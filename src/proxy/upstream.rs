//! Stage 9: where a vendor's requests go. Host names are resolved in the background and
//! published as socket addresses, because Pingora's `HttpPeer::new` resolves DNS
//! synchronously (and panics on failure) if handed a name. Every timeout is explicit.

use crate::config::{UpstreamTimeouts, Vendor};
use crate::Map;
use arc_swap::ArcSwapOption;
use pingora::upstreams::peer::HttpPeer;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub struct Upstreams {
    addrs: Map<String, ArcSwapOption<SocketAddr>>,
    timeouts: UpstreamTimeouts,
    /// The CAs a vendor's certificate is checked against when the vendor or the upstream
    /// section names a `ca_file` (else Pingora's: the system roots).
    cas: Map<String, Arc<pingora::protocols::tls::CaType>>,
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
        Ok(Upstreams {
            addrs,
            timeouts,
            cas,
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
            match tokio::time::timeout(self.timeouts.connect, tokio::net::lookup_host(target)).await
            {
                Ok(Ok(mut found)) => {
                    if let (Some(addr), Some(slot)) = (found.next(), self.addrs.get(&v.name)) {
                        slot.store(Some(Arc::new(addr)));
                    }
                }
                Ok(Err(e)) => log::warn!(
                    "cannot resolve {} for vendor {}: {e}",
                    v.upstream.host,
                    v.name
                ),
                Err(_) => log::warn!(
                    "resolving {} for vendor {} timed out",
                    v.upstream.host,
                    v.name
                ),
            }
        }
    }
}
