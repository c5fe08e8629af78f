//! The key in force on both backends: a writer with another key is refused before it appends,
//! and a rotation signed by the old key hands the ledger to the new one.

use super::rotate::{key_in_force, rotate};
use super::tests::{Env, key_of, rt};
use super::*;
use entry::fingerprint;
use kommune_ledger::check::tests::input;

backend_suite!(a_writer_with_another_key_is_refused_naming_both_keys_and_writes_nothing, a_rotation_signed_by_the_old_key_hands_the_ledger_to_the_new_key,);

fn with_key(env: &Env, name: &str) -> (LedgerConfig, SigningKey, String) {
    let path = env.dir.path().join(name);
    let key = load_or_create_key_file(&path).unwrap();
    (LedgerConfig { key_file: Some(path.clone()), ..env.config(Fence::open()) }, key, path.display().to_string())
}

fn strict(pin: &SigningKey) -> verify::VerifyOptions {
    verify::VerifyOptions { operator_key_sha256: Some(fingerprint(&pin.verifying_key().to_bytes())), ..Default::default() }
}

fn a_writer_with_another_key_is_refused_naming_both_keys_and_writes_nothing(env: &Env) {
    let (a, key_a, _) = with_key(env, "a.key");
    let (b, key_b, path_b) = with_key(env, "b.key");
    // An empty ledger takes the first writer's key.
    assert_eq!(key_in_force(env.backend().as_mut()).unwrap(), None);
    let l = Ledger::open(a.clone()).unwrap();
    let rt = rt();
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        l.submit(input(1, 1, 1)).await.unwrap();
        l.checkpoint().await.unwrap();
    });
    drop(l);
    let head = env.backend().head().unwrap();
    assert_eq!(key_in_force(env.backend().as_mut()).unwrap().map(|(_, k)| k), Some(key_a.verifying_key().to_bytes()));

    // A second replica started with a key of its own (what a standby with its own key file did).
    let Err(e) = Ledger::open(b) else { panic!("a writer with another key opened the ledger") };
    let msg = e.to_string();
    for part in [fingerprint(&key_a.verifying_key().to_bytes()), fingerprint(&key_b.verifying_key().to_bytes()), path_b, "rotate-key".into()] {
        assert!(msg.contains(&part), "{msg:?} names {part:?}");
    }
    assert_eq!(env.backend().head().unwrap(), head, "nothing was appended");
    assert!(verify_stored(env.backend().as_mut(), strict(&key_a)).unwrap().is_ok());
    // The right key still opens it.
    drop(Ledger::open(a).unwrap());
}

fn a_rotation_signed_by_the_old_key_hands_the_ledger_to_the_new_key(env: &Env) {
    let (a, key_a, path_a) = with_key(env, "a.key");
    let (b, key_b, path_b) = with_key(env, "b.key");
    let rt = rt();
    let l = Ledger::open(a.clone()).unwrap();
    rt.block_on(async {
        l.register_node_key("pn-1", key_of(1)).await.unwrap();
        l.submit(input(1, 1, 1)).await.unwrap();
    });
    drop(l);

    // Only the key in force may hand over, and not to itself.
    let err = rotate(env.backend().as_mut(), &key_b, &path_b, &key_a, 1).unwrap_err().to_string();
    assert!(err.contains("signed by key"), "{err}");
    let err = rotate(env.backend().as_mut(), &key_a, &path_a, &key_a, 1).unwrap_err().to_string();
    assert!(err.contains("is the new key too"), "{err}");

    let before = env.backend().head().unwrap().unwrap().0;
    let r = rotate(env.backend().as_mut(), &key_a, &path_a, &key_b, 2).unwrap();
    assert_eq!((r.rotation_seq, r.checkpoint_seq), (before + 1, before + 2));
    assert_eq!((r.old, r.new), (key_a.verifying_key().to_bytes(), key_b.verifying_key().to_bytes()));
    assert_eq!(key_in_force(env.backend().as_mut()).unwrap(), Some((r.checkpoint_seq, r.new)));

    // Now the old key is the stranger, and the new one writes.
    assert!(Ledger::open(a).is_err(), "the old key no longer opens the ledger");
    let l = Ledger::open(b).unwrap();
    rt.block_on(async {
        l.submit(input(1, 1, 2)).await.unwrap();
        l.checkpoint().await.unwrap();
    });
    drop(l);
    // The whole chain verifies strictly, pinned to either key: the rotation links them.
    for pin in [&key_a, &key_b] {
        let report = verify_stored(env.backend().as_mut(), strict(pin)).unwrap().unwrap();
        assert_eq!((report.key_rotations, report.receipts), (1, 2));
        assert_eq!(report.operator_key, fingerprint(&key_b.verifying_key().to_bytes()));
    }
}

/// The command an admin runs: refused while an operator holds the ledger, then rotates and
/// says which key to run and pin.
#[test]
fn the_rotate_key_command_waits_for_the_operator_to_stop_and_names_the_new_key() {
    use super::cli::{LedgerCommand, Location, RotateArgs, run};
    let env = Env::sqlite();
    let (a, _, path_a) = with_key(&env, "a.key");
    let l = Ledger::open(a).unwrap();
    rt().block_on(l.submit(input(1, 1, 1))).unwrap();
    drop(l);
    let new_path = env.dir.path().join("new.key");
    let args = || RotateArgs {
        location: Location { data_dir: env.dir.path().to_path_buf(), database_url: None },
        ledger_key_file: path_a.clone().into(),
        new_key_file: new_path.clone(),
    };
    let running = hold::hold(env.dir.path(), None, hold::Mode::Shared).unwrap();
    let err = run(LedgerCommand::RotateKey(args()), &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("operator"), "{err}");
    assert!(!new_path.exists(), "nothing is created while refused");
    drop(running);
    let mut out = Vec::new();
    run(LedgerCommand::RotateKey(args()), &mut out).unwrap();
    let new = load_or_create_key_file(&new_path).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains(&fingerprint(&new.verifying_key().to_bytes())) && out.contains("new.key"), "{out}");
    assert!(verify_stored(env.backend().as_mut(), strict(&new)).unwrap().is_ok());
}
