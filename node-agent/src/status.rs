//! `kommune-agent status`: what the running agent last reported about itself. `run` rewrites
//! `<state dir>/status.json` on every session change and heartbeat; `status` reads it and tells
//! whether that agent is still alive.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Written by `run`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub node_name: String,
    pub server: String,
    pub connected: bool,
    /// The provider paused this machine.
    #[serde(default)]
    pub paused: bool,
    /// Why the last session ended, when not connected.
    #[serde(default)]
    pub last_error: String,
    /// Unix milliseconds of the last heartbeat sent (0 if none).
    pub last_heartbeat_ms: i64,
    /// Unix milliseconds when this file was written.
    pub updated_ms: i64,
    pub offered_cpu_millis: u64,
    pub offered_memory_bytes: u64,
    pub runtimes: Vec<String>,
    pub running: Vec<String>,
}

impl AgentStatus {
    /// Writes the file atomically.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(".status.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("status always serialises"))?;
        std::fs::rename(tmp, dir.join("status.json"))
    }

    pub fn load(dir: &Path) -> Option<AgentStatus> {
        serde_json::from_slice(&std::fs::read(dir.join("status.json")).ok()?).ok()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
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
        out.push_str("paused:     yes, running tasks finish and no new ones come (`kommune-agent resume`)\n");
    }
    let hb = if s.last_heartbeat_ms > 0 { format!("{}s ago", (now_ms - s.last_heartbeat_ms).max(0) / 1000) } else { "never".into() };
    out.push_str(&format!("heartbeat:  {hb}\n"));
    out.push_str(&format!(
        "offered:    cpu {}, memory {}, runtimes {}\n",
        kommune_proto::quantity::format_cpu(s.offered_cpu_millis),
        kommune_proto::quantity::format_memory(s.offered_memory_bytes),
        s.runtimes.join(", ")
    ));
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
        assert!(text.contains("offered:    cpu 2, memory 4Gi, runtimes wasm, exec"));
        assert!(text.contains("running:    1 task(s)\n  - u.0.1"));
        assert!(!text.contains("paused"));
        let paused = AgentStatus { paused: true, ..status() };
        assert!(render("n1", "s", Some(&paused), true, 100_000).contains("paused:     yes"));
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
