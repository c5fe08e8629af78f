//! Opening an SQLite file the way every Kommune table set wants it: durable (WAL with
//! synchronous=FULL, so a committed transaction survives a crash or power loss) and shared by
//! a reader and a writer connection.

use std::path::Path;

use rusqlite::Connection;

use super::epoch::sqlite::db;
use super::epoch::{DbError, Guarded};

/// Opens (creating if needed) the database at `path`, with `schema` and the leader table of
/// `guarded`.
pub fn open(path: &Path, schema: &str, guarded: Guarded) -> Result<Connection, DbError<rusqlite::Error>> {
    let conn = Connection::open(path).map_err(db("open"))?;
    // The busy timeout first: a table set's two connections open the file at the same moment,
    // and switching to WAL needs a lock the other may hold for an instant.
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(db("set busy timeout"))?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(db("enable WAL"))?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(db("set synchronous"))?;
    conn.execute_batch(schema).map_err(db("create schema"))?;
    conn.execute_batch(&guarded.schema()).map_err(db("create leader table"))?;
    Ok(conn)
}
