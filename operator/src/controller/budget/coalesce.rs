//! A keyed queue that folds repeated updates of one key into one pending write (latest state
//! wins), holds a key back while its previous write is in flight, and is bounded. Pure.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// An update that can absorb a newer one of the same key.
pub trait Merge {
    /// Folds `newer` into `self`; the result must write what writing both in turn would.
    fn merge(&mut self, newer: Self);
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// A new pending write.
    Queued,
    /// Folded into the key's pending write.
    Merged,
    /// The queue holds `capacity` keys already: not queued.
    Full,
}

/// Pending writes by key, served in the order keys were first queued.
#[derive(Debug)]
pub struct Coalescer<K, V> {
    capacity: usize,
    linger: Duration,
    /// Keys ready to be written once due, oldest first; never a key in flight.
    order: VecDeque<K>,
    /// Every pending write (in `order`, or waiting for its key's write in flight) and when it
    /// may be taken.
    pending: HashMap<K, (V, Instant)>,
    in_flight: HashSet<K>,
}

impl<K: Hash + Eq + Clone, V: Merge> Coalescer<K, V> {
    /// At most `capacity` keys pending; a new key's write waits `linger` so the updates that
    /// follow it closely (a join, then its session) go out as one write.
    pub fn new(capacity: usize, linger: Duration) -> Self {
        Coalescer { capacity: capacity.max(1), linger, order: VecDeque::new(), pending: HashMap::new(), in_flight: HashSet::new() }
    }

    /// Queues `value` for `key`, folded into its pending write if there is one.
    pub fn push(&mut self, key: K, value: V, now: Instant) -> Pushed {
        if let Some((pending, _)) = self.pending.get_mut(&key) {
            pending.merge(value);
            return Pushed::Merged;
        }
        if self.pending.len() >= self.capacity {
            return Pushed::Full;
        }
        if !self.in_flight.contains(&key) {
            self.order.push_back(key.clone());
        }
        self.pending.insert(key, (value, now + self.linger));
        Pushed::Queued
    }

    /// The oldest pending write that is due at `now`, marking its key in flight until
    /// [`Self::done`]. Later keys wait behind an older one that is not due yet (first in, first
    /// out; a linger is short).
    pub fn pop_ready(&mut self, now: Instant) -> Option<(K, V)> {
        let key = self.order.front()?;
        if self.pending.get(key).is_some_and(|(_, due)| *due > now) {
            return None;
        }
        let key = self.order.pop_front()?;
        let (value, _) = self.pending.remove(&key)?;
        self.in_flight.insert(key.clone());
        Some((key, value))
    }

    /// The write of `key` finished (or failed): an update queued meanwhile may go now.
    pub fn done(&mut self, key: &K, now: Instant) {
        if !self.in_flight.remove(key) {
            return;
        }
        if let Some((_, due)) = self.pending.get_mut(key) {
            // It has waited for the write in flight already; no linger on top.
            *due = (*due).min(now);
            self.order.push_back(key.clone());
        }
    }

    /// When the next write becomes due (None: nothing is waiting that could go).
    pub fn next_due(&self) -> Option<Instant> {
        self.order.front().and_then(|k| self.pending.get(k)).map(|(_, due)| *due)
    }

    /// Keys with a pending write.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Writes taken and not yet done.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether `key` has a write pending or in flight.
    pub fn is_busy(&self, key: &K) -> bool {
        self.pending.contains_key(key) || self.in_flight.contains(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Updates that remember everything folded into them, so a test can see nothing was lost.
    #[derive(Debug, Clone, PartialEq)]
    struct Seen(Vec<u32>);

    impl Merge for Seen {
        fn merge(&mut self, newer: Self) {
            self.0.extend(newer.0);
        }
    }

    const LINGER: Duration = Duration::from_millis(100);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn repeated_updates_of_one_key_are_one_write_with_all_of_them() {
        let t0 = Instant::now();
        let mut q = Coalescer::new(10, LINGER);
        assert_eq!(q.push("a", Seen(vec![1]), t0), Pushed::Queued);
        assert_eq!(q.push("a", Seen(vec![2]), t0 + ms(10)), Pushed::Merged);
        assert_eq!(q.push("a", Seen(vec![3]), t0 + ms(20)), Pushed::Merged);
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop_ready(t0 + LINGER), Some(("a", Seen(vec![1, 2, 3]))));
        assert_eq!(q.pop_ready(t0 + LINGER), None);
    }

    #[test]
    fn a_new_key_lingers_so_what_follows_closely_joins_its_write() {
        let t0 = Instant::now();
        let mut q = Coalescer::new(10, LINGER);
        q.push("a", Seen(vec![1]), t0);
        assert_eq!(q.next_due(), Some(t0 + LINGER));
        assert_eq!(q.pop_ready(t0 + ms(99)), None);
        assert!(q.pop_ready(t0 + LINGER).is_some());
    }

    #[test]
    fn keys_go_out_in_the_order_they_were_first_queued() {
        let t0 = Instant::now();
        let mut q = Coalescer::new(10, Duration::ZERO);
        for (i, k) in ["c", "a", "b"].into_iter().enumerate() {
            q.push(k, Seen(vec![i as u32]), t0);
        }
        // A later update of the first key does not move it back.
        q.push("c", Seen(vec![9]), t0);
        let popped: Vec<_> = std::iter::from_fn(|| q.pop_ready(t0)).map(|(k, _)| k).collect();
        assert_eq!(popped, ["c", "a", "b"]);
    }

    #[test]
    fn a_key_in_flight_is_not_taken_again_until_its_write_is_done() {
        let t0 = Instant::now();
        let mut q = Coalescer::new(10, LINGER);
        q.push("a", Seen(vec![1]), t0);
        let (k, _) = q.pop_ready(t0 + LINGER).unwrap();
        assert!(q.is_busy(&k));
        // Updates while the write is in flight wait for it, folded into one.
        assert_eq!(q.push("a", Seen(vec![2]), t0 + LINGER), Pushed::Queued);
        assert_eq!(q.push("a", Seen(vec![3]), t0 + LINGER), Pushed::Merged);
        q.push("b", Seen(vec![4]), t0 + LINGER);
        assert_eq!(q.pop_ready(t0 + LINGER * 3), Some(("b", Seen(vec![4]))));
        assert_eq!(q.pop_ready(t0 + LINGER * 3), None, "a is in flight");
        assert_eq!(q.in_flight(), 2);
        // Done: the waiting update goes at once, without a second linger.
        q.done(&"a", t0 + LINGER + ms(1));
        assert_eq!(q.pop_ready(t0 + LINGER + ms(1)), Some(("a", Seen(vec![2, 3]))));
        q.done(&"a", t0 + LINGER * 4);
        q.done(&"b", t0 + LINGER * 4);
        assert!(!q.is_busy(&"a") && q.is_empty() && q.in_flight() == 0);
    }

    #[test]
    fn a_full_queue_refuses_new_keys_but_still_folds_known_ones() {
        let t0 = Instant::now();
        let mut q = Coalescer::new(2, Duration::ZERO);
        assert_eq!(q.push("a", Seen(vec![1]), t0), Pushed::Queued);
        assert_eq!(q.push("b", Seen(vec![2]), t0), Pushed::Queued);
        assert_eq!(q.push("c", Seen(vec![3]), t0), Pushed::Full);
        assert_eq!(q.push("a", Seen(vec![4]), t0), Pushed::Merged);
        // A key in flight holds no room; its next update does.
        q.pop_ready(t0);
        assert_eq!(q.push("c", Seen(vec![5]), t0), Pushed::Queued);
        assert_eq!(q.push("a", Seen(vec![6]), t0), Pushed::Full);
    }

    #[test]
    fn done_for_a_key_not_in_flight_changes_nothing() {
        let t0 = Instant::now();
        let mut q = Coalescer::new(4, LINGER);
        q.push("a", Seen(vec![1]), t0);
        q.done(&"a", t0);
        assert_eq!(q.pop_ready(t0), None, "still lingering");
        q.done(&"zzz", t0);
        assert_eq!(q.len(), 1);
    }

    /// Random pushes, pops and completions over a few keys: no key is ever written twice at
    /// once, and every update is delivered exactly once, in its key's order.
    #[test]
    fn every_update_is_delivered_once_in_order_and_never_two_writes_of_a_key_at_once() {
        use rand::{Rng, SeedableRng};
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let t0 = Instant::now();
            let mut q = Coalescer::new(3, ms(5));
            let mut pushed: HashMap<u8, Vec<u32>> = HashMap::new();
            let mut delivered: HashMap<u8, Vec<u32>> = HashMap::new();
            let mut flying: Vec<u8> = Vec::new();
            let mut n = 0u32;
            for step in 0..400u64 {
                let now = t0 + ms(step);
                match rng.gen_range(0..3) {
                    0 => {
                        let k = rng.gen_range(0..5u8);
                        n += 1;
                        if q.push(k, Seen(vec![n]), now) != Pushed::Full {
                            pushed.entry(k).or_default().push(n);
                        }
                    }
                    1 => {
                        if let Some((k, v)) = q.pop_ready(now) {
                            assert!(!flying.contains(&k), "seed {seed}: {k} taken while in flight");
                            flying.push(k);
                            delivered.entry(k).or_default().extend(v.0);
                        }
                    }
                    _ => {
                        if !flying.is_empty() {
                            let k = flying.swap_remove(rng.gen_range(0..flying.len()));
                            q.done(&k, now);
                        }
                    }
                }
            }
            // Drain.
            let mut now = t0 + ms(1000);
            for k in flying.drain(..) {
                q.done(&k, now);
            }
            while !q.is_empty() {
                now += ms(10);
                while let Some((k, v)) = q.pop_ready(now) {
                    delivered.entry(k).or_default().extend(v.0);
                    q.done(&k, now);
                }
            }
            assert_eq!(pushed, delivered, "seed {seed}");
        }
    }
}
