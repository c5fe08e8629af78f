//! A ProviderNode's earnings as status shows them: pending / settled / paid apart (from the
//! ledger's payout book), the head backing them, and the operator key to pin.

use tracing::warn;

use crate::crd::NodeEarnings;
use crate::ledger::{Ledger, NodeEarnings as LedgerEarnings, entry::fingerprint};
use kommune_ledger::book;

/// The status figures for `e` (one node's ledger earnings). When the payout book cannot be
/// read, the split is left out (logged) and the running total stays under `pending`.
pub(super) async fn status(ledger: &Ledger, e: LedgerEarnings, rejected: u64) -> NodeEarnings {
    let mut out = NodeEarnings {
        pending: e.pending.to_string(),
        receipts: e.receipts,
        rejected,
        ledger_seq: e.head.map_or(0, |h| h.seq),
        ledger_head: e.head.map(|h| hex::encode(h.hash)).unwrap_or_default(),
        operator_key_sha256: fingerprint(&ledger.operator_key()),
        ..Default::default()
    };
    match ledger.node_payouts(&e.node, e.pending).await {
        Ok(p) => {
            out.pending = book::credits(p.split.pending);
            out.settled = book::credits(p.split.settled);
            out.paid = book::credits(p.split.paid);
            out.reversed = book::credits(p.split.reversed);
        }
        Err(err) => warn!(node = %e.node, error = %err, "cannot read the node's statements from the ledger; status shows its unsettled total as pending"),
    }
    out
}
