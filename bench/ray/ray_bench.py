"""Ray's equivalents of Kommune's dispatch and round-trip scenarios (benchmarks only).

dispatch:  10,000 no-op tasks submitted at once to a local Ray with 2 CPUs, timed from the
           first submission until every result is back (after a 20-task warm-up).
roundtrip: 1,000 single no-op tasks one after another (after 20 warm-up ones), each timed
           from submission to its result; p50 and p99.

Prints the same line shapes as `cargo bench -p kommune-operator --bench dispatch`.
"""

import os
import time

import ray


@ray.remote(num_cpus=1)
def noop():
    return None


def percentile(sorted_ms, q):
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def main():
    tasks = int(os.environ.get("RAY_BENCH_TASKS", "10000"))
    roundtrips = int(os.environ.get("RAY_BENCH_ROUNDTRIPS", "1000"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.get([noop.remote() for _ in range(20)])

    start = time.perf_counter()
    ray.get([noop.remote() for _ in range(tasks)])
    seconds = time.perf_counter() - start
    print(f"dispatch cpus=2 tasks={tasks} tasks_per_s={tasks / seconds:.0f}", flush=True)

    for _ in range(20):
        ray.get(noop.remote())
    times = []
    for _ in range(roundtrips):
        t = time.perf_counter()
        ray.get(noop.remote())
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    print(f"roundtrip p50_ms={percentile(times, 0.50):.2f} p99_ms={percentile(times, 0.99):.2f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
