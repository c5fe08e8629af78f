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
use tokio::net::TcpListener;

pub use crate::connect::operator_client;
use crate::connect::{Target, TrustArgs, describe_transport_error};

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
    #[command(flatten)]
    pub trust: TrustArgs,
}

pub async fn run(args: DashboardArgs) -> anyhow::Result<()> {
    let config = kube::Config::infer().await.context("cannot load your kubeconfig")?;
    let target = Target { namespace: &args.namespace, service: &args.service, port: args.remote_port, url: args.operator_url.as_deref() };
    let operator = crate::connect::connect(config, &target, &args.trust).await?;
    let client = operator.client.clone();
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
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("cannot reach the operator's dashboard: {}", describe_transport_error(&e))).into_response(),
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
