#!/usr/bin/env bash
# Fills DIR with envtest binaries (etcd, kube-apiserver, kubectl) for
# e2e/envtest-apiserver.sh and KUBEBUILDER_ASSETS, from Debian's archive only:
#
#   e2e/fetch-envtest.sh DIR          # prints DIR once it holds working binaries
#   export KUBEBUILDER_ASSETS="$(e2e/fetch-envtest.sh ~/.cache/kommune/envtest)"
#
# Idempotent: a DIR that already holds the expected versions is left alone, so CI can
# call this on every run and pay the build once per machine.
#
# Where each binary comes from, and why:
#   etcd            Debian bookworm `etcd-server` (3.4.23), unpacked, not installed.
#   kubectl         Debian bookworm `kubernetes-client` (1.20.2), unpacked.
#   kube-apiserver  Nothing in Debian, PyPI or npm ships it (upstream's envtest
#                   tarballs live on a bucket this project cannot reach), so it is built
#                   here from Debian's `kubernetes` source package (upstream 1.20.2 with
#                   its vendor/ tree), with Debian's Go 1.19 unpacked beside it. That
#                   took 5 min of CPU (3 min wall, 2 cores) once here; ENVTEST_BUILD_JOBS limits it.
#   Kubernetes 1.20 is old but serves everything the operator uses: apiextensions/v1
#   CRDs with status subresources, server-side apply, events.k8s.io/v1, leases. It
#   does not enforce CRD CEL rules (x-kubernetes-validations arrived in 1.25), so tests
#   of those rules need a newer cluster through KUBECONFIG.
# Nothing is installed system-wide and the system's apt configuration is not touched:
# apt runs against a private sources list and cache under DIR/.work.
set -euo pipefail

log() { printf 'fetch-envtest: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[[ $# -eq 1 ]] || die "usage: $0 DIR"
mkdir -p "$1"
DEST="$(cd "$1" && pwd)"
WORK="$DEST/.work"

K8S_VERSION=v1.20.2
ETCD_VERSION=3.4.23

have_all() {
    "$DEST/kube-apiserver" --version 2>/dev/null | grep -qx "Kubernetes $K8S_VERSION" &&
        "$DEST/etcd" --version 2>/dev/null | grep -q "etcd Version: $ETCD_VERSION" &&
        "$DEST/kubectl" version --client 2>/dev/null | grep -q "$K8S_VERSION"
}
if have_all; then
    echo "$DEST"
    exit 0
fi

[[ "$(uname -m)" == x86_64 ]] || die "only linux/amd64 is supported (Debian amd64 packages)"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f "$KEYRING" ]] || die "$KEYRING is missing: this needs a Debian system (apt) to verify downloads"
command -v apt-get >/dev/null || die "apt-get is missing: this needs a Debian system"

mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/debs" "$WORK/root"
cat >"$WORK/apt/sources.list" <<EOF
deb [signed-by=$KEYRING] http://deb.debian.org/debian bookworm main
deb-src [signed-by=$KEYRING] http://deb.debian.org/debian bookworm main
deb [signed-by=$KEYRING] http://deb.debian.org/debian-security bookworm-security main
deb-src [signed-by=$KEYRING] http://deb.debian.org/debian-security bookworm-security main
EOF
APT=(
    -o "Dir::Etc::SourceList=$WORK/apt/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$WORK/apt/lists"
    -o "Dir::Cache=$WORK/apt/cache"
    -o "Debug::NoLocking=1"
    -q
)
log "refreshing a private apt index (bookworm, binaries and sources)"
apt-get "${APT[@]}" update >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; die "apt-get update failed"; }

# Downloads .debs (verified by apt against the Debian archive keys) and unpacks them.
unpack() {
    (cd "$WORK/debs" && apt-get "${APT[@]}" download "$@" >>"$WORK/apt.log" 2>&1) ||
        { tail -n 20 "$WORK/apt.log" >&2; die "apt-get download $* failed"; }
    local pkg debs
    for pkg in "$@"; do
        debs=("$WORK/debs/${pkg}"_*.deb)
        dpkg-deb -x "${debs[-1]}" "$WORK/root"
    done
}

# ---- etcd and kubectl: prebuilt in Debian -------------------------------------------
log "etcd $ETCD_VERSION and kubectl $K8S_VERSION from Debian packages"
unpack etcd-server kubernetes-client
install -m 0755 "$WORK/root/usr/bin/etcd" "$DEST/etcd"
install -m 0755 "$WORK/root/usr/bin/kubectl" "$DEST/kubectl"

# ---- kube-apiserver: built from Debian's kubernetes source package -------------------
if ! "$DEST/kube-apiserver" --version 2>/dev/null | grep -qx "Kubernetes $K8S_VERSION"; then
    log "Go 1.19 from Debian packages (unpacked under $WORK, not installed)"
    unpack golang-1.19-go golang-1.19-src
    GOROOT="$WORK/root/usr/lib/go-1.19"
    "$GOROOT/bin/go" version >&2

    log "kubernetes source package (upstream $K8S_VERSION)"
    mkdir -p "$WORK/src"
    (cd "$WORK/src" && apt-get "${APT[@]}" source --download-only kubernetes >>"$WORK/apt.log" 2>&1) ||
        { tail -n 20 "$WORK/apt.log" >&2; die "apt-get source kubernetes failed"; }
    origs=("$WORK"/src/kubernetes_*.orig.tar.gz)
    orig="${origs[-1]}"
    rm -rf "$WORK/src/kubernetes-${K8S_VERSION#v}"
    tar -xzf "$orig" -C "$WORK/src"
    SRC="$WORK/src/kubernetes-${K8S_VERSION#v}"
    [[ -f "$SRC/cmd/kube-apiserver/apiserver.go" ]] || die "unexpected source layout in $orig"

    # Kubernetes 1.20 vendors modern-go/reflect2 v1.0.1, which calls
    # reflect.mapiterinit with the pre-Go-1.18 signature and crashes when built with a
    # newer Go. This is the fix reflect2 v1.0.2 made: the caller allocates the full
    # iterator and passes it in.
    log "patching vendored reflect2 for Go >= 1.18"
    python3 - "$SRC/vendor/github.com/modern-go/reflect2" <<'PY'
import pathlib, sys
d = pathlib.Path(sys.argv[1])
def patch(name, old, new):
    p = d / name
    s = p.read_text()
    if new in s:
        return
    if old not in s:
        sys.exit(f"reflect2 patch: {name} does not look like v1.0.1")
    p.write_text(s.replace(old, new))
patch("unsafe_link.go",
"""// m escapes into the return value, but the caller of mapiterinit
// doesn't let the return value escape.
//go:noescape
//go:linkname mapiterinit reflect.mapiterinit
func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) *hiter
""",
"""//go:noescape
//go:linkname mapiterinit reflect.mapiterinit
func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)
""")
patch("unsafe_link.go",
"""type hiter struct {
	key   unsafe.Pointer // Must be in first position.  Write nil to indicate iteration end (see cmd/internal/gc/range.go).
	value unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).
	// rest fields are ignored
}""",
"""// hiter mirrors runtime.hiter (Go 1.18+); the caller allocates it, so its size matters.
type hiter struct {
	key         unsafe.Pointer
	value       unsafe.Pointer
	t           unsafe.Pointer
	h           unsafe.Pointer
	buckets     unsafe.Pointer
	bptr        unsafe.Pointer
	overflow    *[]unsafe.Pointer
	oldoverflow *[]unsafe.Pointer
	startBucket uintptr
	offset      uint8
	wrapped     bool
	B           uint8
	i           uint8
	bucket      uintptr
	checkBucket uintptr
}""")
patch("unsafe_map.go",
"""	return &UnsafeMapIterator{
		hiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),""",
"""	var it hiter
	mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)
	return &UnsafeMapIterator{
		hiter:      &it,""")
PY

    # The version the server reports on /version. Written into the source rather than
    # passed with -ldflags -X: the compiler copies these initial values into other
    # packages' static data, so -X reached --version but not /version.
    log "stamping version $K8S_VERSION"
    python3 - "$SRC/staging/src/k8s.io" "$K8S_VERSION" <<'PY'
import pathlib, re, sys
root, version = pathlib.Path(sys.argv[1]), sys.argv[2]
major, minor = version.lstrip("v").split(".")[:2]
values = {"gitMajor": major, "gitMinor": minor, "gitVersion": version, "gitTreeState": "archive"}
for rel in ("component-base/version/base.go", "client-go/pkg/version/base.go"):
    p = root / rel
    s = p.read_text()
    for name, value in values.items():
        s, n = re.subn(rf'^(\t{name}\s+(?:string\s*)?)(?:=\s*"[^"]*")?', rf'\g<1> = "{value}"', s, count=1, flags=re.M)
        if n != 1:
            sys.exit(f"version stamp: {name} not found in {p}")
    p.write_text(s)
PY

    # Kubernetes 1.20 builds in GOPATH mode with its vendor/ tree (as its own
    # Makefile does); module mode would want to rewrite go.mod.
    mkdir -p "$WORK/gopath/src/k8s.io"
    ln -sfn "$SRC" "$WORK/gopath/src/k8s.io/kubernetes"
    (
        cd "$WORK/gopath/src/k8s.io/kubernetes"
        export GOROOT GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache" GO111MODULE=off CGO_ENABLED=0 GOFLAGS=
        GO="$GOROOT/bin/go"
        JOBS="${ENVTEST_BUILD_JOBS:-2}"

        # The source package leaves out pkg/generated/openapi/zz_generated.openapi.go,
        # which upstream's Makefile generates before building: the OpenAPI
        # definitions of every package tagged +k8s:openapi-gen (the staging repos
        # named by their vendor/ paths; code-generator and sample-apiserver excluded).
        log "generating the OpenAPI definitions"
        nice -n 10 "$GO" build -p "$JOBS" -o "$WORK/openapi-gen" k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen
        inputs="$(
            find . \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune -o -type f -name '*.go' -print |
                sed 's|^\./staging/src|vendor|; s|^\./||' |
                { xargs grep -l '^// *+k8s:' || true; } | { xargs grep -l '+k8s:openapi-gen=' || true; } |
                xargs -n1 dirname | LC_ALL=C sort -u |
                grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' |
                sed 's|^|k8s.io/kubernetes/|' | paste -sd, -
        )"
        nice -n 10 "$WORK/openapi-gen" -i "$inputs" -p k8s.io/kubernetes/pkg/generated/openapi \
            -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
            -r "$WORK/openapi-violations.report"

        log "building kube-apiserver (slow: $JOBS parallel jobs, low priority)"
        nice -n 10 "$GO" build -p "$JOBS" -trimpath -ldflags "-s -w" \
            -o "$DEST/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
    ) || die "building kube-apiserver failed"
    mv "$DEST/kube-apiserver.tmp" "$DEST/kube-apiserver"
fi

have_all || die "the binaries in $DEST do not report the expected versions"
# The sources, Go and the build cache are about 2 GiB and are not needed to run.
rm -rf "$WORK"
log "ready: $("$DEST/kube-apiserver" --version), etcd $ETCD_VERSION, kubectl $K8S_VERSION"
echo "$DEST"
