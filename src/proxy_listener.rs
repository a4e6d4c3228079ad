//! The proxy's listener, in front of Pingora's HTTP handling: what Pingora 0.9 leaves
//! unbounded for a client that has not yet sent a request (SPEC §7, issue of proxy
//! exhaustion). Per connection, in order:
//!
//! 1. admission to the connection table (`max_connections`, `max_connections_per_client`;
//!    at a bound the oldest connection still waiting for a header makes room);
//! 2. the TLS handshake (ALPN `h2`, `http/1.1`), inside the header deadline;
//! 3. HTTP/1.1: each request header is read here, within `header_timeout` counted from
//!    the accept (a fresh connection) or from the first byte of the request (a kept-alive
//!    one, which may first wait `keepalive_timeout` for that byte), and at most
//!    `max_header_bytes` long (431). The bytes are handed to Pingora, which parses them
//!    as it would have read them. Pingora alone has a per-read timeout (a byte every 59 s
//!    holds a connection for ever) and no deadline between kept-alive requests.
//! 4. HTTP/2: Pingora's own connection handling, with the client preface due within the
//!    header deadline, an idle timeout (`keepalive_timeout`) and a header-list bound.

use crate::conns::{ConnGuard, ConnTable, H2Conns, Phase};
use crate::proxy::service::KeybrakeProxy;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::http::ServerSession;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The most header fields Pingora parses in an HTTP/1.1 request (its `MAX_HEADERS`).
const MAX_HEADER_FIELDS: usize = 256;

/// The first byte of a TLS record carrying a handshake message (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// How long connections already accepted keep being served after the accept loop stops.
const ACCEPTED_GRACE: Duration = Duration::from_secs(1);

/// The limits of the proxy's listener (`proxy:` in the config).
#[derive(Debug, Clone, Copy)]
pub struct HeaderLimits {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_header_bytes: usize,
    /// A write to the client that makes no progress for this long fails.
    pub write_timeout: Duration,
}

pub struct ProxyApp {
    proxy: Arc<HttpProxy<KeybrakeProxy>>,
    tls: Option<Acceptor>,
    conns: Arc<ConnTable>,
    h2_conns: Arc<H2Conns>,
    limits: HeaderLimits,
    /// Set once the accept loop has stopped and accepted connections had their grace:
    /// connections waiting for a next request close.
    closing: tokio::sync::watch::Sender<bool>,
}

impl ProxyApp {
    pub fn new(
        mut proxy: HttpProxy<KeybrakeProxy>,
        tls: Option<Arc<rustls::ServerConfig>>,
        conns: Arc<ConnTable>,
        h2_conns: Arc<H2Conns>,
        limits: HeaderLimits,
    ) -> Self {
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h2_idle_timeout = Some(limits.keepalive_timeout);
        proxy.server_options = Some(options);
        let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
        h2.max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        proxy.h2_options = Some(h2);
        ProxyApp {
            proxy: Arc::new(proxy),
            tls: tls.map(Acceptor::from_server_config),
            conns,
            h2_conns,
            limits,
            closing: tokio::sync::watch::channel(false).0,
        }
    }

    /// HTTP/2: Pingora's own handling, told to stop (GOAWAY, then the streams already sent
    /// are served and their answers finished) when the process shuts down or the
    /// connection is evicted to make room. A client that stops reading is cut by the
    /// socket's write deadline, a stream's answer by the session's write timeout.
    async fn serve_h2(
        self: &Arc<Self>,
        stream: Stream,
        guard: &ConnGuard,
        shutdown: &ShutdownWatch,
    ) {
        let (stop, stopping) = tokio::sync::watch::channel(*shutdown.borrow());
        let mut process = shutdown.clone();
        let serve = ServerApp::process_new(&self.proxy, stream, &stopping);
        tokio::pin!(serve);
        let (mut evicted, mut process_open) = (false, true);
        loop {
            tokio::select! {
                _ = &mut serve => return,
                _ = guard.evicted(), if !evicted => {
                    evicted = true;
                    stop.send_replace(true);
                }
                changed = process.changed(), if process_open => match changed {
                    Ok(()) => {
                        if *process.borrow() {
                            stop.send_replace(true);
                        }
                    }
                    Err(_) => process_open = false,
                },
            }
        }
    }

    /// HTTP/1.x: reads each request header within its deadlines, then lets Pingora serve it.
    async fn serve_http1(
        self: &Arc<Self>,
        mut stream: Stream,
        guard: &ConnGuard,
        accept_deadline: Instant,
        shutdown: &ShutdownWatch,
    ) {
        let mut closing = self.closing.subscribe();
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut wait = Wait::Fresh(accept_deadline);
        loop {
            if !guard.enter(Phase::Waiting) {
                return;
            }
            let head = tokio::select! {
                head = read_head(&mut stream, wait, &self.limits) => head,
                _ = guard.evicted() => return,
                _ = closing.wait_for(|c| *c) => return,
            };
            let buf = match head {
                Head::Complete(buf) => buf,
                Head::Closed => return,
                // A TLS ClientHello on a plain-HTTP port: no HTTP answer would be read, and
                // waiting for the header deadline only keeps the client guessing.
                Head::Tls => return,
                Head::TooManyFields => {
                    let text =
                        format!("the request header has more than {MAX_HEADER_FIELDS} fields");
                    return refuse(&mut stream, 431, "headers_too_large", &text).await;
                }
                Head::TooLarge => {
                    let text = format!(
                        "the request header is larger than {} bytes",
                        self.limits.max_header_bytes
                    );
                    return refuse(&mut stream, 431, "headers_too_large", &text).await;
                }
                Head::TimedOut { partial: true } => {
                    let text = format!(
                        "the request header did not arrive within {} ms",
                        self.limits.header_timeout.as_millis()
                    );
                    return refuse(&mut stream, 408, "header_timeout", &text).await;
                }
                Head::TimedOut { partial: false } => return,
            };
            if !guard.enter(Phase::Busy) {
                return; // evicted as the header completed: its place is taken
            }
            let mut session = ServerSession::new_http1(stream);
            if let Some(s) = settings.take() {
                s.apply_to_session(&mut session);
            }
            // Whether the connection is kept is Pingora's decision; how long it waits for
            // the next request is timed here.
            session.set_keepalive(if *shutdown.borrow() { None } else { Some(0) });
            session.set_pipelined_prefix(buf);
            match self.proxy.process_new_http(session, shutdown).await {
                Some(reused) => {
                    let (s, kept) = reused.consume();
                    stream = s;
                    settings = kept;
                    wait = Wait::KeptAlive;
                }
                None => return,
            }
        }
    }
}

#[async_trait]
impl ServerApp for ProxyApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accept_deadline = Instant::now() + self.limits.header_timeout;
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        let guard = match self.conns.admit(client) {
            Ok(g) => g,
            Err(why) => {
                log::debug!("proxy connection from {client} refused: {why:?}");
                return None;
            }
        };
        let stream: Stream = match &self.tls {
            None => stream,
            Some(acceptor) => {
                let Ok(l4) = stream
                    .into_any()
                    .downcast::<pingora::protocols::l4::stream::Stream>()
                else {
                    log::error!("proxy TLS: the listener handed over something else than TCP");
                    return None;
                };
                tokio::select! {
                    tls = tokio::time::timeout_at(accept_deadline, acceptor.tls_handshake(*l4)) => match tls {
                        Ok(Ok(tls)) => Box::new(tls),
                        Ok(Err(e)) => {
                            log::debug!("TLS handshake with {client} failed: {e}");
                            return None;
                        }
                        Err(_) => return None,
                    },
                    _ = guard.evicted() => return None,
                }
            }
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // Streams are served concurrently and never cut: the connection is busy while
            // one is being served (`KeybrakeProxy::request_filter` counts them) and may
            // make room between them; Pingora closes it once idle for `keepalive_timeout`.
            // The socket digest (kept here, so its address stays this connection's) is
            // how a stream finds the count.
            let Some(digest) = stream.get_socket_digest() else {
                if !guard.enter(Phase::Busy) {
                    return None;
                }
                let stream = Box::new(Deadlines::new(
                    stream,
                    Some(accept_deadline),
                    self.limits.write_timeout,
                ));
                return ServerApp::process_new(&self.proxy, stream, shutdown).await;
            };
            let at = Arc::as_ptr(&digest) as usize;
            let count = guard.stream_count();
            self.h2_conns.insert(at, count.clone());
            let stream = Box::new(Deadlines::new(
                stream,
                Some(accept_deadline),
                self.limits.write_timeout,
            ));
            self.serve_h2(stream, &guard, shutdown).await;
            self.h2_conns.remove(at, &count);
            return None;
        }
        let stream = Box::new(Deadlines::new(stream, None, self.limits.write_timeout));
        self.serve_http1(stream, &guard, accept_deadline, shutdown)
            .await;
        None
    }

    /// Pingora closes every connection still waiting for its request the moment the
    /// accept loop stops, so a client whose connection the old process accepted a few
    /// microseconds earlier (during a graceful upgrade both processes accept on the same
    /// sockets) would see it closed unanswered. Those requests get `ACCEPTED_GRACE` to be
    /// read and answered (with `Connection: close`: the drain flag is set by then).
    async fn cleanup(&self) {
        tokio::time::sleep(ACCEPTED_GRACE).await;
        self.closing.send_replace(true);
        ServerApp::cleanup(self.proxy.as_ref()).await;
    }
}

/// What a connection waits for before its next request header.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// A fresh connection: the whole header by this deadline.
    Fresh(Instant),
    /// A kept-alive connection: a first byte within `keepalive_timeout`, then the rest of
    /// the header within `header_timeout`.
    KeptAlive,
}

#[derive(Debug)]
enum Head {
    /// A whole request header (and whatever followed it in the same reads).
    Complete(BytesMut),
    /// Closed by the client (or a read error) before a request began.
    Closed,
    /// The first byte is a TLS handshake record's.
    Tls,
    TooLarge,
    /// More header fields than Pingora parses (it would answer a bare 400).
    TooManyFields,
    TimedOut {
        partial: bool,
    },
}

/// Reads until the end of a request header (an empty line after the request line and the
/// header fields), within the deadlines and the size bound.
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    wait: Wait,
    limits: &HeaderLimits,
) -> Head {
    let mut deadline = match wait {
        Wait::Fresh(at) => at,
        Wait::KeptAlive => Instant::now() + limits.keepalive_timeout,
    };
    let mut buf = BytesMut::new();
    let mut scanned = 0;
    loop {
        if buf.capacity() - buf.len() < 1024 {
            // 4 KiB holds almost every request header; a larger one grows once to the
            // bound (a doubling growth would hold twice the bound per slow client).
            let room = match buf.capacity() {
                0 => 4096,
                _ => (limits.max_header_bytes + 1)
                    .saturating_sub(buf.len())
                    .max(1024),
            };
            buf.reserve(room);
        }
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
        let n = match read {
            Err(_) => {
                return Head::TimedOut {
                    partial: !buf.is_empty(),
                }
            }
            Ok(Err(_)) | Ok(Ok(0)) => return Head::Closed,
            Ok(Ok(n)) => n,
        };
        if matches!(wait, Wait::KeptAlive) && buf.len() == n {
            // The first bytes of the next request: its header deadline starts now.
            deadline = Instant::now() + limits.header_timeout;
        }
        if buf.first() == Some(&TLS_HANDSHAKE) {
            return Head::Tls;
        }
        match head_end(&buf, scanned) {
            Some(end) if end <= limits.max_header_bytes => {
                // Lines of the head: the request line, the fields, the empty line (and any
                // empty lines before the request line, which only make this stricter). A
                // field line takes at least 3 bytes (`a:` and LF): a short head has too few
                // lines to count.
                if end > 3 * MAX_HEADER_FIELDS
                    && buf[..end].iter().filter(|b| **b == b'\n').count() > MAX_HEADER_FIELDS + 2
                {
                    return Head::TooManyFields;
                }
                return Head::Complete(buf);
            }
            Some(_) => return Head::TooLarge,
            None if buf.len() > limits.max_header_bytes => return Head::TooLarge,
            None => scanned = buf.len(),
        }
    }
}

/// The length of the request header in `buf` (through its empty line), searching from
/// `from` on; empty lines before the request line are skipped, as HTTP/1.1 allows.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = buf.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let search = from.saturating_sub(3).max(start);
    let rest = buf.get(search..)?;
    rest.iter().enumerate().find_map(|(i, b)| {
        if *b != b'\n' {
            return None;
        }
        match rest.get(i + 1..) {
            Some([b'\n', ..]) => Some(search + i + 2),
            Some([b'\r', b'\n', ..]) => Some(search + i + 3),
            _ => None,
        }
    })
}

/// Answers a request that never reached Pingora with the proxy's denial shape (SPEC §4),
/// then closes. The write is bounded: a client that does not read is not waited for. It is
/// counted in `keybrake_requests_total` under vendor `unknown` (its path was not read);
/// no access-log line is written for it.
async fn refuse(stream: &mut Stream, status: u16, code: &str, message: &str) {
    crate::metrics::Metrics::global()
        .requests
        .with_label_values(&["unknown", code])
        .inc();
    let body = serde_json::json!({
        "code": code,
        "message": message,
        "error": {"type": "keybrake_error", "code": code, "message": message},
    })
    .to_string();
    let reason = match status {
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // The close flushes too: bounded with the write, so a client that reads nothing
    // never holds this task (or its socket).
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.flush().await?;
        stream.as_mut().shutdown().await;
        std::io::Result::Ok(())
    })
    .await;
}

/// A client connection with the deadlines Pingora leaves out, checked on the socket so
/// that every write is covered (response headers, bodies, error answers, the close):
/// - a write (or flush, or close) that makes no progress for `write_timeout` fails: a
///   client that stops reading cannot hold its connection;
/// - HTTP/2: reads fail once `preface_by` passes before the 24 bytes of the client
///   preface have arrived (Pingora's HTTP/2 handshake waits for them without a timeout).
///
/// Everything else passes straight through.
#[derive(Debug)]
struct Deadlines {
    inner: Stream,
    /// The preface's deadline and the bytes of it still due (none: HTTP/1.1).
    preface: Option<(Pin<Box<Sleep>>, usize)>,
    write_timeout: Duration,
    /// Armed when a write first returns `Pending`, disarmed by any progress; allocated
    /// on the first stall only.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: bool,
}

impl Deadlines {
    fn new(inner: Stream, preface_by: Option<Instant>, write_timeout: Duration) -> Self {
        Deadlines {
            inner,
            preface: preface_by.map(|at| (Box::pin(tokio::time::sleep_until(at)), 24)),
            write_timeout,
            stall: None,
            stalled: false,
        }
    }

    /// After a write side poll: `Pending` starts (or continues) the stall, anything else
    /// ends it; a stall older than `write_timeout` turns into an error.
    fn check_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = false;
            return polled;
        }
        let at = Instant::now() + self.write_timeout;
        let sleep = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if !self.stalled {
            sleep.as_mut().reset(at);
            self.stalled = true;
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not take the response in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Deadlines {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let Some((deadline, due)) = self.preface.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                *due = due.saturating_sub(got);
                if *due == 0 {
                    self.preface = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "HTTP/2 client preface not received in time",
                ))),
                Poll::Pending => Poll::Pending,
            },
            failed => failed,
        }
    }
}

impl AsyncWrite for Deadlines {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        self.check_write(cx, polled)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check_write(cx, polled)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check_write(cx, polled)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check_write(cx, polled)
    }
}

#[async_trait]
impl Shutdown for Deadlines {
    /// Through `poll_shutdown`, so the close (a TLS close_notify to flush) is bounded by
    /// the write timeout too.
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::shutdown(self).await;
    }
}

impl UniqueID for Deadlines {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Deadlines {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Deadlines {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Deadlines {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Deadlines {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Deadlines {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_header_is_its_empty_line_whatever_the_line_endings() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nbody", 0), Some(24));
        assert_eq!(head_end(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", 0), Some(22));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(head_end(b"\r\n\r\n", 0), None);
        // Found across reads: the search resumes a few bytes back.
        let full = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(head_end(full, 26), Some(27));
    }

    fn limits(max: usize) -> HeaderLimits {
        HeaderLimits {
            header_timeout: Duration::from_millis(300),
            keepalive_timeout: Duration::from_millis(200),
            max_header_bytes: max,
            write_timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn a_header_trickled_slower_than_its_deadline_times_out_whatever_its_progress() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nHost: a\r\n".iter() {
                if client.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let started = Instant::now();
        let wait = Wait::Fresh(started + Duration::from_millis(300));
        let head = read_head(&mut server, wait, &limits(1024)).await;
        assert!(matches!(head, Head::TimedOut { partial: true }), "{head:?}");
        assert!(started.elapsed() < Duration::from_millis(600));
    }

    #[tokio::test]
    async fn a_kept_alive_connection_waits_for_a_first_byte_then_for_the_header() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let head = read_head(&mut server, Wait::KeptAlive, &limits(1024)).await;
        assert!(
            matches!(head, Head::TimedOut { partial: false }),
            "{head:?}"
        );
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let head = read_head(&mut server, Wait::KeptAlive, &limits(1024)).await;
        assert!(
            matches!(head, Head::Complete(ref b) if b.len() == 18),
            "{head:?}"
        );
    }

    #[tokio::test]
    async fn a_header_over_the_bound_is_too_large() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let mut big = b"GET / HTTP/1.1\r\nx-pad: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 2000));
        big.extend(b"\r\n\r\n");
        client.write_all(&big).await.unwrap();
        let wait = Wait::Fresh(Instant::now() + Duration::from_secs(1));
        let head = read_head(&mut server, wait, &limits(1024)).await;
        assert!(matches!(head, Head::TooLarge), "{head:?}");
    }

    #[tokio::test]
    async fn more_fields_than_pingora_parses_are_too_many_and_256_are_not() {
        for (fields, too_many) in [(256, false), (257, true)] {
            let (mut client, mut server) = tokio::io::duplex(1 << 16);
            let mut head = b"GET / HTTP/1.1\r\n".to_vec();
            for i in 0..fields {
                head.extend(format!("x-f{i}: v\r\n").as_bytes());
            }
            head.extend(b"\r\n");
            client.write_all(&head).await.unwrap();
            let wait = Wait::Fresh(Instant::now() + Duration::from_secs(1));
            let got = read_head(&mut server, wait, &limits(32 * 1024)).await;
            assert_eq!(
                matches!(got, Head::TooManyFields),
                too_many,
                "{fields}: {got:?}"
            );
            assert_eq!(
                matches!(got, Head::Complete(_)),
                !too_many,
                "{fields}: {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_tls_client_hello_is_not_waited_for() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
            .await
            .unwrap();
        let wait = Wait::Fresh(Instant::now() + Duration::from_secs(5));
        let started = Instant::now();
        let got = read_head(&mut server, wait, &limits(1024)).await;
        assert!(matches!(got, Head::Tls), "{got:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// A `Stream` over one end of an in-memory pipe.
    fn piped(capacity: usize) -> (Stream, tokio::io::DuplexStream) {
        // `DuplexStream` is a Pingora stream in this crate's tests (`proxy::hook_tests`).
        let (near, far) = tokio::io::duplex(capacity);
        (Box::new(near), far)
    }

    #[tokio::test]
    async fn a_write_the_client_does_not_take_fails_after_the_write_timeout() {
        let (stream, mut client) = piped(1024);
        let mut conn = Deadlines::new(stream, None, Duration::from_millis(200));
        let started = Instant::now();
        let stuck = conn.write_all(&[b'x'; 8192]).await;
        assert_eq!(stuck.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
        // A client that keeps reading, however slowly, is never cut.
        let (stream, mut client2) = piped(1024);
        let mut conn = Deadlines::new(stream, None, Duration::from_millis(200));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 512];
            while got < 8192 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                got += client2.read(&mut buf).await.unwrap();
            }
        });
        conn.write_all(&[b'x'; 8192]).await.unwrap();
        reader.await.unwrap();
        let _ = client.read(&mut [0u8; 1]).await;
    }
}
