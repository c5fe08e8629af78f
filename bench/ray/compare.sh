#!/usr/bin/env bash
# Kommune beside the system users would otherwise pick: Kommune's dispatch and round-trip
# scenarios (`cargo bench -p kommune-operator --bench dispatch`), then Ray's equivalents
# (ray_bench.py) on the same machine right after, and the ratios. Benchmarks only: Ray is
# installed from PyPI into a throwaway virtualenv and is no dependency of Kommune.
#
#   bash bench/ray/compare.sh                 # RAY_VERSION=2.60.0 by default
#   KOMMUNE_COMPARE_SKIP_KOMMUNE=FILE ...     # reuse Kommune's lines saved in FILE
set -euo pipefail
cd "$(dirname "$0")/../.."
ray_version=${RAY_VERSION:-2.60.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -n "${KOMMUNE_COMPARE_SKIP_KOMMUNE:-}" ]; then
  cp "$KOMMUNE_COMPARE_SKIP_KOMMUNE" "$work/kommune.txt"
else
  echo "==> Kommune: dispatch (10,000 tasks, 2 agents) and 1,000 round trips (release build)" >&2
  KOMMUNE_BENCH_ONLY=dispatch,roundtrip KOMMUNE_BENCH_ROUNDTRIPS=1000 \
    cargo bench -q -p kommune-operator --bench dispatch 2>/dev/null | tee "$work/kommune.txt"
fi

echo "==> Ray $ray_version: the same scenarios on a local Ray with 2 CPUs" >&2
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check "ray==$ray_version" >&2
"$work/venv/bin/python" bench/ray/ray_bench.py | tee "$work/ray.txt"

python3 - "$work/kommune.txt" "$work/ray.txt" <<'PY'
import re, sys

def figures(path):
    text = open(path).read()
    def num(key, line):
        m = re.search(rf"^{line} .*\b{key}=([0-9.]+)", text, re.M)
        if not m:
            sys.exit(f"no {line} {key}= in {path}:\n{text}")
        return float(m.group(1))
    return num("tasks_per_s", "dispatch"), num("p50_ms", "roundtrip"), num("p99_ms", "roundtrip")

k, r = figures(sys.argv[1]), figures(sys.argv[2])
print(f"compare kommune_tasks_per_s={k[0]:.0f} ray_tasks_per_s={r[0]:.0f} throughput_ratio={k[0] / r[0]:.2f}"
      f" kommune_p50_ms={k[1]:.2f} ray_p50_ms={r[1]:.2f} p50_ratio={k[1] / r[1]:.2f}"
      f" kommune_p99_ms={k[2]:.2f} ray_p99_ms={r[2]:.2f}")
print("targets: throughput_ratio >= 3.0, p50_ratio <= 0.5")
PY
