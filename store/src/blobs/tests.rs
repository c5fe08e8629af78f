//! Blob store tests: owners, quota, the sweep, and the attacks on the operator's volume.

use super::*;

const GRACE: Duration = Duration::from_secs(60);

fn limits(quota_bytes: u64) -> BlobLimits {
    BlobLimits { quota_bytes, namespace_quota: BTreeMap::new(), grace: GRACE }
}

fn owner<'a>(job_uid: &'a str, namespace: &'a str) -> BlobOwner<'a> {
    BlobOwner { job_uid, namespace }
}

/// (blob files, their bytes) in the blob directory.
fn blob_dir(dir: &Path) -> (usize, u64) {
    std::fs::read_dir(dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| kommune_proto::is_sha256_hex(&e.file_name().to_string_lossy()))
        .fold((0, 0), |(n, b), e| (n + 1, b + e.metadata().unwrap().len()))
}

/// A distinct small "module" per edit, as a namespace user editing a ConfigMap would make.
fn edit(n: usize) -> Vec<u8> {
    format!("(module ;; edit {n:05}\n)").into_bytes()
}

#[test]
fn put_get_and_reject_bad_digests() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open(dir.path()).unwrap();
    let sha = blobs.put_for(owner("j", "ns"), b"module").unwrap();
    assert_eq!(sha, kommune_proto::sha256_hex(b"module"));
    assert_eq!(blobs.put_for(owner("j", "ns"), b"module").unwrap(), sha);
    assert_eq!(blobs.get(&sha).unwrap().unwrap(), b"module");
    assert_eq!(blobs.get(&"0".repeat(64)).unwrap(), None);
    assert!(matches!(blobs.get("../../etc/passwd"), Err(BlobError::BadDigest(_))));
    assert!(blobs.users("../../etc/passwd").is_empty());
    assert_eq!(blobs.users(&sha), vec!["j".to_string()]);
}

/// The attack: a namespace user edits its job's ConfigMap 5,000 times, each edit a new module
/// the operator stores. Edits come every 100 ms (simulated) and the sweep runs every 10 s: the
/// directory never holds more than the grace's worth of edits, and once the grace has passed
/// only the last module is left.
#[test]
fn a_module_edited_5000_times_leaves_only_the_last_one_after_the_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open_with(dir.path(), limits(DEFAULT_QUOTA_BYTES)).unwrap();
    let t0 = kommune_proto::now_ms();
    let before = blob_dir(dir.path());
    let mut most = (0, 0);
    let mut last = String::new();
    for n in 0..5000 {
        let now = t0 + n as i64 * 100;
        last = blobs.put_at(owner("edited-job", "tenant"), &edit(n), now).unwrap();
        if n % 100 == 99 {
            blobs.sweep_at(now).unwrap();
            let held = blob_dir(dir.path());
            most = most.max(held);
        }
    }
    let during = blob_dir(dir.path());
    let swept = blobs.sweep_at(t0 + 5000 * 100 + GRACE.as_millis() as i64).unwrap();
    let after = blob_dir(dir.path());
    println!(
        "blob dir before: {before:?}; at the end of the edits: {during:?}; most at any sweep: {most:?}; after the last sweep: {after:?} (files, bytes); swept {swept:?}"
    );
    assert!(most.0 <= 601 + 100, "at most one grace (600 edits) plus one sweep interval is held: {most:?}");
    assert_eq!(after.0, 1, "only the last module is left");
    assert_eq!(blobs.get(&last).unwrap().unwrap(), edit(4999));
    assert_eq!(blobs.users(&last), vec!["edited-job".to_string()]);
    assert_eq!(blobs.namespace_bytes("tenant"), edit(4999).len() as u64);
}

#[test]
fn a_namespace_over_its_quota_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = limits(1000);
    l.namespace_quota.insert("big".into(), 10_000);
    let blobs = Blobs::open_with(dir.path(), l).unwrap();
    blobs.put_for(owner("a", "small"), &[1; 600]).unwrap();
    let err = blobs.put_for(owner("b", "small"), &[2; 600]).unwrap_err();
    println!("{err}");
    assert!(matches!(err, BlobError::QuotaExceeded { ref namespace, bytes: 600, total: 1200, quota: 1000, .. } if namespace == "small"), "{err:?}");
    assert!(err.to_string().contains("--namespace-blob-quota"), "the message says how to get more: {err}");
    assert_eq!(blob_dir(dir.path()).0, 1, "the refused module was not stored");
    assert!(blobs.users(&kommune_proto::sha256_hex(&[2; 600])).is_empty());
    // The same bytes are free for a job of the namespace (counted once), and other namespaces
    // have their own quota, larger where the admin set one.
    blobs.put_for(owner("c", "small"), &[1; 600]).unwrap();
    blobs.put_for(owner("d", "other"), &[2; 600]).unwrap();
    blobs.put_for(owner("e", "big"), &[3; 5000]).unwrap();
    // Once a job is deleted and its module's grace has passed, the room is free again.
    blobs.release("a").unwrap();
    blobs.release("c").unwrap();
    blobs.sweep_at(kommune_proto::now_ms() + GRACE.as_millis() as i64 + 1).unwrap();
    blobs.put_for(owner("b", "small"), &[2; 600]).unwrap();
}

#[test]
fn a_released_blob_stays_fetchable_for_the_grace_then_the_sweep_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open_with(dir.path(), limits(DEFAULT_QUOTA_BYTES)).unwrap();
    let shared = blobs.put_for(owner("a", "ns"), b"shared").unwrap();
    blobs.put_for(owner("b", "ns"), b"shared").unwrap();
    let own = blobs.put_for(owner("c", "ns"), b"own").unwrap();
    blobs.release("a").unwrap();
    blobs.release("c").unwrap();
    let now = kommune_proto::now_ms();
    assert_eq!(blobs.users(&own), vec!["c".to_string()], "an attempt assigned before the release may still fetch it");
    assert_eq!(blobs.sweep_at(now).unwrap().deleted, 0, "within the grace");
    let swept = blobs.sweep_at(now + GRACE.as_millis() as i64 + 1).unwrap();
    assert_eq!((swept.deleted, swept.freed_bytes, swept.kept), (1, 3, 1));
    assert_eq!(blobs.get(&own).unwrap(), None);
    assert_eq!(blobs.users(&shared), vec!["b".to_string()], "a blob another job holds stays");
}

#[test]
fn owners_survive_a_restart_and_blobs_from_before_owners_and_crash_leftovers_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open_with(dir.path(), limits(DEFAULT_QUOTA_BYTES)).unwrap();
    let held = blobs.put_for(owner("j", "ns"), b"held").unwrap();
    let old = kommune_proto::sha256_hex(b"stored before blobs had owners");
    std::fs::write(dir.path().join("blobs").join(&old), b"stored before blobs had owners").unwrap();
    std::fs::write(dir.path().join("blobs").join(".abc.1.tmp"), b"half a module").unwrap();
    drop(blobs);

    let blobs = Blobs::open_with(dir.path(), limits(DEFAULT_QUOTA_BYTES)).unwrap();
    assert_eq!(blobs.users(&held), vec!["j".to_string()], "owners are read back");
    assert_eq!(blobs.sweep().unwrap().deleted, 0, "an unowned file gets one grace from its time");
    let swept = blobs.sweep_at(kommune_proto::now_ms() + GRACE.as_millis() as i64 + 1).unwrap();
    assert_eq!((swept.deleted, swept.kept), (1, 1));
    assert_eq!(blobs.get(&old).unwrap(), None);
    assert!(!dir.path().join("blobs/.abc.1.tmp").exists());
    assert!(dir.path().join("blobs").join("owners.json").exists());
}

#[test]
fn an_owners_file_that_does_not_parse_is_set_aside_and_a_running_job_stores_its_module_again() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open(dir.path()).unwrap();
    let sha = blobs.put_for(owner("j", "ns"), b"module").unwrap();
    blobs.sweep().unwrap();
    drop(blobs);
    std::fs::write(dir.path().join("blobs").join("owners.json"), b"{not json").unwrap();
    let blobs = Blobs::open(dir.path()).unwrap();
    assert!(dir.path().join("blobs/owners.json.corrupt").exists());
    assert!(blobs.users(&sha).is_empty());
    blobs.sweep_at(kommune_proto::now_ms() + DEFAULT_GRACE.as_millis() as i64 + 1).unwrap();
    assert_eq!(blobs.get(&sha).unwrap(), None);
    assert_eq!(blobs.put_for(owner("j", "ns"), b"module").unwrap(), sha, "the next reconcile stores it again");
    assert_eq!(blobs.get(&sha).unwrap().unwrap(), b"module");
}

#[test]
fn changes_in_the_journal_are_replayed_after_a_crash_and_a_torn_line_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open(dir.path()).unwrap();
    let first = blobs.put_for(owner("j", "ns"), b"first").unwrap();
    let second = blobs.put_for(owner("j", "ns"), b"second").unwrap();
    blobs.put_for(owner("k", "ns"), b"first").unwrap();
    blobs.release("k").unwrap();
    // A crash before any sweep: the snapshot is empty, the journal has every change, and the
    // last write was cut short.
    drop(blobs);
    let mut log = std::fs::OpenOptions::new().append(true).open(dir.path().join("blobs/owners.log")).unwrap();
    std::io::Write::write_all(&mut log, b"\n{\"op\":\"set\",\"seq\":99,\"job\":\"x\"").unwrap();
    let blobs = Blobs::open(dir.path()).unwrap();
    assert_eq!(blobs.users(&second), vec!["j".to_string()]);
    assert_eq!(blobs.users(&first), vec!["j".to_string(), "k".to_string()], "both let go of it within the grace");
    assert_eq!(std::fs::metadata(dir.path().join("blobs/owners.log")).unwrap().len(), 0, "folded into the snapshot at open");
    blobs.put_for(owner("j", "ns"), b"third").unwrap();
    drop(blobs);
    assert_eq!(Blobs::open(dir.path()).unwrap().users(&kommune_proto::sha256_hex(b"third")), vec!["j".to_string()]);
}

#[test]
fn a_jobs_input_blobs_are_fetchable_by_its_attempts_count_in_its_quota_and_go_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open_with(dir.path(), limits(20)).unwrap();
    let shard0 = blobs.put_for(owner(&input_owner("j1", 0, Some(0)), "ns"), b"a,b\n").unwrap();
    let shard1 = blobs.put_for(owner(&input_owner("j1", 0, Some(1)), "ns"), b"c,d\n").unwrap();
    blobs.put_for(owner("j1", "ns"), b"module").unwrap();
    // Each task's file is held under its own key, and the job's uid is who may fetch it.
    assert_eq!(blobs.users(&shard0), vec!["j1".to_string()]);
    assert_eq!(blobs.users(&shard1), vec!["j1".to_string()]);
    assert_eq!(blobs.input_keys("j1").len(), 2);
    assert_eq!(blobs.namespace_bytes("ns"), 4 + 4 + 6);
    // Over the namespace's quota, an input is refused like a module.
    assert!(matches!(blobs.put_for(owner(&input_owner("j1", 1, None), "ns"), b"0123456789"), Err(BlobError::QuotaExceeded { .. })));
    blobs.release_job("j1").unwrap();
    assert!(blobs.input_keys("j1").is_empty());
    let later = kommune_proto::now_ms() + GRACE.as_millis() as i64 + 1_000;
    assert_eq!(blobs.sweep_at(later).unwrap().deleted, 3);
    assert_eq!(job_of_owner("j1/input/0/3"), "j1");
}
