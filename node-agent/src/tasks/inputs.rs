//! An attempt's input files: fetched into `<scratch>/in/` before the task starts, each checked
//! against its sha256 and cached on the agent by digest, so a shard reused by retries or by
//! other jobs is downloaded once.

use std::path::{Path, PathBuf};

use kommune_proto::v1::InputFile;

use super::ModuleSource;
use crate::fetch::{self, UrlPolicy};

/// Inputs of one attempt at most.
pub const MAX_INPUTS: usize = 64;
/// Bytes the cache keeps; past this, the least recently used files go first.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

/// Verified input files by digest, under `<dir>/<sha256>`.
#[derive(Debug, Clone)]
pub struct InputCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl InputCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        Self { dir, max_bytes }
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// The cached file, marked as just used (the eviction order).
    fn lookup(&self, sha256: &str) -> Option<PathBuf> {
        let path = self.path(sha256);
        let file = std::fs::File::options().append(true).open(&path).ok()?;
        let _ = file.set_modified(std::time::SystemTime::now());
        Some(path)
    }

    /// Stores verified `data` by its digest, then evicts the least recently used files past
    /// the cap (never the one just stored).
    fn store(&self, sha256: &str, data: &[u8]) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(sha256);
        // Unique per call: tasks of one agent fetch a shared input at once, and a temp name
        // they shared was renamed away under the second writer (ENOENT, a failed attempt).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!(".{sha256}.{}.{n}.tmp", std::process::id()));
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, &path)?;
        self.evict(sha256);
        Ok(path)
    }

    fn evict(&self, keep: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter(|e| kommune_proto::is_sha256_hex(&e.file_name().to_string_lossy()) && e.file_name() != keep)
            .filter_map(|e| e.metadata().ok().map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len(), e.path())))
            .collect();
        let kept = std::fs::metadata(self.path(keep)).map(|m| m.len()).unwrap_or(0);
        let mut total = kept + files.iter().map(|f| f.1).sum::<u64>();
        files.sort();
        for (_, bytes, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= bytes;
            }
        }
    }
}

/// Fetches `inputs` into `<scratch>/in/`. The first input that cannot be fetched or does not
/// match its digest fails the attempt with a message naming it; nothing the task could run
/// on is left half-written, since the task does not start.
pub async fn stage(inputs: &[InputFile], scratch: &Path, cache: &InputCache, blobs: &dyn ModuleSource, policy: UrlPolicy) -> Result<(), String> {
    if inputs.len() > MAX_INPUTS {
        return Err(format!("the assignment lists {} inputs, more than the {MAX_INPUTS} an agent fetches", inputs.len()));
    }
    for input in inputs {
        let name = format!("input in/{}", input.path.chars().take(200).collect::<String>());
        if !kommune_proto::is_plain_relative_path(&input.path) {
            return Err(format!("{name}: not a relative path of plain components"));
        }
        if !kommune_proto::is_sha256_hex(&input.sha256) {
            return Err(format!("{name}: its digest {:?} is not a sha256", input.sha256.chars().take(80).collect::<String>()));
        }
        let cached = match cache.lookup(&input.sha256) {
            Some(path) => path,
            None => {
                let data = if input.url.is_empty() {
                    blobs.fetch(&input.sha256).await.map_err(|e| format!("cannot fetch {name} from the operator: {e}"))?
                } else {
                    fetch::download_what(&input.url, policy, &name).await?
                };
                let actual = kommune_proto::sha256_hex(&data);
                if actual != input.sha256 {
                    return Err(format!("{name}: the fetched file has sha256 {actual}, but the job expects {} (was the source changed?)", input.sha256));
                }
                cache.store(&input.sha256, &data).map_err(|e| format!("cannot cache {name}: {e}"))?
            }
        };
        // A copy, not a link: the task may write to its inputs, and the cache must stay what
        // was verified.
        let target = scratch.join("in").join(&input.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create the directory of {name}: {e}"))?;
        }
        std::fs::copy(&cached, &target).map_err(|e| format!("cannot place {name} in scratch: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Blobs(Vec<u8>);
    #[tonic::async_trait]
    impl ModuleSource for Blobs {
        async fn fetch(&self, _: &str) -> Result<Vec<u8>, String> {
            Ok(self.0.clone())
        }
    }

    fn input(path: &str, data: &[u8]) -> InputFile {
        InputFile { path: path.into(), sha256: kommune_proto::sha256_hex(data), url: String::new() }
    }

    /// Found by the quickstart: three tasks of one job staged a shared input at once and one
    /// failed with "No such file or directory" (the others had renamed its temp file away).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn tasks_staging_one_shared_input_at_once_all_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 2 << 20];
        let file = input("stopwords.txt", &data);
        // A race: several rounds, each with an empty cache, make it show.
        for round in 0..8 {
            let cache = std::sync::Arc::new(InputCache::new(dir.path().join(format!("cache{round}")), 1 << 30));
            let staged: Vec<_> = (0..32)
                .map(|i| {
                    let (cache, file, data, scratch) = (cache.clone(), file.clone(), data.clone(), dir.path().join(format!("s{round}-{i}")));
                    tokio::spawn(async move { stage(&[file], &scratch, &cache, &Blobs(data), UrlPolicy::default()).await.map(|()| scratch) })
                })
                .collect();
            for task in staged {
                let scratch = task.await.unwrap().unwrap();
                assert_eq!(std::fs::read(scratch.join("in/stopwords.txt")).unwrap(), data);
                std::fs::remove_dir_all(scratch).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn inputs_are_verified_cached_by_digest_and_copied_under_in() {
        let dir = tempfile::tempdir().unwrap();
        let cache = InputCache::new(dir.path().join("cache"), 1 << 20);
        let scratch = dir.path().join("s");
        let file = input("shards/shard-3.csv", b"a,b\n");
        stage(std::slice::from_ref(&file), &scratch, &cache, &Blobs(b"a,b\n".to_vec()), UrlPolicy::default()).await.unwrap();
        assert_eq!(std::fs::read(scratch.join("in/shards/shard-3.csv")).unwrap(), b"a,b\n");
        // Cached: the next attempt does not fetch (this source would now serve other bytes).
        let again = dir.path().join("s2");
        stage(&[file], &again, &cache, &Blobs(b"changed".to_vec()), UrlPolicy::default()).await.unwrap();
        assert_eq!(std::fs::read(again.join("in/shards/shard-3.csv")).unwrap(), b"a,b\n");
    }

    #[tokio::test]
    async fn a_mismatching_or_escaping_input_fails_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let cache = InputCache::new(dir.path().join("cache"), 1 << 20);
        let want = input("data.csv", b"expected");
        let err = stage(std::slice::from_ref(&want), dir.path(), &cache, &Blobs(b"tampered".to_vec()), UrlPolicy::default()).await.unwrap_err();
        assert!(err.starts_with("input in/data.csv: the fetched file has sha256 "), "{err}");
        assert!(err.contains(&want.sha256), "{err}");
        assert!(!cache.path(&want.sha256).exists(), "a mismatching file is not cached");
        let escape = InputFile { path: "../../etc/cron.d/x".into(), ..want };
        let err = stage(&[escape], dir.path(), &cache, &Blobs(b"expected".to_vec()), UrlPolicy::default()).await.unwrap_err();
        assert!(err.contains("not a relative path of plain components"), "{err}");
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used_past_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cache = InputCache::new(dir.path().to_path_buf(), 10);
        let (a, b) = (kommune_proto::sha256_hex(b"aaaaaa"), kommune_proto::sha256_hex(b"bbbbbb"));
        cache.store(&a, b"aaaaaa").unwrap();
        cache.store(&b, b"bbbbbb").unwrap();
        assert!(cache.lookup(&a).is_none() && cache.lookup(&b).is_some());
    }
}
