//! Attempt retention: when a job ends (or is deleted) the store notes when its attempts may go,
//! and a sweep deletes them in bounded batches after that, so the table stays bounded over a
//! soak. The job's status keeps what is done (completedIndexes), so nothing runs again.

use super::{Result, StoreError};
use crate::db::epoch::{self, Guarded};

/// One row per job whose attempts will be pruned: the first end wins (a later sync of the
/// ended job does not postpone it); a job that runs again clears its row.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS attempt_retention (
    job_uid     TEXT PRIMARY KEY,
    prune_at_ms BIGINT NOT NULL
);
";

/// Finished attempts of jobs due for pruning, at most `limit` (active ones are never pruned).
const DUE: &str = "SELECT a.id FROM attempts a JOIN attempt_retention r ON a.job_uid = r.job_uid
     WHERE r.prune_at_ms <= {now} AND a.phase NOT IN ('Assigned', 'Running') LIMIT {limit}";
/// Rows of due jobs with no attempt left.
const EMPTIED: &str = "DELETE FROM attempt_retention WHERE prune_at_ms <= {now}
     AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_uid = attempt_retention.job_uid)";

fn sql(template: &str, now: &str, limit: &str) -> String {
    template.replace("{now}", now).replace("{limit}", limit)
}

pub(super) mod sqlite {
    use rusqlite::{Connection, params};

    use super::*;

    fn op(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        move |source| StoreError::Sqlite { op, source }
    }

    pub(in super::super) fn retain(conn: &mut Connection, epoch: Option<i64>, job_uid: &str, prune_at_ms: Option<i64>) -> Result<()> {
        let tx = epoch::sqlite::begin(conn, Guarded::Store, epoch)?;
        match prune_at_ms {
            Some(at) => tx.execute("INSERT OR IGNORE INTO attempt_retention (job_uid, prune_at_ms) VALUES (?1, ?2)", params![job_uid, at]),
            None => tx.execute("DELETE FROM attempt_retention WHERE job_uid = ?1", params![job_uid]),
        }
        .map_err(op("set attempt retention"))?;
        tx.commit().map_err(op("commit attempt retention"))
    }

    pub(in super::super) fn prune(conn: &mut Connection, epoch: Option<i64>, now_ms: i64, limit: u32) -> Result<u64> {
        let tx = epoch::sqlite::begin(conn, Guarded::Store, epoch)?;
        let n = tx.execute(&format!("DELETE FROM attempts WHERE id IN ({})", sql(DUE, "?1", "?2")), params![now_ms, limit]).map_err(op("prune attempts"))?;
        tx.execute(&sql(EMPTIED, "?1", ""), params![now_ms]).map_err(op("prune retention rows"))?;
        tx.commit().map_err(op("commit prune"))?;
        Ok(n as u64)
    }
}

pub(super) mod postgres {
    use ::postgres::Client;

    use super::*;

    fn op(op: &'static str) -> impl FnOnce(::postgres::Error) -> StoreError {
        move |source| StoreError::Postgres { op, source }
    }

    pub(in super::super) fn retain(client: &mut Client, epoch: Option<i64>, job_uid: &str, prune_at_ms: Option<i64>) -> Result<()> {
        let mut tx = epoch::postgres::begin(client, Guarded::Store, epoch)?;
        match prune_at_ms {
            Some(at) => tx.execute("INSERT INTO attempt_retention (job_uid, prune_at_ms) VALUES ($1, $2) ON CONFLICT (job_uid) DO NOTHING", &[&job_uid, &at]),
            None => tx.execute("DELETE FROM attempt_retention WHERE job_uid = $1", &[&job_uid]),
        }
        .map_err(op("set attempt retention"))?;
        tx.commit().map_err(op("commit attempt retention"))
    }

    pub(in super::super) fn prune(client: &mut Client, epoch: Option<i64>, now_ms: i64, limit: u32) -> Result<u64> {
        let mut tx = epoch::postgres::begin(client, Guarded::Store, epoch)?;
        let limit = i64::from(limit);
        let n = tx.execute(&format!("DELETE FROM attempts WHERE id IN ({})", sql(DUE, "$1", "$2")), &[&now_ms, &limit]).map_err(op("prune attempts"))?;
        tx.execute(&sql(EMPTIED, "$1", ""), &[&now_ms]).map_err(op("prune retention rows"))?;
        tx.commit().map_err(op("commit prune"))?;
        Ok(n)
    }
}
