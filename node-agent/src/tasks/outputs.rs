//! An attempt's outputs when it ends: stdout, stderr and the declared paths under `out/`,
//! bounded by the operator's plan (the excess is reported, never silently cut), digested and
//! uploaded to the operator or to the job's bucket through presigned PUT URLs.

use std::io::Read;
use std::path::{Path, PathBuf};

use kommune_proto::v1::{OutputFile, OutputPlan};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::ModuleSource;
use crate::runtime::{Ending, Outcome};

/// Most directory entries walked under one declared directory: a task cannot make the agent
/// walk a million files.
const MAX_WALK: usize = 10_000;

/// One output to send: `size` bytes of `path` (the rest, `excess`, is not sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub excess: u64,
    pub sha256: String,
}

/// Regular files only: a symlink could point the upload at the provider's own files.
fn regular_len(path: &Path) -> Option<u64> {
    let m = std::fs::symlink_metadata(path).ok()?;
    m.file_type().is_file().then_some(m.len())
}

/// Files of `dir` (recursively, sorted, regular files only), as (name under `out/`, path).
fn walk(dir: &Path, name: &str, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if out.len() >= MAX_WALK {
            return;
        }
        let Some(file) = e.file_name().to_str().map(str::to_string) else { continue };
        let (path, child) = (e.path(), format!("{name}/{file}"));
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&path, &child, out),
            Ok(t) if t.is_file() => out.push((child, path)),
            _ => {}
        }
    }
}

/// What the plan lets the attempt send: stdout, stderr, then the declared paths in order, each
/// cut to the per-file limit and together to the per-attempt limit and file count. Outputs past
/// the count are reported with size 0 and all their bytes as excess.
pub fn collect(plan: &OutputPlan, scratch: &Path, streams: &Path) -> (Vec<Collected>, Vec<OutputFile>) {
    let mut found: Vec<(String, PathBuf)> = vec![];
    for stream in ["stdout", "stderr"] {
        found.push((stream.to_string(), streams.join(stream)));
    }
    for p in &plan.paths {
        if !kommune_proto::is_plain_relative_path(p) {
            continue;
        }
        let path = scratch.join("out").join(p);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => walk(&path, &format!("out/{p}"), &mut found),
            Ok(m) if m.is_file() => found.push((format!("out/{p}"), path)),
            _ => {}
        }
    }
    let (mut send, mut unsent) = (vec![], vec![]);
    let mut left = plan.max_attempt_bytes;
    for (name, path) in found {
        let Some(len) = regular_len(&path) else { continue };
        if send.len() >= plan.max_files as usize || (!plan.put_urls.is_empty() && !plan.put_urls.contains_key(&name)) {
            unsent.push(OutputFile { name, size: 0, sha256: String::new(), excess_bytes: len });
            continue;
        }
        let size = len.min(plan.max_file_bytes).min(left);
        left -= size;
        match digest(&path, size) {
            Ok(sha256) => send.push(Collected { name, path, size, excess: len - size, sha256 }),
            Err(e) => warn!(output = %name, error = %e, "cannot read an output"),
        }
    }
    (send, unsent)
}

/// sha256 of the first `size` bytes of `path`.
fn digest(path: &Path, size: u64) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?.take(size), &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Collects and uploads the attempt's outputs and records them in `outcome`. An output that
/// cannot be stored fails a successful attempt: its result would not be complete.
pub async fn deliver(attempt: &str, plan: &OutputPlan, scratch: &Path, streams: &Path, to: &dyn ModuleSource, outcome: &mut Outcome) {
    let (plan2, scratch2, streams2) = (plan.clone(), scratch.to_path_buf(), streams.to_path_buf());
    let Ok((send, unsent)) = tokio::task::spawn_blocking(move || collect(&plan2, &scratch2, &streams2)).await else { return };
    let mut failures = vec![];
    for c in &send {
        let stored = match plan.put_urls.get(&c.name) {
            Some(url) => put(url, &c.path, c.size).await.map(|()| c.sha256.clone()),
            None => to.upload(attempt, &c.name, &c.path, c.size, c.excess).await,
        };
        match stored {
            // A declared file sent is output the machine produced and is metered with it
            // (stdout is already counted as the task wrote it; stderr is not billed).
            Ok(sha) if sha == c.sha256 => {
                if c.name.starts_with("out/") {
                    outcome.output_bytes = outcome.output_bytes.saturating_add(c.size);
                }
            }
            Ok(sha) => failures.push(format!("{}: the operator stored sha256 {sha}, the agent read {}", c.name, c.sha256)),
            Err(e) => failures.push(format!("{}: {e}", c.name)),
        }
    }
    let excess: u64 = send.iter().map(|c| c.excess).chain(unsent.iter().map(|u| u.excess_bytes)).sum();
    info!(attempt, outputs = send.len(), bytes = send.iter().map(|c| c.size).sum::<u64>(), excess, "outputs uploaded");
    outcome.outputs = send.iter().map(|c| OutputFile { name: c.name.clone(), size: c.size, sha256: c.sha256.clone(), excess_bytes: c.excess }).collect();
    outcome.outputs.extend(unsent);
    if excess > 0 {
        let note = format!("outputs over their limits: {excess} bytes not uploaded (see the result's outputs)");
        outcome.message = if outcome.message.is_empty() { note } else { format!("{}; {note}", outcome.message) };
    }
    if !failures.is_empty() {
        let note = format!("outputs not stored: {}", failures.join("; "));
        if outcome.ending == Ending::Succeeded {
            outcome.ending = Ending::Failed;
        }
        outcome.message = if outcome.message.is_empty() { note } else { format!("{}; {note}", outcome.message) };
    }
}

/// PUTs the first `size` bytes of `path` to a presigned URL.
async fn put(url: &str, path: &Path, size: u64) -> Result<(), String> {
    if let Some(why) = url.strip_prefix("unsigned:") {
        return Err(format!("the operator could not presign the upload ({why})"));
    }
    let (url, path) = (url.to_string(), path.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let response = agent
            .put(&url)
            .header("content-length", size.to_string())
            .send(ureq::SendBody::from_owned_reader(file.take(size)))
            .map_err(|e| format!("PUT to the job's bucket failed: {e}"))?;
        match response.status().as_u16() {
            200..=299 => Ok(()),
            code => Err(format!("the job's bucket answered the PUT with HTTP {code}")),
        }
    })
    .await
    .map_err(|e| e.to_string())?
}
