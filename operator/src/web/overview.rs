//! What the dashboard shows, computed from plain facts: the pool by region, jobs, providers and
//! recent failures, cut down to what the caller may `get`. Pure: no kube, no store, no clock.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// One provider machine as the operator holds it (fleet, store and ledger joined).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProviderFacts {
    pub name: String,
    pub owner: String,
    /// `topology.kubernetes.io/region`, empty when the agent gave none.
    pub region: String,
    pub ready: bool,
    pub cordoned: bool,
    pub paused: bool,
    pub capacity_cpu_millis: u64,
    pub capacity_memory_bytes: u64,
    pub used_cpu_millis: u64,
    pub used_memory_bytes: u64,
    pub running: u32,
    /// Laplace-smoothed success rate in thousandths.
    pub reputation: u16,
    pub succeeded: u64,
    pub failed: u64,
    /// Pending earnings from the ledger, in micro-credits.
    pub earned_micros: u64,
    pub receipts: u64,
    /// Earnings per hour bucket (bucket start Unix ms, micro-credits), oldest first.
    pub earnings: Vec<(i64, u64)>,
}

/// One ComputeJob as its status says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobFacts {
    pub namespace: String,
    pub name: String,
    pub phase: String,
    pub runtime: String,
    pub total: u32,
    pub pending: u32,
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// Credits metered so far, as the status writes them ("0.000123").
    pub cost: String,
    pub budget: Option<String>,
    /// Why it waits or failed: the message of its `Scheduled=False` or `Failed=True` condition.
    pub blocked: Option<String>,
    pub failures: Vec<FailureFacts>,
}

/// A failed task attempt from a job's `status.recentResults`. Flattened into the page's JSON, so
/// it needs the page's field names itself (`exitCode`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureFacts {
    pub index: u32,
    pub attempt: u32,
    pub node: String,
    pub exit_code: i32,
    pub message: String,
}

/// What the caller may see, from SubjectAccessReviews: `list computejobs` cluster-wide or in
/// some namespaces, and `list providernodes`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub all_jobs: bool,
    pub job_namespaces: BTreeSet<String>,
    pub providers: bool,
}

impl Access {
    /// Nothing at all: the caller gets 403, not an empty page.
    pub fn is_none(&self) -> bool {
        !self.all_jobs && self.job_namespaces.is_empty() && !self.providers
    }

    fn sees_job(&self, namespace: &str) -> bool {
        self.all_jobs || self.job_namespaces.contains(namespace)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    /// Whether the caller may see providers (and so the pool); jobs are filtered per namespace.
    pub providers_visible: bool,
    pub regions: Vec<RegionView>,
    pub jobs: Vec<JobView>,
    pub providers: Vec<ProviderView>,
    pub failures: Vec<FailureView>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionView {
    pub region: String,
    pub nodes: u32,
    pub ready: u32,
    pub running: u32,
    pub cpu_millis: u64,
    pub used_cpu_millis: u64,
    pub memory_bytes: u64,
    pub used_memory_bytes: u64,
    /// Allocated CPU of the region's ready nodes over their capacity, in percent (0..=100).
    pub cpu_percent: u32,
    pub memory_percent: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub namespace: String,
    pub name: String,
    pub phase: String,
    pub runtime: String,
    pub total: u32,
    pub pending: u32,
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// Finished tasks (succeeded or failed) over all, in percent.
    pub percent: u32,
    pub cost: String,
    pub budget: Option<String>,
    pub blocked: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderView {
    pub name: String,
    pub owner: String,
    pub region: String,
    /// Ready, NotReady, Cordoned or Paused.
    pub state: String,
    pub running: u32,
    pub cpu_percent: u32,
    /// Reputation as a success rate, 0.000..1.000.
    pub reputation: String,
    pub succeeded: u64,
    pub failed: u64,
    pub earned: String,
    pub receipts: u64,
    pub earnings: Vec<EarningsPoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EarningsPoint {
    pub hour_ms: i64,
    pub credits: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureView {
    pub namespace: String,
    pub job: String,
    #[serde(flatten)]
    pub failure: FailureFacts,
}

/// Most failures listed: the page is a glance, `kubectl describe` has the rest.
pub const MAX_FAILURES: usize = 50;

/// Builds the dashboard's view of `jobs` and `providers` for a caller with `access`.
pub fn overview(providers: &[ProviderFacts], jobs: &[JobFacts], access: &Access) -> Overview {
    let mut out = Overview { providers_visible: access.providers, ..Overview::default() };
    if access.providers {
        out.regions = regions(providers);
        out.providers = providers.iter().map(provider_view).collect();
        out.providers.sort_by(|a, b| a.region.cmp(&b.region).then(a.name.cmp(&b.name)));
    }
    let mut visible: Vec<&JobFacts> = jobs.iter().filter(|j| access.sees_job(&j.namespace)).collect();
    visible.sort_by(|a, b| a.namespace.cmp(&b.namespace).then(a.name.cmp(&b.name)));
    out.jobs = visible.iter().map(|j| job_view(j)).collect();
    out.failures = visible
        .iter()
        .flat_map(|j| j.failures.iter().map(|f| FailureView { namespace: j.namespace.clone(), job: j.name.clone(), failure: f.clone() }))
        .take(MAX_FAILURES)
        .collect();
    out
}

fn percent(part: u64, whole: u64) -> u32 {
    (part.min(whole) * 100).checked_div(whole).map_or(0, |p| p as u32)
}

/// Credits from micro-credits with six decimals, as the ledger and the job status print them.
pub fn credits(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

fn regions(providers: &[ProviderFacts]) -> Vec<RegionView> {
    let mut by: BTreeMap<&str, RegionView> = BTreeMap::new();
    for p in providers {
        let name = if p.region.is_empty() { "(no region)" } else { p.region.as_str() };
        let r = by.entry(name).or_insert_with(|| RegionView { region: name.to_string(), ..RegionView::default() });
        r.nodes += 1;
        r.running += p.running;
        // Utilization is of what can be used: a NotReady or cordoned machine offers nothing.
        if p.ready && !p.cordoned && !p.paused {
            r.ready += 1;
            r.cpu_millis += p.capacity_cpu_millis;
            r.memory_bytes += p.capacity_memory_bytes;
        }
        r.used_cpu_millis += p.used_cpu_millis;
        r.used_memory_bytes += p.used_memory_bytes;
    }
    by.into_values()
        .map(|mut r| {
            r.cpu_percent = percent(r.used_cpu_millis, r.cpu_millis);
            r.memory_percent = percent(r.used_memory_bytes, r.memory_bytes);
            r
        })
        .collect()
}

fn provider_view(p: &ProviderFacts) -> ProviderView {
    let state = match (p.ready, p.cordoned, p.paused) {
        (false, _, _) => "NotReady",
        (true, true, _) => "Cordoned",
        (true, false, true) => "Paused",
        (true, false, false) => "Ready",
    };
    ProviderView {
        name: p.name.clone(),
        owner: p.owner.clone(),
        region: p.region.clone(),
        state: state.into(),
        running: p.running,
        cpu_percent: percent(p.used_cpu_millis, p.capacity_cpu_millis),
        reputation: format!("{}.{:03}", p.reputation / 1000, p.reputation % 1000),
        succeeded: p.succeeded,
        failed: p.failed,
        earned: credits(p.earned_micros),
        receipts: p.receipts,
        earnings: p.earnings.iter().map(|&(hour_ms, m)| EarningsPoint { hour_ms, credits: credits(m) }).collect(),
    }
}

fn job_view(j: &JobFacts) -> JobView {
    JobView {
        namespace: j.namespace.clone(),
        name: j.name.clone(),
        phase: j.phase.clone(),
        runtime: j.runtime.clone(),
        total: j.total,
        pending: j.pending,
        running: j.running,
        succeeded: j.succeeded,
        failed: j.failed,
        percent: percent(u64::from(j.succeeded) + u64::from(j.failed), u64::from(j.total)),
        cost: j.cost.clone(),
        budget: j.budget.clone(),
        blocked: j.blocked.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(name: &str, region: &str, cpu: u64, used: u64) -> ProviderFacts {
        ProviderFacts {
            name: name.into(),
            region: region.into(),
            ready: true,
            capacity_cpu_millis: cpu,
            used_cpu_millis: used,
            reputation: 750,
            ..Default::default()
        }
    }

    fn job(ns: &str, name: &str, total: u32, succeeded: u32) -> JobFacts {
        JobFacts { namespace: ns.into(), name: name.into(), phase: "Running".into(), total, succeeded, ..Default::default() }
    }

    fn everything() -> Access {
        Access { all_jobs: true, providers: true, ..Access::default() }
    }

    #[test]
    fn regions_sum_the_ready_capacity_and_what_is_allocated() {
        let mut down = provider("c", "eu", 8000, 0);
        down.ready = false;
        let ps = [provider("a", "eu", 4000, 1000), provider("b", "eu", 4000, 3000), down, provider("d", "", 2000, 0)];
        let o = overview(&ps, &[], &everything());
        assert_eq!(o.regions.len(), 2);
        let eu = o.regions.iter().find(|r| r.region == "eu").unwrap();
        assert_eq!((eu.nodes, eu.ready, eu.cpu_millis, eu.used_cpu_millis, eu.cpu_percent), (3, 2, 8000, 4000, 50));
        assert_eq!(o.regions.iter().find(|r| r.region == "(no region)").unwrap().cpu_percent, 0);
        assert_eq!(o.providers.iter().find(|p| p.name == "c").unwrap().state, "NotReady");
        assert_eq!(o.providers[0].reputation, "0.750");
    }

    #[test]
    fn jobs_are_cut_to_the_namespaces_the_caller_may_list() {
        let mut failing = job("team-b", "y", 4, 1);
        failing.failures.push(FailureFacts { index: 2, attempt: 3, node: "a".into(), exit_code: 1, message: "exit status 1".into() });
        let jobs = [job("team-a", "x", 10, 5), failing];
        let access = Access { job_namespaces: ["team-a".to_string()].into(), ..Access::default() };
        let o = overview(&[provider("a", "eu", 1000, 0)], &jobs, &access);
        assert_eq!(o.jobs.len(), 1);
        assert_eq!((o.jobs[0].name.as_str(), o.jobs[0].percent), ("x", 50));
        assert!(o.failures.is_empty(), "a failure of a hidden job must not leak");
        assert!(o.providers.is_empty() && o.regions.is_empty() && !o.providers_visible);

        let o = overview(&[], &jobs, &everything());
        assert_eq!(o.failures.len(), 1);
        assert_eq!((o.failures[0].job.as_str(), o.failures[0].failure.message.as_str()), ("y", "exit status 1"));
    }

    #[test]
    fn a_failure_goes_to_the_page_with_the_field_names_its_script_reads() {
        let f = FailureView {
            namespace: "team-b".into(),
            job: "y".into(),
            failure: FailureFacts { index: 2, attempt: 3, node: "a".into(), exit_code: 1, message: "exit status 1".into() },
        };
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"namespace": "team-b", "job": "y", "index": 2, "attempt": 3, "node": "a", "exitCode": 1, "message": "exit status 1"})
        );
    }

    #[test]
    fn nothing_granted_is_no_access() {
        assert!(Access::default().is_none());
        assert!(!Access { providers: true, ..Access::default() }.is_none());
    }

    #[test]
    fn credits_print_six_decimals() {
        assert_eq!(credits(1_234_567), "1.234567");
        assert_eq!(credits(5), "0.000005");
    }

    #[test]
    fn overused_capacity_caps_at_full() {
        let o = overview(&[provider("a", "eu", 1000, 3000)], &[], &everything());
        assert_eq!(o.regions[0].cpu_percent, 100);
    }
}
