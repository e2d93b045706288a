//! Integration tests: the real sidecar on 127.0.0.1 sockets, stand-in token endpoints for the
//! four provider shapes and a TLS upstream that accepts only valid issued tokens.

mod admin;
mod assertions;
mod cache;
mod clients;
mod config;
mod deploy;
mod dev;
mod docs;
mod dpop;
mod egress;
mod fleet;
mod fleet_redis;
mod forwarding;
mod hardening;
mod lifecycle;
mod mtls;
mod oauth_server;
mod observability;
mod providers;
mod reload;
mod routing;
mod security;
mod support;
mod telemetry;
