use super::*;

const HOUR: i64 = 3600 * 1000;
const T0: i64 = 1_700_000_000_000;

fn decay() -> Decay {
    Decay::new(Duration::from_secs(3600)).unwrap()
}

fn standing(events: &[(Observed, i64)]) -> Standing {
    let mut s = Standing::default();
    for &(o, at) in events {
        s.record(o, at, decay());
    }
    s
}

fn many(o: Observed, n: usize, at: i64) -> Vec<(Observed, i64)> {
    vec![(o, at); n]
}

#[test]
fn a_new_provider_is_honest_until_outvoted_and_half_reliable() {
    let c = Counts::default();
    assert_eq!((c.honesty(), c.reliability(), c.reputation()), (Reputation(1000), Reputation(500), Reputation(500)));
    assert_eq!(c.outvoted_share(), 0.0);
}

#[test]
fn one_outvoted_result_undoes_ten_agreed_ones() {
    let c = Counts { agreed: 9.0, outvoted: 1.0, ..Default::default() };
    assert_eq!(c.honesty(), Reputation(500));
    let liar = Counts { agreed: 70.0, outvoted: 30.0, completed: 100.0, ..Default::default() };
    assert!(liar.honesty() < Reputation(200), "{:?}", liar.honesty());
    assert!(liar.reputation() < Reputation(200), "a liar's reliability does not save it");
}

#[test]
fn unverified_results_are_neutral_for_honesty() {
    let checked = Counts { agreed: 5.0, outvoted: 1.0, ..Default::default() };
    let plus_unchecked = Counts { unverified: 1000.0, ..checked };
    assert_eq!(checked.honesty(), plus_unchecked.honesty());
    assert_eq!(checked.reliability(), plus_unchecked.reliability(), "reliability counts Completed, which is observed separately");
}

#[test]
fn honesty_and_reliability_are_separate() {
    let flaky = Counts { completed: 10.0, lost: 10.0, agreed: 10.0, ..Default::default() };
    assert_eq!(flaky.honesty(), Reputation(1000), "losing attempts is not lying");
    assert_eq!(flaky.reliability(), Reputation(500));
    let liar = Counts { completed: 20.0, agreed: 10.0, outvoted: 10.0, ..Default::default() };
    assert_eq!(liar.reliability(), Reputation(954), "finishing every attempt is reliable, whatever it returned");
    assert!(liar.honesty() < Reputation(100));
}

#[test]
fn reliability_counts_losses_and_timeouts_fully_and_preemptions_half() {
    let base = Counts { completed: 8.0, ..Default::default() };
    let lost = Counts { lost: 2.0, ..base };
    let timed_out = Counts { timed_out: 2.0, ..base };
    let preempted = Counts { preempted: 4.0, ..base };
    assert_eq!(lost.reliability(), Reputation(750));
    assert_eq!(timed_out.reliability(), lost.reliability());
    assert_eq!(preempted.reliability(), lost.reliability());
}

#[test]
fn a_submitters_failing_task_is_a_completed_run() {
    // The model has no failure kind for an exit code: a task that crashes everywhere is
    // observed Completed on every provider, which raises their reliability.
    let mut s = Standing::default();
    for i in 0..5 {
        s.record(Observed::Completed, T0 + i, decay());
    }
    assert!(s.counts_at(T0 + 5, decay()).reliability() > Reputation(800));
}

#[test]
fn observations_decay_with_the_half_life() {
    let s = standing(&many(Observed::Lost, 4, T0));
    assert!((s.counts_at(T0 + HOUR, decay()).lost - 2.0).abs() < 1e-9);
    assert!((s.counts_at(T0 + 2 * HOUR, decay()).lost - 1.0).abs() < 1e-9);
    assert_eq!(s.counts_at(T0 - HOUR, decay()).lost, 4.0, "an earlier instant does not grow counts");
    // A node that lost work long ago and completed work since is reliable again.
    let mut events = many(Observed::Lost, 10, T0);
    events.extend(many(Observed::Completed, 10, T0 + 10 * HOUR));
    let s = standing(&events);
    assert!(s.counts_at(T0 + 10 * HOUR, decay()).reliability() > Reputation(900));
    let same_without_decay = Counts { lost: 10.0, completed: 10.0, ..Default::default() };
    assert_eq!(same_without_decay.reliability(), Reputation(500));
}

#[test]
fn order_of_recording_does_not_matter() {
    let events = [(Observed::Agreed, T0), (Observed::Outvoted, T0 + 3 * HOUR), (Observed::Completed, T0 + HOUR), (Observed::Lost, T0 + 2 * HOUR)];
    let forward = standing(&events);
    let mut reversed = events;
    reversed.reverse();
    let backward = standing(&reversed);
    let (a, b) = (forward.counts_at(T0 + 5 * HOUR, decay()), backward.counts_at(T0 + 5 * HOUR, decay()));
    for o in Observed::ALL {
        assert!((a.get(o) - b.get(o)).abs() < 1e-9, "{o}: {} vs {}", a.get(o), b.get(o));
    }
}

#[test]
fn since_a_snapshot_is_what_was_recorded_after_it() {
    let mut s = standing(&many(Observed::Outvoted, 10, T0));
    let snapshot = s;
    s.record(Observed::Agreed, T0 + HOUR, decay());
    s.record(Observed::Outvoted, T0 + HOUR, decay());
    let since = s.since(&snapshot, decay()).counts_at(T0 + HOUR, decay());
    assert!((since.outvoted - 1.0).abs() < 1e-9 && (since.agreed - 1.0).abs() < 1e-9, "{since:?}");
}

#[test]
fn quarantine_needs_both_the_share_and_enough_compared_results() {
    let rule = QuarantineRule::new(0.1, 10.0).unwrap();
    let new_node_one_bad = Counts { outvoted: 1.0, ..Default::default() };
    assert!(!rule.trips(&new_node_one_bad), "one bad result does not quarantine a new node");
    let liar = Counts { agreed: 7.0, outvoted: 3.0, ..Default::default() };
    assert!(rule.trips(&liar));
    let a_second_later = standing(&[many(Observed::Agreed, 7, T0), many(Observed::Outvoted, 3, T0 + 1000)].concat());
    assert!(rule.trips(&a_second_later.counts_at(T0 + 1000, decay())), "ten results made a second apart count as ten");
    assert_eq!(rule.explain(&liar), "3.0 of 10.0 compared results outvoted (30%, limit 10% over at least 10)");
    let honest_but_flaky = Counts { agreed: 99.0, outvoted: 1.0, ..Default::default() };
    assert!(!rule.trips(&honest_but_flaky));
    let at_the_limit = Counts { agreed: 9.0, outvoted: 1.0, ..Default::default() };
    assert!(!rule.trips(&at_the_limit), "the share must exceed the limit");
    let unverified = Counts { unverified: 1000.0, outvoted: 2.0, agreed: 7.0, ..Default::default() };
    assert!(!rule.trips(&unverified), "unchecked results neither count towards the minimum nor dilute the share");
}

#[test]
fn a_liars_quarantine_share_does_not_fade_with_time() {
    // Decay shrinks every count alike: the share stays, only the evidence thins.
    let mut events = many(Observed::Agreed, 14, T0);
    events.extend(many(Observed::Outvoted, 6, T0));
    let s = standing(&events);
    let rule = QuarantineRule::default();
    assert!(rule.trips(&s.counts_at(T0, decay())));
    let later = s.counts_at(T0 + 2 * HOUR, decay());
    assert!((later.outvoted_share() - 0.3).abs() < 1e-9);
    assert!(!rule.trips(&later), "5 compared results are under the minimum: the operator keeps a quarantine sticky itself");
}

#[test]
fn bad_settings_are_refused_with_the_value() {
    assert!(Decay::new(Duration::from_secs(5)).unwrap_err().contains("5s is too short"));
    assert_eq!(Decay::default().half_life(), Duration::from_secs(7 * 24 * 3600));
    assert_eq!(decay().window_ms(), 5 * HOUR);
    assert!(QuarantineRule::new(1.0, 10.0).unwrap_err().contains("share 1"));
    assert!(QuarantineRule::new(0.1, 0.0).unwrap_err().contains("at least 1"));
    assert!(QuarantineRule::new(0.1, f64::NAN).is_err());
}
