//! The tower layer that authenticates and authorises every gRPC call on a server: the bearer
//! token is verified ([`Verifier`]), the method's rule checked ([`allowed`]), and the caller's
//! [`Identity`] put in the request's extensions for the handler (tenant scoping, agent
//! identity). `grpc.health.v1` stays open (probes carry no token); reflection needs any valid
//! token. Without a verifier (`--auth off`) every call is the anonymous admin.
//!
//! Not yet in the runtime's server stack: service-to-service calls need credentials first
//! (issue 19).

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::{AccessRule, Identity, TokenError, Verifier, allowed};

struct Shared {
    verifier: Option<Arc<Verifier>>,
    rules: HashMap<String, &'static [AccessRule]>,
}

/// Authenticates and authorises calls; see the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

impl AuthLayer {
    /// A layer verifying with `verifier` (None: auth off) under each service's rules (by fully
    /// qualified service name).
    #[must_use]
    pub fn new(
        verifier: Option<Arc<Verifier>>,
        rules: impl IntoIterator<Item = (String, &'static [AccessRule])>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                verifier,
                rules: rules.into_iter().collect(),
            }),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Why a call is refused before it reaches its handler.
#[derive(Debug)]
enum Refusal {
    Unauthenticated(TokenError),
    PermissionDenied(String),
}

impl Shared {
    fn decide<B>(&self, request: &Request<B>) -> Result<Option<Arc<Identity>>, Refusal> {
        let path = request.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        if service == "grpc.health.v1.Health" {
            return Ok(None);
        }
        let Some(verifier) = &self.verifier else {
            return Ok(Some(Arc::new(Identity::anonymous_admin())));
        };
        let token = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or(Refusal::Unauthenticated(TokenError::Missing))?;
        let identity = verifier
            .verify(token.trim())
            .map_err(Refusal::Unauthenticated)?;
        if service.starts_with("grpc.reflection.") {
            return Ok(Some(identity));
        }
        let rules = self.rules.get(service).copied().unwrap_or(&[]);
        allowed(rules, method, &identity).map_err(Refusal::PermissionDenied)?;
        Ok(Some(identity))
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<ResBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        match self.shared.decide(&request) {
            Ok(identity) => {
                if let Some(identity) = identity {
                    request.extensions_mut().insert(identity);
                }
                Either::Left(self.inner.call(request))
            }
            Err(refusal) => {
                let status = match refusal {
                    Refusal::Unauthenticated(e) => tonic::Status::unauthenticated(e.to_string()),
                    Refusal::PermissionDenied(e) => tonic::Status::permission_denied(e),
                };
                Either::Right(ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use tower::ServiceExt as _;

    use super::*;
    use crate::auth::{Role, TokenClaims, VerifierConfig, issue_hs256};

    const SECRET: &[u8] = b"a development secret of enough length";
    const RULES: &[AccessRule] = &[("Get", &[Role::Service]), ("Warm", &[Role::Operator])];

    fn service(
        verifier: Option<Arc<Verifier>>,
    ) -> Auth<
        impl Service<Request<()>, Response = Response<String>, Error = Infallible, Future = impl Send>
        + Clone,
    > {
        let inner = tower::service_fn(|request: Request<()>| async move {
            let who = request
                .extensions()
                .get::<Arc<Identity>>()
                .map_or("-".to_owned(), |i| i.subject.clone());
            Ok::<_, Infallible>(Response::new(who))
        });
        AuthLayer::new(
            verifier,
            [("agentmesh.cache.v1.CacheCoordinator".to_owned(), RULES)],
        )
        .layer(inner)
    }

    fn verifier() -> Arc<Verifier> {
        Arc::new(
            Verifier::new(VerifierConfig {
                hs256_secret: Some(SECRET.to_vec()),
                ..VerifierConfig::default()
            })
            .unwrap(),
        )
    }

    fn call(path: &str, token: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().uri(format!("http://x{path}"));
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder.body(()).unwrap()
    }

    fn grpc_status(response: &Response<String>) -> Option<String> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn test_calls_need_a_valid_token_and_a_role_the_method_allows() {
        let svc = service(Some(verifier()));
        let token = issue_hs256(
            SECRET,
            &TokenClaims::new("svc-a", &[Role::Service], Duration::from_secs(60)),
        )
        .unwrap();
        let get = "/agentmesh.cache.v1.CacheCoordinator/Get";
        let ok = svc.clone().oneshot(call(get, Some(&token))).await.unwrap();
        assert_eq!(ok.body(), "svc-a", "the handler sees the identity");
        let none = svc.clone().oneshot(call(get, None)).await.unwrap();
        assert_eq!(grpc_status(&none).as_deref(), Some("16"), "UNAUTHENTICATED");
        let bad = svc.clone().oneshot(call(get, Some("x.y.z"))).await.unwrap();
        assert_eq!(grpc_status(&bad).as_deref(), Some("16"));
        let warm = svc
            .clone()
            .oneshot(call(
                "/agentmesh.cache.v1.CacheCoordinator/Warm",
                Some(&token),
            ))
            .await
            .unwrap();
        assert_eq!(
            grpc_status(&warm).as_deref(),
            Some("7"),
            "PERMISSION_DENIED"
        );
        let health = svc
            .clone()
            .oneshot(call("/grpc.health.v1.Health/Check", None))
            .await
            .unwrap();
        assert_eq!(health.body(), "-", "health stays open");
        let reflection = svc
            .clone()
            .oneshot(call(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Some(&token),
            ))
            .await
            .unwrap();
        assert_eq!(reflection.body(), "svc-a");
        let unknown = svc
            .oneshot(call("/other.Service/Do", Some(&token)))
            .await
            .unwrap();
        assert_eq!(
            grpc_status(&unknown).as_deref(),
            Some("7"),
            "no rule: admin only"
        );
    }

    #[tokio::test]
    async fn test_auth_off_makes_every_call_the_anonymous_admin() {
        let svc = service(None);
        let ok = svc
            .oneshot(call("/agentmesh.cache.v1.CacheCoordinator/Warm", None))
            .await
            .unwrap();
        assert_eq!(ok.body(), "anonymous");
    }
}
