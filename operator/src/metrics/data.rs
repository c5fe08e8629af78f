//! Sizes of what the operator keeps on its volume, read at scrape time: the SQLite files of
//! the attempt store and the ledger, and the module blobs.

use std::path::Path;

/// What [`measure`] found. Missing files count as zero (PostgreSQL keeps the ledger elsewhere).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub store_bytes: u64,
    pub blob_bytes: u64,
    pub blobs: u64,
}

/// The SQLite databases, with their write-ahead logs and shared-memory files.
const DATABASES: [&str; 2] = ["kommune.db", "ledger.db"];

/// Sums the files under `dir`. A scrape must not fail for an unreadable file, so errors count
/// as zero (the store's own errors are reported where it is used).
pub fn measure(dir: &Path) -> Sizes {
    let mut sizes = Sizes::default();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if DATABASES.iter().any(|db| name.starts_with(db)) {
            sizes.store_bytes += entry.metadata().map_or(0, |m| m.len());
        }
    }
    // Blobs are named by their digest; the journal and temporary files are not blobs.
    for entry in std::fs::read_dir(dir.join("blobs")).into_iter().flatten().flatten() {
        if kommune_proto::is_sha256_hex(&entry.file_name().to_string_lossy()) {
            sizes.blob_bytes += entry.metadata().map_or(0, |m| m.len());
            sizes.blobs += 1;
        }
    }
    sizes
}
