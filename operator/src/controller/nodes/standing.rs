//! A provider's standing in its ProviderNode: the figures, the `Quarantined` condition and the
//! Event a quarantine (or its lifting) deserves. Pure functions of the fleet's view and time.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::status::NodeReason;
use crate::crd::{NodeStanding as StandingStatus, ProviderNode, ProviderNodeStatus, condition, set_condition};
use crate::fleet::{NodeStanding, Quarantine};
use crate::job::status::Severity;

/// The condition type; absent on a node that was never quarantined.
pub const QUARANTINED: &str = "Quarantined";

/// A decayed count with at most two decimals: "12.25", "3", "0".
fn count(x: f64) -> String {
    let s = format!("{:.2}", x.max(0.0));
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// "168h", "90m", "45s".
fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// `status` with the node's reputation, its figures and its `Quarantined` condition. A node
/// nothing has been observed of yet keeps its status as it is (a brand-new node's status has
/// no standing, and writing an empty one would be a status write for every node on every sweep).
pub fn with_standing(mut status: ProviderNodeStatus, standing: &NodeStanding, half_life: Duration) -> ProviderNodeStatus {
    let c = &standing.counts;
    let was_quarantined = status.conditions.iter().any(|c| c.type_ == QUARANTINED);
    if status.standing.is_none() && *c == Default::default() && standing.quarantine.is_none() && !was_quarantined {
        return status;
    }
    status.reputation = Some(standing.reputation.to_string());
    status.standing = Some(StandingStatus {
        honesty: c.honesty().to_string(),
        reliability: c.reliability().to_string(),
        half_life: duration(half_life),
        agreed: count(c.agreed),
        outvoted: count(c.outvoted),
        unverified: count(c.unverified),
        completed: count(c.completed),
        lost: count(c.lost),
        timed_out: count(c.timed_out),
        preempted: count(c.preempted),
    });
    let was = status.conditions.iter().any(|c| c.type_ == QUARANTINED);
    match &standing.quarantine {
        Some(q) => {
            let message = format!("{}; no task is placed here until an admin sets spec.quarantineLiftedAt", q.why);
            let mut cond = condition(QUARANTINED, true, NodeReason::Quarantined.as_str(), message, None);
            cond.last_transition_time = Time(Timestamp::from_millisecond(q.since_ms).unwrap_or_else(|_| Timestamp::now()));
            set_condition(&mut status.conditions, cond);
        }
        None if was => {
            let cond = condition(QUARANTINED, false, NodeReason::QuarantineLifted.as_str(), "lifted by an admin (spec.quarantineLiftedAt)", None);
            set_condition(&mut status.conditions, cond);
        }
        None => {}
    }
    status
}

/// The Event a change of the `Quarantined` condition deserves.
pub fn quarantine_transition(prev: &ProviderNodeStatus, next: &ProviderNodeStatus) -> Option<(Severity, NodeReason, String)> {
    let state = |s: &ProviderNodeStatus| s.conditions.iter().find(|c| c.type_ == QUARANTINED).map(|c| (c.status == "True", c.message.clone()));
    match (state(prev), state(next)) {
        (Some((true, _)), Some((true, _))) | (None | Some((false, _)), None | Some((false, _))) => None,
        (_, Some((true, message))) => Some((Severity::Warning, NodeReason::Quarantined, message)),
        (_, _) => Some((Severity::Normal, NodeReason::QuarantineLifted, "quarantine lifted by an admin: tasks are placed here again".into())),
    }
}

/// The quarantine a ProviderNode records, to restore after a restart or a takeover.
pub fn recorded_quarantine(n: &ProviderNode) -> Option<Quarantine> {
    let c = n.status.as_ref()?.conditions.iter().find(|c| c.type_ == QUARANTINED && c.status == "True")?;
    Some(Quarantine { since_ms: c.last_transition_time.0.as_millisecond(), why: c.message.clone() })
}

/// The admin's lift time, Unix ms.
pub fn lifted_at(n: &ProviderNode) -> Option<i64> {
    n.spec.quarantine_lifted_at.as_ref().map(|t| t.0.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kommune_core::reputation::Counts;

    fn standing(quarantine: Option<Quarantine>) -> NodeStanding {
        let counts = Counts { agreed: 7.0, outvoted: 3.0, completed: 10.25, lost: 1.0, ..Default::default() };
        NodeStanding { counts, reputation: counts.reputation(), quarantine }
    }

    #[test]
    fn the_figures_are_shown_decayed_with_their_parts() {
        let s = with_standing(ProviderNodeStatus::default(), &standing(None), Duration::from_secs(7 * 24 * 3600));
        let f = s.standing.unwrap();
        assert_eq!((f.honesty.as_str(), f.reliability.as_str(), f.half_life.as_str()), ("0.21", "0.849", "168h"));
        assert_eq!((f.agreed.as_str(), f.outvoted.as_str(), f.completed.as_str(), f.unverified.as_str()), ("7", "3", "10.25", "0"));
        assert_eq!(s.reputation.as_deref(), Some("0.178"));
        assert!(s.conditions.is_empty(), "a node never quarantined has no Quarantined condition");
    }

    #[test]
    fn a_quarantine_sets_a_condition_and_an_event_and_its_lifting_too() {
        let q = Quarantine { since_ms: 1_700_000_000_000, why: "3.0 of 10.0 compared results outvoted".into() };
        let before = ProviderNodeStatus::default();
        let quarantined = with_standing(before.clone(), &standing(Some(q.clone())), Duration::from_secs(3600));
        let c = quarantined.conditions.iter().find(|c| c.type_ == QUARANTINED).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Quarantined"));
        assert!(c.message.starts_with("3.0 of 10.0 compared results outvoted; no task is placed here"), "{}", c.message);
        let (severity, reason, note) = quarantine_transition(&before, &quarantined).unwrap();
        assert_eq!((severity, reason), (Severity::Warning, NodeReason::Quarantined));
        assert!(note.contains("3.0 of 10.0"));
        assert_eq!(quarantine_transition(&quarantined, &quarantined), None, "no Event while it stays");
        let node = ProviderNode { status: Some(quarantined.clone()), ..ProviderNode::new("n", Default::default()) };
        assert_eq!(recorded_quarantine(&node).map(|r| r.since_ms), Some(q.since_ms), "restored with its start");

        let lifted = with_standing(quarantined.clone(), &standing(None), Duration::from_secs(3600));
        let c = lifted.conditions.iter().find(|c| c.type_ == QUARANTINED).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "QuarantineLifted"));
        assert_eq!(quarantine_transition(&quarantined, &lifted).map(|(s, r, _)| (s, r)), Some((Severity::Normal, NodeReason::QuarantineLifted)));
        let node = ProviderNode { status: Some(lifted), ..ProviderNode::new("n", Default::default()) };
        assert_eq!(recorded_quarantine(&node), None);
    }
}
