//! Leader epochs, the same for every table set and both backends: opening under leader election
//! claims the next epoch in a one-row table, and every write transaction first reads that row
//! and rolls back when the epoch is no longer its own. So a leader frozen past its Lease writes
//! nothing once its successor has claimed, however long the freeze and wherever it stopped.

/// Which tables an epoch guards: each set has its own one-row leader table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarded {
    /// The attempt store and node registry (`store_leader`).
    Store,
    /// The payout ledger (`ledger_leader`).
    Ledger,
}

impl Guarded {
    pub const fn table(self) -> &'static str {
        match self {
            Guarded::Store => "store_leader",
            Guarded::Ledger => "ledger_leader",
        }
    }

    /// The leader table's DDL (both backends accept it).
    pub fn schema(self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\n    id         INTEGER PRIMARY KEY CHECK (id = 1),\n    epoch      BIGINT NOT NULL,\n    claimed_ms BIGINT NOT NULL\n);\n",
            self.table()
        )
    }

    fn claim_sql(self, placeholder: &str) -> String {
        let t = self.table();
        format!(
            "INSERT INTO {t} (id, epoch, claimed_ms) VALUES (1, 1, {placeholder})
             ON CONFLICT (id) DO UPDATE SET epoch = {t}.epoch + 1, claimed_ms = excluded.claimed_ms RETURNING epoch"
        )
    }
}

/// A database step that failed (with the backend's own error), or a write refused because this
/// replica no longer leads. The attempt store's and the ledger's errors convert from it.
#[derive(Debug)]
pub enum DbError<E> {
    /// The database failed at step `op`.
    Db { op: &'static str, source: E },
    /// Another replica claimed a later epoch since this one opened the tables.
    Superseded { mine: i64, current: Option<i64> },
}

fn superseded<E>(guarded: Guarded, mine: i64, current: Option<i64>) -> DbError<E> {
    tracing::warn!(
        table = guarded.table(),
        epoch = mine,
        current,
        "another operator replica has claimed these tables since this one opened them; refusing to write"
    );
    DbError::Superseded { mine, current }
}

pub mod sqlite {
    //! SQLite: claims and checks under the database's single write lock.

    use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

    use super::{DbError, Guarded, superseded};

    pub(crate) fn db(op: &'static str) -> impl Fn(rusqlite::Error) -> DbError<rusqlite::Error> {
        move |source| DbError::Db { op, source }
    }

    /// Takes the next epoch (1 on an empty table) and returns it.
    pub fn claim(conn: &mut Connection, guarded: Guarded, now_ms: i64) -> Result<i64, DbError<rusqlite::Error>> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db("begin epoch claim"))?;
        let epoch = tx.query_row(&guarded.claim_sql("?1"), params![now_ms], |r| r.get(0)).map_err(db("claim leader epoch"))?;
        tx.commit().map_err(db("commit epoch claim"))?;
        Ok(epoch)
    }

    /// Starts a write transaction. It takes the write lock at once (BEGIN IMMEDIATE), so a
    /// second connection's write waits for it instead of failing on a stale snapshot, and under
    /// leader election (`epoch` is this replica's claim) it reads the current epoch under that
    /// lock: no claim can come between that read and the commit.
    pub fn begin(conn: &mut Connection, guarded: Guarded, epoch: Option<i64>) -> Result<Transaction<'_>, DbError<rusqlite::Error>> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db("begin"))?;
        if let Some(mine) = epoch {
            let sql = format!("SELECT epoch FROM {} WHERE id = 1", guarded.table());
            let current: Option<i64> = tx.query_row(&sql, [], |r| r.get(0)).optional().map_err(db("read leader epoch"))?;
            if current != Some(mine) {
                return Err(superseded(guarded, mine, current));
            }
        }
        Ok(tx)
    }
}

pub mod postgres {
    //! PostgreSQL: the epoch row is read FOR SHARE, so a successor's claim (an UPDATE of that
    //! row) waits for the transactions of the old epoch to end, and one begun after the claim
    //! reads the new epoch and rolls back.

    use postgres::{Client, Transaction};

    use super::{DbError, Guarded, superseded};

    fn db(op: &'static str) -> impl Fn(postgres::Error) -> DbError<postgres::Error> {
        move |source| DbError::Db { op, source }
    }

    /// Takes the next epoch (1 on an empty table) and returns it.
    pub fn claim(client: &mut Client, guarded: Guarded, now_ms: i64) -> Result<i64, DbError<postgres::Error>> {
        let row = client.query_one(&guarded.claim_sql("$1"), &[&now_ms]).map_err(db("claim leader epoch"))?;
        Ok(row.get(0))
    }

    /// Starts a write transaction, checking the epoch under leader election.
    pub fn begin(client: &mut Client, guarded: Guarded, epoch: Option<i64>) -> Result<Transaction<'_>, DbError<postgres::Error>> {
        let mut tx = client.transaction().map_err(db("begin"))?;
        if let Some(mine) = epoch {
            let sql = format!("SELECT epoch FROM {} WHERE id = 1 FOR SHARE", guarded.table());
            let current: Option<i64> = tx.query_opt(&sql, &[]).map_err(db("read leader epoch"))?.map(|r| r.get(0));
            if current != Some(mine) {
                return Err(superseded(guarded, mine, current));
            }
        }
        Ok(tx)
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&Guarded::Store.schema()).unwrap();
        conn.execute_batch(&Guarded::Ledger.schema()).unwrap();
        conn
    }

    #[test]
    fn claims_count_up_from_one_per_table() {
        let mut conn = db();
        assert_eq!(sqlite::claim(&mut conn, Guarded::Store, 10).unwrap(), 1);
        assert_eq!(sqlite::claim(&mut conn, Guarded::Store, 20).unwrap(), 2);
        assert_eq!(sqlite::claim(&mut conn, Guarded::Ledger, 30).unwrap(), 1, "the ledger's epoch is its own");
        let claimed: i64 = conn.query_row("SELECT claimed_ms FROM store_leader", [], |r| r.get(0)).unwrap();
        assert_eq!(claimed, 20);
    }

    #[test]
    fn a_superseded_writer_cannot_begin_and_the_current_one_can() {
        let mut conn = db();
        let old = sqlite::claim(&mut conn, Guarded::Store, 1).unwrap();
        let new = sqlite::claim(&mut conn, Guarded::Store, 2).unwrap();
        assert!(matches!(sqlite::begin(&mut conn, Guarded::Store, Some(old)), Err(DbError::Superseded { mine: 1, current: Some(2) })));
        assert!(sqlite::begin(&mut conn, Guarded::Store, Some(new)).is_ok());
        assert!(sqlite::begin(&mut conn, Guarded::Store, None).is_ok(), "without leader election there is nothing to check");
        assert!(matches!(sqlite::begin(&mut conn, Guarded::Ledger, Some(1)), Err(DbError::Superseded { mine: 1, current: None })));
    }
}
