//! GPUs: detected through NVML when the NVIDIA driver's library loads (it is opened at run
//! time, never linked), else from `nvidia-smi`'s CSV, else none. Never invented: no library and
//! no tool means zero GPUs. [`GpuPool`] hands the offered GPUs to container tasks, one task each.

use std::collections::HashMap;
use std::process::Command;

use kommune_proto::v1::Gpu;

/// The query `nvidia-smi` answers with one CSV line per GPU.
pub const NVIDIA_SMI_ARGS: [&str; 2] = ["--query-gpu=name,memory.total,uuid", "--format=csv,noheader,nounits"];

/// Where the GPU list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuSource {
    Nvml,
    NvidiaSmi,
    /// Neither the NVML library nor `nvidia-smi` is present (or both failed).
    None,
}

impl std::fmt::Display for GpuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GpuSource::Nvml => "NVML",
            GpuSource::NvidiaSmi => "nvidia-smi",
            GpuSource::None => "none found",
        })
    }
}

/// What detection found, with the problems met on the way (for the log).
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    pub gpus: Vec<Gpu>,
    pub source: GpuSource,
    pub notes: Vec<String>,
}

/// Asks NVML, then `nvidia-smi`; both absent means no GPUs.
pub fn detect() -> Detected {
    let mut notes = Vec::new();
    match nvml() {
        Ok(gpus) => return Detected { gpus, source: GpuSource::Nvml, notes },
        Err(e) => notes.push(format!("NVML: {e}")),
    }
    match Command::new("nvidia-smi").args(NVIDIA_SMI_ARGS).output() {
        Ok(out) if out.status.success() => {
            let (gpus, problems) = parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout));
            notes.extend(problems.into_iter().map(|p| format!("nvidia-smi: {p}")));
            return Detected { gpus, source: GpuSource::NvidiaSmi, notes };
        }
        Ok(out) => {
            notes.push(format!("nvidia-smi failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim().chars().take(200).collect::<String>()))
        }
        Err(e) => notes.push(format!("nvidia-smi: {e}")),
    }
    Detected { gpus: vec![], source: GpuSource::None, notes }
}

fn nvml() -> Result<Vec<Gpu>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| e.to_string())?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    (0..count)
        .map(|i| {
            let d = nvml.device_by_index(i).map_err(|e| format!("GPU {i}: {e}"))?;
            Ok(Gpu {
                model: d.name().map_err(|e| format!("GPU {i} name: {e}"))?,
                memory_bytes: d.memory_info().map_err(|e| format!("GPU {i} memory: {e}"))?.total,
                uuid: d.uuid().unwrap_or_default(),
            })
        })
        .collect()
}

/// Parses `nvidia-smi --query-gpu=name,memory.total,uuid --format=csv,noheader,nounits`: one
/// `name, MiB, uuid` line per GPU. A line that does not parse is left out and named in the
/// problems; a GPU is never made up from one. The name is split from the right, as it is the
/// only field that may hold a comma.
pub fn parse_nvidia_smi(csv: &str) -> (Vec<Gpu>, Vec<String>) {
    let mut gpus = Vec::new();
    let mut problems = Vec::new();
    for (n, line) in csv.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| format!("line {n} {:?} skipped: {why}", line.chars().take(120).collect::<String>());
        let mut fields = line.rsplitn(3, ',').map(str::trim);
        let (Some(uuid), Some(memory), Some(name)) = (fields.next(), fields.next(), fields.next()) else {
            // "No devices were found" and the like.
            problems.push(bad("expected name, memory (MiB), uuid"));
            continue;
        };
        if name.is_empty() || name.starts_with('[') {
            problems.push(bad("no GPU name"));
            continue;
        }
        let Some(mib) = memory.parse::<u64>().ok().filter(|m| *m > 0) else {
            problems.push(bad(&format!("memory {memory:?} is not a number of MiB")));
            continue;
        };
        let uuid = if uuid.starts_with("GPU-") || uuid.starts_with("MIG-") { uuid.to_string() } else { String::new() };
        gpus.push(Gpu { model: name.to_string(), memory_bytes: mib << 20, uuid });
    }
    (gpus, problems)
}

/// The offered GPUs and which attempt holds each, so two tasks never share one.
#[derive(Debug, Default)]
pub struct GpuPool {
    /// Device ids for the engine: the uuid, or the index when the driver gave none.
    devices: Vec<String>,
    held: HashMap<String, String>,
}

impl GpuPool {
    /// The first `offered` GPUs of `gpus`.
    pub fn new(gpus: &[Gpu]) -> Self {
        let devices = gpus.iter().enumerate().map(|(i, g)| if g.uuid.is_empty() { i.to_string() } else { g.uuid.clone() }).collect();
        Self { devices, held: HashMap::new() }
    }

    pub fn offered(&self) -> usize {
        self.devices.len()
    }

    /// Takes `n` free GPUs for `attempt`, or says why not.
    pub fn take(&mut self, attempt: &str, n: u32) -> Result<Vec<String>, String> {
        let n = n as usize;
        if n > self.devices.len() {
            return Err(if self.devices.is_empty() {
                format!("the task needs {n} GPU(s) but this machine offers none; it must run where GPUs are offered")
            } else {
                format!("the task needs {n} GPU(s) but this machine offers {}", self.devices.len())
            });
        }
        let free: Vec<String> = self.devices.iter().filter(|d| !self.held.contains_key(*d)).take(n).cloned().collect();
        if free.len() < n {
            return Err(format!("the task needs {n} GPU(s) but only {} of the {} offered here are free", free.len(), self.devices.len()));
        }
        for d in &free {
            self.held.insert(d.clone(), attempt.to_string());
        }
        Ok(free)
    }

    /// Frees what `attempt` held.
    pub fn release(&mut self, attempt: &str) {
        self.held.retain(|_, a| a != attempt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn recorded_nvidia_smi_output_for_no_one_and_four_gpus() {
        let (gpus, problems) = parse_nvidia_smi(&fixture("nvidia-smi-0.csv"));
        assert!(gpus.is_empty());
        assert_eq!(problems.len(), 1, "'No devices were found' is reported, not parsed: {problems:?}");

        let (gpus, problems) = parse_nvidia_smi(&fixture("nvidia-smi-1.csv"));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            gpus,
            vec![Gpu { model: "NVIDIA GeForce RTX 3090".into(), memory_bytes: 24576 << 20, uuid: "GPU-5b3e0c2a-8f1d-4d7a-9a0e-2f0c6f1b9e11".into() }]
        );

        let (gpus, problems) = parse_nvidia_smi(&fixture("nvidia-smi-4.csv"));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(gpus.len(), 4);
        assert!(gpus.iter().all(|g| g.model == "NVIDIA A100-SXM4-40GB" && g.memory_bytes == 40960 << 20 && g.uuid.starts_with("GPU-")));
        let uuids: std::collections::HashSet<_> = gpus.iter().map(|g| &g.uuid).collect();
        assert_eq!(uuids.len(), 4);
    }

    #[test]
    fn malformed_lines_are_skipped_and_named_never_guessed() {
        let (gpus, problems) = parse_nvidia_smi(&fixture("nvidia-smi-malformed.csv"));
        assert_eq!(
            gpus,
            vec![
                Gpu { model: "Tesla T4, rev B".into(), memory_bytes: 15360 << 20, uuid: "GPU-0f5e".into() },
                Gpu { model: "NVIDIA L4".into(), memory_bytes: 23034 << 20, uuid: String::new() }
            ]
        );
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("memory \"[N/A]\"")), "{problems:?}");
        assert!(problems.iter().all(|p| p.starts_with("line ")), "{problems:?}");
    }

    #[test]
    fn without_nvml_or_nvidia_smi_there_are_no_gpus() {
        // This build machine has neither; on a GPU machine this checks that detection agrees with itself.
        let found = detect();
        if found.source == GpuSource::None {
            assert!(found.gpus.is_empty());
            assert_eq!(found.notes.len(), 2, "both ways were tried and said why they failed: {:?}", found.notes);
        }
    }

    #[test]
    fn the_pool_never_gives_one_gpu_to_two_tasks() {
        let gpus = parse_nvidia_smi(&fixture("nvidia-smi-4.csv")).0;
        let mut pool = GpuPool::new(&gpus[..2]);
        assert_eq!(pool.offered(), 2);
        let a = pool.take("a", 1).unwrap();
        let b = pool.take("b", 1).unwrap();
        assert_ne!(a, b);
        assert_eq!(pool.take("c", 1).unwrap_err(), "the task needs 1 GPU(s) but only 0 of the 2 offered here are free");
        assert_eq!(pool.take("c", 3).unwrap_err(), "the task needs 3 GPU(s) but this machine offers 2");
        pool.release("a");
        assert_eq!(pool.take("c", 1).unwrap(), a);
        let none = GpuPool::new(&[]).take("x", 1).unwrap_err();
        assert!(none.contains("offers none"), "{none}");
        assert_eq!(GpuPool::new(&[Gpu { uuid: String::new(), ..gpus[0].clone() }]).take("x", 1).unwrap(), vec!["0".to_string()]);
    }
}
