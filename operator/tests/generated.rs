//! Generated and hand-written manifests stay true to the code: the committed CRD YAML (in
//! crds/ and in the chart) equals what `kommune-operator crdgen` writes, and every example
//! ComputeJob parses into the typed struct and passes the operator's validation.

use std::path::PathBuf;

use kommune_operator::crd::{self, ComputeJob};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crds_match_the_code() {
    for (file, generated) in crd::all() {
        let want = crd::to_yaml(&generated);
        for dir in ["crds", "charts/kommune/crds"] {
            let path = repo().join(dir).join(file);
            let have = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(have == want, "{} is out of date: run `cargo run -p kommune-operator -- crdgen`", path.display());
        }
    }
}

/// `kubectl explain` wraps descriptions itself: a line break inside a paragraph, left over
/// from a doc comment's wrapping, would cut a sentence in two. Only paragraph breaks and list
/// items may start a new line.
#[test]
fn no_generated_description_breaks_a_line_inside_a_paragraph() {
    let mut seen = 0;
    for (file, generated) in crd::all() {
        let mut descriptions = vec![];
        collect_descriptions(&serde_json::to_value(&generated).unwrap(), &mut descriptions);
        for text in &descriptions {
            for (before, after) in text.split("\n\n").flat_map(|p| p.lines().zip(p.lines().skip(1))) {
                assert!(crd::description::is_list_item(after), "{file}: a line break between {before:?} and {after:?} in {text:?}");
            }
        }
        seen += descriptions.len();
    }
    assert!(seen > 50, "expected the CRDs' field descriptions, found {seen}");
    let wasm = "A WebAssembly (WASI preview 1) command module: sandboxed, portable, deterministic. The recommended runtime for untrusted providers.";
    let text = std::fs::read_to_string(repo().join("crds/computejob.yaml")).unwrap();
    assert!(text.contains(wasm), "crds/computejob.yaml lacks {wasm:?}");
}

fn collect_descriptions(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match v {
                    serde_json::Value::String(text) if key == "description" => out.push(text.clone()),
                    other => collect_descriptions(other, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_descriptions(v, out)),
        _ => {}
    }
}

#[test]
fn examples_are_valid_compute_jobs() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
            if value["kind"] != "ComputeJob" {
                continue;
            }
            let job: ComputeJob = serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            kommune_operator::job::validate(&job.spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected the wasm and exec examples, found {seen} ComputeJobs");
}

/// The word-count example ships its shards in a ConfigMap next to the job: every digest the
/// job expects must be that of the ConfigMap key it names, or the example waits forever.
#[test]
fn the_word_count_examples_input_digests_match_its_configmap() {
    let text = std::fs::read_to_string(repo().join("examples/word-count.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let data = &docs[0]["data"];
    let job: ComputeJob = serde_yaml::from_value(docs[1].clone()).unwrap();
    let policy = kommune_operator::job::validate(&job.spec).unwrap();
    for input in &policy.inputs {
        for index in 0..job.spec.tasks {
            let task = input.for_task(index).unwrap();
            let content = data[task.location.as_str()].as_str().unwrap_or_else(|| panic!("no key {}", task.location));
            assert_eq!(kommune_proto::sha256_hex(content.as_bytes()), task.sha256, "{} for task {index}", task.location);
        }
    }
}
