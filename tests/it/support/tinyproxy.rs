//! A real CONNECT proxy (`tinyproxy`) on a free 127.0.0.1 port, for the egress tests; its log
//! shows which tunnels it opened. Where it cannot be started, the test is skipped and says why.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Tinyproxy {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// A proxy asking for `user:password` (Basic) when `auth` is given.
    pub fn start(test: &str, auth: Option<(&str, &str)>) -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let dir = tempfile::tempdir().ok()?;
        let log = dir.path().join("tinyproxy.log");
        let mut config = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\nAllow 127.0.0.1\nLogLevel Info\nLogFile \"{}\"\n",
            log.display()
        );
        if let Some((user, password)) = auth {
            config.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let config_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&config_path, config).ok()?;
        let child = match Command::new("tinyproxy")
            .args(["-d", "-c"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(err) => {
                super::skip(
                    test,
                    &format!(
                        "tinyproxy cannot be started: {err} (`apt-get install tinyproxy`; .ci/run does)"
                    ),
                );
                return None;
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let started = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                super::skip(test, "tinyproxy did not listen within 10 s");
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self {
            child,
            addr,
            log,
            _dir: dir,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many tunnels it opened to `destination` (`host:port`).
    pub fn tunnels_to(&self, destination: SocketAddr) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let request = format!("CONNECT {destination} HTTP/");
        let by_name = format!("CONNECT localhost:{} HTTP/", destination.port());
        log.lines()
            .filter(|line| line.contains(&request) || line.contains(&by_name))
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
