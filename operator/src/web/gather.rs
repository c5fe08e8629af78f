//! Collects the dashboard's facts from what the operator already holds: the fleet's pool, the
//! attempt store's outcomes, the ledger's earnings and a watch-fed cache of ComputeJobs.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use super::Source;
use super::overview::{FailureFacts, JobFacts, ProviderFacts};
use crate::crd::ComputeJob;
use crate::dispatch::Dispatcher;
use crate::scheduler::REGION_LABEL;

/// Hours of earnings shown per provider.
pub const EARNINGS_HOURS: i64 = 24;

/// The production [`Source`].
pub struct OperatorSource {
    pub dispatcher: Arc<Dispatcher>,
    pub jobs: Store<ComputeJob>,
}

impl Source for OperatorSource {
    fn facts(&self) -> BoxFuture<'_, Result<super::Facts, String>> {
        Box::pin(async move {
            let mut providers = pool_facts(&self.dispatcher);
            let outcomes = self.dispatcher.store().outcomes_by_node().await.map_err(|e| format!("cannot read the attempt store: {e}"))?;
            let outcomes: BTreeMap<String, (u64, u64)> = outcomes.into_iter().map(|(n, s, f)| (n, (s, f))).collect();
            let since = kommune_proto::now_ms() - EARNINGS_HOURS * kommune_store::ledger::series::HOUR_MS;
            let mut series = match self.dispatcher.ledger() {
                Some(l) => l.earnings_by_hour(since).await.map_err(|e| format!("cannot read the ledger: {e}"))?,
                None => BTreeMap::new(),
            };
            for p in &mut providers {
                if let Some(&(s, f)) = outcomes.get(&p.name) {
                    (p.succeeded, p.failed) = (s, f);
                }
                if let Some(l) = self.dispatcher.ledger() {
                    let e = l.node_earnings(&p.name).await.map_err(|e| format!("cannot read the ledger: {e}"))?;
                    (p.earned_micros, p.receipts) = (e.pending.0, e.receipts);
                }
                p.earnings = series.remove(&p.name).unwrap_or_default();
            }
            let jobs = self.jobs.state().iter().map(|j| job_facts(j)).collect();
            Ok((providers, jobs))
        })
    }
}

/// The pool's nodes with what is allocated on each, from the scheduler's own index.
pub fn pool_facts(dispatcher: &Dispatcher) -> Vec<ProviderFacts> {
    let pool = dispatcher.fleet().pool();
    pool.nodes()
        .map(|n| {
            let a = pool.allocation(&n.name);
            ProviderFacts {
                name: n.name.clone(),
                owner: n.owner.clone(),
                region: n.labels.get(REGION_LABEL).cloned().unwrap_or_default(),
                ready: n.ready,
                cordoned: n.cordoned,
                paused: n.paused,
                capacity_cpu_millis: n.capacity.cpu_millis,
                capacity_memory_bytes: n.capacity.memory_bytes,
                used_cpu_millis: a.resources.cpu_millis,
                used_memory_bytes: a.resources.memory_bytes,
                running: a.running,
                reputation: n.reputation.0,
                ..ProviderFacts::default()
            }
        })
        .collect()
}

/// A ComputeJob's status as the dashboard's facts; a job without status is Pending.
pub fn job_facts(job: &ComputeJob) -> JobFacts {
    let mut f = JobFacts {
        namespace: job.namespace().unwrap_or_default(),
        name: job.name_any(),
        phase: "Pending".into(),
        total: job.spec.tasks,
        ..JobFacts::default()
    };
    let Some(s) = &job.status else { return f };
    if let Some(p) = s.phase {
        f.phase = format!("{p:?}");
    }
    f.runtime = s.runtime.clone().unwrap_or_default();
    if s.tasks.total > 0 {
        f.total = s.tasks.total;
    }
    (f.pending, f.running, f.succeeded, f.failed) = (s.tasks.pending, s.tasks.running, s.tasks.succeeded, s.tasks.failed);
    if let Some(u) = &s.usage {
        f.cost = u.cost.clone();
        f.budget = u.budget.clone();
    }
    f.blocked = s
        .conditions
        .iter()
        .find(|c| (c.type_ == "Scheduled" && c.status == "False") || (c.type_ == "Failed" && c.status == "True"))
        .map(|c| format!("{}: {}", c.reason, c.message));
    f.failures = s
        .recent_results
        .iter()
        .filter(|r| r.exit_code != 0 || !r.message.is_empty())
        .map(|r| FailureFacts { index: r.index, attempt: r.attempt, node: r.node.clone(), exit_code: r.exit_code, message: r.message.clone() })
        .collect();
    f
}
