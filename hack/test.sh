#!/usr/bin/env bash
# Runs every test: unit and property tests, the component test (operator gateway + real agents
# over loopback mTLS), the reconcile tests (mock API server), the generated-file drift checks,
# and the e2e suite. The e2e suite needs an API server: KUBECONFIG, or KUBEBUILDER_ASSETS
# pointing at kube-apiserver + etcd (e2e/fetch-envtest.sh makes one); without either it prints
# one "skipped: no cluster" line.
#
#   hack/test.sh
#   KUBEBUILDER_ASSETS=~/.cache/kommune/envtest hack/test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --exclude kommune-e2e --no-fail-fast
else
    cargo test --workspace --exclude kommune-e2e --no-fail-fast
fi
# --nocapture so the skip line, or the suite's progress, is visible.
cargo test -p kommune-e2e -- --nocapture
