//! `kubectl kommune results JOB -o DIR`: downloads every listed output of a job into
//! DIR/task-N/NAME, each checked against its listed sha256, none written outside DIR.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use anyhow::Context as _;
use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use kommune_operator::outputs::OutputEntry;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::api::{self, Fetched};
use crate::connect::OperatorArgs;

#[derive(clap::Args, Debug)]
pub struct ResultsArgs {
    /// The ComputeJob.
    pub job: String,
    /// Its namespace (default: your kubeconfig context's).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Directory to download into (created if missing); outputs land in DIR/task-N/NAME.
    #[arg(long, short = 'o')]
    pub output_dir: PathBuf,
    #[command(flatten)]
    pub operator: OperatorArgs,
}

/// Why a listing cannot be laid out on disk.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("task {task} has an output named {name:?}, which would be written outside the task's directory; refusing to download")]
    Escapes { task: u32, name: String },
    #[error("task {task} lists {name:?} twice (or a file and a directory of that name); refusing to download")]
    Duplicate { task: u32, name: String },
}

/// The relative path an output is saved at: `task-N/` and the name's own components, every one
/// a plain name (no root, no `..`, no `.`, no empty part, no backslash or NUL that another OS
/// would read as a separator or terminator).
pub fn relative_path(entry: &OutputEntry) -> Result<PathBuf, LayoutError> {
    let escapes = || LayoutError::Escapes { task: entry.task_index, name: entry.name.clone() };
    if entry.name.is_empty() || entry.name.contains(['\\', '\0']) {
        return Err(escapes());
    }
    let mut path = PathBuf::from(format!("task-{}", entry.task_index));
    for part in entry.name.split('/') {
        let mut components = Path::new(part).components();
        match (components.next(), components.next()) {
            (Some(Component::Normal(c)), None) if c == part => path.push(c),
            _ => return Err(escapes()),
        }
    }
    Ok(path)
}

/// Where each output of `items` goes under the download directory; refuses the whole listing if
/// any name is unsafe or two outputs would share a path, before anything is written.
pub fn layout(items: &[OutputEntry]) -> Result<Vec<(OutputEntry, PathBuf)>, LayoutError> {
    let mut files = BTreeSet::new();
    let mut planned = Vec::with_capacity(items.len());
    for entry in items {
        let rel = relative_path(entry)?;
        if !files.insert(rel.clone()) {
            return Err(LayoutError::Duplicate { task: entry.task_index, name: entry.name.clone() });
        }
        planned.push((entry.clone(), rel));
    }
    // A file that is also another output's directory ("a" and "a/b") cannot both be written.
    for (entry, rel) in &planned {
        if rel.ancestors().skip(1).any(|a| files.contains(a)) {
            return Err(LayoutError::Duplicate { task: entry.task_index, name: entry.name.clone() });
        }
    }
    Ok(planned)
}

pub async fn run(args: ResultsArgs) -> anyhow::Result<()> {
    let config = kube::Config::infer().await.context("cannot load your kubeconfig")?;
    let namespace = args.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let operator = args.operator.connect(config).await?;
    let summary = download_all(&operator.client, &namespace, &args.job, &args.output_dir).await?;
    println!("{summary}");
    Ok(())
}

/// Downloads every output of `namespace/job` into `dir`; returns a one-line summary.
pub async fn download_all(client: &kube::Client, namespace: &str, job: &str, dir: &Path) -> anyhow::Result<String> {
    let listing = api::list_outputs(client, namespace, job).await?;
    let planned = layout(&listing.items)?;
    tokio::fs::create_dir_all(dir).await.with_context(|| format!("cannot create {}", dir.display()))?;
    let root = tokio::fs::canonicalize(dir).await?;
    let mut bytes = 0;
    let mut incomplete = vec![];
    for (entry, rel) in &planned {
        let path = root.join(rel);
        let parent = path.parent().context("an output path has no parent")?;
        tokio::fs::create_dir_all(parent).await.with_context(|| format!("cannot create {}", parent.display()))?;
        // A symlink already in DIR (task-0 -> /etc) must not carry a write outside it.
        if !tokio::fs::canonicalize(parent).await?.starts_with(&root) {
            anyhow::bail!("{} leads outside {} (a symlink?); refusing to write there", parent.display(), root.display());
        }
        let body = match api::open_output(client, namespace, job, entry.task_index, &entry.name).await? {
            Fetched::Body(b) => b,
            Fetched::Redirect(url) => api::fetch_url(&url).await?,
        };
        save(body, &path, entry).await?;
        bytes += entry.size;
        if entry.excess_bytes > 0 {
            incomplete.push(format!("task {} {} ({} bytes over the limit were not stored)", entry.task_index, entry.name, entry.excess_bytes));
        }
    }
    let mut summary = format!("downloaded {} outputs ({bytes} bytes) of {namespace}/{job} into {}, every sha256 verified", planned.len(), dir.display());
    for i in incomplete {
        summary.push_str(&format!("\nincomplete: {i}"));
    }
    Ok(summary)
}

/// Streams `body` into `path` through a `.part` file, renamed only once size and sha256 match
/// the listing; a mismatch leaves nothing at `path`.
pub async fn save(body: kube::client::Body, path: &Path, entry: &OutputEntry) -> anyhow::Result<()> {
    let file_name = path.file_name().context("an output path has no file name")?.to_string_lossy();
    let part = path.with_file_name(format!(".{file_name}.part"));
    let mut file = tokio::fs::File::create(&part).await.with_context(|| format!("cannot write {}", part.display()))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.with_context(|| format!("the download of task {} {} broke off", entry.task_index, entry.name))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    drop(file);
    let digest = hex::encode(hasher.finalize());
    if size != entry.size || digest != entry.sha256 {
        let _ = tokio::fs::remove_file(&part).await;
        anyhow::bail!(
            "task {} output {}: received {size} bytes with sha256 {digest}, but the listing says {} bytes with sha256 {}; not saved",
            entry.task_index,
            entry.name,
            entry.size,
            entry.sha256
        );
    }
    tokio::fs::rename(&part, path).await.with_context(|| format!("cannot move the download to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(task: u32, name: &str) -> OutputEntry {
        OutputEntry { task_index: task, attempt_id: "a".into(), name: name.into(), size: 1, sha256: "00".into(), excess_bytes: 0 }
    }

    #[test]
    fn outputs_land_under_their_task_directory() {
        let planned = layout(&[entry(0, "stdout"), entry(0, "out/result.csv"), entry(7, "stderr")]).unwrap();
        let paths: Vec<_> = planned.iter().map(|(_, p)| p.to_str().unwrap().to_string()).collect();
        assert_eq!(paths, ["task-0/stdout", "task-0/out/result.csv", "task-7/stderr"]);
    }

    #[test]
    fn names_that_escape_are_refused() {
        for bad in ["../x", "a/../../x", "/etc/passwd", "", ".", "a//b", "a/./b", "a\\..\\b", "x\0", "out/", ".."] {
            assert_eq!(relative_path(&entry(1, bad)), Err(LayoutError::Escapes { task: 1, name: bad.into() }), "{bad:?}");
        }
        // The whole listing is refused, not just the bad entry.
        assert!(layout(&[entry(0, "stdout"), entry(0, "../../.bashrc")]).is_err());
    }

    #[test]
    fn colliding_names_are_refused() {
        assert!(matches!(layout(&[entry(0, "a"), entry(0, "a")]), Err(LayoutError::Duplicate { .. })));
        assert!(matches!(layout(&[entry(0, "a"), entry(0, "a/b")]), Err(LayoutError::Duplicate { .. })));
        assert!(layout(&[entry(0, "a"), entry(1, "a")]).is_ok());
    }
}
