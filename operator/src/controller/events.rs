//! Events the operator records, through kube-runtime's `Recorder` (events.k8s.io, repeats
//! folded into one Event with a count), with a fallback for cluster-scoped objects.
//!
//! Events about cluster-scoped objects (ProviderNodes) go to the `default` namespace, as
//! Kubernetes' own recorders put them. API servers before 1.22 reject an events.k8s.io Event
//! there (422 "involvedObject.namespace: does not match event.namespace": their validation
//! wanted `kube-system` for an Event with an `eventTime`), but accept a core/v1 Event without
//! one in `default`. So on that refusal this writer records the Event through the core API
//! instead, folding repeats the way client-go's correlator does (`count`, `lastTimestamp`),
//! and keeps doing so for the process's life. No permission beyond `default`'s events is used.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::core::v1::{Event as CoreEvent, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::Mutex;

use super::MANAGER;

/// Where Events about cluster-scoped objects are written.
pub const CLUSTER_EVENTS_NAMESPACE: &str = "default";
/// How long a repeat is folded into the earlier Event (kube-runtime's recorder uses the same).
const FOLD_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// Repeats of one Event are one object: same object, type, reason and note.
type Key = (String, String, String, String);

/// The operator's Event writer.
pub struct EventWriter {
    recorder: Recorder,
    client: kube::Client,
    instance: String,
    /// The API server refused an events.k8s.io Event about a cluster-scoped object.
    core_for_cluster_scoped: AtomicBool,
    /// Core Events written, by key: (name, count, first seen), for folding repeats.
    written: Mutex<HashMap<Key, (String, i32, Timestamp)>>,
}

impl EventWriter {
    /// Reported as the operator, by pod when it knows it.
    pub fn new(client: kube::Client) -> Self {
        let instance = std::env::var("POD_NAME").ok();
        let recorder = Recorder::new(client.clone(), Reporter { controller: MANAGER.into(), instance: instance.clone() });
        EventWriter {
            recorder,
            client,
            instance: instance.unwrap_or_else(|| MANAGER.into()),
            core_for_cluster_scoped: AtomicBool::new(false),
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Records `ev` about `regarding`.
    pub async fn publish(&self, ev: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let cluster_scoped = regarding.namespace.as_deref().unwrap_or_default().is_empty();
        if cluster_scoped && self.core_for_cluster_scoped.load(Ordering::Relaxed) {
            return self.publish_core(ev, regarding).await;
        }
        match self.recorder.publish(ev, regarding).await {
            Err(kube::Error::Api(s)) if cluster_scoped && s.code == 422 && s.message.contains("event.namespace") => {
                tracing::info!(error = %s.message, "this API server refuses events.k8s.io Events about cluster-scoped objects in {CLUSTER_EVENTS_NAMESPACE}; writing them as core Events");
                self.core_for_cluster_scoped.store(true, Ordering::Relaxed);
                self.publish_core(ev, regarding).await
            }
            other => other,
        }
    }

    /// A core/v1 Event without `eventTime` (what the old validation accepts in `default`), or
    /// a count patch of the one recorded within the fold window.
    async fn publish_core(&self, ev: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let api: Api<CoreEvent> = Api::namespaced(self.client.clone(), CLUSTER_EVENTS_NAMESPACE);
        let type_ = match ev.type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        let key: Key = (regarding.name.clone().unwrap_or_default(), type_.into(), ev.reason.clone(), ev.note.clone().unwrap_or_default());
        let now = Timestamp::now();
        let mut written = self.written.lock().await;
        written.retain(|_, (_, _, first)| *first + FOLD_WINDOW > now);
        if let Some((name, count, _)) = written.get_mut(&key) {
            *count += 1;
            let patch = serde_json::json!({ "count": *count, "lastTimestamp": Time(now) });
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            return Ok(());
        }
        let name = format!("{}.{:x}", key.0, now.as_nanosecond());
        let event = CoreEvent {
            metadata: ObjectMeta { name: Some(name.clone()), namespace: Some(CLUSTER_EVENTS_NAMESPACE.into()), ..Default::default() },
            involved_object: regarding.clone(),
            reason: Some(ev.reason.clone()),
            message: ev.note.clone(),
            type_: Some(type_.into()),
            action: Some(ev.action.clone()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            source: Some(EventSource { component: Some(MANAGER.into()), host: None }),
            reporting_component: Some(MANAGER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        api.create(&PostParams::default(), &event).await?;
        written.insert(key, (name, 1, now));
        Ok(())
    }
}
