//! Idle-only mode: whether the machine's owner needs it back. A [`LoadSource`] takes samples (the
//! machine's own reads `/proc` and `/sys`; tests drive a fake), and the pure [`IdlePolicy`] turns
//! them into [`Owner::Idle`] or [`Owner::Busy`] with hysteresis, so one spike preempts nothing.
//!
//! What the machine source detects, and what it cannot:
//! - CPU load of everything except the agent, its threads (wasm), its child processes (exec) and
//!   the processes of its running containers (by their cgroup), from `/proc/stat` and
//!   `/proc/<pid>/stat`. A child that exits between two samples is counted as foreign for that one
//!   sample; the default of two busy samples in a row absorbs it.
//! - Keyboard and mouse input on terminals (the access time of `/dev/tty*` and `/dev/pts/*`,
//!   which the kernel updates on input; this is what `w` shows as IDLE) and on PS/2 devices,
//!   which include most laptops' built-in keyboard and touchpad (the `i8042` lines of
//!   `/proc/interrupts`).
//! - Not detected: USB and Bluetooth keyboards and mice in a graphical session (their interrupts
//!   are shared with every other USB device, and the desktop's idle time is only told to the
//!   session, not to a system service). Pair idle-only with the CPU threshold or time windows
//!   on such desktops.
//! - On battery: `/sys/class/power_supply` (a Mains or USB supply online means on mains; device
//!   batteries such as a wireless mouse's are ignored).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// One look at the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// CPU used by everything but the agent and its tasks since the last sample, in percent of
    /// the whole machine; None on the first sample.
    pub other_cpu_percent: Option<f64>,
    /// Time since the last user input seen; None when no input source is detectable.
    pub input_idle: Option<Duration>,
    /// Some(true) on battery, Some(false) on mains, None when the machine has no battery.
    pub on_battery: Option<bool>,
}

/// Where samples come from.
pub trait LoadSource: Send {
    fn sample(&mut self) -> Sample;
}

/// The provider's idle-only settings.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleConfig {
    /// Foreign CPU load (percent of the machine) above which the owner counts as busy.
    pub cpu_threshold_percent: f64,
    /// Input more recent than this means the owner is at the machine.
    pub input_idle: Duration,
    /// Running on battery counts as busy.
    pub pause_on_battery: bool,
    /// This many busy CPU samples in a row make the owner busy (input and battery act at once).
    pub busy_samples: u32,
    /// The owner must look idle this long before tasks come back.
    pub resume_after: Duration,
}

impl Default for IdleConfig {
    fn default() -> Self {
        Self {
            cpu_threshold_percent: 30.0,
            input_idle: Duration::from_secs(300),
            pause_on_battery: true,
            busy_samples: 2,
            resume_after: Duration::from_secs(120),
        }
    }
}

/// The settings in one line, as `kommune-agent config check` and `status` show them:
/// "busy above 30% cpu, input within 300s, on battery; back after 120s idle".
impl fmt::Display for IdleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let battery = if self.pause_on_battery { ", on battery" } else { "" };
        write!(
            f,
            "busy above {:.0}% cpu, input within {}s{battery}; back after {}s idle",
            self.cpu_threshold_percent,
            self.input_idle.as_secs(),
            self.resume_after.as_secs()
        )
    }
}

/// Why the owner needs the machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BusyReason {
    Cpu { percent: f64, threshold: f64 },
    Input { ago: Duration, threshold: Duration },
    Battery,
}

impl fmt::Display for BusyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusyReason::Cpu { percent, threshold } => write!(f, "owner busy (cpu {percent:.0}% > {threshold:.0}%)"),
            BusyReason::Input { ago, threshold } => write!(f, "owner active (input {}s ago, idle means {}s without)", ago.as_secs(), threshold.as_secs()),
            BusyReason::Battery => write!(f, "on battery"),
        }
    }
}

/// The policy's verdict.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Owner {
    Idle,
    Busy(BusyReason),
}

/// Turns samples into a verdict. Pure: the caller passes the time of each sample.
#[derive(Debug, Clone)]
pub struct IdlePolicy {
    config: IdleConfig,
    cpu_busy_in_a_row: u32,
    busy: Option<BusyReason>,
    idle_since: Option<Duration>,
}

impl IdlePolicy {
    pub fn new(config: IdleConfig) -> Self {
        Self { config, cpu_busy_in_a_row: 0, busy: None, idle_since: None }
    }

    pub fn config(&self) -> &IdleConfig {
        &self.config
    }

    /// Takes in a sample taken at `now` (any monotonic clock, e.g. time since start).
    pub fn observe(&mut self, now: Duration, s: &Sample) -> Owner {
        let c = &self.config;
        match s.other_cpu_percent {
            Some(p) if p > c.cpu_threshold_percent => self.cpu_busy_in_a_row = self.cpu_busy_in_a_row.saturating_add(1),
            _ => self.cpu_busy_in_a_row = 0,
        }
        let reason = if let Some(ago) = s.input_idle.filter(|ago| *ago < c.input_idle) {
            Some(BusyReason::Input { ago, threshold: c.input_idle })
        } else if c.pause_on_battery && s.on_battery == Some(true) {
            Some(BusyReason::Battery)
        } else if self.cpu_busy_in_a_row >= c.busy_samples.max(1) {
            Some(BusyReason::Cpu { percent: s.other_cpu_percent.unwrap_or_default(), threshold: c.cpu_threshold_percent })
        } else {
            None
        };
        match (reason, self.busy) {
            (Some(r), _) => {
                self.busy = Some(r);
                self.idle_since = None;
            }
            (None, Some(_)) => {
                let since = *self.idle_since.get_or_insert(now);
                if now.saturating_sub(since) >= c.resume_after {
                    self.busy = None;
                    self.idle_since = None;
                }
            }
            (None, None) => {}
        }
        self.busy.map_or(Owner::Idle, Owner::Busy)
    }
}

/// Aggregate CPU time from `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub total: u64,
    pub idle: u64,
}

/// The `cpu ` line of `/proc/stat`: idle includes iowait; guest time is already in user time.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    let total = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes { total, idle })
}

/// The fields of `/proc/<pid>/stat` the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub ppid: u32,
    /// User plus system time, in clock ticks (threads included).
    pub ticks: u64,
    /// Start time in ticks after boot: with the pid, identifies a process across pid reuse.
    pub start: u64,
}

/// Parses `/proc/<pid>/stat`; the command name may hold spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parse_pid_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(3) ppid(4) ... utime(14) stime(15) ... starttime(22).
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    Some(ProcStat { ppid: u32::try_from(num(1)?).ok()?, ticks: num(11)? + num(12)?, start: num(19)? })
}

/// Total interrupts from PS/2 keyboards and touchpads (`i8042`) in `/proc/interrupts`; None
/// when the machine has none.
pub fn parse_input_interrupts(text: &str) -> Option<u64> {
    let mut found = None;
    for line in text.lines().skip(1) {
        if !line.contains("i8042") {
            continue;
        }
        let counts: u64 = line.split_whitespace().skip(1).map_while(|f| f.parse::<u64>().ok()).sum();
        *found.get_or_insert(0) += counts;
    }
    found
}

/// One entry of `/sys/class/power_supply`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerSupply {
    /// `Mains`, `USB`, `Battery`, ...
    pub kind: String,
    /// `online` for mains and USB supplies.
    pub online: Option<bool>,
    /// `status` for batteries: `Charging`, `Discharging`, `Full`, ...
    pub status: String,
    /// `Device` for a peripheral's battery (a mouse), `System` or empty for the machine's.
    pub scope: String,
}

/// Whether the machine runs on battery; None without a system battery.
pub fn on_battery(supplies: &[PowerSupply]) -> Option<bool> {
    let batteries: Vec<&PowerSupply> = supplies.iter().filter(|s| s.kind == "Battery" && s.scope != "Device").collect();
    if batteries.is_empty() {
        return None;
    }
    let external: Vec<&PowerSupply> = supplies.iter().filter(|s| s.kind != "Battery").collect();
    if external.iter().any(|s| s.online == Some(true)) {
        return Some(false);
    }
    if !external.is_empty() && external.iter().all(|s| s.online == Some(false)) {
        return Some(true);
    }
    Some(batteries.iter().any(|b| b.status == "Discharging"))
}

/// Ids of the containers the agent runs right now, so their processes count as the agent's.
pub type ContainerIds = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Samples this machine (Linux; elsewhere every field stays unknown).
pub struct MachineLoad {
    proc_dir: PathBuf,
    agent_pid: u32,
    containers: ContainerIds,
    last_cpu: Option<CpuTimes>,
    last_ticks: HashMap<u32, (u64, u64)>,
    last_irq: Option<u64>,
    last_irq_change: Option<Instant>,
}

impl MachineLoad {
    pub fn new(containers: ContainerIds) -> Self {
        Self {
            proc_dir: PathBuf::from("/proc"),
            agent_pid: std::process::id(),
            containers,
            last_cpu: None,
            last_ticks: HashMap::new(),
            last_irq: None,
            last_irq_change: None,
        }
    }

    /// Ticks used by the agent's processes since the last sample.
    fn agent_ticks(&mut self) -> u64 {
        let Ok(entries) = std::fs::read_dir(&self.proc_dir) else { return 0 };
        let mut all: HashMap<u32, ProcStat> = HashMap::new();
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(s) = std::fs::read_to_string(e.path().join("stat")).ok().and_then(|t| parse_pid_stat(&t)) {
                all.insert(pid, s);
            }
        }
        let ids = (self.containers)();
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (pid, s) in &all {
            children.entry(s.ppid).or_default().push(*pid);
        }
        let mut roots = vec![self.agent_pid];
        if !ids.is_empty() {
            for pid in all.keys() {
                let cgroup = std::fs::read_to_string(self.proc_dir.join(pid.to_string()).join("cgroup")).unwrap_or_default();
                if ids.iter().any(|id| id.len() >= 12 && cgroup.contains(id.as_str())) {
                    roots.push(*pid);
                }
            }
        }
        let mut ours = HashSet::new();
        while let Some(pid) = roots.pop() {
            if ours.insert(pid) {
                roots.extend(children.get(&pid).into_iter().flatten().copied());
            }
        }
        let mut used = 0;
        let mut now = HashMap::new();
        for pid in ours {
            let Some(s) = all.get(&pid) else { continue };
            used += match self.last_ticks.get(&pid) {
                Some((start, ticks)) if *start == s.start => s.ticks.saturating_sub(*ticks),
                // New since the last sample (or the pid was reused): all of its time is recent.
                _ if self.last_cpu.is_some() => s.ticks,
                _ => 0,
            };
            now.insert(pid, (s.start, s.ticks));
        }
        self.last_ticks = now;
        used
    }

    fn cpu(&mut self) -> Option<f64> {
        let times = parse_proc_stat(&std::fs::read_to_string(self.proc_dir.join("stat")).ok()?)?;
        let agent = self.agent_ticks();
        let last = self.last_cpu.replace(times)?;
        let total = times.total.saturating_sub(last.total);
        if total == 0 {
            return Some(0.0);
        }
        let busy = total.saturating_sub(times.idle.saturating_sub(last.idle));
        Some((busy.saturating_sub(agent) as f64 * 100.0 / total as f64).clamp(0.0, 100.0))
    }

    fn input_idle(&mut self) -> Option<Duration> {
        let mut latest: Option<SystemTime> = None;
        for dir in ["/dev", "/dev/pts"] {
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let terminal = if dir == "/dev" {
                    name.strip_prefix("tty").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                } else {
                    name.bytes().all(|b| b.is_ascii_digit())
                };
                if let Some(t) = terminal.then(|| e.metadata().and_then(|m| m.accessed()).ok()).flatten() {
                    latest = latest.max(Some(t));
                }
            }
        }
        let mut idle = latest.map(|t| SystemTime::now().duration_since(t).unwrap_or_default());
        if let Some(count) = std::fs::read_to_string(self.proc_dir.join("interrupts")).ok().and_then(|t| parse_input_interrupts(&t)) {
            if self.last_irq.is_some_and(|last| last != count) {
                self.last_irq_change = Some(Instant::now());
            }
            self.last_irq = Some(count);
            // Unknown until the count moves; the owner may have typed long ago.
            if let Some(changed) = self.last_irq_change {
                idle = Some(idle.map_or(changed.elapsed(), |i| i.min(changed.elapsed())));
            }
        }
        idle
    }
}

/// Reads `/sys/class/power_supply/*`.
pub fn power_supplies(dir: &Path) -> Vec<PowerSupply> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let read = |p: &Path, f: &str| std::fs::read_to_string(p.join(f)).map(|s| s.trim().to_string()).unwrap_or_default();
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            let online = match read(&p, "online").as_str() {
                "1" => Some(true),
                "0" => Some(false),
                _ => None,
            };
            PowerSupply { kind: read(&p, "type"), online, status: read(&p, "status"), scope: read(&p, "scope") }
        })
        .collect()
}

impl LoadSource for MachineLoad {
    fn sample(&mut self) -> Sample {
        Sample { other_cpu_percent: self.cpu(), input_idle: self.input_idle(), on_battery: on_battery(&power_supplies(Path::new("/sys/class/power_supply"))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_read_as_one_line() {
        assert_eq!(IdleConfig::default().to_string(), "busy above 30% cpu, input within 300s, on battery; back after 120s idle");
        let mains_only = IdleConfig { pause_on_battery: false, cpu_threshold_percent: 12.4, ..Default::default() };
        assert_eq!(mains_only.to_string(), "busy above 12% cpu, input within 300s; back after 120s idle");
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn cpu(p: f64) -> Sample {
        Sample { other_cpu_percent: Some(p), ..Default::default() }
    }

    /// Feeds samples 5 s apart and returns the verdict after each.
    fn run(config: IdleConfig, samples: &[Sample]) -> Vec<Owner> {
        let mut policy = IdlePolicy::new(config);
        samples.iter().enumerate().map(|(i, s)| policy.observe(secs(5 * i as u64), s)).collect()
    }

    fn busy_cpu(percent: f64) -> Owner {
        Owner::Busy(BusyReason::Cpu { percent, threshold: 30.0 })
    }

    #[test]
    fn one_cpu_spike_preempts_nothing_two_in_a_row_do() {
        let v = run(IdleConfig::default(), &[cpu(10.0), cpu(80.0), cpu(10.0), cpu(63.0), cpu(70.0), cpu(20.0)]);
        assert_eq!(v[..4], [Owner::Idle, Owner::Idle, Owner::Idle, Owner::Idle]);
        assert_eq!(v[4], busy_cpu(70.0));
        assert_eq!(v[5], busy_cpu(70.0), "stays busy until idle long enough");
        assert_eq!(BusyReason::Cpu { percent: 63.4, threshold: 30.0 }.to_string(), "owner busy (cpu 63% > 30%)");
    }

    #[test]
    fn the_machine_comes_back_only_after_resume_after_of_calm() {
        let config = IdleConfig { resume_after: secs(20), ..Default::default() };
        // Busy at t=5; calm from t=10; back at t=30 (20 s after the first calm sample).
        let v = run(config, &[cpu(90.0), cpu(90.0), cpu(0.0), cpu(0.0), cpu(0.0), cpu(0.0), cpu(0.0)]);
        let idle: Vec<bool> = v.iter().map(|o| *o == Owner::Idle).collect();
        assert_eq!(idle, [true, false, false, false, false, false, true]);
        // A busy sample during the calm restarts the wait.
        let config = IdleConfig { resume_after: secs(10), busy_samples: 1, ..Default::default() };
        let v = run(config, &[cpu(90.0), cpu(0.0), cpu(40.0), cpu(0.0), cpu(0.0), cpu(0.0)]);
        let idle: Vec<bool> = v.iter().map(|o| *o == Owner::Idle).collect();
        assert_eq!(idle, [false, false, false, false, false, true]);
    }

    #[test]
    fn input_and_battery_act_at_once_and_unknowns_never_mean_busy() {
        let table: &[(Sample, Owner)] = &[
            (Sample { input_idle: Some(secs(12)), ..Default::default() }, Owner::Busy(BusyReason::Input { ago: secs(12), threshold: secs(300) })),
            (Sample { input_idle: Some(secs(301)), ..Default::default() }, Owner::Idle),
            (Sample { on_battery: Some(true), ..Default::default() }, Owner::Busy(BusyReason::Battery)),
            (Sample { on_battery: Some(false), ..Default::default() }, Owner::Idle),
            (Sample::default(), Owner::Idle),
            (cpu(30.0), Owner::Idle),
        ];
        for (sample, want) in table {
            assert_eq!(run(IdleConfig { busy_samples: 1, ..Default::default() }, &[*sample])[0], *want, "{sample:?}");
        }
        let on_battery_allowed = IdleConfig { pause_on_battery: false, ..Default::default() };
        assert_eq!(run(on_battery_allowed, &[Sample { on_battery: Some(true), ..Default::default() }])[0], Owner::Idle);
        let text = BusyReason::Input { ago: secs(12), threshold: secs(300) }.to_string();
        assert_eq!(text, "owner active (input 12s ago, idle means 300s without)");
    }

    #[test]
    fn proc_stat_counts_iowait_as_idle() {
        let text = "cpu  1109787 103261 150398 735278 10684 0 1648 1336 0 0\ncpu0 557217 53925 75929 362174 5733 0 600 654 0 0\nintr 1 2\n";
        assert_eq!(parse_proc_stat(text), Some(CpuTimes { total: 1109787 + 103261 + 150398 + 735278 + 10684 + 1648 + 1336, idle: 735278 + 10684 }));
        assert_eq!(parse_proc_stat("cpu  1 2\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 x 3 4\n"), None);
        assert_eq!(parse_proc_stat(""), None);
    }

    #[test]
    fn pid_stat_survives_odd_command_names() {
        let text = "3912 (we ird) proc)) R 3867 3867 28412 0 -1 4194304 99 0 0 0 7 5 3 2 20 0 1 0 1059449 3133440 412";
        assert_eq!(parse_pid_stat(text), Some(ProcStat { ppid: 3867, ticks: 12, start: 1059449 }));
        assert_eq!(parse_pid_stat("3912 (cat) R 3867"), None);
        assert_eq!(parse_pid_stat("garbage"), None);
    }

    #[test]
    fn only_ps2_input_interrupts_are_counted() {
        let text = "           CPU0       CPU1\n  1:       9180          0  IR-IO-APIC    1-edge      i8042\n 12:     420716       3000  IR-IO-APIC   12-edge      i8042\n 26:          0          7  IO-APIC   4-edge      ttyS0\n";
        assert_eq!(parse_input_interrupts(text), Some(9180 + 420716 + 3000));
        assert_eq!(parse_input_interrupts("           CPU0\n 26:  0  IO-APIC 4-edge ttyS0\n"), None);
    }

    #[test]
    fn battery_state_comes_from_mains_first_then_the_battery() {
        let mains = |online| PowerSupply { kind: "Mains".into(), online: Some(online), ..Default::default() };
        let battery = |status: &str| PowerSupply { kind: "Battery".into(), status: status.into(), scope: "System".into(), ..Default::default() };
        let mouse = PowerSupply { kind: "Battery".into(), status: "Discharging".into(), scope: "Device".into(), ..Default::default() };
        let table: Vec<(Vec<PowerSupply>, Option<bool>)> = vec![
            (vec![], None),
            (vec![mains(true)], None),
            (vec![mouse.clone()], None),
            (vec![mains(true), battery("Discharging")], Some(false)),
            (vec![mains(false), battery("Full")], Some(true)),
            (vec![battery("Discharging")], Some(true)),
            (vec![battery("Charging"), mouse], Some(false)),
        ];
        for (supplies, want) in table {
            assert_eq!(on_battery(&supplies), want, "{supplies:?}");
        }
    }

    #[test]
    fn the_machine_source_measures_this_machine() {
        let mut load = MachineLoad::new(Arc::new(Vec::new));
        let first = load.sample();
        assert_eq!(first.other_cpu_percent, None, "the first sample has nothing to compare with");
        std::thread::sleep(Duration::from_millis(50));
        if Path::new("/proc/stat").exists() {
            let p = load.sample().other_cpu_percent.expect("a second sample measures");
            assert!((0.0..=100.0).contains(&p), "{p}");
        }
    }
}
