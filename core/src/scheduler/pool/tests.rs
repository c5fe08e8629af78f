use proptest::prelude::*;

use super::*;
use crate::scheduler::{GpuPattern, Locality, REGION_LABEL, ZONE_LABEL};

const GI: u64 = 1 << 30;

fn res(cpu: u64, mem: u64) -> Resources {
    Resources { cpu_millis: cpu, memory_bytes: mem, ephemeral_bytes: 0 }
}

fn pool() -> Pool {
    Pool::new(7, Weights::default(), FairShare::default())
}

fn node(name: &str, cpu: u64, mem: u64) -> Node {
    Node::new(name, res(cpu, mem), &["wasm"])
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn place1(p: &mut Pool, r: &Request, id: &str) -> Result<String, Box<Explanation>> {
    p.place(r, &[id.to_string()], "ns", salt(id)).map(|mut v| v.remove(0))
}

#[test]
fn alike_nodes_share_the_load() {
    let mut p = pool();
    for n in ["a", "b", "c"] {
        p.upsert(node(n, 4000, 4 * GI));
    }
    let r = Request::new("wasm", res(1000, GI));
    let mut placed: Vec<String> = (0..6).map(|i| place1(&mut p, &r, &format!("t{i}")).unwrap()).collect();
    placed.sort();
    assert_eq!(placed, ["a", "a", "b", "b", "c", "c"]);
}

#[test]
fn a_full_pool_refuses_and_explains_without_overcommitting() {
    let mut p = pool();
    p.upsert(node("a", 2000, 4 * GI));
    let r = Request::new("wasm", res(1000, GI));
    assert_eq!(place1(&mut p, &r, "t0").unwrap(), "a");
    assert_eq!(place1(&mut p, &r, "t1").unwrap(), "a");
    let why = place1(&mut p, &r, "t2").unwrap_err();
    assert_eq!(why.to_string(), "0/1 nodes can run it: 1 insufficient cpu (need 1)");
    assert_eq!(p.allocation("a"), Allocation { resources: res(2000, 2 * GI), gpus: 0, running: 2 });
    assert!(p.release("t0"));
    assert!(!p.release("t0"), "releasing twice is a no-op");
    assert_eq!(place1(&mut p, &r, "t2").unwrap(), "a", "room is free the moment an attempt ends");
}

#[test]
fn the_explanation_for_a_task_counts_every_node_once_by_its_first_reason() {
    let mut p = pool();
    let mut n = |name: &str, f: &dyn Fn(&mut Node)| {
        let mut x = node(name, 8000, 16 * GI);
        x.reputation = Reputation(900);
        f(&mut x);
        p.upsert(x);
    };
    n("ok", &|_| {});
    n("gone", &|x| x.ready = false);
    n("cordoned", &|x| x.cordoned = true);
    n("quarantined", &|x| x.quarantined = true);
    n("paused", &|x| x.paused = true);
    n("exec-only", &|x| x.runtimes = vec!["exec".into()]);
    n("cpu-gpu", &|x| x.gpus = vec![Gpu { model: "rtx4090".into(), memory_bytes: 24 * GI }]);
    n("untrusted", &|x| {
        x.gpus = vec![Gpu { model: "A100-80GB".into(), memory_bytes: 80 * GI }];
        x.reputation = Reputation(300)
    });
    n("tainted", &|x| x.taints = vec![Taint { key: "dedicated".into(), value: "ml".into(), ..Default::default() }]);
    let mut r = Request::new("wasm", res(500, GI));
    r.gpu = GpuRequest { count: 1, model: Some(GpuPattern::parse("a100*").unwrap()), min_memory_bytes: 0 };
    r.min_reputation = Reputation(800);
    assert_eq!(
        p.explain(&r).to_string(),
        "0/9 nodes can run it: 2 no GPU matching a100*, 1 not ready, 1 cordoned, 1 quarantined (too many results outvoted), \
         1 paused by their provider, 1 do not offer runtime wasm, 1 have a taint the job does not tolerate, 1 reputation below 0.8"
    );
    assert_eq!(p.len(), 9);
}

#[test]
fn replicas_land_on_distinct_providers_and_owners_or_not_at_all() {
    let mut p = pool();
    for (name, owner) in [("a1", "alice"), ("a2", "alice"), ("b1", "bob"), ("solo", "")] {
        let mut n = node(name, 4000, 4 * GI);
        n.owner = owner.into();
        p.upsert(n);
    }
    let mut r = Request::new("wasm", res(1000, GI));
    r.replicas = 3;
    let nodes = p.place(&r, &ids("x", 3), "ns", 1).unwrap();
    let owner = |n: &str| p.node(n).unwrap().owner.clone();
    let mut owners: Vec<String> = nodes.iter().map(|n| if owner(n).is_empty() { n.clone() } else { owner(n) }).collect();
    owners.sort();
    owners.dedup();
    assert_eq!(owners.len(), 3, "{nodes:?}");
    r.replicas = 4;
    let why = p.place(&r, &ids("y", 4), "ns", 2).unwrap_err();
    assert_eq!(why.to_string(), "4/4 nodes can run it, but they belong to 3 owner(s) and each task needs 4 replicas on distinct providers and owners");
    assert_eq!(p.reservations(), 3, "a refused task reserves nothing");
}

#[test]
fn gpus_are_reserved_device_by_device() {
    let mut p = pool();
    let mut n = node("rig", 32_000, 128 * GI);
    n.gpus = vec![
        Gpu { model: "h100".into(), memory_bytes: 80 * GI },
        Gpu { model: "rtx4090".into(), memory_bytes: 24 * GI },
        Gpu { model: "h100".into(), memory_bytes: 80 * GI },
    ];
    p.upsert(n);
    let mut r = Request::new("wasm", res(1000, GI));
    r.gpu = GpuRequest { count: 1, model: Some(GpuPattern::parse("h100").unwrap()), min_memory_bytes: 0 };
    place1(&mut p, &r, "g1").unwrap();
    place1(&mut p, &r, "g2").unwrap();
    assert_eq!(place1(&mut p, &r, "g3").unwrap_err().to_string(), "0/1 nodes can run it: 1 no free GPU matching h100");
    r.gpu.model = None;
    assert_eq!(place1(&mut p, &r, "g3").unwrap(), "rig", "the rtx4090 is still free");
    assert_eq!(p.allocation("rig").gpus, 3);
    p.release("g1");
    assert_eq!(p.allocation("rig").gpus, 2);
}

#[test]
fn data_locality_reputation_and_price_steer_the_choice() {
    let mut p = pool();
    let at = |name: &str, region: &str, zone: &str| {
        let mut n = node(name, 4000, 4 * GI);
        n.labels.insert(REGION_LABEL.into(), region.into());
        n.labels.insert(ZONE_LABEL.into(), zone.into());
        n
    };
    p.upsert(at("us", "us", "us-1"));
    p.upsert(at("eu-2", "eu", "eu-2"));
    p.upsert(at("eu-1", "eu", "eu-1"));
    let mut r = Request::new("wasm", res(100, 1 << 20));
    r.data_locality = Some(Locality { region: Some("eu".into()), zone: Some("eu-1".into()) });
    assert_eq!(place1(&mut p, &r, "l1").unwrap(), "eu-1");
    r.data_locality = Some(Locality { region: Some("eu".into()), zone: Some("eu-3".into()) });
    assert!(place1(&mut p, &r, "l2").unwrap().starts_with("eu"));

    let mut p = pool();
    let mut trusted = node("trusted", 4000, 4 * GI);
    trusted.reputation = Reputation(990);
    p.upsert(node("new", 4000, 4 * GI));
    p.upsert(trusted);
    assert_eq!(place1(&mut p, &Request::new("wasm", res(100, 1 << 20)), "r1").unwrap(), "trusted");

    let mut p = pool();
    let mut dear = node("dear", 4000, 4 * GI);
    dear.rates = Rates { cpu_core_hour: Micros(1_000_000), ..Default::default() };
    let mut cheap = node("cheap", 4000, 4 * GI);
    cheap.rates = Rates { cpu_core_hour: Micros(100_000), ..Default::default() };
    p.upsert(dear);
    p.upsert(cheap);
    let mut r = Request::new("wasm", res(1000, 1 << 20));
    assert_eq!(place1(&mut p, &r, "p1").unwrap(), "cheap");
    r.max_price_per_hour = Some(Micros(200_000));
    assert_eq!(place1(&mut p, &r, "p2").unwrap(), "cheap");
    assert_eq!(place1(&mut p, &r, "p3").unwrap(), "cheap");
    assert_eq!(place1(&mut p, &r, "p4").unwrap(), "cheap");
    assert_eq!(place1(&mut p, &r, "p5").unwrap_err().to_string(), "0/2 nodes can run it: 1 price above 0.2 per hour, 1 insufficient cpu (need 1)");
}

#[test]
fn an_exact_reservation_holds_the_same_gpu_devices_and_disk_and_is_never_refreshed() {
    let mut p = pool();
    let mut a = node("a", 8000, 8 * GI);
    a.capacity.ephemeral_bytes = 30 * GI;
    a.gpus = (0..2).map(|_| Gpu { model: "a100".into(), memory_bytes: 80 * GI }).collect();
    p.upsert(a);
    let gpu = GpuRequest { count: 1, model: Some(GpuPattern::parse("a100").unwrap()), min_memory_bytes: 0 };
    let r = Request { gpu: gpu.clone(), ..Request::new("wasm", Resources { ephemeral_bytes: 20 * GI, ..res(1000, GI) }) };
    assert_eq!(place1(&mut p, &r, "first").unwrap(), "a");
    let mask = p.held_gpus("first").unwrap();
    assert_eq!(mask.count_ones(), 1);
    assert_eq!(p.held_gpus("nobody"), None);

    // Rebuilt elsewhere from what the store recorded: the same device, the same disk.
    let mut q = pool();
    let held = Resources { ephemeral_bytes: 20 * GI, ..res(1000, GI) };
    assert!(q.reserve_exact("first", "a", held, mask, "ns"));
    assert!(!q.reserve_exact("first", "a", held, mask, "ns"), "idempotent");
    let mut a = node("a", 8000, 8 * GI);
    a.capacity.ephemeral_bytes = 30 * GI;
    a.gpus = (0..2).map(|_| Gpu { model: "a100".into(), memory_bytes: 80 * GI }).collect();
    q.upsert(a);
    assert!(!q.refresh("first", res(1, 1), &GpuRequest::default()), "exact already");
    assert_eq!(q.held_gpus("first"), Some(mask));
    let gpu_only = Request { gpu, ..Request::new("wasm", res(1000, GI)) };
    assert_eq!(place1(&mut q, &gpu_only, "second").unwrap(), "a");
    assert_eq!(q.held_gpus("second").unwrap() & mask, 0, "the other device");
    assert_eq!(place1(&mut q, &gpu_only, "third").unwrap_err().to_string(), "0/1 nodes can run it: 1 no free GPU matching a100");
    q.release("first");
    q.release("second");
    assert_eq!(q.allocation("a"), Allocation::default());
}

#[test]
fn reservations_survive_a_restart_before_their_node_reconnects() {
    let mut p = pool();
    // Rebuilt from the store: the node is not connected yet.
    assert!(p.reserve("old", "a", res(3000, GI), &GpuRequest::default(), "ns"));
    assert!(!p.reserve("old", "a", res(3000, GI), &GpuRequest::default(), "ns"), "reserving twice is a no-op");
    p.upsert(node("a", 4000, 4 * GI));
    let r = Request::new("wasm", res(2000, GI));
    assert_eq!(place1(&mut p, &r, "new").unwrap_err().to_string(), "0/1 nodes can run it: 1 insufficient cpu (need 2)");
    // The first sync fills in what the store did not know; a released one stays released.
    assert!(p.refresh("old", res(3000, 2 * GI), &GpuRequest::default()));
    assert_eq!(p.allocation("a").resources, res(3000, 2 * GI));
    assert!(!p.refresh("old", res(1, 1), &GpuRequest::default()), "completed once, then left alone");
    p.release("new");
    let placed = Request::new("wasm", res(500, GI));
    assert_eq!(place1(&mut p, &placed, "fresh").unwrap(), "a");
    assert!(!p.refresh("fresh", res(1000, GI), &GpuRequest::default()), "what place reserved is exact already");
    p.release("fresh");
    p.release("old");
    assert!(!p.refresh("old", res(3000, 2 * GI), &GpuRequest::default()));
    assert_eq!(p.allocation("a"), Allocation::default());
    assert_eq!(p.namespace_usage("ns"), Usage::default());
}

#[test]
fn removed_and_disconnected_nodes_take_nothing_new() {
    let mut p = pool();
    p.upsert(node("a", 4000, 4 * GI));
    p.upsert(node("b", 4000, 4 * GI));
    p.set_ready("a", false);
    p.remove("b");
    let r = Request::new("wasm", res(100, 1 << 20));
    assert_eq!(place1(&mut p, &r, "t").unwrap_err().to_string(), "0/1 nodes can run it: 1 not ready");
    p.set_ready("a", true);
    p.set_paused("a", true);
    assert_eq!(place1(&mut p, &r, "t").unwrap_err().to_string(), "0/1 nodes can run it: 1 paused by their provider");
    p.set_paused("a", false);
    p.set_cordoned("a", true);
    assert_eq!(place1(&mut p, &r, "t").unwrap_err().to_string(), "0/1 nodes can run it: 1 cordoned");
    p.set_cordoned("a", false);
    p.set_quarantined("a", true);
    assert_eq!(place1(&mut p, &r, "t").unwrap_err().to_string(), "0/1 nodes can run it: 1 quarantined (too many results outvoted)");
    p.set_quarantined("a", false);
    assert_eq!(place1(&mut p, &r, "t").unwrap(), "a");
    assert_eq!(Pool::new(1, Weights::default(), FairShare::default()).explain(&r).to_string(), "0/0 nodes: no provider node is connected");
}

#[test]
fn a_refused_batch_says_when_its_room_is_kept_for_a_job_ahead() {
    let mut p = pool();
    p.upsert(node("a", 2000, 4 * GI));
    let r = Request::new("wasm", res(1000, GI));
    let demand = |job: &str, ns: &str, n| Demand { job: job.into(), namespace: ns.into(), priority: 0, request: r.clone(), remaining: n, seen_ms: 0 };
    // b's small job registers first but cannot place (a third job holds the node).
    p.reserve("other", "a", res(2000, GI), &GpuRequest::default(), "c");
    let b = p.place_batch(demand("b/small", "b", 1), &[vec!["b-0".into()]], 0);
    assert!(b.placed.is_empty());
    p.release("other");
    let a = p.place_batch(demand("a/big", "a", 100), &[vec!["a-0".into()], vec!["a-1".into()]], 1);
    assert_eq!(a.placed.len(), 1, "one slot is kept for b");
    assert_eq!(a.held_for, vec!["b/small".to_string()]);
    assert_eq!(a.unplaced.unwrap().to_string(), "1/1 nodes can run it, but their room is kept for 1 task(s) of jobs ahead in the fair-share queue");
    let b = p.place_batch(demand("b/small", "b", 1), &[vec!["b-0".into()]], 2);
    assert_eq!(b.placed.len(), 1);
    assert_eq!(p.demands().map(|d| d.job.as_str()).collect::<Vec<_>>(), ["a/big"]);
}

#[test]
fn a_namespace_cannot_jump_the_queue_with_a_priority_the_admin_did_not_grant() {
    let r = Request::new("wasm", res(1000, GI));
    let demand = |job: &str, ns: &str, priority| Demand { job: job.into(), namespace: ns.into(), priority, request: r.clone(), remaining: 1, seen_ms: 0 };
    // "a-small" waits first; "greedy" then asks for priority 1000. Ungranted, it ranks at 0,
    // behind a-small (equal priority and usage: by name), and room is kept for a-small;
    // granted, it ranks first and nothing is kept.
    for (grants, kept_for_small) in [(vec![], true), (vec!["greedy=1000"], false)] {
        let fair = FairShare::default().with_max_priorities(grants.iter().copied()).unwrap();
        let mut p = Pool::new(1, Weights::default(), fair);
        p.upsert(node("a", 2000, 4 * GI));
        p.reserve("other", "a", res(2000, GI), &GpuRequest::default(), "c");
        assert!(p.place_batch(demand("a-small/j", "a-small", 0), &[vec!["s-0".into()]], 0).placed.is_empty());
        p.release("other");
        let greedy = p.place_batch(demand("greedy/j", "greedy", 1000), &[vec!["g-0".into()], vec!["g-1".into()]], 1);
        assert_eq!(greedy.held_for.contains(&"a-small/j".to_string()), kept_for_small, "grants {grants:?}");
        assert_eq!(greedy.placed.len(), if kept_for_small { 1 } else { 2 }, "grants {grants:?}");
    }
}

// ---- properties ----

#[derive(Debug, Clone)]
struct Spec {
    cpu: u64,
    mem: u64,
    disk: u64,
    gpus: u8,
    owner: u8,
    cordoned: bool,
    exec: bool,
    region: u8,
}

fn arb_spec() -> impl Strategy<Value = Spec> {
    (0u64..8, 0u64..8, 0u64..3, 0u8..4, 0u8..5, prop::bool::weighted(0.1), any::<bool>(), 0u8..3).prop_map(
        |(cpu, mem, disk, gpus, owner, cordoned, exec, region)| Spec {
            cpu: cpu * 1000,
            mem: mem * GI,
            disk: disk * 10 * GI,
            gpus,
            owner,
            cordoned,
            exec,
            region,
        },
    )
}

fn build(specs: &[Spec], seed: u64) -> Pool {
    let mut p = Pool::new(seed, Weights::default(), FairShare::default());
    for (i, s) in specs.iter().enumerate() {
        let mut n = Node::new(&format!("n{i:02}"), Resources { cpu_millis: s.cpu, memory_bytes: s.mem, ephemeral_bytes: s.disk }, &["wasm"]);
        if s.exec {
            n.runtimes.push("exec".into());
        }
        n.cordoned = s.cordoned;
        n.owner = if s.owner == 0 { String::new() } else { format!("owner{}", s.owner) };
        n.gpus = (0..s.gpus).map(|g| Gpu { model: if g % 2 == 0 { "a100".into() } else { "h100".into() }, memory_bytes: 40 * GI }).collect();
        n.labels.insert(REGION_LABEL.into(), format!("r{}", s.region));
        n.reputation = Reputation(300 + (i as u16 * 97) % 700);
        p.upsert(n);
    }
    p
}

#[derive(Debug, Clone)]
struct Ask {
    cpu: u64,
    mem: u64,
    disk: u64,
    gpus: u32,
    exec: bool,
    replicas: u32,
}

fn arb_ask() -> impl Strategy<Value = Ask> {
    (1u64..3000, 1u64..(3 * GI), prop_oneof![Just(0u64), 1u64..(15 * GI)], prop_oneof![3 => Just(0u32), 1 => 1u32..3], any::<bool>(), 1u32..4)
        .prop_map(|(cpu, mem, disk, gpus, exec, replicas)| Ask { cpu, mem, disk, gpus, exec, replicas })
}

fn request(a: &Ask) -> Request {
    let mut r = Request::new(if a.exec { "exec" } else { "wasm" }, Resources { cpu_millis: a.cpu, memory_bytes: a.mem, ephemeral_bytes: a.disk });
    r.gpu.count = a.gpus;
    r.replicas = a.replicas;
    r
}

/// Runs asks (placing each, and releasing every third placed task) and returns the placements.
fn run(p: &mut Pool, asks: &[Ask]) -> Vec<Option<Vec<String>>> {
    let mut out = vec![];
    for (i, a) in asks.iter().enumerate() {
        let r = request(a);
        let ids = ids(&format!("t{i}"), a.replicas as usize);
        let placed = p.place(&r, &ids, if i % 2 == 0 { "x" } else { "y" }, salt(&ids[0])).ok();
        if placed.is_some() && i % 3 == 2 {
            for id in &ids {
                assert!(p.release(id));
            }
        }
        out.push(placed);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn placement_never_overcommits_any_resource(specs in prop::collection::vec(arb_spec(), 1..24), asks in prop::collection::vec(arb_ask(), 1..60)) {
        let mut p = build(&specs, 1);
        run(&mut p, &asks);
        for (i, s) in specs.iter().enumerate() {
            let a = p.allocation(&format!("n{i:02}"));
            prop_assert!(a.resources.cpu_millis <= s.cpu && a.resources.memory_bytes <= s.mem && a.resources.ephemeral_bytes <= s.disk, "{a:?} on {s:?}");
            prop_assert!(a.gpus <= s.gpus as u32);
            if s.cordoned {
                prop_assert_eq!(a.running, 0);
            }
        }
    }

    #[test]
    fn replicas_always_land_on_distinct_providers_and_owners(specs in prop::collection::vec(arb_spec(), 1..24), asks in prop::collection::vec(arb_ask(), 1..40)) {
        let mut p = build(&specs, 2);
        for placed in run(&mut p, &asks).into_iter().flatten() {
            let owners: Vec<String> = placed
                .iter()
                .map(|n| { let o = &p.node(n).unwrap().owner; if o.is_empty() { format!("self/{n}") } else { o.clone() } })
                .collect();
            let mut distinct_nodes = placed.clone();
            distinct_nodes.sort();
            distinct_nodes.dedup();
            let mut distinct_owners = owners.clone();
            distinct_owners.sort();
            distinct_owners.dedup();
            prop_assert_eq!(distinct_nodes.len(), placed.len());
            prop_assert_eq!(distinct_owners.len(), placed.len());
        }
    }

    #[test]
    fn the_same_inputs_and_seed_give_the_same_placements(specs in prop::collection::vec(arb_spec(), 1..24), asks in prop::collection::vec(arb_ask(), 1..40), seed in any::<u64>()) {
        let first = run(&mut build(&specs, seed), &asks);
        prop_assert_eq!(run(&mut build(&specs, seed), &asks), first);
    }

    #[test]
    fn a_refusal_is_exact_no_single_node_could_have_taken_the_task(specs in prop::collection::vec(arb_spec(), 1..24), asks in prop::collection::vec(arb_ask(), 1..40)) {
        let mut p = build(&specs, 3);
        for (i, a) in asks.iter().enumerate() {
            let r = Request { replicas: 1, ..request(a) };
            let id = format!("t{i}");
            let before = p.explain(&r);
            match p.place(&r, std::slice::from_ref(&id), "ns", salt(&id)) {
                Ok(_) => prop_assert!(before.fitting() >= 1),
                Err(why) => {
                    prop_assert_eq!(why.fitting(), 0);
                    prop_assert_eq!(why.excluded.values().sum::<usize>(), p.len());
                }
            }
        }
    }

    #[test]
    fn explanations_count_exactly_what_a_node_by_node_check_counts(
        specs in prop::collection::vec(arb_spec(), 1..24),
        asks in prop::collection::vec(arb_ask(), 1..30),
        flips in prop::collection::vec((0usize..24, 0u8..5, any::<bool>()), 0..20),
    ) {
        let mut p = build(&specs, 6);
        run(&mut p, &asks);
        for (i, what, on) in flips {
            let name = format!("n{:02}", i % specs.len());
            match what {
                0 => p.set_ready(&name, on),
                1 => p.set_cordoned(&name, on),
                2 => p.set_paused(&name, on),
                3 => p.set_quarantined(&name, on),
                _ => if on { p.remove(&name) } else if let Some(n) = p.nodes.get(i % specs.len()).cloned() { p.upsert(n) },
            }
        }
        for a in &asks {
            let r = Request { replicas: 1, ..request(a) };
            let mut want: BTreeMap<Exclusion, usize> = BTreeMap::new();
            for (name, &id) in &p.by_name {
                let h = &p.hot[id as usize];
                if h.flags & PRESENT == 0 {
                    continue;
                }
                let node = p.node(name).unwrap();
                if let Some(why) = filter::exclusion(node, h.allocated, h.gpus_used, &r) {
                    *want.entry(why).or_default() += 1;
                }
            }
            prop_assert_eq!(p.explain(&r).excluded, want);
        }
    }

    #[test]
    fn releasing_every_attempt_frees_everything_exactly(specs in prop::collection::vec(arb_spec(), 1..24), asks in prop::collection::vec(arb_ask(), 1..60)) {
        let mut p = build(&specs, 4);
        run(&mut p, &asks);
        let held: Vec<String> = p.reservations.keys().cloned().collect();
        for id in &held {
            prop_assert!(p.release(id));
            prop_assert!(!p.release(id));
        }
        for i in 0..specs.len() {
            prop_assert_eq!(p.allocation(&format!("n{i:02}")), Allocation::default());
        }
        prop_assert_eq!(p.namespace_usage("x"), Usage::default());
        prop_assert_eq!(p.namespace_usage("y"), Usage::default());
    }

    /// The fairness bound: however large A's job, a 10-task job of namespace B that waits
    /// while A fills the pool gets the room freed by A's finishing attempts: when B is owed
    /// room for its tasks (by namespace weight) and they fit in what was freed, A's next sync
    /// leaves it free and B's sync right after places all of them.
    #[test]
    fn a_huge_job_cannot_starve_a_small_one_of_another_namespace(
        specs in prop::collection::vec(arb_spec(), 4..24),
        weight_b in 1u32..4,
        cpu in 100u64..1500,
        freed in 0usize..40,
    ) {
        let mut p = build(&specs, 5);
        p.fair = FairShare::parse([format!("b={weight_b}").as_str()]).unwrap();
        let r = Request::new("wasm", res(cpu, 64 << 20));
        let d = |job: &str, ns: &str, n| Demand { job: job.into(), namespace: ns.into(), priority: 0, request: r.clone(), remaining: n, seen_ms: 0 };
        let tasks = |prefix: &str, n: usize| -> Vec<Vec<String>> { (0..n).map(|i| vec![format!("{prefix}-{i}")]).collect() };
        // A alone fills the pool.
        let first = p.place_batch(d("a/huge", "a", 100_000), &tasks("a0", 2000), 0);
        // B arrives and waits (it places whatever still fits, usually nothing).
        let b_tasks = tasks("b", 10);
        let early = p.place_batch(d("b/small", "b", 10), &b_tasks, 1).placed.len();
        let b_left: Vec<Vec<String>> = b_tasks[early..].to_vec();
        // Some of A's attempts end.
        for pl in first.placed.iter().take(freed) {
            prop_assert!(p.release(&tasks("a0", 2000)[pl.task][0]));
        }
        // Would B's remaining tasks fit in what is free now, and is B owed room for them?
        let mut probe = build(&specs, 5);
        for (id, res) in p.reservations.iter() {
            probe.reserve(id, &p.nodes[res.node as usize].name.clone(), res.resources, &GpuRequest::default(), "z");
        }
        let fits = b_left.iter().all(|ids| probe.place(&r, ids, "b", 0).is_ok());
        let total = p.capacity;
        let used_b = p.namespace_usage("b").dominant_share(total);
        let per_task = Usage::of(r.resources, 0).dominant_share(total);
        let owed_ok = (weight_b as f64 / (weight_b as f64 + 1.0)) - used_b >= per_task * b_left.len() as f64 + 1e-6;
        // A's round, then B's.
        p.place_batch(d("a/huge", "a", 100_000), &tasks("a1", 2000), 2);
        let b = p.place_batch(d("b/small", "b", b_left.len() as u32), &b_left, 3);
        if fits && owed_ok {
            prop_assert_eq!(b.placed.len(), b_left.len(), "{:?}", b.unplaced);
        }
    }
}
