//! The proxy's hot path, stage by stage: token check (uncached, in batches of fresh keys,
//! and cached), endpoint match, revocation lookup, path canonicalization, a spend
//! reservation, an idempotent call's admission, and the look for a vault key elsewhere in
//! the request than where it is read.
//! Run: `cargo bench --bench hot_path`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keybrake::metrics::Metrics;
use keybrake::money::Micros;
use keybrake::pattern::Allowlist;
use keybrake::proxy::idempotency::{Admission, Call, IdempotencyBook};
use keybrake::proxy::path::canonicalize;
use keybrake::proxy::spend::{SpendBook, Spender};
use keybrake::proxy::verify::KeyVerifier;
use keybrake::revocation::RevocationFilter;
use keybrake::sync::{
    Grant, LeaseCommit, LeaseReport, LeaseRequest, Ledger, LedgerError, Published,
};
use keybrake::token::{generate_ed25519, now_secs, Claims, Jwk, Jwks, SigningKey, Verifier};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

struct NoWake;

impl Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

/// The output of a future that does not wait (a cached key's check never does).
fn ready<F: Future>(f: F) -> F::Output {
    let waker = Waker::from(Arc::new(NoWake));
    match std::pin::pin!(f).poll(&mut Context::from_waker(&waker)) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the future waited"),
    }
}

fn claims() -> Claims {
    let now = now_secs();
    Claims {
        jti: "key_bench".into(),
        ten: "tn_bench".into(),
        ven: "stripe".into(),
        eps: vec![
            "/v1/payment_intents".into(),
            "/v1/payment_intents/*".into(),
            "GET /v1/customers/**".into(),
        ],
        cap: 1_000_000_000_000,
        iat: now,
        exp: now + 3600,
        lbl: "bench".into(),
        acc: None,
    }
}

fn token_check(c: &mut Criterion) {
    let (private, public) = generate_ed25519();
    let signer = SigningKey::from_pkcs8("kid_1".into(), &private).unwrap();
    let jwks = Jwks {
        keys: vec![Jwk::ed25519("kid_1", &public)],
    };
    let token = signer.sign(&claims());
    let verifier = Verifier::new(&jwks);
    c.bench_function("token_check_uncached", |b| {
        b.iter(|| verifier.verify(black_box(token.expose())).unwrap())
    });

    let published = Arc::new(Published::empty());
    published.verifier.store(Arc::new(Verifier::new(&jwks)));
    let cached = KeyVerifier::new(published, 100_000, Metrics::global());
    let now = now_secs();
    // The first check of a token waits for its signature's batch: on a runtime.
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(cached.verify(token.expose(), now))
        .unwrap();
    c.bench_function("token_check_cached", |b| {
        b.iter(|| ready(cached.verify(black_box(token.expose()), now)).unwrap())
    });

    // Fresh keys' signatures checked together (per signature: throughput in elements).
    let tokens: Vec<_> = (0..32)
        .map(|i| {
            let mut c = claims();
            c.jti = format!("key_bench_{i}");
            signer.sign(&c)
        })
        .collect();
    let mut group = c.benchmark_group("token_check_batch");
    for size in [1, 4, 16, 32] {
        let parsed: Vec<_> = tokens[..size]
            .iter()
            .map(|t| verifier.parse(t.expose()).unwrap())
            .collect();
        let checks: Vec<_> = parsed.iter().map(|p| &p.check).collect();
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &checks, |b, checks| {
            b.iter(|| assert!(keybrake::token::batch::all_hold(black_box(checks))))
        });
    }
    group.finish();
}

fn endpoint_match(c: &mut Criterion) {
    let allow = Allowlist::parse(&claims().eps).unwrap();
    let post = http::Method::POST;
    c.bench_function("endpoint_match", |b| {
        b.iter(|| {
            assert!(allow.allows(
                black_box(&post),
                black_box("/v1/payment_intents/pi_3MtwBwLkdIwHu7ix28a3tqPa")
            ))
        })
    });
    // A Stripe SDK's request: what the proxy scans for a stray vault key.
    let uri: http::Uri = "/stripe/v1/payment_intents?expand%5B%5D=latest_charge&limit=3"
        .parse()
        .unwrap();
    let mut headers = http::HeaderMap::new();
    for (name, value) in [
        (
            "authorization",
            "Bearer vk_eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.e30.c2ln",
        ),
        ("host", "127.0.0.1:8080"),
        ("user-agent", "Stripe/v1 PythonBindings/12.0.0"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, deflate"),
        ("content-type", "application/x-www-form-urlencoded"),
        ("content-length", "43"),
        (
            "idempotency-key",
            "stripe-python-retry-0d5c8a3e-3b1f-4e0a-9d2c-6f1b2a3c4d5e",
        ),
        ("stripe-version", "2024-06-20"),
        (
            "x-stripe-client-user-agent",
            r#"{"bindings_version": "12.0.0", "lang": "python", "publisher": "stripe", "httplib": "requests", "lang_version": "3.12.3", "platform": "Linux-6.8.0-x86_64-with-glibc2.39", "uname": "Linux 6.8.0 x86_64"}"#,
        ),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ] {
        headers.insert(
            http::HeaderName::from_static(name),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    let dropped = [http::header::AUTHORIZATION];
    c.bench_function("stray_vault_key_scan", |b| {
        b.iter(|| {
            assert!(keybrake::proxy::extract::stray_vault_key(
                black_box(uri.path()),
                black_box(uri.query()),
                black_box(&headers),
                &dropped,
                Some("vk_eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.e30.c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJl")
            )
            .is_none())
        })
    });
    c.bench_function("path_canonicalize", |b| {
        b.iter(|| {
            canonicalize(black_box(
                "/stripe/v1/payment_intents/pi_3MtwBwLkdIwHu7ix28a3tqPa/confirm",
            ))
            .unwrap()
        })
    });
}

fn revocation_lookup(c: &mut Criterion) {
    let filter = RevocationFilter::with_capacity(100_000);
    for i in 0..100_000 {
        filter.insert(&format!("key_revoked_{i}"), i64::MAX);
    }
    c.bench_function("revocation_lookup_miss_100k", |b| {
        b.iter(|| assert!(!filter.is_revoked(black_box("key_01jdx3k9v8b2n7q4r5s6t7u8w9"))))
    });
    // What the proxy asks per request: the key's hash kept with its cached claims.
    let cached = keybrake::revocation::id_hash("key_01jdx3k9v8b2n7q4r5s6t7u8w9");
    c.bench_function("revocation_lookup_miss_100k_hashed", |b| {
        b.iter(|| {
            assert!(!filter.is_revoked_hashed(
                black_box("key_01jdx3k9v8b2n7q4r5s6t7u8w9"),
                black_box(cached)
            ))
        })
    });
    c.bench_function("revocation_lookup_hit_100k", |b| {
        b.iter(|| assert!(filter.is_revoked(black_box("key_revoked_4242"))))
    });
}

/// Grants whatever is asked: the bench measures the proxy's counter, not a ledger.
struct OpenLedger;

#[async_trait::async_trait]
impl Ledger for OpenLedger {
    async fn lease(&self, r: LeaseRequest) -> Result<Grant, LedgerError> {
        Ok(Grant {
            granted: r.want,
            committed: r.commit.min(r.want),
            revoked: false,
            settled: None,
        })
    }
    async fn report(&self, _: Vec<LeaseReport>) -> Result<(), LedgerError> {
        Ok(())
    }
    async fn commit(&self, c: Vec<LeaseCommit>) -> Result<Vec<bool>, LedgerError> {
        Ok(vec![true; c.len()])
    }
}

fn reservation(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let book = SpendBook::new(
        Arc::new(OpenLedger),
        Arc::new(Published::empty()),
        16,
        3600,
        Metrics::global(),
    );
    let who = Spender {
        key_id: "key_bench",
        tenant_id: "tn_bench",
        vendor: "stripe",
        cap: Micros(i64::MAX / 4),
        exp: i64::MAX,
    };
    let now = now_secs();
    c.bench_function("reserve_and_settle", |b| {
        b.iter(|| {
            let r = rt
                .block_on(book.reserve(&who, black_box(Micros(1_000_000)), now))
                .unwrap();
            book.settle(r);
        })
    });
}

/// A metered call with an `Idempotency-Key` (every Stripe SDK POST): its admission (the
/// fingerprint, the book's entry and its tenant's share), then its end, here a call that
/// cost nothing (the entry and the share given back), so the book stays at its size.
fn idempotent_call(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let book = Arc::new(IdempotencyBook::default());
    let (jti, ten): (Arc<str>, Arc<str>) = ("key_bench".into(), "tn_bench".into());
    let body = b"amount=2000&currency=usd&payment_method=pm_card_visa&confirm=true";
    let keys: Vec<String> = (0..1024)
        .map(|i| format!("5f0b2c4e-8a61-4d3f-9c7e-{i:012}"))
        .collect();
    let mut i = 0;
    c.bench_function("idempotent_call_admit_and_forget", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let fingerprint = book.fingerprint("POST", "/v1/payment_intents", b"", body);
            let call = Call {
                jti: &jti,
                ten: &ten,
                exp: i64::MAX,
                idempotency_key: &keys[i],
                credential: 1,
                fingerprint,
            };
            let admitted = rt.block_on(book.admit(call, 0, std::time::Duration::from_secs(1)));
            assert!(matches!(admitted, Admission::First(_)));
        })
    });
}

criterion_group!(
    benches,
    token_check,
    endpoint_match,
    revocation_lookup,
    reservation,
    idempotent_call
);
criterion_main!(benches);
