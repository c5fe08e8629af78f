//! Reaching the operator's HTTPS endpoint: a `kubectl port-forward` through the API server (or
//! a URL given), and a client that authenticates with the user's own kubeconfig credentials.

use std::process::Stdio;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// Where the operator's dashboard endpoint is, for the subcommands that talk to it.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Namespace the operator runs in.
    #[arg(long, default_value = "kommune-system")]
    pub operator_namespace: String,
    /// The operator's dashboard Service (the chart's `<fullname>-dashboard`).
    #[arg(long, default_value = "kommune-dashboard")]
    pub operator_service: String,
    /// The Service's dashboard port.
    #[arg(long, default_value_t = 8444)]
    pub operator_port: u16,
    /// Reach the operator at this https URL instead of port-forwarding (an operator run
    /// outside the cluster, or an Ingress).
    #[arg(long)]
    pub operator_url: Option<String>,
}

/// A client for the operator, signed with the user's credentials from `config`, and the
/// port-forward it runs through (killed when dropped).
pub struct Operator {
    pub client: kube::Client,
    _forward: Option<tokio::process::Child>,
}

impl OperatorArgs {
    /// Connects as the user of `config`: port-forwards to the Service unless a URL is given.
    pub async fn connect(&self, config: kube::Config) -> anyhow::Result<Operator> {
        let (url, forward) = match &self.operator_url {
            Some(u) => (u.clone(), None),
            None => {
                let (port, child) = port_forward(&self.operator_namespace, &self.operator_service, self.operator_port).await?;
                (format!("https://127.0.0.1:{port}"), Some(child))
            }
        };
        Ok(Operator { client: operator_client(config, &url)?, _forward: forward })
    }
}

/// Runs `kubectl port-forward` to `service` and returns the local port it chose; the child is
/// killed when dropped. kubectl uses the same kubeconfig, so the API server checks the user's
/// right to port-forward too.
pub async fn port_forward(namespace: &str, service: &str, remote_port: u16) -> anyhow::Result<(u16, tokio::process::Child)> {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let mut child = tokio::process::Command::new(&kubectl)
        .args(["port-forward", "-n", namespace, &format!("svc/{service}"), &format!(":{remote_port}"), "--address", "127.0.0.1"])
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
        "kubectl port-forward to svc/{service} in {namespace} ended before forwarding (does the Service exist, with the dashboard on port {remote_port}?)"
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
    // kube retries 503s for up to 15 rounds of backoff, meant for controllers; the operator's
    // 503 ("outputs are not enabled") is an answer a user should see at once.
    config.default_retry = false;
    kube::Client::try_from(config).context("cannot build a client for the operator")
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
