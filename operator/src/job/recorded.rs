//! What a ComputeJob's status records as done, read back: after a lost or restored store the
//! status is the one record of which tasks finished, so they are not run or billed again.

use super::Recorded;
use super::indexes::{IndexSet, IndexesError};
use crate::crd::ComputeJobStatus;

/// The done tasks and start time `status` records. A hand-edited index list that does not
/// parse is left out (the store's attempts still count) and returned as the error to report.
pub fn from_status(status: &ComputeJobStatus) -> (Recorded, Vec<IndexesError>) {
    let mut errors = vec![];
    let mut read = |text: Option<&str>| match IndexSet::parse(text.unwrap_or_default()) {
        Ok(set) => set,
        Err(e) => {
            errors.push(e);
            IndexSet::default()
        }
    };
    let completed = read(status.completed_indexes.as_deref());
    let failed = read(status.failed_indexes.as_deref());
    let started_ms = status.start_time.as_ref().map(|t| t.0.as_millisecond());
    (Recorded { completed, failed, started_ms }, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn the_status_index_lists_and_start_are_read_back() {
        let status = ComputeJobStatus {
            completed_indexes: Some("0-2,5".into()),
            failed_indexes: Some("3".into()),
            start_time: Some(Time(Timestamp::from_millisecond(1_700_000_000_123).unwrap())),
            ..Default::default()
        };
        let (r, errors) = from_status(&status);
        assert!(errors.is_empty());
        assert_eq!((r.completed.to_string(), r.failed.to_string(), r.started_ms), ("0-2,5".into(), "3".into(), Some(1_700_000_000_123)));
        assert_eq!(from_status(&ComputeJobStatus::default()).0, Recorded::default());
    }

    #[test]
    fn an_edited_list_that_does_not_parse_is_reported_and_left_out() {
        let status = ComputeJobStatus { completed_indexes: Some("0-2,oops".into()), failed_indexes: Some("1".into()), ..Default::default() };
        let (r, errors) = from_status(&status);
        assert!(r.completed.is_empty() && r.failed.to_string() == "1");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("oops"), "{}", errors[0]);
    }
}
