//! A real OAuth 2.0 authorization server, node `oidc-provider` (OpenID Certified) from the npm
//! registry, on a free 127.0.0.1 port over TLS from the test's CA; see
//! `tests/oauth-server/server.mjs`. The first test to need it installs it (`npm install` into
//! the target directory); where node or the registry is not there, the test is skipped and says
//! why.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use token_sidecar::dev::certs::TestPki;

pub struct OAuthServer {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl OAuthServer {
    /// The server, trusting `client_public_key` (a PEM file) for the client `custom-client`.
    pub fn start(test: &str, pki: &TestPki, client_public_key: &Path) -> Option<Self> {
        let installed = match installed() {
            Ok(dir) => dir,
            Err(why) => {
                super::skip(test, why);
                return None;
            }
        };
        let dir = tempfile::tempdir().ok()?;
        let (cert, key) = pki.server_certificate(&["127.0.0.1", "localhost"]).ok()?;
        std::fs::write(dir.path().join("cert.pem"), cert).ok()?;
        std::fs::write(dir.path().join("key.pem"), key).ok()?;
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = Command::new("node")
            .arg(installed.join("server.mjs"))
            .arg(port.to_string())
            .arg(dir.path().join("cert.pem"))
            .arg(dir.path().join("key.pem"))
            .arg(client_public_key)
            .current_dir(installed)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("server.log")).ok()?)
            .spawn()
            .ok()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut server = Self {
            child,
            addr,
            _dir: dir,
        };
        let started = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if started.elapsed() > Duration::from_secs(20) || server.child.try_wait().ok()?.is_some() {
                let log = std::fs::read_to_string(server._dir.path().join("server.log")).unwrap_or_default();
                panic!("the OAuth server (node oidc-provider) did not start:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The directory with `server.mjs` and its `node_modules`, installed once per test run.
fn installed() -> Result<&'static Path, &'static str> {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INSTALLED
        .get_or_init(install)
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(String::as_str)
}

fn install() -> Result<PathBuf, String> {
    if !super::tool_works("node", &["--version"]) || !super::tool_works("npm", &["--version"]) {
        return Err("node and npm are not installed (the real OAuth server is node oidc-provider)".into());
    }
    let version = Command::new("node")
        .arg("--version")
        .output()
        .map_err(|err| err.to_string())?;
    let version = String::from_utf8_lossy(&version.stdout);
    let major: u32 = version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 20 {
        return Err("oidc-provider 9 needs node 20.19 or later; this node is older".into());
    }
    let source = super::repo_root().join("tests/oauth-server");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("oauth-server");
    std::fs::create_dir_all(&dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    for file in ["package.json", "server.mjs"] {
        std::fs::copy(source.join(file), dir.join(file))
            .map_err(|err| format!("cannot copy {file}: {err}"))?;
    }
    if dir.join("node_modules/oidc-provider/package.json").exists() {
        return Ok(dir);
    }
    let output = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .output()
        .map_err(|err| format!("npm cannot run: {err}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "`npm install oidc-provider` failed (is the npm registry reachable?): {}",
            stderr.lines().last().unwrap_or_default()
        ));
    }
    Ok(dir)
}
