//! The real binary as a test subject: started on a config file in a temporary directory, its
//! JSON log lines collected, stopped when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use token_sidecar::dev::StandIns;

use super::{binary, client};

/// The binary running a config file in a temporary directory, with the stand-ins' CA in
/// `ca.pem` beside it; its JSON log lines collected.
pub struct BinarySidecar {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// `server.metrics_listen`'s address, when the config has one.
    pub metrics: Option<SocketAddr>,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub client: reqwest::Client,
}

impl BinarySidecar {
    pub fn start(stand_ins: &StandIns, config: &str) -> Self {
        Self::start_with_env(stand_ins, config, &[])
    }

    /// [`Self::start`] with these environment variables set for the process.
    pub fn start_with_env(stand_ins: &StandIns, config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), stand_ins.pki.ca_pem()).unwrap();
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        std::fs::write(dir.path().join("secrets/payu"), "dev-payu-secret\n").unwrap();
        replace_file(&dir.path().join("sidecar.toml"), config);
        let mut child = Command::new(binary())
            .args(["run", "--log-format", "json", "--config"])
            .arg(dir.path().join("sidecar.toml"))
            .env("TOKEN_SIDECAR_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("token-sidecar listening") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let listening = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the sidecar starts");
        let line: serde_json::Value = serde_json::from_str(&listening).unwrap();
        let address = |field: &str| -> SocketAddr {
            let text = line["fields"][field].as_str().unwrap();
            text.trim_start_matches("Some(")
                .trim_end_matches(')')
                .parse()
                .unwrap()
        };
        let metrics = line["fields"]["metrics_addr"]
            .as_str()
            .filter(|text| *text != "None")
            .map(|_| address("metrics_addr"));
        Self {
            proxy: address("proxy_addr"),
            admin: address("admin_addr"),
            metrics,
            child,
            dir,
            logs,
            client: client(),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sidecar.toml")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("http://{}{path}", self.proxy))
            .send()
            .await
            .expect("the sidecar answers")
    }

    pub async fn reload(&self) -> (u16, serde_json::Value) {
        let response = self
            .client
            .post(format!("http://{}/config/reload", self.admin))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    pub async fn fingerprint(&self, credential: &str) -> Option<String> {
        let tokens: serde_json::Value = self
            .client
            .get(format!("http://{}/tokens", self.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let entry = tokens
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["credential"] == credential)?;
        entry["fingerprint"].as_str().map(str::to_owned)
    }

    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin);
        self.client.get(url).send().await.unwrap().text().await.unwrap()
    }

    /// A shared-cache event's count, from `/metrics`.
    pub async fn event(&self, event: &str) -> f64 {
        let series = format!("token_sidecar_shared_cache_events_total{{event=\"{event}\"}}");
        super::metric_in(&self.metrics().await, &series)
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap()
            .success());
    }

    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["target"] == "token_sidecar::access")
            .collect()
    }
}

impl Drop for BinarySidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces `path` as editors and Kubernetes do: a new file renamed over the old one.
pub fn replace_file(path: &Path, contents: &str) {
    let staging = path.with_extension("staging");
    std::fs::write(&staging, contents).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// Polls (real time, up to 10 s) until `ok` holds.
pub async fn eventually(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        if ok().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within 10 s: {what}");
}
