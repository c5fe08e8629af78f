//! How fitting nodes are ranked. Each criterion scores 0..=1000 and the total is their
//! weighted sum, in integers so every operator computes the same ranking.
//!
//! - locality: 1000 when the node is in the zone of the job's data, 500 in its region, else 0.
//! - reputation: the node's reputation in thousandths.
//! - price: 1000 × cheapest fitting price / this node's price (1000 for the cheapest).
//! - balance: the share of the node's cpu and memory still free after placing (spreads load).

use std::fmt;
use std::str::FromStr;

use super::{Locality, Node, REGION_LABEL, Request, Resources, ZONE_LABEL};
use crate::pricing::Micros;

/// Weights of the score criteria. Configurable with `--score-weight name=value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Weights {
    pub locality: u32,
    pub reputation: u32,
    pub price: u32,
    pub balance: u32,
}

impl Default for Weights {
    /// Data locality first (moving inputs is slow and costly), then reputation and price, then
    /// balance as the tie-breaker that spreads load.
    fn default() -> Self {
        Weights { locality: 4, reputation: 2, price: 2, balance: 1 }
    }
}

impl Weights {
    /// Sets one weight from "name=value" (locality, reputation, price, balance; 0..=100).
    pub fn set(&mut self, spec: &str) -> Result<(), String> {
        let (name, value) = spec.split_once('=').ok_or_else(|| format!("{spec:?} is not name=value (e.g. locality=4)"))?;
        let value: u32 = value.trim().parse().ok().filter(|v| *v <= 100).ok_or_else(|| format!("{spec:?}: the weight must be an integer from 0 to 100"))?;
        match name.trim() {
            "locality" => self.locality = value,
            "reputation" => self.reputation = value,
            "price" => self.price = value,
            "balance" => self.balance = value,
            other => return Err(format!("{other:?} is not a score criterion (locality, reputation, price, balance)")),
        }
        Ok(())
    }

    /// The largest total the node-level criteria (reputation, balance) can add.
    pub fn node_max(&self) -> u64 {
        1000 * (self.reputation as u64 + self.balance as u64)
    }
}

impl FromStr for Weights {
    type Err = String;
    /// "locality=4,price=1": unnamed criteria keep their default.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut w = Weights::default();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            w.set(part)?;
        }
        Ok(w)
    }
}

impl fmt::Display for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "locality={},reputation={},price={},balance={}", self.locality, self.reputation, self.price, self.balance)
    }
}

/// 1000 for a node in the data's zone, 500 in its region, 0 otherwise or when the job has no
/// data locality.
pub fn locality(node: &Node, want: Option<&Locality>) -> u64 {
    let Some(want) = want else { return 0 };
    let label = |k: &str| node.labels.get(k).map(String::as_str);
    let zone_ok = want.zone.as_deref().is_some_and(|z| label(ZONE_LABEL) == Some(z));
    let region_ok = want.region.as_deref().is_some_and(|r| label(REGION_LABEL) == Some(r));
    if zone_ok && (want.region.is_none() || region_ok) {
        1000
    } else if region_ok {
        500
    } else {
        0
    }
}

/// 1000 × `cheapest` / `price`: the cheapest fitting node scores 1000, one twice the price 500.
pub fn price(price: Micros, cheapest: Micros) -> u64 {
    if price.0 == 0 { 1000 } else { (cheapest.0 as u128 * 1000 / price.0 as u128) as u64 }
}

/// The mean share of cpu and memory left free after placing `r`, in thousandths.
pub fn balance(capacity: Resources, allocated: Resources, r: &Request) -> u64 {
    let after = capacity.saturating_sub(allocated.plus(r.resources));
    let share = |free: u64, cap: u64| if cap == 0 { 0 } else { (free as u128 * 1000 / cap as u128) as u64 };
    (share(after.cpu_millis, capacity.cpu_millis) + share(after.memory_bytes, capacity.memory_bytes)) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_from_flags_and_reject_nonsense() {
        assert_eq!("".parse::<Weights>(), Ok(Weights::default()));
        assert_eq!("locality=1, price=9".parse::<Weights>(), Ok(Weights { locality: 1, price: 9, ..Weights::default() }));
        assert!("speed=1".parse::<Weights>().unwrap_err().contains("not a score criterion"));
        assert!("price=-1".parse::<Weights>().unwrap_err().contains("integer from 0 to 100"));
        assert!("price".parse::<Weights>().unwrap_err().contains("name=value"));
        assert_eq!(Weights::default().to_string(), "locality=4,reputation=2,price=2,balance=1");
    }

    #[test]
    fn locality_prefers_the_zone_then_the_region() {
        let mut n = Node::default();
        n.labels.insert(REGION_LABEL.into(), "eu".into());
        n.labels.insert(ZONE_LABEL.into(), "eu-1".into());
        let at = |region: Option<&str>, zone: Option<&str>| Locality { region: region.map(Into::into), zone: zone.map(Into::into) };
        assert_eq!(locality(&n, None), 0);
        assert_eq!(locality(&n, Some(&at(Some("eu"), Some("eu-1")))), 1000);
        assert_eq!(locality(&n, Some(&at(None, Some("eu-1")))), 1000);
        assert_eq!(locality(&n, Some(&at(Some("eu"), Some("eu-2")))), 500);
        assert_eq!(locality(&n, Some(&at(Some("us"), None))), 0);
    }

    #[test]
    fn cheaper_and_emptier_nodes_score_higher() {
        assert_eq!(price(Micros(100), Micros(100)), 1000);
        assert_eq!(price(Micros(200), Micros(100)), 500);
        assert_eq!(price(Micros(0), Micros(0)), 1000);
        let cap = Resources { cpu_millis: 4000, memory_bytes: 4000, ephemeral_bytes: 0 };
        let r = Request::new("wasm", Resources { cpu_millis: 1000, memory_bytes: 1000, ephemeral_bytes: 0 });
        assert_eq!(balance(cap, Resources::default(), &r), 750);
        assert_eq!(balance(cap, Resources { cpu_millis: 2000, memory_bytes: 0, ephemeral_bytes: 0 }, &r), 500);
    }
}
