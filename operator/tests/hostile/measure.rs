//! What the boundedness tests measure and print: the operator's data directory on disk and this
//! process's resident memory (the operator runs in the test process).

use std::path::Path;

/// Bytes of every file under `dir`, walked recursively (SQLite's WAL and journal files too).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Moves everything SQLite holds in the write-ahead logs of `dir`'s databases into the
/// databases and truncates the logs, so [`dir_bytes`] measures what is stored rather than how
/// far the log has grown since its last automatic checkpoint (up to about 4 MiB each).
pub fn checkpoint_sqlite(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for path in entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "db")) {
        if let Ok(conn) = rusqlite::Connection::open(&path) {
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
    }
}

/// This process's resident set size in KiB, from /proc/self/status (0 where there is none).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

/// One reading of both, to print and compare.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    pub disk_bytes: u64,
    pub rss_kib: u64,
}

impl Footprint {
    pub fn of(data_dir: &Path) -> Footprint {
        checkpoint_sqlite(data_dir);
        Footprint { disk_bytes: dir_bytes(data_dir), rss_kib: rss_kib() }
    }
}

impl std::fmt::Display for Footprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "data dir {:.2} MiB, RSS {:.1} MiB", self.disk_bytes as f64 / (1 << 20) as f64, self.rss_kib as f64 / 1024.0)
    }
}
