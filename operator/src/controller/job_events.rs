//! Events on ComputeJobs beyond status changes: retries as they are placed, folded by the
//! recorder when repeated. Verification outcomes are Events of the `Verified` condition's
//! changes (`job::status::events`).

use std::sync::Arc;

use crate::attempt::Attempt;

/// Most retried tasks one Event names; the rest are counted.
const NAMED: usize = 5;

/// The note of a "Retrying" Event for the attempts placed at or after `since_ms` that retry a
/// task (attempt number above 1), saying how each one's previous attempt ended. None when the
/// sync placed no retry.
pub fn retries(attempts: &[Arc<Attempt>], since_ms: i64) -> Option<String> {
    let retried: Vec<&Arc<Attempt>> = attempts.iter().filter(|a| a.replica == 0 && a.number > 1 && a.created_ms >= since_ms).collect();
    if retried.is_empty() {
        return None;
    }
    let mut parts: Vec<String> = retried
        .iter()
        .take(NAMED)
        .map(|a| {
            let previous = attempts.iter().find(|p| p.index == a.index && p.number == a.number - 1 && p.replica == 0);
            let why = previous.map_or_else(
                || "previous attempt unknown".to_string(),
                |p| {
                    let message = p.result.as_ref().map(|r| r.message.chars().take(120).collect::<String>()).unwrap_or_default();
                    if message.is_empty() {
                        format!("attempt {} {}", p.number, p.phase.as_str())
                    } else {
                        format!("attempt {} {}: {message}", p.number, p.phase.as_str())
                    }
                },
            );
            format!("task {} attempt {} on {} ({why})", a.index, a.number, a.node)
        })
        .collect();
    if retried.len() > NAMED {
        parts.push(format!("and {} more", retried.len() - NAMED));
    }
    Some(format!("retrying {} task(s): {}", retried.len(), parts.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attempt::{AttemptPhase, AttemptResult};

    fn attempt(index: u32, number: u32, phase: AttemptPhase, created_ms: i64, message: &str) -> Arc<Attempt> {
        Arc::new(Attempt {
            id: format!("u.{index}.{number}"),
            job_uid: "u".into(),
            job_key: "ns/j".into(),
            index,
            number,
            replica: 0,
            node: format!("node-{number}"),
            phase,
            cpu_millis: 100,
            memory_bytes: 1,
            held: None,
            created_ms,
            finished_ms: None,
            result: Some(AttemptResult { message: message.into(), ..Default::default() }),
        })
    }

    #[test]
    fn a_retry_placed_by_this_sync_names_the_task_and_why_its_last_attempt_ended() {
        let attempts = vec![
            attempt(0, 1, AttemptPhase::Succeeded, 10, ""),
            attempt(1, 1, AttemptPhase::Lost, 10, "the node restarted"),
            attempt(1, 2, AttemptPhase::Assigned, 50, ""),
        ];
        assert_eq!(retries(&attempts, 50).as_deref(), Some("retrying 1 task(s): task 1 attempt 2 on node-2 (attempt 1 Lost: the node restarted)"));
        // Placed by an earlier sync: already told.
        assert_eq!(retries(&attempts, 51), None);
    }

    #[test]
    fn many_retries_are_one_bounded_event() {
        let attempts: Vec<_> = (0..8).map(|i| attempt(i, 2, AttemptPhase::Assigned, 5, "")).collect();
        let note = retries(&attempts, 0).unwrap();
        assert!(note.starts_with("retrying 8 task(s)") && note.ends_with("and 3 more"), "{note}");
    }
}
