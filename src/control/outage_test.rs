//! The control plane when its PostgreSQL goes away and comes back: calls that need storage
//! answer 503 `storage_unavailable` (SPEC §3), `/readyz` fails, leases are refused (the
//! proxies and nodes keep serving on what they hold), and it all works again once the
//! database is back, with no restart.

use crate::control::api::ApiState;
use crate::control::crypto::MasterKey;
use crate::control::{Control, ControlSettings};
use crate::database::{Database, DatabaseUrl};
use crate::metrics::Metrics;
use crate::money::Micros;
use crate::secret::Secret;
use crate::sync::{utc_day, LeaseRequest, Ledger, Published};
use crate::token::now_secs;
use axum::http::Request;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_is_503_storage_unavailable_and_comes_back_by_itself() {
    let cluster = crate::control::pg_test::OwnCluster::start();
    let url = cluster.create_database().await;
    let database = Database::Postgres {
        url: DatabaseUrl::parse(&url).unwrap(),
    };
    let settings = ControlSettings {
        default_ttl: Duration::from_secs(300),
        max_ttl: Duration::from_secs(3600),
        vendors: ["stripe".to_string()].into(),
        lease_lifetime: Duration::from_secs(30),
        audit_durability: Default::default(),
        expired_key_retention: crate::config::defaults::EXPIRED_KEY_RETENTION,
    };
    let control = Control::open(
        settings,
        &database,
        MasterKey::from_base64(&MasterKey::generate_base64()).unwrap(),
        Secret::new("admin"),
        Arc::new(Published::empty()),
        Metrics::global(),
    )
    .await
    .unwrap();
    let mut app = crate::control::api::router(ApiState {
        control: control.clone(),
        catalog: Arc::new(Default::default()),
        proxy_addr: None,
    });
    let mut call = async |method: &str, path: &str| {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", "Bearer admin");
        let body = if method == "POST" {
            req = req.header("content-type", "application/json");
            axum::body::Body::from(r#"{"name":"t"}"#)
        } else {
            axum::body::Body::empty()
        };
        let res = tower_service::Service::call(&mut app, req.body(body).unwrap())
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let code = body["error"]["code"].as_str().unwrap_or("").to_string();
        (status, code)
    };
    let lease = || LeaseRequest {
        budget: Default::default(),
        key_id: "key_outage".into(),
        tenant_id: "tn_x".into(),
        day: utc_day(now_secs()),
        cap: Micros(1_000_000),
        min: Micros(1),
        want: Micros(10),
        commit: Micros::ZERO,
    };
    assert_eq!(call("POST", "/v1/tenants").await.0, 201);
    assert_eq!(call("GET", "/readyz").await.0, 200);
    assert_eq!(control.lease(lease()).await.unwrap().granted, Micros(10));

    cluster.stop_server();
    let started = Instant::now();
    assert_eq!(
        call("POST", "/v1/tenants").await,
        (503, "storage_unavailable".to_string())
    );
    assert_eq!(
        call("GET", "/v1/tenants").await,
        (503, "storage_unavailable".to_string())
    );
    assert_eq!(call("GET", "/readyz").await.0, 503);
    assert!(
        control.lease(lease()).await.is_err(),
        "a lease while the database is down fails (the proxy keeps what it holds)"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answers came in {:?}: a lost database must not hang the API",
        started.elapsed()
    );

    cluster.start_server();
    let back = Instant::now();
    loop {
        if call("POST", "/v1/tenants").await.0 == 201 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "the control plane did not reconnect within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(call("GET", "/readyz").await.0, 200);
    assert_eq!(control.lease(lease()).await.unwrap().granted, Micros(10));
}
