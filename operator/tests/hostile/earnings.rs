//! What a provider is told of its receipts after they are acknowledged (issues 16 and 18): a
//! reversal with its reason, the statement that settles them and its paid mark, and the totals
//! by state, over a real session; the agent's own assembly takes the pages as the agent does.

use std::time::Duration;

use kommune_agent::account::{Assembly, EarningsAccount, Payout};
use kommune_operator::dispatch::ModuleRef;
use kommune_operator::ledger::ReceiptKey;
use kommune_proto::v1::operator_message::Kind;
use kommune_proto::v1::{AttemptState, EarningsPage};

use crate::agent::{HostileAgent, claims};
use crate::harness::{Operator, hello_module, job, operator_with, policy};
use crate::{PRICED, plausible};

/// The next whole account the operator sends, as the agent assembles it.
async fn account(agent: &mut HostileAgent, wanted: impl Fn(&EarningsAccount) -> bool) -> EarningsAccount {
    let mut assembly = Assembly::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(Kind::Earnings(page)) = agent.recv(left, |k| matches!(k, Kind::Earnings(_))).await else {
            panic!("{} was not told of the change in time", agent.name)
        };
        check_page(&page);
        if let Some(a) = assembly.push(page, 0).expect("the operator's pages assemble")
            && wanted(&a)
        {
            return a;
        }
    }
}

fn check_page(p: &EarningsPage) {
    assert!(p.statements.len() + p.reversals.len() <= 250 && p.page < p.page_count, "{p:?}");
}

async fn two_accepted_receipts(op: &Operator, agent: &mut HostileAgent, uid: &str) -> (u64, u64, u64) {
    let module = ModuleRef { sha256: op.store_module(uid, &hello_module()), url: None };
    let wasm = policy("workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\ntasks: 2\nresources: {cpu: 250m, memory: 64Mi}\n");
    assert_eq!(op.dispatcher.sync(&job(uid), &wasm, Some(&module)).await.unwrap().placed, 2);
    let (a, b) = (agent.assigned().await, agent.assigned().await);
    agent.say_running(&a.attempt_id).await;
    agent.say_running(&b.attempt_id).await;
    let ack_a = agent.report(&a, AttemptState::Succeeded, plausible(50, 250)).await;
    let ack_b = agent.report(&b, AttemptState::Succeeded, plausible(50, 250)).await;
    assert!(ack_a.receipt_rejected.is_empty() && ack_b.receipt_rejected.is_empty() && ack_a.ledger_seq > 0 && ack_b.ledger_seq > 0);
    (ack_a.ledger_seq, ack_b.ledger_seq, ack_b.cost_micros)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_is_told_of_its_reversed_settled_and_paid_receipts_and_its_totals_by_state() {
    let op = operator_with(PRICED).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = HostileAgent::join(&op, dir.path(), "earner", claims(2000, 2 << 30, "")).await.unwrap();
    agent.connect(&op).await;
    let opened = account(&mut agent, |_| true).await;
    assert!(opened.statements.is_empty() && opened.reversals.is_empty(), "nothing to tell yet: {opened:?}");

    let (outvoted, kept, kept_cost) = two_accepted_receipts(&op, &mut agent, "earned").await;
    let ledger = op.dispatcher.ledger().unwrap().clone();

    // A reversal: the agent hears which receipt and why.
    ledger.reverse(ReceiptKey::Seq(outvoted), "outvoted by 2 of 3 replicas").await.unwrap();
    let a = account(&mut agent, |a| !a.reversals.is_empty()).await;
    assert!(matches!(a.payout_of(outvoted), Payout::Reversed(r) if r.reason == "outvoted by 2 of 3 replicas"), "{a:?}");
    assert!(matches!(a.payout_of(kept), Payout::Pending | Payout::Newer), "{a:?}");

    // A close: the statement that settles both, net of the reversal, and the totals move.
    let closed = ledger.close_period().await.unwrap();
    let statement = closed.iter().find(|c| c.statement.nodes.contains_key("earner")).expect("the earner's owner has a statement").seq;
    let a = account(&mut agent, |a| !a.statements.is_empty()).await;
    assert!(matches!(a.payout_of(kept), Payout::Settled(s) if s.seq == statement && s.receipts == 2 && s.reversed_receipts == 1), "{a:?}");
    assert!(matches!(a.payout_of(outvoted), Payout::Reversed(_)), "a reversed receipt stays reversed inside its statement");
    assert_eq!((a.totals.pending_micros, a.totals.settled_micros, a.totals.paid_micros), (0, kept_cost as i64, 0), "{a:?}");

    // Paid: the reference reaches the agent.
    ledger.mark_paid(statement, "bank-42").await.unwrap();
    let a = account(&mut agent, |a| a.statements.iter().any(|s| s.paid_seq != 0)).await;
    assert!(matches!(a.payout_of(kept), Payout::Paid(s) if s.paid_reference == "bank-42"), "{a:?}");
    assert_eq!((a.totals.settled_micros, a.totals.paid_micros), (0, kept_cost as i64), "{a:?}");

    // A close that does not include this node does not resend its unchanged account.
    let mut other = HostileAgent::join(&op, dir.path(), "other-earner", claims(2000, 2 << 30, "")).await.unwrap();
    other.connect(&op).await;
    crate::cordon(&op, "earner");
    let _ = two_accepted_receipts(&op, &mut other, "earned-by-other").await;
    ledger.close_period().await.unwrap();
    assert!(agent.recv(Duration::from_millis(800), |k| matches!(k, Kind::Earnings(_))).await.is_none(), "nothing changed for this node");

    // A new session is told the whole account at once.
    agent.connect(&op).await;
    let reopened = account(&mut agent, |_| true).await;
    assert_eq!((reopened.statements, reopened.reversals, reopened.totals), (a.statements, a.reversals, a.totals));
}
