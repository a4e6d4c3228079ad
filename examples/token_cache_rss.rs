//! Memory of the proxy's key state at fleet scale: the verified-token cache
//! (`proxy::verify::KeyVerifier`) filled with `--keys` distinct live vault keys and the
//! revocation filter (`revocation::RevocationFilter`, what `Published` holds) with
//! `--revoked` ids, built in this process exactly as `serve` and an edge node build
//! them; prints the process's RSS before and after. Used by
//! `load-tests/token_cache_rss.sh`.
//!
//! The tokens are minted here with a fresh Ed25519 signing key (the key a data dir
//! holds, published to the verifier as a JWKS), with the claims `POST /v1/keys` issues;
//! each is verified once (signature checked, claims decoded, allowlist compiled, cached)
//! and then dropped, so what stays is what the cache holds. Issuing a million keys
//! through the control API would measure SQLite, not the proxy.
//!
//!   cargo run --release --example token_cache_rss -- [--keys N] [--revoked N]
//!       [--cache-entries N] [--threads N]

use keybrake::metrics::Metrics;
use keybrake::proxy::verify::KeyVerifier;
use keybrake::revocation::RevocationFilter;
use keybrake::sync::Published;
use keybrake::token::{generate_ed25519, now_secs, Claims, Jwk, Jwks, SigningKey, Verifier};
use std::sync::Arc;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// An id shaped like the control plane's (`key_` + 26 base32 characters).
fn id(prefix: &str, n: usize) -> String {
    format!("{prefix}_{n:026}")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let keys = arg(&args, "--keys", 1_000_000);
    let revoked = arg(&args, "--revoked", 100_000);
    let entries = arg(&args, "--cache-entries", 1 << 20);
    let threads = arg(&args, "--threads", 2).max(1);

    let (pkcs8, public) = generate_ed25519();
    let signer = SigningKey::from_pkcs8("kid_rss".into(), &pkcs8).expect("signing key");
    let published = Arc::new(Published::empty());
    published.verifier.store(Arc::new(Verifier::new(&Jwks {
        keys: vec![Jwk::ed25519("kid_rss", &public)],
    })));
    let verifier = KeyVerifier::new(published.clone(), entries, Metrics::global());
    let start = rss_mib();
    println!("RSS at start: {start:.1} MiB");

    let filter = RevocationFilter::with_capacity(revoked.max(1024));
    let now = now_secs();
    for n in 0..revoked {
        filter.insert(&id("key_revoked", n), now + 3600);
    }
    published.revocations.store(Arc::new(filter));
    let after_revoked = rss_mib();
    println!("RSS with {revoked} revoked ids: {after_revoked:.1} MiB");

    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (signer, verifier) = (&signer, &verifier);
            s.spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("a runtime");
                for n in (t..keys).step_by(threads) {
                    let claims = Claims {
                        jti: id("key", n),
                        ten: id("tn", n % 1000),
                        ven: "stripe".into(),
                        eps: vec!["POST /v1/payment_intents".into()],
                        cap: 5_000_000,
                        iat: now,
                        exp: now + 3600,
                        lbl: "agent-run".into(),
                        acc: None,
                    };
                    let token = signer.sign(&claims);
                    runtime
                        .block_on(verifier.verify(token.expose(), now))
                        .expect("a freshly minted token verifies");
                }
            });
        }
    });
    let full = rss_mib();
    println!(
        "RSS with {keys} live keys verified: {full:.1} MiB ({} verified digests cached, {} keys \
         in use cached; {:.0} s to mint and verify)",
        verifier.cached(),
        verifier.cached_keys(),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "per live key: {:.0} bytes",
        (full - after_revoked) * 1024.0 * 1024.0 / keys.max(1) as f64
    );
    println!("RSS_MIB={full:.1}");
}
