//! Whether this machine is lent right now, and why not: the provider's pause, the time windows
//! and, in idle-only mode, the owner's own use. [`decide`] is the pure rule; [`watch`] applies it
//! every tick, tells sessions through a `watch` channel and preempts tasks when the owner needs
//! the machine back, also while the agent is disconnected.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::info;

use crate::idle::{IdlePolicy, LoadSource, Owner, Sample};
use crate::schedule::{self, Window};
use crate::status::StatusFile;
use crate::tasks::Tasks;

/// What sessions tell the operator (`paused`) and what `status` shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Availability {
    /// Take nothing new here.
    pub paused: bool,
    /// Running tasks are stopped and handed back, not left to finish.
    pub preempting: bool,
    /// Why paused, for people: "outside time window Mon-Fri 18:00-08:00"; empty when not paused.
    pub reason: String,
}

/// The manual pause: running tasks finish.
pub const MANUAL: &str = "paused by the provider (`kommune-agent resume` undoes it)";

/// The rule. Pure. The owner's need preempts; the provider's pause lets tasks finish; a closed
/// window preempts only when the provider asked for it (`--preempt`).
pub fn decide(manual: bool, in_window: bool, windows: &[Window], preempt_outside: bool, owner: Owner) -> Availability {
    let mut reasons = Vec::new();
    let mut preempting = false;
    if let Owner::Busy(why) = owner {
        reasons.push(why.to_string());
        preempting = true;
    }
    if manual {
        reasons.push(MANUAL.to_string());
    }
    if !in_window {
        reasons.push(format!("outside time window {}", schedule::describe(windows)));
        preempting |= preempt_outside;
    }
    Availability { paused: !reasons.is_empty(), preempting, reason: reasons.join("; ") }
}

/// "cpu 12% by other programs, input 40s ago, on mains": the owner's last sample, for `status`.
pub fn describe_sample(s: &Sample) -> String {
    let mut parts = vec![match s.other_cpu_percent {
        Some(p) => format!("cpu {p:.0}% by other programs"),
        None => "cpu not measured yet".to_string(),
    }];
    parts.push(match s.input_idle {
        Some(ago) => format!("input {}s ago", ago.as_secs()),
        None => "no detectable input".to_string(),
    });
    if let Some(battery) = s.on_battery {
        parts.push(if battery { "on battery" } else { "on mains" }.to_string());
    }
    parts.join(", ")
}

/// What [`watch`] looks at.
pub struct Gate {
    pub windows: Vec<Window>,
    /// Stop running tasks when every window is closed.
    pub preempt_outside_windows: bool,
    /// Idle-only mode: the policy and where its samples come from.
    pub idle: Option<(IdlePolicy, Box<dyn LoadSource>)>,
    /// Local weekday (0 = Monday) and minute of the day.
    pub clock: Box<dyn Fn() -> (u8, u16) + Send>,
    /// How often the pause file and the windows are looked at.
    pub tick: Duration,
    /// How often the load source is sampled.
    pub sample_every: Duration,
}

impl Gate {
    /// The state before the first tick (the owner counts as idle until sampled), so the first
    /// Hello already tells the truth.
    pub fn initial(&self, manually_paused: bool) -> Availability {
        let (day, minute) = (self.clock)();
        decide(manually_paused, schedule::open(&self.windows, day, minute), &self.windows, self.preempt_outside_windows, Owner::Idle)
    }

    /// Only the provider's `pause`/`resume`.
    pub fn manual_only() -> Gate {
        Gate::new(vec![], false, None)
    }

    /// Windows, preemption and idle-only mode with the machine's clock and the usual pace.
    pub fn new(windows: Vec<Window>, preempt_outside_windows: bool, idle: Option<(IdlePolicy, Box<dyn LoadSource>)>) -> Gate {
        Gate {
            windows,
            preempt_outside_windows,
            idle,
            clock: Box::new(schedule::local_now),
            tick: Duration::from_secs(1),
            sample_every: Duration::from_secs(5),
        }
    }
}

/// Applies the gate forever: publishes every change on `tx`, preempts or stops preempting the
/// tasks, and keeps `status.json` current.
pub async fn watch(mut gate: Gate, pause_file: PathBuf, tasks: Arc<Tasks>, tx: watch::Sender<Availability>, status: Arc<StatusFile>) {
    let started = Instant::now();
    let mut applied: Option<Availability> = None;
    let mut owner = Owner::Idle;
    let mut last_sample: Option<Instant> = None;
    let mut tick = tokio::time::interval(gate.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some((policy, source)) = gate.idle.as_mut()
            && last_sample.is_none_or(|t| t.elapsed() >= gate.sample_every)
        {
            last_sample = Some(Instant::now());
            let sample = source.sample();
            owner = policy.observe(started.elapsed(), &sample);
            let seen = describe_sample(&sample);
            status.write(|s| s.owner = seen);
        }
        let (day, minute) = (gate.clock)();
        let now = decide(pause_file.exists(), schedule::open(&gate.windows, day, minute), &gate.windows, gate.preempt_outside_windows, owner);
        if applied.as_ref() == Some(&now) {
            continue;
        }
        let was_preempting = applied.as_ref().is_some_and(|a| a.preempting);
        if now.preempting && !was_preempting {
            tasks.preempt_all(&now.reason);
        } else if !now.preempting && was_preempting {
            tasks.stop_preempting();
        }
        if now.paused {
            info!(reason = %now.reason, preempting = now.preempting, "not taking tasks");
        } else if applied.is_some() {
            info!("taking tasks again");
        }
        status.write(|s| {
            s.paused = now.paused;
            s.preempting = now.preempting;
            s.pause_reason = now.reason.clone();
        });
        tx.send_replace(now.clone());
        applied = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idle::BusyReason;

    fn window(text: &str) -> Vec<Window> {
        vec![Window::parse(text).unwrap()]
    }

    #[test]
    fn the_owner_preempts_the_provider_pauses_and_windows_preempt_only_if_asked() {
        let busy = Owner::Busy(BusyReason::Cpu { percent: 63.0, threshold: 30.0 });
        let ws = window("Mon-Fri 18:00-08:00");
        let table = [
            (false, true, false, Owner::Idle, (false, false, "")),
            (true, true, false, Owner::Idle, (true, false, MANUAL)),
            (false, false, false, Owner::Idle, (true, false, "outside time window Mon-Fri 18:00-08:00")),
            (false, false, true, Owner::Idle, (true, true, "outside time window Mon-Fri 18:00-08:00")),
            (false, true, false, busy, (true, true, "owner busy (cpu 63% > 30%)")),
            (
                true,
                false,
                false,
                busy,
                (true, true, "owner busy (cpu 63% > 30%); paused by the provider (`kommune-agent resume` undoes it); outside time window Mon-Fri 18:00-08:00"),
            ),
        ];
        for (manual, in_window, preempt, owner, (paused, preempting, reason)) in table {
            let a = decide(manual, in_window, &ws, preempt, owner);
            assert_eq!((a.paused, a.preempting, a.reason.as_str()), (paused, preempting, reason), "{manual} {in_window} {preempt} {owner:?}");
        }
    }

    #[test]
    fn samples_read_like_a_sentence() {
        let s = Sample { other_cpu_percent: Some(12.4), input_idle: Some(Duration::from_secs(40)), on_battery: Some(false) };
        assert_eq!(describe_sample(&s), "cpu 12% by other programs, input 40s ago, on mains");
        assert_eq!(describe_sample(&Sample::default()), "cpu not measured yet, no detectable input");
    }
}
