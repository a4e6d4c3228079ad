//! The control API's listener: its own accept loop, so that revocation stays reachable
//! while a flood of slow clients runs (an agent calls `DELETE /v1/keys/{id}` from the
//! public internet). Per connection:
//!
//! - admission to the connection table (at most `max_connections`, and
//!   `max_connections_per_client` per address; at a bound the oldest connection still
//!   waiting for a request header or still reading its body makes room, so a trickling
//!   flood is what gets closed, whatever token it holds; when every place is busy, the
//!   new connection waits, within its header time, for one to finish a request, so a
//!   flood of quick valid requests on open connections does not keep a revocation out);
//! - the TLS handshake, within `header_timeout`;
//! - hyper's HTTP/1.1 server with its header-read timeout: `header_timeout` from the
//!   moment it waits for a request (fresh or kept-alive) to the complete header, however
//!   steadily the bytes trickle; a header over `max_header_bytes` is refused by hyper;
//! - a declared `Content-Length` over the body limit is answered 413 before any body is
//!   read; otherwise the whole body is read here, evictable, before the app sees the
//!   request, so no handler (a key issuance being committed) ever runs on a connection
//!   that may be cut; the body read and the handler are each bounded by `request_timeout`;
//! - the answers hyper writes itself when it cannot parse a request (400, 414, 431: no
//!   handler runs) get SPEC §3's JSON error body (`JsonParseErrors`).

use super::api::RouteName;
use super::errors::{ApiError, ErrorCode};
use crate::config::ListenerSettings;
use crate::conns::{ConnGuard, ConnTable, Phase};
use crate::metrics::Metrics;
use axum::body::Body;
use axum::http::{header, Method, Request, Response, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
    let conns = ConnTable::new("control", settings.limits);
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
        let deadline = Instant::now() + shared.header_timeout;
        let (conns, shared) = (conns.clone(), shared.clone());
        tokio::spawn(async move {
            // Every place busy: wait for one to finish a request, within the header's time.
            let guard = match conns.admit_within(peer.ip(), deadline).await {
                Ok(guard) => guard,
                Err(why) => {
                    log::debug!("control API connection from {} refused: {why:?}", peer.ip());
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            // A connection that waited for its place still gets time for its handshake.
            let deadline = deadline.max(Instant::now() + shared.header_timeout / 2);
            serve_connection(shared, tcp, peer, Arc::new(guard), deadline).await
        });
    }
}

/// How long an evicted connection has to finish writing the response it was sending.
const EVICTED_WRITE: Duration = Duration::from_millis(250);
/// An evicted connection that answered this recently may still be writing the answer.
const JUST_ANSWERED: Duration = Duration::from_millis(200);

async fn serve_connection(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    guard: Arc<ConnGuard>,
    deadline: Instant,
) {
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
            async move { Ok::<_, Infallible>(handle(&shared, guard, peer, req).await) }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(shared.header_timeout)
        .max_buf_size(shared.max_header_bytes)
        .keep_alive(true);
    let conn = http.serve_connection(TokioIo::new(JsonParseErrors::new(io)), service);
    tokio::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => {
            if let Err(e) = served {
                log::debug!("control API connection ended: {e}");
            }
            return;
        }
        _ = guard.evicted() => {}
    }
    // Evicted (its place is another's): closed now, unless it had just answered (the
    // answer may still be in its write buffer), in which case it is written out first
    // and no further request is served (`enter` refuses an evicted connection).
    if guard.answered_within(JUST_ANSWERED) {
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(EVICTED_WRITE, conn).await;
    }
}

/// Gives the bodiless answers hyper writes on a request it cannot parse (SPEC §3: every
/// error has the JSON body) their JSON body. hyper writes such an answer as one head with
/// `content-length: 0` and then closes; every answer of a handler has a body. Writes are
/// kept unvectored so that a head arrives here whole, in one `poll_write`.
struct JsonParseErrors<T> {
    inner: T,
    /// A replacement being written, and how much of it has gone out.
    replacing: Option<(Vec<u8>, usize)>,
}

impl<T> JsonParseErrors<T> {
    fn new(inner: T) -> Self {
        JsonParseErrors {
            inner,
            replacing: None,
        }
    }
}

/// The JSON answer for hyper's automatic answer `head`, if it is one.
fn json_parse_error(head: &[u8]) -> Option<Vec<u8>> {
    let error = match head.get(..13)? {
        b"HTTP/1.1 400 " => ApiError::Unparsable,
        b"HTTP/1.1 414 " => ApiError::UriTooLong(None),
        b"HTTP/1.1 431 " => ApiError::HeadersTooLarge(None),
        _ => return None,
    };
    let text = std::str::from_utf8(head).ok()?;
    let (head_text, rest) = text.split_once("\r\n\r\n")?;
    let bodiless = head_text
        .split("\r\n")
        .any(|l| l.eq_ignore_ascii_case("content-length: 0"));
    if !bodiless || !rest.is_empty() {
        return None;
    }
    let reason = &head_text[13..head_text.find("\r\n")?];
    let status = error.status().as_u16();
    let body = error.body().to_string();
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonParseErrors<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        if self.replacing.is_none() {
            match json_parse_error(buf) {
                Some(answer) => self.replacing = Some((answer, 0)),
                None => return std::pin::Pin::new(&mut self.inner).poll_write(cx, buf),
            }
        }
        // hyper calls again with the same `buf` until it is reported written.
        let this = &mut *self;
        let (answer, sent) = this.replacing.as_mut().expect("set above");
        while *sent < answer.len() {
            match std::pin::Pin::new(&mut this.inner).poll_write(cx, &answer[*sent..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => *sent += n,
                other => return other,
            }
        }
        this.replacing = None;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// Marks the connection waiting again once the response has been written (dropped).
struct BusyUntilDropped(Arc<ConnGuard>);

impl Drop for BusyUntilDropped {
    fn drop(&mut self) {
        self.0.answered();
    }
}

/// Why a request ends before the app sees it.
enum Unserved {
    /// The connection was evicted (its place given to a newer one): nothing is sent.
    Evicted,
    /// Answered here, and the connection closed.
    Refused(ApiError),
}

async fn handle(
    shared: &Shared,
    guard: Arc<ConnGuard>,
    peer: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Response<axum::body::Body> {
    let (method, uri, started) = (req.method().clone(), req.uri().clone(), Instant::now());
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let served = if declared.is_some_and(|n| n > shared.body_limit as u64) {
        // Answered before the body is read; the connection is closed, unread body and all.
        Err(Unserved::Refused(ApiError::BodyTooLarge(shared.body_limit)))
    } else {
        // The body and the handler each get `request_timeout`: a body that arrives late
        // does not shorten the handler's time (a key issuance cut short after its commit
        // would lose the token it made).
        let timed_out = || Unserved::Refused(ApiError::RequestTimeout(shared.request_timeout));
        let call = async {
            let req = tokio::time::timeout(shared.request_timeout, read_body(shared, &guard, req))
                .await
                .map_err(|_| timed_out())??;
            if !guard.enter(Phase::Busy) {
                return Err(Unserved::Evicted);
            }
            let mut app = shared.app.clone();
            let call = tower_service::Service::call(&mut app, req);
            let response = tokio::time::timeout(shared.request_timeout, call)
                .await
                .map_err(|_| timed_out())?;
            Ok(response.unwrap_or_else(|never| match never {}))
        };
        call.await
    };
    let response = match served {
        Ok(response) => response,
        Err(Unserved::Refused(error)) => {
            let mut r = error.into_response();
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            r
        }
        Err(Unserved::Evicted) => {
            // Nothing is sent: the eviction notice, already given, ends the connection.
            return std::future::pending().await;
        }
    };
    observe(&method, &uri, peer, &response, started.elapsed());
    // A response that is still being written keeps the connection busy.
    let busy = BusyUntilDropped(guard);
    let (parts, body) = response.into_parts();
    let body = body.map_err(move |e| {
        let _ = &busy;
        e
    });
    Response::from_parts(parts, axum::body::Body::new(body))
}

/// What an operator sees of a control API answer: `keybrake_control_requests_total`
/// for each, and a log line for what matters later: a change made by an admin or a
/// revocation (INFO), refused credentials and server errors (WARN, at most
/// `WARNINGS_PER_SECOND` lines a second, then a count), the rest at DEBUG (a key issuance
/// per agent invocation, a node's sync calls, reads). Never a header or a body, where
/// tokens and secrets travel; the path with any token in it redacted.
fn observe(
    method: &Method,
    uri: &Uri,
    peer: SocketAddr,
    response: &Response<Body>,
    took: Duration,
) {
    let status = response.status();
    let route = (response.extensions().get::<RouteName>()).map_or("unmatched", |r| r.0.as_str());
    Metrics::global()
        .control_requests
        .with_label_values(&[route, status.as_str()])
        .inc();
    let code = (response.extensions().get::<ErrorCode>()).map_or("", |c| c.0);
    let path = crate::proxy::path::without_tokens(uri.path());
    let ms = took.as_secs_f64() * 1e3;
    // A 503 from `/readyz` is an answer, not a failure (a probe during start or drain).
    let warn = (status.is_server_error() && route != "GET /readyz")
        || matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
    let change = status.is_success()
        && *method != Method::GET
        && *method != Method::HEAD
        && route != "POST /v1/keys"
        && !route.starts_with("POST /v1/sync/");
    if warn {
        if let Some(suppressed) = warning_allowed() {
            if suppressed > 0 {
                log::warn!("control API: {suppressed} more refused or failed requests not logged");
            }
            log::warn!(
                "control API: {method} {path:?} from {} answered {} {code} ({ms:.1} ms)",
                peer.ip(),
                status.as_u16()
            );
        }
    } else if change {
        log::info!(
            "control API: {method} {path:?} from {} answered {} ({ms:.1} ms)",
            peer.ip(),
            status.as_u16()
        );
    } else {
        log::debug!(
            "control API: {method} {path:?} from {} answered {} {code} ({ms:.1} ms)",
            peer.ip(),
            status.as_u16()
        );
    }
}

/// Warning lines logged per second at most: a flood of wrong tokens is counted, not
/// written out line by line.
const WARNINGS_PER_SECOND: u32 = 10;

/// Whether a warning may be logged now: `Some(n)` with `n` warnings left out since the
/// last one logged, `None` past this second's allowance.
fn warning_allowed() -> Option<u64> {
    use std::time::Instant;
    static WINDOW: Mutex<(Option<Instant>, u32, u64)> = Mutex::new((None, 0, 0));
    let mut w = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if w.0
        .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1))
    {
        (w.0, w.1) = (Some(now), 0);
    }
    if w.1 >= WARNINGS_PER_SECOND {
        w.2 += 1;
        return None;
    }
    w.1 += 1;
    Some(std::mem::take(&mut w.2))
}

/// The request with its whole body read (at most `body_limit` bytes). Meanwhile the
/// connection may be evicted: a body that dribbles in is a slow client like a header
/// that does, and a valid token does not change that.
async fn read_body(
    shared: &Shared,
    guard: &ConnGuard,
    req: Request<hyper::body::Incoming>,
) -> Result<Request<axum::body::Body>, Unserved> {
    use hyper::body::Body as _;
    if req.body().is_end_stream() {
        return Ok(req.map(|_| axum::body::Body::empty()));
    }
    if !guard.enter(Phase::ReadingBody) {
        return Err(Unserved::Evicted);
    }
    let (parts, body) = req.into_parts();
    let bytes = http_body_util::Limited::new(body, shared.body_limit)
        .collect()
        .await
        .map_err(|e| {
            Unserved::Refused(match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => ApiError::BodyTooLarge(shared.body_limit),
                None => ApiError::Unparsable,
            })
        })?
        .to_bytes();
    Ok(Request::from_parts(parts, axum::body::Body::from(bytes)))
}

#[cfg(test)]
mod tests {
    use super::json_parse_error;

    #[test]
    fn hyper_parse_error_answers_get_the_json_body_and_nothing_else_does() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
                     date: Thu, 03 Dec 2026 01:00:00 GMT\r\n\r\n";
        let answer = String::from_utf8(json_parse_error(head).unwrap()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("content-type: application/json"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "headers_too_large");
        let uri = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n";
        assert!(String::from_utf8(json_parse_error(uri).unwrap())
            .unwrap()
            .contains("uri_too_long"));
        // A handler's answer (with a body, or another status) passes untouched.
        for other in [
            &b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 10\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx",
            b"HTTP/1.1 400 Bad Req",
        ] {
            assert!(json_parse_error(other).is_none());
        }
    }
}
