//! The agent's state directory: what `join` writes and `run` reads. The node key never leaves
//! it and is readable by its owner only.
//!
//! ```text
//! <state dir>/agent.json   server URL, node name, region/zone
//! <state dir>/ca.crt       the operator CA (pinned at join)
//! <state dir>/node.crt     this node's client certificate
//! <state dir>/node.key     this node's ed25519 key (0600)
//! <state dir>/results/     finished attempts not yet acknowledged by the operator
//! <state dir>/receipts/    the receipt epoch and the log of acknowledged usage receipts
//! <state dir>/scratch/     per-attempt scratch directories
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What `join` records besides the key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// The operator's gateway URL.
    pub server: String,
    /// The node name the operator assigned.
    pub node_name: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
}

/// Everything needed to open a session.
#[derive(Debug, Clone)]
pub struct AgentState {
    pub dir: PathBuf,
    pub config: AgentConfig,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A state directory problem, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("this machine has not joined yet ({0} has no agent.json); run `kommune-agent join --server URL --token TOKEN` first")]
    NotJoined(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not valid: {message}")]
    Invalid { path: String, message: String },
    #[error("{0} already holds a joined node ({1}); pass --force to replace it, or use another --state-dir")]
    AlreadyJoined(String, String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.display().to_string(), source }
}

/// `$KOMMUNE_STATE_DIR`, else `$XDG_STATE_HOME/kommune`, else `~/.local/state/kommune`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KOMMUNE_STATE_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("kommune");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/kommune")
}

impl AgentState {
    /// Loads a joined state directory.
    pub fn load(dir: &Path) -> Result<AgentState, StateError> {
        let cfg_path = dir.join("agent.json");
        let raw = match std::fs::read_to_string(&cfg_path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StateError::NotJoined(dir.display().to_string())),
            Err(e) => return Err(io(&cfg_path)(e)),
        };
        let config: AgentConfig =
            serde_json::from_str(&raw).map_err(|e| StateError::Invalid { path: cfg_path.display().to_string(), message: e.to_string() })?;
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(io(&p))
        };
        Ok(AgentState { dir: dir.to_path_buf(), config, ca_pem: read("ca.crt")?, cert_pem: read("node.crt")?, key_pem: read("node.key")? })
    }

    /// Refuses to overwrite a joined directory unless `force`.
    pub fn check_free(dir: &Path, force: bool) -> Result<(), StateError> {
        if force {
            return Ok(());
        }
        match AgentState::load(dir) {
            Ok(s) => Err(StateError::AlreadyJoined(dir.display().to_string(), s.config.node_name)),
            Err(_) => Ok(()),
        }
    }

    /// Writes the state directory; the key is created with mode 0600.
    pub fn save(&self) -> Result<(), StateError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        write_private(&self.dir.join("node.key"), self.key_pem.as_bytes())?;
        for (name, body) in [("ca.crt", &self.ca_pem), ("node.crt", &self.cert_pem)] {
            let p = self.dir.join(name);
            std::fs::write(&p, body).map_err(io(&p))?;
        }
        let p = self.dir.join("agent.json");
        let json = serde_json::to_string_pretty(&self.config).expect("config always serialises");
        std::fs::write(&p, json).map_err(io(&p))
    }

    pub fn results_dir(&self) -> PathBuf {
        self.dir.join("results")
    }

    pub fn receipts_dir(&self) -> PathBuf {
        self.dir.join("receipts")
    }

    pub fn scratch_dir(&self) -> PathBuf {
        self.dir.join("scratch")
    }

    /// Present while the provider has paused this machine (`kommune-agent pause`).
    pub fn pause_file(&self) -> PathBuf {
        self.dir.join("paused")
    }

    pub fn is_paused(&self) -> bool {
        self.pause_file().exists()
    }

    /// Pauses (finish what runs, take nothing new) or resumes. The running agent notices
    /// within a second.
    pub fn set_paused(&self, paused: bool) -> Result<(), StateError> {
        let path = self.pause_file();
        let result = if paused { std::fs::write(&path, b"paused by the provider\n") } else { std::fs::remove_file(&path) };
        match result {
            Ok(()) => Ok(()),
            Err(e) if !paused && e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), StateError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(data).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(dir: &Path) -> AgentState {
        AgentState {
            dir: dir.to_path_buf(),
            config: AgentConfig { server: "https://x:1".into(), node_name: "n1".into(), region: "eu".into(), zone: String::new() },
            ca_pem: "CA".into(),
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
        }
    }

    #[test]
    fn save_load_round_trip_with_a_private_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        assert!(matches!(AgentState::load(&dir), Err(StateError::NotJoined(_))));
        AgentState::check_free(&dir, false).unwrap();
        state(&dir).save().unwrap();
        let loaded = AgentState::load(&dir).unwrap();
        assert_eq!(loaded.config, state(&dir).config);
        assert_eq!(loaded.key_pem, "KEY");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("node.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let err = AgentState::check_free(&dir, false).unwrap_err().to_string();
        assert!(err.contains("--force") && err.contains("n1"), "{err}");
        AgentState::check_free(&dir, true).unwrap();
    }

    #[test]
    fn not_joined_error_says_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let err = AgentState::load(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("kommune-agent join"), "{err}");
        std::fs::write(tmp.path().join("agent.json"), "{").unwrap();
        assert!(matches!(AgentState::load(tmp.path()), Err(StateError::Invalid { .. })));
    }
}
