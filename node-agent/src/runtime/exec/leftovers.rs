//! Task processes an earlier, killed run of the agent left behind: found by their working
//! directory under scratch/, stopped with their process groups and all their descendants.

use std::path::Path;

use super::super::sandbox;

/// Stops the task processes an earlier run of the agent left behind: an agent that was killed
/// (SIGKILL, OOM, power loss of the agent alone) could not stop its tasks, whose process groups
/// then outlive it, holding CPU and memory the operator has already given to other work. Every
/// process whose working directory is under `scratch_root` (where each attempt runs) has its
/// process group SIGKILLed, never the agent's own group, and so is every descendant of such a
/// process: a sandbox supervisor's descendants include the task's setsid'd processes, wherever
/// they moved their working directory. Call it before any task starts.
/// Returns the process groups stopped.
pub fn stop_leftover_tasks(proc_root: &Path, scratch_root: &Path) -> Vec<i32> {
    let Ok(scratch_root) = scratch_root.canonicalize() else { return vec![] };
    let Ok(entries) = std::fs::read_dir(proc_root) else { return vec![] };
    let own = nix::unistd::getpgrp().as_raw();
    let me = std::process::id() as i32;
    let leftovers: Vec<(i32, i32)> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&scratch_root)))
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse().ok()?;
            Some((pid, pgid_from_stat(&std::fs::read_to_string(e.path().join("stat")).ok()?)?))
        })
        .filter(|&(pid, g)| g > 1 && g != own && pid != me)
        .collect();
    // Found before anything dies: a process whose parent is killed is re-parented and no
    // longer shows as a descendant.
    let descendants: Vec<i32> = leftovers.iter().flat_map(|&(pid, _)| sandbox::descendants(proc_root, pid)).collect();
    let mut groups: Vec<i32> = leftovers.into_iter().map(|(_, g)| g).collect();
    groups.sort_unstable();
    groups.dedup();
    for &g in &groups {
        use nix::sys::signal::{Signal, killpg};
        if let Err(e) = killpg(nix::unistd::Pid::from_raw(g), Signal::SIGKILL) {
            tracing::warn!(pgid = g, error = %e, "cannot stop a task process group left by an earlier run");
        }
    }
    for pid in descendants {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    groups
}

/// The process group id from the text of /proc/<pid>/stat: the fifth field, counted after the
/// command name, which is in parentheses and may itself hold spaces and parentheses.
pub fn pgid_from_stat(stat: &str) -> Option<i32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // state, ppid, pgrp
    after_name.split_whitespace().nth(2)?.parse().ok()
}
