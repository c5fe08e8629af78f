//! The Helm chart as an admin installs it: every rendered object parses into its typed
//! Kubernetes struct, the chart's CRDs (in its crds/) are the generated ones, its appVersion is the crate's
//! version, and its RBAC grants every API call the operator's code makes (and no Secrets
//! outside its namespace). Needs a helm binary (see `kommune_e2e::helm`); prints one skip line
//! without one.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kommune_e2e::{documents, helm, render_chart, repo};

const NS: &str = "kommune-system";

/// The API calls the operator makes: (api group, resource, verb, whether cluster-wide).
/// Keep in step with operator/src/controller and tokens.rs.
const NEEDS: &[(&str, &str, &str, bool)] = &[
    ("kommune.dev", "computejobs", "get", true),
    ("kommune.dev", "computejobs", "list", true),
    ("kommune.dev", "computejobs", "watch", true),
    ("kommune.dev", "computejobs", "patch", true), // finalizer add/remove (JSON patch)
    ("kommune.dev", "computejobs/status", "patch", true),
    ("kommune.dev", "computejobs", "delete", true), // spec.ttlSecondsAfterFinished passed
    ("kommune.dev", "providernodes", "get", true),
    ("kommune.dev", "providernodes", "list", true),
    ("kommune.dev", "providernodes", "watch", true),  // the ProviderNode writer's reflector
    ("kommune.dev", "providernodes", "create", true), // server-side apply of a new node
    ("kommune.dev", "providernodes", "patch", true),
    ("kommune.dev", "providernodes/status", "patch", true),
    ("kommune.dev", "payoutstatements", "list", true),   // the statement mirror finds missing ones
    ("kommune.dev", "payoutstatements", "create", true), // server-side apply of a new statement
    ("kommune.dev", "payoutstatements", "patch", true),
    ("kommune.dev", "payoutstatements/status", "patch", true), // paid state, webhook delivery
    ("", "configmaps", "get", true),                           // wasm modules in the job's namespace
    ("", "configmaps", "patch", false),                        // kommune-ca.crt, the CA for dashboard clients (by name)
    ("", "configmaps", "create", false),                       // kommune-ca.crt the first time (server-side apply)
    ("events.k8s.io", "events", "create", false),
    ("events.k8s.io", "events", "patch", false),
    ("", "secrets", "get", false), // CA and join tokens, own namespace only
    ("", "secrets", "create", false),
    ("", "secrets", "update", false),               // token uses are decremented with replace
    ("", "secrets", "delete", false),               // used-up and expired tokens
    ("kommune.dev", "computejobs", "update", true), // finalizer removal on older API servers
    ("kommune.dev", "computejobs/status", "get", true),
    ("kommune.dev", "computejobs/status", "update", true),
    ("kommune.dev", "computejobs/finalizers", "update", true), // OwnerReferencesPermissionEnforcement
    ("kommune.dev", "providernodes", "update", true),
    ("kommune.dev", "providernodes", "delete", true), // a node that leaves
    ("kommune.dev", "providernodes/status", "get", true),
    ("kommune.dev", "providernodes/status", "update", true),
    ("authentication.k8s.io", "tokenreviews", "create", true), // the dashboard's callers
    ("authorization.k8s.io", "subjectaccessreviews", "create", true),
    ("", "events", "create", false), // node Events on API servers before 1.22 (controller/events.rs)
    ("", "events", "patch", false),
    ("coordination.k8s.io", "leases", "get", false), // leader election, when enabled
    ("coordination.k8s.io", "leases", "create", false),
    ("coordination.k8s.io", "leases", "update", false),
    ("apiextensions.k8s.io", "customresourcedefinitions", "get", true), // --upgrade-crds, its two CRDs by name
    ("apiextensions.k8s.io", "customresourcedefinitions", "patch", true),
];

/// Every (group, resource, verb) `rules` grant, wildcards left as they are.
fn granted(rules: &[PolicyRule]) -> Vec<(String, String, String)> {
    let mut out = vec![];
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.push((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

fn grants(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        let has = |list: &Option<Vec<String>>, want: &str| list.as_ref().is_some_and(|l| l.iter().any(|x| x == want || x == "*"));
        has(&r.api_groups, group) && has(&r.resources, resource) && r.verbs.iter().any(|v| v == verb || v == "*")
    })
}

#[test]
fn chart_renders_typed_objects_with_the_rbac_the_operator_needs() -> anyhow::Result<()> {
    let Some(helm) = helm() else {
        println!("skipped: no helm (run .ci/helm-check.sh once to cache a pinned one, or set HELM)");
        return Ok(());
    };
    let rendered = render_chart(&helm, NS, &[])?;
    let mut by_kind: BTreeMap<String, Vec<serde_yaml::Value>> = BTreeMap::new();
    for doc in documents(&rendered)? {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        by_kind.entry(kind).or_default().push(doc);
    }
    fn typed<T: serde::de::DeserializeOwned>(docs: Option<&Vec<serde_yaml::Value>>) -> anyhow::Result<Vec<T>> {
        docs.into_iter().flatten().map(|d| Ok(serde_yaml::from_value(d.clone())?)).collect()
    }
    let crds: Vec<CustomResourceDefinition> = typed(by_kind.get("CustomResourceDefinition"))?;
    let cluster_roles: Vec<ClusterRole> = typed(by_kind.get("ClusterRole"))?;
    let cluster_bindings: Vec<ClusterRoleBinding> = typed(by_kind.get("ClusterRoleBinding"))?;
    let roles: Vec<Role> = typed(by_kind.get("Role"))?;
    let bindings: Vec<RoleBinding> = typed(by_kind.get("RoleBinding"))?;
    let sets: Vec<StatefulSet> = typed(by_kind.get("StatefulSet"))?;
    let services: Vec<Service> = typed(by_kind.get("Service"))?;
    let accounts: Vec<ServiceAccount> = typed(by_kind.get("ServiceAccount"))?;
    let known = ["CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "StatefulSet", "Service", "ServiceAccount"];
    for kind in by_kind.keys() {
        assert!(known.contains(&kind.as_str()), "the chart renders a {kind} this test does not parse");
    }

    // The CRDs live in the chart's crds/ (created by `helm install` when missing, never owned by
    // a release), so templates render none; `helm show crds` gives exactly the generated ones.
    assert!(crds.is_empty(), "the chart templates a CRD: it would be owned by (and adopted only into) one release");
    let out = std::process::Command::new(&helm).args(["show", "crds"]).arg(repo().join("charts/kommune")).output()?;
    anyhow::ensure!(out.status.success(), "helm show crds: {}", String::from_utf8_lossy(&out.stderr));
    let shipped: Vec<CustomResourceDefinition> =
        documents(&String::from_utf8(out.stdout)?)?.into_iter().map(serde_yaml::from_value).collect::<Result<_, _>>()?;
    assert_eq!(shipped.len(), 3);
    for crd in shipped {
        let name = crd.metadata.name.clone().unwrap();
        // computejobs.kommune.dev -> crds/computejob.yaml
        let file = format!("{}.yaml", name.split('.').next().unwrap_or_default().trim_end_matches('s'));
        let want: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(repo().join("crds").join(&file))?)?;
        assert_eq!(crd, want, "{name} in the chart differs from crds/{file}");
    }

    // appVersion follows the crate, so the default image tag is the binary's version.
    let chart: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(repo().join("charts/kommune/Chart.yaml"))?)?;
    assert_eq!(chart["appVersion"].as_str(), Some(env!("CARGO_PKG_VERSION")));

    // The operator's ServiceAccount is bound to rules that cover every call it makes.
    assert_eq!(sets.len(), 1);
    let pod = sets[0].spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let sa = pod.service_account_name.clone().unwrap();
    assert!(accounts.iter().any(|a| a.metadata.name.as_deref() == Some(sa.as_str())));
    let bound_cluster: Vec<PolicyRule> = cluster_bindings
        .iter()
        .filter(|b| b.subjects.iter().flatten().any(|s| s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(NS)))
        .flat_map(|b| cluster_roles.iter().filter(move |r| r.metadata.name.as_deref() == Some(b.role_ref.name.as_str())))
        .flat_map(|r| r.rules.clone().unwrap_or_default())
        .collect();
    let bound_ns: Vec<PolicyRule> = bindings
        .iter()
        .filter(|b| b.metadata.namespace.as_deref() == Some(NS) && b.subjects.iter().flatten().any(|s| s.kind == "ServiceAccount" && s.name == sa))
        .flat_map(|b| roles.iter().filter(move |r| r.metadata.name.as_deref() == Some(b.role_ref.name.as_str())))
        .flat_map(|r| r.rules.clone().unwrap_or_default())
        .collect();
    for (group, resource, verb, cluster_wide) in NEEDS {
        let ok = grants(&bound_cluster, group, resource, verb) || (!cluster_wide && grants(&bound_ns, group, resource, verb));
        assert!(ok, "the chart does not let the operator {verb} {resource} ({group:?}){}", if *cluster_wide { " cluster-wide" } else { "" });
    }
    assert!(!grants(&bound_cluster, "", "secrets", "get"), "Secrets must only be readable in the operator's namespace");
    for r in bound_ns.iter().filter(|r| r.resources.iter().flatten().any(|res| res == "configmaps") && r.verbs.iter().any(|v| v == "patch")) {
        assert_eq!(r.resource_names.as_deref(), Some(&["kommune-ca.crt".to_string()][..]), "the operator patches only the CA ConfigMap");
    }
    // Users may read the published CA certificate, by name, and nothing else through the chart.
    let ca_reader = roles.iter().find(|r| r.metadata.name.as_deref().is_some_and(|n| n.ends_with("-ca-reader"))).expect("a Role for the CA ConfigMap");
    let rules = ca_reader.rules.clone().unwrap_or_default();
    assert_eq!(granted(&rules), [("".to_string(), "configmaps".to_string(), "get".to_string())]);
    assert_eq!(rules[0].resource_names.as_deref(), Some(&["kommune-ca.crt".to_string()][..]));
    let reader_binding = bindings.iter().find(|b| b.role_ref.name == ca_reader.metadata.name.clone().unwrap()).expect("the CA reader Role is bound");
    assert!(reader_binding.subjects.iter().flatten().any(|s| s.kind == "Group" && s.name == "system:authenticated"));
    // Dashboard users may port-forward to the operator's pods as `kubectl kommune` does: the
    // Service by name, the pods to pick from, the port-forward; in the release namespace only,
    // and bound to nobody unless dashboard.users names someone.
    let user_role = roles.iter().find(|r| r.metadata.name.as_deref().is_some_and(|n| n.ends_with("-dashboard-user"))).expect("a Role for dashboard users");
    assert_eq!(user_role.metadata.namespace.as_deref(), Some(NS));
    let rules = user_role.rules.clone().unwrap_or_default();
    assert_eq!(
        granted(&rules),
        [("", "services", "get"), ("", "pods", "list"), ("", "pods/portforward", "get"), ("", "pods/portforward", "create")].map(|(g, r, v)| (
            g.to_string(),
            r.to_string(),
            v.to_string()
        ))
    );
    assert_eq!(
        rules[0].resource_names.as_deref(),
        Some(&[format!("{}-dashboard", user_role.metadata.name.as_deref().unwrap().trim_end_matches("-dashboard-user"))][..])
    );
    assert!(!bindings.iter().any(|b| b.role_ref.name == user_role.metadata.name.clone().unwrap()), "nobody may port-forward by default");
    let bound =
        render_chart(&helm, NS, &["dashboard.users[0].kind=Group", "dashboard.users[0].name=ops", "dashboard.users[0].apiGroup=rbac.authorization.k8s.io"])?;
    assert!(
        bound.contains("kind: RoleBinding")
            && bound.contains("name: kommune-dashboard-user\nsubjects:\n  - apiGroup: rbac.authorization.k8s.io\n    kind: Group\n    name: ops"),
        "dashboard.users binds the Role"
    );
    // CRDs: only its own three, by name.
    for r in bound_cluster.iter().filter(|r| r.resources.iter().flatten().any(|res| res == "customresourcedefinitions")) {
        let mut names = r.resource_names.clone().unwrap_or_default();
        names.sort();
        assert_eq!(
            names,
            ["computejobs.kommune.dev", "payoutstatements.kommune.dev", "providernodes.kommune.dev"],
            "CRD access must be limited to Kommune's three"
        );
    }
    let args = &pod.containers[0].args.clone().unwrap_or_default();
    assert!(args.iter().any(|a| a == "--upgrade-crds=true"), "the operator upgrades its CRDs by default: {args:?}");
    let off = render_chart(&helm, NS, &["crds.upgrade=false"])?;
    assert!(off.contains("--upgrade-crds=false") && !off.contains("customresourcedefinitions"), "crds.upgrade=false drops the flag's permission too");
    // And nothing more: every grant is one the code uses (least privilege).
    for (g, res, v) in granted(&bound_cluster).into_iter().chain(granted(&bound_ns)) {
        let needed = NEEDS.iter().any(|(ng, nr, nv, _)| *ng == g && *nr == res && *nv == v);
        assert!(needed, "the chart grants {v} on {res} ({g:?}), which the operator never calls");
    }

    // Restricted pod security and a gateway Service that reaches the container port.
    let container = &pod.containers[0];
    let sc = container.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert!(pod.security_context.as_ref().and_then(|p| p.run_as_non_root).unwrap_or(false) || sc.run_as_non_root == Some(true));
    let gateway = services.iter().find(|s| s.metadata.name.as_deref().is_some_and(|n| n.ends_with("gateway"))).expect("a gateway Service");
    let port = &gateway.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(port.node_port, Some(30443), "kind-config.yaml maps 30443");
    let kind: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(repo().join("kind-config.yaml"))?)?;
    assert_eq!(kind["nodes"][0]["extraPortMappings"][0]["containerPort"].as_i64(), Some(30443));
    Ok(())
}

/// Every series name `/metrics` can carry: counters with `_total`, histograms with their
/// `_bucket`, `_sum` and `_count`, read from the `# TYPE` lines of a registry where every
/// labelled family has a series (an empty family is not written at all).
fn exported_series() -> Vec<String> {
    let m = kommune_operator::metrics::Metrics::default();
    m.reconcile_error("kube");
    m.session_closed("timeout");
    m.message("sent", "ack", 1);
    let mut why = kommune_operator::scheduler::Explanation::new(1, &Default::default());
    why.held_for_others = 1;
    m.placement(1, 0, std::time::Duration::ZERO, Some(&why));
    let text = m.render(&kommune_operator::fleet::Fleet::default());
    let mut out = vec![];
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
        match kind {
            "counter" => out.push(format!("{name}_total")),
            "histogram" => out.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))),
            _ => out.push(name.to_string()),
        }
    }
    out
}

#[test]
fn the_service_monitor_and_the_grafana_dashboard_render_behind_their_switches() -> anyhow::Result<()> {
    let Some(helm) = helm() else {
        println!("skipped: no helm (run .ci/helm-check.sh once to cache a pinned one, or set HELM)");
        return Ok(());
    };
    let kinds = |docs: &[serde_yaml::Value]| docs.iter().map(|d| d["kind"].as_str().unwrap_or_default().to_string()).collect::<Vec<_>>();
    // Off by default: a cluster without the Prometheus Operator's CRDs installs the chart.
    let plain = documents(&render_chart(&helm, NS, &[])?)?;
    assert!(!kinds(&plain).iter().any(|k| k == "ServiceMonitor" || k == "ConfigMap"), "{:?}", kinds(&plain));

    let switches = ["metrics.serviceMonitor.enabled=true", "metrics.grafanaDashboard.enabled=true", "metrics.serviceMonitor.labels.release=prom"];
    let docs = documents(&render_chart(&helm, NS, &switches)?)?;
    let monitor = docs.iter().find(|d| d["kind"] == "ServiceMonitor").expect("a ServiceMonitor");
    assert_eq!(monitor["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(monitor["metadata"]["labels"]["release"].as_str(), Some("prom"));
    assert_eq!(monitor["spec"]["endpoints"][0]["port"].as_str(), Some("metrics"));
    assert_eq!(monitor["spec"]["endpoints"][0]["path"].as_str(), Some("/metrics"));
    // It selects the metrics Service, which has the port it names, and not the gateway's.
    let selector: BTreeMap<String, String> = serde_yaml::from_value(monitor["spec"]["selector"]["matchLabels"].clone())?;
    let services: Vec<Service> = docs.iter().filter(|d| d["kind"] == "Service").map(|d| serde_yaml::from_value(d.clone())).collect::<Result<_, _>>()?;
    let selected: Vec<&Service> =
        services.iter().filter(|s| selector.iter().all(|(k, v)| s.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v))).collect();
    assert_eq!(selected.len(), 1, "the ServiceMonitor selects exactly one Service");
    assert!(selected[0].metadata.name.as_deref().is_some_and(|n| n.ends_with("-metrics")));
    assert!(selected[0].spec.as_ref().unwrap().ports.iter().flatten().any(|p| p.name.as_deref() == Some("metrics")));

    // The dashboard is a ConfigMap the sidecar picks up, and every series its panels query is
    // one the operator exports (a renamed series would leave a panel empty).
    let map: k8s_openapi::api::core::v1::ConfigMap =
        serde_yaml::from_value(docs.iter().find(|d| d["kind"] == "ConfigMap").expect("a dashboard ConfigMap").clone())?;
    assert_eq!(map.metadata.labels.as_ref().and_then(|l| l.get("grafana_dashboard")).map(String::as_str), Some("1"));
    let json: serde_json::Value = serde_json::from_str(&map.data.as_ref().unwrap()["kommune.json"])?;
    let panels = json["panels"].as_array().expect("panels");
    assert!(panels.len() >= 15, "{} panels", panels.len());
    let exported = exported_series();
    let mut queried = 0;
    for expr in panels.iter().flat_map(|p| p["targets"].as_array().into_iter().flatten()).filter_map(|t| t["expr"].as_str()) {
        for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("kommune_")) {
            assert!(exported.iter().any(|e| e == name), "the dashboard queries {name}, which the operator does not export");
            queried += 1;
        }
    }
    assert!(queried >= 20, "{queried}");

    // helm lint passes with both switches on.
    let lint = std::process::Command::new(&helm).args(["lint"]).arg(repo().join("charts/kommune")).args(switches.iter().flat_map(|s| ["--set", s])).output()?;
    assert!(lint.status.success(), "helm lint: {}{}", String::from_utf8_lossy(&lint.stdout), String::from_utf8_lossy(&lint.stderr));
    Ok(())
}
