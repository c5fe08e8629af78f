//! The result spool: finished attempts waiting for the operator's Ack. A terminal update is
//! written as it is sent and kept until its Ack, so neither a dropped connection nor a crash
//! after the write loses a result or its usage receipt (a crash before the write is durable is
//! a crash before the result existed, unless the operator already recorded it).
//!
//! Updates are appended to one log, `spool.log`, by a writer thread that makes everything
//! queued durable with a single fdatasync (group commit): one fsync per batch, not one file,
//! fsync and rename per result. Removals are appended without waiting (a lost removal only
//! means a resend, which the operator acknowledges again). The pending set is kept in memory.
//! Spools written by older agents (one `<attempt id>.pb` file each) are still read.
//!
//! ```text
//! record := len u32 LE | kind u8 (1 put, 2 remove) | payload (len bytes) | check (8 bytes)
//! check  := first 8 bytes of sha256(kind || payload)
//! ```
//! Replay stops at the first torn or damaged record: only a write that was never reported
//! durable can be torn.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};

use kommune_proto::v1::TaskUpdate;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tracing::warn;

const LOG: &str = "spool.log";
const PUT: u8 = 1;
const REMOVE: u8 = 2;
/// The log is rewritten with only the pending records once it is this large and mostly dead.
const COMPACT_AT: u64 = 4 << 20;
/// Largest record accepted on replay (an update is bounded far below this).
const MAX_RECORD: usize = 16 << 20;

/// Finished attempts waiting for the operator's Ack.
pub struct Spool {
    dir: PathBuf,
    pending: Mutex<BTreeMap<String, TaskUpdate>>,
    /// Attempts whose update is in an old-style `<id>.pb` file.
    legacy: Mutex<Vec<String>>,
    /// Where the log's valid records end (a torn tail is cut off before appending).
    valid_len: u64,
    /// Started on the first write, so a process that only reads (`earnings`) never writes.
    writer: Mutex<Option<(Sender<LogOp>, std::thread::JoinHandle<()>)>>,
}

/// One request to the writer thread.
enum LogOp {
    Put { id: String, bytes: Vec<u8>, done: oneshot::Sender<std::io::Result<()>> },
    Remove { id: String },
}

pub(crate) fn file_name(attempt_id: &str) -> Option<String> {
    let ok = !attempt_id.is_empty() && attempt_id.len() <= 200 && attempt_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    (ok && !attempt_id.starts_with('.')).then(|| format!("{attempt_id}.pb"))
}

fn check(kind: u8, payload: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update([kind]);
    h.update(payload);
    h.finalize()[..8].try_into().expect("sha256 is 32 bytes")
}

fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(payload.len() + 13);
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.push(kind);
    r.extend_from_slice(payload);
    r.extend_from_slice(&check(kind, payload));
    r
}

/// Replays `bytes`: the pending updates and where the valid records end.
fn replay(bytes: &[u8]) -> (BTreeMap<String, TaskUpdate>, u64) {
    let mut pending = BTreeMap::new();
    let mut at = 0usize;
    while let Some(head) = bytes.get(at..at + 5) {
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let kind = head[4];
        if len > MAX_RECORD {
            break;
        }
        let Some(payload) = bytes.get(at + 5..at + 5 + len) else { break };
        let Some(sum) = bytes.get(at + 5 + len..at + 13 + len) else { break };
        if sum != check(kind, payload) {
            break;
        }
        match kind {
            PUT => match TaskUpdate::decode(payload) {
                Ok(u) => drop(pending.insert(u.attempt_id.clone(), u)),
                Err(_) => break,
            },
            REMOVE => drop(pending.remove(String::from_utf8_lossy(payload).as_ref())),
            _ => break,
        }
        at += 13 + len;
    }
    (pending, at as u64)
}

impl Spool {
    /// Opens the spool in `dir` and reads what is pending. Writes nothing.
    pub fn open(dir: PathBuf) -> std::io::Result<Spool> {
        std::fs::create_dir_all(&dir)?;
        let mut bytes = vec![];
        match File::open(dir.join(LOG)) {
            Ok(mut f) => drop(f.read_to_end(&mut bytes)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (mut pending, valid_len) = replay(&bytes);
        if valid_len < bytes.len() as u64 {
            warn!(path = %dir.join(LOG).display(), valid = valid_len, len = bytes.len(), "the result spool ends in a torn or damaged record; it is ignored");
        }
        let mut legacy = vec![];
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".pb") || name.starts_with('.') {
                continue;
            }
            match std::fs::read(e.path()).map(|b| TaskUpdate::decode(b.as_slice())) {
                Ok(Ok(u)) => {
                    legacy.push(u.attempt_id.clone());
                    pending.entry(u.attempt_id.clone()).or_insert(u);
                }
                _ => warn!(path = %e.path().display(), "unreadable spooled result skipped"),
            }
        }
        Ok(Spool { dir, pending: Mutex::new(pending), legacy: Mutex::new(legacy), valid_len, writer: Mutex::new(None) })
    }

    fn writer(&self) -> std::io::Result<Sender<LogOp>> {
        let mut writer = lock(&self.writer);
        if let Some((w, _)) = writer.as_ref() {
            return Ok(w.clone());
        }
        let path = self.dir.join(LOG);
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        file.set_len(self.valid_len)?;
        file.sync_all()?;
        let live: BTreeMap<String, Vec<u8>> = lock(&self.pending)
            .iter()
            .filter(|(id, _)| !lock(&self.legacy).contains(id))
            .map(|(id, u)| (id.clone(), record(PUT, &u.encode_to_vec())))
            .collect();
        let (tx, rx) = channel();
        let live_len = live.values().map(|r| r.len() as u64).sum();
        let log = LogWriter { dir: self.dir.clone(), file, len: self.valid_len, live, live_len };
        let thread = std::thread::Builder::new().name("result-spool".into()).spawn(move || log.run(rx))?;
        Ok(writer.insert((tx, thread)).0.clone())
    }

    /// Durably records a terminal update; resolves once it is on disk. Many concurrent calls
    /// share one fdatasync.
    pub async fn put(&self, update: &TaskUpdate) -> std::io::Result<()> {
        self.begin_put(update)?.await
    }

    /// Records a terminal update: it is pending at once (listed in Hello, resent, removed by
    /// its Ack) and its write is queued before this returns, so a removal is always logged
    /// after it; the returned future resolves once it is on disk. If the write fails the
    /// update stays pending in memory, so this process still resends it until it is acked.
    pub fn begin_put(&self, update: &TaskUpdate) -> std::io::Result<impl Future<Output = std::io::Result<()>> + use<>> {
        if file_name(&update.attempt_id).is_none() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad attempt id"));
        }
        let (done, durable) = oneshot::channel();
        let closed = || std::io::Error::other("the result spool's writer has stopped");
        self.writer()?.send(LogOp::Put { id: update.attempt_id.clone(), bytes: record(PUT, &update.encode_to_vec()), done }).map_err(|_| closed())?;
        lock(&self.pending).insert(update.attempt_id.clone(), update.clone());
        Ok(async move { durable.await.map_err(|_| closed())? })
    }

    /// Forgets an acknowledged attempt.
    pub fn remove(&self, attempt_id: &str) {
        if lock(&self.pending).remove(attempt_id).is_none() {
            return;
        }
        let mut legacy = lock(&self.legacy);
        if let Some(i) = legacy.iter().position(|id| id == attempt_id) {
            legacy.swap_remove(i);
            if let Some(name) = file_name(attempt_id) {
                let _ = std::fs::remove_file(self.dir.join(name));
            }
            return;
        }
        drop(legacy);
        match self.writer() {
            Ok(w) => drop(w.send(LogOp::Remove { id: attempt_id.to_string() })),
            Err(e) => warn!(attempt = attempt_id, error = %e, "cannot record an acknowledgement in the spool; the result will be resent once"),
        }
    }

    pub fn contains(&self, attempt_id: &str) -> bool {
        lock(&self.pending).contains_key(attempt_id)
    }

    /// The spooled update of one attempt.
    pub fn get(&self, attempt_id: &str) -> Option<TaskUpdate> {
        lock(&self.pending).get(attempt_id).cloned()
    }

    /// Every spooled update, by attempt id.
    pub fn all(&self) -> Vec<TaskUpdate> {
        lock(&self.pending).values().cloned().collect()
    }

    /// Ids of every spooled update.
    pub fn ids(&self) -> Vec<String> {
        lock(&self.pending).keys().cloned().collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Spool {
    /// Lets the writer finish what is queued (removals are not waited for otherwise), so a
    /// spool opened again afterwards sees all of it.
    fn drop(&mut self) {
        if let Some((tx, thread)) = lock(&self.writer).take() {
            drop(tx);
            let _ = thread.join();
        }
    }
}

/// The writer thread: appends, fdatasyncs once per batch, answers every put of the batch.
struct LogWriter {
    dir: PathBuf,
    file: File,
    len: u64,
    /// Pending records by attempt id, for compaction.
    live: BTreeMap<String, Vec<u8>>,
    live_len: u64,
}

impl LogWriter {
    fn run(mut self, rx: Receiver<LogOp>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut buf = Vec::new();
            let mut waiting = vec![];
            for w in batch {
                match w {
                    LogOp::Put { id, bytes, done } => {
                        buf.extend_from_slice(&bytes);
                        self.live_len += bytes.len() as u64;
                        if let Some(old) = self.live.insert(id, bytes) {
                            self.live_len -= old.len() as u64;
                        }
                        waiting.push(done);
                    }
                    LogOp::Remove { id } => {
                        buf.extend_from_slice(&record(REMOVE, id.as_bytes()));
                        if let Some(old) = self.live.remove(&id) {
                            self.live_len -= old.len() as u64;
                        }
                    }
                }
            }
            // Removals alone are written without an fsync: they ride on the next put's, and a
            // lost one only means a resend. Syncing them would make the next put wait twice.
            let result = self.append(&buf, !waiting.is_empty());
            for done in waiting {
                let _ = done.send(result.as_ref().map(|_| ()).map_err(|e| std::io::Error::new(e.kind(), e.to_string())));
            }
            if let Err(e) = result {
                warn!(error = %e, "cannot write the result spool; results are sent but will not survive a restart");
            }
        }
        let _ = self.file.sync_data();
    }

    fn append(&mut self, buf: &[u8], durable: bool) -> std::io::Result<()> {
        self.file.write_all(buf)?;
        if durable {
            self.file.sync_data()?;
        }
        self.len += buf.len() as u64;
        if self.len > COMPACT_AT && self.len > 4 * self.live_len {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the log with only the pending records.
    fn compact(&mut self) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{LOG}.tmp"));
        let mut f = File::create(&tmp)?;
        let mut len = 0;
        for r in self.live.values() {
            f.write_all(r)?;
            len += r.len() as u64;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(LOG))?;
        File::open(&self.dir)?.sync_all()?;
        self.file = std::fs::OpenOptions::new().append(true).open(self.dir.join(LOG))?;
        self.len = len;
        Ok(())
    }
}

/// A poisoned lock only means a panic elsewhere; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kommune_proto::v1::{AttemptState, TaskResult};

    fn update(id: &str) -> TaskUpdate {
        TaskUpdate {
            attempt_id: id.into(),
            state: AttemptState::Succeeded as i32,
            result: Some(TaskResult { exit_code: 0, ..Default::default() }),
            receipt: None,
            trace: None,
        }
    }

    #[tokio::test]
    async fn spooled_updates_survive_reopen_and_acknowledged_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path().into()).unwrap();
            let (a, b, c) = (update("u.0.1"), update("u.1.1"), update("u.2.1"));
            let (ra, rb, rc) = tokio::join!(spool.put(&a), spool.put(&b), spool.put(&c));
            for r in [ra, rb, rc] {
                r.unwrap();
            }
            spool.remove("u.1.1");
            assert!(spool.contains("u.0.1") && !spool.contains("u.1.1"));
        }
        let spool = Spool::open(dir.path().into()).unwrap();
        assert_eq!(spool.all(), vec![update("u.0.1"), update("u.2.1")]);
        assert_eq!(spool.get("u.2.1"), Some(update("u.2.1")));
    }

    #[tokio::test]
    async fn an_update_is_pending_while_its_write_is_in_flight_and_an_ack_meanwhile_is_logged_after_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path().into()).unwrap();
            let durable = spool.begin_put(&update("fast.0.1")).unwrap();
            let kept = spool.begin_put(&update("kept.0.1")).unwrap();
            assert_eq!(spool.ids(), vec!["fast.0.1", "kept.0.1"], "listed (and resent) before the write is durable");
            // The operator's Ack overtakes the fdatasync: the removal is queued behind the put.
            spool.remove("fast.0.1");
            durable.await.unwrap();
            kept.await.unwrap();
            assert_eq!(spool.ids(), vec!["kept.0.1"]);
        }
        assert_eq!(Spool::open(dir.path().into()).unwrap().ids(), vec!["kept.0.1"], "the acked update does not come back");
        assert!(Spool::open(dir.path().into()).unwrap().begin_put(&update("../escape")).is_err());
    }

    #[tokio::test]
    async fn a_torn_tail_is_ignored_and_cut_before_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        Spool::open(dir.path().into()).unwrap().put(&update("u.0.1")).await.unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(dir.path().join(LOG)).unwrap();
        f.write_all(&record(PUT, &update("u.9.1").encode_to_vec())[..10]).unwrap();
        let spool = Spool::open(dir.path().into()).unwrap();
        assert_eq!(spool.ids(), vec!["u.0.1"]);
        spool.put(&update("u.1.1")).await.unwrap();
        assert_eq!(Spool::open(dir.path().into()).unwrap().ids(), vec!["u.0.1", "u.1.1"]);
    }

    #[tokio::test]
    async fn results_spooled_by_older_agents_are_read_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.0.1.pb"), update("old.0.1").encode_to_vec()).unwrap();
        std::fs::write(dir.path().join("garbage.pb"), b"\xff\xff\xff").unwrap();
        let spool = Spool::open(dir.path().into()).unwrap();
        assert_eq!(spool.ids(), vec!["old.0.1"]);
        spool.remove("old.0.1");
        assert!(!dir.path().join("old.0.1.pb").exists());
        assert!(Spool::open(dir.path().into()).unwrap().all().is_empty());
    }

    #[tokio::test]
    async fn a_long_log_is_compacted_to_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().into()).unwrap();
        let mut big = update("keep.0.1");
        big.result.as_mut().unwrap().stdout_tail = vec![b'x'; 4096];
        spool.put(&big).await.unwrap();
        for i in 0..1100 {
            let mut u = big.clone();
            u.attempt_id = format!("gone.{i}.1");
            spool.put(&u).await.unwrap();
            spool.remove(&u.attempt_id);
        }
        spool.put(&update("last.0.1")).await.unwrap();
        assert!(std::fs::metadata(dir.path().join(LOG)).unwrap().len() < COMPACT_AT);
        assert_eq!(Spool::open(dir.path().into()).unwrap().ids(), vec!["keep.0.1", "last.0.1"]);
    }

    #[test]
    fn attempt_ids_cannot_escape_the_spool() {
        for bad in ["", "../x", "a/b", ".hidden", "x\0y"] {
            assert_eq!(file_name(bad), None, "{bad:?}");
        }
        assert_eq!(file_name("0a9f-uid.3.1").as_deref(), Some("0a9f-uid.3.1.pb"));
    }
}
