//! token-sidecar: a local HTTP proxy that injects per-merchant OAuth access tokens.
//!
//! The request path, top to bottom (see [`proxy`]):
//! 1. [`route::target`] checks the request's host and path (one well-formed Host, no dot
//!    segments or encoded separators), then [`route`] matches it to a configured route and
//!    [`proxy`] picks its credential (or 404/400);
//! 2. [`token::cache`] hands out that credential's token, fetching it once however many requests
//!    wait (from a [`token::source::TokenSource`]: the endpoint, [`token::fetch`], behind the
//!    fleet's [`token::shared`] tier on Redis when configured, within each provider's
//!    [`token::budget`]) and refreshing it ahead of expiry by the [`token::lifetime`] policy;
//! 3. [`forward`] rewrites the URI, cleans the headers, injects the token (a DPoP-bound one with
//!    a fresh proof, [`token::dpop`]) and streams the request to the route's upstream over
//!    rustls, and the response back; [`proxy::client_body`] reads the client's body under its
//!    limits.
//!
//! What a token request looks like is each provider's dialect, [`token::dialect`]: its `oauth2`
//! module (with the `client_auth` methods, [`token::assertion`] for signed ones) and `nuapay`.
//!
//! Each request reads one [`proxy::Snapshot`] of the configuration: its routes, its
//! [`token::cache::Credentials`] and its upstream clients. [`running`] builds what a
//! configuration needs — the same way at start-up and on every [`reload`], which then swaps the
//! cache's credentials and the snapshot in one step (tokens are keyed by credential identity, so
//! unchanged credentials keep theirs). [`proxy::access_log`] writes one event per request.
//!
//! Around it: [`config`] (TOML → validated types), [`server`] (listeners, signals, shutdown; one
//! connection's watchdog in `server::connection`), [`admin`] (health, readiness, metrics, token
//! admin, reload), [`error`] (the sidecar's JSON errors, one [`error::ProxyError::class`]),
//! [`probe`] (the image's health check), [`dev`] (the self-contained demo and the test doubles it
//! shares with the tests), [`telemetry`] (OpenTelemetry traces over OTLP, off unless an endpoint
//! is configured: the request's server and upstream spans in [`proxy`], the fetch's in
//! `token::cache`'s flights and [`token::fetch`], the fleet's in [`token::shared`]). On the ground floor, importing nothing of ours: [`body`] (the one
//! boxed body type), [`failure`] (error chains and the one transport-failure classifier),
//! [`egress`] (the CONNECT proxy), [`tls`], [`secret`], [`clock`], [`metrics`], [`allocator`]
//! (the binary's mimalloc: no transparent huge pages, freed pages given back at once while
//! loading and after a burst of token fetches) and [`sync`] (the one lock helper: a panic does
//! not poison).

pub mod admin;
pub mod allocator;
pub mod body;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dev;
pub mod egress;
pub mod error;
pub mod failure;
pub mod forward;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod running;
pub mod secret;
pub mod server;
pub mod sync;
pub mod telemetry;
pub mod tls;
pub mod token;
