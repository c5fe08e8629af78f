//! What an attempt used, from the operating system's own accounting: the thread CPU clock and
//! wasmtime's fuel and linear-memory account for wasm; for exec, the task's process as the
//! kernel leaves it at exit (`/proc/<pid>/stat` of the not-yet-reaped leader, whose `cutime`
//! and `cstime` already include every descendant it waited for) plus resident memory sampled
//! over the process tree while it runs. No estimates: what cannot be measured stays zero and
//! `source` says how the figures were obtained.

use std::path::Path;
use std::time::{Duration, Instant};

use kommune_proto::v1::Usage;

/// Clock ticks per second in `/proc/<pid>/stat`: USER_HZ, which Linux fixes at 100 for
/// userspace whatever the kernel's internal HZ.
const USER_HZ: u64 = 100;

/// Usage figures of one attempt (wall time and output size come from the [`super::Outcome`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Measured {
    pub cpu_micros: u64,
    pub memory_peak_bytes: u64,
    /// Memory integrated over time, MiB x ms.
    pub memory_mib_millis: u64,
    pub wasm_fuel: u64,
    pub gpu_millis: u64,
    /// "wasm-thread", "proc", "engine-stats", or "none".
    pub source: &'static str,
}

impl Measured {
    /// Nothing ran, so nothing was used.
    pub fn none() -> Self {
        Measured { source: "none", ..Default::default() }
    }

    /// The protocol form, with the outcome's wall time and output size.
    pub fn to_usage(&self, wall: Duration, output_bytes: u64) -> Usage {
        Usage {
            wall_millis: wall.as_millis().try_into().unwrap_or(u64::MAX),
            cpu_micros: self.cpu_micros,
            memory_peak_bytes: self.memory_peak_bytes,
            memory_mib_millis: self.memory_mib_millis,
            wasm_fuel: self.wasm_fuel,
            gpu_millis: self.gpu_millis,
            output_bytes,
            source: self.source.to_string(),
        }
    }
}

/// Integrates a memory level that changes in steps: each level counts for the time until the
/// next change. Tracks the peak too.
#[derive(Debug, Clone)]
pub(crate) struct MemoryIntegral {
    since: Instant,
    level: u64,
    peak: u64,
    byte_millis: u128,
}

impl MemoryIntegral {
    pub(crate) fn new(now: Instant) -> Self {
        MemoryIntegral { since: now, level: 0, peak: 0, byte_millis: 0 }
    }

    /// The level is `bytes` from `now` on.
    pub(crate) fn set(&mut self, now: Instant, bytes: u64) {
        self.close(now);
        self.level = bytes;
        self.peak = self.peak.max(bytes);
    }

    /// Raises the peak without changing the level (a high-water mark read from the kernel).
    pub(crate) fn observe_peak(&mut self, bytes: u64) {
        self.peak = self.peak.max(bytes);
    }

    fn close(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.since).as_millis();
        self.byte_millis += self.level as u128 * elapsed;
        self.since = self.since.max(now);
    }

    /// (peak bytes, MiB x ms) up to `now`.
    pub(crate) fn finish(mut self, now: Instant) -> (u64, u64) {
        self.close(now);
        (self.peak, u64::try_from(self.byte_millis >> 20).unwrap_or(u64::MAX))
    }
}

/// CPU times of a process from `/proc/<pid>/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcTimes {
    pub utime: u64,
    pub stime: u64,
    /// Of children the process waited for.
    pub cutime: u64,
    pub cstime: u64,
}

impl ProcTimes {
    /// Own and waited-for children's CPU time, in microseconds.
    pub(crate) fn total_micros(&self) -> u64 {
        (self.utime + self.stime + self.cutime + self.cstime).saturating_mul(1_000_000 / USER_HZ)
    }
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so fields are counted after the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcTimes> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the name: state(3) ppid(4) pgrp(5) session(6) tty(7) tpgid(8) flags(9) minflt(10)
    // cminflt(11) majflt(12) cmajflt(13) utime(14) stime(15) cutime(16) cstime(17).
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<i64>().ok().map(|v| v.max(0) as u64);
    Some(ProcTimes { utime: field(14)?, stime: field(15)?, cutime: field(16)?, cstime: field(17)? })
}

/// A `kB` figure from `/proc/<pid>/status` ("VmRSS:\t  1234 kB"), in bytes.
pub(crate) fn status_bytes(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = value.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib.saturating_mul(1024))
    })
}

/// Direct children of `pid` from `/proc/<pid>/task/*/children` (empty when unreadable).
fn children(proc: &Path, pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(proc.join(pid.to_string()).join("task")) else { return vec![] };
    let mut out = vec![];
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(text.split_ascii_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// Resident memory of `root` and its descendants, and the highest high-water mark among them
/// (the leader may be the small exec-sandbox supervisor; the command's own peak is what counts).
pub(crate) fn tree_memory(proc: &Path, root: u32) -> (u64, u64) {
    let mut rss = 0;
    let mut hwm = 0;
    let mut stack = vec![root];
    let mut seen = 0;
    while let Some(pid) = stack.pop() {
        seen += 1;
        if seen > 4096 {
            break;
        }
        let Ok(status) = std::fs::read_to_string(proc.join(pid.to_string()).join("status")) else { continue };
        rss += status_bytes(&status, "VmRSS").unwrap_or(0);
        hwm = hwm.max(status_bytes(&status, "VmHWM").unwrap_or(0));
        stack.extend(children(proc, pid));
    }
    (rss, hwm)
}

/// CPU time of a process, read from `/proc`.
pub(crate) fn proc_times(proc: &Path, pid: u32) -> Option<ProcTimes> {
    parse_stat(&std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?)
}

/// CPU time the calling thread has used so far.
pub(crate) fn thread_cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map(Duration::from).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from a Linux 6.1 x86_64 machine: `sh -c 'echo a) b'` style names included.
    const STAT: &str = "4242 (my (odd) cmd) S 4200 4242 4200 0 -1 4194304 1000 20 0 0 150 37 12 3 20 0 1 0 123456 12345678 567 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
    const STATUS: &str = "Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t    8404 kB\nVmHWM:\t     980 kB\nVmRSS:\t     964 kB\nThreads:\t1\n";

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let t = parse_stat(STAT).unwrap();
        assert_eq!(t, ProcTimes { utime: 150, stime: 37, cutime: 12, cstime: 3 });
        assert_eq!(t.total_micros(), 202 * 10_000);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn status_figures_are_read_in_bytes() {
        assert_eq!(status_bytes(STATUS, "VmRSS"), Some(964 * 1024));
        assert_eq!(status_bytes(STATUS, "VmHWM"), Some(980 * 1024));
        assert_eq!(status_bytes(STATUS, "VmSwap"), None);
        assert_eq!(status_bytes("VmRSS:\tlots kB\n", "VmRSS"), None);
    }

    #[test]
    fn memory_is_integrated_as_steps_and_the_peak_kept() {
        let t0 = Instant::now();
        let mut m = MemoryIntegral::new(t0);
        m.set(t0, 1 << 20);
        m.set(t0 + Duration::from_millis(1000), 3 << 20);
        m.observe_peak(5 << 20);
        let (peak, mib_ms) = m.finish(t0 + Duration::from_millis(1500));
        assert_eq!(peak, 5 << 20);
        assert_eq!(mib_ms, 1000 + 3 * 500);
        // Time going backwards (a sample taken before the last one) adds nothing.
        let mut m = MemoryIntegral::new(t0 + Duration::from_secs(1));
        m.set(t0, 1 << 20);
        assert_eq!(m.finish(t0 + Duration::from_secs(1)).1, 0);
    }

    #[test]
    fn this_process_can_be_measured() {
        let proc = Path::new("/proc");
        if !proc.join("self").exists() {
            eprintln!("skipped: no /proc");
            return;
        }
        let me = std::process::id();
        let (rss, hwm) = tree_memory(proc, me);
        assert!(rss > 0 && hwm >= rss / 2, "rss {rss} hwm {hwm}");
        assert!(proc_times(proc, me).is_some());
        let before = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > before);
    }
}
