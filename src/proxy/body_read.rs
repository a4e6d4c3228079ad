//! Stage 5, reading a request body whole before anything is sent upstream (to meter, convert or
//! plan it): within the size limit and the body deadline, answering `Expect:
//! 100-continue` first so the client sends it. Pingora keeps (up to 64 KiB of) what is
//! read for its replay; `request_body_filter` sends our full copy instead.

use super::deny::Denial;
use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use std::time::Duration;

/// Reads the whole request body, at most `limit` bytes within `timeout`.
pub async fn read_body(
    session: &mut Session,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, Denial> {
    session.enable_retry_buffering();
    if expects_continue(session.req_header()) {
        // The client waits for this before it sends the body we are about to read (the
        // vendor, which would answer it otherwise, is not asked yet). Pingora would mark
        // the connection to close for a header written before the body is read; a 100 is
        // not an early answer, so that is switched off around it.
        session.set_close_on_response_before_downstream_finish(false);
        let sent = session.write_continue_response().await;
        session.set_close_on_response_before_downstream_finish(true);
        sent.map_err(|_| Denial::InvalidBody)?;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    // Usually the whole body is one chunk that came with the headers: it is kept as is,
    // and copied into `buf` only when a second chunk follows.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    loop {
        // After a framing error (a bad chunk size) or a timeout, where this request ends
        // is unknown: the connection closes after the answer, so no bytes after it are
        // taken for a next request (RFC 9112 §6.3).
        let chunk = match read_before(deadline, session.read_request_body()).await {
            Ok(Ok(chunk)) => chunk,
            failed => {
                session.set_keepalive(None);
                return Err(match failed {
                    Err(_) => Denial::BodyTimeout,
                    _ => Denial::InvalidBody,
                });
            }
        };
        let Some(chunk) = chunk else {
            return Ok(match first {
                Some(only) if buf.is_empty() => only,
                _ => buf.freeze(),
            });
        };
        if first.as_ref().map_or(0, Bytes::len) + buf.len() + chunk.len() > limit {
            return Err(Denial::BodyTooLarge);
        }
        match first.take() {
            None if buf.is_empty() => first = Some(chunk),
            earlier => {
                if let Some(earlier) = earlier {
                    buf.extend_from_slice(&earlier);
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
}

/// An HTTP/1.1 request with `Expect: 100-continue`: its client may hold the body back
/// until it gets `100 Continue`.
pub fn expects_continue(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// `read` with a deadline. It is polled once first: a read that is already complete (the
/// body arrived with the headers) then costs no timer registration.
async fn read_before<F: std::future::Future>(
    deadline: tokio::time::Instant,
    read: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut read = std::pin::pin!(read);
    let ready = std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
    match ready {
        std::task::Poll::Ready(output) => Ok(output),
        // Boxed: the timer is only needed on this (rarer) path, and inline it would grow
        // every request's boxed `request_filter` future.
        std::task::Poll::Pending => Box::pin(tokio::time::timeout_at(deadline, read)).await,
    }
}
