//! `kubectl kommune logs JOB [--task N] [--follow]`: a task's stdout and stderr from the
//! operator's output store (live while it runs, with --follow), or the status' tail.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use kommune_operator::crd::ComputeJob;
use kommune_operator::outputs::OutputEntry;
use kube::Api;
use std::io::Write as _;

use crate::api::{self, ApiError, Fetched, Live};
use crate::connect::OperatorArgs;
use crate::follow::{Printed, print_stream};
use crate::get::task_finished;

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The ComputeJob.
    pub job: String,
    /// Its namespace (default: your kubeconfig context's).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// The task index.
    #[arg(long, default_value_t = 0)]
    pub task: u32,
    /// While the task runs, print its running attempt's stdout and stderr as the operator
    /// receives them from the provider (the first 1 MiB of each, a claim like every result
    /// until stored); when it has finished, the rest of its stored logs. With an operator
    /// that serves no live logs: wait until the task has finished, then print them.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// How often --follow looks at the job, in seconds.
    #[arg(long, default_value_t = 2)]
    pub poll_seconds: u64,
    #[command(flatten)]
    pub operator: OperatorArgs,
}

/// What `logs` prints for a task, chosen from the listing: stdout then stderr of the listed
/// attempt (the accepted one once the task has finished).
pub fn log_entries(items: &[OutputEntry], task: u32) -> Vec<&OutputEntry> {
    ["stdout", "stderr"].iter().filter_map(|n| items.iter().find(|e| e.task_index == task && e.name == *n)).collect()
}

/// The fallback when no outputs are stored: the newest stdout tail of the task in the status.
pub fn status_tail(job: &ComputeJob, task: u32) -> Option<String> {
    let r = job.status.as_ref()?.recent_results.iter().find(|r| r.index == task)?;
    let mut text = format!("(from the job's status: attempt {} on {}, exit {}; the last bytes of stdout only)\n", r.attempt, r.node, r.exit_code);
    text.push_str(&r.stdout_tail);
    if !r.message.is_empty() {
        text.push_str(&format!("\n(attempt failed: {})", r.message));
    }
    Some(text)
}

pub async fn run(args: LogsArgs) -> anyhow::Result<()> {
    let config = kube::Config::infer().await.context("cannot load your kubeconfig")?;
    let namespace = args.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let jobs: Api<ComputeJob> = Api::namespaced(kube::Client::try_from(config.clone())?, &namespace);
    let get = || async { jobs.get(&args.job).await.with_context(|| format!("cannot get computejob {namespace}/{}", args.job)) };
    let mut job = get().await?;
    if args.task >= job.spec.tasks {
        anyhow::bail!("{namespace}/{} has tasks 0 to {}; there is no task {}", args.job, job.spec.tasks.saturating_sub(1), args.task);
    }
    let operator = args.operator.connect(config).await?;
    let mut printed = Printed::default();
    if args.follow {
        let mut said = String::new();
        let mut live = true;
        while !task_finished(&job, args.task) {
            if live {
                match api::follow_logs(&operator.client, &namespace, &args.job, args.task).await {
                    Ok(Live::Stream(body)) => {
                        print_stream(body, &mut printed).await?;
                        job = get().await?;
                        continue;
                    }
                    // Not started yet, or between attempts: asked again after the wait.
                    Ok(Live::NotRunning(_)) => {}
                    Ok(Live::NotOffered(why)) => {
                        eprintln!("no live logs ({why}); the logs are printed when the task has finished");
                        live = false;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let now = format!(
                "waiting for task {} of {namespace}/{} to finish ({})",
                args.task,
                args.job,
                job.status.as_ref().and_then(|s| s.progress.clone()).unwrap_or_default()
            );
            if now != said {
                eprintln!("{now}");
                said = now;
            }
            tokio::time::sleep(Duration::from_secs(args.poll_seconds.max(1))).await;
            job = get().await?;
        }
    }
    print_logs(&operator.client, &job, &namespace, &args.job, args.task, &printed).await
}

/// Prints the task's stored stdout to stdout and stderr to stderr; falls back to the status'
/// tail when the operator stores no outputs or has none for the task. What `printed` shows
/// was printed live already is skipped.
pub async fn print_logs(client: &kube::Client, job: &ComputeJob, namespace: &str, name: &str, task: u32, printed: &Printed) -> anyhow::Result<()> {
    let fallback = |why: String| -> anyhow::Result<()> {
        match status_tail(job, task) {
            Some(tail) => {
                eprintln!("{why}");
                println!("{tail}");
                Ok(())
            }
            None => anyhow::bail!("{why}, and the job's status has no result of task {task} yet"),
        }
    };
    let listing = match api::list_outputs(client, namespace, name).await {
        Ok(l) => l,
        Err(ApiError::Unavailable(why)) => return fallback(format!("no stored logs ({why})")),
        Err(e) => return Err(e.into()),
    };
    let entries = log_entries(&listing.items, task);
    if entries.is_empty() {
        return fallback(format!("task {task} has no stored logs"));
    }
    if printed.attempt.as_ref().is_some_and(|a| entries.iter().any(|e| &e.attempt_id != a)) {
        eprintln!("(the task's logs are those of attempt {}, not the one followed live; printed whole)", entries[0].attempt_id);
    }
    for e in entries {
        let mut skip = printed.already(&e.attempt_id, &e.name);
        let body = match api::open_output(client, namespace, name, task, &e.name).await? {
            Fetched::Body(b) => b,
            Fetched::Redirect(url) => api::fetch_url(&url).await?,
        };
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let mut chunk = chunk.with_context(|| format!("the {} of task {task} broke off", e.name))?;
            let drop = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
            let _ = chunk.split_to(drop);
            skip -= drop as u64;
            // Chunks are small and a terminal takes them at once: blocking writes are fine here.
            if e.name == "stderr" {
                std::io::stderr().write_all(&chunk)?;
            } else {
                std::io::stdout().write_all(&chunk)?;
            }
        }
        if e.excess_bytes > 0 {
            eprintln!("({} of task {task}: {} more bytes were produced than stored)", e.name, e.excess_bytes);
        }
    }
    std::io::stdout().flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(task: u32, name: &str) -> OutputEntry {
        OutputEntry { task_index: task, attempt_id: "a".into(), name: name.into(), size: 1, sha256: "00".into(), excess_bytes: 0 }
    }

    #[test]
    fn logs_are_the_task_s_stdout_then_stderr() {
        let items = [entry(0, "out/x"), entry(0, "stderr"), entry(0, "stdout"), entry(1, "stdout")];
        let names: Vec<_> = log_entries(&items, 0).iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["stdout", "stderr"]);
        assert!(log_entries(&items, 2).is_empty());
    }

    #[test]
    fn the_fallback_is_the_newest_tail_of_that_task() {
        let job: ComputeJob = serde_yaml::from_str(
            "apiVersion: kommune.dev/v1alpha1\nkind: ComputeJob\nmetadata: {name: j, namespace: n}\nspec: {tasks: 2, workload: {exec: {command: [/bin/true]}}}\nstatus:\n  recentResults:\n    - {index: 1, attempt: 2, node: pn-b, exitCode: 0, stdoutTail: \"second\"}\n    - {index: 1, attempt: 1, node: pn-a, exitCode: 1, stdoutTail: \"first\", message: boom}\n",
        )
        .unwrap();
        let tail = status_tail(&job, 1).unwrap();
        assert!(tail.contains("attempt 2 on pn-b") && tail.ends_with("second"), "{tail}");
        assert_eq!(status_tail(&job, 0), None);
    }
}
