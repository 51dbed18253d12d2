//! What the auth layer adds to one call, in process: a request through `AuthLayer` with auth
//! off (the anonymous admin), with a valid HS256 token (verified once, then found in the
//! cache) and with a tenant's token, against the same handler without the layer. Run with
//! `cargo bench -p agentmesh-runtime --bench auth`.

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use agentmesh_runtime::auth::{
    AccessRule, AuthLayer, Role, TokenClaims, Verifier, VerifierConfig, issue_hs256,
};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use tower::{Layer as _, Service as _, ServiceExt as _};

const SECRET: &[u8] = b"a benchmark secret that is long enough to use";
const RULES: &[AccessRule] = &[("Check", &[Role::Service, Role::Agent])];
const PATH: &str = "http://x/agentmesh.ratelimit.v1.RateLimiter/Check";

fn request(token: Option<&str>) -> Request<()> {
    let mut builder = Request::builder().uri(PATH);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    builder.body(()).expect("request")
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let handler =
        tower::service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let verifier = Arc::new(
        Verifier::new(VerifierConfig {
            hs256_secret: Some(SECRET.to_vec()),
            leeway: Duration::from_secs(30),
            ..VerifierConfig::default()
        })
        .expect("verifier"),
    );
    let rules = || [("agentmesh.ratelimit.v1.RateLimiter".to_owned(), RULES)];
    let token = issue_hs256(
        SECRET,
        &TokenClaims::new("bench", &[Role::Service], Duration::from_secs(3600)),
    )
    .expect("token");
    let mut tenant_claims = TokenClaims::new("bench", &[Role::Service], Duration::from_secs(3600));
    tenant_claims.tenant = Some("acme".into());
    let tenant_token = issue_hs256(SECRET, &tenant_claims).expect("token");

    let mut group = c.benchmark_group("auth layer per call");
    group.bench_function("no layer", |b| {
        let mut svc = handler;
        b.iter(|| runtime.block_on(svc.call(black_box(request(None)))));
    });
    group.bench_function("no layer, request with a token header", |b| {
        let mut svc = handler;
        b.iter(|| runtime.block_on(svc.call(black_box(request(Some(&token))))));
    });
    group.bench_function("auth off", |b| {
        let mut svc = AuthLayer::new(None, rules()).layer(handler);
        b.iter(|| runtime.block_on(svc.call(black_box(request(None)))));
    });
    for (name, token) in [
        ("service token (cached)", &token),
        ("tenant token (cached)", &tenant_token),
    ] {
        group.bench_function(name, |b| {
            let mut svc = AuthLayer::new(Some(verifier.clone()), rules()).layer(handler);
            b.iter(|| {
                runtime.block_on(async {
                    let svc = svc.ready().await.expect("ready");
                    svc.call(black_box(request(Some(token)))).await
                })
            });
        });
    }
    group.bench_function("token signature check (uncached)", |b| {
        b.iter_batched(
            || {
                Verifier::new(VerifierConfig {
                    hs256_secret: Some(SECRET.to_vec()),
                    ..VerifierConfig::default()
                })
                .expect("verifier")
            },
            |v| v.verify(black_box(&token)),
            criterion::BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
