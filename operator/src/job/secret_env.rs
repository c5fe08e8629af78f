//! Env values from Secrets (`env[].valueFrom.secretKeyRef`): which entries name one, the rule
//! that a job must say its providers may see them, and filling the values in once read.

use super::validate::{Invalid, TaskWorkload};
use crate::crd::{ComputeJobSpec, EnvVar};

/// The label a Secret must carry before its values go to providers: whoever may edit the
/// Secret consents, so a job's author cannot send a Secret they cannot read to a provider.
pub const EXPOSE_LABEL: &str = "kommune.dev/expose-to-providers";

/// One env entry whose value is a key of a Secret of the job's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEnv {
    /// The entry's position in the workload's env (and in the policy's).
    pub index: usize,
    /// The entry's field, e.g. `spec.workload.exec.env[2]`, for messages.
    pub field: String,
    pub secret: String,
    pub key: String,
}

/// The workload's env and the field it sits in.
fn workload_env(spec: &ComputeJobSpec) -> (&'static str, &[EnvVar]) {
    let w = &spec.workload;
    if let Some(wasm) = &w.wasm {
        ("spec.workload.wasm.env", &wasm.env)
    } else if let Some(exec) = &w.exec {
        ("spec.workload.exec.env", &exec.env)
    } else if let Some(container) = &w.container {
        ("spec.workload.container.env", &container.env)
    } else {
        ("spec.workload", &[])
    }
}

/// The env entries that take their value from a Secret. Refused: an entry with both a value
/// and a Secret, one with an empty Secret name or key, and any at all unless the job sets
/// `spec.exposeSecretsToProviders` (reason `SecretEnvNotAllowed`, so the job's owner sees why).
pub fn secret_env(spec: &ComputeJobSpec) -> Result<Vec<SecretEnv>, Invalid> {
    let (base, env) = workload_env(spec);
    let mut out = vec![];
    for (index, e) in env.iter().enumerate() {
        let Some(from) = &e.value_from else { continue };
        let field = format!("{base}[{index}]");
        let r = &from.secret_key_ref;
        if e.value.is_some() {
            return Err(Invalid { reason: "InvalidSpec", message: format!("{field} ({}) sets both value and valueFrom; set one", e.name) });
        }
        if r.name.is_empty() || r.key.is_empty() {
            return Err(Invalid { reason: "InvalidSpec", message: format!("{field}.valueFrom.secretKeyRef needs both name and key") });
        }
        if !spec.expose_secrets_to_providers {
            return Err(Invalid {
                reason: "SecretEnvNotAllowed",
                message: format!(
                    "{field} ({}) takes its value from Secret {} key {:?}, which the provider running the task would see: set spec.exposeSecretsToProviders: true to allow it",
                    e.name, r.name, r.key
                ),
            });
        }
        out.push(SecretEnv { index, field, secret: r.name.clone(), key: r.key.clone() });
    }
    Ok(out)
}

/// Puts each read value into the policy's env at its entry's place (`values` in the order of
/// `refs`). The values live only in the policy sent to agents, never in status or Events.
pub fn fill(workload: &mut TaskWorkload, refs: &[SecretEnv], values: Vec<String>) {
    let env = match workload {
        TaskWorkload::Wasm { env, .. } | TaskWorkload::Exec { env, .. } | TaskWorkload::Container { env, .. } => env,
    };
    for (r, value) in refs.iter().zip(values) {
        if let Some(slot) = env.get_mut(r.index) {
            slot.1 = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::validate;

    fn spec(yaml: &str) -> ComputeJobSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    const WITH_SECRET: &str = "workload:\n  exec:\n    command: [sh, -c, 'echo $TOKEN']\n    env:\n    - {name: MODE, value: fast}\n    - name: TOKEN\n      valueFrom: {secretKeyRef: {name: api, key: token}}\n";

    #[test]
    fn a_secret_in_env_without_the_opt_in_is_refused_naming_the_field_and_the_fix() {
        let e = validate(&spec(WITH_SECRET)).unwrap_err();
        assert_eq!(e.reason, "SecretEnvNotAllowed");
        assert!(e.message.contains("spec.workload.exec.env[1] (TOKEN)") && e.message.contains("spec.exposeSecretsToProviders: true"), "{}", e.message);
    }

    #[test]
    fn with_the_opt_in_the_entries_are_listed_and_filled_in_place() {
        let s = spec(&format!("{WITH_SECRET}exposeSecretsToProviders: true\n"));
        let mut policy = validate(&s).unwrap();
        let refs = secret_env(&s).unwrap();
        assert_eq!(refs, [SecretEnv { index: 1, field: "spec.workload.exec.env[1]".into(), secret: "api".into(), key: "token".into() }]);
        // Before the Secret is read, the entry holds nothing.
        assert_eq!(
            policy.workload,
            TaskWorkload::Exec {
                command: vec!["sh".into(), "-c".into(), "echo $TOKEN".into()],
                env: vec![("MODE".into(), "fast".into()), ("TOKEN".into(), String::new())]
            }
        );
        fill(&mut policy.workload, &refs, vec!["t0ken".into()]);
        let TaskWorkload::Exec { env, .. } = &policy.workload else { panic!() };
        assert_eq!(env, &[("MODE".to_string(), "fast".to_string()), ("TOKEN".to_string(), "t0ken".to_string())]);
    }

    #[test]
    fn every_runtime_s_env_is_checked() {
        let from = "valueFrom: {secretKeyRef: {name: s, key: k}}";
        let sha = "0".repeat(64);
        for (yaml, field) in [
            (format!("workload:\n  wasm: {{url: 'https://x/m.wasm', sha256: '{sha}', env: [{{name: A, {from}}}]}}\n"), "spec.workload.wasm.env[0]"),
            (format!("workload:\n  container: {{image: 'busybox@sha256:{sha}', env: [{{name: A, {from}}}]}}\n"), "spec.workload.container.env[0]"),
        ] {
            let e = validate(&spec(&yaml)).unwrap_err();
            assert_eq!(e.reason, "SecretEnvNotAllowed", "{yaml}");
            assert!(e.message.contains(field), "{}", e.message);
            assert_eq!(secret_env(&spec(&format!("{yaml}exposeSecretsToProviders: true\n"))).unwrap().len(), 1);
        }
    }

    #[test]
    fn malformed_entries_are_invalid_even_with_the_opt_in() {
        let both = "workload:\n  exec:\n    command: [x]\n    env: [{name: A, value: v, valueFrom: {secretKeyRef: {name: s, key: k}}}]\nexposeSecretsToProviders: true\n";
        let e = validate(&spec(both)).unwrap_err();
        assert_eq!(e.reason, "InvalidSpec");
        assert!(e.message.contains("both value and valueFrom"), "{}", e.message);
        let empty =
            "workload:\n  exec:\n    command: [x]\n    env: [{name: A, valueFrom: {secretKeyRef: {name: '', key: k}}}]\nexposeSecretsToProviders: true\n";
        assert!(validate(&spec(empty)).unwrap_err().message.contains("needs both name and key"));
    }

    #[test]
    fn the_opt_in_alone_changes_nothing() {
        let s = spec("workload:\n  exec:\n    command: [x]\n    env: [{name: A, value: b}]\nexposeSecretsToProviders: true\n");
        assert!(secret_env(&s).unwrap().is_empty());
        assert_eq!(validate(&s).unwrap().workload, TaskWorkload::Exec { command: vec!["x".into()], env: vec![("A".into(), "b".into())] });
    }
}
