//! Running usage totals per job, so a job's status and budget check do not aggregate its
//! receipts in the database on every sync. A job's totals are read from the database once (with
//! the seq of the last entry that read saw), then the writer adds each receipt it appends.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::entry::{Entry, EntryKind, UsageFigures};
use crate::records::JobUsage;
use kommune_core::pricing::Micros;

enum Slot {
    /// Totals up to date with every appended entry.
    Ready(JobUsage),
    /// A database read is under way; receipts appended meanwhile wait here (seq, usage, cost)
    /// until the read says which of them it saw.
    Loading(Vec<(u64, UsageFigures, Micros)>),
}

/// The totals of the jobs asked about so far.
#[derive(Default)]
pub struct JobTotals {
    jobs: Mutex<HashMap<String, Slot>>,
}

/// Adds one receipt to a job's totals, as the database aggregate computes them: exact sums,
/// shown as u64::MAX once they pass it (adding saturated figures one receipt at a time gives
/// the same figure as saturating the exact sum, so the two never disagree).
fn add(t: &mut JobUsage, u: &UsageFigures, cost: Micros) {
    let s = &mut t.usage;
    t.receipts = t.receipts.saturating_add(1);
    s.wall_millis = s.wall_millis.saturating_add(u.wall_millis);
    s.cpu_micros = s.cpu_micros.saturating_add(u.cpu_micros);
    s.memory_peak_bytes = s.memory_peak_bytes.max(u.memory_peak_bytes);
    s.memory_mib_millis = s.memory_mib_millis.saturating_add(u.memory_mib_millis);
    s.wasm_fuel = s.wasm_fuel.saturating_add(u.wasm_fuel);
    s.gpu_millis = s.gpu_millis.saturating_add(u.gpu_millis);
    s.output_bytes = s.output_bytes.saturating_add(u.output_bytes);
    t.cost = t.cost.saturating_add(cost);
}

impl JobTotals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's totals if they are kept.
    pub fn get(&self, job_uid: &str) -> Option<JobUsage> {
        match self.lock().get(job_uid) {
            Some(Slot::Ready(t)) => Some(*t),
            _ => None,
        }
    }

    /// Starts keeping a job's totals; false when a read for it is already under way (the
    /// caller then reads without keeping the result).
    pub fn start(&self, job_uid: &str) -> bool {
        let mut jobs = self.lock();
        if jobs.contains_key(job_uid) {
            return false;
        }
        jobs.insert(job_uid.to_string(), Slot::Loading(vec![]));
        true
    }

    /// The read started by [`JobTotals::start`] returned `read`, which saw every entry up to
    /// `seen_seq`: add what was appended after it, and keep the totals from now on.
    pub fn loaded(&self, job_uid: &str, mut read: JobUsage, seen_seq: u64) -> JobUsage {
        let mut jobs = self.lock();
        if let Some(Slot::Loading(meanwhile)) = jobs.get(job_uid) {
            for (_, usage, cost) in meanwhile.iter().filter(|(seq, ..)| *seq > seen_seq) {
                add(&mut read, usage, *cost);
            }
            jobs.insert(job_uid.to_string(), Slot::Ready(read));
        }
        read
    }

    /// Stops keeping a job's totals. A read under way is left to finish (it keeps what it read,
    /// which is still exact: the writer adds to it from then on).
    pub fn forget(&self, job_uid: &str) {
        let mut jobs = self.lock();
        if matches!(jobs.get(job_uid), Some(Slot::Ready(_))) {
            jobs.remove(job_uid);
        }
    }

    /// The read failed or was given up: nothing is kept.
    pub fn abandon(&self, job_uid: &str) {
        let mut jobs = self.lock();
        if matches!(jobs.get(job_uid), Some(Slot::Loading(_))) {
            jobs.remove(job_uid);
        }
    }

    /// After `entries` were durably appended.
    pub fn appended(&self, entries: &[Entry]) {
        let mut jobs = self.lock();
        if jobs.is_empty() {
            return;
        }
        for e in entries.iter().filter(|e| e.kind == EntryKind::Receipt) {
            match jobs.get_mut(&e.job_uid) {
                Some(Slot::Ready(t)) => add(t, &e.usage, e.cost),
                Some(Slot::Loading(meanwhile)) => meanwhile.push((e.seq, e.usage, e.cost)),
                None => {}
            }
        }
    }
}

/// Abandons a load that did not finish (its future was dropped), so the job is read again.
pub struct LoadGuard<'a> {
    pub totals: &'a JobTotals,
    pub job_uid: &'a str,
    pub done: bool,
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.totals.abandon(self.job_uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(seq: u64, job: &str, cpu: u64, cost: u64) -> Entry {
        Entry {
            seq,
            kind: EntryKind::Receipt,
            recorded_ms: 0,
            node: "n".into(),
            epoch: 1,
            sequence: seq,
            attempt_id: format!("{job}.{seq}.1"),
            job_uid: job.into(),
            job_key: format!("ns/{job}"),
            body: vec![],
            signature: vec![],
            public_key: vec![],
            rates: Default::default(),
            cost: Micros(cost),
            usage: UsageFigures { cpu_micros: cpu, memory_peak_bytes: cpu, ..Default::default() },
            prev_hash: vec![],
            hash: vec![],
        }
    }

    #[test]
    fn receipts_appended_during_a_load_are_counted_once_whether_the_load_saw_them_or_not() {
        let t = JobTotals::default();
        t.appended(&[receipt(1, "j", 1, 10)]);
        assert!(t.start("j"));
        assert!(!t.start("j"), "one load at a time");
        assert_eq!(t.get("j"), None);
        // Appended while the read runs: seq 2 is in what it read, seq 3 is not.
        t.appended(&[receipt(2, "j", 2, 20), receipt(3, "j", 4, 40), receipt(4, "other", 8, 80)]);
        let read = JobUsage { receipts: 2, usage: UsageFigures { cpu_micros: 3, memory_peak_bytes: 2, ..Default::default() }, cost: Micros(30) };
        let got = t.loaded("j", read, 2);
        assert_eq!((got.receipts, got.usage.cpu_micros, got.usage.memory_peak_bytes, got.cost), (3, 7, 4, Micros(70)));
        t.appended(&[receipt(5, "j", 1, 1)]);
        let now = t.get("j").unwrap();
        assert_eq!((now.receipts, now.usage.cpu_micros, now.cost), (4, 8, Micros(71)));
        assert_eq!(t.get("other"), None, "only jobs asked about are kept");
    }

    #[test]
    fn a_forgotten_job_is_read_again_and_nothing_of_it_is_kept_meanwhile() {
        let t = JobTotals::default();
        assert!(t.start("j"));
        t.loaded("j", JobUsage::default(), 0);
        t.appended(&[receipt(1, "j", 1, 10)]);
        assert_eq!(t.get("j").unwrap().receipts, 1);
        t.forget("j");
        assert_eq!(t.get("j"), None);
        t.appended(&[receipt(2, "j", 1, 10)]);
        assert!(t.start("j"), "the next ask reads the database again");
    }

    #[test]
    fn running_totals_saturate_instead_of_wrapping() {
        let t = JobTotals::default();
        assert!(t.start("j"));
        t.loaded("j", JobUsage::default(), 0);
        let mut huge = receipt(1, "j", u64::MAX - 1, u64::MAX - 1);
        huge.usage.gpu_millis = 1 << 63;
        t.appended(&[huge.clone(), Entry { seq: 2, ..huge.clone() }, Entry { seq: 3, ..huge }]);
        let got = t.get("j").unwrap();
        assert_eq!((got.receipts, got.usage.cpu_micros, got.usage.gpu_millis, got.cost), (3, u64::MAX, u64::MAX, Micros(u64::MAX)));
        assert_eq!(got.usage.memory_peak_bytes, u64::MAX - 1, "a peak is the largest, not a sum");
    }

    #[test]
    fn an_abandoned_load_keeps_nothing() {
        let t = JobTotals::default();
        {
            let _guard = LoadGuard { totals: &t, job_uid: "j", done: false };
            assert!(t.start("j"));
        }
        assert!(t.start("j"), "the dropped load left no slot behind");
    }
}
