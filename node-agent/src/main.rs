//! `kommune-agent`: join a Kommune pool and run its tasks on this machine.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use kommune_agent::account::{EarningsAccount, Payout};
use kommune_agent::availability::Gate;
use kommune_agent::cli::{Cli, Command, ConfigCommand, EarningsArgs, JoinArgs, LeaveArgs, RunArgs, SandboxExecArgs, StateArgs};
use kommune_agent::config::{self, FileSettings, RunSettings};
use kommune_agent::idle::{IdlePolicy, LoadSource, MachineLoad};
use kommune_agent::inventory::{self, Caps, Machine, Offered};
use kommune_agent::join::{self, JoinOptions};
use kommune_agent::receipts::{self, Receipts};
use kommune_agent::runtime::{ContainerRuntime, ExecRuntime, WasmRuntime};
use kommune_agent::session;
use kommune_agent::state::{self, AgentState};
use kommune_agent::tasks::{Spool, Tasks};
use kommune_agent::{earnings, schedule, status};
use kommune_ledger::statement_file::read_export;
use kommune_proto::quantity::{format_cpu, format_memory};
use kommune_proto::v1::NodeFacts;

fn facts(machine: &Machine, caps: &Caps, offered: Offered, region: &str, zone: &str) -> NodeFacts {
    NodeFacts {
        capacity: Some(inventory::capacity(machine, caps, offered)),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        region: region.to_string(),
        zone: zone.to_string(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The exec sandbox runs before any runtime starts: its supervisor waits for signals with
    // sigwait, which needs them blocked in every thread, and it must stay small and quiet.
    if let Command::SandboxExec(a) = cli.command {
        return sandbox_exec(a);
    }
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(agent(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn sandbox_exec(a: SandboxExecArgs) -> ExitCode {
    use kommune_agent::runtime::sandbox::{self, SandboxRequest};
    if a.probe {
        return ExitCode::from(sandbox::probe() as u8);
    }
    let Some(scratch) = a.scratch else { return ExitCode::from(sandbox::SANDBOX_FAILED as u8) };
    let request = SandboxRequest { scratch, allow_unsandboxed: a.allow_unsandboxed, command: a.command };
    if a.inner {
        sandbox::run_inner(&request);
    }
    ExitCode::from(sandbox::supervise(&request, &sandbox::own_binary()).clamp(0, 255) as u8)
}

async fn agent(cli: Cli) -> ExitCode {
    let _telemetry = kommune_telemetry::init("kommune-agent");
    let result = match cli.command {
        Command::Join(a) => join_cmd(a).await,
        Command::Run(a) => run_cmd(a).await,
        Command::Status(a) => status_cmd(a),
        Command::Pause(a) => pause_cmd(a, true),
        Command::Resume(a) => pause_cmd(a, false),
        Command::Leave(a) => leave_cmd(a).await,
        Command::Earnings(a) => earnings_cmd(a),
        Command::Config(ConfigCommand::Example) => {
            print!("{}", config::EXAMPLE);
            Ok(())
        }
        Command::Config(ConfigCommand::Check(a)) => settings(&a).map(|s| print!("{}", describe(&s))),
        Command::SandboxExec(_) => unreachable!("handled before the runtime starts"),
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
    let machine = inventory::measure(&a.state_dir);
    let state = join::join(JoinOptions {
        server: &a.server,
        token: &a.token,
        name: a.name.as_deref(),
        region: &a.region,
        zone: &a.zone,
        state_dir: &a.state_dir,
        force: a.force,
        facts: facts(&machine, &Caps::default(), Offered::default(), &a.region, &a.zone),
    })
    .await?;
    println!("joined as {} (state in {})", state.config.node_name, state.dir.display());
    println!("next: kommune-agent run --state-dir {}", state.dir.display());
    Ok(())
}

/// Flags over the config file over the defaults.
fn settings(a: &RunArgs) -> anyhow::Result<RunSettings> {
    let default_dir = state::default_dir();
    let file = FileSettings::load(a.config.as_deref(), a.state_dir.as_deref().unwrap_or(&default_dir))?;
    Ok(config::resolve(&a.flags(), file, default_dir)?)
}

/// What `config check` prints.
fn describe(s: &RunSettings) -> String {
    let or_all = |v: Option<String>| v.unwrap_or_else(|| "all".into());
    let idle = match &s.idle {
        Some(c) => format!("on: {c}"),
        None => "off".into(),
    };
    format!(
        "config file:  {}\nstate dir:    {}\ncpus:         {}\nmemory:       {}\ngpus:         {}\ndisk:         {}\nwindows:      {}\npreempt:      {}\nidle-only:    {idle}\nexec:         {}\ncontainers:   {}\n",
        s.config_file.as_ref().map_or("none".into(), |p| p.display().to_string()),
        s.state_dir.display(),
        or_all(s.caps.cpu_millis.map(format_cpu)),
        or_all(s.caps.memory_bytes.map(format_memory)),
        or_all(s.caps.gpus.map(|n| n.to_string())),
        or_all(s.caps.disk_bytes.map(format_memory)),
        if s.windows.is_empty() { "always".into() } else { schedule::describe(&s.windows) },
        s.preempt,
        match (&s.exec_user, s.allow_exec) {
            (Some(user), true) => format!("true, as user {user}"),
            (_, allowed) => allowed.to_string(),
        },
        match &s.container_socket {
            Some(p) => format!("{}{}", p.display(), if s.allow_container_network { ", network when a job asks" } else { ", no network" }),
            None => "off".into(),
        },
    )
}

async fn container_runtime(s: &RunSettings, node: &str) -> anyhow::Result<Option<ContainerRuntime>> {
    let Some(socket) = &s.container_socket else { return Ok(None) };
    if !socket.exists() {
        bail!(
            "no Docker/Podman socket at {}: start the engine (`sudo systemctl start docker`, or `systemctl --user start podman.socket`), or run without --container-socket",
            socket.display()
        );
    }
    let runtime = ContainerRuntime::new(socket.clone(), s.allow_container_network).for_node(node);
    runtime.check_engine().await.map_err(|e| {
        anyhow::anyhow!(
            "the container engine at {} does not answer: {e}; check that this user may use the socket (e.g. is in the docker group)",
            socket.display()
        )
    })?;
    match runtime.sweep().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "removed containers left by an earlier run of this agent"),
        Err(e) => tracing::warn!(error = %e, "cannot list containers left by an earlier run"),
    }
    Ok(Some(runtime))
}

async fn run_cmd(a: RunArgs) -> anyhow::Result<()> {
    let s = settings(&a)?;
    let state = AgentState::load(&s.state_dir)?;
    let container = container_runtime(&s, &state.config.node_name).await?;
    let machine = inventory::measure(&state.scratch_dir());
    let mut caps = s.caps.clone();
    for warning in inventory::cap_warnings(&machine, &caps) {
        tracing::warn!("{warning}");
        eprintln!("warning: {warning}");
    }
    if container.is_none() && !machine.gpus.is_empty() {
        tracing::warn!(gpus = machine.gpus.len(), "GPUs found but not offered: GPU tasks run as containers; add --container-socket");
        caps.gpus = Some(0);
    }
    let offered = Offered { exec: s.allow_exec, container: container.is_some() };
    let facts = facts(&machine, &caps, offered, &state.config.region, &state.config.zone);
    let wasm = WasmRuntime::new()?;
    let spool = Spool::open(state.results_dir()).with_context(|| format!("cannot open the result spool in {}", state.results_dir().display()))?;
    let live = container.clone();
    let mut exec = ExecRuntime::new(s.allow_exec);
    if s.allow_exec {
        exec = exec_sandbox(exec, a.allow_unsandboxed_exec.unwrap_or(false), &state.dir)?;
    }
    if let Some(user) = &s.exec_user {
        if !s.allow_exec {
            bail!("--exec-user {user} only applies with --allow-exec");
        }
        let (uid, gid) = kommune_agent::runtime::resolve_exec_user(user, nix::unistd::geteuid().is_root()).map_err(anyhow::Error::msg)?;
        tracing::info!(user = %user, uid, gid, "exec tasks run as this user");
        exec = exec.as_user(uid, gid);
    }
    // A run of the agent that was killed could not stop its tasks: stop them before any new
    // one starts (the operator has already given their capacity to other work), and drop their
    // scratch directories.
    let leftover = kommune_agent::runtime::stop_leftover_tasks(Path::new("/proc"), &state.scratch_dir());
    if !leftover.is_empty() {
        tracing::warn!(process_groups = ?leftover, "stopped task processes left running by an earlier run of the agent");
    }
    if let Ok(dirs) = std::fs::read_dir(state.scratch_dir()) {
        for dir in dirs.flatten() {
            let _ = std::fs::remove_dir_all(dir.path());
        }
    }
    let (tasks, mut updates) = Tasks::with_container(wasm, exec, container, spool, state.scratch_dir());
    let key = kommune_proto::receipt::signing_key_from_pem(&state.key_pem).map_err(|e| anyhow::anyhow!("{}: {e}", state.dir.join("node.key").display()))?;
    let receipts = Receipts::start(state.receipts_dir(), &state.config.node_name, key)
        .with_context(|| format!("cannot start the receipt epoch in {}", state.receipts_dir().display()))?;
    tracing::info!(epoch = receipts.epoch(), "usage receipts are signed with the node key");
    tasks.sign_receipts(receipts);
    tasks.set_url_policy(kommune_agent::fetch::UrlPolicy { allow_private: s.allow_private_urls });
    tasks.offer_gpus(&facts.capacity.as_ref().map(|c| c.gpus.clone()).unwrap_or_default());
    let idle = s.idle.clone().map(|c| {
        let ids = move || live.as_ref().map(ContainerRuntime::live_ids).unwrap_or_default();
        (IdlePolicy::new(c), Box::new(MachineLoad::new(std::sync::Arc::new(ids))) as Box<dyn LoadSource>)
    });
    let gate = Gate::new(s.windows.clone(), s.preempt, idle);
    if let Some(addr) = a.metrics_listen {
        serve_metrics(addr, tasks.clone(), state.dir.clone()).await?;
    }
    tracing::info!(node = %state.config.node_name, server = %state.config.server, exec = s.allow_exec, container = offered.container, "agent starting");
    session::run_with(&state, &facts, &tasks, &mut updates, gate, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// Serves the agent's metrics on `addr` in the background. Bound before the session starts, so
/// a taken port is an error at start, not a silent gap.
async fn serve_metrics(addr: std::net::SocketAddr, tasks: std::sync::Arc<Tasks>, state_dir: std::path::PathBuf) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "--metrics-listen is not a loopback address: anyone who can reach it sees this machine's task counts");
    }
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
    tracing::info!(%addr, "serving metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, kommune_agent::metrics::router(tasks, state_dir)).await {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    });
    Ok(())
}

/// Exec tasks start through this binary's `sandbox-exec`; a probe says up front whether this
/// kernel can confine them, so a provider learns it at start rather than from failed tasks.
fn exec_sandbox(exec: ExecRuntime, allow_unsandboxed: bool, state_dir: &Path) -> anyhow::Result<ExecRuntime> {
    use kommune_agent::runtime::sandbox;
    let own = sandbox::own_binary();
    if let Some(root) = sandbox::exposed_by(state_dir) {
        bail!(
            "the state directory {} lies under {root}, which exec tasks may read (and with it the node key): move it, or run without --allow-exec",
            state_dir.display()
        );
    }
    let probe = std::process::Command::new(&own)
        .args(["sandbox-exec", "--probe"])
        .output()
        .with_context(|| format!("cannot run {} sandbox-exec --probe", own.display()))?;
    let said = String::from_utf8_lossy(&probe.stdout).trim().to_owned();
    if probe.status.success() {
        tracing::info!(sandbox = %said, "exec tasks are confined");
    } else if allow_unsandboxed {
        tracing::warn!(sandbox = %said, "exec tasks run UNCONFINED (--allow-unsandboxed-exec): they can read this agent's node key");
        eprintln!("warning: exec tasks run unconfined ({said}): they can read this agent's node key and state");
    } else {
        bail!(
            "cannot confine exec tasks on this machine: {said}. Use a kernel with Landlock (Linux 5.13+, landlock in lsm=), or accept the risk with --allow-unsandboxed-exec (tasks can then read the node key unless --exec-user keeps them out)"
        );
    }
    Ok(exec.sandboxed(own, allow_unsandboxed))
}

fn earnings_cmd(a: EarningsArgs) -> anyhow::Result<()> {
    let state = AgentState::load(&a.state.state_dir)?;
    let spooled = Spool::open(state.results_dir())?.all();
    let records = receipts::history(&state.receipts_dir(), &spooled);
    if !a.verify.is_empty() {
        let mut statements = vec![];
        for p in &a.verify {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read statement file {}", p.display()))?;
            statements.extend(read_export(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?);
        }
        let v = earnings::verify(&records, &statements, a.operator_key.as_deref());
        print!("{}", earnings::render(&state.config.node_name, &v));
        if !v.ok() {
            bail!("the statements do not account for every acknowledged receipt (see above)");
        }
        return Ok(());
    }
    // The operator's account is informational: one that does not read is said, not fatal.
    let account = EarningsAccount::load(&state.receipts_dir()).unwrap_or_else(|e| {
        eprintln!("the operator's earnings account is unreadable ({e}); showing receipts only");
        None
    });
    if a.json {
        for r in &records {
            let mut v = serde_json::to_value(r)?;
            if let Some(acct) = account.as_ref().filter(|_| r.status == "accepted" && r.ledger_seq != 0) {
                v["payout"] = payout_json(acct.payout_of(r.ledger_seq));
            }
            println!("{v}");
        }
    } else {
        print!("{}", receipts::render(&state.config.node_name, &records, account.as_ref()));
    }
    Ok(())
}

/// A receipt's payout state in `earnings --json`.
fn payout_json(p: Payout<'_>) -> serde_json::Value {
    use serde_json::json;
    match p {
        Payout::Pending | Payout::Newer => json!({"state": "pending"}),
        Payout::Settled(s) => json!({"state": "settled", "statement": s.seq}),
        Payout::Paid(s) => json!({"state": "paid", "statement": s.seq, "reference": s.paid_reference}),
        Payout::Reversed(r) => json!({"state": "reversed", "reversal": r.seq, "reason": r.reason}),
        Payout::Unknown => json!({"state": "unknown"}),
    }
}

fn status_cmd(a: StateArgs) -> anyhow::Result<()> {
    let state = AgentState::load(&a.state_dir)?;
    let current = status::AgentStatus::load(&state.dir);
    // Linux tells whether the writer still runs; elsewhere the file's age decides.
    let alive = current.as_ref().is_none_or(|s| !Path::new("/proc/self").exists() || Path::new(&format!("/proc/{}", s.pid)).exists());
    print!("{}", status::render(&state.config.node_name, &state.config.server, current.as_ref(), alive, kommune_proto::now_ms()));
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
        println!("{} takes new tasks again (time windows and idle-only mode still apply).", state.config.node_name);
    }
    Ok(())
}
