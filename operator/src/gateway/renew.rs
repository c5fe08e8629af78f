//! Node certificate renewal over a live session: the operator signs a new certificate only for
//! the session's authenticated node name and the key registered for it, at most once a minute.

use std::time::{Duration, Instant};

use kommune_proto::v1;
use tracing::{info, warn};

use super::Inner;

/// Least time between two renewals on one session: each is a signature, and an honest agent
/// asks once per certificate lifetime.
const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// Answers one renewal request. `last` is the session's previous renewal.
pub(super) async fn renew(inner: &Inner, node: &str, public_key: &[u8; 32], csr_der: &[u8], last: &mut Option<Instant>) -> v1::Certificate {
    let refused = |why: String| {
        warn!(%node, reason = %why, "certificate renewal refused");
        v1::Certificate { certificate_pem: String::new(), refused: why }
    };
    if last.is_some_and(|t| t.elapsed() < MIN_INTERVAL) {
        return refused(format!("a certificate was renewed on this session less than {}s ago", MIN_INTERVAL.as_secs()));
    }
    let key_sha = kommune_proto::sha256_hex(public_key);
    // The session was authenticated when it opened; a revocation since then ends it, but the
    // registry is the word on who may hold a certificate, so it is asked again.
    match inner.dispatcher.store().node_key(node).await {
        Ok(Some(k)) if k == key_sha => {}
        Ok(_) => return refused(format!("node {node} is no longer registered with this key")),
        Err(e) => return refused(format!("cannot check the node's registration: {e}")),
    }
    match inner.ca.renew_node(csr_der, node, &key_sha) {
        Ok(certificate_pem) => {
            *last = Some(Instant::now());
            info!(%node, "node certificate renewed");
            v1::Certificate { certificate_pem, refused: String::new() }
        }
        Err(e) => refused(e.to_string()),
    }
}
