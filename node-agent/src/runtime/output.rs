//! Bounded capture of a task's stdout and stderr: every byte is hashed, only the tail is kept.
//! Both runtimes feed it, so a digest or a tail means the same thing whichever runtime ran the task.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;

use super::{TAIL_BYTES, human_bytes};

/// Nothing is buffered past the tail, so these caps are about what a result may claim to be:
/// a task that prints more fails rather than being reported under a digest of a prefix.
pub(crate) const STDOUT_LIMIT: u64 = kommune_proto::limits::MAX_STDOUT_BYTES;
pub(crate) const STDERR_LIMIT: u64 = kommune_proto::limits::MAX_STDERR_BYTES;

#[derive(Debug)]
struct Capture {
    stream: &'static str,
    limit: u64,
    hasher: Sha256,
    total: u64,
    tail: VecDeque<u8>,
    exceeded: bool,
    /// A full copy kept for upload (`spec.outputs`), up to its own cap: (file, bytes kept, cap).
    keep: Option<(std::fs::File, u64, u64)>,
    /// The attempt's live view and this stream's index in it.
    live: Option<(super::live::LiveLog, usize)>,
}

/// One output stream of an attempt, shared between whoever writes it (the guest's WASI stdout,
/// a pipe reader) and the runtime that reports it.
#[derive(Debug, Clone)]
pub(crate) struct SharedCapture(Arc<Mutex<Capture>>);

impl SharedCapture {
    pub(crate) fn stdout() -> Self {
        Self::new("stdout", STDOUT_LIMIT)
    }

    pub(crate) fn stderr() -> Self {
        Self::new("stderr", STDERR_LIMIT)
    }

    fn new(stream: &'static str, limit: u64) -> Self {
        Self(Arc::new(Mutex::new(Capture {
            stream,
            limit,
            hasher: Sha256::new(),
            total: 0,
            tail: VecDeque::with_capacity(TAIL_BYTES),
            exceeded: false,
            keep: None,
            live: None,
        })))
    }

    /// Stdout and stderr of `ctx`: kept in full (up to the output limit) under its capture
    /// directory when the attempt uploads its outputs.
    pub(crate) fn streams_for(ctx: &super::AttemptContext) -> (Self, Self) {
        let (stdout, stderr) = (Self::stdout(), Self::stderr());
        if let Some((dir, cap)) = &ctx.keep_streams {
            for c in [&stdout, &stderr] {
                let stream = c.lock().stream;
                match std::fs::File::create(dir.join(stream)) {
                    Ok(f) => c.lock().keep = Some((f, 0, *cap)),
                    // The upload then reports the stream as missing; the task still runs.
                    Err(e) => tracing::warn!(error = %e, stream, "cannot keep the task's output for upload"),
                }
            }
        }
        if let Some(live) = &ctx.live {
            stdout.lock().live = Some((live.clone(), 0));
            stderr.lock().live = Some((live.clone(), 1));
        }
        (stdout, stderr)
    }

    /// A writer that panicked cannot leave the capture half-updated in a way that matters,
    /// so a poisoned lock is still read.
    fn lock(&self) -> MutexGuard<'_, Capture> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes in `bytes` up to the limit. Returns false once the stream has gone past its limit;
    /// bytes beyond it are dropped.
    pub(crate) fn push(&self, bytes: &[u8]) -> bool {
        let mut c = self.lock();
        if c.exceeded {
            return false;
        }
        let room = usize::try_from(c.limit - c.total).unwrap_or(usize::MAX);
        let accepted = &bytes[..bytes.len().min(room)];
        c.hasher.update(accepted);
        c.total += accepted.len() as u64;
        if let Some((file, kept, cap)) = &mut c.keep {
            // Past the cap nothing more is kept: the upload reports the rest as excess.
            let take = accepted.len().min(usize::try_from(*cap - *kept).unwrap_or(usize::MAX));
            if take > 0 && std::io::Write::write_all(file, &accepted[..take]).is_ok() {
                *kept += take as u64;
            }
        }
        if let Some((live, stream)) = &c.live {
            live.push(*stream, accepted);
        }
        let kept = &accepted[accepted.len().saturating_sub(TAIL_BYTES)..];
        let evicted = (c.tail.len() + kept.len()).saturating_sub(TAIL_BYTES);
        c.tail.drain(..evicted);
        c.tail.extend(kept);
        c.exceeded = bytes.len() > room;
        !c.exceeded
    }

    pub(crate) fn exceeded(&self) -> bool {
        self.lock().exceeded
    }

    /// "stdout limit 16 MiB exceeded"
    pub(crate) fn limit_message(&self) -> String {
        let c = self.lock();
        format!("{} limit {} exceeded", c.stream, human_bytes(c.limit))
    }

    pub(crate) fn digest_hex(&self) -> String {
        hex::encode(self.lock().hasher.clone().finalize())
    }

    pub(crate) fn total(&self) -> u64 {
        self.lock().total
    }

    pub(crate) fn tail(&self) -> Vec<u8> {
        self.lock().tail.iter().copied().collect()
    }
}

/// Lets the capture stand behind a WASI stdout or stderr.
impl AsyncWrite for SharedCapture {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(if self.push(buf) { Ok(buf.len()) } else { Err(io::Error::other(self.limit_message())) })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn the_digest_covers_everything_while_the_tail_keeps_the_end() {
        let capture = SharedCapture::stdout();
        let mut all = Vec::new();
        for i in 0..1000u32 {
            let line = format!("line {i}\n");
            assert!(capture.push(line.as_bytes()));
            all.extend_from_slice(line.as_bytes());
        }
        assert_eq!(capture.total(), all.len() as u64);
        assert_eq!(capture.digest_hex(), sha256_hex(&all));
        assert_eq!(capture.tail(), all[all.len() - TAIL_BYTES..]);
    }

    #[test]
    fn a_single_write_larger_than_the_tail_keeps_only_its_end() {
        let capture = SharedCapture::stderr();
        let big: Vec<u8> = (0..3 * TAIL_BYTES).map(|i| (i % 251) as u8).collect();
        assert!(capture.push(b"head"));
        assert!(capture.push(&big));
        assert_eq!(capture.tail(), big[big.len() - TAIL_BYTES..]);
    }

    #[test]
    fn output_up_to_the_limit_is_fine_and_one_byte_more_is_not() {
        let capture = SharedCapture::new("stdout", 10);
        assert!(capture.push(b"0123456789"));
        assert!(!capture.exceeded());
        assert!(!capture.push(b"x"));
        assert!(capture.exceeded());
        assert_eq!(capture.total(), 10);
        assert_eq!(capture.digest_hex(), sha256_hex(b"0123456789"));
        assert_eq!(capture.limit_message(), "stdout limit 10 bytes exceeded");
    }

    #[test]
    fn a_write_that_straddles_the_limit_keeps_the_part_that_fits() {
        let capture = SharedCapture::new("stdout", 4);
        assert!(!capture.push(b"abcdef"));
        assert_eq!(capture.total(), 4);
        assert_eq!(capture.tail(), b"abcd");
        assert_eq!(SharedCapture::stdout().limit_message(), "stdout limit 16 MiB exceeded");
    }
}
