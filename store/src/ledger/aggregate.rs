//! The aggregates the ledger reads (a job's usage, a node's earnings), as SQL both backends
//! run and the figures of their result rows: exact for any stored data, saturated where shown.

use kommune_core::pricing::Micros;
use kommune_ledger::entry::{NodeTotal, UsageFigures};

use super::backend::{JobUsage, from_db};
use super::row::RowReader;

/// One figure of an aggregate over receipts, computed so that no stored value can make the
/// database fail or wrap (u64s are stored bit for bit in signed columns, so a plain SUM fails
/// with "integer overflow" on SQLite, and is wrong for values of 2^63 and more on both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// COUNT(*).
    Count,
    /// The exact sum of a u64 column, shown as u64::MAX past it: each value is split into
    /// [`LIMBS`], summed per limb by the database, and put together in u128 here.
    Sum(&'static str),
    /// The largest value of a u64 column (0 for none).
    Max(&'static str),
}

/// (shift, mask) of the limbs a u64 is split into for [`Aggregate::Sum`]: 22, 22 and 20 bits.
/// A limb is below 2^22, so a limb's sum overflows a signed 64-bit integer only past 2^41
/// rows: more than an SQLite file (at most 2^48 bytes) or a PostgreSQL table (2^45 bytes at
/// the default block size) can hold of rows of 128 bytes or more, which receipts are (two
/// hashes and a signature alone). So the database never fails these sums.
pub const LIMBS: [(u32, i64); 3] = [(0, 0x3F_FFFF), (22, 0x3F_FFFF), (44, 0xF_FFFF)];

impl Aggregate {
    /// How many columns of a result row the figure takes.
    fn width(self) -> usize {
        match self {
            Aggregate::Sum(_) => LIMBS.len(),
            Aggregate::Count | Aggregate::Max(_) => 1,
        }
    }

    fn exprs(self) -> Vec<String> {
        match self {
            Aggregate::Count => vec!["COUNT(*)".into()],
            Aggregate::Sum(c) => LIMBS.iter().map(|(shift, mask)| format!("COALESCE(SUM(({c} >> {shift}) & {mask}), 0)")).collect(),
            // Bit for bit, the values of 2^63 and more are the negative ones, and among them
            // the larger signed value is the larger u64.
            Aggregate::Max(c) => vec![format!("COALESCE(MAX(CASE WHEN {c} < 0 THEN {c} END), MAX({c}), 0)")],
        }
    }
}

/// The select list of `figures`, each expression cast to `cast` when given (PostgreSQL's SUM
/// of a bigint is numeric).
pub fn aggregate_select(figures: &[Aggregate], cast: Option<&str>) -> String {
    figures.iter().flat_map(|f| f.exprs()).map(|e| cast.map_or_else(|| e.clone(), |t| format!("({e})::{t}"))).collect::<Vec<_>>().join(", ")
}

/// How many columns [`aggregate_select`] gives for `figures`.
pub fn aggregate_width(figures: &[Aggregate]) -> usize {
    figures.iter().map(|f| f.width()).sum()
}

/// The figures of a row selected with [`aggregate_select`], its columns starting at `first`.
pub fn aggregate_from_row<R: RowReader>(figures: &[Aggregate], r: &R, first: usize) -> Result<Vec<u64>, R::Error> {
    let mut col = first;
    let mut out = Vec::with_capacity(figures.len());
    for f in figures {
        let v = match f {
            Aggregate::Sum(_) => {
                let mut total: u128 = 0;
                for (i, (shift, _)) in LIMBS.iter().enumerate() {
                    // A limb's sum is never negative; read one that is (damaged data) as 0.
                    total += (r.int(col + i)?.max(0) as u128) << shift;
                }
                u64::try_from(total).unwrap_or(u64::MAX)
            }
            Aggregate::Count | Aggregate::Max(_) => from_db(r.int(col)?),
        };
        col += f.width();
        out.push(v);
    }
    Ok(out)
}

/// The figures of a job's usage, in [`JobUsage`] order.
pub const JOB_USAGE: [Aggregate; 9] = [
    Aggregate::Count,
    Aggregate::Sum("wall_millis"),
    Aggregate::Sum("cpu_micros"),
    Aggregate::Max("memory_peak_bytes"),
    Aggregate::Sum("memory_mib_millis"),
    Aggregate::Sum("wasm_fuel"),
    Aggregate::Sum("gpu_millis"),
    Aggregate::Sum("output_bytes"),
    Aggregate::Sum("cost"),
];

/// The figures of a node's earnings: total cost, then receipts.
pub const NODE_TOTAL: [Aggregate; 2] = [Aggregate::Sum("cost"), Aggregate::Count];

/// A job's usage from a row selected with `aggregate_select(&JOB_USAGE, ..)`, from column 0.
pub fn job_usage_from_row<R: RowReader>(r: &R) -> Result<JobUsage, R::Error> {
    let v = aggregate_from_row(&JOB_USAGE, r, 0)?;
    Ok(JobUsage {
        receipts: v[0],
        usage: UsageFigures {
            wall_millis: v[1],
            cpu_micros: v[2],
            memory_peak_bytes: v[3],
            memory_mib_millis: v[4],
            wasm_fuel: v[5],
            gpu_millis: v[6],
            output_bytes: v[7],
        },
        cost: Micros(v[8]),
    })
}

/// A node's earnings from a row selected with `aggregate_select(&NODE_TOTAL, ..)`, its columns
/// starting at `first`.
pub fn node_total_from_row<R: RowReader>(r: &R, first: usize) -> Result<NodeTotal, R::Error> {
    let v = aggregate_from_row(&NODE_TOTAL, r, first)?;
    Ok(NodeTotal { total: Micros(v[0]), receipts: v[1] })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limb sums a database computes for `values` (stored bit for bit as i64).
    struct LimbSums(Vec<i64>);

    impl LimbSums {
        fn of(values: &[u64]) -> LimbSums {
            LimbSums(LIMBS.iter().map(|(shift, mask)| values.iter().map(|v| ((*v as i64) >> shift) & mask).sum()).collect())
        }
    }

    impl RowReader for LimbSums {
        type Error = ();
        fn int(&self, i: usize) -> Result<i64, ()> {
            self.0.get(i).copied().ok_or(())
        }
        fn text(&self, _: usize) -> Result<String, ()> {
            Err(())
        }
        fn bytes(&self, _: usize) -> Result<Vec<u8>, ()> {
            Err(())
        }
    }

    fn sum(values: &[u64]) -> u64 {
        aggregate_from_row(&[Aggregate::Sum("x")], &LimbSums::of(values), 0).unwrap()[0]
    }

    #[test]
    fn limb_sums_are_exact_below_u64_max_and_saturate_above() {
        assert_eq!(sum(&[]), 0);
        assert_eq!(sum(&[1, 2, 3]), 6);
        assert_eq!(sum(&[1 << 63, (1 << 63) - 1]), u64::MAX, "values of 2^63 and more are negative in the column");
        assert_eq!(sum(&[u64::MAX, 5]), u64::MAX, "a plain SUM of the signed column gives 4");
        assert_eq!(sum(&[1 << 62; 3]), 3 << 62);
        assert_eq!(sum(&[u64::MAX; 1000]), u64::MAX);
        let honest: Vec<u64> = (0..5000).map(|i| 1_234_567 + i * 977).collect();
        assert_eq!(sum(&honest), honest.iter().sum::<u64>());
    }

    #[test]
    fn every_figure_takes_its_columns_in_order() {
        let sql = aggregate_select(&NODE_TOTAL, Some("bigint"));
        assert_eq!(sql.matches("::bigint").count(), aggregate_width(&NODE_TOTAL));
        assert!(sql.starts_with("(COALESCE(SUM((cost >> 0) & 4194303), 0))::bigint"), "{sql}");
        assert_eq!(aggregate_width(&JOB_USAGE), 1 + 7 * 3 + 1);
        assert!(aggregate_select(&[Aggregate::Max("m")], None).contains("CASE WHEN m < 0"));
    }
}
