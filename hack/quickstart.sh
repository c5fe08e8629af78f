#!/usr/bin/env bash
# Runs the main job end to end: a cluster with the operator, one provider agent on
# this machine, and examples/hello-wasm.yaml submitted, run and reported Succeeded; then,
# where the agent may run exec tasks, examples/word-count.yaml (input shards in, one output
# per task out) and its results downloaded with the plugin (`kubectl kommune results`).
#
#   hack/quickstart.sh
#
# Three ways to get an API server, picked in this order (QUICKSTART_MODE overrides):
#   kind        docker, kind, kubectl and helm are installed: a kind cluster from
#               kind-config.yaml, both images built and loaded, the chart installed.
#   envtest     KUBEBUILDER_ASSETS names a dir with kube-apiserver, etcd and kubectl
#               (e2e/fetch-envtest.sh makes one): a local API server, and the operator
#               and agent run as local processes.
#   kubeconfig  KUBECONFIG is set: the same local processes against that cluster.
# With none of these, it builds the local API server itself (e2e/fetch-envtest.sh into
# ~/.cache/kommune/envtest, as CI does) and runs in envtest mode.
# The agent (and in the local modes the operator and API server) stop when this
# script exits; a kind cluster stays up (kind delete cluster --name kommune).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Paths the caller gave are relative to where they stand, not to the repo.
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    [[ -d "$KUBEBUILDER_ASSETS" ]] || { echo "quickstart: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS is not a directory" >&2; exit 1; }
    KUBEBUILDER_ASSETS="$(cd "$KUBEBUILDER_ASSETS" && pwd)"
    export KUBEBUILDER_ASSETS
fi
if [[ -n "${KUBECONFIG:-}" && "$KUBECONFIG" != *:* && -f "$KUBECONFIG" ]]; then
    KUBECONFIG="$(cd "$(dirname "$KUBECONFIG")" && pwd)/$(basename "$KUBECONFIG")"
    export KUBECONFIG
fi
cd "$ROOT"

NS=kommune-system
RELEASE=kommune
CLUSTER=kommune
IMAGE_REPO=ghcr.io/kommune-dev
TAG=dev
JOB=hello-wasm
JOB_FILE=examples/hello-wasm.yaml
WORK="$ROOT/.quickstart"
# A name of its own per run: the operator never gives a used name to another key, and each run
# joins with a fresh identity.
AGENT_NAME="quickstart-$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')"
WAIT_TIMEOUT=180s

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# ---- choosing a mode --------------------------------------------------------------

docker_ok() { have docker && docker info >/dev/null 2>&1; }
# helm from PATH, else the pinned one .ci/helm-check.sh keeps in its cache.
HELM="${HELM:-$(command -v helm || echo "${KOMMUNE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kommune}/helm-v3.18.0/helm")}"

missing_for_kind() {
    local m=()
    if ! have docker; then m+=("docker"); elif ! docker_ok; then m+=("docker (installed, but the daemon is not reachable)"); fi
    have kind || m+=("kind")
    have kubectl || m+=("kubectl")
    [[ -x "$HELM" ]] || m+=("helm (or run .ci/helm-check.sh once: it caches a pinned helm)")
    have cargo || m+=("cargo")
    printf '%s\n' "${m[@]+"${m[@]}"}"
}

MODE="${QUICKSTART_MODE:-}"
if [[ -z "$MODE" ]]; then
    MISSING="$(missing_for_kind)"
    if [[ -z "$MISSING" ]]; then
        MODE=kind
    elif [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
        MODE=envtest
    elif [[ -n "${KUBECONFIG:-}" ]]; then
        MODE=kubeconfig
    else
        # Neither docker/kind nor a cluster: build the local API server the way CI does
        # (Debian's archive only, about 3 minutes once, then cached) and use it.
        ENVTEST_DIR="${KOMMUNE_ENVTEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kommune/envtest}"
        log "no docker/kind and no cluster: building a local API server into $ENVTEST_DIR (cached after the first run)"
        if KUBEBUILDER_ASSETS="$("$ROOT/e2e/fetch-envtest.sh" "$ENVTEST_DIR")"; then
            export KUBEBUILDER_ASSETS
            MODE=envtest
        else
            {
                echo "quickstart: could not build a local API server (e2e/fetch-envtest.sh needs a Debian-like"
                echo "machine with apt and its archive reachable; its messages are above)."
                echo "Missing for the kind mode:"
                while IFS= read -r m; do echo "  - $m"; done <<<"$MISSING"
                echo
                echo "Install them (https://kind.sigs.k8s.io, https://helm.sh, https://kubernetes.io/docs/tasks/tools/),"
                echo "or run against an API server you already have:"
                echo "  KUBECONFIG=~/.kube/config hack/quickstart.sh"
            } >&2
            exit 1
        fi
    fi
fi
case "$MODE" in
    kind | envtest | kubeconfig) ;;
    *) die "QUICKSTART_MODE must be kind, envtest or kubeconfig, got '$MODE'" ;;
esac
[[ -f "$JOB_FILE" ]] || die "$JOB_FILE is missing"
compgen -G "crds/*.yaml" >/dev/null || die "crds/ is empty: run 'cargo run -p kommune-operator -- crdgen' first"
log "mode: $MODE"

mkdir -p "$WORK"
PIDS=()
APISERVER_DIR=""
on_exit() {
    local status=$?
    # Stop what we started, newest first, by pid.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[$i]}" 2>/dev/null || true
    done
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -n "$APISERVER_DIR" ]]; then
        "$ROOT/e2e/envtest-apiserver.sh" stop "$APISERVER_DIR" >/dev/null 2>&1 || true
    fi
    exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# kubectl bound to the cluster this run uses (set per mode below).
KUBECTL=(kubectl)
k() { "${KUBECTL[@]}" "$@"; }

# When the job does not succeed, show why: the same things a person would look at.
dump_diagnostics() {
    log "the job did not succeed; diagnostics follow"
    k get computejobs,providernodes -o wide || true
    k describe computejob "$JOB" || true
    k get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 || true
    for f in "$WORK"/operator.log "$WORK"/agent.log; do
        [[ -f "$f" ]] && { echo "--- last lines of $f"; tail -n 60 "$f"; }
    done
    if [[ "$MODE" == kind ]]; then
        echo "--- operator logs"
        k -n "$NS" logs "statefulset/$RELEASE" --tail=80 || true
    fi
}

# Waits until a command succeeds, up to $1 seconds; stops early, with the logs, if a
# process this script started has died meanwhile.
retry() {
    local seconds="$1" what="$2"; shift 2
    local deadline=$((SECONDS + seconds)) pid
    until "$@" >/dev/null 2>&1; do
        for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
            if ! kill -0 "$pid" 2>/dev/null; then
                dump_diagnostics
                die "a process this script started (pid $pid) exited while waiting for $what"
            fi
        done
        ((SECONDS < deadline)) || { dump_diagnostics; die "timed out after ${seconds}s waiting for $what"; }
        sleep 1
    done
}

# Token creation prints the token on its last line (anything before it is commentary).
last_line() { awk 'NF { line = $0 } END { gsub(/^[ \t]+|[ \t]+$/, "", line); print line }'; }

# ---- the operator ------------------------------------------------------------------

apply_crds() {
    # Kubernetes before 1.25 does not know CRD validation rules (x-kubernetes-validations):
    # kubectl's client-side check refuses the field, and the server would drop it anyway.
    # The operator checks the same rules itself, so the CRDs still work there.
    local minor
    minor="$(k version -o json 2>/dev/null | python3 -c 'import json,sys; print(int("".join(c for c in json.load(sys.stdin)["serverVersion"]["minor"] if c.isdigit())))' 2>/dev/null || echo 99)"
    if (( minor < 25 )); then
        echo "note: this API server (1.$minor) predates CRD validation rules; applying crds/ without client-side validation" >&2
        k apply --validate=false -f crds/
    else
        k apply -f crds/
    fi
    k wait --for=condition=Established --timeout=60s \
        crd/computejobs.kommune.dev crd/providernodes.kommune.dev
}

start_operator_kind() {
    KUBECTL=(kubectl --context "kind-$CLUSTER")
    if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
        log "reusing kind cluster '$CLUSTER'"
    else
        log "creating kind cluster '$CLUSTER'"
        kind create cluster --config kind-config.yaml
    fi

    log "building images (first build compiles the workspace; later ones reuse the cache)"
    export DOCKER_BUILDKIT=1
    docker build -f operator/Dockerfile -t "$IMAGE_REPO/kommune-operator:$TAG" .
    docker build -f node-agent/Dockerfile -t "$IMAGE_REPO/kommune-agent:$TAG" .
    kind load docker-image --name "$CLUSTER" "$IMAGE_REPO/kommune-operator:$TAG" "$IMAGE_REPO/kommune-agent:$TAG"

    local chart_args=(--set "image.repository=$IMAGE_REPO/kommune-operator" --set "image.tag=$TAG")
    # The tag stays "dev" across rebuilds, so name the image id in the pod template:
    # a new build then rolls the operator instead of leaving the old one running.
    chart_args+=(--set-string "podAnnotations.kommune\.dev/image-id=$(docker image inspect -f '{{.Id}}' "$IMAGE_REPO/kommune-operator:$TAG" | tr ':' '-')")
    if ! compgen -G "charts/kommune/crds/*.yaml" >/dev/null; then
        # The chart has no CRD copies yet: install them from crds/ directly.
        apply_crds
    fi
    log "installing the chart"
    "$HELM" upgrade --install "$RELEASE" charts/kommune --kube-context "kind-$CLUSTER" \
        -n "$NS" --create-namespace "${chart_args[@]}" --wait --timeout 5m

    GATEWAY="https://127.0.0.1:30443"
    log "creating a join token"
    TOKEN="$(k -n "$NS" exec "statefulset/$RELEASE" -- kommune-operator token create --namespace "$NS" | last_line)"
}

start_operator_local() {
    if [[ "$MODE" == envtest ]]; then
        APISERVER_DIR="$WORK/apiserver"
        log "starting kube-apiserver and etcd from $KUBEBUILDER_ASSETS"
        "$ROOT/e2e/envtest-apiserver.sh" start "$APISERVER_DIR" >/dev/null
        export KUBECONFIG="$APISERVER_DIR/kubeconfig"
        export PATH="$KUBEBUILDER_ASSETS:$PATH"  # its kubectl matches its API server
    fi
    have kubectl || die "kubectl is missing"
    have cargo || die "cargo is missing"
    have curl || die "curl is missing"
    log "API server: $(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"

    log "building the operator and the agent"
    cargo build -p kommune-operator -p kommune-agent
    BIN="$ROOT/target/debug"

    k create namespace "$NS" --dry-run=client -o yaml | k apply -f -
    apply_crds

    log "starting the operator (log: .quickstart/operator.log)"
    mkdir -p "$WORK/operator"
    "$BIN/kommune-operator" --data-dir "$WORK/operator" --gateway-listen 127.0.0.1:18443 \
        --namespace "$NS" --metrics-listen 127.0.0.1:19090 --web-listen 127.0.0.1:19444 >"$WORK/operator.log" 2>&1 &
    PIDS+=($!)
    retry 120 "the operator's /readyz" curl -fsS http://127.0.0.1:19090/readyz

    GATEWAY="https://127.0.0.1:18443"
    # The plugin reaches this local operator directly (in a cluster it port-forwards), and
    # verifies its certificate (issued for localhost) against the CA the operator publishes
    # in the ConfigMap kommune-ca.crt of its namespace.
    PLUGIN_ARGS=(--operator-url https://localhost:19444 --operator-namespace "$NS")
    log "creating a join token"
    TOKEN="$("$BIN/kommune-operator" token create --namespace "$NS" | last_line)"
    AGENT="$BIN/kommune-agent"
}

# ---- the provider and the job -------------------------------------------------------

PLUGIN_ARGS=(--operator-namespace "$NS" --operator-service "$RELEASE-dashboard")
case "$MODE" in
    kind)
        start_operator_kind
        log "building the agent"
        cargo build --release -p kommune-agent
        AGENT="$ROOT/target/release/kommune-agent"
        ;;
    *) start_operator_local ;;
esac
[[ -n "$TOKEN" ]] || die "token create printed no token"

# Start from a clean provider each run: a fresh identity under a new name, and the node of the
# previous run removed from the pool.
if [[ -f "$WORK/agent-name" ]]; then
    k delete providernode "$(cat "$WORK/agent-name")" --ignore-not-found --timeout=60s
fi
rm -rf "$WORK/agent"
echo "$AGENT_NAME" >"$WORK/agent-name"
log "joining this machine as provider '$AGENT_NAME' via $GATEWAY"
"$AGENT" join --server "$GATEWAY" --token "$TOKEN" --state-dir "$WORK/agent" --name "$AGENT_NAME"

# Exec tasks too where this kernel can confine them (Landlock); the main job is wasm either way.
EXEC=()
if "$AGENT" sandbox-exec --probe >/dev/null 2>&1; then EXEC=(--allow-exec); fi
log "running the agent (log: .quickstart/agent.log)"
"$AGENT" run --state-dir "$WORK/agent" "${EXEC[@]}" >"$WORK/agent.log" 2>&1 &
PIDS+=($!)

log "submitting $JOB_FILE"
k delete -f "$JOB_FILE" --ignore-not-found --timeout=60s
k apply -f "$JOB_FILE"
if ! k wait --for=condition=Succeeded "computejob/$JOB" --timeout="$WAIT_TIMEOUT"; then
    dump_diagnostics
    die "computejob/$JOB did not succeed within $WAIT_TIMEOUT"
fi

log "done"
k get computejobs,providernodes
echo
echo "computejob/$JOB status:"
k get computejob "$JOB" -o yaml | sed -n '/^status:/,$p'

# ---- results: input shards in, per-task outputs out, downloaded with the plugin ---------

if [[ ${#EXEC[@]} -eq 0 ]]; then
    log "skipping examples/word-count.yaml: this kernel cannot confine exec tasks (Landlock), so the agent runs wasm only"
    exit 0
fi
log "submitting examples/word-count.yaml (exec tasks: a shard each in, counts.txt each out)"
k delete -f examples/word-count.yaml --ignore-not-found --timeout=60s
k apply -f examples/word-count.yaml
if ! k wait --for=condition=Succeeded computejob/word-count --timeout="$WAIT_TIMEOUT"; then
    JOB=word-count dump_diagnostics
    die "computejob/word-count did not succeed within $WAIT_TIMEOUT"
fi
log "building the plugin and downloading the results with your own credentials"
cargo build -p kubectl-kommune
PLUGIN="$ROOT/target/debug/kubectl-kommune"
"$PLUGIN" get word-count
rm -rf "$WORK/word-count"
"$PLUGIN" results word-count -o "$WORK/word-count" "${PLUGIN_ARGS[@]}"
for f in "$WORK"/word-count/task-*/out/counts.txt; do
    echo "== ${f#"$WORK/"}"
    cat "$f"
done
