//! Keeps the cluster's ComputeJob and ProviderNode CRDs at this operator's schema. Helm
//! installs them from the chart's `crds/` directory once and never upgrades them, so an
//! operator started with `--upgrade-crds` applies its own (server-side apply, forced) on start.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::MANAGER;
use crate::crd;

/// The first Kubernetes minor version that accepts `x-kubernetes-validations` (CEL rules).
pub const FIRST_CEL_MINOR: u32 = 25;

/// What [`upgrade`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgraded {
    pub names: Vec<String>,
    /// Whether the CEL rules were left out because the API server predates them.
    pub without_cel: bool,
}

/// Why the CRDs could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("the CRD {0} is not installed: `helm install` installs it from the chart's crds/, or run `kubectl apply -f crds/`")]
    Missing(String),
    #[error("cannot upgrade the CRD {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Whether an API server of `major.minor` (as `/version` reports them, e.g. "1", "20+")
/// accepts CEL validation rules in CRDs.
pub fn server_has_cel(major: &str, minor: &str) -> bool {
    let minor: u32 = minor.trim_end_matches('+').parse().unwrap_or(0);
    match major.parse::<u32>() {
        Ok(1) => minor >= FIRST_CEL_MINOR,
        Ok(m) => m > 1,
        Err(_) => false,
    }
}

/// The CRD as it should be applied to a server with or without CEL: an older server would
/// refuse the whole apply over the unknown `x-kubernetes-validations` field, and enforces none
/// of them anyway (the operator's own validation still does).
pub fn for_server(crd: &CustomResourceDefinition, cel: bool) -> serde_json::Value {
    let mut value = serde_json::to_value(crd).expect("a CRD always serialises to JSON");
    if !cel {
        strip_key(&mut value, "x-kubernetes-validations");
    }
    value
}

fn strip_key(value: &mut serde_json::Value, key: &str) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove(key);
            map.values_mut().for_each(|v| strip_key(v, key));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| strip_key(v, key)),
        _ => {}
    }
}

/// Applies this operator's CRDs over the installed ones. It only updates: a CRD that is not
/// installed is an error naming how to install it (creating CRDs would need a cluster-wide
/// `create` on every CRD; updating ours needs `patch` on two names).
pub async fn upgrade(client: kube::Client) -> Result<Upgraded, UpgradeError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let version = client.apiserver_version().await.map_err(|source| UpgradeError::Api { name: "(server version)".into(), source })?;
    let cel = server_has_cel(&version.major, &version.minor);
    let mut names = vec![];
    for (_, wanted) in crd::all() {
        let name = wanted.metadata.name.clone().unwrap_or_default();
        match api.get_opt(&name).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(UpgradeError::Missing(name)),
            Err(source) => return Err(UpgradeError::Api { name, source }),
        }
        let params = PatchParams::apply(MANAGER).force();
        api.patch(&name, &params, &Patch::Apply(for_server(&wanted, cel))).await.map_err(|source| UpgradeError::Api { name: name.clone(), source })?;
        names.push(name);
    }
    Ok(Upgraded { names, without_cel: !cel })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cel_rules_are_sent_only_to_servers_that_know_them() {
        for (major, minor, cel) in [("1", "20", false), ("1", "24+", false), ("1", "25", true), ("1", "30+", true), ("2", "0", true), ("", "", false)] {
            assert_eq!(server_has_cel(major, minor), cel, "{major}.{minor}");
        }
        let (_, job) = crd::all().remove(0);
        let count = |v: &serde_json::Value| v.to_string().matches("x-kubernetes-validations").count();
        let full = for_server(&job, true);
        assert!(count(&full) > 0, "the ComputeJob CRD carries CEL rules");
        assert_eq!(count(&for_server(&job, false)), 0);
        // Nothing else is taken out.
        let mut stripped = full.clone();
        strip_key(&mut stripped, "x-kubernetes-validations");
        assert_eq!(stripped, for_server(&job, false));
        assert_eq!(for_server(&job, false)["spec"]["names"], full["spec"]["names"]);
    }
}
