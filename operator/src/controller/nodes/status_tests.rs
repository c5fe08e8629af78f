use super::*;
use crate::crd::{ProviderNodeSpec, is_true};
use crate::scheduler::Resources;

fn facts() -> NodeFacts {
    NodeFacts {
        capacity: Resources { cpu_millis: 4000, memory_bytes: 8 << 30, ephemeral_bytes: 0 },
        gpus: vec![],
        runtimes: vec!["wasm".into()],
        arch: "x86_64".into(),
        os: "linux".into(),
        region: "eu-west".into(),
        zone: String::new(),
        agent_version: "0.1.0".into(),
    }
}

#[test]
fn lifecycle_join_connect_heartbeat_disconnect() {
    let now = Timestamp::now();
    let joined = apply_event(
        &ProviderNodeStatus::default(),
        &NodeEvent::Joined { node: "n".into(), facts: facts(), public_key_sha256: "k".into(), grant: Default::default() },
        0,
        (0, 0),
        now,
    );
    assert_eq!(joined.phase, Some(NodePhase::NotReady));
    assert_eq!(joined.capacity.as_ref().unwrap().cpu, "4");
    assert_eq!(joined.capacity.as_ref().unwrap().memory, "8Gi");
    assert_eq!(joined.region.as_deref(), Some("eu-west"));
    assert_eq!(joined.zone, None);

    let ready = apply_event(&joined, &NodeEvent::Connected { node: "n".into(), facts: facts() }, 2, (500, 1 << 30), now);
    assert_eq!(ready.phase, Some(NodePhase::Ready));
    assert!(is_true(&ready.conditions, "Ready"));
    assert_eq!(ready.running_attempts, 2);
    assert_eq!(ready.allocated.as_ref().unwrap().cpu, "500m");

    let hb = apply_event(&ready, &NodeEvent::Heartbeat { node: "n".into() }, 2, (500, 1 << 30), now);
    assert_eq!(hb.conditions, ready.conditions);

    let gone = apply_event(&hb, &NodeEvent::Disconnected { node: "n".into(), reason: "no message for 15s".into() }, 2, (500, 1 << 30), now);
    assert_eq!(gone.phase, Some(NodePhase::NotReady));
    let c = gone.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str(), c.message.as_str()), ("False", "SessionClosed", "no message for 15s"));
}

#[test]
fn a_cordoned_connected_node_is_draining() {
    assert_eq!(connected_phase(true), NodePhase::Draining);
    assert_eq!(connected_phase(false), NodePhase::Ready);
}

#[test]
fn a_cordon_or_a_drain_keeps_new_tasks_away() {
    let node = |unschedulable: bool, drain: bool| {
        let spec = ProviderNodeSpec { unschedulable, drain, ..Default::default() };
        admin_of(&ProviderNode::new("n", spec)).cordoned
    };
    assert_eq!([node(false, false), node(true, false), node(false, true), node(true, true)], [false, true, true, true]);
}

#[test]
fn an_absent_node_is_not_ready_then_offline_after_the_grace() {
    let grace = Duration::from_secs(30);
    assert_eq!(absent_phase(Duration::from_secs(5), grace), NodePhase::NotReady);
    assert_eq!(absent_phase(Duration::from_secs(30), grace), NodePhase::NotReady);
    assert_eq!(absent_phase(Duration::from_secs(31), grace), NodePhase::Offline);
}

#[test]
fn rejoining_a_ready_node_keeps_it_ready() {
    let now = Timestamp::now();
    let ready = apply_event(&ProviderNodeStatus::default(), &NodeEvent::Connected { node: "n".into(), facts: facts() }, 0, (0, 0), now);
    let rejoined =
        apply_event(&ready, &NodeEvent::Joined { node: "n".into(), facts: facts(), public_key_sha256: "k".into(), grant: Default::default() }, 0, (0, 0), now);
    assert_eq!(rejoined.phase, Some(NodePhase::Ready));
}

#[test]
fn reasons_are_the_strings_conditions_and_events_carry() {
    let all = [
        (NodeReason::Joined, "Joined"),
        (NodeReason::SessionOpen, "SessionOpen"),
        (NodeReason::SessionClosed, "SessionClosed"),
        (NodeReason::Left, "Left"),
        (NodeReason::NoSession, "NoSession"),
        (NodeReason::Offline, "Offline"),
        (NodeReason::Cordoned, "Cordoned"),
        (NodeReason::Uncordoned, "Uncordoned"),
        (NodeReason::Drained, "Drained"),
        (NodeReason::Revoked, "Revoked"),
    ];
    for (reason, s) in all {
        assert_eq!((reason.as_str(), reason.to_string()), (s, s.to_string()));
    }
}

// ---------------------------------------------------------------------------------------------
// desired_status, table-driven

/// A node's status as a row of the table writes it: phase and `Ready` (status, reason).
type Shape = (Option<NodePhase>, Option<(&'static str, &'static str)>);

fn node(cordoned: bool, phase: Option<NodePhase>, ready: Option<(bool, NodeReason)>) -> ProviderNode {
    let mut n = ProviderNode::new("n", ProviderNodeSpec { unschedulable: cordoned, ..Default::default() });
    let mut s = ProviderNodeStatus { phase, ..Default::default() };
    if let Some((up, reason)) = ready {
        set_ready(&mut s, up, reason, "earlier", Timestamp::UNIX_EPOCH);
    }
    n.status = Some(s);
    n
}

fn shape(s: &ProviderNodeStatus) -> (Option<NodePhase>, Option<(String, String)>) {
    (s.phase, s.conditions.iter().find(|c| c.type_ == "Ready").map(|c| (c.status.clone(), c.reason.clone())))
}

fn owned(want: Shape) -> (Option<NodePhase>, Option<(String, String)>) {
    (want.0, want.1.map(|(s, r)| (s.to_string(), r.to_string())))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
const GRACE: Duration = Duration::from_secs(30);

fn sweep(absent: Option<Duration>) -> Change<'static> {
    Change::Sweep { absent, grace: GRACE, earnings: None }
}

#[test]
fn desired_status_follows_sessions_cordons_and_the_grace() {
    use NodePhase::*;
    use NodeReason as R;
    let connected = NodeEvent::Connected { node: "n".into(), facts: facts() };
    let joined = NodeEvent::Joined { node: "n".into(), facts: facts(), public_key_sha256: "k".into(), grant: Default::default() };
    let closed = NodeEvent::Disconnected { node: "n".into(), reason: "bye".into() };
    let heartbeat = NodeEvent::Heartbeat { node: "n".into() };
    let event = |e: &'static NodeEvent| Change::Event { event: e, running: 0, allocated: (0, 0) };
    let leaked = |e: NodeEvent| -> &'static NodeEvent { Box::leak(Box::new(e)) };
    let (connected, joined, closed, heartbeat) = (leaked(connected), leaked(joined), leaked(closed), leaked(heartbeat));

    #[rustfmt::skip]
    let table: Vec<(&str, ProviderNode, Change<'static>, Shape)> = vec![
        ("a new node joins NotReady",
            node(false, None, None), event(joined), (Some(NotReady), Some(("False", "Joined")))),
        ("a connecting node is Ready",
            node(false, Some(NotReady), Some((false, R::Joined))), event(connected), (Some(Ready), Some(("True", "SessionOpen")))),
        ("a cordoned node that connects drains at once",
            node(true, Some(NotReady), Some((false, R::SessionClosed))), event(connected), (Some(Draining), Some(("True", "SessionOpen")))),
        ("a heartbeat changes no phase",
            node(false, Some(Ready), Some((true, R::SessionOpen))), event(heartbeat), (Some(Ready), Some(("True", "SessionOpen")))),
        ("a closed session is NotReady",
            node(false, Some(Ready), Some((true, R::SessionOpen))), event(closed), (Some(NotReady), Some(("False", "SessionClosed")))),
        ("a connected Ready node that is cordoned drains",
            node(true, Some(Ready), Some((true, R::SessionOpen))), sweep(None), (Some(Draining), Some(("True", "SessionOpen")))),
        ("an uncordoned draining node is Ready again",
            node(false, Some(Draining), Some((true, R::SessionOpen))), sweep(None), (Some(Ready), Some(("True", "SessionOpen")))),
        ("a connected NotReady node waits for its Connected event",
            node(true, Some(NotReady), Some((false, R::Joined))), sweep(None), (Some(NotReady), Some(("False", "Joined")))),
        ("a Ready node without a session here is NotReady",
            node(false, Some(Ready), Some((true, R::SessionOpen))), sweep(Some(secs(5))), (Some(NotReady), Some(("False", "NoSession")))),
        ("a Draining node without a session here is NotReady",
            node(true, Some(Draining), Some((true, R::SessionOpen))), sweep(Some(secs(5))), (Some(NotReady), Some(("False", "NoSession")))),
        ("a NotReady node within the grace stays as it is",
            node(false, Some(NotReady), Some((false, R::SessionClosed))), sweep(Some(GRACE)), (Some(NotReady), Some(("False", "SessionClosed")))),
        ("a NotReady node past the grace is Offline",
            node(false, Some(NotReady), Some((false, R::SessionClosed))), sweep(Some(secs(31))), (Some(Offline), Some(("False", "Offline")))),
        ("a Ready node long gone is Offline at once",
            node(false, Some(Ready), Some((true, R::SessionOpen))), sweep(Some(secs(300))), (Some(Offline), Some(("False", "Offline")))),
        ("an Offline node stays Offline",
            node(false, Some(Offline), Some((false, R::Offline))), sweep(Some(secs(300))), (Some(Offline), Some(("False", "Offline")))),
        ("a node without a phase is left to its events",
            node(false, None, None), sweep(Some(secs(300))), (None, None)),
    ];
    for (case, n, change, want) in table {
        let got = desired_status(&n, &change, Timestamp::now());
        assert_eq!(shape(&got), owned(want), "{case}");
    }
}

#[test]
fn a_sweep_that_changes_nothing_desires_the_status_as_it_is() {
    // The writer sends nothing when the desired status equals the current one; these must be equal.
    for n in [
        node(false, Some(NodePhase::Ready), Some((true, NodeReason::SessionOpen))),
        node(true, Some(NodePhase::Draining), Some((true, NodeReason::SessionOpen))),
        node(false, Some(NodePhase::NotReady), Some((false, NodeReason::NoSession))),
    ] {
        let absent = (n.status.as_ref().unwrap().phase == Some(NodePhase::NotReady)).then_some(secs(1));
        assert_eq!(Some(desired_status(&n, &sweep(absent), Timestamp::now())), n.status, "{:?}", n.status);
    }
}

#[test]
fn desired_status_takes_the_ledgers_earnings_and_keeps_them_when_unreadable() {
    let earned = NodeEarnings { pending: "1.5".into(), receipts: 3, ..Default::default() };
    let n = node(false, Some(NodePhase::Ready), Some((true, NodeReason::SessionOpen)));
    let with = desired_status(&n, &Change::Sweep { absent: None, grace: GRACE, earnings: Some(earned.clone()) }, Timestamp::now());
    assert_eq!(with.earnings.as_ref(), Some(&earned));
    let mut n = n;
    n.status = Some(with.clone());
    assert_eq!(desired_status(&n, &sweep(None), Timestamp::now()), with);
}

#[test]
fn an_event_records_attempts_and_allocation() {
    // The reputation is written with the rest of the standing (`standing::with_standing`).
    let n = node(false, Some(NodePhase::Ready), Some((true, NodeReason::SessionOpen)));
    let hb = NodeEvent::Heartbeat { node: "n".into() };
    let now = Timestamp::now();
    let s = desired_status(&n, &Change::Event { event: &hb, running: 2, allocated: (1500, 2 << 30) }, now);
    assert_eq!(s.running_attempts, 2);
    assert_eq!(s.allocated, Some(NodeAllocation { cpu: "1500m".into(), memory: "2Gi".into() }));
    assert_eq!(s.last_heartbeat_time, Some(Time(now)));
}

#[test]
fn a_condition_keeps_its_transition_time_while_its_status_holds() {
    let n = node(false, Some(NodePhase::Ready), Some((true, NodeReason::SessionOpen)));
    let connected = NodeEvent::Connected { node: "n".into(), facts: facts() };
    let s = desired_status(&n, &Change::Event { event: &connected, running: 0, allocated: (0, 0) }, Timestamp::now());
    assert_eq!(s.conditions[0].last_transition_time, Time(Timestamp::UNIX_EPOCH));
}

// ---------------------------------------------------------------------------------------------
// transition: one Event per phase change

fn status_of(n: &ProviderNode) -> ProviderNodeStatus {
    n.status.clone().unwrap_or_default()
}

/// The Event a row expects: its type and reason.
type Told = (Severity, NodeReason);

#[test]
fn each_phase_change_is_one_event_with_its_reason() {
    use NodePhase::*;
    let (w, n) = (Severity::Warning, Severity::Normal);
    #[rustfmt::skip]
    let table: Vec<(&str, ProviderNode, ProviderNode, Option<Told>)> = vec![
        ("join", node(false, None, None), node(false, Some(NotReady), Some((false, NodeReason::Joined))), Some((n, NodeReason::Joined))),
        ("connect", node(false, Some(NotReady), Some((false, NodeReason::Joined))), node(false, Some(Ready), Some((true, NodeReason::SessionOpen))), Some((n, NodeReason::SessionOpen))),
        ("disconnect", node(false, Some(Ready), Some((true, NodeReason::SessionOpen))), node(false, Some(NotReady), Some((false, NodeReason::SessionClosed))), Some((w, NodeReason::SessionClosed))),
        ("no session", node(false, Some(Ready), Some((true, NodeReason::SessionOpen))), node(false, Some(NotReady), Some((false, NodeReason::NoSession))), Some((w, NodeReason::NoSession))),
        ("offline", node(false, Some(NotReady), Some((false, NodeReason::SessionClosed))), node(false, Some(Offline), Some((false, NodeReason::Offline))), Some((w, NodeReason::Offline))),
        ("cordon", node(false, Some(Ready), Some((true, NodeReason::SessionOpen))), node(true, Some(Draining), Some((true, NodeReason::SessionOpen))), Some((n, NodeReason::Cordoned))),
        ("uncordon", node(true, Some(Draining), Some((true, NodeReason::SessionOpen))), node(false, Some(Ready), Some((true, NodeReason::SessionOpen))), Some((n, NodeReason::Uncordoned))),
        ("cordoned reconnect", node(true, Some(NotReady), Some((false, NodeReason::SessionClosed))), node(true, Some(Draining), Some((true, NodeReason::SessionOpen))), Some((n, NodeReason::SessionOpen))),
        ("a phase its unchanged condition explains", node(false, Some(NotReady), Some((true, NodeReason::SessionOpen))), node(false, Some(Ready), Some((true, NodeReason::SessionOpen))), Some((n, NodeReason::SessionOpen))),
        ("heartbeat", node(false, Some(Ready), Some((true, NodeReason::SessionOpen))), node(false, Some(Ready), Some((true, NodeReason::SessionOpen))), None),
        ("a new reason in the same phase", node(false, Some(NotReady), Some((false, NodeReason::Joined))), node(false, Some(NotReady), Some((false, NodeReason::SessionClosed))), None),
    ];
    for (case, prev, next, want) in table {
        let got = transition(&status_of(&prev), &status_of(&next));
        assert_eq!(got.as_ref().map(|(s, r, _)| (*s, *r)), want, "{case}");
        if let Some((_, _, note)) = got {
            assert!(!note.is_empty(), "{case}");
        }
    }
}

#[test]
fn a_heartbeat_is_written_only_when_none_is_shown_or_the_shown_one_is_a_refresh_old() {
    let refresh = Duration::from_secs(300);
    let now = Timestamp::from_second(1_000_000).unwrap();
    let at = |secs_ago: i64| ProviderNodeStatus {
        last_heartbeat_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::from_second(1_000_000 - secs_ago).unwrap())),
        ..Default::default()
    };
    assert!(heartbeat_due(None, now, refresh));
    assert!(heartbeat_due(Some(&ProviderNodeStatus::default()), now, refresh));
    assert!(!heartbeat_due(Some(&at(0)), now, refresh));
    assert!(!heartbeat_due(Some(&at(299)), now, refresh));
    assert!(heartbeat_due(Some(&at(300)), now, refresh));
    // A time in the future (a skewed clock of an earlier leader) is not due.
    assert!(!heartbeat_due(Some(&at(-60)), now, refresh));
}
