#!/usr/bin/env bash
# Runs every test: unit and property tests, the component test (operator gateway + real agents
# over loopback mTLS), the reconcile tests (mock API server), the generated-file drift checks,
# and the e2e suite. The e2e suite needs an API server: KUBECONFIG, or KUBEBUILDER_ASSETS
# pointing at kube-apiserver + etcd (e2e/fetch-envtest.sh makes one); without either it prints
# one "skipped: no cluster" line.
#
# The payout ledger's and the attempt store's backend suites also run against PostgreSQL: against
# KOMMUNE_TEST_DATABASE_URL when set, else a throwaway server on loopback started here
# (hack/postgres.sh) when PostgreSQL's server binaries are installed, else it prints one
# "skipped: no PostgreSQL" line. Likewise the container runtime's suite and Podman (below).
#
#   hack/test.sh
#   KUBEBUILDER_ASSETS=~/.cache/kommune/envtest hack/test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${KOMMUNE_TEST_DATABASE_URL:-}" ]] && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    pg_env="$(bash hack/postgres.sh)"
    eval "$pg_env"
    pg_dir="$(sed -n 's/^# stop with: .* stop //p' <<<"$pg_env")"
    trap 'bash hack/postgres.sh stop "$pg_dir" >/dev/null 2>&1 || true' EXIT
    echo "PostgreSQL for the ledger and store tests: $KOMMUNE_TEST_DATABASE_URL" >&2
fi

# The container runtime's real-engine suite runs against KOMMUNE_TEST_CONTAINER_SOCKET when set,
# else against a Podman service started here (hack/podman.sh) when podman and runc are installed
# (.ci/run installs them), else it prints one "skipped: no container engine" line.
if [[ -z "${KOMMUNE_TEST_CONTAINER_SOCKET:-}" ]] && command -v podman >/dev/null && command -v runc >/dev/null; then
    if podman_env="$(bash hack/podman.sh)"; then
        eval "$podman_env"
        echo "Podman for the container runtime's tests: $KOMMUNE_TEST_CONTAINER_SOCKET" >&2
    else
        echo "warning: podman is installed but hack/podman.sh could not start it; the real-engine tests are skipped" >&2
    fi
fi

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --exclude kommune-e2e --no-fail-fast
else
    cargo test --workspace --exclude kommune-e2e --no-fail-fast
fi
# --nocapture so the skip line, or the suite's progress, is visible.
cargo test -p kommune-e2e -- --nocapture
