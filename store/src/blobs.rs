//! Content-addressed blobs (wasm modules) on the operator's volume, served to agents by digest.

use std::path::{Path, PathBuf};

/// A blob store failure.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {0:?} is not a sha256 digest")]
    BadDigest(String),
    #[error("blob store at {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// Blobs under `<data dir>/blobs/<sha256>`, written atomically.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    pub fn open(data_dir: &Path) -> Result<Self, BlobError> {
        let dir = data_dir.join("blobs");
        std::fs::create_dir_all(&dir).map_err(|source| BlobError::Io { path: dir.display().to_string(), source })?;
        Ok(Blobs { dir })
    }

    fn path(&self, sha256: &str) -> Result<PathBuf, BlobError> {
        if !kommune_proto::is_sha256_hex(sha256) {
            return Err(BlobError::BadDigest(sha256.chars().take(80).collect()));
        }
        Ok(self.dir.join(sha256))
    }

    /// Stores `data` and returns its digest. Storing the same bytes again is a no-op.
    pub fn put(&self, data: &[u8]) -> Result<String, BlobError> {
        let sha = kommune_proto::sha256_hex(data);
        let path = self.path(&sha)?;
        if path.exists() {
            return Ok(sha);
        }
        let io = |source| BlobError::Io { path: path.display().to_string(), source };
        let tmp = self.dir.join(format!(".{sha}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, data).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(sha)
    }

    /// The blob with this digest, if stored.
    pub fn get(&self, sha256: &str) -> Result<Option<Vec<u8>>, BlobError> {
        let path = self.path(sha256)?;
        match std::fs::read(&path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BlobError::Io { path: path.display().to_string(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_and_reject_bad_digests() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let sha = blobs.put(b"module").unwrap();
        assert_eq!(sha, kommune_proto::sha256_hex(b"module"));
        assert_eq!(blobs.put(b"module").unwrap(), sha);
        assert_eq!(blobs.get(&sha).unwrap().unwrap(), b"module");
        assert_eq!(blobs.get(&"0".repeat(64)).unwrap(), None);
        assert!(matches!(blobs.get("../../etc/passwd"), Err(BlobError::BadDigest(_))));
    }
}
