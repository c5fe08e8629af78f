//! The store's behaviour, run against every backend: SQLite always, PostgreSQL when
//! `KOMMUNE_TEST_DATABASE_URL` is set (each test in a fresh database of its own).

use std::time::{Duration, Instant};

use super::*;
use crate::testing::TestDb;
use kommune_core::attempt::attempt_id;
use kommune_core::reputation::Observed;

/// Where one test's store lives.
struct Env(TestDb);

impl Env {
    fn sqlite() -> Env {
        Env(TestDb::sqlite())
    }

    /// A fresh database on the server named by KOMMUNE_TEST_DATABASE_URL, or None.
    fn postgres() -> Option<Env> {
        TestDb::postgres("kommune_store_test").map(Env)
    }

    fn config(&self, fence: Fence) -> StoreConfig {
        StoreConfig { data_dir: self.dir.path().to_path_buf(), database_url: self.url.clone(), fence }
    }

    /// The store without leader election.
    fn open(&self) -> Store {
        self.open_fenced(Fence::open())
    }

    fn open_fenced(&self, fence: Fence) -> Store {
        Store::open_with(self.config(fence)).expect("open the store")
    }

    /// Runs SQL on the backend directly, as an older operator (or an operator of the database)
    /// would.
    /// On a thread of its own: the synchronous PostgreSQL client must not run on a tokio worker.
    fn raw(&self, sql: &str) {
        std::thread::scope(|s| {
            s.spawn(|| match &self.url {
                None => rusqlite::Connection::open(self.dir.path().join("kommune.db")).unwrap().execute_batch(sql).unwrap(),
                Some(url) => ::postgres::Client::connect(url, ::postgres::NoTls).unwrap().batch_execute(sql).unwrap(),
            });
        });
    }

    /// How many sessions on this test's database wait for a lock (PostgreSQL).
    fn sessions_waiting_on_a_lock(&self) -> i64 {
        let (base, name) = self.admin.as_ref().expect("a PostgreSQL test");
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut admin = ::postgres::Client::connect(base, ::postgres::NoTls).unwrap();
                admin.query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'", &[name]).unwrap().get(0)
            })
            .join()
            .unwrap()
        })
    }
}

impl std::ops::Deref for Env {
    type Target = TestDb;
    fn deref(&self) -> &TestDb {
        &self.0
    }
}

macro_rules! backend_suite {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[test] fn $name() { super::rt().block_on(super::$name(&super::Env::sqlite())); })*
        }
        mod on_postgres {
            $(#[test] fn $name() { if let Some(env) = super::Env::postgres() { super::rt().block_on(super::$name(&env)); } })*

            #[test]
            fn an_old_leaders_write_open_during_a_claim_commits_before_the_claim_and_its_next_write_is_refused() {
                if let Some(env) = super::Env::postgres() {
                    super::rt().block_on(super::an_old_leaders_write_open_during_a_claim_commits_before_the_claim_and_its_next_write_is_refused(&env));
                }
            }
        }
    };
}

backend_suite!(
    attempts_survive_reopen_and_transitions_are_idempotent,
    batched_finishes_commit_together_and_a_second_finish_changes_nothing,
    a_fenced_store_refuses_every_write_and_still_reads,
    replicas_and_held_disk_and_gpus_survive_reopen_bit_for_bit,
    a_store_written_by_an_older_operator_gains_the_new_columns_and_keeps_its_attempts,
    node_names_are_bound_to_one_key,
    tombstones_owners_and_limits_survive_a_reopen,
    nodes_registered_by_an_older_operator_keep_their_key_and_have_no_owner,
    finished_attempts_count_towards_their_nodes_outcomes,
    observations_are_kept_once_per_attempt_and_kind_and_read_back_by_time_and_node,
    a_replica_that_claims_the_store_fences_every_write_of_the_previous_one_though_its_lease_fence_is_open,
    a_new_leader_sees_exactly_the_attempts_the_old_one_placed_and_finishes_them,
    an_unelected_store_neither_claims_nor_checks_an_epoch,
    a_store_opened_used_and_dropped_on_the_async_runtime_works,
    an_ended_jobs_finished_attempts_are_pruned_in_batches_after_its_retention,
);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A leader's fence, open for a minute: in these tests only the epoch can refuse a write.
fn leader_fence() -> Fence {
    let fence = Fence::closed();
    fence.extend(Instant::now() + Duration::from_secs(60));
    fence
}

fn attempt(index: u32, node: &str) -> Attempt {
    Attempt {
        id: attempt_id("uid", index, 1),
        job_uid: "uid".into(),
        job_key: "ns/j".into(),
        index,
        number: 1,
        replica: 0,
        node: node.into(),
        phase: AttemptPhase::Assigned,
        cpu_millis: 250,
        memory_bytes: 1 << 20,
        held: Some(Held::default()),
        created_ms: 5,
        finished_ms: None,
        result: None,
    }
}

fn ids(attempts: &[Attempt]) -> Vec<&str> {
    attempts.iter().map(|a| a.id.as_str()).collect()
}

async fn attempts_survive_reopen_and_transitions_are_idempotent(env: &Env) {
    let result = AttemptResult { exit_code: 0, output_sha256: "ab".into(), stdout_tail: b"hi".to_vec(), ..Default::default() };
    {
        let store = env.open();
        store.insert_attempts(&[attempt(0, "a"), attempt(1, "b")]).await.unwrap();
        store.insert_attempts(&[attempt(0, "a")]).await.unwrap();
        assert!(store.mark_running(&attempt_id("uid", 0, 1)).await.unwrap());
        assert!(!store.mark_running(&attempt_id("uid", 0, 1)).await.unwrap());
        let done = store.finish(&attempt_id("uid", 0, 1), AttemptPhase::Succeeded, Some(&result), 9).await.unwrap().unwrap();
        assert_eq!(done.phase, AttemptPhase::Succeeded);
        assert_eq!(done.result.as_ref(), Some(&result));
        assert_eq!(store.finish(&attempt_id("uid", 0, 1), AttemptPhase::Failed, None, 10).await.unwrap(), None);
        assert!(!store.mark_running(&attempt_id("uid", 0, 1)).await.unwrap());
        assert_eq!(store.finish("nope", AttemptPhase::Failed, None, 10).await.unwrap(), None);
    }
    let store = env.open();
    let all = store.attempts_for_job("uid").await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].phase, AttemptPhase::Succeeded);
    assert_eq!(all[0].finished_ms, Some(9));
    assert_eq!(all[0].result.as_ref().unwrap().stdout_tail, b"hi");
    assert_eq!(store.active_on_node("b").await.unwrap().len(), 1);
    assert!(store.active_on_node("a").await.unwrap().is_empty());
    assert_eq!(store.all_active().await.unwrap().len(), 1);
}

async fn batched_finishes_commit_together_and_a_second_finish_changes_nothing(env: &Env) {
    let ok = AttemptResult { exit_code: 0, stdout_tail: b"ok".to_vec(), ..Default::default() };
    {
        let store = env.open();
        store.insert_attempts(&(0..50).map(|i| attempt(i, "a")).collect::<Vec<_>>()).await.unwrap();
        assert!(store.mark_running(&attempt_id("uid", 0, 1)).await.unwrap());
        let finishes = (0..50).map(|i| {
            let (store, ok, id) = (&store, &ok, attempt_id("uid", i, 1));
            async move { store.finish_batched(&id, AttemptPhase::Succeeded, ok, 7).await.unwrap() }
        });
        assert!(futures::future::join_all(finishes).await.into_iter().all(|changed| changed));
        assert!(!store.finish_batched(&attempt_id("uid", 3, 1), AttemptPhase::Failed, &ok, 8).await.unwrap());
        assert!(!store.finish_batched("nope", AttemptPhase::Failed, &ok, 8).await.unwrap());
    }
    let store = env.open();
    let all = store.attempts_for_job("uid").await.unwrap();
    assert_eq!(all.len(), 50);
    assert!(all.iter().all(|a| a.phase == AttemptPhase::Succeeded && a.finished_ms == Some(7) && a.result.as_ref() == Some(&ok)));
    assert!(store.all_active().await.unwrap().is_empty());
}

async fn a_fenced_store_refuses_every_write_and_still_reads(env: &Env) {
    let fence = Fence::closed();
    let store = env.open_fenced(fence.clone());
    fence.extend(Instant::now() + Duration::from_secs(60));
    store.insert_attempts(&[attempt(0, "a")]).await.unwrap();
    fence.close();
    let id = attempt_id("uid", 0, 1);
    assert!(matches!(store.insert_attempts(&[attempt(1, "a")]).await, Err(StoreError::Fenced(_))));
    assert!(matches!(store.mark_running(&id).await, Err(StoreError::Fenced(_))));
    assert!(matches!(store.finish(&id, AttemptPhase::Failed, None, 1).await, Err(StoreError::Fenced(_))));
    let batched = store.finish_batched(&id, AttemptPhase::Failed, &AttemptResult::default(), 1).await;
    assert!(matches!(batched, Err(StoreError::Fenced(_))));
    assert!(matches!(store.register_node("n", "k", &grant("o"), 1).await, Err(StoreError::Fenced(_))));
    assert!(matches!(store.remove_node("n", Removal::Left, 1).await, Err(StoreError::Fenced(_))));
    assert_eq!(store.attempts_for_job("uid").await.unwrap().len(), 1, "reads still work, nothing changed");
    assert_eq!(store.attempt(&id).await.unwrap().unwrap().phase, AttemptPhase::Assigned);
}

async fn replicas_and_held_disk_and_gpus_survive_reopen_bit_for_bit(env: &Env) {
    let held = Held { ephemeral_bytes: 10 << 30, gpu_mask: 1 << 63 | 0b101 };
    let copy = Attempt { id: kommune_core::attempt::replica_attempt_id("uid", 0, 1, 2), replica: 2, held: Some(held), ..attempt(0, "b") };
    env.open().insert_attempts(&[attempt(0, "a"), copy.clone()]).await.unwrap();
    let store = env.open();
    let all = store.attempts_for_job("uid").await.unwrap();
    assert_eq!(all, vec![attempt(0, "a"), copy.clone()], "ordered by index, number, replica");
    assert_eq!(store.all_active().await.unwrap()[1].held, Some(held));
}

async fn a_store_written_by_an_older_operator_gains_the_new_columns_and_keeps_its_attempts(env: &Env) {
    let old_table = "CREATE TABLE attempts (id TEXT PRIMARY KEY, job_uid TEXT NOT NULL, job_key TEXT NOT NULL, task_index INTEGER NOT NULL,
         number INTEGER NOT NULL, node TEXT NOT NULL, phase TEXT NOT NULL, cpu_millis INTEGER NOT NULL, memory_bytes INTEGER NOT NULL,
         created_ms INTEGER NOT NULL, finished_ms INTEGER, result_json TEXT);
         INSERT INTO attempts (id, job_uid, job_key, task_index, number, node, phase, cpu_millis, memory_bytes, created_ms)
         VALUES ('uid.0.1', 'uid', 'ns/j', 0, 1, 'a', 'Running', 250, 1048576, 5);";
    // No operator wrote PostgreSQL before these columns; there the test stands for a column
    // added in the future (SQLite's INTEGER is 64-bit, PostgreSQL's BIGINT).
    env.raw(&if env.url.is_some() { old_table.replace("INTEGER", "BIGINT") } else { old_table.to_string() });
    for _ in 0..2 {
        // Opening twice: the migration runs once and is a no-op after.
        let store = env.open();
        let old = store.attempt("uid.0.1").await.unwrap().unwrap();
        assert_eq!((old.replica, old.held, old.phase), (0, None, AttemptPhase::Running), "disk and GPUs of old rows are unknown, not zero");
    }
    let store = env.open();
    store.insert_attempts(&[attempt(1, "b")]).await.unwrap();
    assert_eq!(store.attempts_for_job("uid").await.unwrap().len(), 2);
    assert_eq!(store.attempt(&attempt_id("uid", 1, 1)).await.unwrap().unwrap().held, Some(Held::default()));
}

fn grant(owner: &str) -> NodeGrant {
    NodeGrant { owner: owner.into(), limits: CapacityLimits::default() }
}

async fn node_names_are_bound_to_one_key(env: &Env) {
    let store = env.open();
    assert_eq!(store.register_node("n1", "k1", &grant("alice"), 1).await.unwrap(), Registration::New);
    assert_eq!(store.register_node("n1", "k1", &grant("mallory"), 2).await.unwrap(), Registration::SameKey);
    assert_eq!(store.register_node("n1", "k2", &grant("alice"), 3).await.unwrap(), Registration::Taken);
    assert_eq!(store.node_key("n1").await.unwrap().as_deref(), Some("k1"));
    assert_eq!(store.node("n1").await.unwrap().unwrap().owner.as_deref(), Some("alice"), "a re-join keeps the first owner");
    assert_eq!(store.node_key("n2").await.unwrap(), None);
    assert!(store.remove_node("n1", Removal::Left, 5).await.unwrap());
    assert!(!store.remove_node("n1", Removal::Revoked, 6).await.unwrap(), "a retired name is retired once, with its first reason");
    // Before tombstones, a removed name went free here and a new key could take it (and its
    // earnings in the ledger).
    let retired = Registration::Retired { at_ms: 5, reason: Removal::Left };
    assert_eq!(store.register_node("n1", "k2", &grant("alice"), 7).await.unwrap(), retired);
    assert_eq!(store.register_node("n1", "k1", &grant("alice"), 8).await.unwrap(), retired, "not even its own key takes a retired name back");
    assert_eq!(store.node_key("n1").await.unwrap(), None, "a retired node's certificate opens no session");
}

async fn tombstones_owners_and_limits_survive_a_reopen(env: &Env) {
    let limits = CapacityLimits { cpu_millis: Some(4000), memory_bytes: Some(8 << 30), ephemeral_bytes: None, gpus: Some(0) };
    {
        let store = env.open();
        store.register_node("kept", "k1", &NodeGrant { owner: "token:abc".into(), limits }, 1).await.unwrap();
        store.register_node("revoked", "k2", &grant("bob"), 2).await.unwrap();
        assert!(store.remove_node("revoked", Removal::Revoked, 3).await.unwrap());
    }
    let store = env.open();
    let kept = store.node("kept").await.unwrap().unwrap();
    assert_eq!((kept.owner.as_deref(), kept.limits, kept.removed, kept.joined_ms), (Some("token:abc"), limits, None, 1));
    let revoked = store.node("revoked").await.unwrap().unwrap();
    assert_eq!((revoked.public_key_sha256.as_str(), revoked.removed), ("k2", Some((3, Removal::Revoked))));
    assert_eq!(store.register_node("revoked", "k2", &grant("bob"), 4).await.unwrap(), Registration::Retired { at_ms: 3, reason: Removal::Revoked });
    assert_eq!(store.node_key("revoked").await.unwrap(), None);
}

async fn nodes_registered_by_an_older_operator_keep_their_key_and_have_no_owner(env: &Env) {
    let old_table = "CREATE TABLE nodes (name TEXT PRIMARY KEY, public_key_sha256 TEXT NOT NULL, joined_ms INTEGER NOT NULL);
         INSERT INTO nodes (name, public_key_sha256, joined_ms) VALUES ('old', 'k0', 1);";
    env.raw(&if env.url.is_some() { old_table.replace("INTEGER", "BIGINT") } else { old_table.to_string() });
    for _ in 0..2 {
        let store = env.open();
        let old = store.node("old").await.unwrap().unwrap();
        assert_eq!((old.public_key_sha256.as_str(), old.owner, old.limits, old.removed), ("k0", None, CapacityLimits::default(), None));
    }
    let store = env.open();
    assert!(store.remove_node("old", Removal::Left, 2).await.unwrap());
    assert!(matches!(store.register_node("old", "k9", &grant("x"), 3).await.unwrap(), Registration::Retired { .. }));
}

async fn finished_attempts_count_towards_their_nodes_outcomes(env: &Env) {
    let store = env.open();
    store.insert_attempts(&[attempt(0, "b"), attempt(1, "b"), attempt(2, "a"), attempt(3, "a"), attempt(4, "a")]).await.unwrap();
    store.finish(&attempt_id("uid", 0, 1), AttemptPhase::Succeeded, None, 1).await.unwrap();
    store.finish(&attempt_id("uid", 1, 1), AttemptPhase::Lost, None, 1).await.unwrap();
    store.finish(&attempt_id("uid", 2, 1), AttemptPhase::Failed, None, 1).await.unwrap();
    store.finish(&attempt_id("uid", 3, 1), AttemptPhase::Cancelled, None, 1).await.unwrap();
    assert_eq!(store.outcomes_by_node().await.unwrap(), vec![("a".to_string(), 0, 1), ("b".to_string(), 1, 1)], "cancelled and active ones do not count");
}

fn seen(node: &str, attempt: &str, observed: Observed, at_ms: i64) -> Observation {
    Observation { node: node.into(), workload: "wasm:abc".into(), job_uid: "uid".into(), attempt_id: attempt.into(), observed, at_ms }
}

async fn observations_are_kept_once_per_attempt_and_kind_and_read_back_by_time_and_node(env: &Env) {
    let store = env.open();
    let first = vec![seen("a", "x1", Observed::Unverified, 10), seen("b", "x2", Observed::Completed, 20), seen("a", "x3", Observed::Lost, 30)];
    store.observe(first.clone()).await.unwrap();
    // The same again (a replayed result) changes nothing; a later check adds to x1.
    store.observe(vec![seen("a", "x1", Observed::Unverified, 99), seen("a", "x1", Observed::Outvoted, 40)]).await.unwrap();
    store.observe(vec![]).await.unwrap();
    let reopened = env.open();
    let all = reopened.observations_since(0).await.unwrap();
    assert_eq!(all, vec![first[0].clone(), first[1].clone(), first[2].clone(), seen("a", "x1", Observed::Outvoted, 40)]);
    assert_eq!(reopened.observations_since(30).await.unwrap().len(), 2);
    assert_eq!(reopened.observations_of("a", 2).await.unwrap(), vec![seen("a", "x1", Observed::Outvoted, 40), seen("a", "x3", Observed::Lost, 30)]);
    assert!(reopened.observations_of("nobody", 5).await.unwrap().is_empty());
}

async fn a_replica_that_claims_the_store_fences_every_write_of_the_previous_one_though_its_lease_fence_is_open(env: &Env) {
    let old_fence = leader_fence();
    let old = env.open_fenced(old_fence.clone());
    old.insert_attempts(&[attempt(0, "a"), attempt(1, "a")]).await.unwrap();
    old.register_node("n1", "k1", &grant("o"), 1).await.unwrap();
    let before: Vec<Attempt> = old.job_attempts("uid").await.unwrap().iter().map(|a| (**a).clone()).collect();

    // The old leader was frozen past its Lease; a new one took the Lease and opened the store.
    let new = env.open_fenced(leader_fence());
    assert!(new.epoch().unwrap() > old.epoch().unwrap(), "the new leader claims a later epoch");
    assert_eq!(old_fence.check(), Ok(()), "the old leader's own fence still lets it write: only the epoch can stop it");

    let (id0, id1) = (attempt_id("uid", 0, 1), attempt_id("uid", 1, 1));
    assert!(matches!(old.insert_attempts(&[attempt(2, "a")]).await, Err(StoreError::Fenced(_))));
    assert!(matches!(old.mark_running(&id0).await, Err(StoreError::Fenced(_))));
    assert!(matches!(old.finish(&id1, AttemptPhase::Failed, None, 9).await, Err(StoreError::Fenced(_))));
    let batched = old.finish_batched(&id1, AttemptPhase::Failed, &AttemptResult::default(), 9).await;
    assert!(matches!(batched, Err(StoreError::Fenced(_))), "{batched:?}");
    assert!(matches!(old.register_node("n2", "k2", &grant("o"), 2).await, Err(StoreError::Fenced(_))));
    assert!(matches!(old.remove_node("n1", Removal::Revoked, 2).await, Err(StoreError::Fenced(_))));

    assert_eq!(new.attempts_for_job("uid").await.unwrap(), before, "the refused writes changed nothing in the database");
    assert_eq!((new.node_key("n1").await.unwrap().as_deref(), new.node_key("n2").await.unwrap()), (Some("k1"), None));
    let in_memory: Vec<Attempt> = old.job_attempts("uid").await.unwrap().iter().map(|a| (**a).clone()).collect();
    assert_eq!(in_memory, before, "nor in the old leader's memory");
    assert!(new.mark_running(&id0).await.unwrap(), "the new leader writes");
}

async fn a_new_leader_sees_exactly_the_attempts_the_old_one_placed_and_finishes_them(env: &Env) {
    let ok = AttemptResult { exit_code: 0, stdout_tail: b"ok".to_vec(), ..Default::default() };
    let (id0, id1, id2) = (attempt_id("uid", 0, 1), attempt_id("uid", 1, 1), attempt_id("uid", 2, 1));
    let old = env.open_fenced(leader_fence());
    old.insert_attempts(&[attempt(0, "a"), attempt(1, "b"), attempt(2, "a")]).await.unwrap();
    assert!(old.mark_running(&id0).await.unwrap());
    assert!(old.mark_running(&id1).await.unwrap());
    old.finish(&id2, AttemptPhase::Succeeded, Some(&ok), 7).await.unwrap().unwrap();
    let placed: Vec<Attempt> = old.job_attempts("uid").await.unwrap().iter().map(|a| (**a).clone()).collect();

    let new = env.open_fenced(leader_fence());
    let active = new.all_active().await.unwrap();
    assert_eq!(ids(&active), [id0.as_str(), id1.as_str()]);
    assert!(active.iter().all(|a| a.phase == AttemptPhase::Running));
    let seen: Vec<Attempt> = new.job_attempts("uid").await.unwrap().iter().map(|a| (**a).clone()).collect();
    assert_eq!(seen, placed, "the running work carries over as the old leader left it");
    assert_eq!(ids(&new.active_on_node("a").await.unwrap()), [id0.as_str()]);

    assert!(new.finish_batched(&id0, AttemptPhase::Succeeded, &ok, 8).await.unwrap());
    assert_eq!(new.finish(&id1, AttemptPhase::Lost, None, 8).await.unwrap().map(|a| a.phase), Some(AttemptPhase::Lost));
    assert!(new.all_active().await.unwrap().is_empty());
    let phases: Vec<AttemptPhase> = new.job_attempts("uid").await.unwrap().iter().map(|a| a.phase).collect();
    assert_eq!(phases, [AttemptPhase::Succeeded, AttemptPhase::Lost, AttemptPhase::Succeeded]);
}

async fn an_unelected_store_neither_claims_nor_checks_an_epoch(env: &Env) {
    let leader = env.open_fenced(leader_fence());
    let single = env.open();
    assert_eq!((leader.epoch(), single.epoch()), (Some(1), None));
    single.insert_attempts(&[attempt(0, "a")]).await.unwrap();
    assert!(leader.mark_running(&attempt_id("uid", 0, 1)).await.unwrap(), "opening without election did not take the store from the leader");
}

/// The dispatcher and the gateway call the store from tokio workers: the PostgreSQL client,
/// which blocks on a runtime of its own, must never run (or be dropped) there.
async fn a_store_opened_used_and_dropped_on_the_async_runtime_works(env: &Env) {
    let id = attempt_id("uid", 0, 1);
    {
        let store = Store::open_with(env.config(leader_fence())).unwrap();
        store.insert_attempts(&[attempt(0, "a")]).await.unwrap();
        assert!(store.mark_running(&id).await.unwrap());
        assert_eq!(store.job_attempts("uid").await.unwrap()[0].phase, AttemptPhase::Running);
        assert_eq!(store.register_node("n1", "k1", &grant("o"), 1).await.unwrap(), Registration::New);
        assert!(store.finish_batched(&id, AttemptPhase::Succeeded, &AttemptResult::default(), 2).await.unwrap());
        drop(store);
    }
    assert_eq!(env.open().attempt(&id).await.unwrap().unwrap().phase, AttemptPhase::Succeeded);
}

/// A leader frozen inside a write transaction while a successor claims the store: the claim
/// waits for that transaction, so the write lands before the claim (never after it), and the
/// old leader's next write is refused.
async fn an_old_leaders_write_open_during_a_claim_commits_before_the_claim_and_its_next_write_is_refused(env: &Env) {
    let old = Arc::new(env.open_fenced(leader_fence()));
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    old.set_before_commit(Box::new(move || {
        let _ = entered_tx.send(());
        // Returns at once when the test has let go (the sender is dropped).
        let _ = release_rx.recv();
    }))
    .await;
    let write = {
        let old = old.clone();
        tokio::spawn(async move { old.insert_attempts(&[attempt(0, "a")]).await })
    };
    entered.recv().unwrap();

    let config = env.config(leader_fence());
    let claim = std::thread::spawn(move || Store::open_with(config));
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.sessions_waiting_on_a_lock() == 0 {
        assert!(!claim.is_finished(), "the claim went through while the old leader's write transaction was open");
        assert!(Instant::now() < deadline, "the claim never waited for the old leader's transaction");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!claim.is_finished());
    drop(release);

    write.await.unwrap().expect("the write that was open before the claim commits");
    let new = claim.join().unwrap().expect("the claim goes through once it has");
    assert_eq!(ids(&new.attempts_for_job("uid").await.unwrap()), [attempt_id("uid", 0, 1)]);
    assert!(matches!(old.insert_attempts(&[attempt(1, "a")]).await, Err(StoreError::Fenced(_))));
    assert_eq!(new.attempts_for_job("uid").await.unwrap().len(), 1);
}

#[test]
fn a_database_url_that_is_not_postgresql_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { data_dir: dir.path().to_path_buf(), database_url: Some("mysql://db/kommune".into()), fence: Fence::open() };
    let err = Store::open_with(config).err().expect("refused");
    assert!(matches!(&err, StoreError::Url(u) if u == "mysql://db/kommune"), "{err}");
    assert!(err.to_string().contains("\"mysql://db/kommune\" is not a postgres:// or postgresql:// URL"), "{err}");
}

/// An agent repeating its Running report as fast as it can: at most one mark per attempt waits
/// on the store's thread, and the attempt ends Running.
#[test]
fn a_flood_of_running_reports_queues_at_most_one_mark_per_attempt() {
    let env = Env::sqlite();
    rt().block_on(async {
        let store = env.open();
        store.insert_attempts(&[attempt(0, "a")]).await.unwrap();
        let id = attempt_id("uid", 0, 1);
        // Keep the store's thread busy so the marks cannot drain while they are sent.
        let (go, wait) = std::sync::mpsc::sync_channel::<()>(0);
        store.main.spawn_run(move |_| wait.recv().unwrap()).unwrap();
        for _ in 0..100_000 {
            store.mark_running_soon(&id).unwrap();
        }
        assert_eq!(store.running_marks_pending(), 1);
        go.send(()).unwrap();
        assert_eq!(store.attempt(&id).await.unwrap().unwrap().phase, AttemptPhase::Running);
        assert_eq!(store.running_marks_pending(), 0);
    });
}

async fn an_ended_jobs_finished_attempts_are_pruned_in_batches_after_its_retention(env: &Env) {
    let store = env.open();
    let of = |uid: &str, index: u32| Attempt { id: attempt_id(uid, index, 1), job_uid: uid.into(), ..attempt(index, "a") };
    store.insert_attempts(&(0..5).map(|i| of("ended", i)).chain((0..2).map(|i| of("running", i))).collect::<Vec<_>>()).await.unwrap();
    for i in 0..4 {
        store.finish(&attempt_id("ended", i, 1), AttemptPhase::Succeeded, None, 9).await.unwrap();
    }
    store.finish(&attempt_id("running", 0, 1), AttemptPhase::Succeeded, None, 9).await.unwrap();
    store.retain("ended", Some(100)).await.unwrap();
    store.retain("ended", Some(500)).await.unwrap();
    assert_eq!(store.prune(99, 10).await.unwrap(), 0, "not due yet");
    assert_eq!(store.prune(100, 3).await.unwrap(), 3, "the first note wins; batches are bounded");
    assert_eq!(store.prune(100, 3).await.unwrap(), 1, "the active attempt stays");
    assert_eq!(ids(&store.attempts_for_job("ended").await.unwrap()), vec![attempt_id("ended", 4, 1)]);
    assert_eq!(store.attempts_for_job("running").await.unwrap().len(), 2, "a job with no retention is left alone");
    // The job runs again (an edited spec): its row is cleared and nothing more goes.
    store.retain("ended", None).await.unwrap();
    store.finish(&attempt_id("ended", 4, 1), AttemptPhase::Succeeded, None, 9).await.unwrap();
    assert_eq!(store.prune(1_000, 10).await.unwrap(), 0);
    store.retain("ended", Some(1_000)).await.unwrap();
    assert_eq!(store.prune(1_000, 10).await.unwrap(), 1);
    store.retain("ended", Some(2_000)).await.unwrap();
    assert_eq!(store.prune(2_000, 10).await.unwrap(), 0, "the row of an emptied job went with its last attempt, so a new note counts");
}
