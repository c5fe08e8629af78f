//! `kommune-agent leave`: tell the operator this machine leaves the pool, then forget the
//! node's identity. Results not yet acknowledged are kept unless the provider forces it.

use kommune_proto::v1::LeaveRequest;

use crate::connect::{self, ConnectError};
use crate::state::{AgentState, StateError};
use crate::tasks::Spool;

/// Why leaving failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaveError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the operator refused: {0}")]
    Refused(String),
    #[error("{0} finished task result(s) are not acknowledged by the operator yet; run `kommune-agent run` until they are, or pass --force to drop them")]
    Unacknowledged(usize),
    #[error("cannot remove the state directory {path}: {source}")]
    Cleanup { path: String, source: std::io::Error },
}

/// What the operator reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    pub node_name: String,
    pub moved_attempts: u32,
}

/// Leaves the pool and removes the state directory's identity (key, certificates, results).
pub async fn leave(state: &AgentState, force: bool) -> Result<Left, LeaveError> {
    let spool = Spool::open(state.results_dir()).map_err(|source| LeaveError::Cleanup { path: state.results_dir().display().to_string(), source })?;
    let pending = spool.all().len();
    if pending > 0 && !force {
        return Err(LeaveError::Unacknowledged(pending));
    }
    let server = connect::parse_server(&state.config.server)?;
    let mut client = connect::client(&server, &state.ca_pem, Some((&state.cert_pem, &state.key_pem))).await?;
    let reply = client.leave(LeaveRequest {}).await.map_err(|s| LeaveError::Refused(format!("{} ({:?})", s.message(), s.code())))?.into_inner();
    for name in ["agent.json", "node.key", "node.crt", "ca.crt", "status.json"] {
        let path = state.dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(LeaveError::Cleanup { path: path.display().to_string(), source }),
        }
    }
    for dir in [state.results_dir(), state.scratch_dir()] {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(Left { node_name: reply.node_name, moved_attempts: reply.moved_attempts })
}
