//! Mirrors the ledger's statements as PayoutStatement objects: created when a statement is
//! closed, re-created if deleted, status following paid entries and webhook deliveries.

use std::collections::HashMap;

use k8s_openapi::jiff::Timestamp;
use kommune_core::pricing::Micros;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::webhook::{self, PENDING, WebhookBody};
use crate::controller::MANAGER;
use crate::crd::{PayoutStatement, PayoutStatementNode, PayoutStatementSpec, PayoutStatementStatus, WebhookDelivery};
use crate::ledger::Ledger;
use crate::ledger::entry::fingerprint;
use kommune_ledger::book::BookStatement;

/// The annotation an admin sets on a PayoutStatement to record its payment while the operator
/// runs (`kubectl annotate payoutstatement statement-N kommune.dev/paid-reference=REF`): the
/// operator appends the paid entry, as `kommune-operator payout mark-paid` does when it is stopped.
pub const PAID_REFERENCE: &str = "kommune.dev/paid-reference";

/// The object name of statement `seq`: stable, and unique because seqs are.
pub fn name_of(seq: u64) -> String {
    format!("statement-{seq}")
}

fn time(ms: i64) -> String {
    Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_default()
}

/// The spec a statement line gives.
pub fn spec_of(s: &BookStatement) -> PayoutStatementSpec {
    let st = &s.statement;
    let key = hex::decode(&s.line.public_key).unwrap_or_default();
    PayoutStatementSpec {
        owner: st.owner.clone(),
        period: format!("{}/{}", time(st.period_start_ms), time(st.period_end_ms)),
        statement_seq: s.line.seq,
        from_seq: st.from_seq,
        upto_seq: st.upto_seq,
        head_hash: st.head_hash.clone(),
        entry_hash: s.line.hash.clone(),
        operator_key_sha256: if key.is_empty() { String::new() } else { fingerprint(&key) },
        receipts: st.receipts,
        credits: Micros(st.credits_micros).to_string(),
        reversed: Micros(st.reversed_micros).to_string(),
        payable: Micros(st.payable_micros).to_string(),
        owed: Micros(st.owed_micros).to_string(),
        nodes: st
            .nodes
            .iter()
            .map(|(n, l)| {
                let line = PayoutStatementNode {
                    receipts: l.receipts,
                    credits: Micros(l.credits_micros).to_string(),
                    reversed_receipts: l.reversed_receipts,
                    reversed: Micros(l.reversed_micros).to_string(),
                };
                (n.clone(), line)
            })
            .collect(),
    }
}

/// The status a statement should show, keeping the webhook delivery `current` records (a new
/// object starts Pending when a webhook is configured).
pub fn status_of(s: &BookStatement, current: Option<&PayoutStatementStatus>, webhook: bool) -> PayoutStatementStatus {
    let delivery = current.and_then(|c| c.webhook.clone()).or_else(|| webhook.then(|| WebhookDelivery { state: PENDING.into(), ..Default::default() }));
    PayoutStatementStatus {
        paid: if s.paid.is_some() { "Yes" } else { "No" }.into(),
        paid_seq: s.paid.as_ref().map(|p| p.seq),
        paid_reference: s.paid.as_ref().map(|p| p.reference.clone()),
        paid_refused: None,
        webhook: if webhook { delivery } else { None },
    }
}

/// The payment reference an admin annotated on a statement's object that the ledger does not
/// record yet (None once the statement is paid: the paid entry is never written twice).
pub fn reference_to_record<'a>(s: &BookStatement, object: Option<&'a PayoutStatement>) -> Option<&'a str> {
    if s.paid.is_some() {
        return None;
    }
    object?.annotations().get(PAID_REFERENCE).map(|r| r.trim())
}

/// What recording the annotated payments did.
#[derive(Default)]
struct Annotated {
    /// A paid entry was appended: the statements read before are out of date.
    recorded: bool,
    /// Why a reference was refused, by statement seq.
    refused: HashMap<u64, String>,
}

/// Appends the paid entries annotated on the objects.
async fn record_annotated_payments(ledger: &Ledger, statements: &[BookStatement], existing: &HashMap<String, PayoutStatement>) -> Annotated {
    let mut out = Annotated::default();
    for s in statements {
        let Some(reference) = reference_to_record(s, existing.get(&name_of(s.line.seq))) else { continue };
        match ledger.mark_paid(s.line.seq, reference).await {
            Ok(seq) => {
                info!(statement = s.line.seq, %reference, paid_seq = seq, "statement marked paid from its {PAID_REFERENCE} annotation");
                out.recorded = true;
            }
            Err(e) => {
                warn!(statement = s.line.seq, error = %e, "the {PAID_REFERENCE} annotation was not recorded");
                out.refused.insert(s.line.seq, e.to_string());
            }
        }
    }
    out
}

/// One pass: every statement of the ledger exists as an object with the right spec and status,
/// and every due webhook delivery is attempted once.
pub async fn sync(api: &Api<PayoutStatement>, ledger: &Ledger, webhook_url: Option<&str>) -> Result<(), String> {
    let statements = ledger.statements().await.map_err(|e| format!("cannot read the statements from the ledger: {e}"))?;
    if statements.is_empty() {
        return Ok(());
    }
    let existing: HashMap<String, PayoutStatement> = api
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("cannot list PayoutStatements: {e}"))?
        .items
        .into_iter()
        .map(|o| (o.name_any(), o))
        .collect();
    let Annotated { recorded, refused } = record_annotated_payments(ledger, &statements, &existing).await;
    // Read again when a payment was recorded, so this pass shows it.
    let statements = if recorded { ledger.statements().await.map_err(|e| format!("cannot read the statements from the ledger: {e}"))? } else { statements };
    let params = PatchParams::apply(MANAGER).force();
    for s in &statements {
        let name = name_of(s.line.seq);
        let have = existing.get(&name);
        let spec = spec_of(s);
        if have.is_none_or(|o| o.spec != spec) {
            let obj = json!({
                "apiVersion": PayoutStatement::api_version(&()),
                "kind": PayoutStatement::kind(&()),
                "metadata": { "name": name, "labels": { "kommune.dev/owner-hash": &fingerprint(spec.owner.as_bytes())[..16] } },
                "spec": spec,
            });
            api.patch(&name, &params, &Patch::Apply(&obj)).await.map_err(|e| format!("cannot write PayoutStatement {name}: {e}"))?;
            if have.is_none() {
                info!(%name, owner = %spec.owner, payable = %spec.payable, "PayoutStatement created from the ledger");
            }
        }
        let current = have.and_then(|o| o.status.as_ref());
        let mut status = status_of(s, current, webhook_url.is_some());
        status.paid_refused = refused.get(&s.line.seq).cloned();
        if let (Some(url), Some(d)) = (webhook_url, status.webhook.as_ref())
            && webhook::due(d, Timestamp::now())
        {
            let body =
                serde_json::to_vec(&WebhookBody { kind: "kommune.dev/PayoutStatement", statement_seq: s.line.seq, entry: &s.line, statement: &s.statement })
                    .map_err(|e| format!("cannot encode statement {}: {e}", s.line.seq))?;
            let result = webhook::post(url, body).await;
            if let Err(e) = &result {
                warn!(%name, attempts = d.attempts + 1, error = %e, "the payout webhook did not take the statement; retrying with backoff");
            } else {
                info!(%name, "payout webhook took the statement");
            }
            status.webhook = Some(webhook::after_attempt(d, Timestamp::now(), result));
        }
        if current != Some(&status) {
            let obj = json!({ "apiVersion": PayoutStatement::api_version(&()), "kind": PayoutStatement::kind(&()), "status": status });
            api.patch_status(&name, &params, &Patch::Apply(&obj)).await.map_err(|e| format!("cannot write the status of PayoutStatement {name}: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::export::ExportLine;
    use crate::ledger::statement_file::PaidMark;
    use kommune_ledger::payout::{NodeLine, Statement};

    fn statement(paid: bool) -> BookStatement {
        let st = Statement {
            owner: "alice".into(),
            period_start_ms: 0,
            period_end_ms: 3_600_000,
            from_seq: 1,
            upto_seq: 9,
            head_hash: "ab".repeat(32),
            receipts: 3,
            credits_micros: 1_500_000,
            reversed_micros: 500_000,
            payable_micros: 1_000_000,
            owed_micros: 0,
            receipts_sha256: String::new(),
            nodes: [(
                "pn-1".to_string(),
                NodeLine { receipts: 3, credits_micros: 1_500_000, reversed_receipts: 1, reversed_micros: 500_000, ..Default::default() },
            )]
            .into(),
            reversals: vec![],
        };
        let line = ExportLine { seq: 10, kind: "statement".into(), public_key: hex::encode([7u8; 32]), hash: "cd".repeat(32), ..Default::default() };
        BookStatement { line, statement: st, paid: paid.then(|| PaidMark { seq: 12, reference: "bank-1".into() }) }
    }

    #[test]
    fn a_statement_line_gives_the_object_and_paid_and_delivery_show_in_status() {
        let s = statement(false);
        let spec = spec_of(&s);
        assert_eq!(name_of(10), "statement-10");
        assert_eq!((spec.owner.as_str(), spec.payable.as_str(), spec.credits.as_str(), spec.owed.as_str()), ("alice", "1", "1.5", "0"));
        assert_eq!(spec.period, "1970-01-01T00:00:00Z/1970-01-01T01:00:00Z");
        assert_eq!(spec.operator_key_sha256, fingerprint(&[7u8; 32]));
        assert_eq!(spec.nodes["pn-1"].reversed, "0.5");
        let st = status_of(&s, None, true);
        assert_eq!((st.paid.as_str(), st.webhook.as_ref().map(|w| w.state.as_str())), ("No", Some(PENDING)));
        assert_eq!(status_of(&s, None, false).webhook, None, "no webhook, no delivery state");
        let delivered = PayoutStatementStatus { webhook: Some(WebhookDelivery { state: "Delivered".into(), attempts: 2, ..Default::default() }), ..st };
        let paid = status_of(&statement(true), Some(&delivered), true);
        assert_eq!((paid.paid.as_str(), paid.paid_seq, paid.paid_reference.as_deref()), ("Yes", Some(12), Some("bank-1")));
        assert_eq!(paid.webhook, delivered.webhook, "the delivery recorded on the object is kept");
    }

    #[test]
    fn an_annotated_reference_is_recorded_once_and_only_for_an_unpaid_statement() {
        let object = |annotation: Option<&str>| {
            let mut o = PayoutStatement::new("statement-10", spec_of(&statement(false)));
            if let Some(r) = annotation {
                o.annotations_mut().insert(PAID_REFERENCE.into(), r.into());
            }
            o
        };
        assert_eq!(reference_to_record(&statement(false), Some(&object(Some(" wire-42 ")))), Some("wire-42"));
        assert_eq!(reference_to_record(&statement(true), Some(&object(Some("wire-42")))), None, "paid once");
        assert_eq!(reference_to_record(&statement(false), Some(&object(None))), None);
        assert_eq!(reference_to_record(&statement(false), None), None);
        // An empty one is passed on: the ledger refuses it with its reason, shown in status.
        assert_eq!(reference_to_record(&statement(false), Some(&object(Some("  ")))), Some(""));
    }
}
