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
        for dir in ["crds", "charts/kommune/files/crds"] {
            let path = repo().join(dir).join(file);
            let have = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(have == want, "{} is out of date: run `cargo run -p kommune-operator -- crdgen`", path.display());
        }
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
