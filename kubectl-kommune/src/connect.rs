//! Reaching the operator's HTTPS endpoint: a port-forward through the API server (or a URL
//! given), its certificate verified against the operator CA, and a client that
//! authenticates with the user's own kubeconfig credentials.

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kommune_operator::controller::ca::{CA_CONFIGMAP, CA_CONFIGMAP_KEY};

use crate::forward::Forward;

/// Where the operator's dashboard endpoint is, for the subcommands that talk to it.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Namespace the operator runs in (its CA is read from there too).
    #[arg(long, default_value = "kommune-system")]
    pub operator_namespace: String,
    /// The operator's dashboard Service (the chart's `<fullname>-dashboard`).
    #[arg(long, default_value = "kommune-dashboard")]
    pub operator_service: String,
    /// The Service's dashboard port.
    #[arg(long, default_value_t = 8444)]
    pub operator_port: u16,
    /// Reach the operator at this https URL instead of port-forwarding (an operator run
    /// outside the cluster, or an Ingress); its certificate must be valid for the URL's host.
    #[arg(long)]
    pub operator_url: Option<String>,
    #[command(flatten)]
    pub trust: TrustArgs,
}

/// How the operator's serving certificate is verified.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TrustArgs {
    /// PEM file of the CA(s) that sign the operator's certificate. Default: the operator CA
    /// published in the ConfigMap `kommune-ca.crt` of the operator's namespace (read with
    /// your credentials; the chart lets every authenticated user get it).
    #[arg(long, value_name = "FILE")]
    pub operator_ca: Option<std::path::PathBuf>,
    /// Do not verify the operator's certificate (only the connection to the operator; the API
    /// server's stays as your kubeconfig says). Whoever can intercept the connection then
    /// reads your credentials: for debugging only.
    #[arg(long, conflicts_with_all = ["operator_ca", "tls_server_name"])]
    pub insecure_skip_tls_verify: bool,
    /// The name the operator's certificate must carry, when it is not the host you reach it
    /// by: an `--operator-url` of an Ingress or a tunnel in front of the dashboard Service
    /// (e.g. kommune-dashboard.kommune-system.svc, which the chart's certificate names).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

/// What the operator's certificate is checked against.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Signed by one of these CAs (DER) for `server_name`, or for the URL's host when None.
    Roots { ders: Vec<Vec<u8>>, server_name: Option<String> },
    /// Not checked (`--insecure-skip-tls-verify`).
    Insecure,
}

/// A client for the operator, signed with the user's credentials from `config`, and the
/// port-forward it runs through (stopped when dropped).
pub struct Operator {
    pub client: kube::Client,
    _forward: Option<Forward>,
}

/// Where to reach the operator: a Service to port-forward to, or a URL.
pub struct Target<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub port: u16,
    pub url: Option<&'a str>,
}

impl OperatorArgs {
    /// Connects as the user of `config`: port-forwards to the Service unless a URL is given.
    pub async fn connect(&self, config: kube::Config) -> anyhow::Result<Operator> {
        let target =
            Target { namespace: &self.operator_namespace, service: &self.operator_service, port: self.operator_port, url: self.operator_url.as_deref() };
        connect(config, &target, &self.trust).await
    }
}

/// Connects to the operator at `target` as the user of `config`, verifying its certificate as
/// `trust` says.
pub async fn connect(config: kube::Config, target: &Target<'_>, trust: &TrustArgs) -> anyhow::Result<Operator> {
    let mut trust = trust.resolve(&config, target.namespace).await?;
    let (url, forward) = match target.url {
        Some(u) => (u.to_string(), None),
        None => {
            // Through the port-forward the connection ends at 127.0.0.1, so the certificate is
            // checked for the Service's name, which the chart puts in it (unless told another).
            if let Trust::Roots { server_name, .. } = &mut trust {
                server_name.get_or_insert_with(|| service_server_name(target.service, target.namespace));
            }
            // The API server checks the user's right to port-forward: the same credentials.
            let api = kube::Client::try_from(config.clone()).context("cannot build a client for the API server")?;
            let forward = crate::forward::forward(api, target.namespace, target.service, target.port).await?;
            (format!("https://127.0.0.1:{}", forward.local_port), Some(forward))
        }
    };
    Ok(Operator { client: operator_client(config, &url, &trust)?, _forward: forward })
}

/// The name the operator's certificate carries for its dashboard Service.
pub fn service_server_name(service: &str, namespace: &str) -> String {
    format!("{service}.{namespace}.svc")
}

impl TrustArgs {
    /// The CAs to trust: `--operator-ca`, else the ConfigMap the operator publishes in
    /// `operator_namespace`, read as the user of `config`.
    pub async fn resolve(&self, config: &kube::Config, operator_namespace: &str) -> anyhow::Result<Trust> {
        if self.insecure_skip_tls_verify {
            eprintln!("warning: --insecure-skip-tls-verify: the operator's certificate is not checked; anyone between you and it can read your credentials");
            return Ok(Trust::Insecure);
        }
        let pem = match &self.operator_ca {
            Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read --operator-ca {}", path.display()))?,
            None => published_ca(config, operator_namespace).await?,
        };
        let ders = roots_from_pem(&pem).with_context(|| match &self.operator_ca {
            Some(path) => format!("--operator-ca {}", path.display()),
            None => format!("ConfigMap {operator_namespace}/{CA_CONFIGMAP}"),
        })?;
        Ok(Trust::Roots { ders, server_name: self.tls_server_name.clone() })
    }
}

/// The operator CA's certificate from the ConfigMap it publishes, read with the user's own
/// credentials (so a kubeconfig the user trusts for the API server vouches for it).
async fn published_ca(config: &kube::Config, namespace: &str) -> anyhow::Result<String> {
    let client = kube::Client::try_from(config.clone()).context("cannot build a client for the API server")?;
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, namespace);
    let hint = "or pass --operator-ca FILE (the operator CA's certificate, PEM)";
    let cm = match api.get(CA_CONFIGMAP).await {
        Ok(cm) => cm,
        Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
            "the operator publishes no CA in ConfigMap {namespace}/{CA_CONFIGMAP}: is it running with a dashboard in {namespace} (--operator-namespace)? {hint}"
        ),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            anyhow::bail!("you may not read ConfigMap {namespace}/{CA_CONFIGMAP}, the operator's CA (the chart grants it to dashboard.caReaders): {hint}")
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot read ConfigMap {namespace}/{CA_CONFIGMAP}, the operator's CA"))),
    };
    cm.data.and_then(|mut d| d.remove(CA_CONFIGMAP_KEY)).with_context(|| format!("ConfigMap {namespace}/{CA_CONFIGMAP} has no {CA_CONFIGMAP_KEY}"))
}

/// The DER certificates of a PEM bundle; an error when it holds none.
pub fn roots_from_pem(pem: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let ders = CertificateDer::pem_slice_iter(pem.as_bytes()).map(|c| c.map(|c| c.to_vec())).collect::<Result<Vec<_>, _>>().context("not valid PEM")?;
    anyhow::ensure!(!ders.is_empty(), "no CERTIFICATE in it");
    Ok(ders)
}

/// A client for the operator's dashboard at `url` that authenticates exactly as `config`
/// (the user's kubeconfig) does to the API server: token, client certificate or exec plugin.
/// The operator's certificate is checked as `trust` says, never against the kubeconfig's CA:
/// the credentials must reach only the operator.
pub fn operator_client(mut config: kube::Config, url: &str, trust: &Trust) -> anyhow::Result<kube::Client> {
    config.cluster_url = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
    match trust {
        Trust::Roots { ders, server_name } => {
            config.accept_invalid_certs = false;
            config.root_cert = Some(ders.clone());
            config.tls_server_name = server_name.clone();
        }
        Trust::Insecure => {
            config.accept_invalid_certs = true;
            config.root_cert = None;
            config.tls_server_name = None;
        }
    }
    config.proxy_url = None;
    // kube retries 503s for up to 15 rounds of backoff, meant for controllers; the operator's
    // 503 ("outputs are not enabled") is an answer a user should see at once.
    config.default_retry = false;
    kube::Client::try_from(config).context("cannot build a client for the operator")
}

/// A failed request to the operator as a user can act on it: a certificate that does not
/// verify says so, with what to do; anything else is the whole chain of causes.
pub fn describe_transport_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    let chain = parts.join(": ");
    if chain.contains("invalid peer certificate") {
        format!(
            "the operator's certificate is not trusted ({chain}): it must be signed by the operator CA (ConfigMap {CA_CONFIGMAP} of the operator's namespace, or --operator-ca) for the name you reach it by"
        )
    } else {
        chain
    }
}
