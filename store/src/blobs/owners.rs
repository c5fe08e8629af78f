//! Who holds each blob: the job whose module it is, and, for a grace after a job lets go of
//! one, that job still. Pure bookkeeping (no files); `Blobs` saves it after every change.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The module one job references.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Held {
    pub namespace: String,
    pub sha256: String,
    pub bytes: u64,
}

/// A blob some job let go of (it changed module, finished or was deleted) less than a grace
/// ago: kept, and fetchable by those jobs' attempts, until the grace passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Released {
    /// The latest time any job let go of it.
    pub since_ms: i64,
    pub bytes: u64,
    /// Charged to these namespaces until it goes (see [`Owners::charged`]).
    pub namespaces: BTreeSet<String>,
    /// Jobs whose already-assigned attempts may still fetch it.
    pub jobs: BTreeSet<String>,
}

/// Every job's module and what was let go of within the grace. Its size is one entry per live
/// job plus what was released within one grace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Owners {
    /// Job uid → its module.
    #[serde(default)]
    pub refs: BTreeMap<String, Held>,
    /// sha256 → who let go of it and when.
    #[serde(default)]
    pub released: BTreeMap<String, Released>,
    /// The last journalled change this state includes.
    #[serde(default)]
    pub seq: u64,
}

/// One change, as the journal records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(super) enum Change {
    Set { seq: u64, job: String, namespace: String, sha256: String, bytes: u64, at_ms: i64 },
    Release { seq: u64, job: String, at_ms: i64 },
}

impl Change {
    pub fn seq(&self) -> u64 {
        match self {
            Change::Set { seq, .. } | Change::Release { seq, .. } => *seq,
        }
    }
}

/// A module that would take its namespace over its quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Over {
    /// Bytes the namespace holds without this job's current module.
    pub held: u64,
}

impl Owners {
    /// Applies a journalled change (one this state already includes is skipped); whether it
    /// changed anything.
    pub fn apply(&mut self, change: &Change) -> bool {
        if change.seq() <= self.seq {
            return false;
        }
        self.seq = change.seq();
        match change {
            Change::Set { job, namespace, sha256, bytes, at_ms, .. } => {
                let before = self.refs.get(job).cloned();
                self.set(job, namespace, sha256, *bytes, *at_ms);
                before.as_ref() != self.refs.get(job)
            }
            Change::Release { job, at_ms, .. } => self.release(job, *at_ms),
        }
    }

    /// Whether `job_uid` already references `sha256`.
    pub fn holds(&self, job_uid: &str, sha256: &str) -> bool {
        self.refs.get(job_uid).is_some_and(|h| h.sha256 == sha256)
    }

    /// The bytes charged to `namespace` apart from `except_job`'s current module: each distinct
    /// blob its other jobs reference or any of its jobs let go of within the grace, once.
    /// Released blobs count so that editing a module over and over cannot fill the volume
    /// faster than the grace lets go; the job's own current module does not, or a job whose
    /// module is over half the quota could never move to another one.
    fn charged(&self, namespace: &str, except_job: &str) -> (u64, BTreeSet<&str>) {
        let mut seen = BTreeSet::new();
        let mut bytes = 0u64;
        let referenced = self.refs.iter().filter(|(uid, h)| h.namespace == namespace && uid.as_str() != except_job).map(|(_, h)| (h.sha256.as_str(), h.bytes));
        let released = self.released.iter().filter(|(_, r)| r.namespaces.contains(namespace)).map(|(sha, r)| (sha.as_str(), r.bytes));
        for (sha, b) in referenced.chain(released) {
            if seen.insert(sha) {
                bytes = bytes.saturating_add(b);
            }
        }
        (bytes, seen)
    }

    /// Whether `job_uid` of `namespace` may reference a blob of `bytes` bytes under `quota`.
    pub fn admit(&self, job_uid: &str, namespace: &str, sha256: &str, bytes: u64, quota: u64) -> Result<(), Over> {
        if self.holds(job_uid, sha256) {
            return Ok(());
        }
        let (held, blobs) = self.charged(namespace, job_uid);
        if blobs.contains(sha256) || held.saturating_add(bytes) <= quota {
            return Ok(());
        }
        Err(Over { held })
    }

    /// `job_uid` now references `sha256`; the module it referenced before is released at `now_ms`.
    pub fn set(&mut self, job_uid: &str, namespace: &str, sha256: &str, bytes: u64, now_ms: i64) {
        let held = Held { namespace: namespace.to_string(), sha256: sha256.to_string(), bytes };
        if let Some(old) = self.refs.insert(job_uid.to_string(), held)
            && old.sha256 != sha256
        {
            self.let_go(job_uid, old, now_ms);
        }
    }

    /// `job_uid` references nothing any more; whether it referenced something.
    pub fn release(&mut self, job_uid: &str, now_ms: i64) -> bool {
        match self.refs.remove(job_uid) {
            Some(old) => {
                self.let_go(job_uid, old, now_ms);
                true
            }
            None => false,
        }
    }

    fn let_go(&mut self, job_uid: &str, old: Held, now_ms: i64) {
        let r = self.released.entry(old.sha256).or_insert_with(|| Released {
            since_ms: now_ms,
            bytes: old.bytes,
            namespaces: BTreeSet::new(),
            jobs: BTreeSet::new(),
        });
        r.since_ms = r.since_ms.max(now_ms);
        r.namespaces.insert(old.namespace);
        r.jobs.insert(job_uid.to_string());
    }

    /// Forgets what was released more than `grace_ms` before `now_ms`; whether anything went.
    pub fn expire(&mut self, now_ms: i64, grace_ms: i64) -> bool {
        let before = self.released.len();
        self.released.retain(|_, r| now_ms.saturating_sub(r.since_ms) < grace_ms);
        self.released.len() != before
    }

    /// Whether a job references the blob or let go of it within the grace: it must stay.
    pub fn keeps(&self, sha256: &str) -> bool {
        self.released.contains_key(sha256) || self.refs.values().any(|h| h.sha256 == sha256)
    }

    /// The jobs whose attempts may fetch the blob: those referencing it, and those that let go
    /// of it within `grace_ms` of `now_ms` (an attempt assigned before the change may still be
    /// starting).
    pub fn users(&self, sha256: &str, now_ms: i64, grace_ms: i64) -> Vec<String> {
        let mut users: Vec<String> = self.refs.iter().filter(|(_, h)| h.sha256 == sha256).map(|(uid, _)| uid.clone()).collect();
        if let Some(r) = self.released.get(sha256).filter(|r| now_ms.saturating_sub(r.since_ms) < grace_ms) {
            users.extend(r.jobs.iter().cloned());
        }
        users.sort();
        users.dedup();
        users
    }

    /// Bytes charged to `namespace` (see [`Owners::charged`]).
    pub fn namespace_bytes(&self, namespace: &str) -> u64 {
        self.charged(namespace, "").0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    #[test]
    fn a_job_moving_between_modules_releases_the_old_one_for_the_grace() {
        let mut o = Owners::default();
        o.set("j", "ns", &sha(1), 10, 100);
        o.set("j", "ns", &sha(1), 10, 150);
        assert!(o.released.is_empty(), "the same module again changes nothing");
        o.set("j", "ns", &sha(2), 20, 200);
        assert_eq!(o.users(&sha(1), 250, 100), vec!["j".to_string()], "an attempt assigned before the edit may still fetch it");
        assert!(o.users(&sha(1), 300, 100).is_empty(), "not after the grace");
        assert!(o.keeps(&sha(1)));
        assert!(!o.expire(299, 100));
        assert!(o.expire(300, 100));
        assert!(!o.keeps(&sha(1)) && o.keeps(&sha(2)));
        assert!(o.release("j", 400));
        assert!(!o.release("j", 400));
        assert!(o.refs.is_empty() && o.keeps(&sha(2)));
    }

    #[test]
    fn the_quota_counts_each_blob_once_with_what_was_released_but_not_the_module_being_replaced() {
        let mut o = Owners::default();
        o.set("a", "ns", &sha(1), 60, 0);
        o.set("b", "ns", &sha(1), 60, 0);
        o.set("x", "other", &sha(2), 90, 0);
        assert_eq!(o.namespace_bytes("ns"), 60, "a blob two jobs share counts once");
        assert_eq!(o.admit("c", "ns", &sha(3), 40, 100), Ok(()));
        assert_eq!(o.admit("c", "ns", &sha(3), 41, 100), Err(Over { held: 60 }));
        assert_eq!(o.admit("c", "ns", &sha(2), 90, 100), Err(Over { held: 60 }), "another namespace's blob is charged here too");
        assert_eq!(o.admit("c", "ns", &sha(1), 60, 100), Ok(()), "one already charged costs nothing more");
        // A job whose module is most of the quota may still move to another one...
        let mut big = Owners::default();
        big.set("j", "ns", &sha(1), 80, 0);
        assert_eq!(big.admit("j", "ns", &sha(2), 80, 100), Ok(()));
        big.set("j", "ns", &sha(2), 80, 10);
        // ...but not again while the first one is held for the grace.
        assert_eq!(big.admit("j", "ns", &sha(3), 80, 100), Err(Over { held: 80 }));
        big.expire(1_000, 100);
        assert_eq!(big.admit("j", "ns", &sha(3), 80, 100), Ok(()));
    }

    #[test]
    fn the_bookkeeping_reads_back_from_json() {
        let mut o = Owners::default();
        o.set("j", "ns", &sha(1), 10, 1);
        o.set("j", "ns", &sha(2), 10, 2);
        let json = serde_json::to_string(&o).unwrap();
        assert_eq!(serde_json::from_str::<Owners>(&json).unwrap(), o);
        assert_eq!(serde_json::from_str::<Owners>("{}").unwrap(), Owners::default());
    }
}
