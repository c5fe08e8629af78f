//! Dialling the operator: URL checks, CA discovery by pin, and the tonic channels for Join
//! (server-authenticated TLS) and for sessions (mutual TLS).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use kommune_proto::v1::agent_gateway_client::AgentGatewayClient;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

/// Largest message the agent accepts (a wasm module from FetchBlob).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the operator could not be reached or trusted.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid --server {0:?}: expected https://HOST:PORT (the operator's agent gateway)")]
    BadUrl(String),
    #[error("cannot reach the operator at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error(
        "the operator at {url} did not present the CA named in the join token (token expects CA sha256 {expected}, server sent {presented}); check --server, or ask for a new token"
    )]
    PinMismatch { url: String, expected: String, presented: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// A checked gateway address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub url: String,
    pub host: String,
    pub port: u16,
}

/// Parses `https://host[:port]`; the port defaults to 443.
pub fn parse_server(url: &str) -> Result<Server, ConnectError> {
    let bad = || ConnectError::BadUrl(url.to_string());
    let uri: Uri = url.trim().parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad)?.trim_matches(|c| c == '[' || c == ']').to_string();
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad());
    }
    // `Uri` drops a port it cannot parse, so look at the authority text itself.
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let port = match authority.rsplit_once(':').filter(|(h, _)| !h.ends_with('[') && (h.ends_with(']') || !h.contains(':'))) {
        Some((_, p)) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        None => 443,
    };
    Ok(Server { url: format!("https://{}:{port}", uri.host().unwrap_or_default()), host, port })
}

/// Accepts any server certificate but records the chain, so the CA can be picked out of it and
/// checked against the token's pin. The handshake signature is still verified, so the peer
/// does hold the leaf key. Nothing is trusted on this connection: it only fetches the CA.
#[derive(Debug)]
struct RecordChain {
    chain: Mutex<Vec<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for RecordChain {
    fn verify_server_cert(
        &self,
        end: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
        chain.push(end.to_vec());
        chain.extend(inter.iter().map(|c| c.to_vec()));
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects once, takes the certificate the token pins out of the server's chain, and returns
/// it as PEM. Every later connection trusts only that CA.
pub async fn discover_ca(server: &Server, pin: &str) -> Result<String, ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(RecordChain { chain: Mutex::new(vec![]), provider: provider.clone() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let unreachable = |message: String| ConnectError::Unreachable { url: server.url.clone(), message };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((server.host.as_str(), server.port)))
        .await
        .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let name = ServerName::try_from(kommune_proto::GATEWAY_SERVER_NAME).expect("a valid DNS name");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| unreachable("TLS handshake timed out".into()))?
        .map_err(|e| unreachable(format!("TLS handshake failed: {e}")))?;
    let chain = recorder.chain.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let ca = chain.iter().find(|der| kommune_proto::ca_pin(der) == pin).ok_or_else(|| ConnectError::PinMismatch {
        url: server.url.clone(),
        expected: pin.to_string(),
        presented: chain.last().map(|d| kommune_proto::ca_pin(d)).unwrap_or_else(|| "nothing".into()),
    })?;
    Ok(der_to_pem(ca))
}

fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// A gRPC client trusting only `ca_pem`, presenting `identity` (cert PEM, key PEM) if given.
pub async fn client(server: &Server, ca_pem: &str, identity: Option<(&str, &str)>) -> Result<AgentGatewayClient<Channel>, ConnectError> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name(kommune_proto::GATEWAY_SERVER_NAME);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Endpoint::from_shared(server.url.clone())
        .map_err(|_| ConnectError::BadUrl(server.url.clone()))?
        .tls_config(tls)
        .map_err(|e| ConnectError::Tls(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        // An operator that went silent (frozen, or a path that drops packets) is given up within
        // 15 s, so the agent reconnects, through the gateway Service, to whichever replica leads.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await.map_err(|e| ConnectError::Unreachable { url: server.url.clone(), message: error_chain(&e) })?;
    Ok(AgentGatewayClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
}

/// An error and its causes on one line ("transport error: connection refused").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(parse_server("https://127.0.0.1:30443").unwrap(), Server { url: "https://127.0.0.1:30443".into(), host: "127.0.0.1".into(), port: 30443 });
        assert_eq!(parse_server("https://ops.example.org").unwrap().port, 443);
        assert_eq!(parse_server("https://[::1]:8443").unwrap().host, "::1");
        for bad in ["", "127.0.0.1:30443", "http://x:1", "https://", "https://x:1/path", "ftp://x", "https://x:99999", "https://x:0", "https://[::1]:70000"] {
            let err = parse_server(bad).map(|s| panic!("{bad} parsed as {s:?}")).unwrap_err().to_string();
            assert!(err.contains("https://HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn pem_encoding_is_parseable() {
        use rustls::pki_types::pem::PemObject;
        let der: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        let pem = der_to_pem(&der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec(), der);
    }
}
