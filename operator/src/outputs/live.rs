//! Live stdout and stderr of running attempts, as their agents claim them: a bounded tail per
//! attempt that `kubectl kommune logs --follow` reads, dropped when the attempt ends.
//!
//! Memory is bounded: at most [`MAX_LIVE_ATTEMPTS`] attempts have a tail at once, each keeps
//! the last [`TAIL_BYTES`] of each stream (64 MiB in all, plus what a follower still reads
//! of an attempt that just ended). Nothing here is billed, verified or stored: the logs
//! uploaded when the attempt ends are what counts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use futures::stream::BoxStream;
use kommune_proto::limits::{MAX_LIVE_LOG_BYTES, MAX_LOG_CHUNK_BYTES};
use tokio::sync::watch;

/// Bytes of each stream of an attempt kept for followers who join late or lag.
pub const TAIL_BYTES: usize = 64 << 10;
/// Attempts with a live tail at once; chunks of further attempts are dropped (`full`).
pub const MAX_LIVE_ATTEMPTS: usize = 512;
/// Ended attempts remembered, so a chunk or a follower racing an attempt's end cannot open a
/// tail that nothing would ever drop.
const ENDED_REMEMBERED: usize = 4096;
/// How often a follower with nothing new hears a keep-alive line (proxies and the plugin's
/// read timeout close a silent connection).
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// The two streams, by the index chunks and cursors use.
pub const STREAMS: [&str; 2] = ["stdout", "stderr"];

/// Why a live chunk was not taken. Each is a drop, counted by its label, never a session
/// kill: a live chunk can do no harm beyond its own attempt's live view, and refusing it
/// costs nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    #[error("the attempt is not assigned to this node")]
    NotHeld,
    #[error("the attempt is not running")]
    Ended,
    #[error("the chunk is empty or larger than {MAX_LOG_CHUNK_BYTES} bytes")]
    Oversize,
    #[error("the chunk does not start where the stream's last one ended (a gap)")]
    Gap,
    #[error("the chunk repeats bytes already received (an overlap)")]
    Overlap,
    #[error("the chunk goes past the first {MAX_LIVE_LOG_BYTES} bytes of its stream")]
    Capped,
    #[error("the operator keeps live logs of {MAX_LIVE_ATTEMPTS} attempts at most")]
    Full,
    #[error("the chunk names no known stream")]
    BadStream,
}

impl Dropped {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Dropped::NotHeld => "not_held",
            Dropped::Ended => "ended",
            Dropped::Oversize => "oversize",
            Dropped::Gap => "gap",
            Dropped::Overlap => "overlap",
            Dropped::Capped => "capped",
            Dropped::Full => "full",
            Dropped::BadStream => "bad_stream",
        }
    }
}

/// One line of a follower's stream (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum LiveEvent {
    /// The first line: which attempt is followed, and where it runs.
    #[serde(rename_all = "camelCase")]
    Attempt { attempt_id: String, node: String },
    /// Bytes of `stream` starting at `offset`, base64.
    Data { stream: String, offset: u64, data: String },
    /// Bytes `from..to` of `stream` are not available live (the follower came late or lagged
    /// past the tail, or the agent's connection dropped them); the stored logs have them.
    Skipped { stream: String, from: u64, to: u64 },
    /// Nothing new for a while; the attempt still runs.
    KeepAlive,
    /// The last line: the attempt ended (`how`: its phase); its stored logs are complete.
    #[serde(rename_all = "camelCase")]
    End { attempt_id: String, how: String },
}

impl LiveEvent {
    /// The data of a Data event, decoded; None for other events or bad base64.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        match self {
            LiveEvent::Data { data, .. } => base64::engine::general_purpose::STANDARD.decode(data).ok(),
            _ => None,
        }
    }
}

/// What identifies an attempt with a live tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveKey {
    pub attempt_id: String,
    pub node: String,
    pub job_uid: String,
    pub task_index: u32,
}

/// What a follower of a task finds.
pub enum Following {
    /// The attempt of the task that runs now (the newest, with replicas).
    Live(Arc<LiveAttempt>),
    /// No attempt of the task runs now: it has not started, or it has ended.
    NotRunning,
}

/// Where the web layer finds a task's running attempt; it checks the caller's permission on
/// the ComputeJob first, implementations do no authorization.
pub trait LiveSource: Send + Sync {
    /// The running attempt of task `task_index` of the job with uid `job_uid`.
    fn follow(&self, job_uid: String, task_index: u32) -> futures::future::BoxFuture<'_, Result<Following, String>>;
}

/// The running attempts' live tails.
#[derive(Default)]
pub struct LiveLogs {
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    live: HashMap<String, Arc<LiveAttempt>>,
    ended: VecDeque<String>,
    ended_ids: HashSet<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing is left half-done under these locks by a panic that matters.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LiveLogs {
    /// The live tail of an attempt, if it has one.
    pub fn get(&self, attempt_id: &str) -> Option<Arc<LiveAttempt>> {
        lock(&self.registry).live.get(attempt_id).cloned()
    }

    /// Opens a tail for a running attempt (or returns the one it has). The caller has checked
    /// that the attempt runs on `key.node`.
    pub fn open(&self, key: LiveKey) -> Result<Arc<LiveAttempt>, Dropped> {
        let mut r = lock(&self.registry);
        if let Some(a) = r.live.get(&key.attempt_id) {
            return Ok(a.clone());
        }
        if r.ended_ids.contains(&key.attempt_id) {
            return Err(Dropped::Ended);
        }
        if r.live.len() >= MAX_LIVE_ATTEMPTS {
            return Err(Dropped::Full);
        }
        let a = Arc::new(LiveAttempt { key: key.clone(), state: Mutex::default(), changed: watch::Sender::new(0) });
        r.live.insert(key.attempt_id, a.clone());
        Ok(a)
    }

    /// The attempt ended (`how`: its phase): its tail goes, and its followers finish with the
    /// bytes they have not read yet, then an End line.
    pub fn end(&self, attempt_id: &str, how: &str) {
        let mut r = lock(&self.registry);
        if let Some(a) = r.live.remove(attempt_id) {
            lock(&a.state).ended = Some(how.to_string());
            a.changed.send_modify(|v| *v += 1);
        }
        if r.ended_ids.insert(attempt_id.to_string()) {
            r.ended.push_back(attempt_id.to_string());
            if r.ended.len() > ENDED_REMEMBERED
                && let Some(old) = r.ended.pop_front()
            {
                r.ended_ids.remove(&old);
            }
        }
    }

    /// Attempts with a live tail now.
    pub fn len(&self) -> usize {
        lock(&self.registry).live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held in all tails now.
    pub fn buffered_bytes(&self) -> usize {
        lock(&self.registry).live.values().map(|a| a.buffered_bytes()).sum()
    }
}

/// One running attempt's live tail and the followers' wake-up.
pub struct LiveAttempt {
    pub key: LiveKey,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    tails: [Tail; 2],
    /// Set when the attempt ended: how.
    ended: Option<String>,
}

/// The last bytes of one stream: `bytes` start at offset `start`.
#[derive(Default)]
struct Tail {
    start: u64,
    bytes: VecDeque<u8>,
    /// The session whose chunks continue this stream.
    session: Option<u64>,
}

impl Tail {
    fn next(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

impl LiveAttempt {
    /// Takes a chunk of `stream` (0 stdout, 1 stderr) at `offset` sent on session `session`.
    /// Within a session chunks must be contiguous; the first chunk of a new session may start
    /// further on (what the dropped connection lost is shown to followers as skipped), never
    /// earlier: bytes once taken are never replaced.
    pub fn append(&self, session: u64, stream: usize, offset: u64, data: &[u8]) -> Result<(), Dropped> {
        if data.is_empty() || data.len() > MAX_LOG_CHUNK_BYTES {
            return Err(Dropped::Oversize);
        }
        if offset.saturating_add(data.len() as u64) > MAX_LIVE_LOG_BYTES {
            return Err(Dropped::Capped);
        }
        let mut s = lock(&self.state);
        if s.ended.is_some() {
            return Err(Dropped::Ended);
        }
        let tail = s.tails.get_mut(stream).ok_or(Dropped::BadStream)?;
        let next = tail.next();
        if offset < next {
            return Err(Dropped::Overlap);
        }
        if offset > next {
            if tail.session == Some(session) {
                return Err(Dropped::Gap);
            }
            tail.bytes.clear();
            tail.start = offset;
        }
        tail.session = Some(session);
        tail.bytes.extend(data);
        let over = tail.bytes.len().saturating_sub(TAIL_BYTES);
        tail.bytes.drain(..over);
        tail.start += over as u64;
        drop(s);
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Bytes held for this attempt now.
    pub fn buffered_bytes(&self) -> usize {
        lock(&self.state).tails.iter().map(|t| t.bytes.len()).sum()
    }

    /// What a follower at `cursor` (the next offset of each stream it wants) has not seen,
    /// moving the cursor past it; then, once nothing is left and the attempt ended, its End.
    fn read(&self, cursor: &mut [u64; 2]) -> (Vec<LiveEvent>, Option<LiveEvent>) {
        let s = lock(&self.state);
        let mut events = vec![];
        for (i, tail) in s.tails.iter().enumerate() {
            let stream = STREAMS[i].to_string();
            if cursor[i] < tail.start {
                events.push(LiveEvent::Skipped { stream: stream.clone(), from: cursor[i], to: tail.start });
                cursor[i] = tail.start;
            }
            if cursor[i] < tail.next() {
                let skip = (cursor[i] - tail.start) as usize;
                let bytes: Vec<u8> = tail.bytes.iter().skip(skip).copied().collect();
                events.push(LiveEvent::Data { stream, offset: cursor[i], data: base64::engine::general_purpose::STANDARD.encode(bytes) });
                cursor[i] = tail.next();
            }
        }
        let end = s.ended.as_ref().map(|how| LiveEvent::End { attempt_id: self.key.attempt_id.clone(), how: how.clone() });
        (events, end)
    }

    /// The follower's events: the attempt, its buffered tail, then new bytes as they come,
    /// until the attempt ends (End) — or, unless `follow`, at once after the tail.
    pub fn follow(self: Arc<Self>, follow: bool) -> BoxStream<'static, LiveEvent> {
        let first = LiveEvent::Attempt { attempt_id: self.key.attempt_id.clone(), node: self.key.node.clone() };
        let changed = self.changed.subscribe();
        let state = (self, changed, [0u64; 2], VecDeque::from([first]), false);
        Box::pin(futures::stream::unfold(state, move |(me, mut changed, mut cursor, mut queue, mut done)| async move {
            loop {
                if let Some(e) = queue.pop_front() {
                    return Some((e, (me, changed, cursor, queue, done)));
                }
                if done {
                    return None;
                }
                // Marked seen before reading, so a chunk that lands after the read wakes us.
                changed.borrow_and_update();
                let (events, end) = me.read(&mut cursor);
                queue.extend(events);
                if let Some(end) = end {
                    queue.push_back(end);
                    done = true;
                    continue;
                }
                if !follow {
                    done = true;
                    continue;
                }
                if !queue.is_empty() {
                    continue;
                }
                match tokio::time::timeout(KEEPALIVE, changed.changed()).await {
                    Ok(Ok(())) => {}
                    // The sender lives in `me`: it cannot close while we hold it.
                    Ok(Err(_)) => return None,
                    Err(_) => queue.push_back(LiveEvent::KeepAlive),
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests;
