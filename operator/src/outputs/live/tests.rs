use futures::StreamExt as _;

use super::*;

fn key(id: &str) -> LiveKey {
    LiveKey { attempt_id: id.into(), node: "pn-a".into(), job_uid: "uid".into(), task_index: 0 }
}

async fn events(a: Arc<LiveAttempt>, follow: bool) -> Vec<LiveEvent> {
    a.follow(follow).collect().await
}

#[test]
fn chunks_must_be_contiguous_within_a_session() {
    let logs = LiveLogs::default();
    let a = logs.open(key("a")).unwrap();
    assert_eq!(a.append(1, 0, 0, b"hello "), Ok(()));
    assert_eq!(a.append(1, 0, 6, b"world"), Ok(()));
    assert_eq!(a.append(1, 0, 20, b"x"), Err(Dropped::Gap));
    assert_eq!(a.append(1, 0, 3, b"x"), Err(Dropped::Overlap));
    assert_eq!(a.append(1, 2, 0, b"x"), Err(Dropped::BadStream));
    assert_eq!(a.append(1, 1, 0, &[0; MAX_LOG_CHUNK_BYTES + 1]), Err(Dropped::Oversize));
    assert_eq!(a.append(1, 1, 0, b""), Err(Dropped::Oversize));
    assert_eq!(a.append(1, 1, MAX_LIVE_LOG_BYTES - 1, b"xy"), Err(Dropped::Capped));
    // A new session may go on further (its predecessor's last chunks were lost), not back.
    assert_eq!(a.append(2, 0, 3, b"x"), Err(Dropped::Overlap));
    assert_eq!(a.append(2, 0, 30, b"again"), Ok(()));
    assert_eq!(a.buffered_bytes(), 5);
}

#[tokio::test]
async fn a_follower_reads_the_tail_then_the_end() {
    let logs = LiveLogs::default();
    let a = logs.open(key("a")).unwrap();
    a.append(1, 0, 0, b"one\n").unwrap();
    a.append(1, 1, 0, b"err\n").unwrap();
    let follower = tokio::spawn(events(a.clone(), true));
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.append(1, 0, 4, b"two\n").unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    logs.end("a", "Succeeded");
    let seen = follower.await.unwrap();
    assert_eq!(seen[0], LiveEvent::Attempt { attempt_id: "a".into(), node: "pn-a".into() });
    let out: Vec<u8> = seen.iter().filter(|e| matches!(e, LiveEvent::Data { stream, .. } if stream == "stdout")).flat_map(|e| e.bytes().unwrap()).collect();
    assert_eq!(out, b"one\ntwo\n");
    assert_eq!(seen.last(), Some(&LiveEvent::End { attempt_id: "a".into(), how: "Succeeded".into() }));
    // Ended: no new tail, no new chunk.
    assert!(logs.get("a").is_none());
    assert_eq!(logs.open(key("a")).err(), Some(Dropped::Ended));
    assert_eq!(a.append(1, 0, 8, b"late"), Err(Dropped::Ended));
}

#[tokio::test]
async fn a_late_follower_is_told_what_it_missed() {
    let logs = LiveLogs::default();
    let a = logs.open(key("a")).unwrap();
    let chunk = vec![b'x'; MAX_LOG_CHUNK_BYTES];
    for i in 0..8u64 {
        a.append(1, 0, i * chunk.len() as u64, &chunk).unwrap();
    }
    assert_eq!(a.buffered_bytes(), TAIL_BYTES);
    let seen = events(a, false).await;
    let from_start = (8 * MAX_LOG_CHUNK_BYTES - TAIL_BYTES) as u64;
    assert_eq!(seen[1], LiveEvent::Skipped { stream: "stdout".into(), from: 0, to: from_start });
    assert!(matches!(&seen[2], LiveEvent::Data { offset, .. } if *offset == from_start));
    assert_eq!(seen.len(), 3, "without follow the stream ends after the tail");
}

#[test]
fn the_number_of_live_attempts_is_bounded() {
    let logs = LiveLogs::default();
    for i in 0..MAX_LIVE_ATTEMPTS {
        logs.open(key(&format!("a{i}"))).unwrap();
    }
    assert_eq!(logs.open(key("one-more")).err(), Some(Dropped::Full));
    logs.end("a0", "Failed");
    assert!(logs.open(key("one-more")).is_ok());
}
