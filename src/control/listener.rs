//! The control API's listener: its own accept loop, so that revocation stays reachable
//! while a flood of slow clients runs (an agent calls `DELETE /v1/keys/{id}` from the
//! public internet). Per connection:
//!
//! - admission to the connection table (at most `max_connections`, and
//!   `max_connections_per_client` per address; at a bound the oldest connection still
//!   waiting for a request header makes room, so a trickling flood is what gets closed);
//! - the TLS handshake, within `header_timeout`;
//! - hyper's HTTP/1.1 server with its header-read timeout: `header_timeout` from the
//!   moment it waits for a request (fresh or kept-alive) to the complete header, however
//!   steadily the bytes trickle; a header over `max_header_bytes` is refused by hyper;
//! - a declared `Content-Length` over the body limit is answered 413 before any body is
//!   read; a request (body read and handler) is bounded by `request_timeout`.

use super::errors::ApiError;
use crate::config::ListenerSettings;
use crate::conns::{ConnGuard, ConnTable};
use axum::http::{header, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::Instant;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What one connection needs, shared by all.
struct Shared {
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    header_timeout: Duration,
    request_timeout: Duration,
    max_header_bytes: usize,
    body_limit: usize,
}

/// Serves `app` on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    settings: &ListenerSettings,
    body_limit: usize,
) {
    let conns = ConnTable::new(settings.limits);
    let shared = Arc::new(Shared {
        app,
        tls: tls.map(tokio_rustls::TlsAcceptor::from),
        header_timeout: settings.header_timeout,
        request_timeout: settings.request_timeout,
        max_header_bytes: settings.max_header_bytes,
        body_limit,
    });
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: let connections end before retrying.
                log::warn!("control API accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let guard = match conns.admit(peer.ip()) {
            Ok(guard) => guard,
            Err(why) => {
                log::debug!("control API connection from {} refused: {why:?}", peer.ip());
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(serve_connection(shared.clone(), tcp, Arc::new(guard)));
    }
}

async fn serve_connection(shared: Arc<Shared>, tcp: tokio::net::TcpStream, guard: Arc<ConnGuard>) {
    let deadline = Instant::now() + shared.header_timeout;
    let io: Box<dyn Io> = match &shared.tls {
        None => Box::new(tcp),
        Some(acceptor) => tokio::select! {
            tls = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => match tls {
                Ok(Ok(tls)) => Box::new(tls),
                _ => return,
            },
            _ = guard.evicted() => return,
        },
    };
    let service = {
        let shared = shared.clone();
        let guard = guard.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let shared = shared.clone();
            let guard = guard.clone();
            async move { Ok::<_, Infallible>(handle(&shared, guard, req).await) }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(shared.header_timeout)
        .max_buf_size(shared.max_header_bytes)
        .keep_alive(true);
    let conn = http.serve_connection(TokioIo::new(io), service);
    tokio::select! {
        served = conn => {
            if let Err(e) = served {
                log::debug!("control API connection ended: {e}");
            }
        }
        _ = guard.evicted() => {}
    }
}

/// Marks the connection waiting again once the response has been written (dropped).
struct BusyUntilDropped(Arc<ConnGuard>);

impl Drop for BusyUntilDropped {
    fn drop(&mut self) {
        self.0.set_waiting(true);
    }
}

async fn handle(
    shared: &Shared,
    guard: Arc<ConnGuard>,
    req: Request<hyper::body::Incoming>,
) -> Response<axum::body::Body> {
    guard.set_waiting(false);
    let busy = BusyUntilDropped(guard);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let response = if declared.is_some_and(|n| n > shared.body_limit as u64) {
        // Answered before the body is read; the connection is closed, unread body and all.
        let mut r = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is over {} KiB", shared.body_limit / 1024),
        )
        .into_response();
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        r
    } else {
        let mut app = shared.app.clone();
        let call = tower_service::Service::call(&mut app, req.map(axum::body::Body::new));
        match tokio::time::timeout(shared.request_timeout, call).await {
            Ok(Ok(response)) => response,
            Ok(Err(never)) => match never {},
            Err(_) => {
                let mut r = ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request was not complete within {} ms",
                        shared.request_timeout.as_millis()
                    ),
                )
                .into_response();
                r.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
                r
            }
        }
    };
    let (parts, body) = response.into_parts();
    let body = body.map_err(move |e| {
        let _ = &busy;
        e
    });
    Response::from_parts(parts, axum::body::Body::new(body))
}
