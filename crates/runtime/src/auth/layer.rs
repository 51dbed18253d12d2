//! The tower layer that authenticates and authorises every gRPC call on a server: the bearer
//! token is verified ([`Verifier`]), the method's rule checked ([`allowed`]), and the caller's
//! [`Identity`] put in the request's extensions for the handler (tenant scoping, agent
//! identity). `grpc.health.v1` stays open (probes carry no token); reflection needs any valid
//! token. Without a verifier (`--auth off`) every call is the anonymous admin.
//!
//! Calls to audited methods (each service's `AUDITED`) are recorded by the [`Auditor`] when
//! they end — refused ones too — with the target the handler noted ([`crate::audit::target`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, Either, Ready, ready};
use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::{AccessRule, Identity, Role, TokenError, Verifier, allowed, allowed_roles};
use crate::audit::{AuditNote, Auditor};

struct Shared {
    verifier: Option<Arc<Verifier>>,
    rules: HashMap<String, &'static [AccessRule]>,
    /// Client-certificate identities (mutual TLS), standing in for a missing token.
    certificates: Option<Arc<crate::tls::CertificateIdentities>>,
    /// Rules of the roles file, by path without the leading slash (`svc/Method`); they win.
    overrides: HashMap<String, Vec<Role>>,
    /// Audited methods, as paths without the leading slash (`svc/Method`).
    audited: HashSet<String>,
    auditor: Option<Arc<Auditor>>,
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
                overrides: HashMap::new(),
                certificates: None,
                audited: HashSet::new(),
                auditor: None,
            }),
        }
    }

    /// Replaces the rules of the RPCs in `overrides` (`svc/Method` → roles; the roles file).
    #[must_use]
    pub fn with_overrides(self, overrides: &[(String, Vec<Role>)]) -> Self {
        let Ok(mut shared) = Arc::try_unwrap(self.shared) else {
            unreachable!("with_overrides is called before the layer is shared")
        };
        shared.overrides = overrides.iter().cloned().collect();
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Lets a verified client certificate (mutual TLS) stand in for a token.
    #[must_use]
    pub fn with_certificates(
        self,
        certificates: Option<Arc<crate::tls::CertificateIdentities>>,
    ) -> Self {
        let Ok(mut shared) = Arc::try_unwrap(self.shared) else {
            unreachable!("with_certificates is called before the layer is shared")
        };
        shared.certificates = certificates;
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Records calls to `audited` methods (per fully qualified service, each service's
    /// `AUDITED`) with `auditor`.
    #[must_use]
    pub fn with_audit(
        self,
        auditor: Option<Arc<Auditor>>,
        audited: impl IntoIterator<Item = (String, &'static [&'static str])>,
    ) -> Self {
        let Ok(mut shared) = Arc::try_unwrap(self.shared) else {
            unreachable!("with_audit is called before the layer is shared")
        };
        shared.audited = audited
            .into_iter()
            .flat_map(|(service, methods)| methods.iter().map(move |m| format!("{service}/{m}")))
            .collect();
        shared.auditor = auditor;
        Self {
            shared: Arc::new(shared),
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
    /// The caller and the missing permission.
    PermissionDenied(Arc<Identity>, String),
}

impl Refusal {
    fn status(&self) -> tonic::Status {
        match self {
            Self::Unauthenticated(e) => tonic::Status::unauthenticated(e.to_string()),
            Self::PermissionDenied(_, e) => tonic::Status::permission_denied(e.clone()),
        }
    }
}

impl Shared {
    /// The identity of the client certificate the call came with, if certificates count here
    /// and there is one.
    fn certificate_identity<B>(
        &self,
        request: &Request<B>,
    ) -> Option<Result<Arc<Identity>, String>> {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let certificates = self.certificates.as_ref()?;
        let chain = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()?
            .peer_certs()?;
        let leaf = chain.first()?;
        Some(certificates.identity(leaf.as_ref()))
    }

    fn decide<B>(&self, request: &Request<B>) -> Result<Option<Arc<Identity>>, Refusal> {
        let path = request.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        if service == "grpc.health.v1.Health" {
            return Ok(None);
        }
        let Some(verifier) = &self.verifier else {
            return Ok(Some(super::scope::anonymous()));
        };
        let token = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        let identity = match token {
            Some(token) => verifier
                .verify(token.trim())
                .map_err(Refusal::Unauthenticated)?,
            None => self
                .certificate_identity(request)
                .ok_or(Refusal::Unauthenticated(TokenError::Missing))?
                .map_err(|e| Refusal::Unauthenticated(TokenError::Invalid(e)))?,
        };
        if service.starts_with("grpc.reflection.") {
            return Ok(Some(identity));
        }
        let decision = match self.overrides.get(path) {
            Some(roles) => allowed_roles(roles, method, &identity),
            None => allowed(
                self.rules.get(service).copied().unwrap_or(&[]),
                method,
                &identity,
            ),
        };
        if let Err(e) = decision {
            return Err(Refusal::PermissionDenied(identity, e));
        }
        Ok(Some(identity))
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<
        S::Future,
        Either<
            BoxFuture<'static, Result<Response<ResBody>, S::Error>>,
            Ready<Result<Response<ResBody>, S::Error>>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().trim_start_matches('/');
        let auditor = self
            .shared
            .auditor
            .as_ref()
            .filter(|_| self.shared.audited.contains(path))
            .cloned();
        let decision = self.shared.decide(&request);
        let Some(auditor) = auditor else {
            return match decision {
                Ok(identity) => {
                    if let Some(identity) = identity {
                        request.extensions_mut().insert(identity);
                    }
                    Either::Left(self.inner.call(request))
                }
                Err(refusal) => {
                    Either::Right(Either::Right(ready(Ok(refusal.status().into_http()))))
                }
            };
        };
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let (service, method) = (service.to_owned(), method.to_owned());
        let trace_id = trace_id(request.headers());
        match decision {
            Ok(identity) => {
                let note = AuditNote::default();
                request.extensions_mut().insert(note.clone());
                if let Some(identity) = &identity {
                    request.extensions_mut().insert(identity.clone());
                }
                let call = self.inner.call(request);
                Either::Right(Either::Left(Box::pin(async move {
                    let response = call.await;
                    if let Ok(response) = &response {
                        let (code, message) = outcome(response);
                        auditor.record(
                            &service,
                            &method,
                            identity.as_deref(),
                            note.take(),
                            code,
                            message,
                            trace_id,
                        );
                    }
                    response
                })))
            }
            Err(refusal) => {
                let status = refusal.status();
                let identity = match &refusal {
                    Refusal::PermissionDenied(identity, _) => Some(identity.as_ref()),
                    Refusal::Unauthenticated(_) => None,
                };
                auditor.record(
                    &service,
                    &method,
                    identity,
                    String::new(),
                    status.code(),
                    status.message().to_owned(),
                    trace_id,
                );
                Either::Right(Either::Right(ready(Ok(status.into_http()))))
            }
        }
    }
}

/// The outcome of a call as its response headers tell it: a trailers-only error carries
/// `grpc-status` there; otherwise the call succeeded (audited methods are unary).
fn outcome<B>(response: &Response<B>) -> (tonic::Code, String) {
    let headers = response.headers();
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return (tonic::Code::Ok, String::new());
    };
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    (tonic::Code::from_i32(code), message)
}

/// `grpc-message` is percent-encoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && text.is_char_boundary(i + 1)
            && text.is_char_boundary(i + 3)
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The call's trace id: the server span's (the telemetry layer enters it around this call),
/// else the caller's `traceparent`; empty when neither.
fn trace_id(headers: &http::HeaderMap) -> String {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = tracing::Span::current().context();
    let id = context.span().span_context().trace_id();
    if id != opentelemetry::trace::TraceId::INVALID {
        return id.to_string();
    }
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split('-').nth(1))
        .filter(|id| id.len() == 32)
        .map(str::to_owned)
        .unwrap_or_default()
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
