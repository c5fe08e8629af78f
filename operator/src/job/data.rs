//! Validation of `spec.inputs` and `spec.outputs`: the checks the CRD schema cannot make
//! (digests per task, paths that stay under scratch, URLs, buckets, limits), each naming its field.

use kommune_core::job::data::{INDEX_PLACEHOLDER, InputDigest, InputSource, JobInput, JobOutputs, OutputDestination, S3Object, expand, is_plain_relative_path};

use super::validate::Invalid;
use crate::crd::{self, S3Location};

/// Most tasks a per-task input may list digests for (the CRD bounds `sha256PerTask` too).
pub const MAX_PER_TASK_DIGESTS: usize = 10_000;

fn invalid(message: impl Into<String>) -> Invalid {
    Invalid { reason: "InvalidSpec", message: message.into() }
}

fn is_sha256(s: &str) -> bool {
    kommune_proto::is_sha256_hex(s)
}

/// `spec.inputs` for a job of `tasks` tasks.
pub fn inputs(inputs: &[crd::JobInput], tasks: u32) -> Result<Vec<JobInput>, Invalid> {
    let mut out: Vec<JobInput> = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let field = format!("spec.inputs[{i}]");
        let templated = |s: &str| s.contains(INDEX_PLACEHOLDER);
        // Checked with an index in, so a template cannot escape scratch for any task.
        if !is_plain_relative_path(&expand(&input.path, 0)) {
            return Err(invalid(format!("{field}.path: {:?} must be a relative path of plain components (no `..`, no leading `/`)", input.path)));
        }
        if out.iter().any(|o| o.path == input.path) {
            return Err(invalid(format!("{field}.path: {:?} is given by an earlier input too", input.path)));
        }
        let source = match (&input.url, &input.config_map_ref, &input.s3) {
            (Some(url), None, None) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(invalid(format!("{field}.url: {url:?} must be an http(s) URL")));
                }
                InputSource::Url(url.clone())
            }
            (None, Some(cm), None) => InputSource::ConfigMap { name: cm.name.clone(), key: cm.key.clone() },
            (None, None, Some(s3)) => InputSource::S3(s3_object(&format!("{field}.s3"), s3)?),
            _ => return Err(invalid(format!("{field}: set exactly one of url, configMapRef or s3"))),
        };
        let location_templated = match &source {
            InputSource::Url(u) => templated(u),
            InputSource::ConfigMap { key, .. } => templated(key),
            InputSource::S3(o) => templated(&o.key),
        };
        let sha256 = match (&input.sha256, input.sha256_per_task.as_slice()) {
            (Some(s), []) if is_sha256(s) => InputDigest::Shared(s.clone()),
            (Some(s), []) => return Err(invalid(format!("{field}.sha256: {s:?} is not a lowercase hex sha256"))),
            (None, list) if !list.is_empty() => {
                if list.len() != tasks as usize || list.len() > MAX_PER_TASK_DIGESTS {
                    return Err(invalid(format!(
                        "{field}.sha256PerTask lists {} digests for {tasks} tasks: give one per task (at most {MAX_PER_TASK_DIGESTS})",
                        list.len()
                    )));
                }
                if let Some((k, bad)) = list.iter().enumerate().find(|(_, s)| !is_sha256(s)) {
                    return Err(invalid(format!("{field}.sha256PerTask[{k}]: {bad:?} is not a lowercase hex sha256")));
                }
                InputDigest::PerTask(list.to_vec())
            }
            (None, _) => return Err(invalid(format!("{field} needs sha256 (or sha256PerTask with {{index}}) so agents can verify what they fetch"))),
            (Some(_), _) => return Err(invalid(format!("{field}: set sha256 or sha256PerTask, not both"))),
        };
        // A shared digest for a per-task source would fail every task but one; a per-task
        // digest list for one shared file is a typo of the path.
        match (&sha256, location_templated) {
            (InputDigest::Shared(_), true) => {
                return Err(invalid(format!("{field}: the source names {{index}}, so each task gets another file: give sha256PerTask, one digest per task")));
            }
            (InputDigest::PerTask(_), false) => {
                return Err(invalid(format!("{field}: sha256PerTask needs {{index}} in the source (url, configMapRef.key or s3.key)")));
            }
            _ => {}
        }
        out.push(JobInput { path: input.path.clone(), source, sha256 });
    }
    Ok(out)
}

/// Default `spec.outputs.maxFileSize`.
pub const DEFAULT_MAX_OUTPUT_FILE: u64 = 64 << 20;
/// Default `spec.outputs.maxAttemptSize`.
pub const DEFAULT_MAX_ATTEMPT_OUTPUTS: u64 = 256 << 20;
/// Default `spec.outputs.maxFiles` (stdout and stderr included).
pub const DEFAULT_MAX_OUTPUT_FILES: u32 = 64;
/// Largest `maxAttemptSize` a job may ask for: what one attempt may put on the operator's disk.
pub const MAX_ATTEMPT_OUTPUTS: u64 = kommune_proto::limits::MAX_ATTEMPT_OUTPUTS;

/// `spec.outputs` with its defaults.
pub fn outputs(o: &crd::JobOutputs) -> Result<JobOutputs, Invalid> {
    for (i, p) in o.paths.iter().enumerate() {
        if !is_plain_relative_path(p) {
            return Err(invalid(format!("spec.outputs.paths[{i}]: {p:?} must be a relative path of plain components under /scratch/out")));
        }
        if o.paths[..i].contains(p) {
            return Err(invalid(format!("spec.outputs.paths[{i}]: {p:?} is declared twice")));
        }
    }
    let verify = match &o.verify {
        None => o.paths.clone(),
        Some(v) => {
            if let Some((i, p)) = v.iter().enumerate().find(|(_, p)| !o.paths.contains(p)) {
                return Err(invalid(format!("spec.outputs.verify[{i}]: {p:?} is not one of spec.outputs.paths")));
            }
            v.clone()
        }
    };
    fn size(field: &'static str, q: &Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>, default: u64) -> Result<u64, Invalid> {
        let Some(q) = q else { return Ok(default) };
        let bytes = kommune_proto::quantity::memory_bytes(field, &q.0).map_err(|e| invalid(e.to_string()))?;
        if bytes == 0 || bytes > MAX_ATTEMPT_OUTPUTS {
            return Err(invalid(format!("{field} must be between 1 and 4Gi, got {:?}", q.0)));
        }
        Ok(bytes)
    }
    let max_file_bytes = size("spec.outputs.maxFileSize", &o.max_file_size, DEFAULT_MAX_OUTPUT_FILE)?;
    let max_attempt_bytes = size("spec.outputs.maxAttemptSize", &o.max_attempt_size, DEFAULT_MAX_ATTEMPT_OUTPUTS)?;
    let max_files = o.max_files.unwrap_or(DEFAULT_MAX_OUTPUT_FILES);
    if !(2..=1024).contains(&max_files) {
        return Err(invalid(format!("spec.outputs.maxFiles must be between 2 and 1024, got {max_files}")));
    }
    let destination = match &o.s3 {
        None => OutputDestination::Operator,
        Some(s3) => OutputDestination::S3(s3_object("spec.outputs.s3", s3)?),
    };
    Ok(JobOutputs { paths: o.paths.clone(), verify, max_file_bytes, max_attempt_bytes, max_files, destination })
}

fn s3_object(field: &str, s3: &S3Location) -> Result<S3Object, Invalid> {
    if !(s3.endpoint.starts_with("https://") || s3.endpoint.starts_with("http://")) {
        return Err(invalid(format!("{field}.endpoint: {:?} must be an http(s) URL", s3.endpoint)));
    }
    let bucket_ok = (3..=63).contains(&s3.bucket.len()) && s3.bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c));
    if !bucket_ok {
        return Err(invalid(format!("{field}.bucket: {:?} is not an S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)", s3.bucket)));
    }
    if s3.secret_ref.name.is_empty() {
        return Err(invalid(format!("{field}.secretRef.name must name a Secret of the job's namespace")));
    }
    Ok(S3Object {
        endpoint: s3.endpoint.trim_end_matches('/').to_string(),
        bucket: s3.bucket.clone(),
        key: s3.key.clone(),
        region: s3.region.clone().unwrap_or_else(|| "us-east-1".into()),
        path_style: s3.path_style.unwrap_or(true),
        secret: s3.secret_ref.name.clone(),
        credentials: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ComputeJobSpec;

    fn spec(yaml: &str) -> ComputeJobSpec {
        serde_yaml::from_str(&format!("workload:\n  exec:\n    command: [x]\n{yaml}")).expect("fixture parses")
    }

    fn check(yaml: &str) -> Result<Vec<JobInput>, Invalid> {
        let s = spec(yaml);
        inputs(&s.inputs, s.tasks)
    }

    #[test]
    fn shared_and_per_task_inputs_are_read() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let yaml = format!(
            "tasks: 2
inputs:
- {{path: dict.txt, url: 'https://data.example/dict.txt', sha256: '{a}'}}
- {{path: 'shard-{{index}}.csv', configMapRef: {{name: shards, key: 'shard-{{index}}.csv'}}, sha256PerTask: ['{a}', '{b}']}}
- {{path: model.bin, s3: {{endpoint: 'http://minio:9000/', bucket: models, key: m.bin, secretRef: {{name: s3}}}}, sha256: '{b}'}}
"
        );
        let ins = check(&yaml).unwrap();
        assert_eq!(ins.len(), 3);
        assert_eq!(ins[1].for_task(1).unwrap().sha256, b);
        let InputSource::S3(o) = &ins[2].source else { panic!("{:?}", ins[2].source) };
        assert_eq!((o.endpoint.as_str(), o.region.as_str(), o.path_style, o.secret.as_str()), ("http://minio:9000", "us-east-1", true, "s3"));
    }

    #[test]
    fn outputs_get_defaults_and_every_invalid_one_names_its_field() {
        let o = outputs(&spec("outputs: {paths: [result.txt, plots]}").outputs.unwrap()).unwrap();
        assert_eq!((o.verify.len(), o.max_file_bytes, o.max_attempt_bytes, o.max_files), (2, 64 << 20, 256 << 20, 64));
        assert!(o.counts("out/result.txt") && o.counts("out/plots/a.png") && !o.counts("out/plotsx") && !o.counts("stdout"));
        assert_eq!(o.destination, OutputDestination::Operator);
        let o = outputs(&spec("outputs: {paths: [a], verify: [], maxFileSize: 1Ki}").outputs.unwrap()).unwrap();
        assert!(!o.counts("out/a") && o.max_file_bytes == 1024);
        for (yaml, needle) in [
            ("outputs: {paths: [../x]}", "spec.outputs.paths[0]"),
            ("outputs: {paths: [a, a]}", "spec.outputs.paths[1]"),
            ("outputs: {paths: [a], verify: [b]}", "spec.outputs.verify[0]"),
            ("outputs: {maxFileSize: 8Gi}", "spec.outputs.maxFileSize"),
            ("outputs: {maxFiles: 1}", "spec.outputs.maxFiles"),
            ("outputs: {s3: {endpoint: 'ftp://x', bucket: out, secretRef: {name: s}}}", "spec.outputs.s3.endpoint"),
        ] {
            let err = outputs(&spec(yaml).outputs.unwrap()).expect_err(yaml);
            assert!(err.message.contains(needle), "{yaml}: {err}");
        }
    }

    #[test]
    fn every_invalid_input_names_its_field() {
        let a = "a".repeat(64);
        let cases = [
            (format!("inputs: [{{path: /etc/passwd, url: 'https://x/y', sha256: '{a}'}}]"), "spec.inputs[0].path"),
            (format!("inputs: [{{path: '../{{index}}', url: 'https://x/y', sha256: '{a}'}}]"), "spec.inputs[0].path"),
            ("inputs: [{path: a, url: 'https://x/y'}]".into(), "spec.inputs[0] needs sha256"),
            ("inputs: [{path: a, url: 'https://x/y', sha256: 'ABC'}]".into(), "spec.inputs[0].sha256"),
            (format!("inputs: [{{path: a, url: 'ftp://x/y', sha256: '{a}'}}]"), "spec.inputs[0].url"),
            (format!("inputs: [{{path: a, sha256: '{a}'}}]"), "set exactly one of url, configMapRef or s3"),
            (format!("inputs: [{{path: a, url: 'https://x/{{index}}', sha256: '{a}'}}]"), "give sha256PerTask"),
            (format!("tasks: 2\ninputs: [{{path: a, url: 'https://x/{{index}}', sha256PerTask: ['{a}']}}]"), "lists 1 digests for 2 tasks"),
            (format!("inputs: [{{path: a, url: 'https://x/y', sha256PerTask: ['{a}']}}]"), "needs {index} in the source"),
            (format!("inputs: [{{path: a, url: 'https://x/y', sha256: '{a}'}}, {{path: a, url: 'https://x/z', sha256: '{a}'}}]"), "spec.inputs[1].path"),
            (
                format!("inputs: [{{path: a, s3: {{endpoint: 'https://s3', bucket: B_, key: k, secretRef: {{name: s}}}}, sha256: '{a}'}}]"),
                "spec.inputs[0].s3.bucket",
            ),
        ];
        for (yaml, needle) in cases {
            let err = check(&yaml).expect_err(&yaml);
            assert_eq!(err.reason, "InvalidSpec");
            assert!(err.message.contains(needle), "{yaml}: {err}");
        }
    }
}
