//! A real `redis-server` on a free 127.0.0.1 port, for the fleet tests; stopped when dropped.
//! Where none can be started, [`RedisServer::start`] says why and the test is skipped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl RedisServer {
    /// A server on a free port, or `None` (the reason printed) when `redis-server` cannot run.
    pub fn start(test: &str) -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let mut server = Self {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        match server.restart() {
            Ok(()) => Some(server),
            Err(why) => {
                super::skip(
                    test,
                    &format!("{why} (`apt-get install redis-server`; .ci/run does)"),
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
        let child = Command::new("redis-server")
            .args(["--port", &self.addr.port().to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("redis-server cannot be started: {err}"))?;
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
        Err("redis-server did not answer PING within 10 s".into())
    }

    /// One command over RESP; the raw answer.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut answer = vec![0u8; 1 << 20];
        let mut read = 0;
        loop {
            match stream.read(&mut answer[read..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    read += n;
                    if answer[..read].ends_with(b"\r\n") && resp_complete(&answer[..read]) {
                        break;
                    }
                }
            }
        }
        Some(String::from_utf8_lossy(&answer[..read]).into_owned())
    }

    /// Every key (SCAN, all of them).
    pub fn keys(&self) -> Vec<String> {
        let answer = self.command(&["KEYS", "*"]).unwrap_or_default();
        answer
            .split("\r\n")
            .skip(1)
            .filter(|line| !line.starts_with('$') && !line.is_empty())
            .map(str::to_owned)
            .collect()
    }
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
