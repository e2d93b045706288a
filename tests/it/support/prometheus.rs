//! A real Prometheus (Debian's `prometheus` package) on 127.0.0.1, scraping given targets every
//! second, and its query API.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
    pub addr: SocketAddr,
    client: reqwest::Client,
}

impl Prometheus {
    /// Prometheus scraping `targets` (`host:port`) as job `token-sidecar`, or `None` (the
    /// reason printed) when it is not installed.
    pub async fn start(test: &str, targets: &[SocketAddr]) -> Option<Self> {
        if !super::tool_works("prometheus", &["--version"]) {
            super::skip(test, "needs `prometheus` (Debian's package; .ci/run installs it)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: token-sidecar\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}/prometheus.yml", dir.path().display()))
            .arg(format!("--storage.tsdb.path={}/data", dir.path().display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        let prometheus = Self {
            child,
            _dir: dir,
            addr,
            client: super::client(),
        };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            let ready = prometheus
                .client
                .get(format!("http://{addr}/-/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return Some(prometheus);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("prometheus did not get ready in 30 s");
    }

    /// An instant query now: `Ok(series)` or `Err(Prometheus's error)`.
    pub async fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let answer: serde_json::Value = self
            .client
            .get(format!("http://{}/api/v1/query", self.addr))
            .query(&[("query", promql)])
            .send()
            .await
            .map_err(|err| err.to_string())?
            .json()
            .await
            .map_err(|err| err.to_string())?;
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        let result = &answer["data"]["result"];
        Ok(match answer["data"]["resultType"].as_str() {
            Some("vector" | "matrix") => result.as_array().cloned().unwrap_or_default(),
            _ => vec![result.clone()],
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
