//! A bare Pingora passthrough: the baseline `load-tests/proxy_overhead.sh` compares
//! Keybrake against. It forwards every request unchanged to one plain-HTTP upstream,
//! with the same thread count and keep-alive pooling as `keybrake serve`.
//!
//! Usage: passthrough --listen 127.0.0.1:P --upstream 127.0.0.1:U [--threads N] [--timeouts]
//!        [--tls-cert FILE --tls-key FILE]
//!
//! `--timeouts` sets the upstream timeouts `keybrake serve` sets by default (connect 2 s,
//! connect + TLS 5 s, read 60 s, write 30 s, idle 60 s): a baseline that pays for the same
//! timers, to tell their cost apart from Keybrake's own work.
//!
//! `--tls-cert`/`--tls-key` serve HTTPS with Pingora's own TLS listener (rustls, HTTP/2 and
//! HTTP/1.1 by ALPN): the baseline of `load-tests/tls_overhead.sh`.

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::server::configuration::{Opt, ServerConf};
use std::net::SocketAddr;
use std::time::Duration;

/// The same allocator as `keybrake`, so the comparison measures Keybrake's work, not the
/// allocator's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: String,
    #[arg(long)]
    upstream: SocketAddr,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long)]
    timeouts: bool,
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<String>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<String>,
}

struct Passthrough {
    upstream: SocketAddr,
    timeouts: bool,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        if self.timeouts {
            let o = &mut peer.options;
            o.connection_timeout = Some(Duration::from_secs(2));
            o.total_connection_timeout = Some(Duration::from_secs(5));
            o.read_timeout = Some(Duration::from_secs(60));
            o.write_timeout = Some(Duration::from_secs(30));
            o.idle_timeout = Some(Duration::from_secs(60));
        }
        Ok(Box::new(peer))
    }
}

fn main() {
    let args = Args::parse();
    let conf = ServerConf {
        threads: args.threads,
        ..Default::default()
    };
    let opt = Opt {
        upgrade: false,
        daemon: false,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        Passthrough {
            upstream: args.upstream,
            timeouts: args.timeouts,
        },
    );
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let mut tls = pingora::listeners::tls::TlsSettings::intermediate(cert, key)
                .expect("TLS certificate and key files");
            tls.enable_h2();
            proxy.add_tls_with_settings(&args.listen, None, tls);
        }
        _ => proxy.add_tcp(&args.listen),
    }
    server.add_service(proxy);
    server.run_forever();
}
