//! The sustained part: one job of a million trivial tasks over a thousand simulated agents,
//! measuring throughput and whether the operator's memory stays flat as tasks finish.
//!
//! The operator runs in a child process and the agents in a grandchild (as in fan-in), so the
//! operator's RSS is its own. A simulated agent answers each Assign at once with a Succeeded
//! update and a receipt signed with its node key, so the operator does all of its real work
//! (placement, durable attempts, group-committed results, receipt checks, ledger appends).

use super::*;

/// Tasks each simulated agent may hold at once (the job's parallelism is agents × this).
const PER_AGENT: u32 = 4;

struct Load {
    tasks: u32,
    agents: usize,
}

impl Load {
    fn from_env() -> Load {
        let quick = std::env::var("KOMMUNE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let num = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        let (tasks, agents) = if quick { (20_000, 50) } else { (1_000_000, 1000) };
        Load { tasks: num("KOMMUNE_BENCH_SUSTAINED_TASKS", tasks) as u32, agents: num("KOMMUNE_BENCH_SUSTAINED_AGENTS", agents) as usize }
    }
}

/// Runs the sustained part in a child process and prints its line.
pub fn sustained() {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe).env("KOMMUNE_BENCH_ROLE", "sustained-operator").stderr(std::process::Stdio::inherit()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    assert!(out.status.success() && text.contains("sustained "), "the sustained operator process failed ({}); see stderr", out.status);
}

/// Size of the files under `dir` whose name starts with `prefix`, in MiB.
fn files_mib(dir: &Path, prefix: &str) -> f64 {
    let bytes: u64 = std::fs::read_dir(dir)
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(prefix)).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    bytes as f64 / (1024.0 * 1024.0)
}

/// The operator process: issues the agents' identities, starts them, runs the job.
pub fn sustained_operator() {
    let load = Load::from_env();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("operator");
    let config = GatewayConfig { heartbeat_interval: Duration::from_secs(10), session_timeout: Duration::from_secs(30), ..GatewayConfig::default() };
    let (op, mut changed, mut events) = start_operator(&data, config, 2);
    let rt = op.runtime.as_ref().unwrap();
    rt.spawn(async move { while events.recv().await.is_some() {} });
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(dir.path().join("identities.jsonl")).unwrap());
        for i in 0..load.agents {
            let name = format!("sim-{i:05}");
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
            let (cert_pem, key_sha) = op.ca.sign_node(csr.der(), &name).unwrap();
            rt.block_on(op.dispatcher.store().register_node(&name, &key_sha, &Default::default(), 0)).unwrap();
            serde_json::to_writer(&mut w, &Identity { name, cert_pem, key_pem: key.serialize_pem() }).unwrap();
            w.write_all(b"\n").unwrap();
        }
    }
    std::fs::write(dir.path().join("ca.pem"), op.ca.cert_pem()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .env("KOMMUNE_BENCH_ROLE", "sustained-agents")
        .env("KOMMUNE_BENCH_DIR", dir.path())
        .env("KOMMUNE_BENCH_URL", &op.url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "connected", "the simulated agents did not connect");

    let sha256 = op.blobs.put_for(BlobOwner { job_uid: "sustained", namespace: "bench" }, NOOP_WAT.as_bytes()).unwrap();
    let module = ModuleRef { sha256, url: None };
    let p = policy(load.tasks, load.agents as u32 * PER_AGENT);
    let rss_start = rss_mib();
    let peak = Arc::new(std::sync::Mutex::new(rss_start));
    let done_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done_flag) = (peak.clone(), done_flag.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !done_flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let now = rss_mib();
                let mut peak = peak.lock().unwrap();
                *peak = peak.max(now);
                n += 1;
                if n.is_multiple_of(20) {
                    eprintln!("sustained: rss {now:.0} MiB (peak {:.0})", *peak);
                }
            }
        })
    };
    let started = Instant::now();
    let done = rt.block_on(op.run_to_end(&mut changed, &job("sustained"), &p, &module));
    let secs = started.elapsed().as_secs_f64();
    // Before the check below reads every attempt back into memory.
    let rss_end = rss_mib();
    done_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(done.progress.counts.succeeded, load.tasks);
    let ran = rt.block_on(op.dispatcher.store().attempts_for_job("sustained")).unwrap().len();
    assert_eq!(ran, load.tasks as usize, "every task ran exactly once");
    eprintln!("sustained: {} tasks in {secs:.1}s, rss peak {:.0} MiB, ledger {:.0} MiB", load.tasks, *peak.lock().unwrap(), files_mib(&data, "ledger"));
    println!(
        "sustained tasks={} tasks_per_s={:.0} operator_rss_mib_start={rss_start:.0} operator_rss_mib_end={rss_end:.0} store_mib={:.0}",
        load.tasks,
        f64::from(load.tasks) / secs,
        files_mib(&data, "kommune.db")
    );
    let _ = std::io::stdout().flush();
    let _ = child.kill();
    let _ = child.wait();
    drop(op);
}

/// The agents' process: one real mTLS session per identity; every Assign is answered at once
/// with a Succeeded update carrying a signed receipt.
pub fn sustained_agents() {
    let dir = PathBuf::from(std::env::var("KOMMUNE_BENCH_DIR").unwrap());
    let url = std::env::var("KOMMUNE_BENCH_URL").unwrap();
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let ids: Vec<Identity> = std::fs::read_to_string(dir.join("identities.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = kommune_agent::connect::parse_server(&url).unwrap();
    rt.block_on(async {
        let (welcomed_tx, mut welcomed) = mpsc::channel::<()>(ids.len().max(1));
        let handshakes = Arc::new(tokio::sync::Semaphore::new(64));
        for id in &ids {
            let (server, ca_pem, welcomed_tx, handshakes) = (server.clone(), ca_pem.clone(), welcomed_tx.clone(), handshakes.clone());
            let key = kommune_proto::receipt::signing_key_from_pem(&id.key_pem).unwrap();
            let receipts = kommune_agent::receipts::Receipts::start(dir.join("receipts").join(&id.name), &id.name, key).unwrap();
            let (cert, key_pem) = (id.cert_pem.clone(), id.key_pem.clone());
            tokio::spawn(async move {
                let permit = handshakes.acquire_owned().await.unwrap();
                let mut client = kommune_agent::connect::client(&server, &ca_pem, Some((&cert, &key_pem))).await.unwrap();
                let (tx, rx) = mpsc::channel::<AgentMessage>(64);
                let hello = Hello { facts: Some(roomy_facts()), running_attempt_ids: vec![], paused: false };
                tx.send(AgentMessage { kind: Some(agent_message::Kind::Hello(hello)) }).await.unwrap();
                let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
                match inbound.message().await {
                    Ok(Some(m)) if matches!(m.kind, Some(operator_message::Kind::Welcome(_))) => {}
                    other => panic!("no Welcome: {other:?}"),
                }
                drop(permit);
                let _ = welcomed_tx.send(()).await;
                let mut tick = tokio::time::interval(Duration::from_secs(10));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let hb = Heartbeat { running_attempt_ids: vec![], paused: false };
                            if tx.send(AgentMessage { kind: Some(agent_message::Kind::Heartbeat(hb)) }).await.is_err() { break; }
                        }
                        m = inbound.message() => match m {
                            Ok(Some(m)) => {
                                let Some(operator_message::Kind::Assign(a)) = m.kind else { continue };
                                let now = kommune_proto::now_ms();
                                let usage = kommune_proto::v1::Usage { wall_millis: 0, source: "wasm-thread".into(), ..Default::default() };
                                let receipt = receipts.issue(&a.attempt_id, &a.job, kommune_proto::v1::AttemptState::Succeeded, usage, now, now);
                                let update = kommune_proto::v1::TaskUpdate {
                                    attempt_id: a.attempt_id,
                                    state: kommune_proto::v1::AttemptState::Succeeded as i32,
                                    result: Some(kommune_proto::v1::TaskResult { exit_code: 0, ..Default::default() }),
                                    receipt: Some(receipt),
                                    trace: None,
                                };
                                if tx.send(AgentMessage { kind: Some(agent_message::Kind::TaskUpdate(update)) }).await.is_err() { break; }
                            }
                            _ => break,
                        },
                    }
                }
            });
        }
        drop(welcomed_tx);
        for _ in 0..ids.len() {
            welcomed.recv().await.unwrap();
        }
        println!("connected");
        let _ = std::io::stdout().flush();
        // Run until the operator's process kills this one.
        std::future::pending::<()>().await;
    });
}
