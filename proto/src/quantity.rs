//! Kubernetes resource quantities ("250m", "2", "64Mi", "1G") parsed into the integers the
//! scheduler and the agents work in: CPU millicores and memory bytes.

/// Why a quantity could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantityError {
    #[error("{field}: {value:?} is not a quantity (expected e.g. \"500m\", \"2\", \"256Mi\", \"1Gi\")")]
    Syntax { field: &'static str, value: String },
    #[error("{field}: {value:?} must be greater than zero")]
    Zero { field: &'static str, value: String },
    #[error("{field}: {value:?} is too large")]
    Overflow { field: &'static str, value: String },
}

/// Splits "1.5Gi" into ("1.5", "Gi").
fn split(value: &str) -> (&str, &str) {
    let at = value.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(value.len());
    value.split_at(at)
}

/// Parses a non-negative decimal "12.345" into (integer scaled by 10^9, so fractions survive).
fn nano(number: &str) -> Option<u128> {
    if number.is_empty() || number == "." {
        return None;
    }
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if frac.len() > 9 || frac.contains('.') {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_val: u128 = if frac.is_empty() { 0 } else { frac.parse::<u128>().ok()? * 10u128.pow(9 - frac.len() as u32) };
    int.checked_mul(1_000_000_000)?.checked_add(frac_val)
}

fn multiplier(suffix: &str) -> Option<(u128, u128)> {
    // (numerator, denominator) applied to the value.
    Some(match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        _ => return None,
    })
}

/// Parses a quantity into its value in base units, rounded up, scaled by `scale`.
fn parse(field: &'static str, value: &str, scale: u128) -> Result<u64, QuantityError> {
    let syntax = || QuantityError::Syntax { field, value: value.to_string() };
    let (number, suffix) = split(value.trim());
    let n = nano(number).ok_or_else(syntax)?;
    let (num, den) = multiplier(suffix).ok_or_else(syntax)?;
    let scaled = n.checked_mul(num).and_then(|v| v.checked_mul(scale)).ok_or_else(|| QuantityError::Overflow { field, value: value.to_string() })?;
    let divisor = den * 1_000_000_000;
    let result = scaled.div_ceil(divisor);
    if result == 0 {
        return Err(QuantityError::Zero { field, value: value.to_string() });
    }
    u64::try_from(result).map_err(|_| QuantityError::Overflow { field, value: value.to_string() })
}

/// CPU in millicores: "250m" → 250, "2" → 2000, "0.5" → 500.
pub fn cpu_millis(field: &'static str, value: &str) -> Result<u64, QuantityError> {
    parse(field, value, 1000)
}

/// Memory in bytes: "64Mi" → 67108864, "1G" → 1000000000.
pub fn memory_bytes(field: &'static str, value: &str) -> Result<u64, QuantityError> {
    parse(field, value, 1)
}

/// Formats millicores the way kubectl shows them.
pub fn format_cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) { format!("{}", millis / 1000) } else { format!("{millis}m") }
}

/// Formats bytes in the largest binary unit that divides them exactly.
pub fn format_memory(bytes: u64) -> String {
    for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_table() {
        for (input, want) in
            [("250m", 250), ("1", 1000), ("2", 2000), ("0.5", 500), ("1.5", 1500), ("100m", 100), (" 3 ", 3000), ("0.0001", 1), ("1k", 1_000_000)]
        {
            assert_eq!(cpu_millis("cpu", input), Ok(want), "{input}");
        }
    }

    #[test]
    fn memory_table() {
        for (input, want) in
            [("64Mi", 64 << 20), ("1Gi", 1 << 30), ("1G", 1_000_000_000), ("512", 512), ("1.5Gi", 3 << 29), ("1Ki", 1024), ("2Ti", 2 << 40), ("1500m", 2)]
        {
            assert_eq!(memory_bytes("memory", input), Ok(want), "{input}");
        }
    }

    #[test]
    fn bad_quantities_are_named() {
        for input in ["", "abc", "1.2.3", "12Xi", "-1", "1e3", ".", "Mi"] {
            let err = memory_bytes("resources.memory", input).unwrap_err();
            assert!(err.to_string().contains("resources.memory"), "{err}");
            assert!(matches!(err, QuantityError::Syntax { .. }), "{input}: {err}");
        }
        assert!(matches!(cpu_millis("cpu", "0"), Err(QuantityError::Zero { .. })));
        assert!(matches!(cpu_millis("cpu", "0m"), Err(QuantityError::Zero { .. })));
        assert!(matches!(memory_bytes("m", "99999999999999999999Ti"), Err(QuantityError::Overflow { .. })));
    }

    #[test]
    fn formatting_round_trips() {
        for m in [1, 250, 1000, 1500, 64000] {
            assert_eq!(cpu_millis("cpu", &format_cpu(m)), Ok(m));
        }
        for b in [1, 1023, 1024, 64 << 20, 3 << 29, 1 << 40, 12345678] {
            assert_eq!(memory_bytes("mem", &format_memory(b)), Ok(b));
        }
        assert_eq!(format_memory(64 << 20), "64Mi");
        assert_eq!(format_cpu(250), "250m");
    }
}
