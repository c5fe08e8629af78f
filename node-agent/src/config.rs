//! `kommune-agent run` settings from a TOML file and flags. Every `run` flag has a key of the same
//! name in the file; a flag given on the command line wins over the file, the file over the
//! built-in default. Unknown keys are an error naming the key and the file, so a typo never
//! silently offers more than the provider meant.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kommune_proto::quantity;
use serde::Deserialize;

use crate::idle::IdleConfig;
use crate::inventory::Caps;
use crate::schedule::Window;

/// The file's name in the state directory, read when `--config` is not given.
pub const DEFAULT_FILE: &str = "agent.toml";

/// A config file problem; the message names the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source} (check --config)")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path}: `{key}`: {message}")]
    Invalid { path: String, key: &'static str, message: String },
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
}

/// A number or a Kubernetes quantity string: `cpus = 2`, `cpus = "1500m"`, `memory = "4Gi"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged, expecting = "a number or a quantity string such as \"1500m\" or \"4Gi\"")]
pub enum QuantityValue {
    Int(u64),
    Float(f64),
    Text(String),
}

impl QuantityValue {
    fn text(&self) -> String {
        match self {
            QuantityValue::Int(n) => n.to_string(),
            QuantityValue::Float(f) => f.to_string(),
            QuantityValue::Text(s) => s.clone(),
        }
    }
}

/// The file's contents: the `run` flags, by the same names. Absent keys leave the default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileSettings {
    pub state_dir: Option<PathBuf>,
    pub allow_exec: Option<bool>,
    pub exec_user: Option<String>,
    pub container_socket: Option<PathBuf>,
    pub allow_container_network: Option<bool>,
    pub allow_private_urls: Option<bool>,
    pub cpus: Option<QuantityValue>,
    pub memory: Option<QuantityValue>,
    pub max_gpus: Option<u32>,
    pub max_disk: Option<QuantityValue>,
    #[serde(alias = "windows")]
    pub window: Option<Vec<String>>,
    pub preempt: Option<bool>,
    pub idle_only: Option<bool>,
    pub idle_cpu_threshold: Option<f64>,
    pub idle_input_seconds: Option<u64>,
    pub idle_on_battery: Option<bool>,
    pub idle_resume_seconds: Option<u64>,
}

impl FileSettings {
    /// Parses a file's text; `path` is for messages.
    pub fn parse(path: &Path, text: &str) -> Result<FileSettings, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.display().to_string(), message: one_line(&e.to_string()) })
    }

    /// Reads `explicit`, or `<state dir>/agent.toml` when it exists. Returns the file used.
    pub fn load(explicit: Option<&Path>, state_dir: &Path) -> Result<Option<(PathBuf, FileSettings)>, ConfigError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let p = state_dir.join(DEFAULT_FILE);
                if !p.exists() {
                    return Ok(None);
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Ok(Some((path.clone(), Self::parse(&path, &text)?)))
    }
}

/// toml's messages draw the offending line over several lines; one line with the place, the
/// quoted source line (which names the key) and the message is what a terminal needs.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let location = lines.first().map(|l| l.trim_start_matches("TOML parse error at ")).unwrap_or_default();
    let source = lines.iter().find_map(|l| l.split_once(" | ").filter(|(n, _)| n.trim().parse::<u32>().is_ok()).map(|(_, src)| src.trim()));
    let what = lines.last().copied().unwrap_or_default();
    match source {
        Some(src) if lines.len() > 1 => format!("{location} (`{src}`): {what}"),
        _ if lines.len() > 1 => format!("{location}: {what}"),
        _ => what.to_string(),
    }
}

/// What `run` was given on the command line; None means "not given".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub allow_exec: Option<bool>,
    pub exec_user: Option<String>,
    pub container_socket: Option<PathBuf>,
    pub allow_container_network: Option<bool>,
    pub allow_private_urls: Option<bool>,
    pub cpus: Option<u64>,
    pub memory: Option<u64>,
    pub max_gpus: Option<u32>,
    pub max_disk: Option<u64>,
    pub window: Vec<Window>,
    pub preempt: Option<bool>,
    pub idle_only: Option<bool>,
    pub idle_cpu_threshold: Option<f64>,
    pub idle_input_seconds: Option<u64>,
    pub idle_on_battery: Option<bool>,
    pub idle_resume_seconds: Option<u64>,
}

/// Everything `run` acts on, after flags, file and defaults are merged.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    /// The config file read, if any.
    pub config_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub allow_exec: bool,
    /// Run exec tasks as this user (a name or a uid) instead of the agent's own.
    pub exec_user: Option<String>,
    pub container_socket: Option<PathBuf>,
    pub allow_container_network: bool,
    /// Module URLs may reach non-public addresses.
    pub allow_private_urls: bool,
    pub caps: Caps,
    /// Empty: always available.
    pub windows: Vec<Window>,
    /// Outside every window, stop running tasks instead of letting them finish.
    pub preempt: bool,
    /// Set in idle-only mode.
    pub idle: Option<IdleConfig>,
}

/// Merges flags over the file over the defaults, and checks the result.
pub fn resolve(flags: &Flags, file: Option<(PathBuf, FileSettings)>, default_state_dir: PathBuf) -> Result<RunSettings, ConfigError> {
    let (path, f) = match file {
        Some((p, f)) => (Some(p), f),
        None => (None, FileSettings::default()),
    };
    let shown = path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let invalid = |key: &'static str, message: String| ConfigError::Invalid { path: shown.clone(), key, message };
    let quantity = |key: &'static str, v: &Option<QuantityValue>, parse: fn(&'static str, &str) -> Result<u64, quantity::QuantityError>| {
        v.as_ref()
            .map(|v| parse(key, &v.text()).map_err(|e| invalid(key, e.to_string().trim_start_matches(key).trim_start_matches(": ").to_string())))
            .transpose()
    };
    let cpus = match flags.cpus {
        Some(c) => Some(c),
        None => quantity("cpus", &f.cpus, quantity::cpu_millis)?,
    };
    let memory = match flags.memory {
        Some(m) => Some(m),
        None => quantity("memory", &f.memory, quantity::memory_bytes)?,
    };
    let max_disk = match flags.max_disk {
        Some(d) => Some(d),
        None => quantity("max-disk", &f.max_disk, quantity::memory_bytes)?,
    };
    let windows = if !flags.window.is_empty() {
        flags.window.clone()
    } else {
        f.window.iter().flatten().map(|w| Window::parse(w).map_err(|e| invalid("window", e.to_string()))).collect::<Result<_, _>>()?
    };
    let idle_only = flags.idle_only.or(f.idle_only).unwrap_or(false);
    let threshold = flags.idle_cpu_threshold.or(f.idle_cpu_threshold).unwrap_or(IdleConfig::default().cpu_threshold_percent);
    if !(threshold > 0.0 && threshold <= 100.0) {
        let message = format!("{threshold} is not a percentage between 0 (exclusive) and 100");
        return Err(if flags.idle_cpu_threshold.is_some() {
            ConfigError::Flag { flag: "--idle-cpu-threshold", message }
        } else {
            invalid("idle-cpu-threshold", message)
        });
    }
    let defaults = IdleConfig::default();
    let idle = idle_only.then(|| IdleConfig {
        cpu_threshold_percent: threshold,
        input_idle: flags.idle_input_seconds.or(f.idle_input_seconds).map_or(defaults.input_idle, Duration::from_secs),
        pause_on_battery: flags.idle_on_battery.or(f.idle_on_battery).unwrap_or(defaults.pause_on_battery),
        busy_samples: defaults.busy_samples,
        resume_after: flags.idle_resume_seconds.or(f.idle_resume_seconds).map_or(defaults.resume_after, Duration::from_secs),
    });
    Ok(RunSettings {
        config_file: path,
        state_dir: flags.state_dir.clone().or(f.state_dir).unwrap_or(default_state_dir),
        allow_exec: flags.allow_exec.or(f.allow_exec).unwrap_or(false),
        exec_user: flags.exec_user.clone().or(f.exec_user).filter(|u| !u.is_empty()),
        container_socket: flags.container_socket.clone().or(f.container_socket),
        allow_container_network: flags.allow_container_network.or(f.allow_container_network).unwrap_or(false),
        allow_private_urls: flags.allow_private_urls.or(f.allow_private_urls).unwrap_or(false),
        caps: Caps { cpu_millis: cpus, memory_bytes: memory, gpus: flags.max_gpus.or(f.max_gpus), disk_bytes: max_disk },
        windows,
        preempt: flags.preempt.or(f.preempt).unwrap_or(false),
        idle,
    })
}

/// A commented example file: `kommune-agent config example > ~/.local/state/kommune/agent.toml`.
pub const EXAMPLE: &str = r#"# kommune-agent run settings. Every key is also a `run` flag of the same name; a flag given on
# the command line wins over this file. Read from <state dir>/agent.toml, or from --config FILE.
# Unknown keys are an error. Remove a line to keep the default.

# Where `join` stored this node's identity (default: $KOMMUNE_STATE_DIR, else
# $XDG_STATE_HOME/kommune, else ~/.local/state/kommune).
# state-dir = "/var/lib/kommune-agent"

# --- What this machine offers. Caps only lower what the machine has. ---
# CPU: cores ("2", 2) or millicores ("1500m"). Default: all cores.
cpus = 2
# Memory, e.g. "4Gi". Default: all memory.
memory = "4Gi"
# GPUs (detected through NVML or nvidia-smi; never more than detected). Default: all detected.
max-gpus = 0
# Scratch disk, e.g. "20Gi". Default: the free space of the state directory's filesystem.
max-disk = "20Gi"

# --- When. Local time; windows ending before they start cross midnight. Default: always. ---
window = ["Mon-Fri 18:00-08:00", "Sat,Sun 00:00-24:00"]
# Outside every window, stop running tasks (the operator places them elsewhere) instead of
# letting them finish.
preempt = false

# --- Idle-only: give the machine back while its owner uses it. ---
idle-only = true
# Busy when the CPU load of everything but this agent and its tasks is above this percent.
idle-cpu-threshold = 30
# Busy when there was keyboard or mouse input this recently (terminals and PS/2 devices only;
# see docs/PROVIDERS.md for what can be detected).
idle-input-seconds = 300
# Busy while running on battery.
idle-on-battery = true
# How long the owner must be idle again before tasks come back.
idle-resume-seconds = 120

# --- Runtimes beyond wasm (always on). ---
# Plain commands on this machine, outside the sandbox: trusted fleets only.
allow-exec = false
# Run exec tasks as this unprivileged user (name or uid) instead of the agent's own; needs the
# agent to run as root. Recommended whenever exec is allowed on a shared machine.
# exec-user = "kommune-task"
# Docker or Podman Engine API socket for container tasks.
# container-socket = "/var/run/docker.sock"
# Give containers a network when their job asks for it.
allow-container-network = false
# Let jobs' module URLs reach loopback, private and link-local addresses (a pool on one private
# network only): by default a job cannot make this machine fetch from its own network.
allow-private-urls = false
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Option<(PathBuf, FileSettings)> {
        let path = PathBuf::from("/etc/kommune/agent.toml");
        Some((path.clone(), FileSettings::parse(&path, text).unwrap()))
    }

    fn resolve_text(flags: &Flags, text: &str) -> Result<RunSettings, ConfigError> {
        resolve(flags, file(text), "/default".into())
    }

    #[test]
    fn the_example_file_is_valid_and_sets_every_key() {
        let s = resolve_text(&Flags::default(), EXAMPLE).unwrap();
        assert_eq!(s.caps, Caps { cpu_millis: Some(2000), memory_bytes: Some(4 << 30), gpus: Some(0), disk_bytes: Some(20 << 30) });
        assert_eq!(s.windows.len(), 2);
        assert_eq!(s.idle, Some(IdleConfig::default()));
        assert_eq!(s.config_file, Some(PathBuf::from("/etc/kommune/agent.toml")));
        let uncommented = EXAMPLE.replace("# state-dir", "state-dir").replace("# container-socket", "container-socket");
        let s = resolve_text(&Flags::default(), &uncommented).unwrap();
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/kommune-agent"));
        assert_eq!(s.container_socket, Some(PathBuf::from("/var/run/docker.sock")));
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let text = "cpus = \"1500m\"\nmemory = 1073741824\nallow-exec = true\nwindow = [\"Sat 10:00-12:00\"]\nidle-only = true\nidle-cpu-threshold = 50\n";
        let s = resolve_text(&Flags::default(), text).unwrap();
        assert_eq!((s.caps.cpu_millis, s.caps.memory_bytes, s.allow_exec), (Some(1500), Some(1 << 30), true));
        assert_eq!(s.windows, vec![Window::parse("Sat 10:00-12:00").unwrap()]);
        assert_eq!(s.idle.as_ref().unwrap().cpu_threshold_percent, 50.0);
        assert_eq!(s.state_dir, PathBuf::from("/default"));

        let flags = Flags {
            cpus: Some(500),
            allow_exec: Some(false),
            window: vec![Window::parse("Sun 01:00-02:00").unwrap()],
            idle_only: Some(false),
            state_dir: Some("/flag".into()),
            ..Flags::default()
        };
        let s = resolve_text(&flags, text).unwrap();
        assert_eq!((s.caps.cpu_millis, s.caps.memory_bytes, s.allow_exec), (Some(500), Some(1 << 30), false));
        assert_eq!(s.windows, vec![Window::parse("Sun 01:00-02:00").unwrap()], "flag windows replace the file's");
        assert_eq!(s.idle, None);
        assert_eq!(s.state_dir, PathBuf::from("/flag"));

        let s = resolve(&Flags::default(), None, "/default".into()).unwrap();
        assert_eq!((s.allow_exec, s.preempt, s.idle.is_none(), s.windows.is_empty(), s.caps), (false, false, true, true, Caps::default()));
    }

    #[test]
    fn private_urls_stay_closed_unless_the_file_or_a_flag_opens_them() {
        assert!(!resolve_text(&Flags::default(), "").unwrap().allow_private_urls);
        assert!(resolve_text(&Flags::default(), "allow-private-urls = true\n").unwrap().allow_private_urls);
        let closed = Flags { allow_private_urls: Some(false), ..Flags::default() };
        assert!(!resolve_text(&closed, "allow-private-urls = true\n").unwrap().allow_private_urls);
    }

    #[test]
    fn an_unknown_key_names_the_key_and_the_file() {
        let err = FileSettings::parse(Path::new("/etc/kommune/agent.toml"), "cpus = 2\nmax-cpu = 4\n").unwrap_err().to_string();
        assert!(err.starts_with("config file /etc/kommune/agent.toml: "), "{err}");
        assert!(err.contains("unknown field `max-cpu`"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_file() {
        let table = [
            ("cpus = \"lots\"", "`cpus`: \"lots\" is not a quantity"),
            ("memory = \"0\"", "`memory`: \"0\" must be greater than zero"),
            ("max-disk = \"20GB\"", "`max-disk`: \"20GB\" is not a quantity"),
            ("window = [\"Mon-Fry 10:00-11:00\"]", "`window`: invalid time window \"Mon-Fry 10:00-11:00\""),
            ("idle-only = true\nidle-cpu-threshold = 0", "`idle-cpu-threshold`: 0 is not a percentage"),
            ("idle-cpu-threshold = 101", "`idle-cpu-threshold`: 101 is not a percentage"),
        ];
        for (text, want) in table {
            let err = resolve_text(&Flags::default(), text).unwrap_err().to_string();
            assert!(err.contains("/etc/kommune/agent.toml") && err.contains(want), "{text}: {err}");
        }
        for (text, want) in
            [("cpus = true", "cpus"), ("max-gpus = -1", "max-gpus"), ("allow-exec = \"yes\"", "allow-exec"), ("window = \"Mon 10:00-11:00\"", "window")]
        {
            let err = FileSettings::parse(Path::new("f.toml"), text).unwrap_err().to_string();
            assert!(err.contains("f.toml"), "{text}: {err}");
            assert!(err.contains("line 1") && err.contains(&format!("(`{want} =")), "{text}: names where and which key: {err}");
        }
        let flag = Flags { idle_cpu_threshold: Some(150.0), ..Flags::default() };
        let err = resolve(&flag, None, "/d".into()).unwrap_err().to_string();
        assert_eq!(err, "--idle-cpu-threshold: 150 is not a percentage between 0 (exclusive) and 100");
    }

    #[test]
    fn the_default_file_is_optional_but_an_explicit_one_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(FileSettings::load(None, dir.path()).unwrap(), None);
        std::fs::write(dir.path().join(DEFAULT_FILE), "cpus = 1").unwrap();
        let (path, f) = FileSettings::load(None, dir.path()).unwrap().unwrap();
        assert_eq!((path, f.cpus), (dir.path().join(DEFAULT_FILE), Some(QuantityValue::Int(1))));
        let missing = dir.path().join("nope.toml");
        let err = FileSettings::load(Some(&missing), dir.path()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("cannot read the config file {}", missing.display())), "{err}");
    }
}
