//! A running attempt's stdout and stderr as they are written, for the operator's live view
//! (`kubectl kommune logs --follow`): the bytes not sent yet, up to the live cap per stream.

use std::sync::{Arc, Mutex, PoisonError};

use kommune_proto::limits::{MAX_LIVE_LOG_BYTES, MAX_LOG_CHUNK_BYTES};
use kommune_proto::v1::{LogChunk, LogStream};

/// What one attempt wrote and has not sent live yet, per stream (0 stdout, 1 stderr). Past
/// the first [`MAX_LIVE_LOG_BYTES`] of a stream nothing more is kept: the logs uploaded at
/// the attempt's end have it all, and memory here stays bounded whatever the task prints.
#[derive(Debug, Clone, Default)]
pub struct LiveLog(Arc<Mutex<[Pending; 2]>>);

#[derive(Debug, Default)]
struct Pending {
    /// Offset of `bytes[0]` in the stream: what was taken before.
    taken: u64,
    bytes: Vec<u8>,
}

impl LiveLog {
    /// Takes in bytes the task wrote to `stream`.
    pub(crate) fn push(&self, stream: usize, data: &[u8]) {
        let mut streams = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(p) = streams.get_mut(stream) else { return };
        let room = MAX_LIVE_LOG_BYTES.saturating_sub(p.taken + p.bytes.len() as u64);
        let take = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        p.bytes.extend_from_slice(&data[..take]);
    }

    /// Takes what is pending as chunks of at most [`MAX_LOG_CHUNK_BYTES`], stdout first, no
    /// more than `budget` bytes (which it lowers by what it took).
    pub fn take(&self, attempt_id: &str, budget: &mut usize) -> Vec<LogChunk> {
        let mut streams = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut chunks = vec![];
        for (i, p) in streams.iter_mut().enumerate() {
            let n = p.bytes.len().min(*budget);
            let stream = if i == 0 { LogStream::Stdout } else { LogStream::Stderr };
            for (k, piece) in p.bytes[..n].chunks(MAX_LOG_CHUNK_BYTES).enumerate() {
                let offset = p.taken + (k * MAX_LOG_CHUNK_BYTES) as u64;
                chunks.push(LogChunk { attempt_id: attempt_id.to_string(), stream: stream as i32, offset, data: piece.to_vec() });
            }
            p.bytes.drain(..n);
            p.taken += n as u64;
            *budget -= n;
        }
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_contiguous_bounded_and_stop_at_the_cap() {
        let live = LiveLog::default();
        live.push(0, &vec![b'a'; MAX_LOG_CHUNK_BYTES + 10]);
        live.push(1, b"err");
        let mut budget = usize::MAX;
        let chunks = live.take("a1", &mut budget);
        let shape: Vec<(i32, u64, usize)> = chunks.iter().map(|c| (c.stream, c.offset, c.data.len())).collect();
        assert_eq!(shape, [(1, 0, MAX_LOG_CHUNK_BYTES), (1, MAX_LOG_CHUNK_BYTES as u64, 10), (2, 0, 3)]);
        assert!(live.take("a1", &mut budget).is_empty(), "nothing new, nothing sent");
        live.push(0, b"more");
        assert_eq!(live.take("a1", &mut budget)[0].offset, MAX_LOG_CHUNK_BYTES as u64 + 10);

        // A small budget takes part now, the rest next time, with no gap between.
        live.push(0, b"0123456789");
        let mut small = 4;
        let first = live.take("a1", &mut small);
        assert_eq!((first[0].data.as_slice(), small), (&b"0123"[..], 0));
        let rest = live.take("a1", &mut budget);
        assert_eq!(rest[0].offset, first[0].offset + 4);

        // Past the cap nothing more is kept.
        let capped = LiveLog::default();
        capped.push(1, &vec![0; MAX_LIVE_LOG_BYTES as usize + 100]);
        let total: usize = capped.take("a2", &mut budget).iter().map(|c| c.data.len()).sum();
        assert_eq!(total as u64, MAX_LIVE_LOG_BYTES);
        capped.push(1, b"x");
        assert!(capped.take("a2", &mut budget).is_empty());
    }
}
