//! `PayoutStatement`: a read-only mirror of one statement line of the payout ledger, so
//! `kubectl get payoutstatements` shows what each owner is owed; the ledger stays the truth.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One owner's settlement for one period, as the operator signed it into the payout ledger.
// kube's printcolumn(...) expands to repeated attributes, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kommune.dev",
    version = "v1alpha1",
    kind = "PayoutStatement",
    status = "PayoutStatementStatus",
    shortname = "ps",
    category = "kommune",
    doc = "One owner's payout statement for one period: a read-only mirror of a signed statement line of the operator's payout ledger (`kommune-operator payout export` gives the statement with every receipt).",
    printcolumn(name = "Owner", type_ = "string", json_path = ".spec.owner"),
    printcolumn(name = "Period", type_ = "string", json_path = ".spec.period", description = "Start/end of the period (ISO 8601 interval)"),
    printcolumn(name = "Credits", type_ = "string", json_path = ".spec.payable", description = "Credits payable to the owner"),
    printcolumn(name = "Paid", type_ = "string", json_path = ".status.paid", description = "Whether a paid entry records the payment"),
    printcolumn(name = "Webhook", type_ = "string", json_path = ".status.webhook.state", priority = "1", description = "Delivered or Pending"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct PayoutStatementSpec {
    /// Who is paid: the owner named on the join token of its machines (or a machine's own name).
    pub owner: String,
    /// The period, `start/end` in RFC 3339.
    pub period: String,
    /// The statement's ledger entry (what `payout mark-paid` and `payout export --statement` take).
    pub statement_seq: u64,
    /// The ledger entries the statement covers: `fromSeq` to `uptoSeq` inclusive.
    pub from_seq: u64,
    pub upto_seq: u64,
    /// Hash (hex) of entry `uptoSeq`, signed into the statement.
    pub head_hash: String,
    /// Hash (hex) of the statement entry itself.
    pub entry_hash: String,
    /// sha256 of the operator key that signed the statement (pin it with `ledger verify --operator-key`).
    pub operator_key_sha256: String,
    /// Receipts in the period.
    pub receipts: u64,
    /// Credits of those receipts, reversed receipts' credits, and what is payable (credits minus
    /// reversals) or owed back when reversals exceed the period's credits.
    pub credits: String,
    pub reversed: String,
    pub payable: String,
    pub owed: String,
    /// The owner's machines in the period.
    #[serde(default)]
    pub nodes: BTreeMap<String, PayoutStatementNode>,
}

/// One machine's part of a statement.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PayoutStatementNode {
    pub receipts: u64,
    pub credits: String,
    #[serde(default)]
    pub reversed_receipts: u64,
    #[serde(default)]
    pub reversed: String,
}

/// Whether the statement was paid and whether the payout webhook has it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PayoutStatementStatus {
    /// "Yes" once a paid entry records the payment, else "No".
    pub paid: String,
    /// The paid entry and the payment rail's reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_reference: Option<String>,
    /// Why the `kommune.dev/paid-reference` annotation was not recorded (e.g. a reference
    /// that is empty or too long); cleared once a paid entry is appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_refused: Option<String>,
    /// Delivery to the payout webhook (absent when none is configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookDelivery>,
}

/// Delivery of a statement to the payout webhook: kept here, so a restarted operator goes on
/// retrying where it stopped, and never sends a delivered statement again.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDelivery {
    /// Pending (not yet acknowledged with a 2xx) or Delivered.
    pub state: String,
    /// POSTs made so far.
    pub attempts: u32,
    /// When the last POST was made, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<String>,
    /// Why the last POST did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
