//! The operator's own output store: each attempt's uploaded outputs under
//! `<data dir>/outputs/<job uid>/<attempt id>/`, bounded per file, per attempt and on disk.
//!
//! An attempt directory holds its files (`0.bin`, `1.bin`, ... in upload order) and
//! `manifest.json` (name, size, sha256, excess of each), rewritten atomically after each
//! file; an `accepted` marker once its task's result was accepted. Bytes are reserved before
//! they are written, so concurrent uploads (even of one attempt, which a hostile agent may try)
//! cannot go past a limit together. Nothing here touches the attempt store or the ledger: a full
//! disk refuses outputs, never their writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use kommune_core::attempt::{OutputDigest, parse_attempt_id};
use kommune_core::job::data::{JobOutputs, S3Object, is_plain_relative_path};

/// Why an output is refused or cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output name {0:?} is not stdout, stderr or out/<plain relative path>")]
    BadName(String),
    #[error("attempt {attempt} already uploaded {name}")]
    Duplicate { attempt: String, name: String },
    #[error("output {name} of {size} bytes is over the job's limit of {limit} bytes per file")]
    FileTooLarge { name: String, size: u64, limit: u64 },
    #[error("attempt {attempt} would store {total} bytes of outputs, over the job's limit of {limit} bytes per attempt")]
    AttemptTooLarge { attempt: String, total: u64, limit: u64 },
    #[error("attempt {attempt} may upload at most {limit} outputs")]
    TooManyFiles { attempt: String, limit: u32 },
    #[error("the operator's output store is full ({used} of {limit} bytes used): output {name} of {size} bytes refused")]
    StoreFull { name: String, size: u64, used: u64, limit: u64 },
    #[error("output {name}: {got} bytes sent, {expected} announced")]
    SizeMismatch { name: String, got: u64, expected: u64 },
    #[error("output store I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// One stored output, as recorded in its attempt's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stored {
    pub task_index: u32,
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub excess_bytes: u64,
    /// The file under the attempt directory; None for an output stored in the job's bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The object key in the job's bucket, for outputs stored there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Whether `name` is an output name an agent may use.
pub fn valid_name(name: &str) -> bool {
    name == "stdout" || name == "stderr" || name.strip_prefix("out/").is_some_and(|p| is_plain_relative_path(p) && p.len() <= 1024)
}

#[derive(Default)]
struct Tally {
    files: u32,
    bytes: u64,
    names: Vec<String>,
}

#[derive(Default)]
struct State {
    /// Bytes on disk plus bytes reserved by uploads in flight.
    used: u64,
    /// Per attempt: files and bytes stored or reserved (read from its manifest on first use).
    attempts: HashMap<String, Tally>,
    /// The last refusal for lack of room, by job uid, until one of its outputs is stored.
    refused: HashMap<String, String>,
    /// Most bytes on disk.
    limit: u64,
    /// Buckets of jobs whose outputs go to S3, with credentials, for presigned GETs.
    buckets: HashMap<String, S3Object>,
    /// Attempts already accepted, so every sync of a finished job does not touch the disk.
    accepted: std::collections::HashSet<String>,
}

/// The embedded output store. Cheap to clone.
#[derive(Clone)]
pub struct OutputStore {
    root: PathBuf,
    state: Arc<Mutex<State>>,
}

/// Limits an upload is held to: the job's (from the dispatcher) for its attempt.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_file_bytes: u64,
    pub max_attempt_bytes: u64,
    pub max_files: u32,
}

impl From<&JobOutputs> for UploadLimits {
    fn from(o: &JobOutputs) -> Self {
        UploadLimits { max_file_bytes: o.max_file_bytes, max_attempt_bytes: o.max_attempt_bytes, max_files: o.max_files }
    }
}

/// An upload in progress: bytes go to a temporary file and are hashed; [`Upload::finish`]
/// records it, dropping it unfinished releases its reservation and deletes the file.
pub struct Upload {
    store: OutputStore,
    job_uid: String,
    attempt: String,
    task_index: u32,
    name: String,
    size: u64,
    excess: u64,
    written: u64,
    hasher: Sha256,
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
    done: bool,
}

impl OutputStore {
    /// Opens `<data_dir>/outputs`, at most `limit` bytes on disk; temporary files a crash left
    /// are removed and what is stored is counted.
    pub fn open(data_dir: &Path, limit: u64) -> Result<Self, OutputError> {
        let root = data_dir.join("outputs");
        std::fs::create_dir_all(&root)?;
        let mut used = 0;
        for job in std::fs::read_dir(&root)? {
            let job = job?.path();
            if !job.is_dir() {
                continue;
            }
            for attempt in std::fs::read_dir(&job)? {
                let attempt = attempt?.path();
                if !attempt.is_dir() {
                    continue;
                }
                for f in std::fs::read_dir(&attempt)? {
                    let f = f?;
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".tmp") {
                        let _ = std::fs::remove_file(f.path());
                    } else if name.ends_with(".bin") {
                        used += f.metadata()?.len();
                    }
                }
            }
        }
        Ok(OutputStore { root, state: Arc::new(Mutex::new(State { used, limit, ..Default::default() })) })
    }

    /// Changes the disk limit (what is stored stays; new outputs are held to the new limit).
    pub fn set_limit(&self, limit: u64) {
        self.state().limit = limit;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes stored (and reserved), and the limit.
    pub fn usage(&self) -> (u64, u64) {
        let s = self.state();
        (s.used, s.limit)
    }

    fn attempt_dir(&self, job_uid: &str, attempt: &str) -> PathBuf {
        self.root.join(job_uid).join(attempt)
    }

    /// Why the job's last output was refused for lack of room, until one of its outputs is stored.
    pub fn refusal(&self, job_uid: &str) -> Option<String> {
        self.state().refused.get(job_uid).cloned()
    }

    /// The bucket (with credentials) a job's outputs go to, for presigned GETs when they are read.
    pub fn set_bucket(&self, job_uid: &str, bucket: Option<S3Object>) {
        let mut s = self.state();
        match bucket {
            Some(b) => s.buckets.insert(job_uid.to_string(), b),
            None => s.buckets.remove(job_uid),
        };
    }

    pub(crate) fn bucket(&self, job_uid: &str) -> Option<S3Object> {
        self.state().buckets.get(job_uid).cloned()
    }

    /// Starts storing output `name` (`size` bytes follow; `excess` were not sent) of `attempt`,
    /// after checking it against `limits` and the store's room.
    pub fn begin(&self, attempt: &str, name: &str, size: u64, excess: u64, limits: UploadLimits) -> Result<Upload, OutputError> {
        let (job_uid, task_index) = job_and_task(attempt).ok_or_else(|| OutputError::BadName(attempt.to_string()))?;
        if !valid_name(name) {
            return Err(OutputError::BadName(name.chars().take(128).collect()));
        }
        if size > limits.max_file_bytes {
            return Err(OutputError::FileTooLarge { name: name.into(), size, limit: limits.max_file_bytes });
        }
        let dir = self.attempt_dir(&job_uid, attempt);
        let on_disk = read_manifest(&dir)?;
        let mut s = self.state();
        let tally = s.attempts.entry(attempt.to_string()).or_insert_with(|| Tally {
            files: on_disk.len() as u32,
            bytes: on_disk.iter().map(|o| o.size).sum(),
            names: on_disk.iter().map(|o| o.name.clone()).collect(),
        });
        if tally.names.iter().any(|n| n == name) {
            return Err(OutputError::Duplicate { attempt: attempt.into(), name: name.into() });
        }
        if tally.files >= limits.max_files {
            return Err(OutputError::TooManyFiles { attempt: attempt.into(), limit: limits.max_files });
        }
        if tally.bytes + size > limits.max_attempt_bytes {
            return Err(OutputError::AttemptTooLarge { attempt: attempt.into(), total: tally.bytes + size, limit: limits.max_attempt_bytes });
        }
        let file_no = tally.files;
        if s.used + size > s.limit {
            let e = OutputError::StoreFull { name: name.into(), size, used: s.used, limit: s.limit };
            s.refused.insert(job_uid.clone(), e.to_string());
            return Err(e);
        }
        s.used += size;
        let tally = s.attempts.get_mut(attempt).expect("inserted above");
        tally.files += 1;
        tally.bytes += size;
        tally.names.push(name.to_string());
        drop(s);
        let tmp = dir.join(format!("{file_no}.bin.tmp"));
        Ok(Upload {
            store: self.clone(),
            job_uid,
            attempt: attempt.into(),
            task_index,
            name: name.into(),
            size,
            excess,
            written: 0,
            hasher: Sha256::new(),
            tmp,
            file: None,
            done: false,
        })
    }

    /// What `attempt` stored, in upload order.
    pub fn manifest(&self, attempt: &str) -> Result<Vec<Stored>, OutputError> {
        let Some((job_uid, _)) = job_and_task(attempt) else { return Ok(vec![]) };
        read_manifest(&self.attempt_dir(&job_uid, attempt))
    }

    /// Records outputs an agent put in the job's bucket (sizes and digests as it reported them).
    pub fn record_in_bucket(&self, attempt: &str, outputs: Vec<Stored>) -> Result<(), OutputError> {
        let Some((job_uid, _)) = job_and_task(attempt) else { return Ok(()) };
        let dir = self.attempt_dir(&job_uid, attempt);
        std::fs::create_dir_all(&dir)?;
        write_manifest(&dir, &outputs)
    }

    /// `attempt`'s outputs are its task's accepted ones: the task's other attempts' outputs go.
    pub fn accept(&self, attempt: &str) -> Result<(), OutputError> {
        let Some((job_uid, task)) = job_and_task(attempt) else { return Ok(()) };
        if self.state().accepted.contains(attempt) {
            return Ok(());
        }
        let dir = self.attempt_dir(&job_uid, attempt);
        if dir.join("accepted").exists() {
            self.state().accepted.insert(attempt.to_string());
            return Ok(());
        }
        if !self.root.join(&job_uid).exists() {
            return Ok(());
        }
        for other in attempt_dirs(&self.root.join(&job_uid))? {
            if other.0 != attempt && job_and_task(&other.0).is_some_and(|(_, t)| t == task) {
                self.remove_dir(&other.1, &other.0)?;
            }
        }
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("accepted"), b"")?;
        self.state().accepted.insert(attempt.to_string());
        Ok(())
    }

    /// Removes every output of a job (deleted, or past its `ttlSecondsAfterFinished`).
    pub fn remove_job(&self, job_uid: &str) -> Result<(), OutputError> {
        let job = self.root.join(job_uid);
        if !job_uid.is_empty() && !job_uid.contains(['/', '.']) && job.exists() {
            for (attempt, dir) in attempt_dirs(&job)? {
                self.remove_dir(&dir, &attempt)?;
            }
            std::fs::remove_dir_all(&job)?;
        }
        let mut s = self.state();
        s.refused.remove(job_uid);
        s.buckets.remove(job_uid);
        let prefix = format!("{job_uid}.");
        s.accepted.retain(|a| !a.starts_with(&prefix));
        Ok(())
    }

    fn remove_dir(&self, dir: &Path, attempt: &str) -> Result<(), OutputError> {
        // Only output files count against the limit (the manifest is a few bytes per file).
        let bytes: u64 = std::fs::read_dir(dir)?
            .filter_map(|f| f.ok())
            .filter(|f| f.file_name().to_string_lossy().ends_with(".bin"))
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum();
        std::fs::remove_dir_all(dir)?;
        let mut s = self.state();
        s.used = s.used.saturating_sub(bytes);
        s.attempts.remove(attempt);
        Ok(())
    }

    /// Every output of the job, one attempt per task: the accepted one, else the newest.
    pub fn list(&self, job_uid: &str) -> Result<Vec<(String, Stored)>, OutputError> {
        let job = self.root.join(job_uid);
        if job_uid.is_empty() || job_uid.contains(['/', '.']) || !job.exists() {
            return Ok(vec![]);
        }
        let mut chosen: HashMap<u32, (bool, (u32, u32), String, PathBuf)> = HashMap::new();
        for (attempt, dir) in attempt_dirs(&job)? {
            let Some(parsed) = parse_attempt_id(&attempt) else { continue };
            let rank = (dir.join("accepted").exists(), (parsed.number, u32::MAX - parsed.replica));
            let better = chosen.get(&parsed.index).is_none_or(|c| (c.0, c.1) < rank);
            if better {
                chosen.insert(parsed.index, (rank.0, rank.1, attempt, dir));
            }
        }
        let mut out = vec![];
        for (_, _, attempt, dir) in chosen.into_values() {
            out.extend(read_manifest(&dir)?.into_iter().map(|s| (attempt.clone(), s)));
        }
        out.sort_by(|a, b| (a.1.task_index, &a.1.name).cmp(&(b.1.task_index, &b.1.name)));
        Ok(out)
    }

    /// The path of a stored file of `attempt`.
    pub(crate) fn file_path(&self, job_uid: &str, attempt: &str, file: &str) -> PathBuf {
        self.attempt_dir(job_uid, attempt).join(file)
    }
}

impl Upload {
    /// Appends bytes; more than announced is refused.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), OutputError> {
        if self.written + data.len() as u64 > self.size {
            return Err(OutputError::SizeMismatch { name: self.name.clone(), got: self.written + data.len() as u64, expected: self.size });
        }
        if self.file.is_none() {
            tokio::fs::create_dir_all(self.tmp.parent().expect("an attempt directory")).await?;
            self.file = Some(tokio::fs::File::create(&self.tmp).await?);
        }
        self.file.as_mut().expect("created above").write_all(data).await?;
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(())
    }

    /// Makes the output durable and records it in its attempt's manifest; returns its digest.
    pub async fn finish(mut self) -> Result<OutputDigest, OutputError> {
        if self.written != self.size {
            return Err(OutputError::SizeMismatch { name: self.name.clone(), got: self.written, expected: self.size });
        }
        let dir = self.tmp.parent().expect("an attempt directory").to_path_buf();
        tokio::fs::create_dir_all(&dir).await?;
        let file = match self.file.take() {
            Some(f) => f,
            None => tokio::fs::File::create(&self.tmp).await?,
        };
        file.sync_all().await?;
        drop(file);
        let final_name = self.tmp.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".tmp")).expect("named N.bin.tmp").to_string();
        tokio::fs::rename(&self.tmp, dir.join(&final_name)).await?;
        let sha256 = hex::encode(self.hasher.clone().finalize());
        let entry = Stored {
            task_index: self.task_index,
            name: self.name.clone(),
            size: self.size,
            sha256: sha256.clone(),
            excess_bytes: self.excess,
            file: Some(final_name),
            key: None,
        };
        {
            // One manifest writer at a time: uploads of one attempt may run concurrently.
            let mut s = self.store.state();
            let mut manifest = read_manifest(&dir)?;
            manifest.push(entry);
            write_manifest(&dir, &manifest)?;
            s.refused.remove(&self.job_uid);
        }
        self.done = true;
        Ok(OutputDigest { name: self.name.clone(), size: self.size, sha256, excess_bytes: self.excess, counted: false })
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let _ = std::fs::remove_file(&self.tmp);
        let mut s = self.store.state();
        s.used = s.used.saturating_sub(self.size);
        if let Some(t) = s.attempts.get_mut(&self.attempt) {
            t.files = t.files.saturating_sub(1);
            t.bytes = t.bytes.saturating_sub(self.size);
            t.names.retain(|n| n != &self.name);
        }
    }
}

/// (job uid, task index) of an attempt id; None for an id that is not one.
fn job_and_task(attempt: &str) -> Option<(String, u32)> {
    let p = parse_attempt_id(attempt)?;
    (!p.job_uid.is_empty() && !p.job_uid.contains('/')).then(|| (p.job_uid.to_string(), p.index))
}

fn attempt_dirs(job: &Path) -> Result<Vec<(String, PathBuf)>, OutputError> {
    let mut out = vec![];
    for e in std::fs::read_dir(job)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            out.push((e.file_name().to_string_lossy().into_owned(), e.path()));
        }
    }
    Ok(out)
}

fn read_manifest(dir: &Path) -> Result<Vec<Stored>, OutputError> {
    match std::fs::read(dir.join("manifest.json")) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| OutputError::Io(std::io::Error::other(format!("{}: {e}", dir.display())))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(e.into()),
    }
}

/// Written to a temporary file and renamed, so a crash leaves the old manifest or the new one.
fn write_manifest(dir: &Path, manifest: &[Stored]) -> Result<(), OutputError> {
    let tmp = dir.join("manifest.json.tmp");
    let body = serde_json::to_vec(manifest).map_err(std::io::Error::other)?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join("manifest.json"))?;
    Ok(())
}
