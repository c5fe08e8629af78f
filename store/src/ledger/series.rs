//! Earnings over time: each node's receipt costs summed per hour, for the operator's dashboard.
//! Read from the chain itself, so the figures are the ones `ledger export` shows.

use std::collections::BTreeMap;

use super::backend::{Backend, EntryFilter};
use super::entry::EntryKind;
use super::{Ledger, LedgerError};

/// One hour, the series' bucket.
pub const HOUR_MS: i64 = 3_600_000;

impl Ledger {
    /// Each node's earnings (micro-credits) per hour from `since_ms` on, oldest hour first;
    /// hours without receipts are left out.
    pub async fn earnings_by_hour(&self, since_ms: i64) -> Result<BTreeMap<String, Vec<(i64, u64)>>, LedgerError> {
        self.read(move |b| earnings_by_hour(b, since_ms)).await
    }
}

fn earnings_by_hour(b: &mut dyn Backend, since_ms: i64) -> Result<BTreeMap<String, Vec<(i64, u64)>>, LedgerError> {
    let mut by: BTreeMap<String, BTreeMap<i64, u64>> = BTreeMap::new();
    let filter = EntryFilter { since_ms: Some(since_ms), ..EntryFilter::default() };
    b.for_each_entry(&filter, &mut |e| {
        // A bad entry is `ledger verify`'s business; the dashboard just leaves it out.
        if let Ok(e) = e
            && e.kind == EntryKind::Receipt
        {
            let hour = e.recorded_ms - e.recorded_ms.rem_euclid(HOUR_MS);
            *by.entry(e.node).or_default().entry(hour).or_default() += e.cost.0;
        }
        true
    })?;
    Ok(by.into_iter().map(|(node, hours)| (node, hours.into_iter().collect())).collect())
}
