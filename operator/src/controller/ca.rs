//! The operator CA lives in the Secret `kommune-ca` (type kubernetes.io/tls) in the operator's
//! namespace, so every replica and `token create` share it and it survives restarts. Its
//! certificate (never the key) is published in the ConfigMap `kommune-ca.crt` beside it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use super::{Error, MANAGER};
use crate::pki::Ca;

pub const CA_SECRET: &str = "kommune-ca";
/// The ConfigMap holding the CA certificate for users, named and shaped like the API server's
/// `kube-root-ca.crt`: `kubectl kommune` reads it (with the user's own credentials; the chart
/// lets every authenticated user `get` this one name) to verify the dashboard's certificate.
pub const CA_CONFIGMAP: &str = "kommune-ca.crt";
/// Its one key: the CA certificate, PEM.
pub const CA_CONFIGMAP_KEY: &str = "ca.crt";

/// Loads the CA from its Secret, creating both on first use. Safe to race: the loser of a
/// create conflict reads the winner's CA.
pub async fn ensure_ca(client: kube::Client, namespace: &str) -> Result<Ca, Error> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    for _ in 0..3 {
        if let Some(secret) = api.get_opt(CA_SECRET).await? {
            return from_secret(&secret, namespace);
        }
        let ca = Ca::generate()?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.into()),
                labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".into(), "kommune".into())])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("tls.crt".to_string(), ByteString(ca.cert_pem().as_bytes().to_vec())),
                ("tls.key".to_string(), ByteString(ca.key_pem().as_bytes().to_vec())),
            ])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(ca),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::CaSecret(format!("{namespace}/{CA_SECRET} (kept changing while being created)")))
}

/// Publishes the CA certificate in [`CA_CONFIGMAP`] (server-side apply, so every replica
/// writes the same object and a certificate edited by hand is put back).
pub async fn publish_ca(client: kube::Client, namespace: &str, ca: &Ca) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CA_CONFIGMAP.into()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/part-of".into(), "kommune".into())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(CA_CONFIGMAP_KEY.to_string(), ca.cert_pem().to_string())])),
        ..Default::default()
    };
    // k8s-openapi writes apiVersion and kind itself, as apply needs.
    api.patch(CA_CONFIGMAP, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&cm)).await?;
    Ok(())
}

fn from_secret(secret: &Secret, namespace: &str) -> Result<Ca, Error> {
    let get = |k: &str| secret.data.as_ref().and_then(|d| d.get(k)).and_then(|v| String::from_utf8(v.0.clone()).ok());
    match (get("tls.crt"), get("tls.key")) {
        (Some(cert), Some(key)) => Ok(Ca::from_pem(&cert, &key)?),
        _ => Err(Error::CaSecret(format!("{namespace}/{CA_SECRET}"))),
    }
}
