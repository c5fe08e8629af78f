//! Compact index ranges ("0-3,7,9-10"), the format Indexed Jobs use for `completedIndexes`.

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

#[cfg(test)]
mod tests {
    use super::compact;

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
