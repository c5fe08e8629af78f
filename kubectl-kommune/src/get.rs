//! `kubectl kommune get JOB`: a readable summary of a ComputeJob's status (progress, where its
//! tasks ran, cost, verification, what blocks it), read from the API server as the user.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context as _;
use kommune_operator::crd::{ComputeJob, JobPhase};
use kube::Api;

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// The ComputeJob.
    pub job: String,
    /// Its namespace (default: your kubeconfig context's).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

pub async fn run(args: GetArgs) -> anyhow::Result<()> {
    let config = kube::Config::infer().await.context("cannot load your kubeconfig")?;
    let namespace = args.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config)?;
    let job =
        Api::<ComputeJob>::namespaced(client, &namespace).get(&args.job).await.with_context(|| format!("cannot get computejob {namespace}/{}", args.job))?;
    print!("{}", summary(&job));
    Ok(())
}

/// Parses compact index ranges ("0-3,7"), as `status.completedIndexes` holds them; None when
/// malformed.
pub fn parse_ranges(s: &str) -> Option<Vec<u32>> {
    let mut out = vec![];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if a > b || b - a > 1_000_000 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// Whether task `index` has finished (succeeded or used up its attempts), or the job has.
pub fn task_finished(job: &ComputeJob, index: u32) -> bool {
    let Some(status) = &job.status else { return false };
    let listed = |r: &Option<String>| r.as_deref().and_then(parse_ranges).is_some_and(|v| v.contains(&index));
    matches!(status.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) || listed(&status.completed_indexes) || listed(&status.failed_indexes)
}

fn percent(part: u32, total: u32) -> u32 {
    if total == 0 { 0 } else { (u64::from(part) * 100 / u64::from(total)) as u32 }
}

/// The summary `get` prints.
pub fn summary(job: &ComputeJob) -> String {
    let mut out = String::new();
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let ns = job.metadata.namespace.as_deref().unwrap_or_default();
    let status = job.status.clone().unwrap_or_default();
    let phase = status.phase.as_ref().map_or("Pending (not reconciled yet)".to_string(), |p| format!("{p:?}"));
    let _ = writeln!(out, "Job:          {ns}/{name}");
    let runtime = status.runtime.as_deref().map(|r| format!("  (runtime {r})")).unwrap_or_default();
    let _ = writeln!(out, "Phase:        {phase}{runtime}");
    let t = &status.tasks;
    let total = if t.total == 0 { job.spec.tasks } else { t.total };
    let _ = writeln!(
        out,
        "Progress:     {}/{total} succeeded ({}%), {} running, {} pending, {} failed",
        t.succeeded,
        percent(t.succeeded, total),
        t.running,
        t.pending,
        t.failed
    );
    if let Some(done) = &status.completed_indexes {
        let _ = writeln!(out, "Completed:    {done}");
    }
    if let Some(failed) = &status.failed_indexes {
        let _ = writeln!(out, "Failed tasks: {failed}");
    }
    let mut nodes: BTreeMap<&str, u32> = BTreeMap::new();
    for r in &status.recent_results {
        *nodes.entry(r.node.as_str()).or_default() += 1;
    }
    if !nodes.is_empty() {
        let list: Vec<String> = nodes.iter().map(|(n, c)| format!("{n} ({c})")).collect();
        let _ = writeln!(out, "Ran on:       {}  (the last {} results)", list.join(", "), status.recent_results.len());
    }
    match &status.usage {
        Some(u) => {
            let budget = u.budget.as_deref().map(|b| format!(" of a {b} budget")).unwrap_or_default();
            let _ = writeln!(out, "Cost:         {} credits{budget}", u.cost);
            let _ = writeln!(
                out,
                "Usage:        {} CPU s, {} wall s, {} GiB-h, {} output bytes, {} receipts",
                u.cpu_seconds, u.wall_seconds, u.memory_gib_hours, u.output_bytes, u.receipts
            );
        }
        None => {
            let _ = writeln!(out, "Cost:         nothing metered yet");
        }
    }
    if let Some(v) = &status.verification {
        let c = &v.counts;
        let _ = writeln!(
            out,
            "Verification: {} verified, {} unverified, {} disputed; {} extra attempts ({}% overhead)",
            c.verified, c.unverified, c.disputed, c.extra_attempts, v.overhead_percent
        );
        for d in &v.disputes {
            let _ = writeln!(out, "  dispute:    {d}");
        }
    }
    // What blocks it: a condition that is not as a healthy job's would be.
    let blocking: Vec<_> =
        status.conditions.iter().filter(|c| matches!((c.type_.as_str(), c.status.as_str()), ("Valid" | "Scheduled", "False") | ("Failed", "True"))).collect();
    for c in &blocking {
        let _ = writeln!(out, "Blocked:      {}={} {}: {}", c.type_, c.status, c.reason, c.message);
    }
    if blocking.is_empty() && !matches!(status.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) && t.pending > 0 && t.running == 0 {
        let _ = writeln!(out, "Waiting:      {} tasks pending and none running", t.pending);
    }
    let failures: Vec<_> = status.recent_results.iter().filter(|r| !r.message.is_empty() || r.exit_code != 0).take(5).collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "Recent failures:");
        for r in failures {
            let _ = writeln!(out, "  task {} attempt {} on {}: exit {}: {}", r.index, r.attempt, r.node, r.exit_code, r.message);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(yaml: &str) -> ComputeJob {
        serde_yaml::from_str(yaml).unwrap()
    }

    const RUNNING: &str = r#"
apiVersion: kommune.dev/v1alpha1
kind: ComputeJob
metadata: {name: render, namespace: team-a}
spec: {tasks: 10, workload: {exec: {command: [/bin/true]}}}
status:
  phase: Running
  runtime: wasm
  tasks: {total: 10, pending: 2, running: 4, succeeded: 3, failed: 1}
  completedIndexes: "0-2"
  failedIndexes: "9"
  recentResults:
    - {index: 9, attempt: 3, node: pn-ohio-1, exitCode: 3, message: "exit status 3: out of input"}
    - {index: 2, attempt: 1, node: pn-berlin-1, exitCode: 0}
    - {index: 1, attempt: 1, node: pn-berlin-1, exitCode: 0}
  usage: {receipts: 6, cpuSeconds: "12.000", wallSeconds: "14.500", memoryGibHours: "0.001000", outputBytes: 2048, cost: "0.412000", budget: "5"}
  verification: {verified: 2, unverified: 1, disputed: 0, extraAttempts: 2, overheadPercent: "66.7"}
  conditions:
    - {type: Scheduled, status: "False", reason: Unschedulable, message: "no Ready provider in region eu-west", lastTransitionTime: "2026-01-01T00:00:00Z"}
"#;

    #[test]
    fn the_summary_says_progress_nodes_cost_verification_and_what_blocks() {
        let s = summary(&job(RUNNING));
        for want in [
            "Job:          team-a/render",
            "Phase:        Running  (runtime wasm)",
            "3/10 succeeded (30%), 4 running, 2 pending, 1 failed",
            "Completed:    0-2",
            "Ran on:       pn-berlin-1 (2), pn-ohio-1 (1)",
            "Cost:         0.412000 credits of a 5 budget",
            "2048 output bytes, 6 receipts",
            "2 verified, 1 unverified, 0 disputed; 2 extra attempts (66.7% overhead)",
            "Blocked:      Scheduled=False Unschedulable: no Ready provider in region eu-west",
            "task 9 attempt 3 on pn-ohio-1: exit 3: exit status 3: out of input",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
    }

    #[test]
    fn a_new_job_reads_as_pending_with_nothing_metered() {
        let s = summary(&job(
            "apiVersion: kommune.dev/v1alpha1\nkind: ComputeJob\nmetadata: {name: j, namespace: n}\nspec: {tasks: 4, workload: {exec: {command: [/bin/true]}}}\n",
        ));
        assert!(s.contains("Pending (not reconciled yet)") && s.contains("0/4 succeeded (0%)") && s.contains("nothing metered yet"), "{s}");
    }

    #[test]
    fn ranges_and_finished_tasks() {
        assert_eq!(parse_ranges("0-3,7"), Some(vec![0, 1, 2, 3, 7]));
        assert_eq!(parse_ranges(""), Some(vec![]));
        assert_eq!(parse_ranges("3-1"), None);
        assert_eq!(parse_ranges("x"), None);
        let j = job(RUNNING);
        assert!(task_finished(&j, 1) && task_finished(&j, 9));
        assert!(!task_finished(&j, 5));
    }
}
