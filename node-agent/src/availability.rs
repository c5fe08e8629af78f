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

    /// A load source the test sets by hand.
    struct FakeLoad(Arc<std::sync::Mutex<Sample>>);

    impl LoadSource for FakeLoad {
        fn sample(&mut self) -> Sample {
            *self.0.lock().unwrap()
        }
    }

    struct NoModules;
    #[tonic::async_trait]
    impl crate::tasks::ModuleSource for NoModules {
        async fn fetch(&self, _: &str) -> Result<Vec<u8>, String> {
            Err("offline".into())
        }
    }

    fn sleeper(id: &str) -> kommune_proto::v1::Assign {
        use kommune_proto::v1::{ExecWorkload, Workload, workload::Kind};
        let command = ["sleep", "30"].iter().map(|s| s.to_string()).collect();
        kommune_proto::v1::Assign {
            attempt_id: id.into(),
            job: "ns/j".into(),
            workload: Some(Workload { kind: Some(Kind::Exec(ExecWorkload { command, env: Default::default() })) }),
            memory_bytes: 64 << 20,
            cpu_millis: 100,
            timeout_millis: 60_000,
            ..Default::default()
        }
    }

    struct Agent {
        _dir: tempfile::TempDir,
        tasks: Arc<Tasks>,
        updates: tokio::sync::mpsc::UnboundedReceiver<kommune_proto::v1::TaskUpdate>,
        available: watch::Receiver<Availability>,
        status_dir: PathBuf,
    }

    /// Tasks (exec allowed) and a running watcher over `gate`.
    fn agent(gate: Gate) -> Agent {
        use crate::runtime::{ExecRuntime, WasmRuntime};
        let dir = tempfile::tempdir().unwrap();
        let spool = crate::tasks::Spool::open(dir.path().join("results")).unwrap();
        let (tasks, updates) = Tasks::new(WasmRuntime::new().unwrap(), ExecRuntime::new(true), spool, dir.path().join("scratch"));
        let (tx, available) = watch::channel(gate.initial(false));
        let status = Arc::new(StatusFile::new(dir.path().to_path_buf(), Default::default()));
        tokio::spawn(watch(gate, dir.path().join("paused"), tasks.clone(), tx, status));
        let status_dir = dir.path().to_path_buf();
        Agent { _dir: dir, tasks, updates, available, status_dir }
    }

    async fn next_update(a: &mut Agent) -> kommune_proto::v1::TaskUpdate {
        tokio::time::timeout(Duration::from_secs(10), a.updates.recv()).await.expect("an update within 10s").unwrap()
    }

    async fn wait_until(a: &mut Agent, want: impl Fn(&Availability) -> bool) -> Availability {
        let seen = tokio::time::timeout(Duration::from_secs(10), a.available.wait_for(|v| want(v))).await.expect("the state within 10s").unwrap();
        seen.clone()
    }

    fn fast(mut gate: Gate) -> Gate {
        gate.tick = Duration::from_millis(10);
        gate.sample_every = Duration::from_millis(10);
        gate
    }

    #[tokio::test]
    async fn a_busy_owner_pauses_the_machine_and_hands_running_work_back_as_preempted() {
        use kommune_proto::v1::AttemptState;
        let load = Arc::new(std::sync::Mutex::new(Sample { other_cpu_percent: Some(5.0), ..Default::default() }));
        let policy = IdlePolicy::new(crate::idle::IdleConfig { resume_after: Duration::from_millis(100), ..Default::default() });
        let mut a = agent(fast(Gate::new(vec![], false, Some((policy, Box::new(FakeLoad(load.clone())))))));
        a.tasks.assign(sleeper("u.1.1"), Arc::new(NoModules));
        assert_eq!(next_update(&mut a).await.state, AttemptState::Running as i32);
        assert!(!a.available.borrow().paused);

        // The owner starts working: two busy samples in a row.
        load.lock().unwrap().other_cpu_percent = Some(63.0);
        let paused = wait_until(&mut a, |v| v.paused).await;
        assert_eq!(paused, Availability { paused: true, preempting: true, reason: "owner busy (cpu 63% > 30%)".into() });
        let done = next_update(&mut a).await;
        assert_eq!(done.state, AttemptState::Preempted as i32, "{:?}", done.result);
        assert_eq!(done.result.unwrap().message, "preempted: the provider needs the machine back (owner busy (cpu 63% > 30%))");
        assert!(a.tasks.running_ids().is_empty());
        let status = crate::status::AgentStatus::load(&a.status_dir).unwrap();
        assert_eq!((status.paused, status.preempting, status.pause_reason.as_str()), (true, true, "owner busy (cpu 63% > 30%)"));
        assert!(status.owner.starts_with("cpu 63% by other programs"), "{}", status.owner);

        // Work that arrives meanwhile (the operator had not heard yet) goes straight back.
        a.tasks.assign(sleeper("u.2.1"), Arc::new(NoModules));
        assert_eq!(next_update(&mut a).await.state, AttemptState::Running as i32);
        assert_eq!(next_update(&mut a).await.state, AttemptState::Preempted as i32);

        // The owner leaves: after resume_after of calm the machine takes work again.
        load.lock().unwrap().other_cpu_percent = Some(2.0);
        let back = wait_until(&mut a, |v| !v.paused).await;
        assert_eq!(back, Availability::default());
        a.tasks.assign(sleeper("u.3.1"), Arc::new(NoModules));
        assert_eq!(next_update(&mut a).await.state, AttemptState::Running as i32);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(a.tasks.running_ids(), vec!["u.3.1".to_string()], "not preempted");
        a.tasks.cancel("u.3.1");
    }

    #[tokio::test]
    async fn a_closing_window_lets_tasks_finish_unless_preempt_is_set() {
        use kommune_proto::v1::AttemptState;
        for preempt in [false, true] {
            let now = Arc::new(std::sync::Mutex::new((0u8, 12 * 60u16)));
            let mut gate = fast(Gate::new(vec![Window::parse("Mon 09:00-17:00").unwrap()], preempt, None));
            let clock = now.clone();
            gate.clock = Box::new(move || *clock.lock().unwrap());
            let mut a = agent(gate);
            a.tasks.assign(sleeper("u.1.1"), Arc::new(NoModules));
            assert_eq!(next_update(&mut a).await.state, AttemptState::Running as i32);
            *now.lock().unwrap() = (0, 17 * 60);
            let closed = wait_until(&mut a, |v| v.paused).await;
            assert_eq!(closed.reason, "outside time window Mon 09:00-17:00");
            assert_eq!(closed.preempting, preempt);
            if preempt {
                assert_eq!(next_update(&mut a).await.state, AttemptState::Preempted as i32);
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(a.tasks.running_ids(), vec!["u.1.1".to_string()], "it finishes in its own time");
                a.tasks.cancel("u.1.1");
                assert_eq!(next_update(&mut a).await.state, AttemptState::Cancelled as i32);
            }
        }
    }

    #[test]
    fn samples_read_like_a_sentence() {
        let s = Sample { other_cpu_percent: Some(12.4), input_idle: Some(Duration::from_secs(40)), on_battery: Some(false) };
        assert_eq!(describe_sample(&s), "cpu 12% by other programs, input 40s ago, on mains");
        assert_eq!(describe_sample(&Sample::default()), "cpu not measured yet, no detectable input");
    }
}
