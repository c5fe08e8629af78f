//! The one mapping between the ledger's records and their rows, used by both backends: for
//! `ledger_entries` the column list, each column's type, the values of an entry and the entry
//! of a row; for `ledger_rejected`, the record of a row. A new column is added here once, not
//! once per backend.

use kommune_core::pricing::{Micros, Rates};
use kommune_ledger::entry::{Entry, EntryKind, UsageFigures};
use kommune_ledger::verify::BadEntry;

use super::backend::{RejectedReceipt, from_db, to_db};

/// What a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Int,
    Text,
    Bytes,
}

use ColumnType::{Bytes, Int, Text};

/// `ledger_entries`' columns in the order [`entry_values`] gives them.
pub const ENTRY_COLUMNS: [(&str, ColumnType); 26] = [
    ("seq", Int),
    ("kind", Int),
    ("recorded_ms", Int),
    ("node", Text),
    ("epoch", Int),
    ("sequence", Int),
    ("attempt_id", Text),
    ("job_uid", Text),
    ("job_key", Text),
    ("body", Bytes),
    ("signature", Bytes),
    ("public_key", Bytes),
    ("rate_cpu_core_hour", Int),
    ("rate_memory_gib_hour", Int),
    ("rate_gpu_hour", Int),
    ("rate_output_gib", Int),
    ("cost", Int),
    ("wall_millis", Int),
    ("cpu_micros", Int),
    ("memory_peak_bytes", Int),
    ("memory_mib_millis", Int),
    ("wasm_fuel", Int),
    ("gpu_millis", Int),
    ("output_bytes", Int),
    ("prev_hash", Bytes),
    ("hash", Bytes),
];

/// The column names, comma-separated, for SELECT and INSERT.
pub fn entry_column_list() -> String {
    ENTRY_COLUMNS.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
}

/// One column's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// An entry's values in [`ENTRY_COLUMNS`] order (u64s stored bit for bit as i64).
pub fn entry_values(e: &Entry) -> [Value<'_>; 26] {
    let (r, u) = (&e.rates, &e.usage);
    let int = |v: u64| Value::Int(to_db(v));
    [
        int(e.seq),
        Value::Int(e.kind.code() as i64),
        Value::Int(e.recorded_ms),
        Value::Text(&e.node),
        int(e.epoch),
        int(e.sequence),
        Value::Text(&e.attempt_id),
        Value::Text(&e.job_uid),
        Value::Text(&e.job_key),
        Value::Bytes(&e.body),
        Value::Bytes(&e.signature),
        Value::Bytes(&e.public_key),
        int(r.cpu_core_hour.0),
        int(r.memory_gib_hour.0),
        int(r.gpu_hour.0),
        int(r.output_gib.0),
        int(e.cost.0),
        int(u.wall_millis),
        int(u.cpu_micros),
        int(u.memory_peak_bytes),
        int(u.memory_mib_millis),
        int(u.wasm_fuel),
        int(u.gpu_millis),
        int(u.output_bytes),
        Value::Bytes(&e.prev_hash),
        Value::Bytes(&e.hash),
    ]
}

/// Reads the columns of one result row, whichever backend it came from.
pub trait RowReader {
    type Error;
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    /// Text read leniently: a damaged (non-UTF-8) value still reads, and then fails its hash.
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    fn bytes(&self, i: usize) -> Result<Vec<u8>, Self::Error>;
}

/// The entry of a row selected with [`entry_column_list`], or why it cannot be one.
pub fn entry_from_row<R: RowReader>(r: &R) -> Result<Result<Entry, BadEntry>, R::Error> {
    let u = |i| r.int(i).map(from_db);
    let seq = u(0)?;
    let code = r.int(1)?;
    let Some(kind) = EntryKind::from_code(code) else {
        return Ok(Err(BadEntry { seq, reason: format!("unknown entry kind {code}") }));
    };
    Ok(Ok(Entry {
        seq,
        kind,
        recorded_ms: r.int(2)?,
        node: r.text(3)?,
        epoch: u(4)?,
        sequence: u(5)?,
        attempt_id: r.text(6)?,
        job_uid: r.text(7)?,
        job_key: r.text(8)?,
        body: r.bytes(9)?,
        signature: r.bytes(10)?,
        public_key: r.bytes(11)?,
        rates: Rates { cpu_core_hour: Micros(u(12)?), memory_gib_hour: Micros(u(13)?), gpu_hour: Micros(u(14)?), output_gib: Micros(u(15)?) },
        cost: Micros(u(16)?),
        usage: UsageFigures {
            wall_millis: u(17)?,
            cpu_micros: u(18)?,
            memory_peak_bytes: u(19)?,
            memory_mib_millis: u(20)?,
            wasm_fuel: u(21)?,
            gpu_millis: u(22)?,
            output_bytes: u(23)?,
        },
        prev_hash: r.bytes(24)?,
        hash: r.bytes(25)?,
    }))
}

/// `ledger_rejected`'s columns, in the order [`rejected_from_row`] reads them.
pub const REJECTED_COLUMNS: &str =
    "digest, first_ms, last_ms, times, session_node, node, epoch, sequence, attempt_id, body_bytes, signature_bytes, body_prefix, reason";

/// A refused receipt's values in [`REJECTED_COLUMNS`] order.
pub fn rejected_values(r: &RejectedReceipt) -> [Value<'_>; 13] {
    let int = |v: u64| Value::Int(to_db(v));
    [
        Value::Bytes(&r.digest),
        Value::Int(r.first_ms),
        Value::Int(r.last_ms),
        int(r.times),
        Value::Text(&r.session_node),
        Value::Text(&r.node),
        int(r.epoch),
        int(r.sequence),
        Value::Text(&r.attempt_id),
        int(r.body_bytes),
        int(r.signature_bytes),
        Value::Bytes(&r.body_prefix),
        Value::Text(&r.reason),
    ]
}

/// The refused receipt of a row selected with [`REJECTED_COLUMNS`].
pub fn rejected_from_row<R: RowReader>(r: &R) -> Result<RejectedReceipt, R::Error> {
    let u = |i| r.int(i).map(from_db);
    Ok(RejectedReceipt {
        digest: r.bytes(0)?,
        first_ms: r.int(1)?,
        last_ms: r.int(2)?,
        times: u(3)?,
        session_node: r.text(4)?,
        node: r.text(5)?,
        epoch: u(6)?,
        sequence: u(7)?,
        attempt_id: r.text(8)?,
        body_bytes: u(9)?,
        signature_bytes: u(10)?,
        body_prefix: r.bytes(11)?,
        reason: r.text(12)?,
    })
}

/// A stored entry hash as 32 bytes. A damaged row (another length) reads as zeros: the Ack that
/// carries it then matches no statement, and `ledger verify` names the row.
pub(super) fn hash32(bytes: Vec<u8>) -> [u8; 32] {
    bytes.try_into().unwrap_or([0; 32])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row held in memory, as a database would return it.
    struct Row(Vec<Value<'static>>);

    impl RowReader for Row {
        type Error = String;
        fn int(&self, i: usize) -> Result<i64, String> {
            match self.0[i] {
                Value::Int(v) => Ok(v),
                other => Err(format!("column {i} is {other:?}")),
            }
        }
        fn text(&self, i: usize) -> Result<String, String> {
            match self.0[i] {
                Value::Text(v) => Ok(v.to_string()),
                other => Err(format!("column {i} is {other:?}")),
            }
        }
        fn bytes(&self, i: usize) -> Result<Vec<u8>, String> {
            match self.0[i] {
                Value::Bytes(v) => Ok(v.to_vec()),
                other => Err(format!("column {i} is {other:?}")),
            }
        }
    }

    fn leak(v: Value<'_>) -> Value<'static> {
        match v {
            Value::Int(i) => Value::Int(i),
            Value::Text(t) => Value::Text(Box::leak(t.to_string().into_boxed_str())),
            Value::Bytes(b) => Value::Bytes(Box::leak(b.to_vec().into_boxed_slice())),
        }
    }

    fn entry() -> Entry {
        Entry {
            seq: 7,
            kind: EntryKind::Receipt,
            recorded_ms: 1_700_000_000_000,
            node: "pn-1".into(),
            epoch: 2,
            sequence: u64::MAX,
            attempt_id: "uid.0.1".into(),
            job_uid: "uid".into(),
            job_key: "ns/job".into(),
            body: vec![1, 2, 3],
            signature: vec![4; 64],
            public_key: vec![5; 32],
            rates: Rates { cpu_core_hour: Micros(1), memory_gib_hour: Micros(2), gpu_hour: Micros(3), output_gib: Micros(4) },
            cost: Micros(5),
            usage: UsageFigures { wall_millis: 6, cpu_micros: 7, memory_peak_bytes: 8, memory_mib_millis: 9, wasm_fuel: 10, gpu_millis: 11, output_bytes: 12 },
            prev_hash: vec![13; 32],
            hash: vec![14; 32],
        }
    }

    #[test]
    fn an_entry_survives_its_row_bit_for_bit() {
        let e = entry();
        let row = Row(entry_values(&e).into_iter().map(leak).collect());
        assert_eq!(entry_from_row(&row), Ok(Ok(e)));
    }

    #[test]
    fn every_value_has_its_columns_type() {
        for (v, (name, ty)) in entry_values(&entry()).iter().zip(ENTRY_COLUMNS) {
            let got = match v {
                Value::Int(_) => Int,
                Value::Text(_) => Text,
                Value::Bytes(_) => Bytes,
            };
            assert_eq!(got, ty, "column {name}");
        }
        assert!(entry_column_list().starts_with("seq, kind, recorded_ms, node,"));
    }

    #[test]
    fn a_refused_receipt_survives_its_row() {
        let r = RejectedReceipt {
            digest: vec![1; 32],
            first_ms: 5,
            last_ms: 9,
            times: 3,
            session_node: "pn-1".into(),
            node: "pn-2".into(),
            epoch: 1,
            sequence: u64::MAX,
            attempt_id: "a".into(),
            body_bytes: 4096,
            signature_bytes: 64,
            body_prefix: vec![2],
            reason: "forged".into(),
        };
        let row = Row(rejected_values(&r).into_iter().map(leak).collect());
        assert_eq!(rejected_from_row(&row), Ok(r));
    }

    #[test]
    fn an_unknown_kind_is_a_bad_entry_not_an_error() {
        let mut values: Vec<Value<'static>> = entry_values(&entry()).into_iter().map(leak).collect();
        values[1] = Value::Int(99);
        assert_eq!(entry_from_row(&Row(values)), Ok(Err(BadEntry { seq: 7, reason: "unknown entry kind 99".into() })));
    }
}
