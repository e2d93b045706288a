//! Micro-benchmarks of the request path's pieces, so a regression shows without a full
//! `bench/run.sh` run: routing at 10 and 10,000 routes, preparing the upstream headers, and a
//! warm token cache lookup. `cargo bench --bench hot_path`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use token_sidecar::clock::SystemClock;
use token_sidecar::config::{Config, Inject};
use token_sidecar::forward::{clean_request_headers, inject_token};
use token_sidecar::metrics::Metrics;
use token_sidecar::route::Router;
use token_sidecar::secret::AccessToken;
use token_sidecar::token::cache::TokenCache;
use token_sidecar::token::dialect::IssuedToken;
use token_sidecar::token::source::{FetchContext, Revocation, SourceFuture, TokenSource};

/// A config with `routes` routes `/m{i}`, each with its own credential.
fn config(routes: usize) -> Config {
    let mut text = String::from("[providers.p]\ntoken_url = \"https://auth.example/token\"\n");
    for i in 0..routes {
        text.push_str(&format!(
            "[credentials.m{i}]\nprovider = \"p\"\nclient_id = \"m{i}\"\nclient_secret = \"s{i}\"\n\
             [[routes]]\npath_prefix = \"/merchants/m{i}\"\nupstream = \"https://api.example/v1\"\ncredential = \"m{i}\"\n"
        ));
    }
    Config::from_toml(&text, Path::new("bench.toml")).expect("bench config is valid")
}

fn routing(c: &mut Criterion) {
    for routes in [10, 10_000] {
        let config = config(routes);
        let router = Router::new(&config.routes, &[]);
        let path = format!("/merchants/m{}/payments/123", routes - 1);
        c.bench_function(&format!("route the last of {routes} routes"), |b| {
            b.iter(|| {
                router
                    .find(black_box(Some("localhost")), black_box(&path))
                    .is_some()
            })
        });
    }
}

fn headers(c: &mut Criterion) {
    let token = AccessToken::new("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhY21lIn0.c2lnbmF0dXJl");
    let mut client_headers = HeaderMap::new();
    for (name, value) in [
        ("host", "localhost:8080"),
        ("user-agent", "legacy-client/1.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("x-request-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("connection", "keep-alive"),
    ] {
        client_headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    c.bench_function("clean the client's headers and inject the token", |b| {
        b.iter(|| {
            let mut headers = client_headers.clone();
            clean_request_headers(&mut headers, &[]);
            inject_token(&mut headers, &Inject::Bearer, &token).is_ok()
        })
    });
}

/// Always the same long-lived token, at once.
struct FixedSource;

impl TokenSource for FixedSource {
    fn fetch<'a>(
        &'a self,
        _: &'a token_sidecar::config::CredentialSpec,
        _: FetchContext,
    ) -> SourceFuture<'a, IssuedToken> {
        Box::pin(async {
            Ok(IssuedToken {
                token: AccessToken::new("bench-token"),
                expires_at: SystemTime::now() + Duration::from_secs(86_400),
                lifetime: Duration::from_secs(86_400),
                token_id: None,
                dpop: false,
            })
        })
    }

    fn revoke<'a>(
        &'a self,
        _: &'a token_sidecar::config::CredentialSpec,
        _: &'a str,
    ) -> SourceFuture<'a, Revocation> {
        Box::pin(async { Ok(Revocation::Revoked) })
    }
}

fn cache_lookup(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = config(1_000);
    let cache = runtime.block_on(async {
        TokenCache::new(
            &config.credentials,
            Arc::new(FixedSource),
            config.cache,
            Arc::new(SystemClock),
            Metrics::new(),
        )
    });
    let credential = config.credentials[999].clone();
    let (credentials, wait) = (cache.credentials(), Duration::from_secs(30));
    runtime
        .block_on(cache.token(&credentials, &credential, wait))
        .expect("warm");
    c.bench_function("warm token lookup among 1,000 credentials", |b| {
        b.iter(|| {
            runtime
                .block_on(cache.token(&credentials, black_box(&credential), wait))
                .is_ok()
        })
    });
}

criterion_group!(benches, routing, headers, cache_lookup);
criterion_main!(benches);
