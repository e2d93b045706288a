//! `token-sidecar dev` as a user meets it: the real binary, its printed curl lines run by curl.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::{binary, skip, tool_works};

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dev_answers_its_own_curl_lines() {
    if !tool_works("curl", &["--version"]) {
        return skip(
            "dev_answers_its_own_curl_lines",
            "curl is not installed (`apt-get install curl`; .ci/run does)",
        );
    }
    let mut child = Command::new(binary())
        .args(["dev", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("TOKEN_SIDECAR_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dev starts");
    let stdout = child.stdout.take().unwrap();
    let _guard = KillOnDrop(child);

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = line.starts_with("Ctrl-C");
            let _ = tx.send(line);
            if done {
                break;
            }
        }
    });
    let mut curl_lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("dev prints its banner");
        if line.starts_with("Ctrl-C") {
            break;
        }
        if line.starts_with("curl ") {
            curl_lines.push(line);
        }
    }
    assert!(curl_lines.len() >= 8, "{curl_lines:?}");
    for line in &curl_lines {
        let output = Command::new("sh").args(["-c", line]).output().expect("curl runs");
        let body = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{line} failed: {body}");
        if line.contains("/metrics") {
            assert!(body.contains("token_sidecar_requests_total"), "{line}: {body}");
        } else if line.contains("/tokens") {
            assert!(body.contains("\"fingerprint\""), "{line}: {body}");
        } else {
            let echo: serde_json::Value =
                serde_json::from_str(&body).unwrap_or_else(|_| panic!("{line}: {body}"));
            assert!(
                echo["merchant"].is_string(),
                "{line} reached the upstream with a valid token: {body}"
            );
        }
    }
}

#[test]
fn run_serves_and_stops_cleanly_on_sigterm() {
    let config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(
        config.path(),
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[providers.payu]
token_url = "https://127.0.0.1:9/oauth/token"

[credentials.acme]
provider = "payu"
client_id = "id"
client_secret = "secret"

[[routes]]
path_prefix = "/acme"
upstream = "https://127.0.0.1:9"
credential = "acme"
"#,
    )
    .unwrap();
    let mut child = Command::new(binary())
        .args([
            "run",
            "--config",
            config.path().to_str().unwrap(),
            "--log-format",
            "json",
        ])
        .env("TOKEN_SIDECAR_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run starts");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let listening = lines.next().expect("a log line").unwrap();
    let line: serde_json::Value =
        serde_json::from_str(&listening).expect("--log-format json logs JSON lines");
    assert_eq!(
        line["fields"]["message"], "token-sidecar listening",
        "{listening}"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let said = lines.map_while(Result::ok).collect::<Vec<_>>().join("\n");
    assert!(said.contains("shutting down"), "{said}");
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status:?}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `run` and `dev` both say they are shutting down when stopped, and exit 0.
#[test]
fn dev_says_it_is_shutting_down_on_sigterm() {
    let mut child = Command::new(binary())
        .args(["dev", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("TOKEN_SIDECAR_CONFIG")
        .env("TOKEN_SIDECAR_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dev starts");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let listening = lines.next().expect("a log line").unwrap();
    assert!(listening.contains("token-sidecar listening"), "{listening}");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(child.wait().unwrap().success());
    assert!(rest.iter().any(|l| l.contains("shutting down")), "{rest:?}");
}
