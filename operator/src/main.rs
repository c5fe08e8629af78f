//! `kommune-operator`: runs the operator (default), writes the CRDs (`crdgen`), and mints join
//! tokens (`token create`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use kommune_core::reputation::{Decay, QuarantineRule};
use kommune_operator::blobs::{BlobLimits, Blobs};
use kommune_operator::controller::budget::ApiBudget;
use kommune_operator::controller::lease::LeaderElector;
use kommune_operator::controller::{self, ca::ensure_ca};
use kommune_operator::crd;
use kommune_operator::dispatch::Dispatcher;
use kommune_operator::fence::Fence;
use kommune_operator::fleet::{Fleet, ReputationModel};
use kommune_operator::gateway::limits::Rate;
use kommune_operator::gateway::{self, Gateway, GatewayConfig};
use kommune_operator::ledger::{Ledger, LedgerConfig};
use kommune_operator::metrics::Metrics;
use kommune_operator::pricing::{Micros, RateBook, Rates};
use kommune_operator::scheduler::{FairShare, Weights};
use kommune_operator::store::{Store, StoreConfig};
use kommune_operator::tokens::{CapacityLimits, SecretTokens};
use kommune_proto::quantity;
use tokio::sync::mpsc;
use tracing::info;

/// The Kommune operator: places ComputeJob tasks on joined provider machines.
///
/// Without a subcommand it runs the operator: the ComputeJob controller, the ProviderNode
/// status writer and the agent gateway (gRPC over TLS) that provider agents dial out to.
#[derive(Parser)]
#[command(version, propagate_version = true, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

// Parsed once at startup: the size of the run variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Runs the operator (the default).
    Run(RunArgs),
    /// Writes the CRD YAML generated from the code to crds/ and the chart.
    Crdgen(CrdgenArgs),
    /// Manages join tokens for provider agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Exports and verifies the payout ledger.
    #[command(subcommand)]
    Ledger(kommune_operator::ledger::cli::LedgerCommand),
    /// Settles the payout ledger: close a period into statements, mark one paid, reverse a
    /// receipt, export statements.
    #[command(subcommand)]
    Payout(kommune_operator::ledger::payout_cli::PayoutCommand),
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Address the agent gateway listens on.
    #[arg(long, env = "KOMMUNE_GATEWAY_LISTEN", default_value = "0.0.0.0:8443")]
    gateway_listen: SocketAddr,
    /// Directory of the embedded store and the module blobs (a persistent volume in-cluster).
    #[arg(long, env = "KOMMUNE_DATA_DIR", default_value = "/var/lib/kommune")]
    data_dir: PathBuf,
    /// Namespace holding the operator's CA Secret and the join-token Secrets.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kommune-system")]
    namespace: String,
    /// Apply this operator's ComputeJob and ProviderNode CRDs over the installed ones at start
    /// (server-side apply), so a new version's schema arrives with it: Helm installs CRDs from
    /// the chart's crds/ once and never upgrades them. Needs get and patch on the three CRDs.
    #[arg(long, env = "KOMMUNE_UPGRADE_CRDS", default_value_t = false, action = clap::ArgAction::Set, default_missing_value = "true", num_args = 0..=1)]
    upgrade_crds: bool,
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "KOMMUNE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Address of the read-only web dashboard (HTTPS; `kubectl kommune dashboard` reaches it).
    /// Off unless given: the chart turns it on. Callers authenticate as to the API server and
    /// see only what they may list (docs/ARCHITECTURE.md, "The dashboard").
    #[arg(long, env = "KOMMUNE_WEB_LISTEN")]
    web_listen: Option<SocketAddr>,
    /// Extra DNS names (or IP addresses) for the dashboard's certificate, besides `localhost`:
    /// the names clients verify. The chart gives its Service's `<name>.<namespace>.svc`,
    /// which `kubectl kommune` checks through its port-forward; add an Ingress host here.
    #[arg(long = "web-server-name", env = "KOMMUNE_WEB_SERVER_NAMES", value_delimiter = ',')]
    web_server_names: Vec<String>,
    /// How often agents heartbeat, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    heartbeat_seconds: u64,
    /// How long a node may be unreachable before its running attempts count as lost and are
    /// placed elsewhere; an agent back within it keeps them.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    node_grace_seconds: u64,
    /// Sustained requests per second the operator's ProviderNode and Event writers may make to
    /// the API server (client-side, as client-go's QPS); the leader Lease is not counted.
    #[arg(long, default_value_t = 100.0)]
    api_qps: f64,
    /// Requests those writers may make at once after a quiet period (as client-go's burst).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    api_burst: u32,
    /// ProviderNode writes (of different nodes) in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    node_write_concurrency: u64,
    /// A quiet node's status (its last heartbeat time) is written at most this often; a change
    /// (session opened or closed, earnings) is written at once.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=86400))]
    node_status_refresh_seconds: u64,
    /// How long past its task timeout (`spec.timeouts.taskSeconds`) an attempt may stay without
    /// a result before the operator fails it and places it again, whatever its agent says.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    task_grace_seconds: u64,
    /// How long an ended (or deleted) job's attempts stay in the store before a sweep deletes
    /// them, so the store stays bounded; the job's status keeps which tasks are done.
    #[arg(long, default_value_t = 7 * 86400, value_parser = clap::value_parser!(u64).range(0..=10 * 365 * 86400))]
    attempt_retention_seconds: u64,
    /// Half-life of providers' standings, in hours: what the operator observed a provider do
    /// weighs half as much this long after, so recent behaviour counts more.
    #[arg(long, env = "KOMMUNE_REPUTATION_HALF_LIFE_HOURS", default_value_t = 168, value_parser = clap::value_parser!(u64).range(1..=87600))]
    reputation_half_life_hours: u64,
    /// Quarantine a provider (no more placements until an admin lifts it) when more than this
    /// share of its compared results, decayed, were outvoted (0 ≤ share < 1).
    #[arg(long, env = "KOMMUNE_QUARANTINE_OUTVOTED_SHARE", default_value_t = 0.1)]
    quarantine_outvoted_share: f64,
    /// ... over at least this many compared results (decayed), so one bad result does not
    /// quarantine a new provider.
    #[arg(long, env = "KOMMUNE_QUARANTINE_MIN_VERIFIED", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    quarantine_min_verified: u32,
    /// Elect a leader through the coordination.k8s.io Lease `kommune-operator` before placing or
    /// writing anything; a standby replica waits (and reports not ready on /readyz).
    #[arg(long, env = "KOMMUNE_LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set, default_missing_value = "true", num_args = 0..=1)]
    leader_election: bool,
    /// Fair-share weight of a namespace, as namespace=weight (1..1000); repeat or separate with
    /// commas. Namespaces not named weigh 1: with team-a=2, team-a gets twice the room of any
    /// other namespace when both wait for it.
    #[arg(long = "namespace-weight", env = "KOMMUNE_NAMESPACE_WEIGHTS", value_delimiter = ',')]
    namespace_weight: Vec<String>,
    /// Highest `spec.priority` a namespace's jobs may use, as namespace=priority (-1000..1000);
    /// repeat or separate with commas. Priority ranks jobs across namespaces, so it is granted
    /// here: a namespace not named may use at most 0 (a job asking for more is ranked at the
    /// cap, and told so with a Warning Event).
    #[arg(long = "namespace-max-priority", env = "KOMMUNE_NAMESPACE_MAX_PRIORITY", value_delimiter = ',')]
    namespace_max_priority: Vec<String>,
    /// Weight of a placement score criterion, as name=value (0..100): locality (default 4),
    /// reputation (2), price (2), balance (1). Repeat or separate with commas.
    #[arg(long = "score-weight", env = "KOMMUNE_SCORE_WEIGHTS", value_delimiter = ',')]
    score_weight: Vec<String>,
    /// Seed of the scheduler's sampling and tie-breaks: the same seed and inputs give the same
    /// placements.
    #[arg(long, env = "KOMMUNE_SCHEDULER_SEED", default_value_t = 0)]
    scheduler_seed: u64,
    /// This replica's identity in the Lease (the pod name in-cluster).
    #[arg(long, env = "POD_NAME", default_value_t = default_identity())]
    leader_identity: String,
    /// Lease duration in seconds: a leader that cannot renew for two thirds of it stops writing
    /// and exits; another replica takes over once it has expired.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
    lease_seconds: u64,
    /// Keep the payout ledger and the attempt store in PostgreSQL (postgres://user:pass@host/db)
    /// instead of the embedded `<data-dir>/ledger.db` and `<data-dir>/kommune.db`: what lets
    /// replicas under leader election take over each other's running work.
    #[arg(long, env = "KOMMUNE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The operator's ledger signing key (PKCS#8 PEM; created if absent). Keep it outside the
    /// data directory (the chart mounts a Secret): whoever can rewrite the database must not
    /// also be able to re-sign it. Unset, `<data-dir>/ledger.key` is used, with a warning.
    #[arg(long, env = "KOMMUNE_LEDGER_KEY_FILE")]
    ledger_key_file: Option<PathBuf>,
    /// Close a payout period every this long (e.g. 24h): one signed statement per owner. Unset,
    /// periods close only with `kommune-operator payout close`.
    #[arg(long, env = "KOMMUNE_PAYOUT_CLOSE_EVERY", value_parser = humantime::parse_duration)]
    payout_close_every: Option<Duration>,
    /// Sign a ledger checkpoint this often when entries follow the last one (and at shutdown),
    /// so a killed operator leaves at most this much of the ledger unsigned.
    #[arg(long, env = "KOMMUNE_LEDGER_CHECKPOINT_EVERY", default_value = "10s", value_parser = humantime::parse_duration)]
    ledger_checkpoint_every: Duration,
    /// POST each closed payout statement (JSON: the signed statement line and its content) to
    /// this URL, retried with backoff until it answers 2xx; delivery shows on the
    /// PayoutStatement's status.webhook.
    #[arg(long, env = "KOMMUNE_PAYOUT_WEBHOOK_URL")]
    payout_webhook_url: Option<String>,
    /// Bytes of wasm modules (stored from ConfigMaps) the jobs of one namespace may hold on the
    /// operator's volume, e.g. 256Mi. A module that would exceed it is not stored; its job
    /// waits with reason BlobQuotaExceeded.
    #[arg(long, env = "KOMMUNE_BLOB_QUOTA", default_value = "256Mi", value_parser = |v: &str| quantity::memory_bytes("--blob-quota", v).map_err(|e| e.to_string()))]
    blob_quota: u64,
    /// A namespace's own module quota, as namespace=quantity (e.g. team-a=1Gi); repeat or
    /// separate with commas. Replaces --blob-quota for that namespace.
    #[arg(long = "namespace-blob-quota", env = "KOMMUNE_NAMESPACE_BLOB_QUOTAS", value_delimiter = ',', value_parser = namespace_quota)]
    namespace_blob_quota: Vec<(String, u64)>,
    /// Bytes of task outputs (`spec.outputs`) the operator keeps on its volume, e.g. 10Gi. When
    /// full, new outputs are refused (the job gets OutputsStored=False and a Warning Event);
    /// the store and the ledger are never affected.
    #[arg(long, env = "KOMMUNE_OUTPUTS_DISK_LIMIT", default_value = "10Gi", value_parser = |v: &str| quantity::memory_bytes("--outputs-disk-limit", v).map_err(|e| e.to_string()))]
    outputs_disk_limit: u64,
    /// How long a module no job holds any more is kept (and still served to the attempts
    /// assigned before its job let go of it) before the sweep deletes it.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    blob_grace_seconds: u64,
    /// Credits a provider earns per CPU-core-hour of measured CPU time (ProviderNode
    /// `spec.pricing` may override each rate for its machine).
    #[arg(long, env = "KOMMUNE_RATE_CPU_CORE_HOUR", default_value = "0.01", value_parser = parse_credits)]
    rate_cpu_core_hour: Micros,
    /// Credits per GiB-hour of measured memory.
    #[arg(long, env = "KOMMUNE_RATE_MEMORY_GIB_HOUR", default_value = "0.002", value_parser = parse_credits)]
    rate_memory_gib_hour: Micros,
    /// Credits per GPU-hour.
    #[arg(long, env = "KOMMUNE_RATE_GPU_HOUR", default_value = "0.5", value_parser = parse_credits)]
    rate_gpu_hour: Micros,
    /// Credits per GiB of output written.
    #[arg(long, env = "KOMMUNE_RATE_OUTPUT_GIB", default_value = "0", value_parser = parse_credits)]
    rate_output_gib: Micros,
    /// Joins the gateway accepts at once from one source address (an IPv4 address or an IPv6
    /// /64) before the steady rate applies; more get ResourceExhausted with a retry hint.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    join_burst: u32,
    /// Joins per second from one source address once its burst is spent.
    #[arg(long, default_value_t = 2.0)]
    joins_per_second: f64,
    /// Sessions a node may open at once before the steady rate applies (a newer session
    /// replaces the node's older one).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    session_burst: u32,
    /// Sessions per second a node may open once its burst is spent.
    #[arg(long, default_value_t = 1.0)]
    sessions_per_second: f64,
    /// Seconds a connection to the gateway has to complete its TLS handshake.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    tls_handshake_timeout_seconds: u64,
    /// Seconds a gateway request (Join, Leave, FetchBlob, a Session's opening) may take.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    request_timeout_seconds: u64,
}

fn namespace_quota(s: &str) -> Result<(String, u64), String> {
    let (ns, q) = s.split_once('=').ok_or_else(|| format!("{s:?} is not namespace=quantity (e.g. team-a=1Gi)"))?;
    if ns.is_empty() {
        return Err(format!("{s:?} names no namespace"));
    }
    Ok((ns.to_string(), quantity::memory_bytes("--namespace-blob-quota", q).map_err(|e| e.to_string())?))
}

fn parse_credits(s: &str) -> Result<Micros, String> {
    Micros::parse_credits(s)
}

impl RunArgs {
    fn rates(&self) -> Rates {
        Rates {
            cpu_core_hour: self.rate_cpu_core_hour,
            memory_gib_hour: self.rate_memory_gib_hour,
            gpu_hour: self.rate_gpu_hour,
            output_gib: self.rate_output_gib,
        }
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "kommune-operator".into());
    format!("{host}-{}", std::process::id())
}

#[derive(Args)]
struct CrdgenArgs {
    /// Directories to write computejob.yaml, providernode.yaml and payoutstatement.yaml into.
    #[arg(long = "out", default_values = ["crds", "charts/kommune/crds"])]
    out: Vec<PathBuf>,
    /// Print the CRDs to stdout instead of writing files.
    #[arg(long)]
    stdout: bool,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Creates a join token and prints it. Give it to a provider for `kommune-agent join`.
    Create {
        /// How long the token can be used, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many machines can join with it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10000))]
        uses: u32,
        /// Namespace of the operator (where the token Secret is created).
        #[arg(long, env = "POD_NAMESPACE", default_value = "kommune-system")]
        namespace: String,
        /// Who the machines joined with this token belong to (their ProviderNodes' spec.owner):
        /// machines of one owner never hold two copies of a replicated task. Default: the token
        /// itself (`token:<id>`), so all machines joined with one token are one owner.
        #[arg(long, value_parser = owner_arg)]
        owner: Option<String>,
        /// Most CPU a machine joined with this token is believed to offer, e.g. 8 or 3500m.
        #[arg(long, value_parser = |v: &str| quantity::cpu_millis("--max-cpu", v).map_err(|e| e.to_string()))]
        max_cpu: Option<u64>,
        /// Most memory a machine joined with this token is believed to offer, e.g. 16Gi.
        #[arg(long, value_parser = |v: &str| quantity::memory_bytes("--max-memory", v).map_err(|e| e.to_string()))]
        max_memory: Option<u64>,
        /// Most scratch disk a machine joined with this token is believed to offer, e.g. 100Gi.
        #[arg(long, value_parser = |v: &str| quantity::memory_bytes("--max-ephemeral-storage", v).map_err(|e| e.to_string()))]
        max_ephemeral_storage: Option<u64>,
        /// Most GPUs a machine joined with this token is believed to have (0: none).
        #[arg(long)]
        max_gpus: Option<u32>,
    },
}

fn owner_arg(v: &str) -> Result<String, String> {
    kommune_operator::tokens::valid_owner(v).map(|()| v.to_string())
}

/// How often module blobs no job holds are looked for.
const BLOB_SWEEP_EVERY: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crdgen(args)) => crdgen(args),
        Some(Command::Token(TokenCommand::Create { ttl, uses, namespace, owner, max_cpu, max_memory, max_ephemeral_storage, max_gpus })) => {
            let limits = CapacityLimits { cpu_millis: max_cpu, memory_bytes: max_memory, ephemeral_bytes: max_ephemeral_storage, gpus: max_gpus };
            token_create(ttl, uses, &namespace, owner.as_deref(), limits).await
        }
        Some(Command::Ledger(cmd)) => ledger(cmd),
        Some(Command::Payout(cmd)) => payout(cmd),
        Some(Command::Run(args)) => run(args).await,
        None => run(cli.run).await,
    }
}

fn crdgen(args: CrdgenArgs) -> anyhow::Result<()> {
    for (file, crd) in crd::all() {
        let yaml = crd::to_yaml(&crd);
        if args.stdout {
            print!("{yaml}");
            continue;
        }
        for dir in &args.out {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(file);
            std::fs::write(&path, &yaml).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn ledger(cmd: kommune_operator::ledger::cli::LedgerCommand) -> anyhow::Result<()> {
    // The PostgreSQL client blocks on a runtime of its own, which must not run on a tokio worker.
    std::thread::spawn(move || kommune_operator::ledger::cli::run(cmd, &mut std::io::stdout().lock()))
        .join()
        .map_err(|_| anyhow::anyhow!("the ledger command panicked"))??;
    Ok(())
}

fn payout(cmd: kommune_operator::ledger::payout_cli::PayoutCommand) -> anyhow::Result<()> {
    // As for `ledger`: the ledger's database clients run off the async workers.
    std::thread::spawn(move || kommune_operator::ledger::payout_cli::run(cmd, &mut std::io::stdout().lock()))
        .join()
        .map_err(|_| anyhow::anyhow!("the payout command panicked"))??;
    Ok(())
}

async fn token_create(ttl: Duration, uses: u32, namespace: &str, owner: Option<&str>, limits: CapacityLimits) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.context("cannot reach the Kubernetes API (is KUBECONFIG set, or are you in-cluster?)")?;
    let ca = ensure_ca(client.clone(), namespace).await.with_context(|| format!("cannot load or create the operator CA in namespace {namespace}"))?;
    let token = SecretTokens::new(client, namespace)
        .create(&ca.pin(), ttl, uses, owner, limits)
        .await
        .with_context(|| format!("cannot create the token Secret in namespace {namespace}"))?;
    println!("{token}");
    eprintln!(
        "join token {} of owner {} valid for {} and {uses} use(s); on the provider run:\n  kommune-agent join --server https://<gateway address>:<port> --token <token>",
        token.id,
        owner.map_or_else(|| kommune_operator::tokens::default_owner(&token.id), str::to_string),
        humantime::format_duration(ttl)
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let _telemetry = kommune_telemetry::init("kommune-operator");
    let fair = FairShare::parse(args.namespace_weight.iter().map(String::as_str))
        .map_err(|e| anyhow::anyhow!("--namespace-weight: {e}"))?
        .with_max_priorities(args.namespace_max_priority.iter().map(String::as_str))
        .map_err(|e| anyhow::anyhow!("--namespace-max-priority: {e}"))?;
    let mut weights = Weights::default();
    for w in &args.score_weight {
        weights.set(w).map_err(|e| anyhow::anyhow!("--score-weight: {e}"))?;
    }
    info!(%weights, namespace_weights = ?args.namespace_weight, "placement weights");

    let client = kube::Client::try_default().await.context("cannot reach the Kubernetes API (is KUBECONFIG set, or are you in-cluster?)")?;
    if args.upgrade_crds {
        // Before anything reads a ComputeJob: a job written for the new schema must not be
        // read through the old one.
        let done = kommune_operator::controller::crds::upgrade(client.clone()).await.context("--upgrade-crds")?;
        info!(crds = ?done.names, without_cel_rules = done.without_cel, "CRDs at this operator's schema");
    }
    let ca = Arc::new(ensure_ca(client.clone(), &args.namespace).await.context("cannot load or create the operator CA")?);
    info!(namespace = %args.namespace, ca_pin = %ca.pin(), "operator CA ready");

    // Health and metrics come up first: a standby replica is live but not ready.
    let reputation = ReputationModel {
        decay: Decay::new(Duration::from_secs(args.reputation_half_life_hours * 3600)).map_err(anyhow::Error::msg)?,
        rule: QuarantineRule::new(args.quarantine_outvoted_share, f64::from(args.quarantine_min_verified))
            .map_err(|e| anyhow::anyhow!("--quarantine-outvoted-share: {e}"))?,
    };
    let fleet = Arc::new(Fleet::new(args.scheduler_seed, weights, fair).with_reputation(reputation));
    let metrics = Arc::new(Metrics::default());
    metrics.watch_data_dir(args.data_dir.clone());
    let ready = Arc::new(AtomicBool::new(false));
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen).await.with_context(|| format!("cannot listen on {}", args.metrics_listen))?;
    let metrics_server = axum::serve(metrics_listener, kommune_operator::metrics::router(metrics.clone(), fleet.clone(), ready.clone()));
    let metrics_server = tokio::spawn(async move { metrics_server.await });

    let (fence, elector) = if args.leader_election {
        let fence = Fence::closed();
        // A client of its own, with its own connections: the ProviderNode writers' requests
        // queue behind their budget, never in front of a renewal.
        let lease_client = kube::Client::try_default().await.context("cannot reach the Kubernetes API for the leader Lease")?;
        let elector = LeaderElector::new(lease_client, &args.namespace, args.leader_identity.clone(), Duration::from_secs(args.lease_seconds), fence.clone());
        info!(identity = %elector.identity(), "waiting to become the leader");
        tokio::select! {
            _ = elector.acquire() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        (fence, Some(elector))
    } else {
        (Fence::open(), None)
    };

    // Opened once the Lease is held: under leader election, opening claims the store's next
    // epoch, which fences every later write of a previous leader.
    let store = Arc::new(
        Store::open_with(StoreConfig { data_dir: args.data_dir.clone(), database_url: args.database_url.clone(), fence: fence.clone() })
            .context("cannot open the attempt store")?,
    );
    // Held (shared with other replicas) for the life of the process: a `payout` command, which
    // appends, is refused while this operator runs instead of racing its writer.
    let (dir, url) = (args.data_dir.clone(), args.database_url.clone());
    let _ledger_hold =
        tokio::task::spawn_blocking(move || kommune_operator::ledger::hold::hold(&dir, url.as_deref(), kommune_operator::ledger::hold::Mode::Shared))
            .await
            .context("the ledger lock task failed")?
            .context("cannot hold the payout ledger")?;
    let ledger = Arc::new(
        Ledger::open(LedgerConfig {
            data_dir: args.data_dir.clone(),
            database_url: args.database_url.clone(),
            fence: fence.clone(),
            key_file: args.ledger_key_file.clone(),
        })
        .context("cannot open the payout ledger")?,
    );
    info!(
        operator_key_sha256 = %kommune_operator::ledger::entry::fingerprint(&ledger.operator_key()),
        "payout ledger key: pin it with `kommune-operator ledger verify --operator-key <sha256>`"
    );
    let rates = Arc::new(RateBook::new(args.rates()));
    info!(backend = if args.database_url.is_some() { "postgresql" } else { "embedded" }, rates = ?rates.cluster(), "payout ledger open");
    let blob_limits = BlobLimits {
        quota_bytes: args.blob_quota,
        namespace_quota: args.namespace_blob_quota.iter().cloned().collect(),
        grace: Duration::from_secs(args.blob_grace_seconds),
    };
    let blobs = Blobs::open_with(&args.data_dir, blob_limits).context("cannot open the module blobs")?;
    let outputs = kommune_operator::outputs::OutputStore::open(&args.data_dir, args.outputs_disk_limit).context("cannot open the output store")?;
    let (jobs_changed_tx, jobs_changed_rx) = mpsc::channel(1024);
    // The gateway never waits on this channel (it drops a heartbeat, and refuses a Join, while
    // it is full); the writer drains it into its own bounded queue as fast as events come.
    let (node_events_tx, node_events_rx) = mpsc::channel(4096);
    let (capacity_tx, capacity_rx) = mpsc::channel(1);
    let dispatcher = Arc::new(
        Dispatcher::new(store, fleet.clone(), jobs_changed_tx)
            .with_ledger(ledger.clone(), rates)
            .with_fence(fence)
            .with_task_grace(Duration::from_secs(args.task_grace_seconds))
            .with_attempt_retention(Duration::from_secs(args.attempt_retention_seconds))
            .with_metrics(metrics.clone())
            .with_outputs(outputs),
    );

    anyhow::ensure!(!args.ledger_checkpoint_every.is_zero(), "--ledger-checkpoint-every must be longer than 0s");
    if let Some(url) = &args.payout_webhook_url {
        anyhow::ensure!(
            url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https")),
            "--payout-webhook-url {url:?} is not an http:// or https:// URL"
        );
    }
    anyhow::ensure!(args.joins_per_second > 0.0 && args.sessions_per_second > 0.0, "--joins-per-second and --sessions-per-second must be positive");
    let config = GatewayConfig {
        heartbeat_interval: Duration::from_secs(args.heartbeat_seconds),
        session_timeout: Duration::from_secs(args.heartbeat_seconds * 3),
        join_rate: Rate { burst: args.join_burst, per_second: args.joins_per_second },
        session_rate: Rate { burst: args.session_burst, per_second: args.sessions_per_second },
        handshake_timeout: Duration::from_secs(args.tls_handshake_timeout_seconds),
        request_timeout: Duration::from_secs(args.request_timeout_seconds),
        ..GatewayConfig::default()
    };
    let tokens = Arc::new(SecretTokens::new(client.clone(), &args.namespace));
    let gateway = Gateway::new(dispatcher.clone(), tokens, ca.clone(), blobs.clone(), node_events_tx, config);
    let listener = gateway::bind(args.gateway_listen).await.with_context(|| format!("cannot listen on {}", args.gateway_listen))?;
    info!(addr = %listener.local_addr()?, "agent gateway listening");
    let web_server = start_web(&args, &client, &ca, &dispatcher).await?;
    ready.store(true, Ordering::Relaxed);

    let ctx = Arc::new(controller::job::Context::new(client.clone(), dispatcher.clone(), blobs.clone(), metrics.clone()));
    let shutdown = async {
        // SIGTERM is how Kubernetes stops a pod: ending gracefully signs the ledger's tail.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(t) => drop(t.recv().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = terminated => {},
        }
    };
    let grace = Duration::from_secs(args.node_grace_seconds);
    anyhow::ensure!(args.api_qps > 0.0, "--api-qps must be positive");
    let budget = Arc::new(ApiBudget::new(args.api_qps, args.api_burst));
    let writer_config = controller::nodes::WriterConfig {
        concurrency: args.node_write_concurrency as usize,
        queue: 65_536,
        status_refresh: Duration::from_secs(args.node_status_refresh_seconds),
        grace,
        write_timeout: controller::nodes::WRITE_TIMEOUT,
    };
    info!(
        qps = args.api_qps,
        burst = args.api_burst,
        concurrency = writer_config.concurrency,
        status_refresh_s = args.node_status_refresh_seconds,
        "API write budget"
    );
    let expiry = {
        let dispatcher = dispatcher.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            for n in 0u64.. {
                tick.tick().await;
                if let Err(e) = dispatcher.expire_absent(grace).await {
                    tracing::warn!(error = %e, "cannot expire attempts of unreachable nodes");
                }
                // Every 5 s: a timeout already has a grace of a minute by default, and each
                // check reads every active attempt.
                if n % 5 == 0
                    && let Err(e) = dispatcher.enforce_timeouts().await
                {
                    tracing::warn!(error = %e, "cannot fail attempts past their task timeout");
                }
                // Every minute: ended jobs' attempts past the retention.
                if n % 60 == 30 {
                    match dispatcher.prune_attempts().await {
                        Ok(0) => {}
                        Ok(pruned) => tracing::info!(pruned, "deleted attempts of jobs past --attempt-retention-seconds"),
                        Err(e) => tracing::warn!(error = %e, "cannot prune ended jobs' attempts"),
                    }
                }
            }
        }
    };
    // Deletes modules no job has held for the grace (the blob store's locking keeps a module
    // being stored safe); off the async workers, as it reads the directory.
    let sweep = async move {
        let mut tick = tokio::time::interval(BLOB_SWEEP_EVERY);
        loop {
            tick.tick().await;
            let blobs = blobs.clone();
            match tokio::task::spawn_blocking(move || blobs.sweep()).await {
                Ok(Ok(s)) if s.deleted > 0 => info!(deleted = s.deleted, freed_bytes = s.freed_bytes, kept = s.kept, "swept module blobs no job holds"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot sweep module blobs"),
                Err(e) => tracing::warn!(error = %e, "the blob sweep panicked"),
            }
        }
    };
    // Closes payout periods on schedule, signs timed checkpoints, mirrors statements as
    // PayoutStatements and delivers them to the webhook.
    let payout_config = kommune_operator::payouts::PayoutConfig {
        close_every: args.payout_close_every,
        checkpoint_every: args.ledger_checkpoint_every,
        mirror_every: Duration::from_secs(5),
        webhook_url: args.payout_webhook_url.clone(),
    };
    let settle = kommune_operator::payouts::run(client.clone(), ledger.clone(), payout_config);
    let leadership = async {
        match &elector {
            Some(e) => e.hold().await,
            None => std::future::pending().await,
        }
    };
    // Any part ending ends the process, so a supervisor restarts it whole. Losing the Lease
    // ends it at once: the store is already fenced, and a new leader may take over.
    tokio::select! {
        lost = leadership => anyhow::bail!("{lost}; exiting so another replica can lead"),
        _ = expiry => {},
        _ = sweep => {},
        _ = settle => {},
        r = gateway.serve(listener, shutdown) => r.context("agent gateway failed")?,
        _ = controller::job::run(ctx, jobs_changed_rx, capacity_rx) => info!("ComputeJob controller stopped"),
        _ = controller::nodes::run(client, dispatcher.clone(), node_events_rx, capacity_tx, budget, writer_config) => info!("ProviderNode writer stopped"),
        r = metrics_server => r.context("metrics server task failed")?.context("metrics server failed")?,
        r = web_server => r.context("dashboard task failed")?.context("dashboard server failed")?,
    }
    // Stopping: sign what follows the last checkpoint, so the ledger verifies strictly. (A
    // replica that lost its Lease bailed out above: its ledger is fenced and it may not append.)
    match ledger.checkpoint().await {
        Ok(head) => info!(seq = head.seq, "payout ledger checkpointed at shutdown"),
        Err(e) => tracing::warn!(error = %e, "cannot checkpoint the payout ledger at shutdown"),
    }
    Ok(())
}

/// Starts the dashboard when `--web-listen` is given (else a task that never ends): a watch-fed
/// cache of ComputeJobs, TLS with a certificate of the operator CA (published for users in the
/// ConfigMap `kommune-ca.crt`, so they can verify it), and the cluster's client CA so
/// kubeconfigs with client certificates work as well as tokens.
async fn start_web(
    args: &RunArgs,
    client: &kube::Client,
    ca: &kommune_operator::pki::Ca,
    dispatcher: &Arc<Dispatcher>,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    use futures::StreamExt as _;
    use kommune_operator::web;
    use kube::runtime::{WatchStreamExt as _, reflector, watcher};
    let Some(addr) = args.web_listen else {
        return Ok(tokio::spawn(std::future::pending()));
    };
    let (jobs, writer) = reflector::store();
    let stream = watcher(kube::Api::<crd::ComputeJob>::all(client.clone()), watcher::Config::default()).default_backoff().reflect(writer).applied_objects();
    tokio::spawn(stream.for_each(|_| async {}));
    let mut names = vec!["localhost".to_string(), "kommune-operator".to_string()];
    names.extend(args.web_server_names.iter().cloned());
    let (chain, key) = ca.issue_server(&names).with_context(|| format!("cannot issue the dashboard's serving certificate for {names:?}"))?;
    // Without it users cannot verify the dashboard unless handed the CA some other way
    // (`--operator-ca`); the dashboard itself still works, so this is a warning.
    match controller::ca::publish_ca(client.clone(), &args.namespace, ca).await {
        Ok(()) => info!(configmap = controller::ca::CA_CONFIGMAP, namespace = %args.namespace, "published the operator CA for dashboard clients"),
        Err(e) => {
            tracing::warn!(error = %e, configmap = controller::ca::CA_CONFIGMAP, "cannot publish the operator CA: `kubectl kommune` users need --operator-ca")
        }
    }
    let client_ca = web::cluster_client_ca(client.clone()).await;
    let config = web::tls::server_config(&chain, &key, client_ca.as_deref()).context("dashboard TLS")?;
    let listener = web::tls::TlsListener::bind(addr, config).await?;
    info!(addr = %addr, client_certificates = client_ca.is_some(), "dashboard listening");
    let gate = Arc::new(web::auth::Gatekeeper::new(Arc::new(web::auth::KubeAuthority::new(client.clone()))));
    let source = Arc::new(web::gather::OperatorSource { dispatcher: dispatcher.clone(), jobs });
    // The operator's output store (and presigned GETs for jobs that write to a bucket); the
    // routes authenticate and authorize before they read it.
    let retrieval = web::results::Retrieval {
        jobs: Arc::new(web::results::KubeJobs(client.clone())),
        reader: dispatcher.output_reader(),
        live: Some(dispatcher.clone() as Arc<dyn kommune_operator::outputs::live::LiveSource>),
    };
    Ok(tokio::spawn(web::serve(listener, web::router_with_outputs(gate, source, Some(retrieval)))))
}
