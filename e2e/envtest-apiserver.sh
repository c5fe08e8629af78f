#!/usr/bin/env bash
# A real Kubernetes API server on loopback, from envtest-style binaries: etcd and
# kube-apiserver (plus kubectl) in $KUBEBUILDER_ASSETS. No kubelet, no controller
# manager: enough for CRDs, RBAC, watches, status and Events, which is what the
# operator needs. e2e/fetch-envtest.sh fills such a directory.
#
#   export KUBECONFIG="$(e2e/envtest-apiserver.sh start DIR)"   # prints DIR/kubeconfig
#   e2e/envtest-apiserver.sh status DIR
#   e2e/envtest-apiserver.sh stop DIR
#
# DIR receives: pki/ (a throwaway CA, serving cert, admin client cert, service-account
# keys), etcd/ (data), kubeconfig (admin, certs embedded), etcd.log, kube-apiserver.log,
# etcd.pid, kube-apiserver.pid and env (ports, for scripts). The admin is in
# system:masters; RBAC is on, so other identities get only what they are granted.
# Ports are picked free at start; set ETCD_PORT / APISERVER_PORT to fix them.
#
# Without a controller manager, namespaces stay Terminating after a delete and
# nothing garbage-collects owner references: tests clean up what they create.
set -euo pipefail

log() { printf 'envtest-apiserver: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() { die "usage: $0 start|stop|status DIR"; }

[[ $# -eq 2 ]] || usage
CMD="$1"
mkdir -p "$2"
DIR="$(cd "$2" && pwd)"

alive() { [[ -f "$DIR/$1.pid" ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

stop_one() {
    local name="$1" pid
    [[ -f "$DIR/$name.pid" ]] || return 0
    pid="$(cat "$DIR/$name.pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$DIR/$name.pid"
}

case "$CMD" in
    stop)
        # The API server first: it would log errors for every second etcd is gone.
        stop_one kube-apiserver
        stop_one etcd
        exit 0
        ;;
    status)
        for name in etcd kube-apiserver; do
            if alive "$name"; then echo "$name running (pid $(cat "$DIR/$name.pid"))"; else echo "$name stopped"; fi
        done
        alive etcd && alive kube-apiserver
        exit
        ;;
    start) ;;
    *) usage ;;
esac

if alive etcd && alive kube-apiserver && [[ -f "$DIR/kubeconfig" ]]; then
    log "already running in $DIR"
    echo "$DIR/kubeconfig"
    exit 0
fi
# Half-started leftovers from an earlier run would hold the ports or the data dir.
stop_one kube-apiserver
stop_one etcd

ASSETS="${KUBEBUILDER_ASSETS:-}"
[[ -n "$ASSETS" ]] || die "KUBEBUILDER_ASSETS is not set (a dir with etcd, kube-apiserver and kubectl; see e2e/fetch-envtest.sh)"
ASSETS="$(cd "$ASSETS" && pwd)" || die "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS is not a directory"
for bin in etcd kube-apiserver kubectl; do
    [[ -x "$ASSETS/$bin" ]] || die "$ASSETS/$bin is missing or not executable"
done
command -v openssl >/dev/null || die "openssl is needed to make the throwaway certificates"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
ETCD_PORT="${ETCD_PORT:-$(free_port)}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-$(free_port)}"
APISERVER_PORT="${APISERVER_PORT:-$(free_port)}"

# ---- certificates -------------------------------------------------------------------
# Made once per DIR and reused, so a restarted server keeps trusting old kubeconfigs
# and service-account tokens.
PKI="$DIR/pki"
if [[ ! -f "$PKI/admin.crt" ]]; then
    log "making a throwaway CA and certificates in $PKI"
    mkdir -p "$PKI"
    (
        cd "$PKI"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -days 365 -keyout ca.key -out ca.crt \
            -subj "/CN=kommune-envtest-ca" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        sign() { # name subject extensions
            openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
            printf '%s\n' "$3" >"$1.ext"
            openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
                -out "$1.crt" -extfile "$1.ext" 2>/dev/null
            rm -f "$1.csr" "$1.ext"
        }
        sign apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1"
        # system:masters: the admin bypasses RBAC, like kind's admin kubeconfig.
        sign admin "/O=system:masters/CN=kommune-admin" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        # A static bearer token too, for curl and for tests that want a header, not a cert.
        printf '%s,kommune-admin,kommune-admin,"system:masters"\n' "$(openssl rand -hex 24)" >tokens.csv
    )
fi

# ---- etcd ---------------------------------------------------------------------------
mkdir -p "$DIR/etcd"
chmod 700 "$DIR/etcd"
etcd_args=(
    --name=envtest
    --data-dir="$DIR/etcd"
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT"
    --advertise-client-urls="http://127.0.0.1:$ETCD_PORT"
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT"
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT"
    --initial-cluster="envtest=http://127.0.0.1:$ETCD_PEER_PORT"
)
# A test server's data is disposable; skipping fsync (etcd >= 3.5) makes it much faster.
if "$ASSETS/etcd" --help 2>&1 | grep -q -- '--unsafe-no-fsync'; then
    etcd_args+=(--unsafe-no-fsync)
fi
log "starting etcd on 127.0.0.1:$ETCD_PORT"
nohup "$ASSETS/etcd" "${etcd_args[@]}" </dev/null >"$DIR/etcd.log" 2>&1 &
echo $! >"$DIR/etcd.pid"

# Polls a command until it succeeds; gives up when the time runs out or a server we
# started has died, showing its log either way.
wait_for() { # seconds what command...
    local seconds="$1" what="$2"; shift 2
    local deadline=$((SECONDS + seconds)) name
    until "$@" >/dev/null 2>&1; do
        for name in etcd kube-apiserver; do
            if [[ -f "$DIR/$name.pid" ]] && ! alive "$name"; then
                log "$name exited while waiting for $what; last log lines:"
                tail -n 30 "$DIR/$name.log" >&2 || true
                "$0" stop "$DIR"
                exit 1
            fi
        done
        if ((SECONDS >= deadline)); then
            log "timed out after ${seconds}s waiting for $what; last log lines:"
            tail -n 20 "$DIR/etcd.log" "$DIR/kube-apiserver.log" >&2 2>/dev/null || true
            "$0" stop "$DIR"
            exit 1
        fi
        sleep 0.5
    done
}
etcd_healthy() {
    python3 -c 'import sys, urllib.request
sys.exit(0 if b"true" in urllib.request.urlopen(sys.argv[1], timeout=2).read() else 1)' "http://127.0.0.1:$ETCD_PORT/health"
}
wait_for 30 "etcd" etcd_healthy

# ---- kube-apiserver -----------------------------------------------------------------
apiserver_minor="$("$ASSETS/kube-apiserver" --version | sed -E 's/^Kubernetes v[0-9]+\.([0-9]+).*/\1/')"
apiserver_args=(
    --etcd-servers="http://127.0.0.1:$ETCD_PORT"
    --bind-address=127.0.0.1
    --advertise-address=127.0.0.1
    --secure-port="$APISERVER_PORT"
    --cert-dir="$PKI"
    --tls-cert-file="$PKI/apiserver.crt"
    --tls-private-key-file="$PKI/apiserver.key"
    --client-ca-file="$PKI/ca.crt"
    --token-auth-file="$PKI/tokens.csv"
    --authorization-mode=RBAC
    --service-account-issuer=https://kubernetes.default.svc
    --service-account-key-file="$PKI/sa.pub"
    --service-account-signing-key-file="$PKI/sa.key"
    --service-cluster-ip-range=10.0.0.0/24
    --allow-privileged=true
    # Nothing serves the "kubernetes" Service's endpoints here, and a loopback
    # advertise address would fail their validation on every sync.
    --endpoint-reconciler-type=none
    --profiling=false
)
# Before 1.24 an unauthenticated HTTP port listened on 8080 unless switched off.
if [[ "$apiserver_minor" =~ ^[0-9]+$ ]] && ((apiserver_minor < 24)); then
    apiserver_args+=(--insecure-port=0)
fi
log "starting kube-apiserver $("$ASSETS/kube-apiserver" --version | awk '{print $2}') on https://127.0.0.1:$APISERVER_PORT"
nohup "$ASSETS/kube-apiserver" "${apiserver_args[@]}" </dev/null >"$DIR/kube-apiserver.log" 2>&1 &
echo $! >"$DIR/kube-apiserver.pid"

b64() { base64 <"$1" | tr -d '\n'; }
cat >"$DIR/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: envtest
    cluster:
      server: https://127.0.0.1:$APISERVER_PORT
      certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
  - name: kommune-admin
    user:
      client-certificate-data: $(b64 "$PKI/admin.crt")
      client-key-data: $(b64 "$PKI/admin.key")
contexts:
  - name: envtest
    context:
      cluster: envtest
      user: kommune-admin
      namespace: default
current-context: envtest
EOF
chmod 600 "$DIR/kubeconfig.tmp"
mv "$DIR/kubeconfig.tmp" "$DIR/kubeconfig"
cat >"$DIR/env" <<EOF
export KUBECONFIG="$DIR/kubeconfig"
ETCD_PORT=$ETCD_PORT
APISERVER_PORT=$APISERVER_PORT
EOF

wait_for 90 "kube-apiserver /readyz" "$ASSETS/kubectl" --kubeconfig "$DIR/kubeconfig" get --raw /readyz
# The bootstrap controller creates "default" shortly after /readyz; tests assume it.
wait_for 30 "namespace default" "$ASSETS/kubectl" --kubeconfig "$DIR/kubeconfig" get namespace default
log "ready; export KUBECONFIG=$DIR/kubeconfig"
echo "$DIR/kubeconfig"
