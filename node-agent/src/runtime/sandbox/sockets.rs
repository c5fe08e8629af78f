//! Hides the machine's socket directories (/run, /tmp, ...) from an exec task behind empty
//! tmpfs mounts, in a user + mount namespace of its own: Landlock governs connect() only from ABI 9.
//!
//! Without this a task could reach the user's D-Bus session (`systemd-run --user` starts
//! processes outside every restriction), the Docker or Podman socket, or an ssh-agent, all of
//! which Landlock before ABI 9 (Linux 7.1) does not stop. Needs unprivileged user namespaces.

use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{getgid, getuid};

/// Where pathname unix sockets usually live: the runtime dirs (system and per user, with the
/// D-Bus buses, docker.sock and podman's socket) and the temp dirs (ssh-agent, X11, tmux).
const SOCKET_DIRS: &[&str] = &["/run", "/var/run", "/tmp", "/var/tmp", "/dev/shm"];

/// What [`hide_socket_dirs`] managed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hidden {
    /// These directories are empty tmpfs mounts for the task.
    Dirs(Vec<&'static str>),
    /// No namespace could be made (e.g. unprivileged user namespaces are off); nothing changed.
    Unavailable(String),
}

/// Enters a new user + mount namespace (same uid and gid inside) and mounts an empty tmpfs over
/// each socket directory that exists, is not a symlink and does not hold `scratch`. An error
/// means the process is half-way (in a namespace it could not set up) and must not run a task.
pub fn hide_socket_dirs(scratch: Option<&Path>) -> Result<Hidden, String> {
    let (uid, gid) = (getuid(), getgid());
    if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS) {
        return Ok(Hidden::Unavailable(format!("no user namespace: {e}")));
    }
    // The same ids inside, so files keep their owners; setgroups must be denied before an
    // unprivileged process may write gid_map.
    let map = |file: &str, text: String| std::fs::write(format!("/proc/self/{file}"), text).map_err(|e| format!("cannot write /proc/self/{file}: {e}"));
    map("setgroups", "deny".into())?;
    map("uid_map", format!("{uid} {uid} 1"))?;
    map("gid_map", format!("{gid} {gid} 1"))?;
    // Nothing mounted here may propagate back to the machine.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).map_err(|e| format!("cannot make mounts private: {e}"))?;
    let scratch = scratch.map(|s| s.canonicalize().unwrap_or_else(|_| s.to_path_buf()));
    let mut hidden = Vec::new();
    for &dir in SOCKET_DIRS {
        let path = Path::new(dir);
        let is_real_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
        if !is_real_dir || scratch.as_deref().is_some_and(|s| s.starts_with(path)) {
            continue;
        }
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(Some("tmpfs"), path, Some("tmpfs"), flags, Some("size=64k,mode=0755")).map_err(|e| format!("cannot hide {dir}: {e}"))?;
        hidden.push(dir);
    }
    Ok(Hidden::Dirs(hidden))
}
