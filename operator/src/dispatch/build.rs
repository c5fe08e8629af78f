//! Building attempts from a placement decision: pure functions of plain data (no store, no
//! pool, no clock), so what a sync records is decided here and tested from tables.

use std::collections::HashMap;

use super::JobRef;
use crate::attempt::{Attempt, AttemptPhase, Held, replica_attempt_id};
use crate::scheduler::{Placement, Resources};

/// The attempt ids of each task's round, one per replica: copy 0 keeps the plain id, so jobs
/// without replicas (and the agents and ledgers that know their ids) see no change.
pub fn round_ids(job_uid: &str, slots: &[(u32, u32)], replicas: u32) -> Vec<Vec<String>> {
    slots.iter().map(|&(index, number)| (0..replicas).map(|k| replica_attempt_id(job_uid, index, number, k)).collect()).collect()
}

/// A placement decision as plain data: what each copy asks for, which rounds were offered to
/// the scheduler, and where it put those it placed.
#[derive(Debug, Clone, Copy)]
pub struct Rounds<'a> {
    pub job: &'a JobRef,
    /// The room every copy holds (the job's request).
    pub resources: Resources,
    /// (task index, attempt number) of each round offered, in the order of `ids`.
    pub slots: &'a [(u32, u32)],
    /// Each offered round's attempt ids, from [`round_ids`].
    pub ids: &'a [Vec<String>],
    /// The rounds the scheduler placed: `task` indexes `slots`, one node per replica.
    pub placed: &'a [Placement],
    /// The GPUs the pool holds for each placed copy, by attempt id; a copy not listed holds none.
    pub gpu_masks: &'a HashMap<&'a str, u64>,
    /// When the attempts are created (Unix ms).
    pub now_ms: i64,
}

/// The attempts to record for the placed rounds, in the scheduler's order, each copy Assigned
/// to its node and holding its resources, so a restarted operator can rebuild the reservation.
pub fn attempts(r: &Rounds) -> Vec<Attempt> {
    r.placed
        .iter()
        .flat_map(|pl| pl.nodes.iter().zip(&r.ids[pl.task]).enumerate().map(move |(k, (node, id))| (pl.task, k as u32, node, id)))
        .map(|(task, replica, node, id)| {
            let (index, number) = r.slots[task];
            Attempt {
                id: id.clone(),
                job_uid: r.job.uid.clone(),
                job_key: r.job.key.clone(),
                index,
                number,
                replica,
                node: node.clone(),
                phase: AttemptPhase::Assigned,
                cpu_millis: r.resources.cpu_millis,
                memory_bytes: r.resources.memory_bytes,
                held: Some(Held { ephemeral_bytes: r.resources.ephemeral_bytes, gpu_mask: r.gpu_masks.get(id.as_str()).copied().unwrap_or(0) }),
                created_ms: r.now_ms,
                finished_ms: None,
                result: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::attempt::AttemptResult;
    use crate::dispatch::fixtures::exec_policy;
    use crate::job::progress;

    const RESOURCES: Resources = Resources { cpu_millis: 250, memory_bytes: 64 << 20, ephemeral_bytes: 1 << 30 };

    fn job() -> JobRef {
        JobRef { uid: "uid".into(), key: "team-a/train".into() }
    }

    fn placement(task: usize, nodes: &[&str]) -> Placement {
        Placement { task, nodes: nodes.iter().map(|n| n.to_string()).collect() }
    }

    /// (id, index, number, replica, node, gpu mask) of each attempt built.
    type Row = (&'static str, u32, u32, u32, &'static str, u64);

    /// (rounds offered, replicas, each round's ids).
    type IdsCase = (&'static [(u32, u32)], u32, Vec<Vec<&'static str>>);

    struct Case {
        name: &'static str,
        slots: &'static [(u32, u32)],
        replicas: u32,
        placed: Vec<Placement>,
        gpus: &'static [(&'static str, u64)],
        want: &'static [Row],
    }

    #[test]
    fn round_ids_number_each_copy_and_keep_the_plain_id_for_copy_zero() {
        let cases: [IdsCase; 4] = [
            (&[], 1, vec![]),
            (&[(0, 1), (7, 3)], 1, vec![vec!["uid.0.1"], vec!["uid.7.3"]]),
            (&[(2, 1)], 3, vec![vec!["uid.2.1", "uid.2.1.r1", "uid.2.1.r2"]]),
            (&[(0, 2), (1, 1)], 2, vec![vec!["uid.0.2", "uid.0.2.r1"], vec!["uid.1.1", "uid.1.1.r1"]]),
        ];
        for (slots, replicas, want) in cases {
            assert_eq!(round_ids("uid", slots, replicas), want, "slots {slots:?} × {replicas} replicas");
        }
    }

    #[test]
    fn attempts_follow_the_placement_one_per_copy_with_its_ids_numbers_nodes_and_gpus() {
        let cases = [
            Case { name: "nothing placed", slots: &[(0, 1)], replicas: 1, placed: vec![], gpus: &[], want: &[] },
            Case {
                name: "one task, one copy",
                slots: &[(0, 1)],
                replicas: 1,
                placed: vec![placement(0, &["n1"])],
                gpus: &[],
                want: &[("uid.0.1", 0, 1, 0, "n1", 0)],
            },
            Case {
                name: "a retry keeps the number the job's progress chose",
                slots: &[(4, 3)],
                replicas: 1,
                placed: vec![placement(0, &["n2"])],
                gpus: &[],
                want: &[("uid.4.3", 4, 3, 0, "n2", 0)],
            },
            Case {
                name: "replicas are numbered in the order of their nodes",
                slots: &[(1, 1)],
                replicas: 3,
                placed: vec![placement(0, &["alice-1", "bob-1", "carol-1"])],
                gpus: &[],
                want: &[("uid.1.1", 1, 1, 0, "alice-1", 0), ("uid.1.1.r1", 1, 1, 1, "bob-1", 0), ("uid.1.1.r2", 1, 1, 2, "carol-1", 0)],
            },
            Case {
                name: "only placed rounds, in the scheduler's order",
                slots: &[(0, 1), (1, 1), (2, 2)],
                replicas: 1,
                placed: vec![placement(2, &["n1"]), placement(0, &["n2"])],
                gpus: &[],
                want: &[("uid.2.2", 2, 2, 0, "n1", 0), ("uid.0.1", 0, 1, 0, "n2", 0)],
            },
            Case {
                name: "each copy holds the GPUs the pool gave it, none when not listed",
                slots: &[(0, 1)],
                replicas: 2,
                placed: vec![placement(0, &["g1", "g2"])],
                gpus: &[("uid.0.1", 0b0110)],
                want: &[("uid.0.1", 0, 1, 0, "g1", 0b0110), ("uid.0.1.r1", 0, 1, 1, "g2", 0)],
            },
        ];
        let job = job();
        for case in cases {
            let ids = round_ids(&job.uid, case.slots, case.replicas);
            let gpu_masks: HashMap<&str, u64> = case.gpus.iter().copied().collect();
            let rounds = Rounds { job: &job, resources: RESOURCES, slots: case.slots, ids: &ids, placed: &case.placed, gpu_masks: &gpu_masks, now_ms: 1_000 };
            let got: Vec<(String, u32, u32, u32, String, u64)> =
                attempts(&rounds).into_iter().map(|a| (a.id, a.index, a.number, a.replica, a.node, a.held.map_or(u64::MAX, |h| h.gpu_mask))).collect();
            let want: Vec<(String, u32, u32, u32, String, u64)> =
                case.want.iter().map(|&(id, i, n, r, node, g)| (id.into(), i, n, r, node.into(), g)).collect();
            assert_eq!(got, want, "{}", case.name);
        }
    }

    #[test]
    fn every_attempt_is_assigned_now_to_its_job_and_holds_the_jobs_request() {
        let job = job();
        let ids = round_ids(&job.uid, &[(0, 1)], 1);
        let placed = [placement(0, &["n1"])];
        let rounds = Rounds { job: &job, resources: RESOURCES, slots: &[(0, 1)], ids: &ids, placed: &placed, gpu_masks: &HashMap::new(), now_ms: 42 };
        let a = attempts(&rounds).remove(0);
        assert_eq!((a.job_uid.as_str(), a.job_key.as_str(), a.phase), ("uid", "team-a/train", AttemptPhase::Assigned));
        assert_eq!((a.cpu_millis, a.memory_bytes), (250, 64 << 20));
        assert_eq!(a.held, Some(Held { ephemeral_bytes: 1 << 30, gpu_mask: 0 }));
        assert_eq!((a.created_ms, a.finished_ms, a.result), (42, None, None));
    }

    #[test]
    fn after_a_failed_attempt_the_retry_is_built_with_the_next_number() {
        let policy = crate::job::JobPolicy { max_attempts: 3, backoff: Duration::ZERO, ..exec_policy(1, 250) };
        let job = job();
        let first = |phase| Attempt {
            phase,
            finished_ms: phase.is_terminal().then_some(10),
            result: Some(AttemptResult { exit_code: 1, ..Default::default() }),
            ..attempts(&Rounds {
                job: &job,
                resources: RESOURCES,
                slots: &[(0, 1)],
                ids: &round_ids(&job.uid, &[(0, 1)], 1),
                placed: &[placement(0, &["n1"])],
                gpu_masks: &HashMap::new(),
                now_ms: 0,
            })
            .remove(0)
        };
        for (phase, want) in [(AttemptPhase::Failed, Some("uid.0.2")), (AttemptPhase::Lost, Some("uid.0.2")), (AttemptPhase::Running, None)] {
            let p = progress(&policy, &[Arc::new(first(phase))], 20);
            let ids = round_ids(&job.uid, &p.to_place, 1);
            let placed: Vec<Placement> = (0..p.to_place.len()).map(|t| placement(t, &["n2"])).collect();
            let rounds = Rounds { job: &job, resources: RESOURCES, slots: &p.to_place, ids: &ids, placed: &placed, gpu_masks: &HashMap::new(), now_ms: 20 };
            let built: Vec<(String, u32)> = attempts(&rounds).into_iter().map(|a| (a.id, a.number)).collect();
            assert_eq!(built, want.map(|id| (id.to_string(), 2)).into_iter().collect::<Vec<_>>(), "after a {phase:?} first attempt");
        }
    }
}
