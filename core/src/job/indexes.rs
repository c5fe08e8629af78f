//! Compact index ranges ("0-3,7,9-10"), the format Indexed Jobs use for `completedIndexes`,
//! and `IndexSet`, the same ranges held in memory (a million done tasks are one range).

/// Formats sorted, de-duplicated indexes as ranges; consecutive runs collapse to "a-b".
pub fn compact(indexes: &[u32]) -> String {
    let mut out = String::new();
    let mut iter = indexes.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while end.checked_add(1).is_some_and(|next| iter.peek() == Some(&next)) {
            end += 1;
            iter.next();
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
    }
    out
}

/// A status's index list that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("index list {text:?} is not valid at {part:?}: expected comma-separated indexes or ranges like 0-3,7")]
pub struct IndexesError {
    pub text: String,
    pub part: String,
}

/// A set of task indexes as sorted, disjoint, non-adjacent inclusive ranges: memory follows
/// the number of gaps, not of indexes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexSet {
    ranges: Vec<(u32, u32)>,
}

impl IndexSet {
    /// Parses what [`compact`] writes; an empty string is the empty set. Ranges may come in
    /// any order and overlap (a hand-edited status), never reversed.
    pub fn parse(text: &str) -> Result<IndexSet, IndexesError> {
        let mut set = IndexSet::default();
        let bad = |part: &str| IndexesError { text: text.chars().take(64).collect(), part: part.chars().take(32).collect() };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let (lo, hi) = match (lo.trim().parse::<u32>(), hi.trim().parse::<u32>()) {
                (Ok(lo), Ok(hi)) if lo <= hi => (lo, hi),
                _ => return Err(bad(part)),
            };
            set.insert_range(lo, hi);
        }
        Ok(set)
    }

    /// The set of `indexes` (any order).
    pub fn of(indexes: impl IntoIterator<Item = u32>) -> IndexSet {
        let mut set = IndexSet::default();
        for i in indexes {
            set.insert_range(i, i);
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many indexes.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(lo, hi)| u64::from(hi - lo) + 1).sum()
    }

    /// The ranges, in order.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    /// The last index of the range holding `i`, or None when `i` is not in the set.
    pub fn run_end(&self, i: u32) -> Option<u32> {
        let at = self.ranges.partition_point(|(_, hi)| *hi < i);
        self.ranges.get(at).filter(|(lo, _)| *lo <= i).map(|(_, hi)| *hi)
    }

    pub fn contains(&self, i: u32) -> bool {
        self.run_end(i).is_some()
    }

    /// The smallest index of the set above `i`, if any.
    pub fn next_after(&self, i: u32) -> Option<u32> {
        let at = self.ranges.partition_point(|(_, hi)| *hi <= i);
        self.ranges.get(at).map(|(lo, _)| (*lo).max(i.saturating_add(1)))
    }

    /// Adds `lo..=hi`, merging with the ranges it touches.
    pub fn insert_range(&mut self, lo: u32, hi: u32) {
        // The first range that ends at or after lo - 1 (adjacent ranges merge).
        let start = self.ranges.partition_point(|(_, h)| h.saturating_add(1) < lo);
        let mut end = start;
        let (mut new_lo, mut new_hi) = (lo, hi);
        while let Some(&(l, h)) = self.ranges.get(end)
            && l <= hi.saturating_add(1)
        {
            new_lo = new_lo.min(l);
            new_hi = new_hi.max(h);
            end += 1;
        }
        self.ranges.splice(start..end, [(new_lo, new_hi)]);
    }

    /// Adds every index of `other`.
    pub fn extend(&mut self, other: &IndexSet) {
        for &(lo, hi) in &other.ranges {
            self.insert_range(lo, hi);
        }
    }
}

impl std::fmt::Display for IndexSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, (lo, hi)) in self.ranges.iter().enumerate() {
            let sep = if n == 0 { "" } else { "," };
            if lo == hi { write!(f, "{sep}{lo}")? } else { write!(f, "{sep}{lo}-{hi}")? }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{IndexSet, compact};

    #[test]
    fn a_set_reads_what_compact_writes_and_writes_it_back() {
        for text in ["", "0", "0-3", "0-3,7,9-10", "5,7,9", "4294967294-4294967295"] {
            let set = IndexSet::parse(text).unwrap();
            assert_eq!(set.to_string(), text);
        }
        let set = IndexSet::parse("9-10, 0-3,2-4,7,5").unwrap();
        assert_eq!((set.to_string(), set.len()), ("0-5,7,9-10".to_string(), 9), "unordered, overlapping and adjacent ranges merge");
        assert_eq!(IndexSet::of([3, 1, 2, 7]).to_string(), "1-3,7");
    }

    #[test]
    fn a_malformed_list_is_refused_naming_the_bad_part() {
        for (text, part) in [("0-3,x", "x"), ("5-2", "5-2"), ("1-", "1-"), ("-1", "-1"), ("4294967296", "4294967296")] {
            let e = IndexSet::parse(text).unwrap_err();
            assert_eq!(e.part, part, "{text}");
            assert!(e.to_string().contains(part), "{e}");
        }
    }

    #[test]
    fn lookups_find_runs_and_the_next_member() {
        let set = IndexSet::parse("2-4,8").unwrap();
        assert_eq!((set.run_end(1), set.run_end(2), set.run_end(4), set.run_end(8), set.run_end(9)), (None, Some(4), Some(4), Some(8), None));
        assert_eq!((set.next_after(0), set.next_after(2), set.next_after(4), set.next_after(8)), (Some(2), Some(3), Some(8), None));
        assert!(set.contains(3) && !set.contains(5));
    }

    #[test]
    fn ranges() {
        assert_eq!(compact(&[]), "");
        assert_eq!(compact(&[0]), "0");
        assert_eq!(compact(&[0, 1, 2, 3]), "0-3");
        assert_eq!(compact(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(compact(&[5, 7, 9]), "5,7,9");
        assert_eq!(compact(&[u32::MAX - 1, u32::MAX]), format!("{}-{}", u32::MAX - 1, u32::MAX));
    }
}
