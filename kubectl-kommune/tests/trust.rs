//! The plugin verifies the operator's certificate over real TLS on loopback: only the operator
//! CA it was given, only for the name it reaches the operator by, and the CA is found where the
//! operator publishes it (a ConfigMap read through a stand-in API server).

use std::sync::Arc;

use axum::serve::Listener as _;
use futures::future::BoxFuture;
use kommune_operator::pki::Ca;
use kommune_operator::web::auth::{AuthError, Authority, Gatekeeper, UserInfo};
use kommune_operator::web::{self, Source, tls};
use kubectl_kommune::api::{self, ApiError};
use kubectl_kommune::connect::{Trust, TrustArgs, operator_client, roots_from_pem, service_server_name};

const SERVICE: &str = "kommune-dashboard";
const NS: &str = "kommune-system";

/// Nobody is anybody: every request that gets through TLS is answered 401.
struct NoUsers;

impl Authority for NoUsers {
    fn review_token(&self, _: String) -> BoxFuture<'_, Result<Option<UserInfo>, AuthError>> {
        Box::pin(async { Ok(None) })
    }
    fn allowed(&self, _: UserInfo, _: &'static str, _: &'static str, _: String) -> BoxFuture<'_, Result<bool, AuthError>> {
        Box::pin(async { Ok(false) })
    }
    fn allowed_object(&self, _: UserInfo, _: &'static str, _: &'static str, _: String, _: String) -> BoxFuture<'_, Result<bool, AuthError>> {
        Box::pin(async { Ok(false) })
    }
}

struct NoFacts;

impl Source for NoFacts {
    fn facts(&self) -> BoxFuture<'_, Result<web::Facts, String>> {
        Box::pin(async { Ok((vec![], vec![])) })
    }
}

/// The operator's dashboard serving `chain`/`key`; returns its port on 127.0.0.1.
async fn serve(chain: &str, key: &str) -> u16 {
    let listener = tls::TlsListener::bind("127.0.0.1:0".parse().unwrap(), tls::server_config(chain, key, None).unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().addr.port();
    tokio::spawn(web::serve(listener, web::router(Arc::new(Gatekeeper::new(Arc::new(NoUsers))), Arc::new(NoFacts))));
    port
}

/// The dashboard's certificate as the chart's operator issues it (the Service's name added).
async fn operator_dashboard(ca: &Ca) -> u16 {
    let (chain, key) = ca.issue_server(&["localhost".into(), "kommune-operator".into(), service_server_name(SERVICE, NS)]).unwrap();
    serve(&chain, &key).await
}

fn roots(ca: &Ca, server_name: Option<&str>) -> Trust {
    Trust::Roots { ders: roots_from_pem(ca.cert_pem()).unwrap(), server_name: server_name.map(str::to_string) }
}

fn anonymous() -> kube::Config {
    kube::Config::new("https://127.0.0.1:1".parse().unwrap())
}

/// Lists a job's outputs: Ok(401) once TLS succeeded (nobody is authorized), or the error text.
async fn reach(url: &str, trust: &Trust) -> Result<u16, String> {
    let client = operator_client(anonymous(), url, trust).unwrap();
    match api::list_outputs(&client, "team-a", "render").await {
        Err(ApiError::Refused { status, .. }) => Ok(status.as_u16()),
        Err(ApiError::Transport(e)) => Err(e),
        other => panic!("unexpected: {:?}", other.map(|_| ())),
    }
}

fn assert_untrusted(result: Result<u16, String>, what: &str) {
    let e = result.expect_err(what);
    assert!(e.contains("the operator's certificate is not trusted") && e.contains("--operator-ca"), "{what}: not a clear refusal: {e}");
    println!("{what}: {e}");
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused_and_the_operator_ca_is_accepted() {
    let ours = Ca::generate().unwrap();
    let port = operator_dashboard(&ours).await;
    // An impostor with a certificate for the same names from a CA of its own.
    let theirs = Ca::generate().unwrap();
    let impostor = operator_dashboard(&theirs).await;

    assert_eq!(reach(&format!("https://localhost:{port}"), &roots(&ours, None)).await, Ok(401));
    assert_untrusted(reach(&format!("https://localhost:{impostor}"), &roots(&ours, None)).await, "another CA's certificate");
    // The operator CA does not vouch for the impostor's CA either way round.
    assert_untrusted(reach(&format!("https://localhost:{port}"), &roots(&theirs, None)).await, "trusting only another CA");
    // Opting out connects to anyone.
    assert_eq!(reach(&format!("https://localhost:{impostor}"), &Trust::Insecure).await, Ok(401));
}

#[tokio::test]
async fn through_a_port_forward_the_certificate_must_name_the_service() {
    let ca = Ca::generate().unwrap();
    let port = operator_dashboard(&ca).await;
    let forwarded = format!("https://127.0.0.1:{port}");
    assert_eq!(reach(&forwarded, &roots(&ca, Some(&service_server_name(SERVICE, NS)))).await, Ok(401));
    assert_untrusted(reach(&forwarded, &roots(&ca, Some(&service_server_name("other-dashboard", NS)))).await, "another Service's name");
    // The address itself is not in the certificate: verifying the URL's host fails.
    assert_untrusted(reach(&forwarded, &roots(&ca, None)).await, "the bare loopback address");
}

#[tokio::test]
async fn a_providers_node_certificate_cannot_pass_for_the_dashboard() {
    // A provider holds a certificate of the operator CA for its node name; naming its node like
    // the dashboard's Service does not make it a server certificate (client-auth only).
    let ca = Ca::generate().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let csr = rcgen::CertificateParams::new(vec![]).unwrap().serialize_request(&key).unwrap();
    let name = service_server_name(SERVICE, NS);
    let (cert, _) = ca.sign_node(csr.der(), &name).unwrap();
    let port = serve(&format!("{cert}{}", ca.cert_pem()), &key.serialize_pem()).await;
    assert_untrusted(reach(&format!("https://127.0.0.1:{port}"), &roots(&ca, Some(&name))).await, "a node's client certificate");
}

/// A stand-in API server that answers GET for the ConfigMap `NS/kommune-ca.crt` with `answer`.
async fn api_server(answer: (u16, serde_json::Value)) -> kube::Config {
    let app = axum::Router::new().route(
        &format!("/api/v1/namespaces/{NS}/configmaps/kommune-ca.crt"),
        axum::routing::get(move || {
            let (status, body) = answer.clone();
            async move { (http::StatusCode::from_u16(status).unwrap(), [(http::header::CONTENT_TYPE, "application/json")], body.to_string()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    kube::Config::new(format!("http://{addr}").parse().unwrap())
}

fn status(code: u16, reason: &str) -> serde_json::Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "refused", "reason": reason, "code": code})
}

#[tokio::test]
async fn by_default_the_ca_is_the_one_the_operator_publishes() {
    let ca = Ca::generate().unwrap();
    let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kommune-ca.crt", "namespace": NS}, "data": {"ca.crt": ca.cert_pem()}});
    let config = api_server((200, cm)).await;
    let trust = TrustArgs::default().resolve(&config, NS).await.unwrap();
    let Trust::Roots { ders, .. } = &trust else { panic!("not verified: {trust:?}") };
    assert_eq!(ders, &roots_from_pem(ca.cert_pem()).unwrap());
    // And it verifies that operator's dashboard.
    let port = operator_dashboard(&ca).await;
    assert_eq!(reach(&format!("https://localhost:{port}"), &trust).await, Ok(401));

    let missing = TrustArgs::default().resolve(&api_server((404, status(404, "NotFound"))).await, NS).await.unwrap_err().to_string();
    assert!(missing.contains("publishes no CA in ConfigMap kommune-system/kommune-ca.crt") && missing.contains("--operator-ca"), "{missing}");
    let forbidden = TrustArgs::default().resolve(&api_server((403, status(403, "Forbidden"))).await, NS).await.unwrap_err().to_string();
    assert!(forbidden.contains("you may not read ConfigMap kommune-system/kommune-ca.crt") && forbidden.contains("--operator-ca"), "{forbidden}");
}

#[tokio::test]
async fn operator_ca_reads_a_pem_file_and_refuses_one_without_a_certificate() {
    let ca = Ca::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("ca.crt");
    std::fs::write(&good, ca.cert_pem()).unwrap();
    // No API server is asked when a file is given.
    let args = TrustArgs { operator_ca: Some(good), ..TrustArgs::default() };
    let trust = args.resolve(&anonymous(), NS).await.unwrap();
    assert!(matches!(&trust, Trust::Roots { ders, server_name: None } if ders.len() == 1));

    let bad = dir.path().join("key.pem");
    std::fs::write(&bad, ca.key_pem()).unwrap();
    let err = TrustArgs { operator_ca: Some(bad), ..TrustArgs::default() }.resolve(&anonymous(), NS).await.unwrap_err();
    assert!(format!("{err:#}").contains("no CERTIFICATE"), "{err:#}");
}

/// Behind an Ingress or a tunnel the URL's host is not a name the operator's certificate
/// carries: `--tls-server-name` names the one to check for, and only that one is accepted.
#[tokio::test]
async fn tls_server_name_checks_the_certificate_for_another_name_than_the_urls_host() {
    let ca = Ca::generate().unwrap();
    let port = operator_dashboard(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ca.crt");
    std::fs::write(&pem, ca.cert_pem()).unwrap();
    // 127.0.0.1 is not in the certificate: refused, as before.
    let url = format!("https://127.0.0.1:{port}");
    let plain = TrustArgs { operator_ca: Some(pem.clone()), ..TrustArgs::default() }.resolve(&anonymous(), NS).await.unwrap();
    assert!(reach(&url, &plain).await.unwrap_err().contains("not trusted"));
    // Named: the Service's name is accepted, a name the certificate lacks is not.
    let named = |name: &str| TrustArgs { operator_ca: Some(pem.clone()), tls_server_name: Some(name.into()), ..TrustArgs::default() };
    let service = named(&service_server_name(SERVICE, NS)).resolve(&anonymous(), NS).await.unwrap();
    assert_eq!(reach(&url, &service).await, Ok(401));
    let other = named("dashboard.example.org").resolve(&anonymous(), NS).await.unwrap();
    assert!(reach(&url, &other).await.unwrap_err().contains("not trusted"));
}
