//! S3 URLs presigned per attempt from a job's credentials, so an agent can GET its inputs and
//! PUT its outputs without ever holding a key (sans-IO signing: nothing is sent from here).

use std::time::Duration;

use kommune_core::job::data::S3Object;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

/// Longest validity AWS accepts for a presigned URL.
const MAX_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why an URL cannot be presigned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresignError {
    #[error("the credentials of Secret {0} have not been read yet")]
    NoCredentials(String),
    #[error("endpoint {endpoint:?} of bucket {bucket:?}: {reason}")]
    Bucket { endpoint: String, bucket: String, reason: String },
}

fn bucket(o: &S3Object) -> Result<(Bucket, Credentials), PresignError> {
    let bad = |reason: String| PresignError::Bucket { endpoint: o.endpoint.clone(), bucket: o.bucket.clone(), reason };
    let creds = o.credentials.as_ref().ok_or_else(|| PresignError::NoCredentials(o.secret.clone()))?;
    let endpoint = url::Url::parse(&o.endpoint).map_err(|e| bad(e.to_string()))?;
    let style = if o.path_style { UrlStyle::Path } else { UrlStyle::VirtualHost };
    let bucket = Bucket::new(endpoint, style, o.bucket.clone(), o.region.clone()).map_err(|e| bad(e.to_string()))?;
    Ok((bucket, Credentials::new(creds.access_key_id.clone(), creds.secret_access_key.clone())))
}

/// A GET URL for `key` in `o`'s bucket, valid for `validity` (at most 7 days).
pub fn get(o: &S3Object, key: &str, validity: Duration) -> Result<String, PresignError> {
    let (bucket, creds) = bucket(o)?;
    Ok(bucket.get_object(Some(&creds), key).sign(validity.min(MAX_VALIDITY)).to_string())
}

/// A PUT URL for `key` in `o`'s bucket, valid for `validity` (at most 7 days).
pub fn put(o: &S3Object, key: &str, validity: Duration) -> Result<String, PresignError> {
    let (bucket, creds) = bucket(o)?;
    Ok(bucket.put_object(Some(&creds), key).sign(validity.min(MAX_VALIDITY)).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kommune_core::job::data::S3Credentials;

    fn object(credentials: bool) -> S3Object {
        S3Object {
            endpoint: "http://127.0.0.1:9000".into(),
            bucket: "shards".into(),
            key: "shard-{index}.csv".into(),
            region: "us-east-1".into(),
            path_style: true,
            secret: "s3".into(),
            credentials: credentials.then(|| S3Credentials { access_key_id: "AKIDEXAMPLE".into(), secret_access_key: "wJalrXUtnFEMI".into() }),
        }
    }

    #[test]
    fn a_presigned_url_names_the_object_and_the_key_id_but_never_the_secret_key() {
        let url = get(&object(true), "shard-3.csv", Duration::from_secs(600)).unwrap();
        assert!(url.starts_with("http://127.0.0.1:9000/shards/shard-3.csv?"), "{url}");
        assert!(url.contains("X-Amz-Credential=AKIDEXAMPLE") && url.contains("X-Amz-Expires=600"), "{url}");
        assert!(!url.contains("wJalrXUtnFEMI"), "{url}");
        let week = put(&object(true), "out/x", Duration::from_secs(30 * 24 * 3600)).unwrap();
        assert!(week.contains("X-Amz-Expires=604800"), "{week}");
        assert_eq!(get(&object(false), "k", Duration::from_secs(1)), Err(PresignError::NoCredentials("s3".into())));
        assert!(format!("{:?}", object(true).credentials).contains("redacted"));
    }
}
