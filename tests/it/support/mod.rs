//! The integration harness: the stand-in providers and upstream (TLS, test CA) and the real
//! sidecar server on 127.0.0.1 sockets, sharing a manual clock the tests move.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use token_sidecar::clock::{ManualClock, SharedClock};
use token_sidecar::config::Config;
use token_sidecar::dev::certs::TestPki;
use token_sidecar::dev::{dev_accounts, StandIns};
use token_sidecar::server::{self, RunningSidecar};

pub const ANY_PORT: &str = "127.0.0.1:0";

pub struct Harness {
    pub clock: Arc<ManualClock>,
    pub stand_ins: StandIns,
    pub sidecar: RunningSidecar,
    pub client: reqwest::Client,
}

impl Harness {
    /// The sidecar on the `dev` config.
    pub async fn start() -> Self {
        Self::with_config(|stand_ins| stand_ins.config_toml(any(), any())).await
    }

    /// The sidecar on a config written for these stand-ins.
    pub async fn with_config(write: impl FnOnce(&StandIns) -> String) -> Self {
        Self::build(write, None).await
    }

    /// Like [`Harness::with_config`], also trusting `pki` (for a test's own upstream).
    pub async fn with_config_trusting(write: impl FnOnce(&StandIns) -> String, pki: &TestPki) -> Self {
        Self::build(write, Some(pki)).await
    }

    async fn build(write: impl FnOnce(&StandIns) -> String, pki: Option<&TestPki>) -> Self {
        let clock = ManualClock::new();
        let shared: SharedClock = clock.clone();
        let stand_ins = StandIns::start(shared.clone(), dev_accounts())
            .await
            .expect("stand-ins start");
        let text = write(&stand_ins);
        let mut config =
            Config::from_toml(&text, Path::new("test.toml")).unwrap_or_else(|err| panic!("{err}"));
        config.extra_roots.push(stand_ins.pki.ca_der());
        config.extra_roots.extend(pki.map(TestPki::ca_der));
        let sidecar = server::start(config, shared).await.expect("sidecar starts");
        Self {
            clock,
            stand_ins,
            sidecar,
            client: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sidecar.proxy_addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.sidecar.admin_addr.expect("admin listener")
        )
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("sidecar answers")
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    pub async fn tokens(&self) -> serde_json::Value {
        self.client
            .get(self.admin_url("/tokens"))
            .send()
            .await
            .expect("admin answers")
            .json()
            .await
            .expect("JSON")
    }

    pub async fn token_state(&self, credential: &str) -> serde_json::Value {
        let tokens = self.tokens().await;
        tokens
            .as_array()
            .expect("array")
            .iter()
            .find(|t| t["credential"] == credential)
            .cloned()
            .unwrap_or_else(|| panic!("no /tokens entry for {credential}: {tokens}"))
    }

    /// Waits (real time, briefly) until no background refresh is running.
    pub async fn settle(&self) {
        for _ in 0..200 {
            let tokens = self.tokens().await;
            if !tokens
                .as_array()
                .expect("array")
                .iter()
                .any(|t| t["state"] == "refreshing")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("a background refresh did not finish");
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        let response = self
            .client
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics");
        response.text().await.expect("text")
    }

    /// A counter's value from `/metrics` (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|line| {
                line.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

/// The echo upstream's JSON from a response that must be a 200.
pub async fn echo_ok(response: reqwest::Response) -> serde_json::Value {
    let status = response.status();
    let body = response.text().await.expect("body");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"))
}

/// A client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn any() -> SocketAddr {
    ANY_PORT.parse().expect("address")
}

/// The built binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_token-sidecar"))
}

/// Runs the binary to completion.
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(binary());
    command.args(args).env_remove("TOKEN_SIDECAR_CONFIG");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The repository root (for `config/` examples).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Serves `handler` over TLS (certificate from `pki`) on a fresh 127.0.0.1 port.
pub async fn spawn_tls_server(
    pki: &token_sidecar::dev::certs::TestPki,
    handler: token_sidecar::server::Handler,
) -> SocketAddr {
    let listener = server::bind(any()).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = pki.acceptor(&["127.0.0.1", "localhost"]).expect("acceptor");
    let (keep_open, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        server::serve(
            listener,
            Some(acceptor),
            handler,
            shutdown,
            server::ConnectionLimits::default(),
            None,
        )
        .await;
        drop(keep_open);
    });
    addr
}

/// A config with one provider (PayU shape) and one route `/api` to `upstream`.
pub fn single_route_config(stand_ins: &StandIns, upstream: &str, route_extra: &str) -> String {
    format!(
        r#"
[server]
listen = "{ANY_PORT}"
admin_listen = "{ANY_PORT}"

[providers.payu]
token_url = "https://{token}/oauth/token"

[credentials.acme-payu]
provider = "payu"
client_id = "acme-payu-client"
client_secret = "dev-payu-secret"
scopes = ["create_payment_links"]

[[routes]]
path_prefix = "/api"
upstream = "{upstream}"
credential = "acme-payu"
{route_extra}
"#,
        token = stand_ins.token_addr
    )
}

pub fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}
