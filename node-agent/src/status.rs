//! `kommune-agent status`: what the running agent last reported about itself. `run` rewrites
//! `<state dir>/status.json` on every session change and heartbeat; `status` reads it and tells
//! whether that agent is still alive.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kommune_proto::quantity::{format_cpu, format_memory};
use serde::{Deserialize, Serialize};

/// Written by `run`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub node_name: String,
    pub server: String,
    pub connected: bool,
    /// The machine takes no new tasks (see `pause_reason`).
    #[serde(default)]
    pub paused: bool,
    /// Why paused: the provider, a closed time window, or the owner's own use.
    #[serde(default)]
    pub pause_reason: String,
    /// Running tasks are being stopped and handed back, not left to finish.
    #[serde(default)]
    pub preempting: bool,
    /// Why the last session ended, when not connected.
    #[serde(default)]
    pub last_error: String,
    /// Unix milliseconds of the last heartbeat sent (0 if none).
    pub last_heartbeat_ms: i64,
    /// Unix milliseconds when this file was written.
    pub updated_ms: i64,
    pub offered_cpu_millis: u64,
    pub offered_memory_bytes: u64,
    #[serde(default)]
    pub offered_disk_bytes: u64,
    #[serde(default)]
    pub offered_gpus: Vec<OfferedGpu>,
    pub runtimes: Vec<String>,
    pub running: Vec<String>,
    /// The time windows, as the provider gave them; empty means always.
    #[serde(default)]
    pub windows: String,
    /// Idle-only mode's settings; empty when off.
    #[serde(default)]
    pub idle_only: String,
    /// What idle-only mode last saw of the owner's use.
    #[serde(default)]
    pub owner: String,
}

/// A GPU as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedGpu {
    pub model: String,
    pub memory_bytes: u64,
}

/// Keeps `<state dir>/status.json` current for `kommune-agent status`; shared by the session
/// loop and the availability watcher. Best effort: a write that fails is logged at debug.
pub struct StatusFile {
    dir: PathBuf,
    status: Mutex<AgentStatus>,
}

impl StatusFile {
    pub fn new(dir: PathBuf, status: AgentStatus) -> Self {
        StatusFile { dir, status: Mutex::new(status) }
    }

    /// Applies `change` and rewrites the file.
    pub fn write(&self, change: impl FnOnce(&mut AgentStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut status);
        status.updated_ms = kommune_proto::now_ms();
        if let Err(e) = status.save(&self.dir) {
            tracing::debug!(error = %e, "cannot write status.json");
        }
    }
}

/// Bytes in the largest unit, one decimal when not exact: "20Gi", "49.7Gi".
pub fn approx_bytes(bytes: u64) -> String {
    for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20)] {
        if bytes >= 1 << shift {
            return if bytes.is_multiple_of(1 << shift) { format_memory(bytes) } else { format!("{:.1}{suffix}", bytes as f64 / (1u64 << shift) as f64) };
        }
    }
    format_memory(bytes)
}

impl AgentStatus {
    /// Writes the file atomically.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!(".status.json.{}.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("status always serialises"))?;
        std::fs::rename(tmp, dir.join("status.json"))
    }

    pub fn load(dir: &Path) -> Option<AgentStatus> {
        serde_json::from_slice(&std::fs::read(dir.join("status.json")).ok()?).ok()
    }
}

/// A status file older than this means the agent that wrote it is not running any more.
pub const STALE_MS: i64 = 60_000;

/// Renders what `status` prints. Pure: `alive` says whether the writing process still runs.
pub fn render(node: &str, server: &str, status: Option<&AgentStatus>, alive: bool, now_ms: i64) -> String {
    let mut out = format!("node:       {node}\nserver:     {server}\n");
    let Some(s) = status.filter(|s| alive && now_ms - s.updated_ms < STALE_MS) else {
        out.push_str("agent:      not running (start it with `kommune-agent run`)\n");
        return out;
    };
    out.push_str(&format!("agent:      running (pid {})\n", s.pid));
    if s.connected {
        out.push_str("session:    connected\n");
    } else if s.last_error.is_empty() {
        out.push_str("session:    connecting\n");
    } else {
        out.push_str(&format!("session:    disconnected: {}\n", s.last_error));
    }
    if s.paused {
        let reason = if s.pause_reason.is_empty() { "by the provider" } else { s.pause_reason.as_str() };
        let then = if s.preempting { "running tasks are handed back, no new ones come" } else { "running tasks finish, no new ones come" };
        out.push_str(&format!("paused:     {reason}\n            ({then})\n"));
    } else {
        out.push_str("paused:     no, taking tasks\n");
    }
    let hb = if s.last_heartbeat_ms > 0 { format!("{}s ago", (now_ms - s.last_heartbeat_ms).max(0) / 1000) } else { "never".into() };
    out.push_str(&format!("heartbeat:  {hb}\n"));
    let gpus = match s.offered_gpus.as_slice() {
        [] => "no GPUs".to_string(),
        gs => format!("{} GPU(s) ({})", gs.len(), gs.iter().map(|g| format!("{} {}", g.model, approx_bytes(g.memory_bytes))).collect::<Vec<_>>().join("; ")),
    };
    out.push_str(&format!(
        "offered:    cpu {}, memory {}, disk {}, {gpus}\n            runtimes {}\n",
        format_cpu(s.offered_cpu_millis),
        format_memory(s.offered_memory_bytes),
        approx_bytes(s.offered_disk_bytes),
        s.runtimes.join(", ")
    ));
    out.push_str(&format!("schedule:   {}\n", if s.windows.is_empty() { "always" } else { s.windows.as_str() }));
    if !s.idle_only.is_empty() {
        out.push_str(&format!("idle-only:  {}\n", s.idle_only));
        if !s.owner.is_empty() {
            out.push_str(&format!("owner:      {}\n", s.owner));
        }
    }
    out.push_str(&format!("running:    {} task(s)\n", s.running.len()));
    for id in &s.running {
        out.push_str(&format!("  - {id}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> AgentStatus {
        AgentStatus {
            pid: 42,
            node_name: "n1".into(),
            server: "https://x:1".into(),
            connected: true,
            last_heartbeat_ms: 95_000,
            updated_ms: 99_000,
            offered_cpu_millis: 2000,
            offered_memory_bytes: 4 << 30,
            offered_disk_bytes: (49 << 30) + (1 << 29),
            offered_gpus: vec![OfferedGpu { model: "NVIDIA L4".into(), memory_bytes: (22 << 30) + (1 << 29) }],
            runtimes: vec!["wasm".into(), "exec".into()],
            running: vec!["u.0.1".into()],
            ..Default::default()
        }
    }

    #[test]
    fn renders_a_connected_agent() {
        let text = render("n1", "https://x:1", Some(&status()), true, 100_000);
        assert!(text.contains("agent:      running (pid 42)"), "{text}");
        assert!(text.contains("session:    connected"));
        assert!(text.contains("heartbeat:  5s ago"));
        assert!(text.contains("offered:    cpu 2, memory 4Gi, disk 49.5Gi, 1 GPU(s) (NVIDIA L4 22.5Gi)\n            runtimes wasm, exec\n"), "{text}");
        assert!(text.contains("running:    1 task(s)\n  - u.0.1"));
        assert!(text.contains("paused:     no, taking tasks"));
        assert!(text.contains("schedule:   always"));
        assert!(!text.contains("idle-only"));
    }

    #[test]
    fn says_why_it_is_paused_and_what_happens_to_running_tasks() {
        let manual = AgentStatus { paused: true, ..status() };
        assert!(render("n1", "s", Some(&manual), true, 100_000).contains("paused:     by the provider\n            (running tasks finish, no new ones come)"));
        let window =
            AgentStatus { paused: true, pause_reason: "outside time window Mon-Fri 18:00-08:00".into(), windows: "Mon-Fri 18:00-08:00".into(), ..status() };
        let text = render("n1", "s", Some(&window), true, 100_000);
        assert!(text.contains("paused:     outside time window Mon-Fri 18:00-08:00\n"), "{text}");
        assert!(text.contains("schedule:   Mon-Fri 18:00-08:00\n"), "{text}");
        let owner = AgentStatus {
            paused: true,
            preempting: true,
            pause_reason: "owner busy (cpu 63% > 30%)".into(),
            idle_only: "busy above 30% cpu, input within 300s, on battery".into(),
            owner: "cpu 63% by other programs, no detectable input".into(),
            ..status()
        };
        let text = render("n1", "s", Some(&owner), true, 100_000);
        assert!(text.contains("paused:     owner busy (cpu 63% > 30%)\n            (running tasks are handed back, no new ones come)"), "{text}");
        assert!(text.contains("idle-only:  busy above 30% cpu"), "{text}");
        assert!(text.contains("owner:      cpu 63% by other programs"), "{text}");
    }

    #[test]
    fn a_dead_or_stale_agent_is_not_running() {
        for (alive, now) in [(false, 100_000), (true, 99_000 + STALE_MS)] {
            let text = render("n1", "s", Some(&status()), alive, now);
            assert!(text.contains("not running"), "{text}");
        }
        assert!(render("n1", "s", None, true, 0).contains("not running"));
        let mut s = status();
        s.connected = false;
        s.last_error = "cannot reach the operator".into();
        assert!(render("n1", "s", Some(&s), true, 100_000).contains("disconnected: cannot reach the operator"));
    }

    #[test]
    fn save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        status().save(dir.path()).unwrap();
        assert_eq!(AgentStatus::load(dir.path()), Some(status()));
    }
}
