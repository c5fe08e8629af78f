//! Checks a ComputeJob spec beyond what the CRD schema enforces (the schema may be older than
//! the operator, and some rules need code) and turns it into the policy the operator runs.

use std::time::Duration;

use crate::crd::quantity;
use crate::crd::{ComputeJobSpec, EnvVar, Placement, VerificationMode, VerificationSpec};
use crate::fleet::normalize_arch;
use crate::pricing::Micros;
use crate::scheduler::{self, GpuPattern, GpuRequest, Locality, Reputation, TaintEffect, Toleration, TolerationOperator};
use kommune_core::job::verification::{Adaptive, MAX_COPIES, Mode, PPM, Verification};

pub use kommune_core::job::policy::*;

fn invalid(message: impl Into<String>) -> Invalid {
    Invalid { reason: "InvalidSpec", message: message.into() }
}

fn env_pairs(field: &str, env: &[EnvVar]) -> Result<Vec<(String, String)>, Invalid> {
    env.iter()
        .map(|e| {
            let ok = !e.name.is_empty() && !e.name.starts_with(|c: char| c.is_ascii_digit()) && e.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(invalid(format!("{field}: {:?} is not a valid environment variable name", e.name)));
            }
            if e.name.starts_with("KOMMUNE_") {
                return Err(invalid(format!("{field}: {:?} is reserved (KOMMUNE_* variables are set by Kommune)", e.name)));
            }
            Ok((e.name.clone(), e.value.clone().unwrap_or_default()))
        })
        .collect()
}

/// Validates a spec. The first problem found is reported, naming the field.
pub fn validate(spec: &ComputeJobSpec) -> Result<JobPolicy, Invalid> {
    let w = &spec.workload;
    let set: Vec<&str> = [("wasm", w.wasm.is_some()), ("exec", w.exec.is_some()), ("container", w.container.is_some())]
        .into_iter()
        .filter_map(|(n, s)| s.then_some(n))
        .collect();
    match set.as_slice() {
        [] => return Err(invalid("spec.workload must set exactly one of wasm, exec or container; none is set")),
        [_] => {}
        many => {
            return Err(invalid(format!("spec.workload must set exactly one of wasm, exec or container; {} are set", many.join(" and "))));
        }
    }

    let workload = if let Some(wasm) = &w.wasm {
        if let Some(sha) = &wasm.sha256
            && !kommune_proto::is_sha256_hex(sha)
        {
            return Err(invalid(format!("spec.workload.wasm.sha256: {sha:?} is not 64 lowercase hex digits")));
        }
        let source = match (&wasm.config_map_ref, &wasm.url) {
            (Some(cm), None) => {
                if cm.name.is_empty() || cm.key.is_empty() {
                    return Err(invalid("spec.workload.wasm.configMapRef needs both name and key"));
                }
                ModuleSource::ConfigMap { name: cm.name.clone(), key: cm.key.clone(), sha256: wasm.sha256.clone() }
            }
            (None, Some(url)) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(invalid(format!("spec.workload.wasm.url: {url:?} must be an http(s) URL")));
                }
                let Some(sha256) = wasm.sha256.clone() else {
                    return Err(invalid("spec.workload.wasm.url requires spec.workload.wasm.sha256, so agents can verify the download"));
                };
                ModuleSource::Url { url: url.clone(), sha256 }
            }
            (Some(_), Some(_)) => return Err(invalid("spec.workload.wasm must set exactly one of url or configMapRef; both are set")),
            (None, None) => return Err(invalid("spec.workload.wasm must set one of url (with sha256) or configMapRef")),
        };
        TaskWorkload::Wasm { source, args: wasm.args.clone(), env: env_pairs("spec.workload.wasm.env", &wasm.env)? }
    } else if let Some(exec) = &w.exec {
        if exec.command.first().is_none_or(|c| c.is_empty()) {
            return Err(invalid("spec.workload.exec.command must name a program"));
        }
        TaskWorkload::Exec { command: exec.command.clone(), env: env_pairs("spec.workload.exec.env", &exec.env)? }
    } else if let Some(container) = &w.container {
        if !kommune_proto::is_pinned_image(&container.image) {
            return Err(invalid(format!(
                "spec.workload.container.image: {:?} is not pinned by digest; use name@sha256:<64 lowercase hex digits>",
                container.image.chars().take(200).collect::<String>()
            )));
        }
        TaskWorkload::Container {
            image: container.image.clone(),
            command: container.command.clone(),
            args: container.args.clone(),
            env: env_pairs("spec.workload.container.env", &container.env)?,
            network: container.network,
        }
    } else {
        // Ruled out by the count above; kept as an error so a change there cannot panic here.
        return Err(invalid("spec.workload must set exactly one of wasm, exec or container; none is set"));
    };

    // Env values from Secrets: well-formed, and only where the job lets providers see them.
    super::secret_env::secret_env(spec)?;

    if spec.tasks == 0 || spec.tasks > MAX_TASKS {
        return Err(invalid(format!("spec.tasks must be between 1 and {MAX_TASKS}, got {}", spec.tasks)));
    }
    let parallelism = spec.parallelism.unwrap_or(spec.tasks);
    if parallelism == 0 {
        return Err(invalid("spec.parallelism must be at least 1"));
    }
    let cpu_millis = quantity::cpu_millis("spec.resources.cpu", &spec.resources.cpu.0).map_err(|e| invalid(e.to_string()))?;
    let memory_bytes = quantity::memory_bytes("spec.resources.memory", &spec.resources.memory.0).map_err(|e| invalid(e.to_string()))?;
    if memory_bytes < MIN_MEMORY {
        return Err(invalid(format!("spec.resources.memory must be at least 1Mi, got {:?}", spec.resources.memory.0)));
    }
    if spec.retries.max_attempts == 0 {
        return Err(invalid("spec.retries.maxAttempts must be at least 1"));
    }
    if spec.timeouts.task_seconds == Some(0) || spec.timeouts.job_seconds == Some(0) {
        return Err(invalid("spec.timeouts values must be at least 1 second"));
    }
    let ephemeral_bytes = match &spec.resources.ephemeral_storage {
        Some(q) => quantity::memory_bytes("spec.resources.ephemeralStorage", &q.0).map_err(|e| invalid(e.to_string()))?,
        None => 0,
    };
    let gpu = match &spec.resources.gpu {
        None => GpuRequest::default(),
        Some(g) => {
            if g.count == 0 || g.count as usize > scheduler::MAX_GPUS {
                return Err(invalid(format!("spec.resources.gpu.count must be between 1 and {}, got {}", scheduler::MAX_GPUS, g.count)));
            }
            let model = g.model.as_deref().map(GpuPattern::parse).transpose().map_err(|e| invalid(format!("spec.resources.gpu.model: {e}")))?;
            let min_memory_bytes = match &g.min_memory {
                Some(q) => quantity::memory_bytes("spec.resources.gpu.minMemory", &q.0).map_err(|e| invalid(e.to_string()))?,
                None => 0,
            };
            GpuRequest { count: g.count, model, min_memory_bytes }
        }
    };
    let placement = placement(&spec.placement, &workload)?;
    let verification = verification(&spec.verification, &placement, &workload)?;

    let credits = |field: &str, v: Option<&str>| -> Result<Option<Micros>, Invalid> {
        v.map(|v| Micros::parse_credits(v).map_err(|e| invalid(format!("spec.pricing.{field}: {e}")))).transpose()
    };
    let budget = credits("budget", spec.pricing.as_ref().and_then(|p| p.budget.as_deref()))?;
    let max_price_per_hour = credits("maxPricePerHour", spec.pricing.as_ref().and_then(|p| p.max_price_per_hour.as_deref()))?;
    let inputs = super::data::inputs(&spec.inputs, spec.tasks)?;
    let outputs = spec.outputs.as_ref().map(super::data::outputs).transpose()?;

    Ok(JobPolicy {
        tasks: spec.tasks,
        parallelism: parallelism.min(spec.tasks),
        cpu_millis,
        memory_bytes,
        max_attempts: spec.retries.max_attempts,
        backoff: Duration::from_secs(spec.retries.backoff_seconds.into()),
        task_timeout: spec.timeouts.task_seconds.map_or(DEFAULT_TASK_TIMEOUT, |s| Duration::from_secs(s.into())),
        job_deadline: spec.timeouts.job_seconds.map(|s| Duration::from_secs(s.into())),
        suspended: spec.suspend,
        workload,
        budget,
        ephemeral_bytes,
        gpu,
        placement,
        priority: spec.priority,
        max_price_per_hour,
        verification,
        inputs,
        outputs,
    })
}

/// `spec.verification` as a [`Verification`]: each mode's fields checked against each other.
fn verification(v: &VerificationSpec, placement: &PlacementPolicy, workload: &TaskWorkload) -> Result<Verification, Invalid> {
    let field = |name: &str, set: bool| if set { Err(invalid(format!("spec.verification.{name} does not apply to mode {:?}", v.mode))) } else { Ok(()) };
    let copies = |n: Option<u32>, name: &str, min: u32| match n {
        Some(n) if !(min..=MAX_COPIES).contains(&n) => Err(invalid(format!("spec.verification.{name} must be between {min} and {MAX_COPIES}, got {n}"))),
        _ => Ok(n),
    };
    let mode = match v.mode {
        VerificationMode::None => {
            field("replicas", v.replicas.is_some())?;
            field("quorum", v.quorum.is_some())?;
            field("maxReplicas", v.max_replicas.is_some())?;
            field("fraction", v.fraction.is_some())?;
            Mode::None
        }
        VerificationMode::Replicate => {
            field("fraction", v.fraction.is_some())?;
            let replicas = copies(v.replicas, "replicas", 2)?.unwrap_or(2);
            let quorum = copies(v.quorum, "quorum", 2)?.unwrap_or(replicas);
            if quorum > replicas {
                return Err(invalid(format!("spec.verification.quorum ({quorum}) cannot exceed replicas ({replicas})")));
            }
            let max_replicas = copies(v.max_replicas, "maxReplicas", replicas)?.unwrap_or((replicas + 1).min(MAX_COPIES));
            Mode::Replicate { replicas, quorum, max_replicas }
        }
        VerificationMode::SpotCheck | VerificationMode::Adaptive => {
            field("replicas", v.replicas.is_some())?;
            field("quorum", v.quorum.is_some())?;
            let max_replicas = copies(v.max_replicas, "maxReplicas", 2)?.unwrap_or(3);
            if v.mode == VerificationMode::Adaptive {
                field("fraction", v.fraction.is_some())?;
                Mode::Adaptive(Adaptive { max_replicas, ..Adaptive::default() })
            } else {
                let Some(f) = v.fraction.as_deref() else { return Err(invalid("spec.verification.fraction is required by mode spotCheck")) };
                let fraction_ppm = Micros::parse_credits(f)
                    .ok()
                    .filter(|m| m.0 <= PPM as u64)
                    .ok_or_else(|| invalid(format!("spec.verification.fraction: {f:?} is not a number from 0 to 1 with at most 6 decimals")))?
                    .0 as u32;
                Mode::SpotCheck { fraction_ppm, max_replicas }
            }
        }
    };
    if mode != Mode::None && placement.replicas > 1 {
        return Err(invalid("spec.placement.replicas and spec.verification.mode both set copies: use spec.verification alone"));
    }
    if mode != Mode::None && matches!(workload, TaskWorkload::Exec { .. }) {
        return Err(invalid("spec.verification: results are verified by comparing outputs, which needs a deterministic runtime; exec tasks are not, use wasm"));
    }
    Ok(Verification { mode, outputs: vec![] })
}

/// A label key (optional DNS prefix and "/", then a name of up to 63 characters) or value.
fn label_ok(s: &str, key: bool) -> bool {
    let name_ok = |n: &str| {
        n.len() <= 63
            && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && n.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
            && n.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
    };
    if !key {
        return name_ok(s);
    }
    let (prefix, name) = s.rsplit_once('/').unwrap_or(("", s));
    !name.is_empty()
        && name_ok(name)
        && prefix.len() <= 253
        && prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
        && !(s.contains('/') && prefix.is_empty())
}

fn placement(p: &Placement, workload: &TaskWorkload) -> Result<PlacementPolicy, Invalid> {
    for (k, v) in &p.node_selector {
        if !label_ok(k, true) {
            return Err(invalid(format!("spec.placement.nodeSelector: {k:?} is not a valid label key")));
        }
        if !label_ok(v, false) {
            return Err(invalid(format!("spec.placement.nodeSelector.{k}: {v:?} is not a valid label value")));
        }
    }
    let mut tolerations = vec![];
    for (i, t) in p.tolerations.iter().enumerate() {
        let field = format!("spec.placement.tolerations[{i}]");
        let operator = match t.operator {
            crate::crd::TolerationOperator::Equal => TolerationOperator::Equal,
            crate::crd::TolerationOperator::Exists => TolerationOperator::Exists,
        };
        if operator == TolerationOperator::Equal && t.key.is_empty() {
            return Err(invalid(format!("{field}: operator Equal needs a key (use operator Exists with no key to tolerate every taint)")));
        }
        if operator == TolerationOperator::Exists && !t.value.is_empty() {
            return Err(invalid(format!("{field}: operator Exists matches any value; remove value {:?} or use operator Equal", t.value)));
        }
        let effect = t.effect.map(|e| match e {
            crate::crd::TaintEffect::NoSchedule => TaintEffect::NoSchedule,
        });
        tolerations.push(Toleration { key: t.key.clone(), operator, value: t.value.clone(), effect });
    }
    let word = |field: &str, v: &Option<String>, normalize: fn(&str) -> String| -> Result<Option<String>, Invalid> {
        match v {
            None => Ok(None),
            Some(s) if !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => Ok(Some(normalize(s))),
            Some(s) => Err(invalid(format!("{field}: {s:?} is not an architecture or OS name (like x86_64, aarch64, linux)"))),
        }
    };
    let arch = word("spec.placement.arch", &p.arch, normalize_arch)?;
    let os = word("spec.placement.os", &p.os, |s| s.to_ascii_lowercase())?;
    let min_reputation = match &p.min_reputation {
        Some(s) => Reputation::parse(s).map_err(|e| invalid(format!("spec.placement.minReputation: {e}")))?,
        None => Reputation(0),
    };
    let data_locality = match &p.data_locality {
        None => None,
        Some(d) if d.region.as_deref().is_none_or(str::is_empty) && d.zone.as_deref().is_none_or(str::is_empty) => {
            return Err(invalid("spec.placement.dataLocality must set region, zone or both"));
        }
        Some(d) => Some(Locality { region: d.region.clone().filter(|r| !r.is_empty()), zone: d.zone.clone().filter(|z| !z.is_empty()) }),
    };
    if p.replicas == 0 || p.replicas > MAX_REPLICAS {
        return Err(invalid(format!("spec.placement.replicas must be between 1 and {MAX_REPLICAS}, got {}", p.replicas)));
    }
    if p.replicas > 1 && matches!(workload, TaskWorkload::Exec { .. }) {
        return Err(invalid(
            "spec.placement.replicas: replicas are verified by comparing their outputs, which needs a deterministic runtime; exec tasks are not, use wasm",
        ));
    }
    Ok(PlacementPolicy { node_selector: p.node_selector.clone(), tolerations, arch, os, min_reputation, data_locality, replicas: p.replicas })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{Request, Resources};

    fn spec(yaml: &str) -> ComputeJobSpec {
        serde_yaml::from_str(yaml).expect("fixture parses")
    }

    const WASM: &str = "workload:\n  wasm:\n    configMapRef: {name: m, key: module.wasm}\n";

    #[test]
    fn defaults_fill_a_minimal_wasm_job() {
        let p = validate(&spec(WASM)).unwrap();
        assert_eq!(p.tasks, 1);
        assert_eq!(p.parallelism, 1);
        assert_eq!(p.cpu_millis, 250);
        assert_eq!(p.memory_bytes, 128 << 20);
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.task_timeout, DEFAULT_TASK_TIMEOUT);
        assert_eq!(p.workload.runtime(), "wasm");
        assert_eq!(
            p.workload,
            TaskWorkload::Wasm { source: ModuleSource::ConfigMap { name: "m".into(), key: "module.wasm".into(), sha256: None }, args: vec![], env: vec![] }
        );
    }

    #[test]
    fn a_budget_is_read_in_credits_and_a_bad_one_is_an_invalid_spec() {
        assert_eq!(validate(&spec(WASM)).unwrap().budget, None);
        let p = validate(&spec(&format!("{WASM}pricing: {{budget: \"2.5\"}}\n"))).unwrap();
        assert_eq!(p.budget, Some(crate::pricing::Micros(2_500_000)));
        let e = validate(&spec(&format!("{WASM}pricing: {{budget: \"lots\"}}\n"))).unwrap_err();
        assert_eq!(e.reason, "InvalidSpec");
        assert!(e.message.starts_with("spec.pricing.budget: \"lots\" is not an amount of credits"), "{}", e.message);
        let p = validate(&spec(&format!("{WASM}pricing: {{maxPricePerHour: \"0.05\"}}\n"))).unwrap();
        assert_eq!(p.max_price_per_hour, Some(crate::pricing::Micros(50_000)));
        assert_eq!(p.request().max_price_per_hour, Some(crate::pricing::Micros(50_000)));
        let e = validate(&spec(&format!("{WASM}pricing: {{maxPricePerHour: \"-1\"}}\n"))).unwrap_err();
        assert!(e.message.starts_with("spec.pricing.maxPricePerHour:"), "{}", e.message);
    }

    #[test]
    fn parallelism_is_capped_by_tasks() {
        let p = validate(&spec(&format!("{WASM}tasks: 3\nparallelism: 10\n"))).unwrap();
        assert_eq!(p.parallelism, 3);
    }

    #[test]
    fn exec_job() {
        let p = validate(&spec("workload:\n  exec:\n    command: [echo, hi]\n    env: [{name: A, value: b}]\ntasks: 2\n")).unwrap();
        assert_eq!(p.workload.runtime(), "exec");
        assert_eq!(p.workload, TaskWorkload::Exec { command: vec!["echo".into(), "hi".into()], env: vec![("A".into(), "b".into())] });
    }

    #[test]
    fn verification_modes_fill_their_defaults_and_placement_replicas_keeps_meaning_unanimity() {
        let mode = |v: &str| validate(&spec(&format!("{WASM}verification: {v}\n"))).map(|p| (p.verification.mode, p.round_rule().initial));
        let cases = [
            ("{mode: none}", Mode::None, 1),
            ("{mode: replicate}", Mode::Replicate { replicas: 2, quorum: 2, max_replicas: 3 }, 2),
            ("{mode: replicate, replicas: 3, quorum: 2, maxReplicas: 5}", Mode::Replicate { replicas: 3, quorum: 2, max_replicas: 5 }, 3),
            ("{mode: spotCheck, fraction: '0.25'}", Mode::SpotCheck { fraction_ppm: PPM / 4, max_replicas: 3 }, 1),
            ("{mode: spotCheck, fraction: '1'}", Mode::SpotCheck { fraction_ppm: PPM, max_replicas: 3 }, 1),
            ("{mode: adaptive, maxReplicas: 4}", Mode::Adaptive(Adaptive { max_replicas: 4, ..Adaptive::default() }), 1),
        ];
        for (yaml, want, initial) in cases {
            assert_eq!(mode(yaml).unwrap(), (want, initial), "{yaml}");
        }
        let legacy = validate(&spec(&format!("{WASM}placement: {{replicas: 3}}\n"))).unwrap();
        assert_eq!(legacy.round_rule(), kommune_core::job::verification::RoundRule { initial: 3, quorum: 3, max: 3, sampled: false });
        let bad = [
            ("{mode: replicate, replicas: 2, quorum: 3}", "spec.verification.quorum (3) cannot exceed replicas (2)"),
            ("{mode: replicate, replicas: 3, maxReplicas: 2}", "spec.verification.maxReplicas must be between 3 and 16, got 2"),
            ("{mode: spotCheck}", "spec.verification.fraction is required by mode spotCheck"),
            ("{mode: spotCheck, fraction: '1.5'}", "spec.verification.fraction: \"1.5\" is not a number from 0 to 1"),
            ("{mode: adaptive, fraction: '0.1'}", "spec.verification.fraction does not apply to mode Adaptive"),
            ("{quorum: 2}", "spec.verification.quorum does not apply to mode None"),
        ];
        for (yaml, want) in bad {
            let e = mode(yaml).unwrap_err();
            assert!(e.message.contains(want), "{yaml}: {}", e.message);
        }
        let both = validate(&spec(&format!("{WASM}placement: {{replicas: 2}}\nverification: {{mode: adaptive}}\n"))).unwrap_err();
        assert!(both.message.contains("use spec.verification alone"), "{}", both.message);
        let exec = validate(&spec("workload:\n  exec:\n    command: [x]\nverification: {mode: adaptive}\n")).unwrap_err();
        assert!(exec.message.contains("exec tasks are not"), "{}", exec.message);
    }

    #[test]
    fn container_job_pinned_by_digest() {
        let image = format!("docker.io/library/busybox@sha256:{}", "b".repeat(64));
        let yaml = format!(
            "workload:\n  container:\n    image: {image}\n    command: [sh, -c]\n    args: [echo hi]\n    env: [{{name: A, value: b}}]\n    network: true\n"
        );
        let p = validate(&spec(&yaml)).unwrap();
        assert_eq!(p.workload.runtime(), "container");
        assert_eq!(
            p.workload,
            TaskWorkload::Container {
                image,
                command: vec!["sh".into(), "-c".into()],
                args: vec!["echo hi".into()],
                env: vec![("A".into(), "b".into())],
                network: true
            }
        );
        let quiet = validate(&spec(&format!("workload:\n  container: {{image: 'busybox@sha256:{}'}}\n", "c".repeat(64)))).unwrap();
        assert!(matches!(quiet.workload, TaskWorkload::Container { network: false, .. }));
    }

    #[test]
    fn placement_resources_and_priority_map_into_the_request() {
        let yaml = format!(
            "{WASM}resources: {{cpu: '2', memory: 1Gi, ephemeralStorage: 10Gi, gpu: {{count: 2, model: 'A100*', minMemory: 40Gi}}}}
placement:
  nodeSelector: {{tier: fast, kommune.dev/pool: edge}}
  tolerations: [{{key: dedicated, value: ml, effect: NoSchedule}}, {{operator: Exists}}]
  arch: amd64
  os: Linux
  minReputation: '0.8'
  dataLocality: {{region: eu-west, zone: eu-west-a}}
priority: 7
"
        );
        let p = validate(&spec(&yaml)).unwrap();
        let r = p.request();
        assert_eq!(r.resources, Resources { cpu_millis: 2000, memory_bytes: 1 << 30, ephemeral_bytes: 10 << 30 });
        assert_eq!(r.gpu, GpuRequest { count: 2, model: Some(GpuPattern::parse("a100*").unwrap()), min_memory_bytes: 40 << 30 });
        assert_eq!(r.node_selector.len(), 2);
        assert_eq!(
            r.tolerations,
            vec![
                Toleration { key: "dedicated".into(), operator: TolerationOperator::Equal, value: "ml".into(), effect: Some(TaintEffect::NoSchedule) },
                Toleration { key: String::new(), operator: TolerationOperator::Exists, value: String::new(), effect: None },
            ]
        );
        assert_eq!((r.arch.as_deref(), r.os.as_deref()), (Some("x86_64"), Some("linux")));
        assert_eq!(r.min_reputation, Reputation(800));
        assert_eq!(r.data_locality, Some(Locality { region: Some("eu-west".into()), zone: Some("eu-west-a".into()) }));
        assert_eq!((r.replicas, p.priority, r.runtime.as_str()), (1, 7, "wasm"));
        // Defaults: one replica, no GPU, no disk, priority 0, no constraint.
        let d = validate(&spec(WASM)).unwrap();
        assert_eq!(d.request(), Request::new("wasm", Resources { cpu_millis: 250, memory_bytes: 128 << 20, ephemeral_bytes: 0 }));
        assert_eq!(d.priority, 0);
        // Replicas of a deterministic workload are run (and verified) now.
        let replicated = validate(&spec(&format!("{WASM}placement: {{replicas: 3}}\n"))).unwrap();
        assert_eq!((replicated.placement.replicas, replicated.request().replicas), (3, 3));
    }

    #[test]
    fn every_invalid_spec_names_its_field() {
        let sha = "a".repeat(64);
        let cases: Vec<(String, &str, &str)> = vec![
            ("workload: {}\n".into(), "InvalidSpec", "none is set"),
            (format!("{WASM}  exec:\n    command: [x]\n"), "InvalidSpec", "wasm and exec are set"),
            ("workload:\n  container: {image: busybox}\n".into(), "InvalidSpec", "spec.workload.container.image: \"busybox\" is not pinned by digest"),
            ("workload:\n  container: {image: 'busybox:1.36'}\n".into(), "InvalidSpec", "not pinned by digest"),
            (format!("workload:\n  container: {{image: 'busybox@sha256:{}'}}\n", &sha[1..]), "InvalidSpec", "not pinned by digest"),
            (
                format!("workload:\n  container:\n    image: busybox@sha256:{sha}\n    env: [{{name: KOMMUNE_X}}]\n"),
                "InvalidSpec",
                "spec.workload.container.env",
            ),
            (format!("{WASM}tasks: 0\n"), "InvalidSpec", "spec.tasks must be between 1"),
            (format!("{WASM}tasks: 2000000\n"), "InvalidSpec", "spec.tasks must be between 1"),
            (format!("{WASM}parallelism: 0\n"), "InvalidSpec", "spec.parallelism"),
            ("workload:\n  wasm:\n    url: https://x/m.wasm\n".into(), "InvalidSpec", "requires spec.workload.wasm.sha256"),
            ("workload:\n  wasm:\n    url: ftp://x/m.wasm\n    sha256: 00\n".into(), "InvalidSpec", "spec.workload.wasm.sha256"),
            (format!("workload:\n  wasm:\n    url: ftp://x/m.wasm\n    sha256: {sha}\n"), "InvalidSpec", "must be an http(s) URL"),
            (format!("workload:\n  wasm:\n    url: https://x\n    sha256: {sha}\n    configMapRef: {{name: a, key: b}}\n"), "InvalidSpec", "both are set"),
            ("workload:\n  wasm: {}\n".into(), "InvalidSpec", "must set one of url"),
            ("workload:\n  exec:\n    command: []\n".into(), "InvalidSpec", "spec.workload.exec.command"),
            ("workload:\n  exec:\n    command: ['']\n".into(), "InvalidSpec", "spec.workload.exec.command"),
            (format!("{WASM}    env: [{{name: '1A', value: x}}]\n"), "InvalidSpec", "spec.workload.wasm.env"),
            (format!("{WASM}    env: [{{name: KOMMUNE_TASK_INDEX, value: x}}]\n"), "InvalidSpec", "reserved"),
            (format!("{WASM}resources: {{cpu: lots}}\n"), "InvalidSpec", "spec.resources.cpu"),
            (format!("{WASM}resources: {{memory: 0}}\n"), "InvalidSpec", "spec.resources.memory"),
            (format!("{WASM}resources: {{memory: 1Ki}}\n"), "InvalidSpec", "at least 1Mi"),
            (format!("{WASM}retries: {{maxAttempts: 0}}\n"), "InvalidSpec", "maxAttempts"),
            (format!("{WASM}timeouts: {{taskSeconds: 0}}\n"), "InvalidSpec", "spec.timeouts"),
            (format!("{WASM}resources: {{ephemeralStorage: lots}}\n"), "InvalidSpec", "spec.resources.ephemeralStorage"),
            (format!("{WASM}resources: {{gpu: {{count: 0}}}}\n"), "InvalidSpec", "spec.resources.gpu.count must be between 1 and 64"),
            (format!("{WASM}resources: {{gpu: {{model: 'a100[x]'}}}}\n"), "InvalidSpec", "spec.resources.gpu.model: \"a100[x]\" is not a GPU model pattern"),
            (format!("{WASM}resources: {{gpu: {{minMemory: much}}}}\n"), "InvalidSpec", "spec.resources.gpu.minMemory"),
            (
                format!("{WASM}placement: {{nodeSelector: {{'bad key!': x}}}}\n"),
                "InvalidSpec",
                "spec.placement.nodeSelector: \"bad key!\" is not a valid label key",
            ),
            (format!("{WASM}placement: {{nodeSelector: {{tier: 'no spaces'}}}}\n"), "InvalidSpec", "spec.placement.nodeSelector.tier"),
            (format!("{WASM}placement: {{tolerations: [{{operator: Equal, value: x}}]}}\n"), "InvalidSpec", "tolerations[0]: operator Equal needs a key"),
            (format!("{WASM}placement: {{tolerations: [{{key: k, operator: Exists, value: x}}]}}\n"), "InvalidSpec", "operator Exists matches any value"),
            (format!("{WASM}placement: {{arch: 'x86 64'}}\n"), "InvalidSpec", "spec.placement.arch"),
            (format!("{WASM}placement: {{os: ''}}\n"), "InvalidSpec", "spec.placement.os"),
            (format!("{WASM}placement: {{minReputation: '1.5'}}\n"), "InvalidSpec", "spec.placement.minReputation: \"1.5\" is not a reputation"),
            (format!("{WASM}placement: {{minReputation: '80%'}}\n"), "InvalidSpec", "spec.placement.minReputation"),
            (format!("{WASM}placement: {{dataLocality: {{}}}}\n"), "InvalidSpec", "spec.placement.dataLocality must set region, zone or both"),
            (format!("{WASM}placement: {{replicas: 0}}\n"), "InvalidSpec", "spec.placement.replicas must be between 1 and 16"),
            (format!("{WASM}placement: {{replicas: 17}}\n"), "InvalidSpec", "spec.placement.replicas must be between 1 and 16"),
            ("workload:\n  exec:\n    command: [x]\nplacement: {replicas: 2}\n".into(), "InvalidSpec", "exec tasks are not, use wasm"),
        ];
        for (yaml, reason, needle) in cases {
            let err = validate(&spec(&yaml)).expect_err(&yaml);
            assert_eq!(err.reason, reason, "{yaml}");
            assert!(err.message.contains(needle), "{yaml}: {err}");
        }
    }
}
