//! A keyed queue that folds repeated updates of one key into one pending write (latest state
//! wins), holds a key back while its previous write is in flight, takes a failed write back to
//! try again later, and is bounded. Pure.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
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
    /// Keys ready to be written once due, oldest first; never a key in flight or retrying.
    order: VecDeque<K>,
    /// Keys whose write failed, by when they are tried again (and a sequence number, so two
    /// due at once keep their order): their due times are not in `order`'s first-in order.
    retrying: BTreeMap<(Instant, u64), K>,
    retries: u64,
    /// Every pending write (in `order`, in `retrying`, or waiting for its key's write in
    /// flight) and when it may be taken.
    pending: HashMap<K, (V, Instant)>,
    in_flight: HashSet<K>,
}

impl<K: Hash + Eq + Clone, V: Merge> Coalescer<K, V> {
    /// At most `capacity` keys pending; a new key's write waits `linger` so the updates that
    /// follow it closely (a join, then its session) go out as one write.
    pub fn new(capacity: usize, linger: Duration) -> Self {
        Coalescer {
            capacity: capacity.max(1),
            linger,
            order: VecDeque::new(),
            retrying: BTreeMap::new(),
            retries: 0,
            pending: HashMap::new(),
            in_flight: HashSet::new(),
        }
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
    /// [`Self::done`] or [`Self::retry`]. A retry that is due goes first; otherwise later keys
    /// wait behind an older one that is not due yet (first in, first out; a linger is short).
    pub fn pop_ready(&mut self, now: Instant) -> Option<(K, V)> {
        let key = match self.retrying.first_key_value() {
            Some((&(due, seq), _)) if due <= now => self.retrying.remove(&(due, seq))?,
            _ => {
                let key = self.order.front()?;
                if self.pending.get(key).is_some_and(|(_, due)| *due > now) {
                    return None;
                }
                self.order.pop_front()?
            }
        };
        let (value, _) = self.pending.remove(&key)?;
        self.in_flight.insert(key.clone());
        Some((key, value))
    }

    /// The write of `key` (`failed`, as [`Self::pop_ready`] gave it) failed: it is tried again
    /// at `due`, with whatever was queued for the key meanwhile folded in after it, so the one
    /// write then shows the failed updates and the newer ones in their order. Until then the
    /// key is not written (a newer update never goes out before an older one that failed).
    /// Takes no room of the capacity's that the key did not hold already.
    pub fn retry(&mut self, key: &K, mut failed: V, due: Instant) {
        if !self.in_flight.remove(key) {
            return;
        }
        if let Some((newer, _)) = self.pending.remove(key) {
            failed.merge(newer);
        }
        self.retries += 1;
        self.retrying.insert((due, self.retries), key.clone());
        self.pending.insert(key.clone(), (failed, due));
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
        let first = self.order.front().and_then(|k| self.pending.get(k)).map(|(_, due)| *due);
        let retry = self.retrying.first_key_value().map(|(&(due, _), _)| due);
        match (first, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Keys waiting to be tried again after a failed write.
    pub fn retrying(&self) -> usize {
        self.retrying.len()
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

    #[test]
    fn a_failed_write_comes_back_when_due_with_what_came_meanwhile_after_it() {
        let t0 = Instant::now();
        let mut q = Coalescer::new(10, Duration::ZERO);
        q.push("a", Seen(vec![1]), t0);
        let (k, v) = q.pop_ready(t0).unwrap();
        // Queued while the write was in flight, then the write fails.
        q.push("a", Seen(vec![2]), t0);
        q.retry(&k, v, t0 + ms(500));
        assert_eq!(q.retrying(), 1);
        assert_eq!(q.push("a", Seen(vec![3]), t0 + ms(10)), Pushed::Merged);
        // Other keys go meanwhile, though queued after it.
        q.push("b", Seen(vec![4]), t0 + ms(10));
        assert_eq!(q.next_due(), Some(t0 + ms(10)));
        assert_eq!(q.pop_ready(t0 + ms(10)), Some(("b", Seen(vec![4]))));
        assert_eq!(q.next_due(), Some(t0 + ms(500)));
        assert_eq!(q.pop_ready(t0 + ms(499)), None, "not before it is due");
        assert_eq!(q.pop_ready(t0 + ms(500)), Some(("a", Seen(vec![1, 2, 3]))));
        assert_eq!(q.retrying(), 0);
        q.done(&"a", t0 + ms(600));
        q.done(&"b", t0 + ms(600));
        assert!(q.is_empty() && q.in_flight() == 0 && q.next_due().is_none());
    }

    #[test]
    fn a_due_retry_goes_before_a_queue_held_up_by_a_lingering_key() {
        let t0 = Instant::now();
        let mut q = Coalescer::new(10, LINGER);
        q.push("a", Seen(vec![1]), t0);
        let (k, v) = q.pop_ready(t0 + LINGER).unwrap();
        q.retry(&k, v, t0 + LINGER + ms(1));
        q.push("b", Seen(vec![2]), t0 + LINGER);
        assert_eq!(q.pop_ready(t0 + LINGER + ms(1)), Some(("a", Seen(vec![1]))));
        assert_eq!(q.pop_ready(t0 + LINGER + ms(1)), None, "b still lingers");
    }

    #[test]
    fn retry_of_a_key_not_in_flight_changes_nothing() {
        let t0 = Instant::now();
        let mut q = Coalescer::new(4, Duration::ZERO);
        q.push("a", Seen(vec![1]), t0);
        q.retry(&"a", Seen(vec![9]), t0);
        q.retry(&"zzz", Seen(vec![9]), t0);
        assert_eq!((q.len(), q.retrying()), (1, 0));
        assert_eq!(q.pop_ready(t0), Some(("a", Seen(vec![1]))));
    }

    /// Random pushes, pops, completions and failures over a few keys: no key is ever written
    /// twice at once, and the writes that succeed deliver every update exactly once, in its
    /// key's order (a failed write's updates come again, before any newer one).
    #[test]
    fn every_update_is_delivered_once_in_order_and_never_two_writes_of_a_key_at_once() {
        use rand::{Rng, SeedableRng};
        for seed in 0..300u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let t0 = Instant::now();
            let mut q = Coalescer::new(3, ms(5));
            let mut pushed: HashMap<u8, Vec<u32>> = HashMap::new();
            let mut delivered: HashMap<u8, Vec<u32>> = HashMap::new();
            let mut flying: Vec<(u8, Seen)> = Vec::new();
            let mut n = 0u32;
            for step in 0..400u64 {
                let now = t0 + ms(step);
                match rng.gen_range(0..4) {
                    0 => {
                        let k = rng.gen_range(0..5u8);
                        n += 1;
                        if q.push(k, Seen(vec![n]), now) != Pushed::Full {
                            pushed.entry(k).or_default().push(n);
                        }
                    }
                    1 => {
                        if let Some((k, v)) = q.pop_ready(now) {
                            assert!(!flying.iter().any(|(f, _)| *f == k), "seed {seed}: {k} taken while in flight");
                            flying.push((k, v));
                        }
                    }
                    2 if !flying.is_empty() => {
                        let (k, v) = flying.swap_remove(rng.gen_range(0..flying.len()));
                        delivered.entry(k).or_default().extend(v.0);
                        q.done(&k, now);
                    }
                    _ if !flying.is_empty() => {
                        let (k, v) = flying.swap_remove(rng.gen_range(0..flying.len()));
                        q.retry(&k, v, now + ms(rng.gen_range(0..50)));
                    }
                    _ => {}
                }
            }
            // Drain, every write succeeding.
            let mut now = t0 + ms(1000);
            for (k, v) in flying.drain(..) {
                delivered.entry(k).or_default().extend(v.0);
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
            assert_eq!((q.in_flight(), q.retrying()), (0, 0));
        }
    }
}
