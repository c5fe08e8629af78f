//! The agents' gateway: a tonic server over TLS that agents dial out to. `Join` trades a token
//! for a node certificate; `Session` is one long-lived mTLS stream per node; `FetchBlob` serves
//! wasm modules by digest. Handlers are thin: decisions live in the dispatcher and the store.

mod earnings;
pub mod limits;
mod renew;
mod session;

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kommune_proto::token::JoinToken;
use kommune_proto::v1::agent_gateway_server::{AgentGateway, AgentGatewayServer};
use kommune_proto::v1::{self, AgentMessage, OperatorMessage};
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::blobs::Blobs;
use crate::dispatch::Dispatcher;
use crate::fleet::{NodeFacts, NodeRegistration};
use crate::pki::{self, Ca};
use crate::store::{NodeGrant, NodeRecord, Registration, Removal};
use crate::tokens::{JoinTokens, TokenRejection};
use kommune_proto::now_ms;
use limits::{Rate, RateLimiter, retry_hint, source_key};

/// Largest message either side sends (a wasm module in FetchBlob).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Outbound messages queued per session before the operator stops waiting on that agent.
const SESSION_QUEUE: usize = 256;

/// What happened to a node, for whoever keeps ProviderNode objects current.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeEvent {
    /// A new identity was issued, with what its join token granted (copied into the new
    /// ProviderNode's spec unless the admin set those fields).
    Joined { node: String, facts: NodeFacts, public_key_sha256: String, grant: NodeGrant },
    /// A session opened (after Hello).
    Connected { node: String, facts: NodeFacts },
    /// A heartbeat arrived.
    Heartbeat { node: String },
    /// The session closed.
    Disconnected { node: String, reason: String },
    /// The node left the pool: its ProviderNode goes.
    Left { node: String },
}

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// A session without any message for this long is closed.
    pub session_timeout: Duration,
    /// Joins per source address (IPv4 address or IPv6 /64): Join is unauthenticated.
    pub join_rate: Rate,
    /// Session opens per node.
    pub session_rate: Rate,
    /// A connection that has not completed its TLS handshake by then is closed.
    pub handshake_timeout: Duration,
    /// Longest a unary request (Join, Leave, FetchBlob) or a Session's opening may take.
    pub request_timeout: Duration,
    /// How often the ledger is read for new settlement lines, which connected agents are then
    /// told of (their earnings account).
    pub earnings_poll: Duration,
}

impl Default for GatewayConfig {
    /// What `kommune-operator run` uses unless told otherwise.
    fn default() -> Self {
        GatewayConfig {
            heartbeat_interval: Duration::from_secs(5),
            session_timeout: Duration::from_secs(15),
            // A site joining a rack of machines at once, then a few a second.
            join_rate: Rate { burst: 20, per_second: 2.0 },
            // An agent reconnects with backoff from 0.5 s; ten quick reconnects, then one a second.
            session_rate: Rate { burst: 10, per_second: 1.0 },
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            earnings_poll: Duration::from_secs(5),
        }
    }
}

/// The AgentGateway service.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    dispatcher: Arc<Dispatcher>,
    tokens: Arc<dyn JoinTokens>,
    ca: Arc<Ca>,
    blobs: Blobs,
    events: mpsc::Sender<NodeEvent>,
    config: GatewayConfig,
    joins: RateLimiter<IpAddr>,
    session_opens: RateLimiter<String>,
    /// The ledger's settlement version: sessions resend their node's earnings when it moves.
    earnings: watch::Sender<u64>,
}

impl Gateway {
    pub fn new(
        dispatcher: Arc<Dispatcher>,
        tokens: Arc<dyn JoinTokens>,
        ca: Arc<Ca>,
        blobs: Blobs,
        events: mpsc::Sender<NodeEvent>,
        config: GatewayConfig,
    ) -> Self {
        let joins = RateLimiter::new(config.join_rate);
        let session_opens = RateLimiter::new(config.session_rate);
        let earnings = watch::Sender::new(0);
        Gateway { inner: Arc::new(Inner { dispatcher, tokens, ca, blobs, events, config, joins, session_opens, earnings }) }
    }

    /// Serves on `listener` until `shutdown` resolves: the gateway plus the gRPC health service.
    pub async fn serve(self, listener: TcpListener, shutdown: impl std::future::Future<Output = ()> + Send) -> Result<(), tonic::transport::Error> {
        let (chain, key) = self.inner.ca.issue_server(&[]).expect("the operator CA can always issue a serving certificate");
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(chain, key))
            .client_ca_root(Certificate::from_pem(self.inner.ca.cert_pem()))
            // Join has no client certificate yet; Session and FetchBlob require one (checked
            // in the handlers).
            .client_auth_optional(true)
            // tonic runs handshakes concurrently; this ends one whose peer never finishes it.
            .timeout(self.inner.config.handshake_timeout);
        let request_timeout = self.inner.config.request_timeout;
        let inner = self.inner.clone();
        let poll_earnings = async move {
            match inner.dispatcher.ledger() {
                Some(ledger) => earnings::poll(ledger, &inner.earnings, inner.config.earnings_poll).await,
                None => std::future::pending().await,
            }
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AgentGatewayServer<Gateway>>().await;
        let service = AgentGatewayServer::new(self).max_decoding_message_size(1 << 20).max_encoding_message_size(MAX_MESSAGE_BYTES);
        let server = Server::builder()
            .tls_config(tls)?
            // Covers a handler until its response starts: a Session's stream then lives on.
            .timeout(request_timeout)
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming(listener), shutdown);
        tokio::select! {
            served = server => served,
            () = poll_earnings => unreachable!("the earnings poll runs until the process ends"),
        }
    }
}

/// Accepted connections with Nagle's algorithm off. tonic sets TCP_NODELAY only on sockets it
/// binds itself; with it on, a small reply (an Ack, an Assign) waits for the peer's delayed
/// ACK, about 40 ms on Linux, on every round trip.
fn incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// Binds the gateway's listening socket.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The node a request comes from, by its client certificate, once the certificate's key is
/// the one registered for that name and the name is not retired. Returns the name, the node's
/// ed25519 public key (which verifies its usage receipts) and its registration.
async fn authenticated_node_key<T>(inner: &Inner, request: &Request<T>) -> Result<(String, [u8; 32], NodeRecord), Status> {
    // Read from the certificate before the store is asked: the request is not held across it.
    let (node, key, raw) = peer_identity(request)?;
    match inner.dispatcher.store().node(&node).await {
        Ok(Some(r)) if r.removed.is_none() && r.public_key_sha256 == key => Ok((node, raw, r)),
        Ok(_) => Err(Status::permission_denied(format!("node {node} is not registered with this key; join again with a new token"))),
        Err(e) => Err(Status::unavailable(e.to_string())),
    }
}

async fn authenticated_node<T>(inner: &Inner, request: &Request<T>) -> Result<String, Status> {
    authenticated_node_key(inner, request).await.map(|(node, _, _)| node)
}

/// (node name, sha256 of its public key, the ed25519 public key) from the client certificate.
fn peer_identity<T>(request: &Request<T>) -> Result<(String, String, [u8; 32]), Status> {
    let certs = request.peer_certs().ok_or_else(|| Status::unauthenticated("a client certificate is required; run `kommune-agent join` first"))?;
    let leaf = certs.first().ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let node = pki::node_name_of(leaf).ok_or_else(|| Status::unauthenticated("the client certificate has no node name"))?;
    let key = pki::public_key_sha256_of(leaf).ok_or_else(|| Status::unauthenticated("the client certificate has no usable key"))?;
    let raw = pki::public_key_of(leaf).ok_or_else(|| Status::unauthenticated("the client certificate's key is not ed25519"))?;
    Ok((node, key, raw))
}

/// Hands an event to the ProviderNode writer without waiting: the gateway's paths never wait on
/// the API server. A full channel (the writer far behind) drops it, logged; heartbeats are
/// dropped silently, as the next one says the same.
pub(crate) fn record(events: &mpsc::Sender<NodeEvent>, event: NodeEvent) {
    match events.try_send(event) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(NodeEvent::Heartbeat { .. })) => {}
        Err(mpsc::error::TrySendError::Full(e)) => warn!(event = ?e, "the ProviderNode writer is behind; event dropped"),
    }
}

/// A DNS-1123 label, as ProviderNode names must be.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn generated_name() -> String {
    let mut rng = rand::thread_rng();
    let suffix: String = (0..6).map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.gen_range(0..36)])).collect();
    format!("provider-{suffix}")
}

/// Refuses a Join for a name the registry already has, unless it is a re-join of the same
/// registered key.
fn refuse_taken(name: &str, key_sha: &str, record: &NodeRecord) -> Result<(), Status> {
    match record.removed {
        Some((at_ms, reason)) => Err(retired(name, at_ms, reason)),
        None if record.public_key_sha256 != key_sha => Err(taken(name)),
        None => Ok(()),
    }
}

fn taken(name: &str) -> Status {
    Status::already_exists(format!("node name {name} is taken by another machine; choose another with --name"))
}

/// A retired name is refused whatever the key: the ledger keys earnings by name, so a name
/// given to a second key would merge two identities' earnings.
fn retired(name: &str, at_ms: i64, reason: Removal) -> Status {
    let when = k8s_openapi::jiff::Timestamp::from_millisecond(at_ms).map_or_else(|_| format!("{at_ms} ms"), |t| t.to_string());
    let how = match reason {
        Removal::Left => "left the pool",
        Removal::Revoked => "was removed from the pool by an admin",
    };
    Status::already_exists(format!("node name {name} belonged to a node that {how} at {when}; names are never reused: choose another with --name"))
}

/// A join whose token was refused: logged with its reason, answered with the one status every
/// bad token gets.
fn refused(rejection: &TokenRejection, peer: Option<SocketAddr>) -> Status {
    info!(?peer, reason = %rejection, "join refused");
    rejection.to_status()
}

/// ResourceExhausted with the wait also as `retry-after-ms` metadata, for clients that read it.
fn exhausted(message: String, after: Duration) -> Status {
    let mut status = Status::resource_exhausted(message);
    if let Ok(v) = after.as_millis().max(1).to_string().parse() {
        status.metadata_mut().insert("retry-after-ms", v);
    }
    status
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<OperatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentGateway for Gateway {
    #[tracing::instrument(skip_all, fields(peer = ?request.remote_addr()))]
    async fn join(&self, request: Request<v1::JoinRequest>) -> Result<Response<v1::JoinResponse>, Status> {
        let peer = request.remote_addr();
        if let Err(after) = self.inner.joins.check(&source_key(peer)) {
            debug!(?peer, "join refused: rate limit");
            return Err(exhausted(format!("too many joins from this address; retry in {}", retry_hint(after)), after));
        }
        let req = request.into_inner();
        // The token first, before the name or the CSR is looked at: whoever holds no valid
        // token learns nothing (which names are taken, which token ids exist), and every bad
        // token reads the same. The reason is logged for the admin.
        let token: JoinToken = req.token.parse().map_err(|e: kommune_proto::token::TokenError| {
            info!(?peer, error = %e, "join refused: malformed token");
            Status::unauthenticated(crate::tokens::NOT_VALID)
        })?;
        self.inner.tokens.check(&token).await.map_err(|e| refused(&e, peer))?;
        let name = if req.requested_name.is_empty() { generated_name() } else { req.requested_name.clone() };
        if !valid_node_name(&name) {
            return Err(Status::invalid_argument(format!(
                "node name {:?} is not valid: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
                name.chars().take(80).collect::<String>()
            )));
        }
        // Sign before redeeming so a malformed request does not use up the token.
        let (certificate_pem, key_sha) = self.inner.ca.sign_node(&req.csr_der, &name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Checked before redeeming too, so a refused name does not use up the token.
        match self.inner.dispatcher.store().node(&name).await {
            Ok(Some(record)) => refuse_taken(&name, &key_sha, &record)?,
            Ok(None) => {}
            Err(e) => return Err(Status::unavailable(e.to_string())),
        }
        // The ProviderNode writer's channel is full: its writes are behind (the API server is
        // slow or the write budget spent). A join now would issue an identity whose object
        // waits, so the agent retries a little later instead; nothing here waits on the writer.
        if self.inner.events.capacity() == 0 {
            let after = Duration::from_secs(1);
            return Err(exhausted(format!("the operator is busy recording other joins; retry in {}", retry_hint(after)), after));
        }
        let grant = self.inner.tokens.redeem(&token).await.map_err(|e| refused(&e, peer))?;
        let grant = match self.inner.dispatcher.store().register_node(&name, &key_sha, &grant, now_ms()).await {
            Ok(Registration::New) => grant,
            // A re-join keeps what the first registration granted, whatever this token says.
            Ok(Registration::SameKey) => match self.inner.dispatcher.store().node(&name).await {
                Ok(Some(r)) => NodeGrant { owner: r.owner.unwrap_or_default(), limits: r.limits },
                Ok(None) => grant,
                Err(e) => return Err(Status::unavailable(e.to_string())),
            },
            Ok(Registration::Taken) => return Err(taken(&name)),
            Ok(Registration::Retired { at_ms, reason }) => return Err(retired(&name, at_ms, reason)),
            Err(e) => return Err(Status::unavailable(e.to_string())),
        };
        let facts = NodeFacts::from_proto(req.facts.as_ref());
        info!(node = %name, token = %token.id, owner = %grant.owner, ?peer, "node joined");
        record(&self.inner.events, NodeEvent::Joined { node: name.clone(), facts, public_key_sha256: key_sha, grant });
        Ok(Response::new(v1::JoinResponse { node_name: name, certificate_pem, ca_pem: self.inner.ca.cert_pem().to_string() }))
    }

    type SessionStream = SessionStream;

    async fn session(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let (node, public_key, record) = authenticated_node_key(&self.inner, &request).await?;
        if let Err(after) = self.inner.session_opens.check(&node) {
            debug!(%node, "session refused: rate limit");
            return Err(exhausted(format!("node {node} opens sessions too often; retry in {}", retry_hint(after)), after));
        }
        // Before the session opens, so its first placement sees the token's owner and caps.
        let owner = record.owner.clone().unwrap_or_default();
        self.inner.dispatcher.fleet().set_registration(&node, NodeRegistration { owner: record.owner, limits: record.limits });
        // The ledger keeps every key a node name ever had, so its receipts stay verifiable
        // after the node leaves. Idempotent; done here so nodes joined before metering count.
        if let Some(ledger) = self.inner.dispatcher.ledger() {
            // The owner goes into the chain with the key, so statements group by it verifiably.
            ledger.register_owned_node_key(&node, public_key, &owner).await.map_err(|e| Status::unavailable(e.to_string()))?;
        }
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            session::run(inner, node, public_key, inbound, tx).await;
        });
        let metrics = self.inner.dispatcher.metrics().clone();
        let outbound = tokio_stream::StreamExt::map(ReceiverStream::new(rx), move |m| {
            if let Ok(m) = &m {
                metrics.message("sent", session::operator_kind(m), prost::Message::encoded_len(m));
            }
            m
        });
        Ok(Response::new(Box::pin(outbound)))
    }

    async fn leave(&self, request: Request<v1::LeaveRequest>) -> Result<Response<v1::LeaveResponse>, Status> {
        let node = authenticated_node(&self.inner, &request).await?;
        let moved = self.inner.dispatcher.leave(&node).await.map_err(|e| Status::unavailable(e.to_string()))?;
        record(&self.inner.events, NodeEvent::Left { node: node.clone() });
        Ok(Response::new(v1::LeaveResponse { node_name: node, moved_attempts: moved as u32 }))
    }

    /// Stores one output of an attempt the node holds (see `Dispatcher::begin_upload`); the
    /// operator hashes the bytes itself and holds them to the job's limits and its disk's room.
    async fn upload_output(&self, request: Request<Streaming<v1::OutputUploadChunk>>) -> Result<Response<v1::OutputUploaded>, Status> {
        self.upload(request).await
    }

    /// Serves a module only to a node holding an active attempt of a job whose module it is
    /// (or was, within the blob grace). Everyone else gets the same refusal whether or not the
    /// blob exists, so a digest cannot be probed.
    async fn fetch_blob(&self, request: Request<v1::FetchBlobRequest>) -> Result<Response<v1::Blob>, Status> {
        let node = authenticated_node(&self.inner, &request).await?;
        let sha = request.into_inner().sha256;
        if !kommune_proto::is_sha256_hex(&sha) {
            return Err(Status::invalid_argument(format!("{:?} is not a sha256 digest", sha.chars().take(80).collect::<String>())));
        }
        let users = self.inner.blobs.users(&sha);
        let allowed = !users.is_empty() && self.inner.dispatcher.node_holds_attempt_of(&node, &users).await.map_err(|e| Status::unavailable(e.to_string()))?;
        if !allowed {
            return Err(Status::permission_denied(format!("node {node} holds no assigned or running attempt that needs module sha256 {sha}")));
        }
        match self.inner.blobs.get(&sha) {
            Ok(Some(data)) => Ok(Response::new(v1::Blob { data })),
            Ok(None) => Err(Status::not_found(format!("no module with sha256 {sha} is stored by the operator"))),
            Err(crate::blobs::BlobError::BadDigest(d)) => Err(Status::invalid_argument(format!("{d:?} is not a sha256 digest"))),
            Err(e) => {
                warn!(%node, error = %e, "cannot read blob");
                Err(Status::internal(e.to_string()))
            }
        }
    }
}

impl Gateway {
    async fn upload(&self, request: Request<Streaming<v1::OutputUploadChunk>>) -> Result<Response<v1::OutputUploaded>, Status> {
        use crate::dispatch::outputs::UploadRefused;
        use crate::outputs::OutputError;
        use v1::output_upload_chunk::Kind;
        let node = authenticated_node(&self.inner, &request).await?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(v1::OutputUploadChunk { kind: Some(Kind::Header(h)) }) => h,
            _ => return Err(Status::invalid_argument("an upload starts with an OutputUploadHeader")),
        };
        let status = |e: UploadRefused| match e {
            UploadRefused::NotHeld { .. } => Status::permission_denied(e.to_string()),
            UploadRefused::NoOutputs(_) => Status::failed_precondition(e.to_string()),
            UploadRefused::Output(OutputError::StoreFull { .. }) => Status::resource_exhausted(e.to_string()),
            UploadRefused::Output(OutputError::Io(_)) | UploadRefused::Store(_) => Status::unavailable(e.to_string()),
            UploadRefused::Output(_) => Status::invalid_argument(e.to_string()),
        };
        let mut upload = self.inner.dispatcher.begin_upload(&node, &header.attempt_id, &header.name, header.size, header.excess_bytes).await.map_err(status)?;
        while let Some(chunk) = stream.message().await? {
            match chunk.kind {
                Some(Kind::Data(data)) => upload.write(&data).await.map_err(|e| status(e.into()))?,
                _ => return Err(Status::invalid_argument("only data may follow an upload's header")),
            }
        }
        let stored = upload.finish().await.map_err(|e| status(e.into()))?;
        debug!(%node, attempt = %crate::dispatch::short(&header.attempt_id), name = %stored.name, size = stored.size, "output stored");
        Ok(Response::new(v1::OutputUploaded { sha256: stored.sha256, size: stored.size }))
    }
}

#[cfg(test)]
mod tests {
    use super::valid_node_name;

    #[test]
    fn node_names() {
        for ok in ["a", "laptop-1", "pn0", &"a".repeat(63)] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64), "ünï"] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }
}
