//! The embedded output store on its own: limits, restarts and what a crash leaves.

use super::*;

const LIMITS: UploadLimits = UploadLimits { max_file_bytes: 100, max_attempt_bytes: 150, max_files: 3 };

async fn put(store: &OutputStore, attempt: &str, name: &str, data: &[u8]) -> Result<String, OutputError> {
    let mut u = store.begin(attempt, name, data.len() as u64, 0, LIMITS)?;
    u.write(data).await?;
    Ok(u.finish().await?.sha256)
}

#[tokio::test]
async fn a_restarted_store_counts_what_it_holds_drops_half_written_files_and_keeps_limits() {
    let dir = tempfile::tempdir().unwrap();
    let store = OutputStore::open(dir.path(), 1000).unwrap();
    assert_eq!(put(&store, "job.0.1", "stdout", &[1; 80]).await.unwrap(), kommune_proto::sha256_hex(&[1; 80]));
    // An upload cut off mid-way (the agent vanished) gives its reservation back and leaves no file.
    let mut cut = store.begin("job.0.1", "out/x", 50, 0, LIMITS).unwrap();
    cut.write(&[2; 10]).await.unwrap();
    drop(cut);
    assert_eq!(store.usage().0, 80);
    // A crash's leftover temporary file is removed at open.
    std::fs::write(dir.path().join("outputs/job/job.0.1/7.bin.tmp"), b"junk").unwrap();
    let reopened = OutputStore::open(dir.path(), 1000).unwrap();
    assert_eq!(reopened.usage().0, 80);
    assert!(!dir.path().join("outputs/job/job.0.1/7.bin.tmp").exists());
    // The attempt's earlier output still counts against its limits after the restart.
    assert!(matches!(put(&reopened, "job.0.1", "out/y", &[3; 100]).await, Err(OutputError::AttemptTooLarge { .. })));
    assert!(matches!(put(&reopened, "job.0.1", "stdout", b"x").await, Err(OutputError::Duplicate { .. })));
    assert!(matches!(put(&reopened, "../x.0.1", "stdout", b"x").await, Err(OutputError::BadName(_))));
}

#[tokio::test]
async fn accepting_an_attempt_removes_its_tasks_other_attempts_and_frees_their_room() {
    let dir = tempfile::tempdir().unwrap();
    let store = OutputStore::open(dir.path(), 1000).unwrap();
    put(&store, "job.0.1", "stdout", &[1; 50]).await.unwrap();
    put(&store, "job.0.2", "stdout", &[2; 40]).await.unwrap();
    put(&store, "job.1.1", "stdout", &[3; 30]).await.unwrap();
    // Before acceptance the newest attempt of a task is listed.
    let listed: Vec<String> = store.list("job").unwrap().into_iter().map(|(a, _)| a).collect();
    assert_eq!(listed, vec!["job.0.2", "job.1.1"]);
    store.accept("job.0.1").unwrap();
    let listed: Vec<String> = store.list("job").unwrap().into_iter().map(|(a, _)| a).collect();
    assert_eq!(listed, vec!["job.0.1", "job.1.1"], "the accepted attempt, whatever its number");
    assert_eq!(store.usage().0, 80);
    store.remove_job("job").unwrap();
    assert_eq!(store.usage().0, 0);
    assert!(store.list("job").unwrap().is_empty());
}
