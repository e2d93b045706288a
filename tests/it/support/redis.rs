//! Real Redis servers on free 127.0.0.1 ports, for the fleet tests; stopped when dropped: a
//! plain `redis-server`, one on TLS with an ACL user, a master with a replica and three
//! sentinels, and a Cluster of three masters with a replica each. Where none can be started,
//! the constructor says why and the test is skipped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use token_sidecar::dev::certs::TestPki;

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// How a server is reached from the test (TLS and the ACL user, if any).
#[derive(Clone, Default)]
struct Access {
    /// The directory with `ca.pem` (the server is on TLS).
    tls: Option<PathBuf>,
    user: Option<(String, String)>,
}

pub struct RedisServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The config file, written once; the server is started on it (and `args`).
    config: PathBuf,
    args: Vec<String>,
    access: Access,
    program: &'static str,
    pub dir: tempfile::TempDir,
}

impl RedisServer {
    /// A plain server on a free port, or `None` (the reason printed) when `redis-server`
    /// cannot run.
    pub fn start(test: &str) -> Option<Self> {
        Self::with_lines(test, "redis-server", &[], Vec::new(), Access::default())
    }

    /// A server that speaks TLS only (certificate from `pki`, for 127.0.0.1 and localhost) and
    /// knows one ACL user, `user` with `password` (the default user is off).
    pub fn start_tls(test: &str, pki: &TestPki, user: &str, password: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let (cert, key) = pki.server_certificate(&["127.0.0.1", "localhost"]).ok()?;
        std::fs::write(dir.path().join("cert.pem"), cert).ok()?;
        std::fs::write(dir.path().join("key.pem"), key).ok()?;
        std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).ok()?;
        let files = dir.path().display().to_string();
        let lines = vec![
            "port 0".to_owned(),
            format!("tls-cert-file {files}/cert.pem"),
            format!("tls-key-file {files}/key.pem"),
            format!("tls-ca-cert-file {files}/ca.pem"),
            "tls-auth-clients no".to_owned(),
            "user default off".to_owned(),
            format!("user {user} on >{password} ~* &* +@all"),
        ];
        let access = Access {
            tls: Some(dir.path().to_owned()),
            user: Some((user.to_owned(), password.to_owned())),
        };
        Self::in_dir(test, "redis-server", &["tls-port"], lines, access, dir)
    }

    /// A server started as `program` on a config of `lines` (and `port_keys` = its port).
    fn with_lines(
        test: &str,
        program: &'static str,
        port_keys: &[&str],
        lines: Vec<String>,
        access: Access,
    ) -> Option<Self> {
        Self::in_dir(test, program, port_keys, lines, access, tempfile::tempdir().ok()?)
    }

    /// [`Self::with_lines`], its files in `dir`.
    fn in_dir(
        test: &str,
        program: &'static str,
        port_keys: &[&str],
        mut lines: Vec<String>,
        access: Access,
        dir: tempfile::TempDir,
    ) -> Option<Self> {
        let port = free_port();
        let port_keys = if port_keys.is_empty() {
            &["port"][..]
        } else {
            port_keys
        };
        for key in port_keys {
            lines.push(format!("{key} {port}"));
        }
        lines.extend(
            [
                "bind 127.0.0.1",
                "protected-mode no",
                "save \"\"",
                "appendonly no",
            ]
            .map(str::to_owned),
        );
        lines.push(format!("dir {}", dir.path().display()));
        let config = dir.path().join("redis.conf");
        std::fs::write(&config, lines.join("\n") + "\n").ok()?;
        let mut server = Self {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            config,
            args: Vec::new(),
            access,
            program,
            dir,
        };
        match server.restart() {
            Ok(()) => Some(server),
            Err(why) => {
                super::skip(
                    test,
                    &format!(
                        "{why} (`apt-get install redis-server redis-sentinel redis-tools`; .ci/run does)"
                    ),
                );
                None
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Stops the server (as a crash would: no shutdown save).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let child = Command::new(self.program)
            .arg(&self.config)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("{} cannot be started: {err}", self.program))?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if self
                .command(&["PING"])
                .is_some_and(|answer| answer.starts_with("+PONG"))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("{} did not answer PING within 10 s", self.program))
    }

    /// One command; the raw RESP answer (through `redis-cli` for a TLS server).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        if self.access.tls.is_some() {
            return self.cli(args);
        }
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut request = String::new();
        if let Some((user, password)) = &self.access.user {
            request.push_str(&resp(&["AUTH", user, password]));
        }
        request.push_str(&resp(args));
        stream.write_all(request.as_bytes()).ok()?;
        let mut answer = vec![0u8; 1 << 20];
        let mut read = 0;
        loop {
            match stream.read(&mut answer[read..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    read += n;
                    let text = String::from_utf8_lossy(&answer[..read]).into_owned();
                    let text = if self.access.user.is_some() {
                        text.strip_prefix("+OK\r\n").map(str::to_owned).unwrap_or(text)
                    } else {
                        text
                    };
                    if text.ends_with("\r\n") && resp_complete(text.as_bytes()) {
                        return Some(text);
                    }
                }
            }
        }
        Some(String::from_utf8_lossy(&answer[..read]).into_owned())
    }

    /// One command through `redis-cli` (TLS, the ACL user); its answer in RESP-like form: `+`
    /// before a status, `:` before an integer, else the text.
    fn cli(&self, args: &[&str]) -> Option<String> {
        let mut command = Command::new("redis-cli");
        command
            .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .stderr(Stdio::null());
        if let Some(dir) = &self.access.tls {
            command.args(["--tls", "--cacert"]).arg(dir.join("ca.pem"));
        }
        if let Some((user, password)) = &self.access.user {
            command.args(["--user", user, "--pass", password, "--no-auth-warning"]);
        }
        let output = command.args(args).output().ok()?;
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !output.status.success()
            || text.starts_with("Could not connect")
            || text.contains("ERR") && args[0] == "PING"
        {
            return None;
        }
        Some(if text == "PONG" || text == "OK" {
            format!("+{text}\r\n")
        } else {
            format!("{text}\r\n")
        })
    }

    /// Every key (KEYS *).
    pub fn keys(&self) -> Vec<String> {
        let answer = self.command(&["KEYS", "*"]).unwrap_or_default();
        if self.access.tls.is_some() {
            return answer
                .lines()
                .filter(|line| !line.is_empty())
                .map(str::to_owned)
                .collect();
        }
        answer
            .split("\r\n")
            .skip(1)
            .filter(|line| !line.starts_with('$') && !line.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// `INFO stats`' `total_connections_received`.
    pub fn connections_received(&self) -> u64 {
        let info = self.command(&["INFO", "stats"]).unwrap_or_default();
        info.lines()
            .find_map(|line| line.strip_prefix("total_connections_received:"))
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or(0)
    }
}

fn resp(args: &[&str]) -> String {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    request
}

/// Whether `answer` holds one whole RESP reply (simple, bulk, or an array of bulks).
fn resp_complete(answer: &[u8]) -> bool {
    let text = String::from_utf8_lossy(answer);
    let lines: Vec<&str> = text.split("\r\n").collect();
    match lines.first().and_then(|l| l.chars().next()) {
        Some('+' | '-' | ':') => true,
        Some('$') => lines[0] == "$-1" || lines.len() >= 3,
        Some('*') => {
            let count: usize = lines[0][1..].parse().unwrap_or(0);
            lines
                .iter()
                .skip(1)
                .filter(|l| !l.starts_with('$') && !l.is_empty())
                .count()
                >= count
        }
        _ => false,
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A master, its replica and three sentinels that watch it as `tokens`.
pub struct Sentinels {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
}

impl Sentinels {
    pub const MASTER_NAME: &'static str = "tokens";

    pub fn start(test: &str) -> Option<Self> {
        if !super::tool_works("redis-sentinel", &["--version"]) {
            super::skip(
                test,
                "redis-sentinel cannot run (`apt-get install redis-sentinel`; .ci/run does)",
            );
            return None;
        }
        let master = RedisServer::start(test)?;
        let replica_of = format!("replicaof 127.0.0.1 {}", master.addr.port());
        let replica =
            RedisServer::with_lines(test, "redis-server", &[], vec![replica_of], Access::default())?;
        let watch = |port: u16| {
            vec![
                format!("sentinel monitor {} 127.0.0.1 {port} 2", Self::MASTER_NAME),
                format!("sentinel down-after-milliseconds {} 1000", Self::MASTER_NAME),
                format!("sentinel failover-timeout {} 5000", Self::MASTER_NAME),
                format!("sentinel parallel-syncs {} 1", Self::MASTER_NAME),
            ]
        };
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let lines = watch(master.addr.port());
            sentinels.push(RedisServer::with_lines(
                test,
                "redis-sentinel",
                &[],
                lines,
                Access::default(),
            )?);
        }
        let set = Self {
            master,
            replica,
            sentinels,
        };
        set.wait_until(Duration::from_secs(20), |set| {
            set.replica_synced() && set.sentinels_see_replica()
        })
        .then_some(set)
        .or_else(|| {
            super::skip(test, "the sentinels did not see the replica within 20 s");
            None
        })
    }

    /// `host:port` of each sentinel, as the config takes them.
    pub fn addresses(&self) -> Vec<String> {
        self.sentinels.iter().map(|s| s.addr.to_string()).collect()
    }

    fn replica_synced(&self) -> bool {
        self.replica
            .command(&["INFO", "replication"])
            .is_some_and(|info| info.contains("master_link_status:up"))
    }

    fn sentinels_see_replica(&self) -> bool {
        self.sentinels.iter().all(|sentinel| {
            sentinel
                .command(&["SENTINEL", "replicas", Self::MASTER_NAME])
                .is_some_and(|answer| answer.contains(&self.replica.addr.port().to_string()))
        })
    }

    /// The port the sentinels name as the master now.
    pub fn master_port(&self) -> Option<u16> {
        let answer =
            self.sentinels[0].command(&["SENTINEL", "get-master-addr-by-name", Self::MASTER_NAME])?;
        answer
            .split("\r\n")
            .filter(|line| !line.starts_with('$') && !line.starts_with('*'))
            .nth(1)?
            .parse()
            .ok()
    }

    /// Polls (real time) until `ok`, for at most `limit`.
    pub fn wait_until(&self, limit: Duration, ok: impl Fn(&Self) -> bool) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if ok(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// Three masters with a replica each, joined into a Cluster by `redis-cli --cluster create`.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start(test: &str) -> Option<Self> {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let lines = vec![
                "cluster-enabled yes".to_owned(),
                "cluster-node-timeout 1000".to_owned(),
                "cluster-config-file nodes.conf".to_owned(),
                // A replica may take over whatever its lag (the tests kill masters at once).
                "cluster-replica-validity-factor 0".to_owned(),
                "repl-diskless-sync yes".to_owned(),
                "repl-diskless-sync-delay 0".to_owned(),
            ];
            nodes.push(RedisServer::with_lines(
                test,
                "redis-server",
                &[],
                lines,
                Access::default(),
            )?);
        }
        let addresses: Vec<String> = nodes.iter().map(|node| node.addr.to_string()).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !created.is_ok_and(|status| status.success()) {
            super::skip(test, "redis-cli --cluster create failed");
            return None;
        }
        let cluster = Self { nodes };
        if !cluster.wait_until(Duration::from_secs(20), |c| c.healthy() && c.replicas_synced()) {
            super::skip(test, "the cluster did not come up within 20 s");
            return None;
        }
        Some(cluster)
    }

    /// `host:port` of each node, as the config takes them.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.addr.to_string()).collect()
    }

    /// Whether every running node says the cluster is ok.
    pub fn healthy(&self) -> bool {
        self.nodes.iter().filter(|node| node.child.is_some()).all(|node| {
            node.command(&["CLUSTER", "INFO"])
                .is_some_and(|info| info.contains("cluster_state:ok"))
        })
    }

    /// Whether every replica has its master's data.
    pub fn replicas_synced(&self) -> bool {
        self.nodes.iter().all(|node| {
            node.command(&["INFO", "replication"])
                .is_some_and(|info| info.contains("role:master") || info.contains("master_link_status:up"))
        })
    }

    /// Whether `node` is a master now.
    pub fn is_master(&self, node: usize) -> bool {
        self.nodes[node]
            .command(&["ROLE"])
            .is_some_and(|role| role.contains("master"))
    }

    /// Every key on every master.
    pub fn keys(&self) -> Vec<String> {
        (0..self.nodes.len())
            .filter(|&node| self.nodes[node].child.is_some() && self.is_master(node))
            .flat_map(|node| self.nodes[node].keys())
            .collect()
    }

    pub fn wait_until(&self, limit: Duration, ok: impl Fn(&Self) -> bool) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if ok(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// Where the test keeps files a config names.
pub fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("written");
    path
}
