//! Requests Keybrake sends upstream itself, outside Pingora's proxy path: a body larger
//! than Pingora replays (`forward`), and the lookups that read what a
//! call can charge before it is forwarded (SPEC §5: `GET /v1/payment_intents/{id}` before
//! a confirm, the prices of a subscription's items).
//!
//! A request that fails on a reused pooled connection (an idle connection the vendor
//! closed: the keep-alive race) is sent again on another connection only when the vendor
//! surely did not act on it, or acting twice costs nothing: the failure came while the
//! request was still being written, or the method is idempotent and nothing is priced (a
//! lookup). Any other request written whole is never sent again,
//! as in Pingora's own path for non-idempotent methods: the vendor may be working on it
//! (a slow LLM call that outlives the read timeout), and a second copy would be billed
//! twice while metered once.

use crate::config::Vendor;
use crate::secret::Secret;
use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::client::HttpSession;

/// Attempts on pooled connections before a fresh one: a pool can hold several dead ones.
const MAX_ATTEMPTS: usize = 4;
/// Most bytes of a lookup's answer read (a PaymentIntent, an invoice, a price).
const MAX_LOOKUP_BODY: usize = 1 << 20;

/// A request that got no answer.
#[derive(Debug)]
pub struct Failed {
    /// The vendor's side failed: answered as upstream_unavailable/_timeout, not blamed on
    /// the client.
    pub error: Box<Error>,
    /// No attempt reached the vendor whole (every connect or write failed): it cannot
    /// have acted on the request.
    pub never_arrived: bool,
}

/// Sends `req` (and `body`) and reads the final response header, retrying on another
/// connection when a reused one fails first. The session is returned for the body.
/// `priced`: the call costs something (a reservation): never sent twice once written
/// whole, even a `GET`.
pub async fn send(
    connector: &Connector,
    peer: &HttpPeer,
    req: &RequestHeader,
    body: &Bytes,
    priced: bool,
) -> std::result::Result<(HttpSession, ResponseHeader), Failed> {
    let mut attempt = 0;
    let mut arrived = false;
    loop {
        attempt += 1;
        let failed = |e: Box<Error>, arrived: bool| Failed {
            error: e.into_up(),
            never_arrived: !arrived,
        };
        let (mut session, reused) = connector
            .get_http_session(peer)
            .await
            .map_err(|e| failed(e, arrived))?;
        session.set_read_timeout(peer.options.read_timeout);
        session.set_write_timeout(peer.options.write_timeout);
        match exchange(&mut session, req, body).await {
            Ok(header) => return Ok((session, header)),
            Err((e, stage)) => {
                arrived |= stage == Stage::Answer;
                if !(reused && attempt < MAX_ATTEMPTS && may_resend(req, priced, &e, stage)) {
                    return Err(failed(e, arrived));
                }
                log::debug!("a pooled upstream connection failed ({e}); sending again on another");
            }
        }
    }
}

/// How far a failed exchange got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The request was not written whole: the vendor cannot act on it.
    Writing,
    /// Written whole; the answer failed or did not come in time.
    Answer,
}

/// Whether a request that failed on a reused connection may go again on another: never
/// after a timeout (the vendor may be slow, not gone), and after the request was written
/// whole only when repeating it cannot charge anything (an idempotent method, nothing
/// priced: a `PUT` or `DELETE` is idempotent by the RFC, but a vendor may bill each
/// request).
fn may_resend(req: &RequestHeader, priced: bool, e: &Error, stage: Stage) -> bool {
    let timed_out = matches!(e.etype(), ReadTimedout | WriteTimedout);
    !timed_out && (stage == Stage::Writing || (req.method.is_idempotent() && !priced))
}

async fn exchange(
    session: &mut HttpSession,
    req: &RequestHeader,
    body: &Bytes,
) -> std::result::Result<ResponseHeader, (Box<Error>, Stage)> {
    let writing = |e| (e, Stage::Writing);
    session
        .write_request_header(Box::new(req.clone()))
        .await
        .map_err(writing)?;
    if !body.is_empty() {
        session
            .write_request_body(body.clone(), true)
            .await
            .map_err(writing)?;
    }
    session.finish_request_body().await.map_err(writing)?;
    read_final_header(session)
        .await
        .map_err(|e| (e, Stage::Answer))
}

/// The response header after any 1xx.
async fn read_final_header(session: &mut HttpSession) -> Result<ResponseHeader> {
    loop {
        session.read_response_header().await?;
        let header = session
            .response_header()
            .ok_or_else(|| Error::explain(InvalidHTTPHeader, "no upstream response header"))?;
        if !header.status.is_informational() {
            return Ok(header.clone());
        }
    }
}

/// Why a lookup gave no object.
#[derive(Debug, PartialEq, Eq)]
pub enum LookupError {
    /// The vendor could not be reached or did not answer in time.
    Unreachable { timeout: bool },
    /// It answered, but not a 2xx JSON object.
    NoObject,
}

/// `GET {path}` from the vendor with its real credential and the client's (already
/// checked) account headers: the object's JSON.
pub async fn get_json(
    connector: &Connector,
    peer: &HttpPeer,
    vendor: &Vendor,
    secret: &Secret,
    path: &str,
    client_headers: &http::HeaderMap,
) -> std::result::Result<serde_json::Value, LookupError> {
    let unreachable = |e: Box<Error>| LookupError::Unreachable {
        timeout: matches!(e.etype(), ConnectTimedout | ReadTimedout | WriteTimedout),
    };
    let mut req = RequestHeader::build("GET", b"/", None).map_err(|_| LookupError::NoObject)?;
    req.set_uri(
        super::inject::upstream_uri(vendor, path, None).map_err(|_| LookupError::NoObject)?,
    );
    req.insert_header(http::header::HOST, vendor.upstream.host_header.clone())
        .map_err(|_| LookupError::NoObject)?;
    for name in &vendor.account_headers {
        for value in client_headers.get_all(name) {
            req.append_header(name.clone(), value.clone())
                .map_err(|_| LookupError::NoObject)?;
        }
    }
    super::inject::inject_credential(&mut req, vendor, secret)
        .map_err(|_| LookupError::NoObject)?;
    let (mut session, header) = send(connector, peer, &req, &Bytes::new(), false)
        .await
        .map_err(|f| unreachable(f.error))?;
    let mut buf = BytesMut::new();
    while !session.response_done() {
        match session.read_response_body().await.map_err(unreachable)? {
            Some(chunk) if buf.len() + chunk.len() <= MAX_LOOKUP_BODY => {
                buf.extend_from_slice(&chunk)
            }
            Some(_) => return Err(LookupError::NoObject),
            None => break,
        }
    }
    connector
        .release_http_session(session, peer, peer.options.idle_timeout)
        .await;
    if !header.status.is_success() {
        return Err(LookupError::NoObject);
    }
    serde_json::from_slice::<serde_json::Value>(&buf)
        .ok()
        .filter(serde_json::Value::is_object)
        .ok_or(LookupError::NoObject)
}
