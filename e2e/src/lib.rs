//! Kommune's end-to-end suite. The tests live in `tests/`; see `e2e/README.md` for how to run
//! them. This library holds the helpers they share.

use std::path::PathBuf;
use std::process::Command;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A helm binary: `$HELM`, else `helm` on PATH, else the pinned one `.ci/helm-check.sh` caches.
pub fn helm() -> Option<PathBuf> {
    let cache = std::env::var_os("KOMMUNE_TOOLS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("kommune")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kommune")))
        .map(|d| d.join("helm-v3.18.0/helm"));
    let candidates = [std::env::var_os("HELM").map(PathBuf::from), Some(PathBuf::from("helm")), cache];
    candidates.into_iter().flatten().find(|p| Command::new(p).arg("version").output().is_ok_and(|o| o.status.success()))
}

/// Renders the chart as `helm template kommune charts/kommune -n <namespace>` with `--set` pairs.
pub fn render_chart(helm: &std::path::Path, namespace: &str, set: &[&str]) -> anyhow::Result<String> {
    render_release(helm, "kommune", namespace, set)
}

/// [`render_chart`] as release `release`.
pub fn render_release(helm: &std::path::Path, release: &str, namespace: &str, set: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(helm);
    cmd.args(["template", release]).arg(repo().join("charts/kommune")).args(["--namespace", namespace]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output()?;
    anyhow::ensure!(out.status.success(), "helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// Splits a multi-document YAML stream into its non-empty documents.
pub fn documents(yaml: &str) -> anyhow::Result<Vec<serde_yaml::Value>> {
    let mut docs = vec![];
    for d in serde_yaml::Deserializer::from_str(yaml) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(d)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}
