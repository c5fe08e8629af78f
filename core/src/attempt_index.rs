//! An in-memory, write-through copy of the attempts of the jobs being synced, so a sync reads
//! its job's attempts without a SQLite query or parsing a result per attempt. The store stays
//! the durable truth: a job is loaded from it on first use, and every store write is applied
//! here after it is committed. Finished jobs can be dropped and are loaded again when needed;
//! a running job's finished tasks can be settled: their attempts leave memory and only their
//! indexes stay, as ranges, so a job of a million tasks holds what runs, not what ran.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::attempt::{Attempt, AttemptPhase, AttemptResult};
use crate::job::Recorded;

/// The attempts of one job, in (index, number, replica) order like the store's query.
type JobAttempts = BTreeMap<(u32, u32, u32), Arc<Attempt>>;

/// A loaded job: the attempts kept in memory and the tasks settled (done, attempts dropped).
#[derive(Default)]
struct LoadedJob {
    attempts: JobAttempts,
    /// Only `completed` and `started_ms` are used: settled tasks succeeded.
    settled: Recorded,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, LoadedJob>,
    /// Attempt id → (job uid, index, number, replica), for the attempts of loaded jobs.
    ids: HashMap<String, (String, u32, u32, u32)>,
}

/// The attempts of loaded jobs. Every change is an idempotent "set" guarded like the store's
/// UPDATEs, so applying a write that a load already saw changes nothing.
#[derive(Default)]
pub struct AttemptIndex {
    inner: Mutex<Inner>,
}

impl AttemptIndex {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change below is complete before it can panic, so a poisoned lock is safe.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One attempt of a loaded job, by id.
    pub fn attempt(&self, id: &str) -> Option<Arc<Attempt>> {
        let inner = self.lock();
        let (uid, index, number, replica) = inner.ids.get(id)?;
        inner.jobs.get(uid)?.attempts.get(&(*index, *number, *replica)).cloned()
    }

    /// The job's attempts in (index, number, replica) order, when the job is loaded.
    pub fn get(&self, job_uid: &str) -> Option<Vec<Arc<Attempt>>> {
        self.lock().jobs.get(job_uid).map(|job| job.attempts.values().cloned().collect())
    }

    /// The tasks of a loaded job that were settled (see [`AttemptIndex::settle`]); empty when
    /// none were or the job is not loaded.
    pub fn settled(&self, job_uid: &str) -> Recorded {
        self.lock().jobs.get(job_uid).map(|job| job.settled.clone()).unwrap_or_default()
    }

    /// Lets go of the attempts of `indexes`, tasks the caller found succeeded: each one whose
    /// attempts are all finished is recorded as completed (with its earliest creation time,
    /// so the job's start stays known) and its attempts leave memory; a task with an attempt
    /// still active is kept. The store keeps every attempt. Returns how many attempts left.
    pub fn settle(&self, job_uid: &str, indexes: &[u32]) -> usize {
        let mut inner = self.lock();
        let Inner { jobs, ids } = &mut *inner;
        let Some(job) = jobs.get_mut(job_uid) else { return 0 };
        let mut dropped = 0;
        for &index in indexes {
            let range = (index, 0, 0)..=(index, u32::MAX, u32::MAX);
            if job.attempts.range(range.clone()).any(|(_, a)| !a.phase.is_terminal()) {
                continue;
            }
            let keys: Vec<(u32, u32, u32)> = job.attempts.range(range).map(|(k, _)| *k).collect();
            for key in keys {
                if let Some(a) = job.attempts.remove(&key) {
                    ids.remove(&a.id);
                    job.settled.started_ms = Some(job.settled.started_ms.map_or(a.created_ms, |s| s.min(a.created_ms)));
                    dropped += 1;
                }
            }
            job.settled.completed.insert_range(index, index);
        }
        dropped
    }

    /// The job's attempts in (index, number, replica) order, loading them with `load` (a store read)
    /// the first time. `load` runs under the index lock: a store write committed meanwhile is
    /// applied after the load (writers take this lock only after their commit), never lost.
    pub fn job<E>(&self, job_uid: &str, load: impl FnOnce() -> Result<Vec<Attempt>, E>) -> Result<Vec<Arc<Attempt>>, E> {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.get(job_uid) {
            return Ok(job.attempts.values().cloned().collect());
        }
        let attempts = load()?;
        let Inner { jobs, ids } = &mut *inner;
        let job = jobs.entry(job_uid.to_string()).or_default();
        for a in attempts {
            ids.insert(a.id.clone(), (job_uid.to_string(), a.index, a.number, a.replica));
            job.attempts.insert((a.index, a.number, a.replica), Arc::new(a));
        }
        Ok(job.attempts.values().cloned().collect())
    }

    /// After new attempts were committed: adds those of loaded jobs (an id already there is
    /// kept, like the store's INSERT OR IGNORE).
    pub fn inserted(&self, attempts: &[Attempt]) {
        let mut inner = self.lock();
        let Inner { jobs, ids } = &mut *inner;
        for a in attempts {
            let Some(job) = jobs.get_mut(&a.job_uid) else { continue };
            if ids.contains_key(&a.id) {
                continue;
            }
            ids.insert(a.id.clone(), (a.job_uid.clone(), a.index, a.number, a.replica));
            job.attempts.insert((a.index, a.number, a.replica), Arc::new(a.clone()));
        }
    }

    /// After an Assigned attempt was marked Running.
    pub fn running(&self, id: &str) {
        self.update(id, |a| {
            if a.phase == AttemptPhase::Assigned {
                a.phase = AttemptPhase::Running;
            }
        });
    }

    /// After an active attempt was finished (a no-op for one already terminal).
    pub fn finished(&self, id: &str, phase: AttemptPhase, result: Option<&AttemptResult>, now_ms: i64) {
        self.update(id, |a| {
            if !a.phase.is_terminal() {
                a.phase = phase;
                a.finished_ms = Some(now_ms);
                a.result = result.cloned();
            }
        });
    }

    /// Drops a job (finished or deleted); a later read loads it again from the store.
    pub fn forget(&self, job_uid: &str) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.remove(job_uid) {
            for a in job.attempts.values() {
                inner.ids.remove(&a.id);
            }
        }
    }

    fn update(&self, id: &str, change: impl FnOnce(&mut Attempt)) {
        let mut inner = self.lock();
        let Inner { jobs, ids } = &mut *inner;
        let Some((uid, index, number, replica)) = ids.get(id) else { return };
        if let Some(slot) = jobs.get_mut(uid).and_then(|j| j.attempts.get_mut(&(*index, *number, *replica))) {
            // Readers hold clones of the Arc: they keep the attempt as it was when they read.
            let mut a = Attempt::clone(slot);
            change(&mut a);
            if a != **slot {
                *slot = Arc::new(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attempt::attempt_id;

    fn attempt(index: u32, number: u32) -> Attempt {
        Attempt {
            id: attempt_id("uid", index, number),
            job_uid: "uid".into(),
            job_key: "ns/j".into(),
            index,
            number,
            replica: 0,
            node: "n".into(),
            phase: AttemptPhase::Assigned,
            cpu_millis: 1,
            memory_bytes: 1,
            created_ms: 1,
            finished_ms: None,
            result: None,
            held: None,
        }
    }

    #[test]
    fn an_attempt_of_a_loaded_job_is_found_by_id_and_follows_its_writes() {
        let index = AttemptIndex::default();
        assert!(index.attempt(&attempt_id("uid", 0, 1)).is_none(), "nothing loaded yet");
        index.job("uid", || Ok::<_, ()>(vec![attempt(0, 1)])).unwrap();
        assert_eq!(index.attempt(&attempt_id("uid", 0, 1)).unwrap().phase, AttemptPhase::Assigned);
        index.running(&attempt_id("uid", 0, 1));
        assert_eq!(index.attempt(&attempt_id("uid", 0, 1)).unwrap().phase, AttemptPhase::Running);
        index.forget("uid");
        assert!(index.attempt(&attempt_id("uid", 0, 1)).is_none(), "a forgotten job is read from the store again");
    }

    #[test]
    fn the_replicas_of_one_round_are_kept_apart() {
        let i = AttemptIndex::default();
        let replica = |k: u32| Attempt { id: crate::attempt::replica_attempt_id("uid", 0, 1, k), replica: k, ..attempt(0, 1) };
        i.job("uid", || Ok::<_, ()>(vec![replica(0)])).unwrap();
        i.inserted(&[replica(1), replica(2)]);
        i.finished(&replica(1).id, AttemptPhase::Succeeded, None, 5);
        let seen: Vec<(u32, AttemptPhase)> = i.job("uid", || Ok::<_, ()>(vec![])).unwrap().iter().map(|a| (a.replica, a.phase)).collect();
        assert_eq!(seen, vec![(0, AttemptPhase::Assigned), (1, AttemptPhase::Succeeded), (2, AttemptPhase::Assigned)]);
    }

    fn phases(i: &AttemptIndex) -> Vec<(u32, u32, AttemptPhase)> {
        i.job("uid", || Ok::<_, ()>(vec![])).unwrap().iter().map(|a| (a.index, a.number, a.phase)).collect()
    }

    #[test]
    fn a_loaded_job_follows_every_write_and_a_write_seen_by_the_load_changes_nothing() {
        let index = AttemptIndex::default();
        index.inserted(&[attempt(9, 1)]);
        let loaded = index.job("uid", || Ok::<_, ()>(vec![attempt(1, 1), attempt(0, 1)])).unwrap();
        assert_eq!(loaded.iter().map(|a| a.index).collect::<Vec<_>>(), vec![0, 1], "in index order; writes to unloaded jobs are not kept");

        index.inserted(&[attempt(0, 2), attempt(1, 1)]);
        index.running(&attempt_id("uid", 1, 1));
        let ok = AttemptResult { exit_code: 0, ..Default::default() };
        index.finished(&attempt_id("uid", 0, 1), AttemptPhase::Failed, None, 5);
        index.finished(&attempt_id("uid", 0, 1), AttemptPhase::Succeeded, Some(&ok), 6);
        index.finished(&attempt_id("uid", 1, 1), AttemptPhase::Succeeded, Some(&ok), 7);
        index.running(&attempt_id("uid", 1, 1));
        use AttemptPhase::*;
        assert_eq!(phases(&index), vec![(0, 1, Failed), (0, 2, Assigned), (1, 1, Succeeded)]);
        let done = index.job("uid", || Err(())).unwrap();
        assert_eq!((done[2].finished_ms, done[2].result.as_ref()), (Some(7), Some(&ok)));

        index.forget("uid");
        assert_eq!(index.job("uid", || Ok::<_, ()>(vec![attempt(3, 1)])).unwrap().len(), 1, "a forgotten job is loaded again");
    }

    #[test]
    fn a_settled_task_leaves_memory_and_stays_known_as_completed() {
        use AttemptPhase::*;
        let index = AttemptIndex::default();
        let with = |i: u32, n: u32, phase: AttemptPhase, created_ms: i64| Attempt { phase, created_ms, ..attempt(i, n) };
        index.job("uid", || Ok::<_, ()>(vec![with(0, 1, Failed, 5), with(0, 2, Succeeded, 9), with(1, 1, Running, 7), with(2, 1, Succeeded, 8)])).unwrap();
        assert_eq!(index.settle("uid", &[0, 1]), 2, "task 1 still runs: it is kept");
        assert_eq!(phases(&index), vec![(1, 1, Running), (2, 1, Succeeded)]);
        assert!(index.attempt(&attempt_id("uid", 0, 2)).is_none(), "a settled attempt is read from the store");
        let settled = index.settled("uid");
        assert_eq!((settled.completed.to_string(), settled.started_ms), ("0".to_string(), Some(5)));
        index.finished(&attempt_id("uid", 1, 1), Succeeded, None, 10);
        assert_eq!(index.settle("uid", &[1, 2]), 2);
        assert_eq!(index.settled("uid").completed.to_string(), "0-2");
        index.forget("uid");
        assert!(index.settled("uid").completed.is_empty(), "a forgotten job is loaded whole again");
    }

    #[test]
    fn what_a_reader_holds_does_not_change_under_it() {
        let index = AttemptIndex::default();
        let before = index.job("uid", || Ok::<_, ()>(vec![attempt(0, 1)])).unwrap();
        index.finished(&attempt_id("uid", 0, 1), AttemptPhase::Lost, None, 5);
        assert_eq!(before[0].phase, AttemptPhase::Assigned);
        assert_eq!(index.job("uid", || Err(())).unwrap()[0].phase, AttemptPhase::Lost);
    }
}
