//! Placement throughput and latency over synthetic fleets of 1,000, 10,000 and 100,000 nodes
//! with a realistic mix (GPU and CPU nodes, regions and zones, reputations, cordoned, tainted
//! and paused nodes, several runtimes) and a realistic request mix, with attempts ending as new
//! ones are placed so the pool stays busy but not full. Prints one line per fleet size:
//! `nodes=N decisions_per_s=X p50_us=Y p99_us=Z` (details on stderr).
//!
//! `cargo bench -p kommune-operator --bench placement`; `KOMMUNE_BENCH_QUICK=1` for a smoke run.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use kommune_operator::pricing::{Micros, Rates};
use kommune_operator::scheduler::pool::salt;
use kommune_operator::scheduler::{
    FairShare, Gpu, GpuPattern, GpuRequest, Locality, Node, Pool, REGION_LABEL, Reputation, Request, Resources, Taint, Toleration, TolerationOperator, Weights,
    ZONE_LABEL,
};

const GI: u64 = 1 << 30;
const REGIONS: [&str; 5] = ["eu-west", "eu-central", "us-east", "us-west", "ap-south"];

/// splitmix64: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn fleet(n: usize, rng: &mut Rng) -> Pool {
    let mut pool = Pool::new(42, Weights::default(), FairShare::default());
    for i in 0..n {
        let gpu = rng.chance(10);
        let cores = if gpu { 16 + rng.below(49) } else { [2, 4, 8, 16, 32, 64][rng.below(6) as usize] };
        let mut runtimes = vec!["wasm"];
        if rng.chance(40) {
            runtimes.push("container");
        }
        if rng.chance(10) {
            runtimes.push("exec");
        }
        let mut node = Node::new(
            &format!("node-{i:06}"),
            Resources {
                cpu_millis: cores * 1000,
                memory_bytes: cores * (2 + rng.below(4)) * GI,
                ephemeral_bytes: if rng.chance(30) { 0 } else { (50 + rng.below(1950)) * GI },
            },
            &runtimes,
        );
        node.arch = if rng.chance(20) { "aarch64" } else { "x86_64" }.into();
        node.os = match rng.below(100) {
            0..90 => "linux",
            90..97 => "macos",
            _ => "windows",
        }
        .into();
        let region = REGIONS[rng.below(REGIONS.len() as u64) as usize];
        node.labels.insert(REGION_LABEL.into(), region.into());
        node.labels.insert(ZONE_LABEL.into(), format!("{region}-{}", ["a", "b", "c"][rng.below(3) as usize]));
        node.labels.insert("tier".into(), if rng.chance(25) { "fast" } else { "standard" }.into());
        if gpu {
            let (model, mem) = [("NVIDIA-A100-80GB", 80), ("NVIDIA-H100-80GB", 80), ("RTX4090", 24)][rng.below(3) as usize];
            let count = [1, 2, 4, 8][rng.below(4) as usize];
            node.gpus = (0..count).map(|_| Gpu { model: model.into(), memory_bytes: mem * GI }).collect();
            node.rates = Rates { cpu_core_hour: Micros(20_000), memory_gib_hour: Micros(2_000), gpu_hour: Micros(1_500_000), output_gib: Micros(0) };
        } else {
            node.rates = Rates { cpu_core_hour: Micros([10_000, 20_000, 40_000][rng.below(3) as usize]), memory_gib_hour: Micros(1_000), ..Rates::default() };
        }
        if rng.chance(3) {
            node.taints.push(Taint { key: "dedicated".into(), value: "ml".into(), ..Default::default() });
        }
        node.owner = if rng.chance(20) { String::new() } else { format!("owner-{}", rng.below((n as u64 / 4).max(1))) };
        node.reputation = Reputation(300 + rng.below(701) as u16);
        node.cordoned = rng.chance(2);
        node.paused = rng.chance(2);
        node.ready = !rng.chance(1);
        pool.upsert(node);
    }
    pool
}

fn requests() -> Vec<(u64, Request)> {
    let res = |cpu, mem, disk| Resources { cpu_millis: cpu, memory_bytes: mem, ephemeral_bytes: disk };
    let small = Request::new("wasm", res(250, 128 << 20, 0));
    let mut local = Request::new("container", res(2000, 4 * GI, 0));
    local.data_locality = Some(Locality { region: Some("eu-west".into()), zone: Some("eu-west-a".into()) });
    let mut a100 = Request::new("container", res(8000, 32 * GI, 0));
    a100.gpu = GpuRequest { count: 1, model: Some(GpuPattern::parse("*a100*").unwrap()), min_memory_bytes: 0 };
    a100.min_reputation = Reputation(800);
    let mut h100 = Request::new("container", res(16_000, 64 * GI, 0));
    h100.gpu = GpuRequest { count: 2, model: Some(GpuPattern::parse("*h100*").unwrap()), min_memory_bytes: 40 * GI };
    let exec = Request::new("exec", res(1000, GI, 0));
    let mut arm = Request::new("wasm", res(500, 512 << 20, 0));
    arm.arch = Some("aarch64".into());
    let mut fast = Request::new("wasm", res(1000, 2 * GI, 20 * GI));
    fast.node_selector.insert("tier".into(), "fast".into());
    fast.max_price_per_hour = Some(Micros(60_000));
    let mut verified = Request::new("wasm", res(500, 256 << 20, 0));
    verified.replicas = 3;
    verified.tolerations.push(Toleration { key: "dedicated".into(), operator: TolerationOperator::Exists, ..Default::default() });
    vec![(55, small), (15, local), (8, a100), (4, h100), (5, exec), (5, arm), (5, fast), (3, verified)]
}

fn pick<'a>(mix: &'a [(u64, Request)], rng: &mut Rng) -> &'a Request {
    let mut x = rng.below(mix.iter().map(|m| m.0).sum());
    for (w, r) in mix {
        if x < *w {
            return r;
        }
        x -= w;
    }
    &mix[0].1
}

fn main() {
    let quick = std::env::var("KOMMUNE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let mix = requests();
    for n in [1_000usize, 10_000, 100_000] {
        let mut rng = Rng(n as u64);
        let built = Instant::now();
        let mut pool = fleet(n, &mut rng);
        let build_time = built.elapsed();
        // Attempts alive at once: about four per node, the oldest ending as new ones start.
        let alive = n * 4;
        let (warmup, timed) = if quick { (alive.min(2_000), 2_000) } else { (alive, 100_000) };
        let mut active: VecDeque<Vec<String>> = VecDeque::with_capacity(alive + 8);
        let mut latencies: Vec<Duration> = Vec::with_capacity(timed);
        let mut refused = 0usize;
        let mut seq = 0u64;
        let started = Instant::now();
        let mut timed_total = Duration::ZERO;
        for step in 0..warmup + timed {
            let r = pick(&mix, &mut rng);
            seq += 1;
            let ids: Vec<String> = (0..r.replicas).map(|k| format!("a{seq}-{k}")).collect();
            let ns = if seq.is_multiple_of(3) { "team-b" } else { "team-a" };
            let t = Instant::now();
            let placed = pool.place(r, &ids, ns, salt(&ids[0]));
            let took = t.elapsed();
            if step >= warmup {
                latencies.push(took);
                timed_total += took;
                refused += placed.is_err() as usize;
            }
            if placed.is_ok() {
                active.push_back(ids);
            }
            while active.len() > alive {
                for id in active.pop_front().unwrap_or_default() {
                    pool.release(&id);
                }
            }
        }
        let wall = started.elapsed();
        latencies.sort();
        let q = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e6;
        let per_s = latencies.len() as f64 / timed_total.as_secs_f64();
        println!("nodes={n} decisions_per_s={per_s:.0} p50_us={:.1} p99_us={:.1}", q(0.50), q(0.99));
        eprintln!(
            "  nodes={n}: fleet of {} classes built in {:.2?}; {} timed decisions ({} refused and explained), max {:.1}us, {} reservations alive, {:.2?} wall incl. warm-up",
            pool.classes(),
            build_time,
            latencies.len(),
            refused,
            q(1.0),
            pool.reservations(),
            wall
        );
    }
}
