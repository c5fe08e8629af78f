#!/usr/bin/env bash
# Builds the operator's and the agent's images from their Dockerfiles with the local Podman and
# starts each once (`--version`, `--help`), so the images the chart runs cannot rot unseen.
#
# No image registry is reachable in CI, so two things stand in for what the Dockerfiles pull:
# - the runtime base (distroless/cc-debian12:nonroot) is assembled from this Debian host: the
#   glibc and libgcc files the binaries link (ldd), CA certificates, passwd/group with nonroot
#   65532, and imported as a local image passed as RUNTIME_BASE;
# - the build stage (rust:1.95-bookworm running cargo) is replaced by one holding the binaries
#   the test run already built (target/debug; KOMMUNE_IMAGE_PROFILE=release for release ones),
#   laid out at the /out/ paths the Dockerfile's build stage installs.
# Everything from the final FROM on (base, copies, ownership, USER, ENTRYPOINT, CMD) is the
# Dockerfile's own text. Needs Podman and binutils (strip) (eval "$(bash hack/podman.sh)").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { echo "images.sh: $*" >&2; }

PROFILE="${KOMMUNE_IMAGE_PROFILE:-debug}"
BASE=localhost/kommune-ci/cc-debian12:nonroot
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kommune-images.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

images=("operator/Dockerfile kommune-operator" "node-agent/Dockerfile kommune-agent")
for entry in "${images[@]}"; do
    bin="target/$PROFILE/${entry#* }"
    [[ -x "$bin" ]] || { log "$bin is missing: build it first (cargo build -p ${entry#* })"; exit 1; }
done

log "runtime base $BASE from this host's Debian files"
root="$WORK/base"
mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
chmod 1777 "$root/tmp"
for entry in "${images[@]}"; do
    # ldd prints "name => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)".
    ldd "target/$PROFILE/${entry#* }" | grep -o '/[^ ]*' | while read -r lib; do
        cp -L --parents "$lib" "$root/"
    done
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$root/etc/group"
chown 65532:65532 "$root/home/nonroot"
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"; fi
tar -C "$root" -c . | podman import -q - "$BASE" >/dev/null

for entry in "${images[@]}"; do
    dockerfile="${entry% *}" name="${entry#* }"
    ctx="$WORK/$name"
    mkdir -p "$ctx/out"
    final="$(grep -n '^FROM ' "$dockerfile" | tail -n 1 | cut -d: -f1)"
    # What the build stage leaves in /out: the binary, and directories (data, state).
    for path in $(head -n "$((final - 1))" "$dockerfile" | grep -o '/out/[A-Za-z0-9_.-]*' | sort -u); do
        # Stripped: debug binaries are hundreds of MB, and the image only has to start.
        if [[ "${path#/out/}" == "$name" ]]; then strip -o "$ctx$path" "target/$PROFILE/$name"; else mkdir -p "$ctx$path"; fi
    done
    {
        echo "ARG RUNTIME_BASE"
        echo "FROM scratch AS build"
        echo "COPY out/ /out/"
        tail -n "+$final" "$dockerfile"
    } >"$ctx/Dockerfile"
    image="localhost/kommune-ci/$name:dev"
    log "building $image from $dockerfile's runtime stage"
    podman build -q --build-arg "RUNTIME_BASE=$BASE" -t "$image" "$ctx" >/dev/null
    user="$(podman image inspect --format '{{.Config.User}}' "$image")"
    [[ "$user" == "65532:65532" ]] || { log "$image runs as '$user', not 65532:65532"; exit 1; }
    version="$(podman run --rm --network none "$image" --version)"
    [[ "$version" == "$name "* ]] || { log "$image --version printed '$version'"; exit 1; }
    podman run --rm --network none "$image" --help >/dev/null
    log "$image starts: $version"
done
# Earlier runs' images, now untagged, would pile up on the CI host's disk.
podman image prune -f >/dev/null
