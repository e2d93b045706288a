//! The integration harness: the stand-in providers and upstream (TLS, test CA) and the real
//! sidecar server on 127.0.0.1 sockets, sharing a manual clock the tests move.

#![allow(dead_code)]

pub mod binary;
pub mod oauth_server;
pub mod otlp;
pub mod prometheus;
pub mod redis;
pub mod tinyproxy;

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

    /// `POST /tokens/{credential}/refresh?force=true`: a new token now, whatever the cache holds.
    pub async fn force_refresh(&self, credential: &str) -> reqwest::Response {
        self.client
            .post(self.admin_url(&format!("/tokens/{credential}/refresh?force=true")))
            .send()
            .await
            .expect("admin refresh")
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
        metric_in(&self.metrics_text().await, series)
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
    let acceptor = pki.acceptor(&["127.0.0.1", "localhost"]).expect("acceptor");
    serve(Some(acceptor), handler).await
}

/// Serves `handler` in plain HTTP on a fresh 127.0.0.1 port.
pub async fn spawn_plain_server(handler: token_sidecar::server::Handler) -> SocketAddr {
    serve(None, handler).await
}

/// Serves `handler` over TLS and requires a client certificate signed by `pki`'s CA (mutual
/// TLS), on a fresh 127.0.0.1 port.
pub async fn spawn_mtls_server(
    pki: &token_sidecar::dev::certs::TestPki,
    handler: token_sidecar::server::Handler,
) -> SocketAddr {
    let acceptor = pki.mtls_acceptor(&["127.0.0.1", "localhost"]).expect("acceptor");
    serve(Some(acceptor), handler).await
}

async fn serve(
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    handler: token_sidecar::server::Handler,
) -> SocketAddr {
    let listener = server::bind(any()).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (keep_open, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        server::serve(
            listener,
            acceptor,
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

/// `check` on `text`, written as `sidecar.toml` into `dir` (where the files it names are): its
/// exit code and stderr, the file's path shown as `FILE`.
pub fn check_in(dir: &Path, text: &str) -> (i32, String) {
    let config = dir.join("sidecar.toml");
    std::fs::write(&config, text).expect("config written");
    let path = config.to_str().expect("UTF-8 path").to_owned();
    let (code, _, stderr) = run_binary(&["check", "--config", &path], &[]);
    (code, stderr.replace(&path, "FILE"))
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

/// Sends `request` on a new connection to `addr` and reads the answer: until the connection
/// closes, or until one whole response (head and `content-length` body) has arrived.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("send");
    let mut answer = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("an answer in time");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
        if whole_response(&answer) {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn whole_response(bytes: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = response.parse(bytes) else {
        return false;
    };
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok());
    length.is_some_and(|length| bytes.len() >= head + length)
}

/// Asserts that a raw answer is the sidecar's JSON error with `status` and `code`.
pub fn assert_json_error(answer: &str, status: u16, code: &str) {
    assert!(
        answer.starts_with(&format!("HTTP/1.1 {status} ")),
        "expected {status}: {answer}"
    );
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("x-token-sidecar-error: {code}\r\n")),
        "expected code {code}: {answer}"
    );
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON body expected: {answer}"));
    assert_eq!(json["error"]["code"], code, "{answer}");
}

/// Answers of a test's own token endpoint: status and JSON body, by request number (from 1).
pub type TokenAnswers = Arc<dyn Fn(usize) -> (u16, String) + Send + Sync>;

/// A token endpoint of the test's own (TLS from `pki`), counting its requests; `before` runs
/// as each request arrives (e.g. to move the sidecar's clock, as a slow endpoint would).
pub async fn spawn_token_endpoint(
    pki: &TestPki,
    answers: TokenAnswers,
    before: Arc<dyn Fn() + Send + Sync>,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    let handler: token_sidecar::server::Handler = Arc::new(move |_request| {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        before();
        let (status, body) = answers(n);
        Box::pin(async move {
            let mut response = http::Response::new(token_sidecar::body::full_body(body));
            *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
            response
                .headers_mut()
                .insert("content-type", http::HeaderValue::from_static("application/json"));
            response
        })
    });
    (spawn_tls_server(pki, handler).await, count)
}

/// A config with one provider at `token_url`, one credential `c` and one route `/api` to
/// `upstream`; the extras go into `[server]` and `[providers.p]`.
pub fn custom_config(token_url: &str, upstream: &str, server_extra: &str, provider_extra: &str) -> String {
    format!(
        r#"
[server]
listen = "{ANY_PORT}"
admin_listen = "{ANY_PORT}"
{server_extra}

[providers.p]
token_url = "{token_url}"
{provider_extra}

[credentials.c]
provider = "p"
client_id = "custom-client"
client_secret = "custom-client-secret-value"

[[routes]]
path_prefix = "/api"
upstream = "{upstream}"
credential = "c"
"#
    )
}

/// The value of `series` (a metric name with its labels) in a Prometheus text, 0 when absent.
pub fn metric_in(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Whether `program args…` runs and exits 0: for tests that need a tool beyond cargo.
pub fn tool_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Python 3 with `requests`, installed with pip on first need; `false` (and the reason
/// printed) when it cannot be had here.
pub fn python_requests() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        if tool_works("python3", &["-c", "import requests"]) {
            return true;
        }
        if !tool_works("python3", &["--version"]) {
            return false;
        }
        eprintln!("installing Python `requests` for the client tests (python3 -m pip install requests)");
        let installed = tool_works("python3", &["-m", "pip", "install", "--quiet", "requests"])
            || tool_works(
                "python3",
                &["-m", "pip", "install", "--quiet", "--user", "requests"],
            );
        installed && tool_works("python3", &["-c", "import requests"])
    })
}

/// Says, in the test's output, why a test checked nothing here.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
}
