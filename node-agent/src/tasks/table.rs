//! What the agent's running attempts share, under one lock: which run, the GPUs they hold and
//! whether the provider has taken the machine back, so no reader sees the three disagree.

use std::collections::HashMap;

use kommune_proto::v1::Gpu;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::gpu::GpuPool;

/// One running attempt.
struct Running {
    cancel: CancellationToken,
    /// Why the provider took the machine back while it ran, if it did. Kept on the attempt, so
    /// it goes when the attempt does and cannot outlive it.
    preempted: Option<String>,
    /// What it wrote and has not sent live yet.
    live: crate::runtime::live::LiveLog,
}

/// The attempts this agent runs right now and what they hold.
#[derive(Default)]
pub(super) struct TaskTable {
    running: HashMap<String, Running>,
    /// The GPUs offered, and which attempt holds each.
    gpus: GpuPool,
    /// Set while the provider needs the machine back: why. New assignments are handed back.
    preempting: Option<String>,
}

impl TaskTable {
    pub(super) fn offer_gpus(&mut self, gpus: &[Gpu]) {
        self.gpus = GpuPool::new(gpus);
    }

    /// Records a new attempt; false when one with this id is already running.
    pub(super) fn start(&mut self, id: &str, cancel: CancellationToken) -> bool {
        if self.running.contains_key(id) {
            return false;
        }
        self.running.insert(id.to_string(), Running { cancel, preempted: None, live: Default::default() });
        true
    }

    /// Stops every running attempt because the provider needs the machine, and keeps handing
    /// new ones back until [`TaskTable::stop_preempting`].
    pub(super) fn preempt_all(&mut self, reason: &str) {
        self.preempting = Some(reason.to_string());
        for (id, attempt) in &mut self.running {
            info!(attempt = %id, reason, "preempting: the provider needs the machine");
            attempt.preempted = Some(reason.to_string());
            attempt.cancel.cancel();
        }
    }

    pub(super) fn stop_preempting(&mut self) {
        self.preempting = None;
    }

    /// Called as an attempt is about to run: while the provider needs the machine it must not,
    /// and is marked preempted. Returns why.
    pub(super) fn refuse_while_preempting(&mut self, id: &str) -> Option<String> {
        let reason = self.preempting.clone()?;
        if let Some(attempt) = self.running.get_mut(id) {
            attempt.preempted = Some(reason.clone());
        }
        Some(reason)
    }

    /// Gives `n` of the offered GPUs to the attempt.
    pub(super) fn take_gpus(&mut self, id: &str, n: u32) -> Result<Vec<String>, String> {
        self.gpus.take(id, n)
    }

    /// The attempt's run is over: its GPUs go back. Returns why it was preempted, if it was.
    /// It stays listed as running until [`TaskTable::remove`], once its result is spooled.
    pub(super) fn ended(&mut self, id: &str) -> Option<String> {
        self.gpus.release(id);
        self.running.get(id).and_then(|a| a.preempted.clone())
    }

    pub(super) fn remove(&mut self, id: &str) {
        self.running.remove(id);
    }

    /// Stops the attempt if it is running; true when it was.
    pub(super) fn cancel(&self, id: &str) -> bool {
        self.running.get(id).inspect(|a| a.cancel.cancel()).is_some()
    }

    /// The live view of a running attempt.
    pub(super) fn live(&self, id: &str) -> Option<crate::runtime::live::LiveLog> {
        self.running.get(id).map(|a| a.live.clone())
    }

    /// Every running attempt's live view, by id.
    pub(super) fn live_logs(&self) -> Vec<(String, crate::runtime::live::LiveLog)> {
        self.running.iter().map(|(id, a)| (id.clone(), a.live.clone())).collect()
    }

    /// Ids of the running attempts, sorted.
    pub(super) fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.running.keys().cloned().collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(uuid: &str) -> Gpu {
        Gpu { model: "A100".into(), memory_bytes: 40 << 30, uuid: uuid.into() }
    }

    #[test]
    fn an_attempt_runs_once_and_is_listed_until_removed() {
        let mut table = TaskTable::default();
        assert!(table.start("b", CancellationToken::new()));
        assert!(table.start("a", CancellationToken::new()));
        assert!(!table.start("a", CancellationToken::new()));
        assert_eq!(table.ids(), ["a", "b"]);
        assert_eq!(table.ended("a"), None);
        assert_eq!(table.ids(), ["a", "b"]);
        table.remove("a");
        assert_eq!(table.ids(), ["b"]);
        assert!(!table.cancel("a"));
    }

    #[test]
    fn preempting_cancels_what_runs_and_refuses_what_starts_until_stopped() {
        let mut table = TaskTable::default();
        let running = CancellationToken::new();
        table.start("old", running.clone());
        table.preempt_all("owner busy");
        assert!(running.is_cancelled());
        assert_eq!(table.ended("old").as_deref(), Some("owner busy"));

        table.start("new", CancellationToken::new());
        assert_eq!(table.refuse_while_preempting("new").as_deref(), Some("owner busy"));
        assert_eq!(table.ended("new").as_deref(), Some("owner busy"));

        table.stop_preempting();
        table.start("later", CancellationToken::new());
        assert_eq!(table.refuse_while_preempting("later"), None);
        assert_eq!(table.ended("later"), None);
    }

    /// The reason a preempted attempt carries goes with it: an attempt that reuses the id
    /// later does not inherit it.
    #[test]
    fn a_preemption_does_not_outlive_its_attempt() {
        let mut table = TaskTable::default();
        table.start("x", CancellationToken::new());
        table.preempt_all("on battery");
        table.stop_preempting();
        table.remove("x");
        table.start("x", CancellationToken::new());
        assert_eq!(table.ended("x"), None);
    }

    #[test]
    fn an_ended_attempt_gives_its_gpus_back() {
        let mut table = TaskTable::default();
        table.offer_gpus(&[gpu("GPU-1")]);
        table.start("a", CancellationToken::new());
        assert_eq!(table.take_gpus("a", 1).unwrap().len(), 1);
        table.start("b", CancellationToken::new());
        assert!(table.take_gpus("b", 1).is_err());
        table.ended("a");
        assert_eq!(table.take_gpus("b", 1).unwrap().len(), 1);
    }
}
