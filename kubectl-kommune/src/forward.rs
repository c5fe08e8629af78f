//! A port-forward to a Service through the API server, like `kubectl port-forward svc/X`: the
//! Service resolved to a ready Pod and container port, each local connection one WebSocket.
//!
//! The API server checks the user's `create pods/portforward` and proxies each connection to
//! the Pod's kubelet; nothing here needs kubectl.

use std::net::SocketAddr;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no Service {namespace}/{service}: is the operator installed there with its dashboard (--operator-namespace, --operator-service)?")]
    NoService { namespace: String, service: String },
    #[error("svc/{service} in {namespace} has no port {port} (--operator-port)")]
    NoServicePort { namespace: String, service: String, port: u16 },
    #[error("svc/{service} in {namespace} has no selector, so no pod to forward to")]
    NoSelector { namespace: String, service: String },
    #[error("no ready pod behind svc/{service} in {namespace} (is the operator running?)")]
    NoReadyPod { namespace: String, service: String },
    #[error("pod {namespace}/{pod} has no container port named {name:?} (targetPort of svc/{service})")]
    NoNamedPort { namespace: String, pod: String, service: String, name: String },
    #[error("svc/{service} in {namespace} maps port {port} to {target}, which is not a port")]
    BadTargetPort { namespace: String, service: String, port: u16, target: i64 },
    #[error("you may not {what} in {namespace} (RBAC: {rbac}), or pass --operator-url")]
    Forbidden { namespace: String, what: &'static str, rbac: &'static str },
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot listen on 127.0.0.1: {0}")]
    Listen(#[source] std::io::Error),
}

/// The pod to forward to: Running with a True Ready condition, the newest of those (after a
/// rollout the old pod may linger while it stops).
pub fn pick_pod(pods: &[Pod]) -> Option<&Pod> {
    pods.iter().filter(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none()).max_by_key(|p| p.metadata.creation_timestamp.clone())
}

fn is_ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else { return false };
    status.phase.as_deref() == Some("Running") && status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The Service's label selector as a list selector (`k=v,k=v`); None when it has none.
pub fn selector(service: &Service) -> Option<String> {
    let sel = service.spec.as_ref()?.selector.as_ref().filter(|s| !s.is_empty())?;
    Some(sel.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
}

/// The container port of `pod` that Service port `port` reaches: its targetPort as a number,
/// or the container port of that name; the Service port itself when targetPort is unset.
pub fn container_port(service: &Service, port: u16, pod: &Pod) -> Result<u16, ForwardError> {
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let name = service.metadata.name.clone().unwrap_or_default();
    let ports = service.spec.as_ref().and_then(|s| s.ports.as_ref());
    let sp = ports.into_iter().flatten().find(|p| p.port == i32::from(port)).ok_or_else(|| ForwardError::NoServicePort {
        namespace: namespace.clone(),
        service: name.clone(),
        port,
    })?;
    match &sp.target_port {
        None => Ok(port),
        Some(IntOrString::Int(n)) => {
            u16::try_from(*n).ok().filter(|n| *n > 0).ok_or(ForwardError::BadTargetPort { namespace, service: name, port, target: i64::from(*n) })
        }
        Some(IntOrString::String(wanted)) => {
            let containers = pod.spec.iter().flat_map(|s| &s.containers);
            let found = containers.flat_map(|c| c.ports.iter().flatten()).find(|p| p.name.as_deref() == Some(wanted.as_str()));
            found.and_then(|p| u16::try_from(p.container_port).ok()).ok_or_else(|| ForwardError::NoNamedPort {
                namespace,
                pod: pod.metadata.name.clone().unwrap_or_default(),
                service: name,
                name: wanted.clone(),
            })
        }
    }
}

fn api_error(source: kube::Error, namespace: &str, what: String, forbidden: (&'static str, &'static str)) -> ForwardError {
    match source {
        kube::Error::Api(s) if s.code == 403 => ForwardError::Forbidden { namespace: namespace.to_string(), what: forbidden.0, rbac: forbidden.1 },
        source => ForwardError::Api { what, source },
    }
}

/// Resolves `svc/service` in `namespace` to a ready pod's name and the container port that
/// Service port `port` reaches, as the user of `client`.
pub async fn resolve(client: &kube::Client, namespace: &str, service: &str, port: u16) -> Result<(String, u16), ForwardError> {
    let svc = match Api::<Service>::namespaced(client.clone(), namespace).get(service).await {
        Err(kube::Error::Api(s)) if s.code == 404 => return Err(ForwardError::NoService { namespace: namespace.into(), service: service.into() }),
        r => r.map_err(|e| api_error(e, namespace, format!("cannot get svc/{service} in {namespace}"), ("get services", "get services")))?,
    };
    let sel = selector(&svc).ok_or_else(|| ForwardError::NoSelector { namespace: namespace.into(), service: service.into() })?;
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&sel))
        .await
        .map_err(|e| api_error(e, namespace, format!("cannot list the pods of svc/{service} in {namespace}"), ("list pods", "list pods")))?;
    let pod = pick_pod(&pods.items).ok_or_else(|| ForwardError::NoReadyPod { namespace: namespace.into(), service: service.into() })?;
    let target = container_port(&svc, port, pod)?;
    Ok((pod.metadata.name.clone().unwrap_or_default(), target))
}

/// A running port-forward: 127.0.0.1:`local_port` reaches the pod. Stops when dropped.
pub struct Forward {
    pub local_port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards a local port to Service port `port` of `svc/service`. One port-forward is opened
/// and closed before returning, so a refusal (RBAC, a pod gone) is reported here, not on the
/// first connection.
pub async fn forward(client: kube::Client, namespace: &str, service: &str, port: u16) -> Result<Forward, ForwardError> {
    let (pod, target) = resolve(&client, namespace, service, port).await?;
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let refused =
        |e| api_error(e, namespace, format!("cannot port-forward to pod {namespace}/{pod}"), ("port-forward to pods", "get and create pods/portforward"));
    drop(pods.portforward(&pod, &[target]).await.map_err(refused)?);
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.map_err(ForwardError::Listen)?;
    let local_port = listener.local_addr().map_err(ForwardError::Listen)?.port();
    let task = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(relay(pods.clone(), pod.clone(), target, conn));
        }
    });
    Ok(Forward { local_port, task })
}

/// Carries one local connection over its own port-forward; what goes wrong goes to stderr,
/// as kubectl port-forward reports it, since the connection's user is another task.
async fn relay(pods: Api<Pod>, pod: String, port: u16, mut conn: TcpStream) {
    let mut pf = match pods.portforward(&pod, &[port]).await {
        Ok(pf) => pf,
        Err(e) => return eprintln!("port-forward to pod {pod} port {port}: {e}"),
    };
    let (Some(mut stream), Some(error)) = (pf.take_stream(port), pf.take_error(port)) else { return };
    let copy = async move {
        let r = tokio::io::copy_bidirectional(&mut conn, &mut stream).await;
        drop(stream);
        r
    };
    let (copied, error) = tokio::join!(copy, error);
    if let Some(message) = error {
        eprintln!("port-forward to pod {pod} port {port}: {message}");
    } else if let Err(e) = copied {
        eprintln!("port-forward to pod {pod} port {port}: {e}");
    }
}

#[cfg(test)]
mod tests;
