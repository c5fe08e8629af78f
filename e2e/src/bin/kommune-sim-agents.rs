//! Many simulated provider machines in one process, for the e2e scale scenario: each joins
//! through the operator's real Join RPC with one shared token, then keeps a real mTLS session.
//!
//! A simulated agent runs nothing. On an Assign it reports Running, then a succeeded result
//! with a usage receipt signed by its node key, built by the real agent's own code
//! (`kommune_agent::tasks::terminal_update`, `kommune_agent::receipts::Receipts`), and resends
//! what is not acknowledged when a session is reopened, as the real agent does.
//!
//! Prints progress lines on stdout (`joined N/M ...`, `connected N/M ...`, `results sent=..
//! acked=..`) and runs until killed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use kommune_agent::connect::{self, Server};
use kommune_agent::join::{self, JoinError, JoinOptions};
use kommune_agent::receipts::Receipts;
use kommune_agent::runtime::Outcome;
use kommune_agent::state::AgentState;
use kommune_agent::tasks::terminal_update;
use kommune_proto::v1::{AgentMessage, AttemptState, Capacity, Heartbeat, Hello, NodeFacts, TaskUpdate, agent_message, operator_message};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Joins and runs simulated agents.
#[derive(Parser, Debug)]
#[command(name = "kommune-sim-agents", version)]
struct Args {
    /// The operator's agent gateway, https://HOST:PORT.
    #[arg(long)]
    server: String,
    /// A join token with at least `--agents` uses left.
    #[arg(long)]
    token: String,
    /// How many agents to simulate.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Node names are PREFIX-0000, PREFIX-0001, ...
    #[arg(long, default_value = "sim")]
    name_prefix: String,
    /// Where each agent's state directory (node key, certificate, receipt epoch) goes.
    #[arg(long)]
    state_dir: PathBuf,
    /// CPU each agent offers, in millicores.
    #[arg(long, default_value_t = 1000)]
    cpu_millis: u64,
    /// Memory each agent offers, in MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// Joins and session handshakes in flight at once.
    #[arg(long, default_value_t = 8)]
    handshakes: usize,
    /// Join every agent first and open the sessions only then (the older two-phase run).
    /// Without it each agent opens its session as soon as it has joined, as `kommune-agent
    /// join` followed by `kommune-agent run` on each machine of a pool does.
    #[arg(long)]
    join_all_first: bool,
}

/// Counters shared by every simulated agent, for the progress lines.
#[derive(Default)]
struct Counters {
    joined: AtomicU64,
    join_retries: AtomicU64,
    connected: AtomicU64,
    assigned: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    sessions_lost: AtomicU64,
}

fn facts(args: &Args) -> NodeFacts {
    NodeFacts {
        capacity: Some(Capacity {
            cpu_millis: args.cpu_millis,
            memory_bytes: args.memory_mib << 20,
            runtimes: vec!["wasm".into(), "exec".into()],
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            ..Default::default()
        }),
        agent_version: format!("sim-{}", env!("CARGO_PKG_VERSION")),
        region: String::new(),
        zone: String::new(),
    }
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Joins one agent, retrying while the operator answers Unavailable (a token Secret update that
/// lost a race with other joins: the operator retries a few times, then gives up) or
/// ResourceExhausted (the gateway's join budget for this address is spent for now).
async fn join_one(args: &Args, name: &str, counters: &Counters) -> Result<AgentState> {
    let mut delay = Duration::from_millis(100);
    for _ in 0..20 {
        let opts = JoinOptions {
            server: &args.server,
            token: &args.token,
            name: Some(name),
            region: "",
            zone: "",
            state_dir: &args.state_dir.join(name),
            force: false,
            facts: facts(args),
        };
        match join::join(opts).await {
            Ok(state) => return Ok(state),
            Err(JoinError::Refused(why)) if why.contains("Unavailable") || why.contains("ResourceExhausted") => {
                counters.join_retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e).with_context(|| format!("joining {name}")),
        }
    }
    bail!("joining {name}: the operator stayed unavailable")
}

/// One simulated agent's sessions, reopened after a second if one ends.
async fn run_agent(state: AgentState, facts: NodeFacts, handshakes: Arc<Semaphore>, counters: Arc<Counters>) -> Result<()> {
    let server = connect::parse_server(&state.config.server)?;
    let key = kommune_proto::receipt::signing_key_from_pem(&state.key_pem).map_err(anyhow::Error::msg)?;
    let receipts = Receipts::start(state.receipts_dir(), &state.config.node_name, key)?;
    // Finished and not yet acknowledged, by attempt id: resent on every new session.
    let mut unacked: BTreeMap<String, TaskUpdate> = BTreeMap::new();
    let mut counted = false;
    loop {
        let ended = session(&server, &state, &facts, &receipts, &mut unacked, &handshakes, &counters, &mut counted).await;
        counters.sessions_lost.fetch_add(1, Ordering::Relaxed);
        eprintln!("{}: session ended ({}); reopening", state.config.node_name, ended.err().map(|e| format!("{e:#}")).unwrap_or_else(|| "closed".into()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    server: &Server,
    state: &AgentState,
    facts: &NodeFacts,
    receipts: &Receipts,
    unacked: &mut BTreeMap<String, TaskUpdate>,
    handshakes: &Semaphore,
    counters: &Counters,
    counted: &mut bool,
) -> Result<()> {
    let permit = handshakes.acquire().await?;
    let mut client = connect::client(server, &state.ca_pem, Some((&state.cert_pem, &state.key_pem))).await?;
    let (tx, rx) = mpsc::channel::<AgentMessage>(64);
    let send = |kind: agent_message::Kind| {
        let tx = tx.clone();
        async move { tx.send(AgentMessage { kind: Some(kind) }).await.map_err(|_| anyhow::anyhow!("outbound stream closed")) }
    };
    let known: Vec<String> = unacked.keys().cloned().collect();
    send(agent_message::Kind::Hello(Hello { facts: Some(facts.clone()), running_attempt_ids: known, paused: false })).await?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    for u in unacked.values() {
        send(agent_message::Kind::TaskUpdate(u.clone())).await?;
    }
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut permit = Some(permit);
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Some(msg) = msg? else { return Ok(()) };
                match msg.kind {
                    Some(operator_message::Kind::Welcome(w)) => {
                        drop(permit.take());
                        if !std::mem::replace(counted, true) {
                            counters.connected.fetch_add(1, Ordering::Relaxed);
                        }
                        let every = Duration::from_millis(w.heartbeat_interval_millis).clamp(Duration::from_millis(100), Duration::from_secs(300));
                        heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every.mul_f64(rand::random::<f64>()), every);
                        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    Some(operator_message::Kind::Assign(a)) => {
                        if let Some(done) = unacked.get(&a.attempt_id) {
                            // A repeated Assign for a finished attempt: its result again.
                            send(agent_message::Kind::TaskUpdate(done.clone())).await?;
                            continue;
                        }
                        counters.assigned.fetch_add(1, Ordering::Relaxed);
                        let started_ms = kommune_proto::now_ms();
                        let running = TaskUpdate { attempt_id: a.attempt_id.clone(), state: AttemptState::Running as i32, result: None, receipt: None, trace: None };
                        send(agent_message::Kind::TaskUpdate(running)).await?;
                        let done = terminal_update(&a.attempt_id, &a.job, &Outcome::simulated_success(), None, Some(receipts), started_ms);
                        unacked.insert(a.attempt_id.clone(), done.clone());
                        send(agent_message::Kind::TaskUpdate(done)).await?;
                        counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(operator_message::Kind::Ack(ack)) => {
                        if unacked.remove(&ack.attempt_id).is_some() {
                            counters.acked.fetch_add(1, Ordering::Relaxed);
                            if !ack.receipt_rejected.is_empty() {
                                counters.rejected.fetch_add(1, Ordering::Relaxed);
                                eprintln!("{}: receipt of {} rejected: {}", state.config.node_name, ack.attempt_id, ack.receipt_rejected);
                            }
                        }
                    }
                    // Simulated agents never ask for a renewed certificate.
                    Some(operator_message::Kind::Cancel(_) | operator_message::Kind::Certificate(_) | operator_message::Kind::Earnings(_)) | None => {}
                }
            }
            _ = heartbeat.tick(), if permit.is_none() => {
                send(agent_message::Kind::Heartbeat(Heartbeat { running_attempt_ids: vec![], paused: false })).await?;
            }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let args = Arc::new(args);
    let counters = Arc::new(Counters::default());
    let started = Instant::now();

    // Join: bounded concurrency, every join through the operator's Join RPC. Each joined
    // agent goes to `joined_tx`: its session opens at once unless --join-all-first.
    let joins = Arc::new(Semaphore::new(args.handshakes.max(1)));
    let (joined_tx, mut joined_rx) = tokio::sync::mpsc::unbounded_channel::<AgentState>();
    let mut joining = tokio::task::JoinSet::new();
    for i in 0..args.agents {
        let (args, joins, counters, joined_tx) = (args.clone(), joins.clone(), counters.clone(), joined_tx.clone());
        joining.spawn(async move {
            let permit = joins.acquire_owned().await?;
            let name = format!("{}-{i:04}", args.name_prefix);
            let state = join_one(&args, &name, &counters).await?;
            drop(permit);
            let _ = joined_tx.send(state);
            let n = counters.joined.fetch_add(1, Ordering::Relaxed) + 1;
            if n % 100 == 0 || n as usize == args.agents {
                say(format!(
                    "joined {n}/{} in {:.1}s (retries {})",
                    args.agents,
                    started.elapsed().as_secs_f64(),
                    counters.join_retries.load(Ordering::Relaxed)
                ));
            }
            anyhow::Ok(())
        });
    }
    drop(joined_tx);
    if args.join_all_first {
        while let Some(joined) = joining.join_next().await {
            joined??;
        }
    }

    // Sessions: each agent keeps one open and answers its assignments.
    let handshakes = Arc::new(Semaphore::new(args.handshakes.max(1)));
    let facts = facts(&args);
    let mut agents = tokio::task::JoinSet::new();
    let connect_started = Instant::now();
    let mut joins_open = true;
    while joins_open || !joining.is_empty() {
        tokio::select! {
            state = joined_rx.recv(), if joins_open => match state {
                Some(state) => drop(agents.spawn(run_agent(state, facts.clone(), handshakes.clone(), counters.clone()))),
                None => joins_open = false,
            },
            Some(joined) = joining.join_next(), if !joining.is_empty() => joined??,
        }
    }
    let mut all_connected = false;
    let mut last = (u64::MAX, u64::MAX);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            ended = agents.join_next() => {
                // An agent's loop only ends on an error it cannot retry (its state is unusable).
                if let Some(r) = ended {
                    r??;
                }
                bail!("a simulated agent stopped");
            }
        }
        let connected = counters.connected.load(Ordering::Relaxed);
        if !all_connected && connected as usize == args.agents {
            all_connected = true;
            say(format!("connected {connected}/{} in {:.1}s", args.agents, connect_started.elapsed().as_secs_f64()));
        }
        let (sent, acked) = (counters.sent.load(Ordering::Relaxed), counters.acked.load(Ordering::Relaxed));
        if (sent, acked) != last {
            last = (sent, acked);
            say(format!(
                "results assigned={} sent={sent} acked={acked} rejected={} sessions_lost={}",
                counters.assigned.load(Ordering::Relaxed),
                counters.rejected.load(Ordering::Relaxed),
                counters.sessions_lost.load(Ordering::Relaxed)
            ));
        }
    }
}
