//! `kubectl-kommune`: found by kubectl on PATH, run as `kubectl kommune <subcommand>`.

use clap::{Parser, Subcommand};

/// Kommune from kubectl: what the pool is doing, with your own Kubernetes permissions.
#[derive(Parser)]
#[command(name = "kubectl kommune", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// One variant per subcommand; `logs`, `results` and `get` (issue 17) join here.
#[derive(Subcommand)]
enum Command {
    /// Opens the operator's read-only dashboard on a local port (port-forward plus a local
    /// proxy that signs requests with your kubeconfig's credentials).
    Dashboard(kubectl_kommune::dashboard::DashboardArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Dashboard(args) => kubectl_kommune::dashboard::run(args).await,
    }
}
