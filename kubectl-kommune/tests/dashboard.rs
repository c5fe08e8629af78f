//! The dashboard end to end on loopback: the operator's TLS endpoint with its gatekeeper, the
//! plugin's proxy with a user's credentials, and the page rendered by headless Chromium.

use std::sync::Arc;

use axum::serve::Listener as _;
use futures::future::BoxFuture;
use kommune_operator::web::auth::{AuthError, Authority, Gatekeeper, UserInfo};
use kommune_operator::web::overview::{FailureFacts, JobFacts, ProviderFacts};
use kommune_operator::web::{self, Source, tls};

/// Token "viewer" may list everything, token "nobody" nothing; any other token is unknown.
struct Tokens;

impl Authority for Tokens {
    fn review_token(&self, token: String) -> BoxFuture<'_, Result<Option<UserInfo>, AuthError>> {
        Box::pin(async move { Ok(["viewer", "nobody"].contains(&token.as_str()).then(|| UserInfo { username: token, ..UserInfo::default() })) })
    }
    fn allowed(&self, user: UserInfo, _: &'static str, _: &'static str, _: String) -> BoxFuture<'_, Result<bool, AuthError>> {
        Box::pin(async move { Ok(user.username == "viewer") })
    }
}

struct Fixed;

fn provider(name: &str, region: &str, used_cpu: u64, running: u32, earned: u64) -> ProviderFacts {
    let hour = kommune_store_hour();
    ProviderFacts {
        name: name.into(),
        owner: format!("token:{name}"),
        region: region.into(),
        ready: true,
        capacity_cpu_millis: 4000,
        capacity_memory_bytes: 8 << 30,
        used_cpu_millis: used_cpu,
        used_memory_bytes: 1 << 30,
        running,
        reputation: 917,
        succeeded: 40,
        failed: 3,
        earned_micros: earned,
        receipts: 43,
        earnings: vec![(hour - 2 * 3_600_000, earned / 4), (hour - 3_600_000, earned / 4), (hour, earned / 2)],
        ..ProviderFacts::default()
    }
}

fn kommune_store_hour() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    now - now % 3_600_000
}

impl Source for Fixed {
    fn facts(&self) -> BoxFuture<'_, Result<web::Facts, String>> {
        let mut offline = provider("pn-berlin-2", "eu-central", 0, 0, 0);
        offline.ready = false;
        let providers = vec![provider("pn-berlin-1", "eu-central", 2000, 2, 1_250_000), offline, provider("pn-ohio-1", "us-east", 3000, 3, 4_500_000)];
        let jobs = vec![
            JobFacts {
                namespace: "team-a".into(),
                name: "render".into(),
                phase: "Running".into(),
                runtime: "wasm".into(),
                total: 10,
                running: 4,
                succeeded: 4,
                pending: 2,
                cost: "0.412000".into(),
                budget: Some("5".into()),
                ..JobFacts::default()
            },
            JobFacts {
                namespace: "team-b".into(),
                name: "crunch".into(),
                phase: "Failed".into(),
                runtime: "exec".into(),
                total: 3,
                succeeded: 1,
                failed: 2,
                cost: "0.030000".into(),
                blocked: Some("BackoffLimitExceeded: task 2 failed 3 times".into()),
                failures: vec![FailureFacts { index: 2, attempt: 3, node: "pn-ohio-1".into(), exit_code: 3, message: "exit status 3: out of input".into() }],
                ..JobFacts::default()
            },
        ];
        Box::pin(async move { Ok((providers, jobs)) })
    }
}

async fn start_operator_web() -> String {
    let (chain, key) = ca().issue_server(&["localhost".into()]).unwrap();
    let listener = tls::TlsListener::bind("127.0.0.1:0".parse().unwrap(), tls::server_config(&chain, &key, None).unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap().addr;
    let gate = Arc::new(Gatekeeper::new(Arc::new(Tokens)));
    tokio::spawn(web::serve(listener, web::router(gate, Arc::new(Fixed))));
    format!("https://localhost:{}", addr.port())
}

/// The operator CA of this test binary, which the plugin's client is given.
fn ca() -> &'static kommune_operator::pki::Ca {
    static CA: std::sync::OnceLock<kommune_operator::pki::Ca> = std::sync::OnceLock::new();
    CA.get_or_init(|| kommune_operator::pki::Ca::generate().unwrap())
}

fn trust() -> kubectl_kommune::connect::Trust {
    kubectl_kommune::connect::Trust::Roots { ders: kubectl_kommune::connect::roots_from_pem(ca().cert_pem()).unwrap(), server_name: None }
}

async fn user(token: Option<&str>) -> kube::Config {
    let user = token.map_or("{}".to_string(), |t| format!("{{token: {t}}}"));
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:1'}}}}]\nusers: [{{name: u, user: {user}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
    );
    let kc = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
    kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap()
}

async fn status(url: &str, token: Option<&str>) -> u16 {
    let client = kubectl_kommune::dashboard::operator_client(user(token).await, url, &trust()).unwrap();
    let req = http::Request::get("/api/v1/overview").body(Vec::new()).unwrap().map(kube::client::Body::from);
    client.send(req).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn the_overview_needs_a_token_the_api_server_accepts_and_a_grant() {
    let url = start_operator_web().await;
    assert_eq!(status(&url, None).await, 401);
    assert_eq!(status(&url, Some("forged")).await, 401);
    assert_eq!(status(&url, Some("nobody")).await, 403);
    assert_eq!(status(&url, Some("viewer")).await, 200);
}

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .map(str::to_string)
}

fn headless(chromium: &str, extra: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    std::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=8000", "--window-size=1280,520"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_the_pool_jobs_providers_and_failures_through_the_plugin() {
    let Some(chromium) = chromium() else {
        println!("skipped: no chromium");
        return;
    };
    let operator = start_operator_web().await;
    let client = kubectl_kommune::dashboard::operator_client(user(Some("viewer")).await, &operator, &trust()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(kubectl_kommune::dashboard::serve(listener, client));

    let url = format!("{local}#all");
    let out = tokio::task::spawn_blocking({
        let (c, u) = (chromium.clone(), url.clone());
        move || headless(&c, &["--dump-dom"], &u)
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("data-loaded=\"true\""), "the page did not load its data:\n{dom}\n{}", String::from_utf8_lossy(&out.stderr));
    // Pool: eu-central counts only its ready machine's 4 cores, 2 of them allocated.
    let row = |attr: &str| dom.split(attr).nth(1).and_then(|r| r.split("</tr>").next()).unwrap_or_default().to_string();
    let eu = row("data-region=\"eu-central\"");
    assert!(eu.contains("50%") && eu.contains("of 4 cores"), "{eu}");
    assert!(row("data-region=\"us-east\"").contains("75%"));
    // Jobs: progress and cost, and why the failed one stopped.
    let render = row("data-job=\"team-a/render\"");
    assert!(render.contains(" 4/10") && render.contains("40%") && render.contains("0.412000 / 5"), "{render}");
    assert!(row("data-job=\"team-b/crunch\"").contains("BackoffLimitExceeded"));
    // Providers: state, reputation and earnings.
    let ohio = row("data-provider=\"pn-ohio-1\"");
    assert!(ohio.contains("0.917") && ohio.contains("4.500000") && ohio.contains("<polyline"), "{ohio}");
    assert!(row("data-provider=\"pn-berlin-2\"").contains("NotReady"));
    // Failures, with their reason.
    assert!(dom.contains("exit status 3: out of input"));
    // The README's pictures come from a real run: e2e/tests/dashboard_live.rs.
}
