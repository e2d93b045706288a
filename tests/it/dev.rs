//! `token-sidecar dev` as a user meets it: the real binary, its printed curl lines run by curl.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::binary;

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dev_answers_its_own_curl_lines() {
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
