//! `kubectl kommune dashboard`: port-forwards to the operator's dashboard and serves it on
//! 127.0.0.1 through a local proxy that adds the user's kubeconfig credentials to each request.

use std::net::SocketAddr;
use std::process::Stdio;

use anyhow::Context as _;
use axum::body::Body as AxumBody;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpListener;

#[derive(clap::Args, Debug)]
pub struct DashboardArgs {
    /// Namespace the operator runs in.
    #[arg(long, short = 'n', default_value = "kommune-system")]
    pub namespace: String,
    /// The operator's dashboard Service (the chart's `<fullname>-dashboard`).
    #[arg(long, default_value = "kommune-dashboard")]
    pub service: String,
    /// The Service's dashboard port.
    #[arg(long, default_value_t = 8444)]
    pub remote_port: u16,
    /// Local port to serve the dashboard on (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Reach the dashboard at this https URL instead of port-forwarding (an operator run
    /// outside the cluster, or an Ingress).
    #[arg(long)]
    pub operator_url: Option<String>,
    /// Open the local URL in a browser (xdg-open / open).
    #[arg(long)]
    pub open: bool,
}

pub async fn run(args: DashboardArgs) -> anyhow::Result<()> {
    let (url, _forward) = match &args.operator_url {
        Some(u) => (u.clone(), None),
        None => {
            let (port, child) = port_forward(&args).await?;
            (format!("https://127.0.0.1:{port}"), Some(child))
        }
    };
    let config = kube::Config::infer().await.context("cannot load your kubeconfig")?;
    let client = operator_client(config, &url)?;
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], args.port))).await.context("cannot listen on 127.0.0.1")?;
    let local = format!("http://{}/", listener.local_addr()?);
    println!("Kommune dashboard: {local}  (Ctrl-C to stop)");
    if args.open {
        let opener = if cfg!(target_os = "macos") { "open" } else { "xdg-open" };
        if let Err(e) = std::process::Command::new(opener).arg(&local).stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
            eprintln!("cannot start {opener} ({e}); open {local} yourself");
        }
    }
    tokio::select! {
        r = serve(listener, client) => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// Runs `kubectl port-forward` to the operator's Service and returns the local port it chose;
/// the child is killed when dropped.
async fn port_forward(args: &DashboardArgs) -> anyhow::Result<(u16, tokio::process::Child)> {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let mut child = tokio::process::Command::new(&kubectl)
        .args(["port-forward", "-n", &args.namespace, &format!("svc/{}", args.service), &format!(":{}", args.remote_port), "--address", "127.0.0.1"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {kubectl} port-forward (is kubectl on PATH, or KUBECTL set?)"))?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout from kubectl")?).lines();
    while let Some(line) = lines.next_line().await? {
        if let Some(port) = forwarded_port(&line) {
            // Keep draining its output so kubectl never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok((port, child));
        }
    }
    anyhow::bail!(
        "kubectl port-forward to svc/{} in {} ended before forwarding (does the Service exist, with the dashboard on port {}?)",
        args.service,
        args.namespace,
        args.remote_port
    )
}

/// The local port of kubectl's "Forwarding from 127.0.0.1:PORT -> REMOTE" line.
pub fn forwarded_port(line: &str) -> Option<u16> {
    let rest = line.strip_prefix("Forwarding from 127.0.0.1:")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// A client for the operator's dashboard at `url` that authenticates exactly as `config`
/// (the user's kubeconfig) does to the API server: token, client certificate or exec plugin.
///
/// The serving certificate is not verified: it is issued by the operator's own CA, which the
/// user has no copy of, and the connection runs through the API server's authenticated
/// port-forward to the pod the Service selects, so there is no one in between to impersonate it.
pub fn operator_client(mut config: kube::Config, url: &str) -> anyhow::Result<kube::Client> {
    config.cluster_url = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
    config.accept_invalid_certs = true;
    config.root_cert = None;
    config.tls_server_name = None;
    config.proxy_url = None;
    kube::Client::try_from(config).context("cannot build a client for the operator")
}

/// Serves the dashboard on `listener`, forwarding each GET to the operator with the user's
/// credentials. Like `kubectl proxy`, it listens on loopback only.
pub async fn serve(listener: TcpListener, client: kube::Client) -> anyhow::Result<()> {
    let app = axum::Router::new().fallback(forward).with_state(client);
    axum::serve(listener, app).await.context("the local dashboard server failed")
}

async fn forward(State(client): State<kube::Client>, req: Request) -> Response {
    if req.method() != http::Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, "the dashboard is read-only").into_response();
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    let upstream = match http::Request::get(&path).body(Vec::new()) {
        Ok(r) => r.map(kube::client::Body::from),
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let resp = match client.send(upstream).await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("cannot reach the operator's dashboard: {e}")).into_response(),
    };
    let (parts, body) = resp.into_parts();
    match body.collect().await {
        Ok(b) => {
            let mut out = Response::new(AxumBody::from(b.to_bytes()));
            *out.status_mut() = parts.status;
            for name in [http::header::CONTENT_TYPE, http::header::CONTENT_SECURITY_POLICY, http::header::WWW_AUTHENTICATE] {
                if let Some(v) = parts.headers.get(&name) {
                    out.headers_mut().insert(name, v.clone());
                }
            }
            out
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("the operator's answer broke off: {e}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_port_kubectl_chose() {
        assert_eq!(forwarded_port("Forwarding from 127.0.0.1:41234 -> 8444"), Some(41234));
        assert_eq!(forwarded_port("Forwarding from [::1]:41234 -> 8444"), None);
        assert_eq!(forwarded_port("Handling connection for 41234"), None);
    }
}
