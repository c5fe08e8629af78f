//! A reader for the text exposition format, enough to check what `/metrics` says: tests (here,
//! in the component tests and in e2e) look a sample up by name and labels.

use std::collections::BTreeMap;

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Why a line is not a sample.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {why}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub why: &'static str,
    pub text: String,
}

/// Every sample in `text`; comment lines (`# HELP`, `# TYPE`, `# EOF`) are skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why| ParseError { line: i + 1, why, text: line.to_string() };
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| bad("value is not a number"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => (name.to_string(), labels(rest.strip_suffix('}').ok_or_else(|| bad("unclosed labels"))?).ok_or_else(|| bad("bad labels"))?),
        };
        out.push(Sample { name, labels, value });
    }
    Ok(out)
}

/// `a="x",b="y"` (values are this project's: no escaped quotes or commas).
fn labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        out.insert(k.to_string(), v.strip_prefix('"')?.strip_suffix('"')?.to_string());
    }
    Some(out)
}

/// The value of the sample named `name` whose labels include all of `labels`, summed over the
/// samples that match (so `("kommune_attempts_ended_total", [("phase", "succeeded")])` adds
/// up every runtime). None when no sample matches.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> =
        samples.iter().filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))).map(|s| s.value).collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}
