//! A stand-in kubelet: just enough of its HTTPS port-forward endpoint for the API server to
//! proxy `pods/portforward` to, speaking the WebSocket `v4.channel.k8s.io` framing.
//!
//! `/portForward/{ns}/{pod}?port=P` is upgraded to a WebSocket; per port, channel 0 carries
//! data and channel 1 errors, each opened by a frame of the channel byte and the port (2 bytes,
//! little-endian), as the real kubelet's wsstream does and kube's `Portforwarder` expects. Data
//! on channel 0 is relayed to a TCP connection to `target`, which plays the pod's container.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

const PROTOCOL: &str = "v4.channel.k8s.io";

/// The running stand-in: its port, and the port-forward requests it accepted.
pub struct Kubelet {
    pub port: u16,
    /// `ns/pod:port` of each forwarded connection, in order.
    pub forwarded: Arc<Mutex<Vec<String>>>,
}

/// Starts a stand-in kubelet on 127.0.0.1 whose pods all listen at `target`.
pub async fn start(target: SocketAddr) -> Result<Kubelet> {
    // Self-signed: the envtest API server runs without --kubelet-certificate-authority, so it
    // does not verify the kubelet's certificate (as kind's does not either).
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let forwarded = Arc::new(Mutex::new(Vec::new()));
    let seen = forwarded.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                if let Err(e) = serve(acceptor, tcp, target, seen).await {
                    eprintln!("stand-in kubelet: {e:#}");
                }
            });
        }
    });
    Ok(Kubelet { port, forwarded })
}

/// What a port-forward request asked for: `ns/pod` and the port.
fn parse_request(req: &Request) -> Option<(String, u16)> {
    let rest = req.uri().path().strip_prefix("/portForward/")?;
    let (ns, pod) = rest.split_once('/')?;
    let port = req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix("port="))?.parse().ok()?;
    Some((format!("{ns}/{pod}"), port))
}

// The handshake callback's error type is tungstenite's (a whole HTTP response).
#[allow(clippy::result_large_err)]
async fn serve(acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream, target: SocketAddr, seen: Arc<Mutex<Vec<String>>>) -> Result<()> {
    let tls = acceptor.accept(tcp).await.context("TLS handshake")?;
    let mut asked = None;
    let ws = tokio_tungstenite::accept_hdr_async(tls, |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let offered = req.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let parsed = parse_request(req);
        if parsed.is_none() || !offered.split(',').any(|p| p.trim() == PROTOCOL) {
            let mut refusal = ErrorResponse::new(Some(format!("not a v4 port-forward request: {} ({offered})", req.uri())));
            *refusal.status_mut() = http::StatusCode::BAD_REQUEST;
            return Err(refusal);
        }
        asked = parsed;
        resp.headers_mut().insert("sec-websocket-protocol", http::HeaderValue::from_static(PROTOCOL));
        Ok(resp)
    })
    .await
    .context("WebSocket handshake")?;
    let (pod, port) = asked.context("no request")?;
    seen.lock().unwrap().push(format!("{pod}:{port}"));

    let (mut sink, mut stream) = ws.split();
    let [lo, hi] = port.to_le_bytes();
    sink.send(Message::binary(vec![0, lo, hi])).await?;
    sink.send(Message::binary(vec![1, lo, hi])).await?;
    let conn = match TcpStream::connect(target).await {
        Ok(c) => c,
        Err(e) => {
            // What the kubelet does when nothing listens in the pod: one message on the error
            // channel, then the stream ends.
            let mut msg = vec![1];
            msg.extend(format!("error forwarding port {port} to pod {pod}: {e}").into_bytes());
            sink.send(Message::binary(msg)).await?;
            sink.close().await?;
            return Ok(());
        }
    };
    let (mut from_pod, mut to_pod) = conn.into_split();
    let upstream = async {
        while let Some(msg) = stream.next().await {
            match msg? {
                Message::Binary(b) if b.first() == Some(&0) => to_pod.write_all(&b[1..]).await?,
                Message::Close(_) => break,
                _ => {}
            }
        }
        to_pod.shutdown().await?;
        anyhow::Ok(())
    };
    let downstream = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = from_pod.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            let mut frame = Vec::with_capacity(n + 1);
            frame.push(0);
            frame.extend_from_slice(&buf[..n]);
            sink.send(Message::binary(frame)).await?;
        }
        sink.close().await?;
        anyhow::Ok(())
    };
    // The client's end closes the pod connection for writing only: the answer still flows back
    // until the pod closes it.
    let (up, down) = tokio::join!(upstream, downstream);
    up.and(down)
}
