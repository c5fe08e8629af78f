//! The pure half of the port-forward: which pod a Service leads to, and on which port.

use super::*;
use serde_json::json;

fn pod(name: &str, created: &str, phase: &str, ready: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ops", "creationTimestamp": created},
        "spec": {"containers": [
            {"name": "sidecar", "ports": [{"name": "metrics", "containerPort": 9090}]},
            {"name": "operator", "ports": [{"name": "web", "containerPort": 8443}, {"containerPort": 7000}]},
        ]},
        "status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]},
    }))
    .unwrap()
}

fn service(target: serde_json::Value) -> Service {
    let mut port = json!({"name": "web", "port": 8444});
    if !target.is_null() {
        port["targetPort"] = target;
    }
    serde_json::from_value(json!({
        "metadata": {"name": "kommune-dashboard", "namespace": "ops"},
        "spec": {"selector": {"app": "kommune", "tier": "operator"}, "ports": [port]},
    }))
    .unwrap()
}

fn names(pods: &[Pod]) -> Option<String> {
    pick_pod(pods).and_then(|p| p.metadata.name.clone())
}

#[test]
fn the_newest_running_ready_pod_is_chosen() {
    let old = pod("old", "2026-01-01T00:00:00Z", "Running", "True");
    let new = pod("new", "2026-01-02T00:00:00Z", "Running", "True");
    let newest_unready = pod("starting", "2026-01-03T00:00:00Z", "Running", "False");
    let pending = pod("pending", "2026-01-04T00:00:00Z", "Pending", "True");
    assert_eq!(names(&[old.clone(), new.clone(), newest_unready.clone(), pending.clone()]).as_deref(), Some("new"));
    assert_eq!(names(&[new, old.clone()]).as_deref(), Some("new"), "whatever the order");
    assert_eq!(names(&[old]).as_deref(), Some("old"));
    assert_eq!(names(&[newest_unready, pending]), None);
    assert_eq!(names(&[]), None);
    let mut no_status = pod("bare", "2026-01-05T00:00:00Z", "Running", "True");
    no_status.status = None;
    assert_eq!(names(&[no_status]), None);
}

#[test]
fn a_terminating_pod_is_not_chosen() {
    let mut going = pod("going", "2026-01-02T00:00:00Z", "Running", "True");
    going.metadata.deletion_timestamp = going.metadata.creation_timestamp.clone();
    let staying = pod("staying", "2026-01-01T00:00:00Z", "Running", "True");
    assert_eq!(names(&[going, staying]).as_deref(), Some("staying"));
}

#[test]
fn the_selector_is_the_services() {
    assert_eq!(selector(&service(json!("web"))).as_deref(), Some("app=kommune,tier=operator"));
    let mut none = service(json!("web"));
    none.spec.as_mut().unwrap().selector = None;
    assert_eq!(selector(&none), None);
}

#[test]
fn the_service_port_maps_to_a_named_or_numbered_container_port() {
    let p = pod("op", "2026-01-01T00:00:00Z", "Running", "True");
    assert_eq!(container_port(&service(json!("web")), 8444, &p).unwrap(), 8443);
    assert_eq!(container_port(&service(json!("metrics")), 8444, &p).unwrap(), 9090, "a port of any container");
    assert_eq!(container_port(&service(json!(7000)), 8444, &p).unwrap(), 7000);
    assert_eq!(container_port(&service(serde_json::Value::Null), 8444, &p).unwrap(), 8444, "no targetPort: the port itself");
}

#[test]
fn a_port_that_does_not_map_is_a_clear_error() {
    let p = pod("op", "2026-01-01T00:00:00Z", "Running", "True");
    let e = container_port(&service(json!("dashboard")), 8444, &p).unwrap_err().to_string();
    assert_eq!(e, r#"pod ops/op has no container port named "dashboard" (targetPort of svc/kommune-dashboard)"#);
    let e = container_port(&service(json!("web")), 9999, &p).unwrap_err().to_string();
    assert_eq!(e, "svc/kommune-dashboard in ops has no port 9999 (--operator-port)");
    let e = container_port(&service(json!(70000)), 8444, &p).unwrap_err().to_string();
    assert!(e.contains("maps port 8444 to 70000, which is not a port"), "{e}");
}
