//! The operator's write rate to the API server as a function of the fleet: what
//! docs/PERFORMANCE.md states and the scale scenario prints next to what it measures. Pure.

use std::time::Duration;

/// API writes one joining node costs: its ProviderNode created, its status applied once (the
/// join and the session opening right after it fold into one write), and one Event.
pub const WRITES_PER_JOIN: f64 = 3.0;
/// A session opening or closing: one status apply and one Event.
pub const WRITES_PER_SESSION_CHANGE: f64 = 2.0;

/// What drives writes once the fleet has joined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fleet {
    /// Connected nodes.
    pub nodes: u64,
    /// Of those, nodes whose earnings moved since the last sweep (they ran tasks).
    pub earning: u64,
    /// Sessions opening or closing per second, fleet-wide.
    pub session_changes_per_s: f64,
}

/// The writer's settings that bound its rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// A quiet node's status (its last heartbeat time) is written at most this often.
    pub status_refresh: Duration,
    /// How often the sweep compares every node (earnings are written at most once per sweep).
    pub sweep: Duration,
    /// The client's sustained budget: no rate the model gives exceeds it.
    pub qps: f64,
}

/// Writes per second at steady state: heartbeats write nothing but one refresh per node per
/// `status_refresh`; earning nodes one status write per sweep; session changes two writes each;
/// all capped by the client budget.
pub fn steady_writes_per_s(fleet: Fleet, s: Settings) -> f64 {
    let per = |every: Duration| if every.is_zero() { f64::INFINITY } else { 1.0 / every.as_secs_f64() };
    let quiet = fleet.nodes.saturating_sub(fleet.earning) as f64 * per(s.status_refresh);
    let earning = fleet.earning as f64 * per(s.sweep).max(per(s.status_refresh));
    let sessions = fleet.session_changes_per_s.max(0.0) * WRITES_PER_SESSION_CHANGE;
    (quiet + earning + sessions).min(s.qps.max(0.0))
}

/// The shortest time `joining` new nodes can all be Ready in, given the client budget
/// (`burst` writes at once, then `qps`): the API server's own latency comes on top.
pub fn join_seconds(joining: u64, qps: f64, burst: u32) -> f64 {
    let writes = joining as f64 * WRITES_PER_JOIN;
    let after_burst = (writes - f64::from(burst)).max(0.0);
    if after_burst == 0.0 {
        0.0
    } else if qps <= 0.0 {
        f64::INFINITY
    } else {
        after_burst / qps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: Settings = Settings { status_refresh: Duration::from_secs(300), sweep: Duration::from_secs(10), qps: 200.0 };

    #[test]
    fn ten_thousand_quiet_nodes_write_a_refresh_each_per_interval() {
        let fleet = Fleet { nodes: 10_000, earning: 0, session_changes_per_s: 0.0 };
        let w = steady_writes_per_s(fleet, DEFAULTS);
        assert!((w - 10_000.0 / 300.0).abs() < 1e-9, "{w}");
        assert_eq!(steady_writes_per_s(Fleet { nodes: 0, ..fleet }, DEFAULTS), 0.0);
    }

    #[test]
    fn earning_nodes_write_once_per_sweep_and_session_changes_twice() {
        let fleet = Fleet { nodes: 1_000, earning: 100, session_changes_per_s: 1.5 };
        let expected = 900.0 / 300.0 + 100.0 / 10.0 + 3.0;
        assert!((steady_writes_per_s(fleet, DEFAULTS) - expected).abs() < 1e-9);
        // More earning nodes than nodes: all of them earn, none is counted twice.
        let all = Fleet { nodes: 10, earning: 50, session_changes_per_s: 0.0 };
        assert!((steady_writes_per_s(all, DEFAULTS) - 50.0 / 10.0).abs() < 1e-9);
    }

    #[test]
    fn no_fleet_writes_faster_than_the_client_budget() {
        let storm = Fleet { nodes: 1_000_000, earning: 1_000_000, session_changes_per_s: 1e6 };
        assert_eq!(steady_writes_per_s(storm, DEFAULTS), 200.0);
        let zero = Settings { status_refresh: Duration::ZERO, sweep: Duration::ZERO, qps: 50.0 };
        assert_eq!(steady_writes_per_s(Fleet { nodes: 1, earning: 0, session_changes_per_s: 0.0 }, zero), 50.0);
        assert_eq!(steady_writes_per_s(storm, Settings { qps: -1.0, ..DEFAULTS }), 0.0);
    }

    #[test]
    fn joins_past_the_burst_take_their_writes_over_the_rate() {
        assert_eq!(join_seconds(10, 100.0, 400), 0.0);
        assert!((join_seconds(10_000, 1_000.0, 1_000) - 29.0).abs() < 1e-9);
        assert!((join_seconds(1_000, 500.0, 1_000) - 4.0).abs() < 1e-9);
        assert_eq!(join_seconds(1_000, 0.0, 10), f64::INFINITY);
    }
}
