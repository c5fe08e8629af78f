//! Content-addressed blobs (wasm modules) on the operator's volume, each held by the jobs whose
//! module it is: a namespace's blobs are bounded by a quota, and a blob no job holds is swept.

mod journal;
mod owners;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use self::journal::Journal;
use self::owners::{Change, Over, Owners};
/// Default quota: what one namespace's jobs may hold on the operator's volume.
pub const DEFAULT_QUOTA_BYTES: u64 = 256 << 20;
/// Default grace between a blob's last owner letting go and the sweep deleting it.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);

/// A blob store failure.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {0:?} is not a sha256 digest")]
    BadDigest(String),
    #[error("blob store at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// Storing the module would take its namespace over its quota; nothing was stored.
    #[error(
        "a module of {bytes} bytes would bring the modules held for namespace {namespace} to {total} bytes, over its quota of {quota} bytes (modules its jobs reference, plus those they let go of in the last {grace_secs} s, kept that long for attempts already assigned); delete or finish jobs of this namespace, or ask the cluster admin for a larger quota (--blob-quota, --namespace-blob-quota)"
    )]
    QuotaExceeded { namespace: String, bytes: u64, total: u64, quota: u64, grace_secs: u64 },
}

/// Quotas and grace.
#[derive(Debug, Clone)]
pub struct BlobLimits {
    /// Bytes of blobs a namespace's jobs may hold, unless named in `namespace_quota`.
    pub quota_bytes: u64,
    /// Per-namespace quotas that replace `quota_bytes`.
    pub namespace_quota: BTreeMap<String, u64>,
    /// How long a released blob stays (and stays fetchable by the jobs that let go of it).
    pub grace: Duration,
}

impl Default for BlobLimits {
    fn default() -> Self {
        BlobLimits { quota_bytes: DEFAULT_QUOTA_BYTES, namespace_quota: BTreeMap::new(), grace: DEFAULT_GRACE }
    }
}

impl BlobLimits {
    pub fn quota(&self, namespace: &str) -> u64 {
        self.namespace_quota.get(namespace).copied().unwrap_or(self.quota_bytes)
    }
}

/// The job a blob is stored for.
#[derive(Debug, Clone, Copy)]
pub struct BlobOwner<'a> {
    pub job_uid: &'a str,
    pub namespace: &'a str,
}

/// The owner key of a job's input blob: a job holds one blob per key, so each input (and, for
/// per-task inputs, each task's file) has a key of its own under the job's uid.
pub fn input_owner(job_uid: &str, input: usize, task: Option<u32>) -> String {
    match task {
        None => format!("{job_uid}/input/{input}"),
        Some(t) => format!("{job_uid}/input/{input}/{t}"),
    }
}

/// The job uid an owner key belongs to (a job's module is held under its bare uid).
pub fn job_of_owner(owner: &str) -> &str {
    owner.split_once('/').map_or(owner, |(uid, _)| uid)
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Blobs deleted (no job held them for a grace), and their bytes.
    pub deleted: usize,
    pub freed_bytes: u64,
    /// Blobs kept.
    pub kept: usize,
}

/// Blobs under `<data dir>/blobs/<sha256>`, written atomically, with their owners in
/// `<data dir>/blobs/owners.{json,log}`. Cheap to clone: clones share one state.
#[derive(Debug, Clone)]
pub struct Blobs {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    limits: BlobLimits,
    /// Every change is journalled under this lock before it is made in memory, and blob files
    /// are created and deleted under it, so a sweep never deletes a blob being stored.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    owners: Owners,
    journal: Journal,
}

impl State {
    /// Journals a change, then makes it.
    fn change(&mut self, change: Change) -> Result<(), BlobError> {
        self.journal.append(&change)?;
        self.owners.apply(&change);
        Ok(())
    }
}

impl Blobs {
    /// Opens the blob directory with the default limits.
    pub fn open(data_dir: &Path) -> Result<Self, BlobError> {
        Blobs::open_with(data_dir, BlobLimits::default())
    }

    /// Opens (creating if needed) `<data_dir>/blobs` and reads who owns what.
    pub fn open_with(data_dir: &Path, limits: BlobLimits) -> Result<Self, BlobError> {
        let dir = data_dir.join("blobs");
        std::fs::create_dir_all(&dir).map_err(|source| BlobError::Io { path: dir.display().to_string(), source })?;
        let (journal, owners) = Journal::open(&dir)?;
        Ok(Blobs { inner: Arc::new(Inner { dir, limits, state: Mutex::new(State { owners, journal }) }) })
    }

    pub fn limits(&self) -> &BlobLimits {
        &self.inner.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A change is made in memory only after it is on disk, in one step: a poisoned lock
        // holds a consistent state.
        self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, sha256: &str) -> Result<PathBuf, BlobError> {
        if !kommune_proto::is_sha256_hex(sha256) {
            return Err(BlobError::BadDigest(sha256.chars().take(80).collect()));
        }
        Ok(self.inner.dir.join(sha256))
    }

    fn grace_ms(&self) -> i64 {
        i64::try_from(self.inner.limits.grace.as_millis()).unwrap_or(i64::MAX)
    }

    /// Stores `data` as `owner`'s module and returns its digest; the module the job held before
    /// is released. Refused with [`BlobError::QuotaExceeded`] (nothing stored, the job keeps
    /// its old module) when the namespace would hold more than its quota. Storing the module a
    /// job already holds writes nothing.
    pub fn put_for(&self, owner: BlobOwner<'_>, data: &[u8]) -> Result<String, BlobError> {
        self.put_at(owner, data, kommune_proto::now_ms())
    }

    pub(crate) fn put_at(&self, owner: BlobOwner<'_>, data: &[u8], now_ms: i64) -> Result<String, BlobError> {
        let sha = kommune_proto::sha256_hex(data);
        let path = self.path(&sha)?;
        let bytes = data.len() as u64;
        let mut state = self.lock();
        if state.owners.holds(owner.job_uid, &sha) && path.exists() {
            return Ok(sha);
        }
        let quota = self.inner.limits.quota(owner.namespace);
        if let Err(Over { held }) = state.owners.admit(owner.job_uid, owner.namespace, &sha, bytes, quota) {
            return Err(BlobError::QuotaExceeded {
                namespace: owner.namespace.to_string(),
                bytes,
                total: held.saturating_add(bytes),
                quota,
                grace_secs: self.inner.limits.grace.as_secs(),
            });
        }
        if !path.exists() {
            let io = |source| BlobError::Io { path: path.display().to_string(), source };
            let tmp = self.inner.dir.join(format!(".{sha}.{}.tmp", std::process::id()));
            std::fs::write(&tmp, data).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
        }
        if !state.owners.holds(owner.job_uid, &sha) {
            let seq = state.owners.seq + 1;
            let (job, namespace, sha256) = (owner.job_uid.to_string(), owner.namespace.to_string(), sha.clone());
            state.change(Change::Set { seq, job, namespace, sha256, bytes, at_ms: now_ms })?;
        }
        Ok(sha)
    }

    /// The job holds no module any more (it was deleted, ended, or runs a module from a URL):
    /// its module stays for the grace, then the sweep deletes it unless another job holds it.
    pub fn release(&self, job_uid: &str) -> Result<(), BlobError> {
        let mut state = self.lock();
        if state.owners.refs.contains_key(job_uid) {
            let seq = state.owners.seq + 1;
            state.change(Change::Release { seq, job: job_uid.to_string(), at_ms: kommune_proto::now_ms() })?;
        }
        Ok(())
    }

    /// Releases everything `job_uid` holds: its module and every input blob (the job was
    /// deleted or has ended).
    pub fn release_job(&self, job_uid: &str) -> Result<(), BlobError> {
        let prefix = format!("{job_uid}/");
        let keys: Vec<String> = self.lock().owners.refs.keys().filter(|k| k.as_str() == job_uid || k.starts_with(&prefix)).cloned().collect();
        for key in keys {
            self.release(&key)?;
        }
        Ok(())
    }

    /// The owner keys of `job_uid`'s input blobs.
    pub fn input_keys(&self, job_uid: &str) -> Vec<String> {
        let prefix = format!("{job_uid}/input/");
        self.lock().owners.refs.keys().filter(|k| k.starts_with(&prefix)).cloned().collect()
    }

    /// The blob with this digest, if stored. Not an authorization: see [`Blobs::users`].
    pub fn get(&self, sha256: &str) -> Result<Option<Vec<u8>>, BlobError> {
        let path = self.path(sha256)?;
        match std::fs::read(&path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BlobError::Io { path: path.display().to_string(), source }),
        }
    }

    /// The uids of the jobs whose attempts may fetch the blob: those whose module it is, and
    /// those that let go of it within the grace. Empty for a digest no job holds (or not a
    /// digest at all).
    pub fn users(&self, sha256: &str) -> Vec<String> {
        // Owner keys of inputs (`<uid>/input/...`) name their job: the job's attempts fetch.
        let mut jobs: Vec<String> =
            self.lock().owners.users(sha256, kommune_proto::now_ms(), self.grace_ms()).iter().map(|k| job_of_owner(k).to_string()).collect();
        jobs.sort();
        jobs.dedup();
        jobs
    }

    /// Bytes charged to `namespace`'s quota now.
    pub fn namespace_bytes(&self, namespace: &str) -> u64 {
        self.lock().owners.namespace_bytes(namespace)
    }

    /// Deletes every blob no job has held for the grace, including blobs stored before blobs
    /// had owners (counted from their file's time), and temporary files a crash left behind.
    pub fn sweep(&self) -> Result<Swept, BlobError> {
        self.sweep_at(kommune_proto::now_ms())
    }

    pub fn sweep_at(&self, now_ms: i64) -> Result<Swept, BlobError> {
        let dir = &self.inner.dir;
        let io = |source| BlobError::Io { path: dir.display().to_string(), source };
        let grace_ms = self.grace_ms();
        let mut state = self.lock();
        let State { owners, journal } = &mut *state;
        // The journal is folded into a new snapshot here, so it holds at most one sweep's
        // worth of changes.
        if owners.expire(now_ms, grace_ms) || journal.pending() > 0 {
            journal.compact(owners)?;
        }
        let mut swept = Swept::default();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_blob = kommune_proto::is_sha256_hex(&name);
            let is_leftover = name.starts_with('.') && name.ends_with(".tmp");
            if !(is_blob || is_leftover) || (is_blob && owners.keeps(&name)) {
                swept.kept += usize::from(is_blob);
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            // Counted from the file's time: a blob released by a job was written before that,
            // and a blob older than owners (or a crash's leftover) gets one grace too.
            // A time in the future (a clock step) counts as young: kept, never deleted early.
            let now = SystemTime::UNIX_EPOCH + Duration::from_millis(now_ms.max(0) as u64);
            let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok());
            if age.is_none_or(|age| age.as_millis() < grace_ms as u128) {
                swept.kept += usize::from(is_blob);
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) if is_blob => {
                    swept.deleted += 1;
                    swept.freed_bytes += meta.len();
                }
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(blob = %name, error = %e, "cannot delete an unowned blob"),
            }
        }
        Ok(swept)
    }
}
