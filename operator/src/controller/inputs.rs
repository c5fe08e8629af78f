//! What a job's inputs need from Kubernetes before its tasks can be placed: ConfigMap keys
//! stored as blobs the job holds (served with FetchBlob), and S3 credentials read from a Secret
//! the job names, for presigning. Nothing read here is ever sent to a provider but blobs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;

use super::Error;
use crate::blobs::{BlobError, BlobOwner, input_owner};
use crate::controller::job::Context;
use crate::job::JobPolicy;
use kommune_core::job::{InputSource, S3Credentials, S3Object};

/// The Secret type whose credentials jobs may presign with: its owner's consent. A job's author
/// can name any Secret of the namespace, including ones they cannot read; only this type lets
/// the operator sign with it.
pub const S3_SECRET_TYPE: &str = "kommune.dev/s3-credentials";
/// Most per-task files one ConfigMap input may store (a ConfigMap holds ~1 MiB anyway).
const MAX_CONFIGMAP_TASK_FILES: u32 = 1000;
/// Largest file one ConfigMap key may give.
const MAX_CONFIGMAP_INPUT: usize = 3 << 20;

/// Why a job's inputs are not ready: (condition reason, message).
pub type NotReady = (&'static str, String);

/// Stores the job's ConfigMap inputs and fills in the credentials of its S3 inputs. Ok(Err(..)) when something is missing or wrong, which the job waits on.
pub async fn resolve(ctx: &Context, ns: &str, uid: &str, policy: &mut JobPolicy) -> Result<Result<(), NotReady>, Error> {
    let mut configmaps: BTreeMap<String, Option<ConfigMap>> = BTreeMap::new();
    let mut secrets: BTreeMap<String, S3Credentials> = BTreeMap::new();
    let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let tasks = policy.tasks;
    let mut held = vec![];
    for (i, input) in policy.inputs.iter_mut().enumerate() {
        if let InputSource::S3(o) = &mut input.source {
            if let Err(e) = credentials(ctx, ns, o, &mut secrets).await? {
                return Ok(Err(e));
            }
            continue;
        }
        let input = &*input;
        match &input.source {
            InputSource::Url(_) | InputSource::S3(_) => {}
            InputSource::ConfigMap { name, .. } => {
                let per_task = input.per_task();
                if per_task && tasks > MAX_CONFIGMAP_TASK_FILES {
                    let msg = format!("spec.inputs[{i}]: per-task ConfigMap inputs serve at most {MAX_CONFIGMAP_TASK_FILES} tasks; use url or s3 for {tasks}");
                    return Ok(Err(("InputUnavailable", msg)));
                }
                if !configmaps.contains_key(name.as_str()) {
                    configmaps.insert(name.clone(), cm_api.get_opt(name).await?);
                }
                let Some(cm) = configmaps.get(name.as_str()).and_then(Option::as_ref) else {
                    return Ok(Err(("InputUnavailable", format!("ConfigMap {ns}/{name} (spec.inputs[{i}].configMapRef) does not exist"))));
                };
                let indexes: Vec<Option<u32>> = if per_task { (0..tasks).map(Some).collect() } else { vec![None] };
                for index in indexes {
                    let Some(task) = input.for_task(index.unwrap_or(0)) else { continue };
                    let key = &task.location;
                    let bytes = cm
                        .binary_data
                        .as_ref()
                        .and_then(|d| d.get(key))
                        .map(|b| b.0.clone())
                        .or_else(|| cm.data.as_ref().and_then(|d| d.get(key)).map(|s| s.as_bytes().to_vec()));
                    let Some(bytes) = bytes else {
                        return Ok(Err(("InputUnavailable", format!("ConfigMap {ns}/{name} has no key {key:?} (spec.inputs[{i}])"))));
                    };
                    if bytes.len() > MAX_CONFIGMAP_INPUT {
                        return Ok(Err((
                            "InputUnavailable",
                            format!("ConfigMap {ns}/{name} key {key:?} holds {} bytes, more than {MAX_CONFIGMAP_INPUT}", bytes.len()),
                        )));
                    }
                    let sha = kommune_proto::sha256_hex(&bytes);
                    if sha != task.sha256 {
                        let msg = format!("ConfigMap {ns}/{name} key {key:?} has sha256 {sha}, but spec.inputs[{i}] expects {}", task.sha256);
                        return Ok(Err(("InputDigestMismatch", msg)));
                    }
                    let owner = input_owner(uid, i, index);
                    match ctx.blobs.put_for(BlobOwner { job_uid: &owner, namespace: ns }, &bytes) {
                        Ok(_) => held.push(owner),
                        Err(e @ BlobError::QuotaExceeded { .. }) => return Ok(Err(("BlobQuotaExceeded", e.to_string()))),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }
    // An input the spec no longer has lets go of its blob.
    for key in ctx.blobs.input_keys(uid) {
        if !held.contains(&key) {
            ctx.blobs.release(&key)?;
        }
    }
    Ok(Ok(()))
}

/// Reads `o`'s Secret (once per reconcile) into `o.credentials`.
pub(super) async fn credentials(ctx: &Context, ns: &str, o: &mut S3Object, read: &mut BTreeMap<String, S3Credentials>) -> Result<Result<(), NotReady>, Error> {
    if let Some(c) = read.get(&o.secret) {
        o.credentials = Some(c.clone());
        return Ok(Ok(()));
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = &o.secret;
    let secret = match api.get_opt(name).await {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(Err(("S3CredentialsUnavailable", format!("Secret {ns}/{name} (s3.secretRef) does not exist")))),
        // Not the job's fault nor a passing failure: the job waits, saying who can fix it.
        Err(kube::Error::Api(s)) if s.code == 403 => {
            return Ok(Err((
                "S3CredentialsUnavailable",
                format!("Secret {ns}/{name} (s3.secretRef) cannot be read by the operator: the cluster admin allows it with the chart's jobSecrets.enabled"),
            )));
        }
        Err(e) => return Err(e.into()),
    };
    if secret.type_.as_deref() != Some(S3_SECRET_TYPE) {
        return Ok(Err((
            "S3CredentialsUnavailable",
            format!("Secret {ns}/{name} is not of type {S3_SECRET_TYPE}: only Secrets made for jobs are used to presign (recreate it with that type)"),
        )));
    }
    let field = |k: &str| secret.data.as_ref().and_then(|d| d.get(k)).and_then(|b| String::from_utf8(b.0.clone()).ok()).filter(|v| !v.is_empty());
    let (Some(access_key_id), Some(secret_access_key)) = (field("accessKeyId"), field("secretAccessKey")) else {
        return Ok(Err(("S3CredentialsUnavailable", format!("Secret {ns}/{name} needs the keys accessKeyId and secretAccessKey"))));
    };
    let c = S3Credentials { access_key_id, secret_access_key };
    read.insert(o.secret.clone(), c.clone());
    o.credentials = Some(c);
    Ok(Ok(()))
}
