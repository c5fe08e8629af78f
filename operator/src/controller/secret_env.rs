//! Reads the Secret keys a job's env names (`valueFrom.secretKeyRef`) from the job's namespace
//! into the policy sent to agents; values never go to status, Events or logs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use super::Error;
use super::inputs::NotReady;
use crate::controller::job::Context;
use crate::crd::ComputeJobSpec;
use crate::job::JobPolicy;
use crate::job::secret_env::{EXPOSE_LABEL, fill, secret_env};

/// Largest value one key may give (the CRD's bound on a literal `value`).
const MAX_VALUE: usize = 32 * 1024;

/// Fills the job's Secret env values into `policy`. Ok(Err(..)) when a Secret or key is
/// missing, not marked for providers, or unreadable by the operator: the job waits on it.
pub async fn resolve(ctx: &Context, ns: &str, spec: &ComputeJobSpec, policy: &mut JobPolicy) -> Result<Result<(), NotReady>, Error> {
    let refs = match secret_env(spec) {
        Ok(r) if r.is_empty() => return Ok(Ok(())),
        Ok(r) => r,
        // Refused by validation already; kept as a wait so no path sends an unfilled entry.
        Err(why) => return Ok(Err((why.reason, why.message))),
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut read: BTreeMap<&str, Secret> = BTreeMap::new();
    let mut values = Vec::with_capacity(refs.len());
    for r in &refs {
        let name = r.secret.as_str();
        let unavailable = |why: String| Ok(Err(("SecretUnavailable", format!("Secret {ns}/{name} ({}.valueFrom.secretKeyRef) {why}", r.field))));
        if !read.contains_key(name) {
            match api.get_opt(name).await {
                Ok(Some(s)) => read.insert(name, s),
                Ok(None) => return unavailable("does not exist".into()),
                Err(kube::Error::Api(s)) if s.code == 403 => {
                    return unavailable("cannot be read by the operator: the cluster admin allows it with the chart's jobSecrets.enabled".into());
                }
                Err(e) => return Err(e.into()),
            };
        }
        let Some(secret) = read.get(name) else { return unavailable("could not be read".into()) };
        let marked = secret.metadata.labels.as_ref().and_then(|l| l.get(EXPOSE_LABEL)).is_some_and(|v| v == "true");
        if !marked {
            return Ok(Err((
                "SecretNotExposed",
                format!(
                    "Secret {ns}/{name} ({}.valueFrom.secretKeyRef) is not labelled {EXPOSE_LABEL}=true: only Secrets whose editors marked them for providers give env values",
                    r.field
                ),
            )));
        }
        let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(&r.key)) else {
            return unavailable(format!("has no key {:?}", r.key));
        };
        if bytes.0.len() > MAX_VALUE {
            return unavailable(format!("key {:?} holds {} bytes, more than {MAX_VALUE}", r.key, bytes.0.len()));
        }
        match String::from_utf8(bytes.0.clone()) {
            Ok(v) => values.push(v),
            Err(_) => return unavailable(format!("key {:?} is not UTF-8 text, as an environment variable must be", r.key)),
        }
    }
    fill(&mut policy.workload, &refs, values);
    Ok(Ok(()))
}
