//! What a job's outputs need from Kubernetes: its bucket's credentials (for presigned PUTs and
//! GETs), the `OutputsStored` condition when the operator's store refused an output for lack
//! of room, and `spec.ttlSecondsAfterFinished` (the job, and its outputs, deleted after it).

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Api, DeleteParams};
use kube::{Resource, ResourceExt};

use super::Error;
use super::inputs::NotReady;
use crate::controller::job::Context;
use crate::crd::{ComputeJob, ComputeJobStatus, condition, set_condition};
use crate::job::JobPolicy;
use kommune_core::job::data::OutputDestination;

/// The condition a full output store sets.
pub const CONDITION: &str = "OutputsStored";

/// Reads the credentials of the job's output bucket into its policy and hands them to the
/// output store (for the presigned GETs of retrieval). Ok(Err(..)) when the Secret is unusable.
pub async fn resolve(ctx: &Context, ns: &str, uid: &str, policy: &mut JobPolicy) -> Result<Result<(), NotReady>, Error> {
    let Some(OutputDestination::S3(bucket)) = policy.outputs.as_mut().map(|o| &mut o.destination) else {
        return Ok(Ok(()));
    };
    if let Err(e) = super::inputs::credentials(ctx, ns, bucket, &mut BTreeMap::new()).await? {
        return Ok(Err(e));
    }
    if let Some(store) = ctx.dispatcher.outputs() {
        store.set_bucket(uid, Some(bucket.clone()));
    }
    Ok(Ok(()))
}

/// Sets `OutputsStored` on `next`: False with the refusal while the operator's store refuses
/// the job's outputs for lack of room, True once one is stored again. Returns the refusal when
/// the condition just turned False (for a Warning Event).
pub fn stored_condition(ctx: &Context, uid: &str, policy: &JobPolicy, generation: Option<i64>, next: &mut ComputeJobStatus) -> Option<String> {
    let store = ctx.dispatcher.outputs()?;
    if policy.outputs.as_ref().is_none_or(|o| o.destination != OutputDestination::Operator) {
        return None;
    }
    let was_false = next.conditions.iter().any(|c| c.type_ == CONDITION && c.status == "False");
    match store.refusal(uid) {
        Some(why) => {
            set_condition(&mut next.conditions, condition(CONDITION, false, "OutputStoreFull", why.clone(), generation));
            (!was_false).then_some(why)
        }
        None => {
            if next.conditions.iter().any(|c| c.type_ == CONDITION) {
                set_condition(&mut next.conditions, condition(CONDITION, true, "Stored", "task outputs are stored", generation));
            }
            None
        }
    }
}

/// For a finished job with `ttlSecondsAfterFinished`: deletes it once the time has come (its
/// finalizer then removes its outputs); returns how long until then while it has not.
pub async fn expire(ctx: &Context, job: &ComputeJob, status: &ComputeJobStatus) -> Result<Option<Duration>, Error> {
    let (Some(ttl), Some(done)) = (job.spec.ttl_seconds_after_finished, status.completion_time.as_ref()) else {
        return Ok(None);
    };
    let due_ms = done.0.as_millisecond().saturating_add(ttl.max(0).saturating_mul(1000));
    let left = due_ms - kommune_proto::now_ms();
    if left > 0 {
        return Ok(Some(Duration::from_millis(left as u64)));
    }
    if job.meta().deletion_timestamp.is_none() {
        ctx.dispatcher.may_write()?;
        let api: Api<ComputeJob> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
        match api.delete(&job.name_any(), &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Removes the job's outputs (it is being deleted).
pub fn remove(ctx: &Context, uid: &str) {
    if let Some(store) = ctx.dispatcher.outputs()
        && let Err(e) = store.remove_job(uid)
    {
        tracing::warn!(job_uid = uid, error = %e, "cannot remove the deleted job's outputs");
    }
}
