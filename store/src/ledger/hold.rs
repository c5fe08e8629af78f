//! Who may append to a ledger: a running operator holds it shared (replicas under leader
//! election all do; the epoch fence orders them), a payout command exclusively, so a command
//! never appends beside a running operator (two writers would race for the same seqs).
//!
//! SQLite: a lock on `<data dir>/ledger.lock` (flock). PostgreSQL: a session advisory lock,
//! held by a connection of its own for as long as the hold lives.

use std::path::Path;
use std::sync::mpsc;

use super::LedgerError;

/// The advisory lock key (PostgreSQL) of the ledger's writers; the schema lock uses another.
const PG_KEY: i64 = 7_171_717_172;

/// Shared for the operator, exclusive for a command that appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// A held ledger; dropping it releases the lock.
pub struct Hold {
    _file: Option<std::fs::File>,
    /// Dropping it ends the thread that keeps the PostgreSQL session (and its lock).
    _pg: Option<mpsc::Sender<()>>,
}

/// Why the ledger cannot be held.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error(
        "a running operator holds this ledger ({0}); payout commands append to the ledger and must not race the operator's writer: stop the operator (scale its StatefulSet to 0) and run the command again, or let the running operator do it: it closes periods itself (--payout-close-every) and records a payment annotated on its PayoutStatement (kubectl annotate payoutstatement statement-N kommune.dev/paid-reference=REF)"
    )]
    Operator(String),
    #[error("a payout command is appending to this ledger ({0}); wait for it to finish")]
    Command(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("ledger lock {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// Takes the ledger in `mode`, without waiting.
pub fn hold(data_dir: &Path, database_url: Option<&str>, mode: Mode) -> Result<Hold, HoldError> {
    match database_url {
        Some(url) => hold_pg(url.to_string(), mode),
        None => hold_file(data_dir, mode),
    }
}

fn refused(mode: Mode, what: String) -> HoldError {
    match mode {
        // An exclusive try fails on anyone's hold; operators hold shared, commands exclusive,
        // so a command refused is (almost always) refused by an operator.
        Mode::Exclusive => HoldError::Operator(what),
        Mode::Shared => HoldError::Command(what),
    }
}

fn hold_file(data_dir: &Path, mode: Mode) -> Result<Hold, HoldError> {
    let path = data_dir.join("ledger.lock");
    let io = |source| HoldError::Io { path: path.display().to_string(), source };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?;
    let r = match mode {
        Mode::Shared => f.try_lock_shared(),
        Mode::Exclusive => f.try_lock(),
    };
    match r {
        Ok(()) => Ok(Hold { _file: Some(f), _pg: None }),
        Err(std::fs::TryLockError::WouldBlock) => Err(refused(mode, format!("lock {}", path.display()))),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

fn hold_pg(url: String, mode: Mode) -> Result<Hold, HoldError> {
    // The synchronous client runs a runtime of its own: it lives on a thread of its own, never
    // on a tokio worker, and is dropped there when the hold is.
    let (result_tx, result_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("ledger-hold".into())
        .spawn(move || {
            let taken = (|| {
                let mut client =
                    postgres::Client::connect(&url, postgres::NoTls).map_err(|source| LedgerError::Postgres { op: "connect (ledger lock)", source })?;
                let sql = match mode {
                    Mode::Shared => "SELECT pg_try_advisory_lock_shared($1)",
                    Mode::Exclusive => "SELECT pg_try_advisory_lock($1)",
                };
                let ok: bool = client.query_one(sql, &[&PG_KEY]).map_err(|source| LedgerError::Postgres { op: "take the ledger lock", source })?.get(0);
                Ok::<_, LedgerError>((client, ok))
            })();
            match taken {
                Ok((client, ok)) => {
                    let _ = result_tx.send(Ok(ok));
                    if ok {
                        let _ = release_rx.recv();
                    }
                    drop(client);
                }
                Err(e) => drop(result_tx.send(Err(e))),
            }
        })
        .map_err(|source| HoldError::Io { path: "(thread)".into(), source })?;
    match result_rx.recv() {
        Ok(Ok(true)) => Ok(Hold { _file: None, _pg: Some(release_tx) }),
        Ok(Ok(false)) => Err(refused(mode, format!("PostgreSQL advisory lock {PG_KEY}"))),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(HoldError::Ledger(LedgerError::Closed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(dir: &Path, url: Option<&str>) {
        let op1 = hold(dir, url, Mode::Shared).unwrap();
        let op2 = hold(dir, url, Mode::Shared).expect("replicas hold the ledger together");
        let err = hold(dir, url, Mode::Exclusive).err().expect("a command is refused while an operator holds the ledger");
        assert!(matches!(err, HoldError::Operator(_)), "{err}");
        assert!(err.to_string().starts_with("a running operator holds this ledger"), "{err}");
        drop((op1, op2));
        let cmd = hold(dir, url, Mode::Exclusive).expect("free once the operators are gone");
        let err = hold(dir, url, Mode::Shared).err().expect("an operator does not start beside a command");
        assert!(matches!(err, HoldError::Command(_)), "{err}");
        drop(cmd);
        hold(dir, url, Mode::Shared).unwrap();
    }

    #[test]
    fn a_command_is_refused_while_an_operator_holds_the_ledger_file() {
        let dir = tempfile::tempdir().unwrap();
        both(dir.path(), None);
    }

    #[test]
    fn a_command_is_refused_while_an_operator_holds_the_postgresql_ledger() {
        let Some(db) = crate::testing::TestDb::postgres("ledger_hold") else { return };
        both(db.dir.path(), db.url.as_deref());
    }
}
