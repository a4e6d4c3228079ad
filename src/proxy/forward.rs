//! Stage 9, forward (large bodies): a request whose body was read whole and is larger than
//! Pingora replays (64 KiB) is sent by us, over a connection from our own connector,
//! calling the same hooks in the same order as Pingora's proxy path (peer, request
//! header, response header, body filters). Errors are answered as `fail_to_proxy`
//! answers Pingora's.

use super::ctx::{Body, Ctx};
use super::service::KeybrakeProxy;
use super::upstream_call;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};

/// The most of a body read in `request_filter` that Pingora replays upstream (its retry
/// buffer). A larger read body goes out through `forward_read_body` instead.
pub const REPLAY_LIMIT: usize = 64 * 1024;

impl KeybrakeProxy {
    /// Forwards the request and its read body, answering any error.
    pub(super) async fn forward_read_body(&self, session: &mut Session, ctx: &mut Ctx) {
        if let Err(e) = self.exchange_read_body(session, ctx).await {
            session.set_keepalive(None);
            self.fail_to_proxy(session, &e, ctx).await;
        }
    }

    async fn exchange_read_body(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let peer = self.upstream_peer(session, ctx).await?;
        let mut req = session.req_header().clone();
        // Vendors are spoken to in HTTP/1.1, whatever the client used (as Pingora's path).
        req.set_version(http::Version::HTTP_11);
        // The whole body goes with the header: nothing to wait for a 100 for.
        req.remove_header(&http::header::EXPECT);
        self.upstream_request_filter(session, &mut req, ctx).await?;
        let body = match &mut ctx.body {
            Body::Read { bytes, .. } => std::mem::take(bytes),
            Body::Streamed { .. } => Default::default(),
        };
        // A stale pooled connection is tried again only while the vendor cannot have acted
        // on the request (`upstream_call::send`).
        let priced = ctx.spend.is_positive() || ctx.metering.reads_answer();
        let (mut upstream, mut resp) =
            upstream_call::send(&self.connector, &peer, &req, &body, priced)
                .await
                .map_err(|failed| {
                    if failed.never_arrived {
                        // `logging` releases the reservation.
                        ctx.upstream_start = None;
                    }
                    failed.error
                })?;
        self.upstream_response_filter(session, &mut resp, ctx)
            .await?;
        self.response_filter(session, &mut resp, ctx).await?;
        session.write_response_header(Box::new(resp), false).await?;
        loop {
            let mut chunk = if upstream.response_done() {
                None
            } else {
                upstream.read_response_body().await?
            };
            let end = chunk.is_none() || upstream.response_done();
            self.upstream_response_body_filter(session, &mut chunk, end, ctx)?;
            self.response_body_filter(session, &mut chunk, end, ctx)?;
            if end {
                // Back to the pool before the client sees the end of the answer: the
                // client's next call can then reuse it.
                self.connector
                    .release_http_session(upstream, &*peer, peer.options.idle_timeout)
                    .await;
                return session.write_response_body(chunk, true).await;
            }
            session.write_response_body(chunk, false).await?;
        }
    }
}
