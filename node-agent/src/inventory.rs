//! What this machine offers: CPU, memory, scratch disk and GPUs measured from the machine, each
//! capped (never raised) by the provider's settings, plus the runtimes this agent runs. Admin
//! and provider can only lower what is offered: a cap above the machine is lowered with a warning.

use std::path::Path;

use kommune_proto::quantity::{format_cpu, format_memory};
use kommune_proto::v1::{Capacity, Gpu};

use crate::gpu;

/// Provider-set upper bounds on what is offered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub gpus: Option<u32>,
    pub disk_bytes: Option<u64>,
}

/// Measured machine resources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Machine {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// "Intel(R) Xeon(R) Processor", or the ARM part; empty when unknown.
    pub cpu_model: String,
    /// Free space of the filesystem holding the scratch directories.
    pub disk_bytes: u64,
    pub gpus: Vec<Gpu>,
}

/// What `/proc/cpuinfo` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    /// Logical CPUs (`processor` entries).
    pub logical: u32,
    pub model: String,
}

/// Parses `/proc/cpuinfo` from x86 (`model name`) and arm64 (`CPU implementer`/`CPU part`,
/// and the board's `Model` line when present).
pub fn parse_cpuinfo(text: &str) -> Option<CpuInfo> {
    let field = |name: &str| text.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string()));
    let logical = text.lines().filter(|l| l.split_once(':').is_some_and(|(k, _)| k.trim() == "processor")).count();
    if logical == 0 {
        return None;
    }
    let model = field("model name").or_else(|| field("Model")).unwrap_or_else(|| match (field("CPU implementer"), field("CPU part")) {
        (Some(i), Some(p)) => format!("{} part {p}", if i == "0x41" { "ARM" } else { i.as_str() }),
        _ => String::new(),
    });
    Some(CpuInfo { logical: u32::try_from(logical).ok()?, model })
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// Free bytes for an unprivileged user on the filesystem holding `path` (or its nearest
/// existing parent); 0 when the OS will not say.
pub fn free_disk(path: &Path) -> u64 {
    let Some(existing) = path.ancestors().find(|p| p.exists()) else { return 0 };
    match rustix::fs::statvfs(existing) {
        Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
        Err(_) => 0,
    }
}

/// Measures this machine; `scratch` is where task scratch directories go.
pub fn measure(scratch: &Path) -> Machine {
    // available_parallelism honours CPU affinity and cgroup quotas: what the agent may use.
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| parse_cpuinfo(&t));
    let memory_bytes = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| parse_meminfo(&t)).unwrap_or_else(|| match sysinfo::System::new() {
        Ok(mut sys) => {
            sys.refresh_memory();
            sys.total_memory()
        }
        Err(_) => 0,
    });
    let detected = gpu::detect();
    for note in &detected.notes {
        tracing::debug!(%note, "GPU detection");
    }
    Machine {
        cpu_millis: cpus * 1000,
        memory_bytes,
        cpu_model: cpuinfo.map(|c| c.model).unwrap_or_default(),
        disk_bytes: free_disk(scratch),
        gpus: detected.gpus,
    }
}

/// Runtimes beyond wasm (always offered) that the provider turned on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offered {
    pub exec: bool,
    pub container: bool,
}

/// What to advertise: the machine, lowered to the caps. Pure.
pub fn capacity(machine: &Machine, caps: &Caps, offered: Offered) -> Capacity {
    let mut runtimes = vec![kommune_proto::runtime::WASM.to_string()];
    if offered.exec {
        runtimes.push(kommune_proto::runtime::EXEC.to_string());
    }
    if offered.container {
        runtimes.push(kommune_proto::runtime::CONTAINER.to_string());
    }
    let gpus = caps.gpus.map_or(machine.gpus.len(), |n| (n as usize).min(machine.gpus.len()));
    Capacity {
        cpu_millis: caps.cpu_millis.map_or(machine.cpu_millis, |c| c.min(machine.cpu_millis)),
        memory_bytes: caps.memory_bytes.map_or(machine.memory_bytes, |m| m.min(machine.memory_bytes)),
        runtimes,
        arch: std::env::consts::ARCH.to_string(),
        os: std::env::consts::OS.to_string(),
        gpus: machine.gpus[..gpus].to_vec(),
        ephemeral_storage_bytes: caps.disk_bytes.map_or(machine.disk_bytes, |d| d.min(machine.disk_bytes)),
    }
}

/// One line per cap above what the machine has: it was lowered, and the provider should know.
pub fn cap_warnings(machine: &Machine, caps: &Caps) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |flag: &str, cap: Option<u64>, has: u64, show: &dyn Fn(u64) -> String| {
        if let Some(cap) = cap.filter(|c| *c > has) {
            out.push(format!(
                "{flag} {} is more than this machine has ({}); offering {} (caps can only lower what is offered)",
                show(cap),
                show(has),
                show(has)
            ));
        }
    };
    check("--cpus", caps.cpu_millis, machine.cpu_millis, &format_cpu);
    check("--memory", caps.memory_bytes, machine.memory_bytes, &format_memory);
    check("--max-disk", caps.disk_bytes, machine.disk_bytes, &format_memory);
    check("--max-gpus", caps.gpus.map(u64::from), machine.gpus.len() as u64, &|n| n.to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn gpu(n: u8) -> Gpu {
        Gpu { model: "NVIDIA L4".into(), memory_bytes: 23034 << 20, uuid: format!("GPU-{n}") }
    }

    fn machine() -> Machine {
        Machine { cpu_millis: 4000, memory_bytes: 8 << 30, cpu_model: String::new(), disk_bytes: 100 << 30, gpus: vec![gpu(0), gpu(1)] }
    }

    #[test]
    fn caps_only_lower() {
        let m = machine();
        let c = capacity(&m, &Caps::default(), Offered::default());
        assert_eq!((c.cpu_millis, c.memory_bytes, c.ephemeral_storage_bytes, c.gpus.len()), (4000, 8 << 30, 100 << 30, 2));
        assert_eq!(c.runtimes, vec!["wasm"]);
        let caps = Caps { cpu_millis: Some(1500), memory_bytes: Some(1 << 30), gpus: Some(1), disk_bytes: Some(20 << 30) };
        let c = capacity(&m, &caps, Offered { exec: true, container: false });
        assert_eq!((c.cpu_millis, c.memory_bytes, c.ephemeral_storage_bytes), (1500, 1 << 30, 20 << 30));
        assert_eq!(c.gpus, vec![gpu(0)]);
        assert_eq!(c.runtimes, vec!["wasm", "exec"]);
        assert!(cap_warnings(&m, &caps).is_empty());
        let caps = Caps { cpu_millis: Some(64000), memory_bytes: Some(1 << 40), gpus: Some(8), disk_bytes: Some(1 << 50) };
        let c = capacity(&m, &caps, Offered::default());
        assert_eq!((c.cpu_millis, c.memory_bytes, c.ephemeral_storage_bytes, c.gpus.len()), (4000, 8 << 30, 100 << 30, 2));
        let warnings = cap_warnings(&m, &caps);
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        assert_eq!(warnings[0], "--cpus 64 is more than this machine has (4); offering 4 (caps can only lower what is offered)");
        assert!(warnings[3].starts_with("--max-gpus 8 is more than this machine has (2)"), "{warnings:?}");
    }

    #[test]
    fn no_gpu_is_offered_where_none_was_detected() {
        let m = Machine { gpus: vec![], ..machine() };
        let c = capacity(&m, &Caps { gpus: Some(4), ..Caps::default() }, Offered::default());
        assert!(c.gpus.is_empty());
        assert_eq!(
            cap_warnings(&m, &Caps { gpus: Some(4), ..Caps::default() }),
            vec!["--max-gpus 4 is more than this machine has (0); offering 0 (caps can only lower what is offered)".to_string()]
        );
    }

    #[test]
    fn a_container_runtime_is_offered_only_when_enabled() {
        let m = machine();
        assert_eq!(capacity(&m, &Caps::default(), Offered { exec: false, container: true }).runtimes, vec!["wasm", "container"]);
        assert_eq!(capacity(&m, &Caps::default(), Offered { exec: true, container: true }).runtimes, vec!["wasm", "exec", "container"]);
    }

    #[test]
    fn recorded_cpuinfo_and_meminfo_parse_on_x86_64_and_aarch64() {
        assert_eq!(parse_cpuinfo(&fixture("cpuinfo-x86_64.txt")), Some(CpuInfo { logical: 2, model: "Intel(R) Xeon(R) Processor".into() }));
        assert_eq!(parse_cpuinfo(&fixture("cpuinfo-aarch64.txt")), Some(CpuInfo { logical: 4, model: "Raspberry Pi 5 Model B Rev 1.0".into() }));
        let no_board = fixture("cpuinfo-aarch64.txt").replace("Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n", "");
        assert_eq!(parse_cpuinfo(&no_board).unwrap().model, "ARM part 0xd0b");
        assert_eq!(parse_meminfo(&fixture("meminfo-x86_64.txt")), Some(24731708 * 1024));
        assert_eq!(parse_meminfo(&fixture("meminfo-aarch64.txt")), Some(8245168 * 1024));
        assert_eq!(parse_cpuinfo(""), None);
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: lots kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 1 MB\n"), None);
    }

    #[test]
    fn measures_something_real() {
        let dir = tempfile::tempdir().unwrap();
        let m = measure(&dir.path().join("not/yet/created"));
        assert!(m.cpu_millis >= 1000);
        assert!(m.memory_bytes > 0);
        assert!(m.disk_bytes > 0, "free space of the nearest existing parent");
    }
}
