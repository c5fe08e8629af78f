//! A minimal Docker Engine API (v1.41) client over a unix socket: one HTTP/1.1 connection per
//! call, JSON in and out, and the multiplexed log stream. Podman's compatible socket speaks it too.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use super::super::output::SharedCapture;

/// Every path is versioned, so an engine that cannot speak v1.41 says so instead of guessing.
const API_VERSION: &str = "/v1.41";
/// JSON replies are small; anything bigger is not an answer we can use.
const MAX_REPLY_BYTES: usize = 1 << 20;

/// What went wrong talking to the engine, as text for an attempt's message.
pub(super) type EngineError = String;

/// The engine behind one socket.
#[derive(Debug, Clone)]
pub(super) struct Engine {
    socket: PathBuf,
}

/// A response whose body is still being read, with the connection that carries it.
struct Exchange {
    response: Response<Incoming>,
    _connection: Connection,
}

/// Aborts the connection task when the caller is done with it, also when a call is abandoned
/// half-way (timeout, cancel): nothing talks to the engine on behalf of a finished attempt.
struct Connection(tokio::task::JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Engine {
    pub(super) fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    pub(super) fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Exchange, EngineError> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| format!("cannot connect to {}: {e}", self.socket.display()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        let connection = Connection(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(format!("{API_VERSION}{path}"))
            // The engine ignores the host, but HTTP/1.1 requires one.
            .header(hyper::header::HOST, "docker")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        Ok(Exchange { response, _connection: connection })
    }

    /// Sends a call and reads its JSON reply (Null when empty). A status outside 2xx becomes an
    /// error carrying the engine's own `message`.
    pub(super) async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<(StatusCode, Value), EngineError> {
        let exchange = self.send(method, path, body).await?;
        let status = exchange.response.status();
        let bytes = read_bounded(exchange.response.into_body()).await?;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status.is_success() || status == StatusCode::NOT_MODIFIED { Ok((status, value)) } else { Err(engine_message(status, &value)) }
    }

    /// Like [`Engine::call`], but a 404 is an answer (None), not an error.
    pub(super) async fn find(&self, path: &str) -> Result<Option<Value>, EngineError> {
        let exchange = self.send(Method::GET, path, None).await?;
        let status = exchange.response.status();
        let bytes = read_bounded(exchange.response.into_body()).await?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(value)),
            s => Err(engine_message(s, &value)),
        }
    }

    /// A call whose 200 reply is a stream of JSON progress lines (image pull). An error can
    /// arrive in-stream after the 200, so every line is read; the last error wins.
    pub(super) async fn call_progress(&self, path: &str) -> Result<(), EngineError> {
        let exchange = self.send(Method::POST, path, None).await?;
        let status = exchange.response.status();
        let mut body = exchange.response.into_body();
        if !status.is_success() {
            return Err(error_reply(status, body).await);
        }
        let mut line = Vec::new();
        let mut error = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            let Ok(data) = frame.into_data() else { continue };
            for &byte in data.iter() {
                if byte == b'\n' {
                    error = progress_error(&line).or(error);
                    line.clear();
                } else if line.len() < MAX_REPLY_BYTES {
                    line.push(byte);
                }
            }
        }
        error = progress_error(&line).or(error);
        error.map_or(Ok(()), Err)
    }

    /// Streams a container's multiplexed logs into the captures, stopping early once either
    /// passes its cap (the caller reports that from the captures).
    pub(super) async fn logs(&self, path: &str, stdout: &SharedCapture, stderr: &SharedCapture) -> Result<(), EngineError> {
        let exchange = self.send(Method::GET, path, None).await?;
        let status = exchange.response.status();
        let mut body = exchange.response.into_body();
        if !status.is_success() {
            return Err(error_reply(status, body).await);
        }
        let mut demux = Demux::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Ok(data) = frame.into_data()
                && !demux.feed(&data, stdout, stderr)
            {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The error a non-success reply carries (its JSON `message`, when it has one).
async fn error_reply(status: StatusCode, body: Incoming) -> EngineError {
    match read_bounded(body).await {
        Ok(bytes) => engine_message(status, &serde_json::from_slice(&bytes).unwrap_or(Value::Null)),
        Err(e) => e,
    }
}

async fn read_bounded(mut body: Incoming) -> Result<Vec<u8>, EngineError> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_REPLY_BYTES {
                return Err(format!("reply larger than {MAX_REPLY_BYTES} bytes"));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

/// "No such image: x (HTTP 404)": the engine's message when it sent one.
fn engine_message(status: StatusCode, body: &Value) -> EngineError {
    let message = match body {
        Value::Object(o) => o.get("message").and_then(Value::as_str).map(str::to_owned),
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        _ => None,
    };
    match message {
        Some(m) => format!("{} (HTTP {})", m.chars().take(500).collect::<String>(), status.as_u16()),
        None => format!("HTTP {status}"),
    }
}

fn progress_error(line: &[u8]) -> Option<EngineError> {
    let value: Value = serde_json::from_slice(line).ok()?;
    let error = value.get("error").or_else(|| value.pointer("/errorDetail/message"))?;
    Some(error.as_str().map_or_else(|| error.to_string(), str::to_owned))
}

/// Splits the engine's multiplexed stream: frames of an 8-byte header (stream type, three zero
/// bytes, big-endian payload length) and the payload. Chunks may cut frames anywhere.
#[derive(Debug, Default)]
pub(super) struct Demux {
    header: Vec<u8>,
    stream: u8,
    remaining: usize,
}

impl Demux {
    /// Takes in one chunk; false once a capture has passed its cap.
    pub(super) fn feed(&mut self, mut chunk: &[u8], stdout: &SharedCapture, stderr: &SharedCapture) -> bool {
        while !chunk.is_empty() {
            if self.remaining == 0 {
                let wanted = 8 - self.header.len();
                let taken = wanted.min(chunk.len());
                self.header.extend_from_slice(&chunk[..taken]);
                chunk = &chunk[taken..];
                if self.header.len() == 8 {
                    self.stream = self.header[0];
                    self.remaining = u32::from_be_bytes([self.header[4], self.header[5], self.header[6], self.header[7]]) as usize;
                    self.header.clear();
                }
                continue;
            }
            let taken = self.remaining.min(chunk.len());
            let payload = &chunk[..taken];
            chunk = &chunk[taken..];
            self.remaining -= taken;
            // 0 is stdin (never attached), 3 the engine's own errors: stderr is where they help.
            let kept = match self.stream {
                1 => stdout.push(payload),
                0 => true,
                _ => stderr.push(payload),
            };
            if !kept {
                return false;
            }
        }
        true
    }
}
