//! Who is asking and what they may see: bearer tokens are checked with a TokenReview, client
//! certificates against the cluster's client CA, and every decision with a SubjectAccessReview.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

use super::overview::Access;

/// An authenticated caller, as the API server would name them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
}

/// What a request carried to prove who sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    None,
    Bearer(String),
    /// A client certificate that chained to the cluster's client CA (checked in the handshake).
    Certificate(UserInfo),
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the API server refused or failed a review: {0}")]
    Review(#[from] kube::Error),
}

/// Why a request is refused, as its HTTP status says.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no credential, or one the API server does not accept.
    Unauthenticated,
    /// 403: authenticated, but may list neither ComputeJobs nor ProviderNodes anywhere.
    Forbidden(String),
}

/// The two questions the dashboard asks the API server; a trait so the decision logic is tested
/// without one.
pub trait Authority: Send + Sync {
    /// The user a bearer token belongs to, or None when the API server does not accept it.
    fn review_token(&self, token: String) -> BoxFuture<'_, Result<Option<UserInfo>, AuthError>>;
    /// Whether `user` may `verb` `resource` (group kommune.dev) in `namespace` ("" = all).
    fn allowed(&self, user: UserInfo, verb: &'static str, resource: &'static str, namespace: String) -> BoxFuture<'_, Result<bool, AuthError>>;
    /// Whether `user` may `verb` the one object `name` of `resource` in `namespace`. The default
    /// asks about the whole namespace instead, which is stricter (RBAC rules limited to
    /// `resourceNames` do not match it), so an Authority that only answers namespace questions
    /// never grants more than it should.
    fn allowed_object(
        &self,
        user: UserInfo,
        verb: &'static str,
        resource: &'static str,
        namespace: String,
        name: String,
    ) -> BoxFuture<'_, Result<bool, AuthError>> {
        let _ = name;
        self.allowed(user, verb, resource, namespace)
    }
}

/// [`Authority`] backed by TokenReview and SubjectAccessReview (needs `create` on both).
pub struct KubeAuthority {
    client: kube::Client,
}

impl KubeAuthority {
    pub fn new(client: kube::Client) -> Self {
        KubeAuthority { client }
    }
}

impl Authority for KubeAuthority {
    fn review_token(&self, token: String) -> BoxFuture<'_, Result<Option<UserInfo>, AuthError>> {
        Box::pin(async move {
            let review = TokenReview { spec: TokenReviewSpec { token: Some(token), audiences: None }, ..TokenReview::default() };
            let out = Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
            let status = out.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                return Ok(None);
            }
            let user = status.user.unwrap_or_default();
            Ok(Some(UserInfo { username: user.username.unwrap_or_default(), uid: user.uid.unwrap_or_default(), groups: user.groups.unwrap_or_default() }))
        })
    }

    fn allowed(&self, user: UserInfo, verb: &'static str, resource: &'static str, namespace: String) -> BoxFuture<'_, Result<bool, AuthError>> {
        self.allowed_object(user, verb, resource, namespace, String::new())
    }

    fn allowed_object(
        &self,
        user: UserInfo,
        verb: &'static str,
        resource: &'static str,
        namespace: String,
        name: String,
    ) -> BoxFuture<'_, Result<bool, AuthError>> {
        Box::pin(async move {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.username),
                    uid: (!user.uid.is_empty()).then_some(user.uid),
                    groups: Some(user.groups),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some("kommune.dev".into()),
                        resource: Some(resource.into()),
                        verb: Some(verb.into()),
                        namespace: (!namespace.is_empty()).then_some(namespace),
                        name: (!name.is_empty()).then_some(name),
                        ..ResourceAttributes::default()
                    }),
                    ..SubjectAccessReviewSpec::default()
                },
                ..SubjectAccessReview::default()
            };
            let out = Api::<SubjectAccessReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
            Ok(out.status.is_some_and(|s| s.allowed))
        })
    }
}

/// How long a review's answer is reused: a revoked RoleBinding or token takes effect within it,
/// and a page polling every few seconds costs the API server nothing after the first request.
pub const DECISION_TTL: Duration = Duration::from_secs(10);
/// Cached decisions kept at most; past it the cache starts over (a flood of fresh tokens cannot
/// grow it without bound).
const CACHE_MAX: usize = 4096;
/// Namespaces asked about one by one for a caller without a cluster-wide grant.
pub const MAX_NAMESPACE_REVIEWS: usize = 64;

type Decision = (Instant, Option<UserInfo>);
/// (user, verb, resource, namespace, name) of a SubjectAccessReview.
type GrantKey = (UserInfo, &'static str, &'static str, String, String);

/// Authenticates and authorizes dashboard requests through an [`Authority`], caching answers
/// for [`DECISION_TTL`].
pub struct Gatekeeper {
    authority: Arc<dyn Authority>,
    tokens: Mutex<HashMap<[u8; 32], Decision>>,
    grants: Mutex<HashMap<GrantKey, (Instant, bool)>>,
    ttl: Duration,
}

impl Gatekeeper {
    pub fn new(authority: Arc<dyn Authority>) -> Self {
        Gatekeeper { authority, tokens: Mutex::default(), grants: Mutex::default(), ttl: DECISION_TTL }
    }

    /// The caller behind `credential`, or 401.
    pub async fn authenticate(&self, credential: Credential) -> Result<UserInfo, Refusal> {
        let token = match credential {
            Credential::None => return Err(Refusal::Unauthenticated),
            Credential::Certificate(user) => return Ok(user),
            Credential::Bearer(t) if t.is_empty() => return Err(Refusal::Unauthenticated),
            Credential::Bearer(t) => t,
        };
        // Keyed by the token's digest: the cache never holds a usable credential.
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((at, user)) = lock(&self.tokens).get(&key).cloned()
            && at.elapsed() < self.ttl
        {
            return user.ok_or(Refusal::Unauthenticated);
        }
        let user = match self.authority.review_token(token).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "TokenReview failed; refusing the request");
                return Err(Refusal::Unauthenticated);
            }
        };
        remember(&self.tokens, key, (Instant::now(), user.clone()));
        user.ok_or(Refusal::Unauthenticated)
    }

    /// What `user` may see of the pool: providers with `list providernodes`, all jobs with
    /// `list computejobs` cluster-wide, else the jobs of each of `namespaces` it may list there.
    /// 403 when that is nothing.
    pub async fn access(&self, user: &UserInfo, namespaces: &BTreeSet<String>) -> Result<Access, Refusal> {
        let mut access = Access { providers: self.allowed(user, "providernodes", "").await?, ..Access::default() };
        access.all_jobs = self.allowed(user, "computejobs", "").await?;
        if !access.all_jobs {
            for ns in namespaces.iter().take(MAX_NAMESPACE_REVIEWS) {
                if self.allowed(user, "computejobs", ns).await? {
                    access.job_namespaces.insert(ns.clone());
                }
            }
        }
        if access.is_none() {
            return Err(Refusal::Forbidden(format!(
                "{} may list neither providernodes nor computejobs (kommune.dev) in any namespace that has jobs",
                user.username
            )));
        }
        Ok(access)
    }

    /// Whether `user` may `get` the ComputeJob `namespace/name`: what listing and downloading
    /// its outputs and logs require. 403 naming the missing permission otherwise.
    pub async fn may_get_job(&self, user: &UserInfo, namespace: &str, name: &str) -> Result<(), Refusal> {
        if self.decide(user, "get", "computejobs", namespace, name).await? {
            return Ok(());
        }
        Err(Refusal::Forbidden(format!(
            "{} may not get computejobs.kommune.dev {name:?} in namespace {namespace:?}, which reading its outputs and logs requires",
            user.username
        )))
    }

    async fn allowed(&self, user: &UserInfo, resource: &'static str, ns: &str) -> Result<bool, Refusal> {
        self.decide(user, "list", resource, ns, "").await
    }

    async fn decide(&self, user: &UserInfo, verb: &'static str, resource: &'static str, ns: &str, name: &str) -> Result<bool, Refusal> {
        let key = (user.clone(), verb, resource, ns.to_string(), name.to_string());
        if let Some(&(at, ok)) = lock(&self.grants).get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(ok);
        }
        match self.authority.allowed_object(user.clone(), verb, resource, ns.to_string(), name.to_string()).await {
            Ok(ok) => {
                remember(&self.grants, key, (Instant::now(), ok));
                Ok(ok)
            }
            // Not cached: the next request asks again. Refused meanwhile, never let through.
            Err(e) => {
                tracing::warn!(error = %e, user = %user.username, "SubjectAccessReview failed; refusing the request");
                Err(Refusal::Forbidden("the API server could not be asked whether you may see this; try again".into()))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn remember<K: std::hash::Hash + Eq, V>(m: &Mutex<HashMap<K, V>>, k: K, v: V) {
    let mut map = lock(m);
    if map.len() >= CACHE_MAX {
        map.clear();
    }
    map.insert(k, v);
}

/// The credential of a request: its `Authorization: Bearer` header, else the identity of the
/// connection's verified client certificate.
pub fn credential(authorization: Option<&str>, certificate: Option<&UserInfo>) -> Credential {
    if let Some(h) = authorization {
        let mut parts = h.splitn(2, ' ');
        if let (Some(scheme), Some(token)) = (parts.next(), parts.next())
            && scheme.eq_ignore_ascii_case("bearer")
        {
            return Credential::Bearer(token.trim().to_string());
        }
    }
    match certificate {
        Some(u) => Credential::Certificate(u.clone()),
        None => Credential::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Knows one token ("good", user alice) and grants per (user, resource, namespace).
    #[derive(Default)]
    struct FakeAuthority {
        grants: Vec<(&'static str, &'static str, &'static str)>,
        token_reviews: AtomicUsize,
        access_reviews: AtomicUsize,
        failing: bool,
    }

    impl Authority for FakeAuthority {
        fn review_token(&self, token: String) -> BoxFuture<'_, Result<Option<UserInfo>, AuthError>> {
            self.token_reviews.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move { Ok((token == "good").then(alice)) })
        }
        fn allowed(&self, user: UserInfo, _verb: &'static str, resource: &'static str, ns: String) -> BoxFuture<'_, Result<bool, AuthError>> {
            self.access_reviews.fetch_add(1, Ordering::Relaxed);
            let failing = self.failing;
            let ok = self.grants.iter().any(|&(u, r, n)| u == user.username && r == resource && n == ns);
            Box::pin(async move {
                if failing {
                    return Err(AuthError::Review(kube::Error::LinesCodecMaxLineLengthExceeded));
                }
                Ok(ok)
            })
        }
    }

    fn alice() -> UserInfo {
        UserInfo { username: "alice".into(), groups: vec!["system:authenticated".into()], ..UserInfo::default() }
    }

    fn gate(fake: FakeAuthority) -> (Arc<FakeAuthority>, Gatekeeper) {
        let fake = Arc::new(fake);
        (fake.clone(), Gatekeeper::new(fake))
    }

    fn namespaces(ns: &[&str]) -> BTreeSet<String> {
        ns.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn no_credential_or_an_unknown_token_is_unauthenticated() {
        let (_, g) = gate(FakeAuthority::default());
        assert_eq!(g.authenticate(Credential::None).await, Err(Refusal::Unauthenticated));
        assert_eq!(g.authenticate(Credential::Bearer(String::new())).await, Err(Refusal::Unauthenticated));
        assert_eq!(g.authenticate(Credential::Bearer("forged".into())).await, Err(Refusal::Unauthenticated));
        assert_eq!(g.authenticate(Credential::Bearer("good".into())).await, Ok(alice()));
    }

    #[tokio::test]
    async fn a_certificate_identity_needs_no_token_review() {
        let (fake, g) = gate(FakeAuthority::default());
        let bob = UserInfo { username: "bob".into(), ..UserInfo::default() };
        assert_eq!(g.authenticate(Credential::Certificate(bob.clone())).await, Ok(bob));
        assert_eq!(fake.token_reviews.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn token_and_access_decisions_are_cached() {
        let (fake, g) = gate(FakeAuthority { grants: vec![("alice", "computejobs", "")], ..FakeAuthority::default() });
        for _ in 0..3 {
            let user = g.authenticate(Credential::Bearer("good".into())).await.unwrap();
            g.access(&user, &namespaces(&["a"])).await.unwrap();
            assert_eq!(g.authenticate(Credential::Bearer("forged".into())).await, Err(Refusal::Unauthenticated));
        }
        assert_eq!(fake.token_reviews.load(Ordering::Relaxed), 2, "one review per token");
        assert_eq!(fake.access_reviews.load(Ordering::Relaxed), 2, "providernodes and computejobs once each");
    }

    #[tokio::test]
    async fn a_user_without_list_anywhere_is_forbidden() {
        let (_, g) = gate(FakeAuthority::default());
        assert!(matches!(g.access(&alice(), &namespaces(&["a", "b"])).await, Err(Refusal::Forbidden(_))));
    }

    #[tokio::test]
    async fn a_namespace_grant_shows_that_namespace_only() {
        let (_, g) = gate(FakeAuthority { grants: vec![("alice", "computejobs", "b")], ..FakeAuthority::default() });
        let access = g.access(&alice(), &namespaces(&["a", "b"])).await.unwrap();
        assert_eq!(access, Access { job_namespaces: namespaces(&["b"]), ..Access::default() });
    }

    #[tokio::test]
    async fn a_failing_review_refuses_and_is_not_cached() {
        let (fake, g) = gate(FakeAuthority { failing: true, ..FakeAuthority::default() });
        assert!(matches!(g.access(&alice(), &namespaces(&[])).await, Err(Refusal::Forbidden(_))));
        assert!(matches!(g.access(&alice(), &namespaces(&[])).await, Err(Refusal::Forbidden(_))));
        assert_eq!(fake.access_reviews.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn getting_a_job_is_its_own_decision_per_name() {
        let (fake, g) = gate(FakeAuthority { grants: vec![("alice", "computejobs", "b")], ..FakeAuthority::default() });
        g.access(&alice(), &namespaces(&["b"])).await.unwrap();
        let reviews = fake.access_reviews.load(Ordering::Relaxed);
        // A cached `list` answer never stands in for a `get` of one name, nor one name for another.
        assert_eq!(g.may_get_job(&alice(), "b", "render").await, Ok(()));
        assert_eq!(g.may_get_job(&alice(), "b", "crunch").await, Ok(()));
        assert_eq!(fake.access_reviews.load(Ordering::Relaxed), reviews + 2);
        let Err(Refusal::Forbidden(why)) = g.may_get_job(&alice(), "a", "render").await else { panic!("a grant in b reached a") };
        assert!(why.contains("may not get computejobs.kommune.dev \"render\" in namespace \"a\""), "{why}");
    }

    #[test]
    fn the_bearer_header_wins_over_the_certificate() {
        let bob = UserInfo { username: "bob".into(), ..UserInfo::default() };
        assert_eq!(credential(Some("Bearer abc"), Some(&bob)), Credential::Bearer("abc".into()));
        assert_eq!(credential(Some("Basic abc"), Some(&bob)), Credential::Certificate(bob));
        assert_eq!(credential(None, None), Credential::None);
    }
}
