//! `kubectl-kommune`: found by kubectl on PATH, run as `kubectl kommune <subcommand>`.

use clap::{Parser, Subcommand};

/// Kommune from kubectl: what the pool is doing, with your own Kubernetes permissions.
#[derive(Parser)]
#[command(name = "kubectl kommune", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// One variant per subcommand.
#[derive(Subcommand)]
enum Command {
    /// A readable summary of a ComputeJob: progress, where its tasks ran, cost, verification
    /// and what blocks it.
    Get(kubectl_kommune::get::GetArgs),
    /// A task's stdout and stderr (its accepted or latest attempt), from the operator's
    /// output store, or the tail in the job's status when outputs are not stored.
    Logs(kubectl_kommune::logs::LogsArgs),
    /// Downloads every output of a job into DIR/task-N/NAME, each checked against its sha256.
    Results(kubectl_kommune::results::ResultsArgs),
    /// Opens the operator's read-only dashboard on a local port (port-forward plus a local
    /// proxy that signs requests with your kubeconfig's credentials).
    Dashboard(kubectl_kommune::dashboard::DashboardArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Dashboard(args) => kubectl_kommune::dashboard::run(args).await,
        Command::Get(args) => kubectl_kommune::get::run(args).await,
        Command::Logs(args) => kubectl_kommune::logs::run(args).await,
        Command::Results(args) => kubectl_kommune::results::run(args).await,
    }
}
