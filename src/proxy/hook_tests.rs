//! The proxy's Pingora hooks driven in memory: a `Session` over a `tokio::io::duplex`
//! pair stands for the client's connection (as Pingora's own tests do), and the tests
//! read back what a client would see — the status and SPEC §4's JSON error body — and
//! what was (not) forwarded, reserved and audited. No socket, no vendor.

use super::ctx::{Body, Ctx};
use super::service::KeybrakeProxy;
use super::spend::SpendBook;
use super::upstream::Upstreams;
use super::verify::KeyVerifier;
use crate::config::{Config, Overrides};
use crate::metrics::{Metrics, RequestCounters};
use crate::money::Micros;
use crate::secret::Secret;
use crate::sync::{
    AuditEvent, AuditSink, Grant, LeaseCommit, LeaseReport, LeaseRequest, Ledger, LedgerError,
    Published,
};
use crate::token::{generate_ed25519, now_secs, Claims, Jwk, Jwks, SigningKey, Verifier};
use crate::Map;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Grants leases up to each key's cap, like the control plane's ledger.
#[derive(Default)]
struct CapLedger {
    committed: Mutex<i64>,
}

#[async_trait::async_trait]
impl Ledger for CapLedger {
    async fn lease(&self, r: LeaseRequest) -> Result<Grant, LedgerError> {
        let mut c = self.committed.lock().unwrap();
        let remaining = r.cap.0 - *c;
        if remaining < r.min.0 {
            return Ok(Grant::NONE);
        }
        let grant = Micros(r.want.0.min(remaining));
        *c += grant.0;
        Ok(Grant {
            granted: grant,
            committed: r.commit.min(grant),
            revoked: false,
            settled: None,
        })
    }
    async fn report(&self, reports: Vec<LeaseReport>) -> Result<(), LedgerError> {
        for r in reports {
            *self.committed.lock().unwrap() -= r.returned.0;
        }
        Ok(())
    }
    async fn commit(&self, c: Vec<LeaseCommit>) -> Result<Vec<bool>, LedgerError> {
        Ok(vec![true; c.len()])
    }
}

#[derive(Default)]
struct Events(Mutex<Vec<AuditEvent>>);

impl AuditSink for Arc<Events> {
    fn record(&self, event: AuditEvent) {
        self.0.lock().unwrap().push(event);
    }
}

struct Harness {
    proxy: KeybrakeProxy,
    events: Arc<Events>,
    /// A vault key for Stripe with a $5 daily cap.
    token: String,
}

fn harness() -> Harness {
    let config = Config::from_yaml("", None, &Overrides::default()).unwrap();
    let (private, public) = generate_ed25519();
    let signer = SigningKey::from_pkcs8("kid_1".into(), &private).unwrap();
    let published = Arc::new(Published::empty());
    published.verifier.store(Arc::new(Verifier::new(&Jwks {
        keys: vec![Jwk::ed25519("kid_1", &public)],
    })));
    let mut stripe = Map::default();
    stripe.insert("stripe".to_string(), Secret::new("sk_test_real"));
    let mut credentials = Map::default();
    credentials.insert("tn_1".to_string(), stripe);
    published.credentials.store(Arc::new(credentials));
    let now = now_secs();
    let token = signer.sign(&Claims {
        jti: "key_1".into(),
        ten: "tn_1".into(),
        ven: "stripe".into(),
        eps: vec!["/v1/payment_intents".into()],
        cap: 5_000_000,
        iat: now,
        exp: now + 3600,
        lbl: "test".into(),
        acc: None,
    });
    let events = Arc::new(Events::default());
    let metrics = Metrics::global();
    let proxy = KeybrakeProxy {
        draining: Default::default(),
        staleness: crate::proxy::fresh::Staleness::never(),
        vendors: config
            .vendors
            .iter()
            .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
            .collect(),
        currencies: config.currencies.clone(),
        body_limit: config.body_limit_bytes,
        body_timeout: std::time::Duration::from_secs(5),
        client_write_timeout: std::time::Duration::from_secs(5),
        h2_conns: Default::default(),
        verifier: Arc::new(KeyVerifier::new(published.clone(), 100, metrics.clone())),
        spend: Arc::new(SpendBook::new(
            Arc::new(CapLedger::default()),
            published.clone(),
            16,
            2,
            metrics.clone(),
        )),
        upstreams: Arc::new(Upstreams::new(&config.vendors, config.upstream.clone()).unwrap()),
        published,
        audit: Arc::new(events.clone()),
        access_log: None,
        request_counters: RequestCounters::new(
            metrics.requests.clone(),
            config.vendors.keys().cloned(),
        ),
        metrics,
        charges: Default::default(),
        connector: pingora::connectors::http::Connector::new(None),
        idempotency: Default::default(),
        idempotent_wait: std::time::Duration::from_secs(1),
        prices: config.prices.clone(),
        multi_pass_tools: config.llm_multi_pass_tools,
    };
    Harness {
        proxy,
        events,
        token: token.expose().to_string(),
    }
}

/// A session that has read `head` (a request header) from the client's side.
async fn session(head: &str) -> (Session, DuplexStream) {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    client.write_all(head.as_bytes()).await.unwrap();
    let mut session = Session::new_h1(Box::new(server));
    assert!(session.read_request().await.unwrap());
    (session, client)
}

/// A session for `head` whose request `request_filter` let through (to be forwarded).
async fn admitted(h: &Harness, head: &str) -> (Session, DuplexStream, Ctx) {
    let (mut session, client) = session(head).await;
    let mut ctx = h.proxy.new_ctx();
    assert!(!h
        .proxy
        .request_filter(&mut session, &mut ctx)
        .await
        .unwrap());
    (session, client, ctx)
}

/// What the client received: status, headers (lower-case names) and body.
async fn answer(client: &mut DuplexStream) -> (u16, String, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if got.len() >= end + 4 + len {
                let status = head[9..12].parse().unwrap();
                return (status, head, got[end + 4..end + 4 + len].to_vec());
            }
        }
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), client.read(&mut buf));
        let n = read.await.expect("an answer in time").unwrap();
        assert!(n > 0, "connection closed before a full answer: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Runs `request_filter` and `logging`; the request must be refused with `status` and
/// SPEC §4's JSON body carrying `code`, nothing sent upstream or held, and audited so.
async fn assert_refused(h: &Harness, head: &str, status: u16, code: &str) -> Ctx {
    let (mut session, mut client) = session(head).await;
    let mut ctx = h.proxy.new_ctx();
    let answered = h
        .proxy
        .request_filter(&mut session, &mut ctx)
        .await
        .unwrap();
    assert!(
        answered,
        "a refusal is answered by the proxy itself, not forwarded"
    );
    let (got, _, body) = answer(&mut client).await;
    assert_eq!(got, status);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["code"], code);
    assert_eq!(json["error"]["code"], code);
    assert_eq!(json["error"]["type"], "keybrake_error");
    h.proxy.logging(&mut session, None, &mut ctx).await;
    assert!(ctx.upstream_start.is_none(), "nothing went upstream");
    assert!(ctx.reservation.is_none());
    let events = h.events.0.lock().unwrap();
    let event = events.last().unwrap();
    assert_eq!((event.status, event.decision.as_str()), (status, code));
    assert_eq!(event.spend, Micros::ZERO);
    ctx
}

fn post(token: &str, content_type: &str, body: &str) -> String {
    format!(
        "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn a_request_without_a_key_is_refused_401_and_audited() {
    let h = harness();
    let head = "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    let ctx = assert_refused(&h, head, 401, "missing_key").await;
    assert!(ctx.key.is_none());
}

#[tokio::test]
async fn an_amount_over_the_cap_is_refused_429_and_nothing_stays_held() {
    let h = harness();
    // $6 against a $5 cap.
    let form = "application/x-www-form-urlencoded";
    assert_refused(
        &h,
        &post(&h.token, form, "amount=600&currency=usd"),
        429,
        "cap_exhausted",
    )
    .await;
    // The cap is whole again: $5 fits.
    let (_session, _client, ctx) =
        admitted(&h, &post(&h.token, form, "amount=500&currency=usd")).await;
    assert_eq!(ctx.spend, Micros(5_000_000));
}

#[tokio::test]
async fn a_metered_body_that_is_not_a_plain_form_or_json_is_refused_400() {
    let h = harness();
    let multipart = "multipart/form-data; boundary=x";
    assert_refused(
        &h,
        &post(&h.token, multipart, "amount=1"),
        400,
        "invalid_amount",
    )
    .await;
    // The amount in the query string instead of the body: the vendor could read either.
    let head = format!(
        "POST /stripe/v1/payment_intents?amount=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 22\r\n\r\namount=100&currency=usd",
        h.token
    );
    assert_refused(&h, &head, 400, "invalid_amount").await;
    // An endpoint the key does not allow.
    let head = format!(
        "POST /stripe/v1/refunds HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
        h.token
    );
    assert_refused(&h, &head, 403, "endpoint_not_allowed").await;
}

#[tokio::test]
async fn an_allowed_call_is_reserved_and_forwarded_with_the_real_credential_only() {
    let h = harness();
    // JSON is converted to the form Stripe reads, and metered from that.
    let json = r#"{"amount":150,"currency":"usd"}"#;
    let (mut session, _client, mut ctx) =
        admitted(&h, &post(&h.token, "application/json", json)).await;
    assert_eq!(ctx.spend, Micros(1_500_000));
    let mut upstream = session.req_header().clone();
    h.proxy
        .upstream_request_filter(&mut session, &mut upstream, &mut ctx)
        .await
        .unwrap();
    let header = |name: &str| {
        upstream
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        header("authorization").as_deref(),
        Some("Bearer sk_test_real")
    );
    assert_eq!(header("host").as_deref(), Some("api.stripe.com"));
    assert_eq!(
        header("content-type").as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    let form = "amount=150&currency=usd";
    assert_eq!(header("content-length"), Some(form.len().to_string()));
    assert_eq!(upstream.uri.path(), "/v1/payment_intents");
    // Our converted copy goes out once per attempt, whatever Pingora replays.
    let mut chunk = Some(bytes::Bytes::from_static(json.as_bytes()));
    h.proxy
        .request_body_filter(&mut session, &mut chunk, true, &mut ctx)
        .await
        .unwrap();
    assert_eq!(chunk.as_deref(), Some(form.as_bytes()));
    let mut again = None;
    h.proxy
        .request_body_filter(&mut session, &mut again, true, &mut ctx)
        .await
        .unwrap();
    assert_eq!(again, None);
    // The vendor could not be reached: the budget goes back, and the audit says so.
    let refused = pingora::Error::new(pingora::ErrorType::ConnectRefused);
    h.proxy
        .logging(&mut session, Some(&refused), &mut ctx)
        .await;
    assert_eq!(ctx.spend, Micros::ZERO);
    assert_eq!(
        h.events.0.lock().unwrap().last().unwrap().spend,
        Micros::ZERO
    );
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_metered_body_is_read() {
    let h = harness();
    let body = "amount=100&currency=usd";
    let head = format!(
        "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nExpect: 100-continue\r\n\
         Content-Length: {}\r\n\r\n",
        h.token,
        body.len()
    );
    let (mut session, mut client) = session(&head).await;
    let client_side = tokio::spawn(async move {
        // The client holds its body back until it is told to go on.
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 100 Continue\r\n"), "{got:?}");
        client.write_all(body.as_bytes()).await.unwrap();
        client
    });
    let mut ctx = h.proxy.new_ctx();
    let forwarded = !h
        .proxy
        .request_filter(&mut session, &mut ctx)
        .await
        .unwrap();
    assert!(forwarded);
    assert!(matches!(&ctx.body, Body::Read { bytes, .. } if &bytes[..] == body.as_bytes()));
    assert_eq!(ctx.spend, Micros(1_000_000));
    client_side.await.unwrap();
    // The whole body goes with the header: the vendor is not asked for a 100 again.
    let mut upstream = session.req_header().clone();
    h.proxy
        .upstream_request_filter(&mut session, &mut upstream, &mut ctx)
        .await
        .unwrap();
    assert!(upstream.headers.get("expect").is_none());
}

/// A metered POST whose attempt failed: `write_failed` while the request was written to
/// the vendor (a stale pooled connection), or after it went whole and no answer came.
/// `expect`: the client sent `Expect: 100-continue` (and was answered 100).
async fn a_failed_post(write_failed: bool, expect: bool) -> (bool, Micros) {
    let h = harness();
    let body = "amount=150&currency=usd";
    let mut head = post(&h.token, "application/x-www-form-urlencoded", body);
    if expect {
        head = head.replacen("\r\n\r\n", "\r\nExpect: 100-continue\r\n\r\n", 1);
    }
    let (mut session, _client, mut ctx) = admitted(&h, &head).await;
    let continued = session.response_written().map(|r| r.status.as_u16());
    assert_eq!(continued, expect.then_some(100));
    let mut upstream = session.req_header().clone();
    h.proxy
        .upstream_request_filter(&mut session, &mut upstream, &mut ctx)
        .await
        .unwrap();
    let peer = HttpPeer::new("127.0.0.1:9", false, String::new());
    let etype = if write_failed {
        pingora::ErrorType::WriteError
    } else {
        pingora::ErrorType::ConnectionClosed
    };
    let e = h.proxy.error_while_proxy(
        &peer,
        &mut session,
        pingora::Error::new_up(etype),
        &mut ctx,
        true,
    );
    let retried = e.retry();
    h.proxy.logging(&mut session, Some(&e), &mut ctx).await;
    (retried, ctx.spend)
}

#[tokio::test]
async fn a_post_whose_write_failed_goes_again_and_one_written_whole_is_charged() {
    for expect in [false, true] {
        // The vendor got no whole request: sent again on another connection, and if
        // that fails too, the reservation goes back (a 100 Continue the client was
        // answered is no answer from the vendor).
        assert_eq!(a_failed_post(true, expect).await, (true, Micros::ZERO));
        // Written whole, no answer: the vendor may have acted. Never sent twice; charged.
        assert_eq!(
            a_failed_post(false, expect).await,
            (false, Micros(1_500_000))
        );
    }
}

#[tokio::test]
async fn a_streamed_body_replayed_for_a_retry_is_counted_once() {
    let h = harness();
    let head = format!(
        "GET /stripe/v1/payment_intents HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        h.token
    );
    let (mut session, _client, mut ctx) = admitted(&h, &head).await;
    assert!(matches!(ctx.body, Body::Streamed { .. }));
    // Two thirds of the limit, sent once per attempt: never over it.
    let chunk = bytes::Bytes::from(vec![b'x'; h.proxy.body_limit * 2 / 3]);
    for _attempt in 0..2 {
        let mut upstream = session.req_header().clone();
        h.proxy
            .upstream_request_filter(&mut session, &mut upstream, &mut ctx)
            .await
            .unwrap();
        let mut body = Some(chunk.clone());
        h.proxy
            .request_body_filter(&mut session, &mut body, true, &mut ctx)
            .await
            .unwrap();
    }
    assert!(ctx.denial.is_none());
}
