//! The `kommune-agent` command line, as a library so tests (and the systemd unit check) parse
//! exactly what the binary parses.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use kommune_proto::quantity;

use crate::config::Flags;
use crate::schedule::Window;
use crate::state;

/// Lend this machine to a Kommune compute pool.
///
/// First `join` once with the token your cluster admin gave you, then keep `run` going (for
/// example as a systemd service, see docs/PROVIDERS.md). The agent only ever dials out, so it
/// works behind NAT. Tasks run in a wasm sandbox that sees only its own scratch directory;
/// containers and plain commands run only if you turn them on.
#[derive(Debug, Parser)]
#[command(name = "kommune-agent", version, propagate_version = true, after_help = MAIN_EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

const MAIN_EXAMPLES: &str = "\
Getting started:
  kommune-agent join --server https://pool.example.org:30443 --token kmn1.abc123.<secret>.<ca-hash>
  kommune-agent run --cpus 2 --memory 4Gi --idle-only
  kommune-agent status

Run `kommune-agent <command> --help` for each command's options.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Joins this machine to a pool (once): pins the operator's CA from the token, creates this
    /// node's key and certificate, and stores them in the state directory.
    #[command(after_help = JOIN_EXAMPLES)]
    Join(JoinArgs),
    /// Connects to the operator and runs assigned tasks until interrupted (Ctrl-C).
    #[command(after_help = RUN_EXAMPLES, long_about = RUN_ABOUT)]
    Run(RunArgs),
    /// Shows whether the agent runs and is connected, what it offers, whether it is paused and
    /// why, its last heartbeat and the tasks it runs.
    #[command(after_help = "Example:\n  kommune-agent status --state-dir /var/lib/kommune-agent")]
    Status(StateArgs),
    /// Stops taking new tasks (running ones finish); the operator places work elsewhere. Lasts
    /// until `resume`, also across restarts.
    #[command(after_help = "Example:\n  kommune-agent pause    # before a video call\n  kommune-agent resume   # afterwards")]
    Pause(StateArgs),
    /// Takes new tasks again after `pause` (time windows and idle-only mode still apply).
    Resume(StateArgs),
    /// Leaves the pool for good: the operator removes this node and moves its running tasks
    /// elsewhere, and the identity in the state directory is deleted.
    #[command(
        after_help = "Example:\n  kommune-agent leave            # refuses while finished results are unacknowledged\n  kommune-agent leave --force    # leave anyway; those results are lost"
    )]
    Leave(LeaveArgs),
    /// Lists this machine's signed usage receipts: what each finished task used, whether the
    /// operator acknowledged it, the credits it was priced at and its ledger entry. With
    /// --verify, checks them against statements the operator exported: settled, paid,
    /// reversed, or MISSING / WRONG (exit status 1).
    #[command(
        after_help = "Example:\n  kommune-agent earnings          # a table, newest last\n  kommune-agent earnings --json   # one JSON object per receipt\n  kommune-agent earnings --verify statements.json --operator-key 3f9a…   # from `kommune-operator payout export --owner alice`"
    )]
    Earnings(EarningsArgs),
    /// Works with the `run` config file: print an example, or check one.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Internal: how `run` starts an exec task (Landlock-confined, with no process left
    /// behind). Not for people; see docs/SECURITY.md.
    #[command(hide = true)]
    SandboxExec(SandboxExecArgs),
}

#[derive(Debug, Clone, Args)]
pub struct SandboxExecArgs {
    /// The attempt's scratch directory, the only tree the command may write.
    #[arg(long, value_name = "DIR", required_unless_present = "probe")]
    pub scratch: Option<PathBuf>,
    /// Run the command even without Landlock.
    #[arg(long)]
    pub allow_unsandboxed: bool,
    /// The confining stage, started by the supervisor stage.
    #[arg(long)]
    pub inner: bool,
    /// Only report how far this kernel confines a task.
    #[arg(long, conflicts_with_all = ["inner", "scratch"])]
    pub probe: bool,
    /// The command and its arguments.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Prints a commented example config file with every setting.
    #[command(after_help = "Example:\n  kommune-agent config example > ~/.local/state/kommune/agent.toml")]
    Example,
    /// Reads the config file and flags exactly as `run` would, and prints the settings that
    /// result (or the first error), without connecting anywhere.
    #[command(after_help = "Example:\n  kommune-agent config check --config /etc/kommune/agent.toml --cpus 1")]
    Check(Box<RunArgs>),
}

const JOIN_EXAMPLES: &str = "\
Example:
  kommune-agent join --server https://203.0.113.7:30443 --token kmn1.abc123.<secret>.<ca-hash> --region eu-west

The token comes from your cluster admin (`kommune-operator token create`). It pins the
operator's certificate, so a wrong --server fails instead of trusting someone else.";

const RUN_ABOUT: &str = "\
Connects to the operator and runs assigned tasks until interrupted (Ctrl-C).

Settings come from, in order of precedence:
  1. flags given on the command line,
  2. the config file: --config FILE, else <state dir>/agent.toml if it exists
     (`kommune-agent config example` prints one with every key),
  3. built-in defaults.
Each flag below has a config key of the same name without the leading dashes, e.g.
`--max-disk 20Gi` is `max-disk = \"20Gi\"`. On/off flags take an optional value, so a flag can
turn off what the file turned on: `--allow-exec=false`. --window given on the command line
replaces the file's windows.

Caps only lower what the machine has: a cap above it is lowered, with a warning.";

const RUN_EXAMPLES: &str = "\
Examples:
  kommune-agent run                                   # offer everything, all the time
  kommune-agent run --cpus 2 --memory 4Gi --max-disk 20Gi
  kommune-agent run --window \"Mon-Fri 18:00-08:00\" --window \"Sat,Sun 00:00-24:00\"
  kommune-agent run --idle-only --idle-cpu-threshold 20
  kommune-agent run --container-socket /var/run/docker.sock --max-gpus 1
  kommune-agent run --config /etc/kommune/agent.toml";

#[derive(Debug, Args)]
pub struct StateArgs {
    /// Where `join` stored this node's identity [default: $KOMMUNE_STATE_DIR, else
    /// $XDG_STATE_HOME/kommune, else ~/.local/state/kommune].
    #[arg(long, value_name = "DIR", default_value_os_t = state::default_dir(), hide_default_value = true)]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct EarningsArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Print one JSON object per receipt instead of a table.
    #[arg(long, conflicts_with = "verify")]
    pub json: bool,
    /// A statement file (`kommune-operator payout export --format json`: one statement or an
    /// array); may be repeated. Every acknowledged receipt within a statement's ledger range
    /// must be listed in it with the Acked hash and amount.
    #[arg(long, value_name = "STATEMENT_FILE")]
    pub verify: Vec<PathBuf>,
    /// The operator ledger key's sha256 fingerprint (`operator_key_sha256` in the operator's
    /// log at start): statements signed by another key are refused.
    #[arg(long, value_name = "SHA256", requires = "verify")]
    pub operator_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct LeaveArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Leave even if finished results are not acknowledged yet (they are lost).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The operator's agent gateway, e.g. https://203.0.113.7:30443.
    #[arg(long, env = "KOMMUNE_SERVER", value_name = "URL")]
    pub server: String,
    /// The join token from your cluster admin (kmn1.<id>.<secret>.<ca-hash>).
    #[arg(long, env = "KOMMUNE_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Name for this machine in the pool (lowercase letters, digits, '-'); default: chosen by
    /// the operator.
    #[arg(long)]
    pub name: Option<String>,
    /// Region this machine is in (shown to schedulers and users), e.g. eu-west.
    #[arg(long, default_value = "")]
    pub region: String,
    /// Zone this machine is in.
    #[arg(long, default_value = "")]
    pub zone: String,
    /// Where the node key, certificates and spooled results go [default: $KOMMUNE_STATE_DIR,
    /// else $XDG_STATE_HOME/kommune, else ~/.local/state/kommune].
    #[arg(long, value_name = "DIR", default_value_os_t = state::default_dir(), hide_default_value = true)]
    pub state_dir: PathBuf,
    /// Replace an existing identity in the state directory.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Read settings from this TOML file [default: <state dir>/agent.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where `join` stored this node's identity [default: $KOMMUNE_STATE_DIR, else
    /// $XDG_STATE_HOME/kommune, else ~/.local/state/kommune].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// At most this much CPU is offered: cores (2) or millicores (1500m) [default: all cores].
    #[arg(long, value_parser = parse_cpu, value_name = "CPU", help_heading = "What is offered")]
    pub cpus: Option<u64>,
    /// At most this much memory is offered, e.g. 4Gi [default: all memory].
    #[arg(long, value_parser = parse_memory, value_name = "BYTES", help_heading = "What is offered")]
    pub memory: Option<u64>,
    /// At most this many GPUs are offered (of those detected through NVML or nvidia-smi; none
    /// is ever made up) [default: all detected].
    #[arg(long, value_name = "N", help_heading = "What is offered")]
    pub max_gpus: Option<u32>,
    /// At most this much scratch disk is offered, e.g. 20Gi [default: the free space of the
    /// state directory's filesystem].
    #[arg(long, value_parser = parse_disk, value_name = "BYTES", help_heading = "What is offered")]
    pub max_disk: Option<u64>,

    /// Only take tasks inside this time window (local time), e.g. "Mon-Fri 18:00-08:00" (ends
    /// the next morning), "Sat,Sun 00:00-24:00" or "22:00-06:00" (every day). Repeat for more
    /// windows. Outside every window the agent acts as paused [default: always].
    #[arg(long = "window", value_parser = parse_window, value_name = "WINDOW", help_heading = "When")]
    pub window: Vec<Window>,
    /// When a window closes, stop running tasks (the operator places them elsewhere) instead of
    /// letting them finish.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", help_heading = "When")]
    pub preempt: Option<bool>,
    /// Give the machine back while its owner uses it: when other programs' CPU load is above
    /// --idle-cpu-threshold, someone typed recently, or it runs on battery, running tasks are
    /// stopped and handed back to the operator, and no new ones come until it is idle again.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", help_heading = "When")]
    pub idle_only: Option<bool>,
    /// Idle-only: the owner is busy above this CPU load of everything but this agent, in
    /// percent of the whole machine [default: 30].
    #[arg(long, value_name = "PERCENT", help_heading = "When")]
    pub idle_cpu_threshold: Option<f64>,
    /// Idle-only: the owner is at the machine if there was keyboard or mouse input this many
    /// seconds ago (terminals and PS/2 devices; USB input in a desktop session cannot be seen)
    /// [default: 300].
    #[arg(long, value_name = "SECONDS", help_heading = "When")]
    pub idle_input_seconds: Option<u64>,
    /// Idle-only: running on battery counts as busy [default: true].
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", help_heading = "When")]
    pub idle_on_battery: Option<bool>,
    /// Idle-only: how long the owner must be idle again before tasks come back [default: 120].
    #[arg(long, value_name = "SECONDS", help_heading = "When")]
    pub idle_resume_seconds: Option<u64>,

    /// Also run `exec` tasks: plain commands on this machine, confined by Landlock to their
    /// scratch dir and the system's read-only trees, but with network access and no CPU or
    /// memory limit (docs/SECURITY.md). Only for job submitters you trust.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", help_heading = "Runtimes")]
    pub allow_exec: Option<bool>,
    /// Run exec tasks as this unprivileged user (a name or a uid) rather than as the agent:
    /// they then cannot read the agent's key or the provider's files. The agent must run as
    /// root to switch users.
    #[arg(long, value_name = "USER", help_heading = "Runtimes")]
    pub exec_user: Option<String>,
    /// Run exec tasks even where the kernel has no Landlock, so nothing stops them reading
    /// this agent's node key and state (see docs/SECURITY.md). Without it the agent refuses
    /// to start with --allow-exec on such a kernel.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", help_heading = "Runtimes")]
    pub allow_unsandboxed_exec: Option<bool>,
    /// Also run `container` tasks through this Docker or Podman Engine API socket, e.g.
    /// /var/run/docker.sock or $XDG_RUNTIME_DIR/podman/podman.sock. Containers run images
    /// pinned by digest as this agent's user, with no privileges, no capabilities, a read-only
    /// root filesystem, no host mounts but /scratch, and no network.
    #[arg(long, value_name = "PATH", help_heading = "Runtimes")]
    pub container_socket: Option<PathBuf>,
    /// Give containers a network when their job asks for it [default: never].
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", help_heading = "Runtimes")]
    pub allow_container_network: Option<bool>,
    /// Let jobs' module URLs reach loopback, private and link-local addresses (this machine,
    /// its home or office network, cloud metadata) [default: public addresses only]. Only for
    /// a pool on one private network you control.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", help_heading = "Runtimes")]
    pub allow_private_urls: Option<bool>,

    /// Serve this agent's Prometheus metrics on http://ADDR/metrics (tasks finished, failures
    /// by reason, spool depth, availability), e.g. 127.0.0.1:9464 [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl RunArgs {
    /// The flags given, for merging over the config file.
    pub fn flags(&self) -> Flags {
        Flags {
            config: self.config.clone(),
            state_dir: self.state_dir.clone(),
            allow_exec: self.allow_exec,
            exec_user: self.exec_user.clone(),
            container_socket: self.container_socket.clone(),
            allow_container_network: self.allow_container_network,
            allow_private_urls: self.allow_private_urls,
            cpus: self.cpus,
            memory: self.memory,
            max_gpus: self.max_gpus,
            max_disk: self.max_disk,
            window: self.window.clone(),
            preempt: self.preempt,
            idle_only: self.idle_only,
            idle_cpu_threshold: self.idle_cpu_threshold,
            idle_input_seconds: self.idle_input_seconds,
            idle_on_battery: self.idle_on_battery,
            idle_resume_seconds: self.idle_resume_seconds,
        }
    }
}

fn parse_cpu(s: &str) -> Result<u64, String> {
    quantity::cpu_millis("--cpus", s).map_err(|e| e.to_string())
}

fn parse_memory(s: &str) -> Result<u64, String> {
    quantity::memory_bytes("--memory", s).map_err(|e| e.to_string())
}

fn parse_disk(s: &str) -> Result<u64, String> {
    quantity::memory_bytes("--max-disk", s).map_err(|e| e.to_string())
}

fn parse_window(s: &str) -> Result<Window, String> {
    Window::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kommune-agent").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(&[&["run"], args].concat()).unwrap().command {
            Command::Run(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn on_off_flags_take_an_optional_value_so_they_can_override_the_file() {
        assert_eq!(run_args(&[]).allow_exec, None);
        assert_eq!(run_args(&["--allow-exec"]).allow_exec, Some(true));
        assert_eq!(run_args(&["--allow-exec=false"]).allow_exec, Some(false));
        assert_eq!(run_args(&["--idle-only", "--preempt"]).flags().idle_only, Some(true));
        let a = run_args(&["--window", "Mon-Fri 18:00-08:00", "--window", "Sat 00:00-24:00", "--max-disk", "20Gi", "--max-gpus", "1"]);
        assert_eq!(a.window.len(), 2);
        assert_eq!((a.max_disk, a.max_gpus), (Some(20 << 30), Some(1)));
    }

    #[test]
    fn the_sandbox_subcommand_parses_but_is_not_advertised() {
        assert_eq!(run_args(&["--allow-unsandboxed-exec"]).allow_unsandboxed_exec, Some(true));
        match parse(&["sandbox-exec", "--scratch", "/s/scratch/a", "--", "/bin/sh", "-c", "echo --scratch"]).unwrap().command {
            Command::SandboxExec(a) => {
                assert_eq!(a.scratch.as_deref(), Some(std::path::Path::new("/s/scratch/a")));
                assert_eq!(a.command, ["/bin/sh", "-c", "echo --scratch"]);
                assert!(!a.inner && !a.allow_unsandboxed && !a.probe);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["sandbox-exec", "--", "/bin/true"]).is_err(), "a task needs its scratch dir");
        assert!(!Cli::command().render_help().to_string().contains("sandbox-exec"));
    }

    #[test]
    fn wrong_input_is_refused_naming_the_flag() {
        for (args, want) in [
            (vec!["run", "--cpus", "lots"], "--cpus: \"lots\" is not a quantity"),
            (vec!["run", "--memory", "0"], "--memory: \"0\" must be greater than zero"),
            (vec!["run", "--max-disk", "20GB"], "--max-disk: \"20GB\" is not a quantity"),
            (vec!["run", "--max-gpus=-1"], "--max-gpus"),
            (vec!["run", "--window", "Mon-Fry 18:00-08:00"], "\"Fry\" is not a day"),
            (vec!["run", "--allow-exec=maybe"], "--allow-exec"),
            (vec!["run", "--idle-cpu-threshold", "high"], "--idle-cpu-threshold"),
            (vec!["run", "--bogus"], "unexpected argument '--bogus'"),
            (vec!["join", "--token", "x"], "--server"),
        ] {
            let err = parse(&args).unwrap_err().to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn every_command_has_help_with_examples() {
        let mut cli = Cli::command();
        for name in ["join", "run", "status", "pause", "leave"] {
            let help = cli.find_subcommand_mut(name).unwrap().render_long_help().to_string();
            assert!(help.contains("Example"), "{name} --help shows an example:\n{help}");
        }
        let run = cli.find_subcommand_mut("run").unwrap().render_long_help().to_string();
        assert!(run.contains("order of precedence") && run.contains("agent.toml"), "{run}");
    }
}
