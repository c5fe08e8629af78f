//! Prices and costs. Money is kept as integer micro-credits (1 credit = 1,000,000 micros) so
//! totals add up exactly and every auditor recomputes the same figures; users write credits
//! as decimal strings ("0.05", "12"). Pure: no I/O.

use std::fmt;

use kommune_proto::v1::Usage;

/// Micro-credits in one credit.
pub const MICROS_PER_CREDIT: u64 = 1_000_000;

/// An amount of credits, in micro-credits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Micros(pub u64);

impl Micros {
    /// Parses a non-negative decimal number of credits with at most 6 decimals: "0.05", "12",
    /// "1.000001". Anything else is an error that says what was expected.
    pub fn parse_credits(s: &str) -> Result<Micros, String> {
        let s = s.trim();
        let bad = || format!("{s:?} is not an amount of credits: expected a non-negative decimal number with at most 6 decimals, like \"0.05\"");
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 6 {
            return Err(bad());
        }
        if s.ends_with('.') {
            return Err(bad());
        }
        let whole: u64 = whole.parse().map_err(|_| bad())?;
        let frac_micros: u64 = if frac.is_empty() { 0 } else { format!("{frac:0<6}").parse().map_err(|_| bad())? };
        whole.checked_mul(MICROS_PER_CREDIT).and_then(|w| w.checked_add(frac_micros)).map(Micros).ok_or_else(bad)
    }

    pub fn saturating_add(self, other: Micros) -> Micros {
        Micros(self.0.saturating_add(other.0))
    }
}

impl fmt::Display for Micros {
    /// Credits with trailing zeros dropped: 50000 -> "0.05", 12000000 -> "12".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / MICROS_PER_CREDIT;
        let frac = self.0 % MICROS_PER_CREDIT;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:06}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// What one unit of each resource costs. Cluster-wide rates come from the operator's flags
/// (the chart's `rates` values); a ProviderNode may override any of them for its machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rates {
    /// Per CPU-core-hour of measured CPU time.
    pub cpu_core_hour: Micros,
    /// Per GiB-hour of memory (measured memory integrated over time).
    pub memory_gib_hour: Micros,
    /// Per GPU-hour.
    pub gpu_hour: Micros,
    /// Per GiB of output written.
    pub output_gib: Micros,
}

/// Per-provider overrides; unset fields keep the cluster rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateOverrides {
    pub cpu_core_hour: Option<Micros>,
    pub memory_gib_hour: Option<Micros>,
    pub gpu_hour: Option<Micros>,
    pub output_gib: Option<Micros>,
}

impl Rates {
    /// These rates with a provider's overrides applied.
    pub fn with(&self, o: &RateOverrides) -> Rates {
        Rates {
            cpu_core_hour: o.cpu_core_hour.unwrap_or(self.cpu_core_hour),
            memory_gib_hour: o.memory_gib_hour.unwrap_or(self.memory_gib_hour),
            gpu_hour: o.gpu_hour.unwrap_or(self.gpu_hour),
            output_gib: o.output_gib.unwrap_or(self.output_gib),
        }
    }
}

/// The cluster's rates and every provider's overrides, shared by the dispatcher (pricing
/// receipts, budgets) and the node controller (which keeps the overrides current).
#[derive(Debug, Default)]
pub struct RateBook {
    cluster: Rates,
    overrides: std::sync::RwLock<std::collections::HashMap<String, RateOverrides>>,
}

impl RateBook {
    pub fn new(cluster: Rates) -> Self {
        RateBook { cluster, overrides: Default::default() }
    }

    pub fn cluster(&self) -> Rates {
        self.cluster
    }

    /// The rates `node` is paid at.
    pub fn for_node(&self, node: &str) -> Rates {
        match self.overrides.read().unwrap_or_else(|p| p.into_inner()).get(node) {
            Some(o) => self.cluster.with(o),
            None => self.cluster,
        }
    }

    /// The highest rate of each kind over the cluster's and every provider's: what a task not
    /// yet placed could be charged at most.
    pub fn ceiling(&self) -> Rates {
        let map = self.overrides.read().unwrap_or_else(|p| p.into_inner());
        map.values().fold(self.cluster, |r, o| {
            let o = self.cluster.with(o);
            Rates {
                cpu_core_hour: r.cpu_core_hour.max(o.cpu_core_hour),
                memory_gib_hour: r.memory_gib_hour.max(o.memory_gib_hour),
                gpu_hour: r.gpu_hour.max(o.gpu_hour),
                output_gib: r.output_gib.max(o.output_gib),
            }
        })
    }

    /// Replaces `node`'s overrides (from its ProviderNode spec).
    pub fn set_overrides(&self, node: &str, o: RateOverrides) {
        let mut map = self.overrides.write().unwrap_or_else(|p| p.into_inner());
        if o == RateOverrides::default() {
            map.remove(node);
        } else {
            map.insert(node.to_string(), o);
        }
    }
}

/// How much of a job's budget is committed, and so how many more tasks it may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetCheck {
    pub budget: Micros,
    /// Metered so far (accepted receipts).
    pub spent: Micros,
    /// The worst case of the attempts still running.
    pub reserved: Micros,
    /// The worst case of one more task.
    pub next: Micros,
}

impl BudgetCheck {
    /// How many more tasks fit: each new one is charged its worst case up front, so the job
    /// can never overrun its budget whatever its tasks turn out to use.
    pub fn allows(&self) -> u64 {
        let committed = self.spent.0.saturating_add(self.reserved.0);
        let left = self.budget.0.saturating_sub(committed);
        left.checked_div(self.next.0).unwrap_or(u64::MAX)
    }

    /// Why no further task starts, for the `Scheduled` condition.
    pub fn explain(&self) -> String {
        format!(
            "budget {} credits: {} spent and up to {} committed to running tasks; the next task could cost up to {}",
            self.budget, self.spent, self.reserved, self.next
        )
    }
}

const MICROS_PER_HOUR: u128 = 3_600_000_000;
const MILLIS_PER_HOUR: u128 = 3_600_000;
const MIB_PER_GIB: u128 = 1024;
const BYTES_PER_GIB: u128 = 1 << 30;

/// The cost of measured usage at `rates`, rounded down to the micro-credit. Computed in u128,
/// so no realistic usage overflows; the result saturates at u64::MAX.
pub fn cost(usage: &Usage, rates: &Rates) -> Micros {
    let cpu = usage.cpu_micros as u128 * rates.cpu_core_hour.0 as u128 / MICROS_PER_HOUR;
    let mem = usage.memory_mib_millis as u128 * rates.memory_gib_hour.0 as u128 / (MIB_PER_GIB * MILLIS_PER_HOUR);
    let gpu = usage.gpu_millis as u128 * rates.gpu_hour.0 as u128 / MILLIS_PER_HOUR;
    let out = usage.output_bytes as u128 * rates.output_gib.0 as u128 / BYTES_PER_GIB;
    Micros(u64::try_from(cpu + mem + gpu + out).unwrap_or(u64::MAX))
}

/// The most a task reserving `cpu_millis`, `memory_bytes` and `gpus` can cost per hour at
/// `rates` (every reserved core busy, all memory used): the figure price ceilings and budgets
/// compare against. Output is not included: it is not known in advance.
pub fn hourly_ceiling(cpu_millis: u64, memory_bytes: u64, gpus: u32, rates: &Rates) -> Micros {
    let cpu = cpu_millis as u128 * rates.cpu_core_hour.0 as u128 / 1000;
    let mem = memory_bytes as u128 * rates.memory_gib_hour.0 as u128 / BYTES_PER_GIB;
    let gpu = gpus as u128 * rates.gpu_hour.0 as u128;
    Micros(u64::try_from(cpu + mem + gpu).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_parse_and_print_exactly() {
        for (s, micros) in [("0", 0), ("12", 12_000_000), ("0.05", 50_000), ("1.000001", 1_000_001), (" 3.5 ", 3_500_000), ("0.100000", 100_000)] {
            assert_eq!(Micros::parse_credits(s), Ok(Micros(micros)), "{s}");
        }
        for s in ["", "-1", "1.", ".5", "1.0000001", "1e3", "abc", "1.2.3", "99999999999999999999"] {
            assert!(Micros::parse_credits(s).unwrap_err().contains("not an amount of credits"), "{s}");
        }
        assert_eq!(Micros(50_000).to_string(), "0.05");
        assert_eq!(Micros(12_000_000).to_string(), "12");
        assert_eq!(Micros(1).to_string(), "0.000001");
    }

    #[test]
    fn cost_charges_each_measured_resource_at_its_rate() {
        let rates = Rates { cpu_core_hour: Micros(36_000), memory_gib_hour: Micros(3_600), gpu_hour: Micros(1_000_000), output_gib: Micros(2_000) };
        let hour_of_cpu = Usage { cpu_micros: 3_600_000_000, ..Default::default() };
        assert_eq!(cost(&hour_of_cpu, &rates), Micros(36_000));
        let gib_hour = Usage { memory_mib_millis: 1024 * 3_600_000, ..Default::default() };
        assert_eq!(cost(&gib_hour, &rates), Micros(3_600));
        let gpu_half_hour = Usage { gpu_millis: 1_800_000, ..Default::default() };
        assert_eq!(cost(&gpu_half_hour, &rates), Micros(500_000));
        let out = Usage { output_bytes: 1 << 29, ..Default::default() };
        assert_eq!(cost(&out, &rates), Micros(1_000));
        let second = Usage { cpu_micros: 1_000_000, ..Default::default() };
        assert_eq!(cost(&second, &rates), Micros(10), "36000 micros/h is 10 micros/s");
        assert_eq!(cost(&Usage { cpu_micros: u64::MAX, ..Default::default() }, &Rates { cpu_core_hour: Micros(u64::MAX), ..rates }), Micros(u64::MAX));
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let base = Rates { cpu_core_hour: Micros(1), memory_gib_hour: Micros(2), gpu_hour: Micros(3), output_gib: Micros(4) };
        let o = RateOverrides { gpu_hour: Some(Micros(30)), ..Default::default() };
        assert_eq!(base.with(&o), Rates { gpu_hour: Micros(30), ..base });
    }

    #[test]
    fn a_budget_admits_only_tasks_whose_worst_case_still_fits() {
        let check = BudgetCheck { budget: Micros(1_000), spent: Micros(300), reserved: Micros(200), next: Micros(150) };
        assert_eq!(check.allows(), 3);
        assert_eq!(BudgetCheck { spent: Micros(900), ..check }.allows(), 0);
        assert_eq!(BudgetCheck { spent: Micros(2_000), ..check }.allows(), 0, "overspent (an implausible old receipt) never underflows");
        assert_eq!(BudgetCheck { next: Micros(0), ..check }.allows(), u64::MAX, "free tasks are never limited");
        assert_eq!(check.explain(), "budget 0.001 credits: 0.0003 spent and up to 0.0002 committed to running tasks; the next task could cost up to 0.00015");
    }

    #[test]
    fn the_rate_book_applies_each_providers_overrides() {
        let book = RateBook::new(Rates { cpu_core_hour: Micros(10), ..Default::default() });
        book.set_overrides("cheap", RateOverrides { cpu_core_hour: Some(Micros(5)), ..Default::default() });
        assert_eq!(book.for_node("cheap").cpu_core_hour, Micros(5));
        assert_eq!(book.for_node("other").cpu_core_hour, Micros(10));
        book.set_overrides("dear", RateOverrides { cpu_core_hour: Some(Micros(50)), ..Default::default() });
        assert_eq!(book.ceiling().cpu_core_hour, Micros(50));
        book.set_overrides("dear", RateOverrides::default());
        book.set_overrides("cheap", RateOverrides::default());
        assert_eq!(book.for_node("cheap").cpu_core_hour, Micros(10));
    }

    #[test]
    fn the_hourly_ceiling_assumes_everything_reserved_is_used() {
        let rates = Rates { cpu_core_hour: Micros(100_000), memory_gib_hour: Micros(10_000), gpu_hour: Micros(1_000_000), output_gib: Micros(0) };
        assert_eq!(hourly_ceiling(500, 2 << 30, 1, &rates), Micros(50_000 + 20_000 + 1_000_000));
    }
}
