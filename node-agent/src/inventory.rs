//! What this machine offers: CPU and memory measured from the OS, capped (never raised) by
//! the provider's flags, plus the runtimes this agent runs.

use kommune_proto::v1::Capacity;

/// Provider-set upper bounds on what is offered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
}

/// Measured machine resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// Reads the machine's logical CPUs and total memory (0 when the OS will not say).
pub fn measure() -> Machine {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let memory_bytes = match sysinfo::System::new() {
        Ok(mut sys) => {
            sys.refresh_memory();
            sys.total_memory()
        }
        Err(_) => 0,
    };
    Machine { cpu_millis: cpus * 1000, memory_bytes }
}

/// Runtimes beyond wasm (always offered) that the provider turned on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offered {
    pub exec: bool,
    pub container: bool,
}

/// What to advertise: the machine, lowered to the caps. Pure.
pub fn capacity(machine: Machine, caps: &Caps, offered: Offered) -> Capacity {
    let mut runtimes = vec![kommune_proto::runtime::WASM.to_string()];
    if offered.exec {
        runtimes.push(kommune_proto::runtime::EXEC.to_string());
    }
    if offered.container {
        runtimes.push(kommune_proto::runtime::CONTAINER.to_string());
    }
    Capacity {
        cpu_millis: caps.cpu_millis.map_or(machine.cpu_millis, |c| c.min(machine.cpu_millis)),
        memory_bytes: caps.memory_bytes.map_or(machine.memory_bytes, |m| m.min(machine.memory_bytes)),
        runtimes,
        arch: std::env::consts::ARCH.to_string(),
        os: std::env::consts::OS.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_only_lower() {
        let m = Machine { cpu_millis: 4000, memory_bytes: 8 << 30 };
        let c = capacity(m, &Caps::default(), Offered::default());
        assert_eq!((c.cpu_millis, c.memory_bytes), (4000, 8 << 30));
        assert_eq!(c.runtimes, vec!["wasm"]);
        let c = capacity(m, &Caps { cpu_millis: Some(1500), memory_bytes: Some(1 << 30) }, Offered { exec: true, container: false });
        assert_eq!((c.cpu_millis, c.memory_bytes), (1500, 1 << 30));
        assert_eq!(c.runtimes, vec!["wasm", "exec"]);
        let c = capacity(m, &Caps { cpu_millis: Some(64000), memory_bytes: Some(1 << 40) }, Offered::default());
        assert_eq!((c.cpu_millis, c.memory_bytes), (4000, 8 << 30));
    }

    #[test]
    fn a_container_runtime_is_offered_only_when_enabled() {
        let m = Machine { cpu_millis: 1000, memory_bytes: 1 << 30 };
        assert_eq!(capacity(m, &Caps::default(), Offered { exec: false, container: true }).runtimes, vec!["wasm", "container"]);
        assert_eq!(capacity(m, &Caps::default(), Offered { exec: true, container: true }).runtimes, vec!["wasm", "exec", "container"]);
    }

    #[test]
    fn measures_something_real() {
        let m = measure();
        assert!(m.cpu_millis >= 1000);
        assert!(m.memory_bytes > 0);
    }
}
