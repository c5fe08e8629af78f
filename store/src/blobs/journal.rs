//! Where blob owners are kept on disk: a snapshot (`owners.json`) and a journal of the changes
//! made since (`owners.log`, one line each), so a change costs one appended, synced line and
//! the sweep folds the journal into a new snapshot.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::BlobError;
use super::owners::{Change, Owners};

/// File names that are never digests, so the sweep leaves them alone.
const SNAPSHOT: &str = "owners.json";
const LOG: &str = "owners.log";

#[derive(Debug)]
pub(super) struct Journal {
    dir: PathBuf,
    log: File,
    /// Changes appended since the last snapshot.
    pending: usize,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io { path: path.display().to_string(), source }
}

impl Journal {
    /// Reads the snapshot, replays the journal on it and folds it in.
    pub fn open(dir: &Path) -> Result<(Journal, Owners), BlobError> {
        let mut owners = read_snapshot(&dir.join(SNAPSHOT))?;
        let log_path = dir.join(LOG);
        match std::fs::read(&log_path) {
            // A line cut short by a crash, or one that no longer parses, is skipped: each line
            // stands alone, and a line already in the snapshot is skipped by its number.
            Ok(text) => {
                for change in String::from_utf8_lossy(&text).lines().filter_map(|l| serde_json::from_str::<Change>(l).ok()) {
                    owners.apply(&change);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&log_path)(e)),
        }
        let log = OpenOptions::new().create(true).append(true).open(&log_path).map_err(io(&log_path))?;
        let mut journal = Journal { dir: dir.to_path_buf(), log, pending: 0 };
        journal.compact(&owners)?;
        Ok((journal, owners))
    }

    /// Appends `change` and syncs it: once this returns, a restart replays it.
    pub fn append(&mut self, change: &Change) -> Result<(), BlobError> {
        let path = self.dir.join(LOG);
        // The line starts with its newline, so a line after one a crash cut short still parses.
        let mut line = b"\n".to_vec();
        serde_json::to_writer(&mut line, change).expect("a change always serialises");
        self.log.write_all(&line).map_err(io(&path))?;
        self.log.sync_data().map_err(io(&path))?;
        self.pending += 1;
        Ok(())
    }

    /// Writes `owners` as the snapshot (atomically: a crash leaves the old one or the new one)
    /// and empties the journal.
    pub fn compact(&mut self, owners: &Owners) -> Result<(), BlobError> {
        let path = self.dir.join(SNAPSHOT);
        let tmp = self.dir.join(format!(".{SNAPSHOT}.{}.tmp", std::process::id()));
        {
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&serde_json::to_vec(owners).expect("owners always serialise")).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // Emptied only once the snapshot holds every change in it; a crash in between replays
        // changes the snapshot already has, which their numbers skip.
        self.log.set_len(0).map_err(io(&self.dir.join(LOG)))?;
        self.pending = 0;
        Ok(())
    }

    pub fn pending(&self) -> usize {
        self.pending
    }
}

/// Reads the snapshot. One that does not parse is set aside (`owners.json.corrupt`) and the
/// operator starts with no owners: the sweep then deletes every blob older than the grace, and
/// each job still running stores its module again on its next reconcile (the first one after
/// the start, or within 30 s).
fn read_snapshot(path: &Path) -> Result<Owners, BlobError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Owners::default()),
        Err(e) => return Err(io(path)(e)),
    };
    match serde_json::from_slice(&text) {
        Ok(o) => Ok(o),
        Err(e) => {
            let aside = path.with_extension("json.corrupt");
            tracing::warn!(path = %path.display(), error = %e, aside = %aside.display(), "blob owners file does not parse; set aside, starting with no owners");
            std::fs::rename(path, &aside).map_err(io(path))?;
            Ok(Owners::default())
        }
    }
}
