//! `logs --follow` while the task runs: the operator's live stream of the running attempt,
//! printed as it comes; what was printed is remembered, so the stored logs add only the rest.

use std::io::{self, Write};

use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use kommune_operator::outputs::live::{LiveEvent, STREAMS};

/// What was printed live: of which attempt, and how far into each stream without a hole.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Printed {
    pub attempt: Option<String>,
    /// Bytes of stdout and stderr printed from the stream's start.
    pub offsets: [u64; 2],
    /// A stream of which bytes were not shown live (the follower came late or lagged).
    pub holes: [bool; 2],
}

fn index(stream: &str) -> Option<usize> {
    STREAMS.iter().position(|s| *s == stream)
}

impl Printed {
    /// Prints what `event` adds: stdout bytes to `out`, stderr bytes and notes to `err`.
    /// Bytes printed before (a reconnect replays the tail) are not printed again. Returns
    /// true on the attempt's End.
    pub fn apply(&mut self, event: &LiveEvent, out: &mut dyn Write, err: &mut dyn Write) -> io::Result<bool> {
        match event {
            LiveEvent::Attempt { attempt_id, node } => {
                if self.attempt.as_deref() != Some(attempt_id) {
                    if self.attempt.is_some() {
                        writeln!(err, "(now following attempt {attempt_id} on {node})")?;
                    } else {
                        writeln!(err, "(following attempt {attempt_id} on {node} live: what the provider sends while it runs)")?;
                    }
                    *self = Printed { attempt: Some(attempt_id.clone()), ..Printed::default() };
                }
            }
            LiveEvent::Data { stream, offset, .. } => {
                let (Some(i), Some(bytes)) = (index(stream), event.bytes()) else { return Ok(false) };
                let end = offset + bytes.len() as u64;
                if end <= self.offsets[i] {
                    return Ok(false);
                }
                if *offset > self.offsets[i] {
                    // Announced by a Skipped line; kept in case a stream had none.
                    self.holes[i] = true;
                }
                let from = usize::try_from(self.offsets[i].saturating_sub(*offset)).unwrap_or(usize::MAX).min(bytes.len());
                let sink: &mut dyn Write = if i == 0 { out } else { err };
                sink.write_all(&bytes[from..])?;
                sink.flush()?;
                self.offsets[i] = end;
            }
            LiveEvent::Skipped { stream, from, to } => {
                if let Some(i) = index(stream)
                    && *to > self.offsets[i]
                {
                    self.holes[i] = true;
                    writeln!(err, "\n({} bytes of {stream} from byte {from} were not shown live; the stored logs have them)", to - from)?;
                }
            }
            LiveEvent::KeepAlive => {}
            LiveEvent::End { attempt_id, how } => {
                writeln!(err, "(attempt {attempt_id} ended: {how})")?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// How many leading bytes of stored output `name` of `attempt` were printed live already
    /// and are to be skipped: none for another attempt, or for a stream with a hole (it is
    /// printed again whole, so nothing is lost).
    pub fn already(&self, attempt: &str, name: &str) -> u64 {
        match index(name) {
            Some(i) if self.attempt.as_deref() == Some(attempt) && !self.holes[i] => self.offsets[i],
            _ => 0,
        }
    }
}

/// Prints one live stream until it ends (the attempt ended, or the connection broke: the
/// caller asks again, and nothing is printed twice).
pub async fn print_stream(body: kube::client::Body, printed: &mut Printed) -> anyhow::Result<()> {
    let mut data = body.into_data_stream();
    let mut pending: Vec<u8> = vec![];
    while let Some(chunk) = data.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                eprintln!("(the live stream broke off: {e}; asking again)");
                return Ok(());
            }
        };
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let event: LiveEvent = match serde_json::from_slice(&line) {
                Ok(e) => e,
                // A newer operator's kind of line: skipped, not fatal.
                Err(_) => continue,
            };
            if printed.apply(&event, &mut io::stdout().lock(), &mut io::stderr().lock())? {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn data(stream: &str, offset: u64, bytes: &[u8]) -> LiveEvent {
        LiveEvent::Data { stream: stream.into(), offset, data: base64::engine::general_purpose::STANDARD.encode(bytes) }
    }

    fn attempt(id: &str) -> LiveEvent {
        LiveEvent::Attempt { attempt_id: id.into(), node: "pn-a".into() }
    }

    #[test]
    fn nothing_is_printed_twice() {
        let (mut out, mut err) = (vec![], vec![]);
        let mut p = Printed::default();
        for e in [attempt("a1"), data("stdout", 0, b"one\n"), data("stderr", 0, b"warn\n"), data("stdout", 4, b"two\n")] {
            assert!(!p.apply(&e, &mut out, &mut err).unwrap());
        }
        // The connection broke; the new stream replays the tail, then goes on.
        for e in [attempt("a1"), data("stdout", 0, b"one\ntwo\n"), data("stdout", 8, b"three\n")] {
            p.apply(&e, &mut out, &mut err).unwrap();
        }
        assert!(p.apply(&LiveEvent::End { attempt_id: "a1".into(), how: "Succeeded".into() }, &mut out, &mut err).unwrap());
        assert_eq!(out, b"one\ntwo\nthree\n");
        // The stored logs of the same attempt are printed from where the live ones stopped.
        assert_eq!(p.already("a1", "stdout"), 14);
        assert_eq!(p.already("a1", "stderr"), 5);
        // Another attempt's (a replica accepted instead) are printed whole.
        assert_eq!(p.already("a2", "stdout"), 0);
    }

    #[test]
    fn a_stream_with_a_hole_is_printed_again_whole_when_stored() {
        let (mut out, mut err) = (vec![], vec![]);
        let mut p = Printed::default();
        let skipped = LiveEvent::Skipped { stream: "stdout".into(), from: 0, to: 100 };
        for e in [attempt("a1"), skipped, data("stdout", 100, b"tail\n")] {
            p.apply(&e, &mut out, &mut err).unwrap();
        }
        assert_eq!(out, b"tail\n");
        assert!(String::from_utf8_lossy(&err).contains("100 bytes of stdout"));
        assert_eq!(p.already("a1", "stdout"), 0);
    }

    #[test]
    fn a_new_attempt_starts_over() {
        let (mut out, mut err) = (vec![], vec![]);
        let mut p = Printed::default();
        for e in [attempt("a1"), data("stdout", 0, b"first try\n"), attempt("a2"), data("stdout", 0, b"second\n")] {
            p.apply(&e, &mut out, &mut err).unwrap();
        }
        assert_eq!(out, b"first try\nsecond\n");
        assert_eq!(p.already("a2", "stdout"), 7);
    }
}
