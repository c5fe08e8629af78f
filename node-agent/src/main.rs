//! `kommune-agent`: join a Kommune pool and run its tasks on this machine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kommune_agent::inventory::{self, Caps, Offered};
use kommune_agent::join::{self, JoinOptions};
use kommune_agent::receipts::{self, Receipts};
use kommune_agent::runtime::{ContainerRuntime, ExecRuntime, WasmRuntime};
use kommune_agent::session;
use kommune_agent::state::{self, AgentState};
use kommune_agent::tasks::{Spool, Tasks};
use kommune_proto::quantity;
use kommune_proto::v1::NodeFacts;

/// Lend this machine to a Kommune compute pool.
///
/// First `join` once with the token your cluster admin gave you, then keep `run` going (for
/// example as a systemd service). The agent only ever dials out, so it works behind NAT.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Joins this machine to a pool: pins the operator's CA from the token, creates this node's
    /// key and certificate, and stores them in the state directory.
    Join(JoinArgs),
    /// Connects to the operator and runs assigned tasks until interrupted (Ctrl-C).
    Run(RunArgs),
    /// Shows this machine's node, whether its agent runs and is connected, what it offers and
    /// which tasks it runs.
    Status(StateArgs),
    /// Stops taking new tasks (running ones finish); the operator places work elsewhere.
    Pause(StateArgs),
    /// Takes new tasks again after `pause`.
    Resume(StateArgs),
    /// Leaves the pool for good: the operator removes this node and moves its running tasks
    /// elsewhere, and the identity in the state directory is deleted.
    Leave(LeaveArgs),
    /// Lists this machine's signed usage receipts: what each finished task used, whether the
    /// operator acknowledged it, and the credits it was priced at.
    Earnings(EarningsArgs),
}

#[derive(Args)]
struct EarningsArgs {
    #[command(flatten)]
    state: StateArgs,
    /// Print one JSON object per receipt instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StateArgs {
    /// Where `join` stored this node's identity.
    #[arg(long, default_value_os_t = state::default_dir())]
    state_dir: PathBuf,
}

#[derive(Args)]
struct LeaveArgs {
    #[command(flatten)]
    state: StateArgs,
    /// Leave even if finished results are not acknowledged yet (they are lost).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct JoinArgs {
    /// The operator's agent gateway, e.g. https://203.0.113.7:30443.
    #[arg(long, env = "KOMMUNE_SERVER")]
    server: String,
    /// The join token from `kommune-operator token create` (kmn1.<id>.<secret>.<ca-hash>).
    #[arg(long, env = "KOMMUNE_TOKEN", hide_env_values = true)]
    token: String,
    /// Name for this machine in the pool (lowercase letters, digits, '-'); default: chosen by
    /// the operator.
    #[arg(long)]
    name: Option<String>,
    /// Region this machine is in (shown to schedulers and users), e.g. eu-west.
    #[arg(long, default_value = "")]
    region: String,
    /// Zone this machine is in.
    #[arg(long, default_value = "")]
    zone: String,
    /// Where the node key, certificates and spooled results live.
    #[arg(long, default_value_os_t = state::default_dir())]
    state_dir: PathBuf,
    /// Replace an existing identity in the state directory.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Where `join` stored this node's identity.
    #[arg(long, default_value_os_t = state::default_dir())]
    state_dir: PathBuf,
    /// Also run `exec` tasks: plain commands on this machine, outside the wasm sandbox. Only
    /// for machines and job submitters you trust.
    #[arg(long)]
    allow_exec: bool,
    /// Also run `container` tasks through this Docker or Podman Engine API socket, e.g.
    /// /var/run/docker.sock or $XDG_RUNTIME_DIR/podman/podman.sock. Offered only if the socket
    /// exists when the agent starts. Containers run pinned images with no privileges, no
    /// capabilities, a read-only root filesystem and no network.
    #[arg(long, value_name = "PATH")]
    container_socket: Option<PathBuf>,
    /// Give containers a network when their job asks for it (default: never).
    #[arg(long)]
    allow_container_network: bool,
    /// At most this much CPU is offered, e.g. 2 or 1500m (default: all cores).
    #[arg(long, value_parser = parse_cpu)]
    cpus: Option<u64>,
    /// At most this much memory is offered, e.g. 4Gi (default: all memory).
    #[arg(long, value_parser = parse_memory)]
    memory: Option<u64>,
}

fn parse_cpu(s: &str) -> Result<u64, String> {
    quantity::cpu_millis("--cpus", s).map_err(|e| e.to_string())
}

fn parse_memory(s: &str) -> Result<u64, String> {
    quantity::memory_bytes("--memory", s).map_err(|e| e.to_string())
}

fn facts(caps: &Caps, offered: Offered, region: &str, zone: &str) -> NodeFacts {
    NodeFacts {
        capacity: Some(inventory::capacity(inventory::measure(), caps, offered)),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        region: region.to_string(),
        zone: zone.to_string(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _telemetry = kommune_telemetry::init("kommune-agent");
    let result = match cli.command {
        Command::Join(a) => join_cmd(a).await,
        Command::Run(a) => run_cmd(a).await,
        Command::Status(a) => status_cmd(a),
        Command::Pause(a) => pause_cmd(a, true),
        Command::Resume(a) => pause_cmd(a, false),
        Command::Leave(a) => leave_cmd(a).await,
        Command::Earnings(a) => earnings_cmd(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", kommune_agent::connect::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn join_cmd(a: JoinArgs) -> anyhow::Result<()> {
    let state = join::join(JoinOptions {
        server: &a.server,
        token: &a.token,
        name: a.name.as_deref(),
        region: &a.region,
        zone: &a.zone,
        state_dir: &a.state_dir,
        force: a.force,
        facts: facts(&Caps::default(), Offered::default(), &a.region, &a.zone),
    })
    .await?;
    println!("joined as {} (state in {})", state.config.node_name, state.dir.display());
    println!("next: kommune-agent run --state-dir {}", state.dir.display());
    Ok(())
}

async fn run_cmd(a: RunArgs) -> anyhow::Result<()> {
    let state = AgentState::load(&a.state_dir)?;
    let caps = Caps { cpu_millis: a.cpus, memory_bytes: a.memory };
    let container = match a.container_socket {
        Some(socket) if socket.exists() => Some(ContainerRuntime::new(socket, a.allow_container_network)),
        Some(socket) => {
            tracing::warn!(socket = %socket.display(), "no Docker/Podman socket there; container tasks are not offered");
            None
        }
        None => None,
    };
    let offered = Offered { exec: a.allow_exec, container: container.is_some() };
    let facts = facts(&caps, offered, &state.config.region, &state.config.zone);
    let wasm = WasmRuntime::new()?;
    let spool = Spool::open(state.results_dir())?;
    let (tasks, mut updates) = Tasks::with_container(wasm, ExecRuntime::new(a.allow_exec), container, spool, state.scratch_dir());
    let key = kommune_proto::receipt::signing_key_from_pem(&state.key_pem).map_err(|e| anyhow::anyhow!("{}: {e}", state.dir.join("node.key").display()))?;
    let receipts = Receipts::start(state.receipts_dir(), &state.config.node_name, key)
        .map_err(|e| anyhow::anyhow!("cannot start the receipt epoch in {}: {e}", state.receipts_dir().display()))?;
    tracing::info!(epoch = receipts.epoch(), "usage receipts are signed with the node key");
    tasks.sign_receipts(receipts);
    tracing::info!(node = %state.config.node_name, server = %state.config.server, exec = a.allow_exec, container = offered.container, "agent starting");
    session::run(&state, &facts, &tasks, &mut updates, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

fn earnings_cmd(a: EarningsArgs) -> anyhow::Result<()> {
    let state = AgentState::load(&a.state.state_dir)?;
    let spooled = Spool::open(state.results_dir())?.all();
    let records = receipts::history(&state.receipts_dir(), &spooled);
    if a.json {
        for r in &records {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", receipts::render(&state.config.node_name, &records));
    }
    Ok(())
}

fn status_cmd(a: StateArgs) -> anyhow::Result<()> {
    let state = AgentState::load(&a.state_dir)?;
    let status = kommune_agent::status::AgentStatus::load(&state.dir);
    // Linux tells whether the writer still runs; elsewhere the file's age decides.
    let alive = status.as_ref().is_none_or(|s| !std::path::Path::new("/proc/self").exists() || std::path::Path::new(&format!("/proc/{}", s.pid)).exists());
    print!("{}", kommune_agent::status::render(&state.config.node_name, &state.config.server, status.as_ref(), alive, kommune_agent::status::now_ms()));
    Ok(())
}

async fn leave_cmd(a: LeaveArgs) -> anyhow::Result<()> {
    let state = AgentState::load(&a.state.state_dir)?;
    let left = kommune_agent::leave::leave(&state, a.force).await?;
    println!(
        "{} left the pool; {} running task(s) will run elsewhere. The identity in {} is deleted.",
        left.node_name,
        left.moved_attempts,
        state.dir.display()
    );
    Ok(())
}

fn pause_cmd(a: StateArgs, paused: bool) -> anyhow::Result<()> {
    let state = AgentState::load(&a.state_dir)?;
    state.set_paused(paused)?;
    if paused {
        println!("{} is paused: running tasks finish, no new ones are placed here. `kommune-agent resume` undoes it.", state.config.node_name);
    } else {
        println!("{} takes new tasks again.", state.config.node_name);
    }
    Ok(())
}
