//! `kommune-agent join`: pin the operator CA from the token, make a node key, and trade the
//! token plus a CSR for a node certificate. The key never leaves the machine.

use std::path::Path;

use kommune_proto::token::JoinToken;
use kommune_proto::v1::{JoinRequest, NodeFacts};
use rcgen::{CertificateParams, KeyPair};

use crate::connect::{self, ConnectError};
use crate::state::{AgentConfig, AgentState, StateError};

/// Why joining failed; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("invalid --token: {0}")]
    Token(#[from] kommune_proto::token::TokenError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the operator refused to join this machine: {0}")]
    Refused(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot create the node key: {0}")]
    Key(String),
}

/// What `join` needs.
pub struct JoinOptions<'a> {
    pub server: &'a str,
    pub token: &'a str,
    pub name: Option<&'a str>,
    pub region: &'a str,
    pub zone: &'a str,
    pub state_dir: &'a Path,
    pub force: bool,
    pub facts: NodeFacts,
}

/// Joins and writes the state directory. Returns the node name.
pub async fn join(opts: JoinOptions<'_>) -> Result<AgentState, JoinError> {
    let token: JoinToken = opts.token.parse()?;
    let server = connect::parse_server(opts.server)?;
    AgentState::check_free(opts.state_dir, opts.force)?;

    let ca_pem = connect::discover_ca(&server, &token.ca_pin).await?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| JoinError::Key(e.to_string()))?;
    let csr = CertificateParams::new(Vec::<String>::new()).and_then(|p| p.serialize_request(&key)).map_err(|e| JoinError::Key(e.to_string()))?;

    let mut client = connect::client(&server, &ca_pem, None).await?;
    let mut facts = opts.facts;
    facts.region = opts.region.to_string();
    facts.zone = opts.zone.to_string();
    let reply = client
        .join(JoinRequest {
            token: token.to_string(),
            csr_der: csr.der().to_vec(),
            requested_name: opts.name.unwrap_or_default().to_string(),
            facts: Some(facts),
        })
        .await
        .map_err(|s| JoinError::Refused(format!("{} ({:?})", s.message(), s.code())))?
        .into_inner();

    let state = AgentState {
        dir: opts.state_dir.to_path_buf(),
        config: AgentConfig { server: server.url, node_name: reply.node_name, region: opts.region.into(), zone: opts.zone.into() },
        ca_pem: reply.ca_pem,
        cert_pem: reply.certificate_pem,
        key_pem: key.serialize_pem(),
    };
    state.save()?;
    Ok(state)
}
