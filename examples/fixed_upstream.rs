//! A fast local stand-in for a vendor, for load tests only: HTTP/1.1 keep-alive, reads
//! each request (headers + Content-Length body) and answers one fixed Stripe-like JSON
//! PaymentIntent. Binds loopback only.
//!
//! Usage: fixed_upstream --listen 127.0.0.1:U

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BODY: &str = r#"{"id":"pi_load","object":"payment_intent","amount":100,"currency":"usd","status":"succeeded"}"#;

fn content_length(headers: &[u8]) -> usize {
    let text = String::from_utf8_lossy(headers);
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn serve(mut sock: tokio::net::TcpStream) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: req_load\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let total = end + content_length(&buf[..end]);
        while buf.len() < total {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..total);
        sock.write_all(response.as_bytes()).await?;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .expect("usage: fixed_upstream --listen 127.0.0.1:PORT");
    let addr: std::net::SocketAddr = listen.parse().expect("a socket address");
    assert!(addr.ip().is_loopback(), "loopback only");
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        tokio::spawn(serve(sock));
    }
}
