#!/usr/bin/env bash
# Starts Podman's Docker-compatible API service on a unix socket for the container runtime's
# real-engine tests (node-agent/tests/container_engine) and CI's image builds, and prints the
# variables to use it:
#
#   eval "$(bash hack/podman.sh)"
#   cargo nextest run -p kommune-agent --test container_engine
#
# Installs podman, runc and busybox-static from Debian's archive when missing (apt-get; sudo when
# not root). Debian's Podman 4.3 runs containers with crun, which cannot set rlimits on this
# machine class; runc with cgroupfs works, so the service runs with its own containers.conf
# (CONTAINERS_CONF; the system's is left alone). Idempotent: a service already answering on the
# socket is reused. Stop it with `hack/podman.sh stop` (or the printed command).
set -euo pipefail

log() { echo "podman.sh: $*" >&2; }

DIR="${KOMMUNE_PODMAN_DIR:-${TMPDIR:-/tmp}/kommune-podman-$(id -u)}"
SOCK="$DIR/podman.sock"
CONF="$DIR/containers.conf"

if [[ "${1:-}" == stop ]]; then
    if [[ -f "$DIR/pid" ]]; then
        kill "$(cat "$DIR/pid")" 2>/dev/null || true
        rm -f "$DIR/pid" "$SOCK"
    fi
    exit 0
fi

SUDO=()
[[ "$(id -u)" == 0 ]] || SUDO=(sudo)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
need=()
for pkg in podman runc busybox-static curl; do installed "$pkg" || need+=("$pkg"); done
if ((${#need[@]})); then
    log "installing ${need[*]} from Debian's archive"
    "${SUDO[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${need[@]}" >&2
fi
[[ "$(id -u)" == 0 ]] || log "not root: Podman runs rootless (needs subuid/subgid ranges); CI runs it as root"

mkdir -p "$DIR"
# runc: crun fails to set rlimits here. No default ulimits: Podman's default raises nofile past
# the hard limit this machine class grants, and runc then fails "error setting rlimit type 7".
# cgroupfs and a file event log: no systemd in CI.
cat >"$CONF.new" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
mv "$CONF.new" "$CONF"

answers() { curl -sf --max-time 2 --unix-socket "$SOCK" http://podman/_ping >/dev/null 2>&1; }

if answers; then
    log "reusing the service on $SOCK"
else
    rm -f "$SOCK"
    log "starting podman system service on $SOCK (log: $DIR/service.log)"
    # setsid: the service outlives this script (and `eval "$(...)"`'s subshell).
    CONTAINERS_CONF="$CONF" setsid podman system service --time=0 "unix://$SOCK" >"$DIR/service.log" 2>&1 </dev/null &
    echo $! >"$DIR/pid"
    for _ in $(seq 1 100); do
        answers && break
        kill -0 "$(cat "$DIR/pid")" 2>/dev/null || { cat "$DIR/service.log" >&2; log "the service exited"; exit 1; }
        sleep 0.1
    done
    answers || { cat "$DIR/service.log" >&2; log "no answer on $SOCK after 10 s"; exit 1; }
fi

echo "export KOMMUNE_TEST_CONTAINER_SOCKET=$SOCK"
# The podman CLI (image builds in CI) then uses the same configuration and storage.
echo "export CONTAINERS_CONF=$CONF"
echo "# stop with: $0 stop"
