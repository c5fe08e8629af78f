//! The dashboard's TLS listener: a serving certificate from the operator CA, and optionally the
//! cluster's client CA, so a kubeconfig with a client certificate proves its user here too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::auth::UserInfo;

/// Time a connection has to finish its handshake; handshakes run concurrently, so a slow one
/// delays nobody else.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad PEM in {what}: {source}")]
    Pem { what: &'static str, source: rustls::pki_types::pem::Error },
    #[error("{0} holds no certificate")]
    Empty(&'static str),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Who is at the other end of a connection: its address, and the user its verified client
/// certificate names (CN = user, O = groups, as the API server reads them).
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub user: Option<UserInfo>,
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Accepts TCP connections and hands on those whose TLS handshake succeeded.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
}

/// Builds the rustls server configuration: `chain_pem`/`key_pem` serve, `client_ca_pem` (the
/// API server's `client-ca-file`) verifies client certificates, which stay optional so a bearer
/// token works too.
pub fn server_config(chain_pem: &str, key_pem: &str, client_ca_pem: Option<&str>) -> Result<rustls::ServerConfig, TlsError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>().map_err(|source| TlsError::Pem { what: "the serving chain", source })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| TlsError::Pem { what: "the serving key", source })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca_pem {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|source| TlsError::Pem { what: "the client CA", source })?;
                roots.add(cert).map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
            }
            if roots.is_empty() {
                return Err(TlsError::Empty("the client CA bundle"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl TlsListener {
    pub async fn bind(addr: SocketAddr, config: rustls::ServerConfig) -> Result<TlsListener, TlsError> {
        let tcp = TcpListener::bind(addr).await.map_err(|source| TlsError::Bind { addr, source })?;
        let local = tcp.local_addr().map_err(|source| TlsError::Bind { addr, source })?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "dashboard accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let user = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| user_of(c));
                            let _ = tx.send((tls, Peer { addr, user })).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "dashboard TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "dashboard TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer { addr: self.local, user: None })
    }
}

/// The Kubernetes user a verified client certificate names: CN is the user, each O a group.
pub fn user_of(cert: &[u8]) -> Option<UserInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let subject = cert.subject();
    let username = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    if username.is_empty() {
        return None;
    }
    let mut groups: Vec<String> = subject.iter_organization().filter_map(|o| o.as_str().ok().map(str::to_string)).collect();
    groups.push("system:authenticated".into());
    Some(UserInfo { username, uid: String::new(), groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_names_its_user_and_groups() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "jane");
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "team-a");
        let cert = params.self_signed(&key).unwrap();
        let user = user_of(cert.der()).unwrap();
        assert_eq!(user.username, "jane");
        assert_eq!(user.groups, vec!["team-a".to_string(), "system:authenticated".into()]);
        assert!(user_of(b"not a certificate").is_none());
    }
}
