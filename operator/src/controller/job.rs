//! The ComputeJob controller: validate → resolve the module → sync through the dispatcher →
//! write status and Events. Level-triggered and idempotent; a finalizer cancels running
//! attempts before a deleted job goes away.

use std::sync::Arc;
use std::time::Duration;

use crate::controller::events::EventWriter;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument as _, info, warn};

use super::{Error, MANAGER};
use crate::blobs::{BlobError, BlobOwner, Blobs};
use crate::crd::{ComputeJob, ComputeJobStatus, JobPhase};
use crate::dispatch::{Dispatcher, JobRef, ModuleRef};
use crate::job::status::{self, Observed, Severity};
use crate::job::{JobPolicy, ModuleSource, TaskWorkload, validate};
use crate::metrics::Metrics;
use kommune_proto::now_ms;

/// Finalizer that holds a deleted job until its attempts are cancelled.
pub const FINALIZER: &str = "kommune.dev/cleanup";
/// Largest module accepted from a ConfigMap (the API server caps objects near 1 MiB anyway).
const MAX_CONFIGMAP_MODULE: usize = 3 << 20;
/// How often an active job is looked at even when nothing signals a change.
const ACTIVE_REQUEUE: Duration = Duration::from_secs(30);
/// How soon a job whose tasks wait for room is tried again.
const UNPLACED_REQUEUE: Duration = Duration::from_secs(5);

/// Shared state of the controller.
pub struct Context {
    pub client: kube::Client,
    pub dispatcher: Arc<Dispatcher>,
    pub blobs: Blobs,
    pub recorder: EventWriter,
    pub metrics: Arc<Metrics>,
}

impl Context {
    pub fn new(client: kube::Client, dispatcher: Arc<Dispatcher>, blobs: Blobs, metrics: Arc<Metrics>) -> Self {
        let recorder = super::recorder(client.clone());
        Context { client, dispatcher, blobs, recorder, metrics }
    }
}

/// Runs the controller until shutdown. `changed` carries "namespace/name" of jobs whose
/// attempts changed; `nodes_changed` fires when capacity appears (a node connected).
pub async fn run(ctx: Arc<Context>, changed: mpsc::Receiver<String>, nodes_changed: mpsc::Receiver<()>) {
    let api: Api<ComputeJob> = Api::all(ctx.client.clone());
    let jobs = ReceiverStream::new(changed).filter_map(|key| async move {
        let (ns, name) = key.split_once('/')?;
        Some(ObjectRef::<ComputeJob>::new(name).within(ns))
    });
    Controller::new(api, watcher::Config::default().any_semantic())
        .reconcile_on(jobs)
        .reconcile_all_on(ReceiverStream::new(nodes_changed))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// What the controller does when a reconcile fails: log, count, tell the job's owner with a
/// Warning Event, and try again in 15 s.
pub fn error_policy(job: Arc<ComputeJob>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(job = %job.name_any(), namespace = ?job.namespace(), error = %error, "reconcile failed");
    ctx.metrics.reconcile_error(error.label());
    // Tell the job's owner too, so a failing reconcile (a missing permission, a store error) is
    // never a silent Pending. The recorder folds repeats into one Event with a count.
    let message = format!("the operator could not reconcile this job ({}): {error}", error.label());
    tokio::spawn(async move { event(&ctx, &job, Severity::Warning, "ReconcileError", &message).await });
    Action::requeue(Duration::from_secs(15))
}

/// Reconciles one ComputeJob.
pub async fn reconcile(job: Arc<ComputeJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_job(job, &ctx).await;
    ctx.metrics.reconciled(started.elapsed(), result.is_ok());
    result
}

async fn reconcile_job(job: Arc<ComputeJob>, ctx: &Arc<Context>) -> Result<Action, Error> {
    let ns = job.namespace().ok_or_else(|| Error::MissingMetadata(job.name_any()))?;
    let api: Api<ComputeJob> = Api::namespaced(ctx.client.clone(), &ns);
    // The root of a task's trace when traces are exported: placement and its Assigns are children.
    let span = kommune_telemetry::span!("reconcile", job = %format!("{ns}/{}", job.name_any()), generation = job.metadata.generation.unwrap_or_default());
    finalizer(&api, FINALIZER, job, |event| async {
        match event {
            Finalizer::Apply(job) => apply(&job, ctx).await,
            Finalizer::Cleanup(job) => cleanup(&job, ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

fn job_ref(job: &ComputeJob) -> Result<JobRef, Error> {
    match (job.namespace(), job.uid()) {
        (Some(ns), Some(uid)) => Ok(JobRef { uid, key: format!("{ns}/{}", job.name_any()) }),
        _ => Err(Error::MissingMetadata(job.name_any())),
    }
}

fn namespace_of_job(job: &ComputeJob) -> &str {
    job.metadata.namespace.as_deref().unwrap_or_default()
}

async fn apply(job: &ComputeJob, ctx: &Context) -> Result<Action, Error> {
    let generation = job.metadata.generation;
    let prev = job.status.clone().unwrap_or_default();
    let jr = job_ref(job)?;

    let mut policy = match validate(&job.spec) {
        Ok(p) => p,
        Err(why) => {
            publish(ctx, job, &prev, &status::invalid(&prev, generation, &why)).await?;
            return Ok(Action::await_change());
        }
    };

    // Told once per generation: the status and placement follow the cap on every sync.
    let cap = ctx.dispatcher.fleet().pool().fair().max_priority(namespace_of_job(job));
    if policy.priority > cap && prev.observed_generation != generation {
        let note = format!(
            "spec.priority {} is above the {cap} the cluster admin lets namespace {} use (--namespace-max-priority): the job is ranked at {cap}",
            policy.priority,
            namespace_of_job(job)
        );
        event(ctx, job, Severity::Warning, "PriorityCapped", &note).await;
    }

    // What the status records as done is done, even when the store lost it (an empty data
    // directory): those tasks are not run or billed again and an ended job stays ended.
    let (recorded, unreadable) = crate::job::recorded::from_status(&prev);
    for e in unreadable {
        warn!(job = %jr.key, error = %e, "ignoring an unreadable index list in the job's status");
    }

    // A job that has ended lets go of its module (the sweep deletes it after the grace unless
    // another job holds it), and its ConfigMap is not read or stored again.
    let ended = ctx.dispatcher.job_ended(&jr.uid, &policy, &recorded).await?;
    let module = if ended {
        ctx.blobs.release_job(&jr.uid)?;
        None
    } else {
        match resolve_module(ctx, job, &policy).await? {
            Ok(m) => m,
            Err((reason, message)) => {
                publish(ctx, job, &prev, &status::waiting_for_module(&prev, generation, reason, &message)).await?;
                return Ok(Action::requeue(ACTIVE_REQUEUE));
            }
        }
    };
    if !ended && let Err((reason, message)) = super::inputs::resolve(ctx, namespace_of_job(job), &jr.uid, &mut policy).await? {
        publish(ctx, job, &prev, &status::waiting_for_module(&prev, generation, reason, &message)).await?;
        return Ok(Action::requeue(ACTIVE_REQUEUE));
    }
    if !ended && let Err((reason, message)) = super::secret_env::resolve(ctx, namespace_of_job(job), &job.spec, &mut policy).await? {
        publish(ctx, job, &prev, &status::waiting_for_module(&prev, generation, reason, &message)).await?;
        return Ok(Action::requeue(ACTIVE_REQUEUE));
    }
    if let Err((reason, message)) = super::outputs::resolve(ctx, namespace_of_job(job), &jr.uid, &mut policy).await? {
        publish(ctx, job, &prev, &status::waiting_for_module(&prev, generation, reason, &message)).await?;
        return Ok(Action::requeue(ACTIVE_REQUEUE));
    }
    let module_sha256 = match &module {
        Some(m) => Some(m.sha256.as_str()),
        None if ended => prev.module_sha256.as_deref(),
        None => None,
    };

    let sync_started = now_ms();
    let synced = ctx.dispatcher.sync_recorded(&jr, &policy, module.as_ref(), &recorded).await?;
    let now = now_ms();
    if let Some(note) = super::job_events::retries(&synced.attempts, sync_started) {
        event(ctx, job, Severity::Normal, "Retrying", &note).await;
    }
    let mut next = status::summarize(
        &prev,
        &Observed {
            generation,
            runtime: policy.workload.runtime(),
            progress: &synced.progress,
            attempts: &synced.attempts,
            unplaced: synced.unplaced.as_ref(),
            module_sha256,
            suspended: policy.suspended,
            now_ms: now,
            budget_exhausted: synced.budget_exhausted.as_deref(),
            usage: synced.usage.clone(),
        },
    );
    let refused = super::outputs::stored_condition(ctx, &jr.uid, &policy, generation, &mut next);
    publish(ctx, job, &prev, &next).await?;
    if let Some(why) = refused {
        event(ctx, job, Severity::Warning, "OutputStoreFull", &why).await;
    }

    Ok(match synced.progress.phase {
        JobPhase::Succeeded | JobPhase::Failed => match super::outputs::expire(ctx, job, &next).await? {
            Some(left) => Action::requeue(left + Duration::from_secs(1)),
            None => Action::await_change(),
        },
        _ if synced.unplaced.is_some() => Action::requeue(UNPLACED_REQUEUE),
        _ => {
            let retry = synced.progress.next_retry_ms.map(|t| Duration::from_millis((t - now).max(0) as u64 + 50));
            Action::requeue(retry.map_or(ACTIVE_REQUEUE, |r| r.min(ACTIVE_REQUEUE)))
        }
    })
}

async fn cleanup(job: &ComputeJob, ctx: &Context) -> Result<Action, Error> {
    let jr = job_ref(job)?;
    let cancelled = ctx.dispatcher.cancel_job(&jr.uid).await?;
    // Its attempts are cancelled, so none will fetch the module or inputs: they go after the grace.
    ctx.blobs.release_job(&jr.uid)?;
    super::outputs::remove(ctx, &jr.uid);
    if cancelled > 0 {
        info!(job = %jr.key, cancelled, "cancelled attempts of a deleted job");
        event(ctx, job, Severity::Normal, "Cancelled", &format!("cancelled {cancelled} running attempt(s) of the deleted job")).await;
    }
    Ok(Action::await_change())
}

/// Writes status when it changed, and the Events the change deserves.
async fn publish(ctx: &Context, job: &ComputeJob, prev: &ComputeJobStatus, next: &ComputeJobStatus) -> Result<(), Error> {
    if next == prev {
        return Ok(());
    }
    let ns = job.namespace().unwrap_or_default();
    let api: Api<ComputeJob> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({ "apiVersion": "kommune.dev/v1alpha1", "kind": "ComputeJob", "status": next });
    ctx.dispatcher.may_write()?;
    api.patch_status(&job.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await.map_err(Error::StatusPatch)?;
    for (severity, reason, note) in status::events(prev, next) {
        event(ctx, job, severity, &reason, &note).await;
    }
    Ok(())
}

/// Publishes an Event about the job.
async fn event(ctx: &Context, job: &ComputeJob, severity: Severity, reason: &str, note: &str) {
    super::publish_event(&ctx.recorder, &ctx.dispatcher, &job.object_ref(&()), severity, reason, note).await;
}

/// Finds the module a wasm job runs. Ok(Err((reason, message))) when it is not available yet.
async fn resolve_module(ctx: &Context, job: &ComputeJob, policy: &JobPolicy) -> Result<Result<Option<ModuleRef>, (&'static str, String)>, Error> {
    let uid = job.uid().unwrap_or_default();
    // A job whose spec moved off a ConfigMap module holds none on the operator's volume.
    let TaskWorkload::Wasm { source, .. } = &policy.workload else {
        ctx.blobs.release(&uid)?;
        return Ok(Ok(None));
    };
    let (name, key, expected) = match source {
        ModuleSource::Url { url, sha256 } => {
            ctx.blobs.release(&uid)?;
            return Ok(Ok(Some(ModuleRef { sha256: sha256.clone(), url: Some(url.clone()) })));
        }
        ModuleSource::ConfigMap { name, key, sha256 } => (name, key, sha256),
    };
    let ns = job.namespace().unwrap_or_default();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(cm) = api.get_opt(name).await? else {
        return Ok(Err(("ModuleUnavailable", format!("ConfigMap {ns}/{name} (spec.workload.wasm.configMapRef) does not exist"))));
    };
    let bytes = cm
        .binary_data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| cm.data.as_ref().and_then(|d| d.get(key)).map(|s| s.as_bytes().to_vec()));
    let Some(bytes) = bytes else {
        let mut keys: Vec<String> = cm.binary_data.iter().flat_map(|d| d.keys().cloned()).chain(cm.data.iter().flat_map(|d| d.keys().cloned())).collect();
        keys.sort();
        return Ok(Err(("ModuleUnavailable", format!("ConfigMap {ns}/{name} has no key {key:?} (it has: {})", keys.join(", ")))));
    };
    if bytes.len() > MAX_CONFIGMAP_MODULE {
        return Ok(Err(("ModuleUnavailable", format!("ConfigMap {ns}/{name} key {key:?} holds {} bytes, more than {MAX_CONFIGMAP_MODULE}", bytes.len()))));
    }
    let sha = kommune_proto::sha256_hex(&bytes);
    if let Some(want) = expected
        && want != &sha
    {
        return Ok(Err(("ModuleDigestMismatch", format!("ConfigMap {ns}/{name} key {key:?} has sha256 {sha}, but spec.workload.wasm.sha256 is {want}"))));
    }
    // Stored as this job's module; the one it held before is let go of. Over the namespace's
    // quota nothing is stored and the job keeps what it held (attempts running it go on).
    match ctx.blobs.put_for(BlobOwner { job_uid: &uid, namespace: &ns }, &bytes) {
        Ok(_) => Ok(Ok(Some(ModuleRef { sha256: sha, url: None }))),
        Err(e @ BlobError::QuotaExceeded { .. }) => Ok(Err(("BlobQuotaExceeded", e.to_string()))),
        Err(e) => Err(e.into()),
    }
}
