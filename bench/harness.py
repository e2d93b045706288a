#!/usr/bin/env python3
"""token-sidecar's benchmark harness: the sidecar against nginx doing the same job, side by side
in one run, and the sidecar's costs at scale. Run it through `bench/run.sh quick|full`, which
installs nginx and wrk and builds the release binary.

Jobs (the client, wrk, and the upstream nginx on core 0; the proxy under test alone on core 1):
  direct      wrk → upstream                        (the floor)
  nginx       wrk → nginx, 1 worker, static `proxy_set_header Authorization` → upstream
  sidecar     wrk → token-sidecar (1 core: 1 worker thread), cached token → upstream
each with a plain-HTTP and a TLS upstream (keep-alive HTTP/1.1 both ways). Reported per job:
requests/s, p50/p99 latency, CPU-seconds per 10k requests (proxies) and upstream connections
opened per 10k requests (from the upstream's stub_status). Then p50/p90/p99/p99.9 at fixed
open-loop rates (oha, latency-corrected), plotted as an SVG.

Scale: RSS idle and with every token cached at 1/1k/10k(/100k in full) credentials, each with
its own route (2 s after start-up or readiness, once the allocator has purged), and the CPU the
sidecar holding them all spends idle (the refresher's rounds); throughput to
the last of 10/1k/10k routes; `check` and start-up time of 10k routes; a cold
burst of 1,000 concurrent requests over 100 cold credentials (token fetches counted).

Instructions: the user-space instructions nginx and the sidecar spend per request of the
plain-upstream job, each under valgrind's callgrind: a figure that does not move with the
machine's noise, for comparing two commits or the two proxies' own code. Also the sidecar
with traces exported (100% and 10% sampled, to a collector here), and, with
TOKEN_SIDECAR_BASELINE_BINARY set, another build of it measured in the same run.

Output: a Markdown table on stdout, and raw JSON plus the table in bench/results/.
"""
import concurrent.futures
import datetime
import glob
import http.client
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("TOKEN_SIDECAR_BINARY", os.path.join(ROOT, "target", "release", "token-sidecar"))
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CLIENT_CORE, PROXY_CORE = "0", "1"
TOKEN = "bench-token"
IDLE_SECONDS = 3  # the idle CPU of a sidecar holding every token (the refresher's cost)
MODES = {
    "quick": {"seconds": 4, "rounds": 1, "rates": [5000, 15000], "creds": [1, 1000, 10000], "routes": [10, 1000, 10000]},
    "full": {"seconds": 15, "rounds": 3, "rates": [5000, 10000, 15000, 20000], "creds": [1, 1000, 10000, 100000], "routes": [10, 1000, 10000]},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
    return 0


def cpu_seconds(pids):
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        total += (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    return total


def get(port, path, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def wait_for(port, path="/", status=200, seconds=60, poll=0.05):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if get(port, path, timeout=2)[0] == status:
                return
        except OSError:
            pass
        time.sleep(poll)
    raise SystemExit(f"nothing answered {status} on 127.0.0.1:{port}{path}")


class Work:
    """A scratch directory with the test CA, the upstream nginx and the baseline nginx."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="sidecar-bench-")
        self.children = []
        self.nginx_prefixes = []
        self.make_certificates()
        self.upstream_plain, self.upstream_tls, self.status_port = free_port(), free_port(), free_port()
        self.start_nginx("upstream", CLIENT_CORE, self.upstream_conf())
        self.nginx_plain, self.nginx_tls = free_port(), free_port()
        self.nginx_pids = self.start_nginx("proxy", PROXY_CORE, self.proxy_conf())

    def make_certificates(self):
        d = self.dir
        run = lambda *args: subprocess.run(args, check=True, capture_output=True)
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bench CA",
            "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem")
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr")
        with open(f"{d}/san.ext", "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\n")
        run("openssl", "x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{d}/san.ext", "-out", f"{d}/server.pem")

    def common(self, prefix):
        return (f"worker_processes 1;\nerror_log {prefix}/error.log warn;\npid {prefix}/nginx.pid;\n"
                "events { worker_connections 8192; }\n")

    def temp_paths(self, prefix):
        return " ".join(f"{k}_temp_path {prefix}/{k};" for k in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"])

    def upstream_conf(self):
        p, d = f"{self.dir}/upstream", self.dir
        answers = f"""
    keepalive_requests 10000000;
    location /oauth/token {{ default_type application/json; return 200 '{{"access_token":"{TOKEN}","expires_in":86400}}'; }}
    location / {{ default_type application/json; return 200 '{{"status":"ok","payments":[]}}'; }}"""
        return self.common(p) + f"""http {{
  access_log off; {self.temp_paths(p)}
  server {{ listen 127.0.0.1:{self.upstream_plain} reuseport; {answers} }}
  server {{ listen 127.0.0.1:{self.upstream_tls} ssl; ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key; {answers} }}
  server {{ listen 127.0.0.1:{self.status_port}; location / {{ stub_status; }} }}
}}
"""

    def proxy_conf(self):
        p, d = f"{self.dir}/proxy", self.dir
        location = lambda upstream, scheme: f"""
    location /api/ {{
      proxy_pass {scheme}://{upstream}/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {TOKEN}";
      proxy_ssl_trusted_certificate {d}/ca.pem; proxy_ssl_verify on; proxy_ssl_name 127.0.0.1; proxy_ssl_session_reuse on;
    }}"""
        return self.common(p) + f"""http {{
  access_log off; {self.temp_paths(p)}
  upstream plain {{ server 127.0.0.1:{self.upstream_plain}; keepalive 64; keepalive_requests 10000000; }}
  upstream tls {{ server 127.0.0.1:{self.upstream_tls}; keepalive 64; keepalive_requests 10000000; }}
  server {{ listen 127.0.0.1:{self.nginx_plain}; keepalive_requests 10000000; {location("plain", "http")} }}
  server {{ listen 127.0.0.1:{self.nginx_tls}; keepalive_requests 10000000; {location("tls", "https")} }}
}}
"""

    def start_nginx(self, name, core, conf):
        prefix = f"{self.dir}/{name}"
        os.makedirs(prefix)
        with open(f"{prefix}/nginx.conf", "w") as f:
            f.write(conf)
        subprocess.run(["taskset", "-c", core, NGINX, "-p", prefix, "-c", f"{prefix}/nginx.conf"], check=True)
        self.nginx_prefixes.append(prefix)
        time.sleep(0.3)
        master = int(open(f"{prefix}/nginx.pid").read())
        workers = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
        return [master] + [int(w) for w in workers]

    def upstream_accepts(self):
        body = get(self.status_port, "/")[1].decode()
        return int(body.splitlines()[2].split()[0])

    def sidecar(self, config_text, core=PROXY_CORE, extra_env=None):
        port, admin = free_port(), free_port()
        path = f"{self.dir}/sidecar-{port}.toml"
        with open(path, "w") as f:
            f.write(config_text.replace("LISTEN", f"127.0.0.1:{port}").replace("ADMIN", f"127.0.0.1:{admin}"))
        env = dict(os.environ, TOKEN_SIDECAR_LOG="warn", **(extra_env or {}))
        child = subprocess.Popen(["taskset", "-c", core, BINARY, "run", "--config", path],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self.children.append(child)
        wait_for(admin, "/healthz")
        return child, port, admin

    def stop(self, child):
        child.terminate()
        child.wait(timeout=30)

    def close(self):
        for child in self.children:
            if child.poll() is None:
                child.kill()
        for prefix in self.nginx_prefixes:
            subprocess.run([NGINX, "-p", prefix, "-c", f"{prefix}/nginx.conf", "-s", "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def config(self, credentials=1, routes=None, prefetch=False):
        """A sidecar config: `credentials` credentials at the upstream's token endpoint, each
        with its route `/m{i}` (plain upstream), plus `/plain` and `/tls` for the first."""
        lines = [f"""[server]
listen = "LISTEN"
admin_listen = "ADMIN"
max_connections = 4096
[tls]
ca_file = "{self.dir}/ca.pem"
[providers.partner]
token_url = "https://127.0.0.1:{self.upstream_tls}/oauth/token"
[[routes]]
path_prefix = "/plain"
upstream = "http://127.0.0.1:{self.upstream_plain}"
allow_plaintext = true
credential = "m0"
[[routes]]
path_prefix = "/tls"
upstream = "https://127.0.0.1:{self.upstream_tls}"
credential = "m0"
"""]
        for i in range(routes or credentials):
            lines.append(f"""[[routes]]
path_prefix = "/m{i}"
upstream = "http://127.0.0.1:{self.upstream_plain}"
allow_plaintext = true
credential = "m{i % credentials}"
""")
        for i in range(credentials):
            lines.append(f'[credentials.m{i}]\nprovider = "partner"\nclient_id = "m{i}"\nclient_secret = "s{i}"\n'
                         + ("prefetch = true\n" if prefetch else ""))
        return "\n".join(lines)


def wrk(url, seconds, connections=32):
    out = subprocess.run(["taskset", "-c", CLIENT_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
                          "--latency", url], capture_output=True, text=True, check=True).stdout
    ms = lambda v: float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-2]) if v.endswith("ms") else float(v[:-1]) * 1000
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise SystemExit(f"{url}: {non2xx.group(1)} failed responses")
    return {"rps": rps, "requests": requests, "p50_ms": p50, "p99_ms": p99}


def throughput(work, mode):
    """direct / nginx / sidecar, plain and TLS upstream, rounds alternating."""
    child, port, _ = work.sidecar(work.config())
    for path in ["/plain/p", "/tls/p"]:
        assert get(port, path)[0] == 200
    jobs = {
        "direct plain": (f"http://127.0.0.1:{work.upstream_plain}/p", None),
        "nginx plain": (f"http://127.0.0.1:{work.nginx_plain}/api/p", work.nginx_pids),
        "sidecar plain": (f"http://127.0.0.1:{port}/plain/p", [child.pid]),
        "nginx tls": (f"http://127.0.0.1:{work.nginx_tls}/api/p", work.nginx_pids),
        "sidecar tls": (f"http://127.0.0.1:{port}/tls/p", [child.pid]),
    }
    results = {name: [] for name in jobs}
    for _ in range(mode["rounds"]):
        for name, (url, pids) in jobs.items():
            accepts, cpu = work.upstream_accepts(), cpu_seconds(pids) if pids else 0
            run = wrk(url, mode["seconds"])
            opened = work.upstream_accepts() - accepts - 1  # the status request itself
            run["upstream_conns_per_10k"] = opened / run["requests"] * 10000
            if pids:
                run["cpu_s_per_10k"] = (cpu_seconds(pids) - cpu) / run["requests"] * 10000
            results[name].append(run)
    work.stop(child)
    mean = lambda runs, key: sum(r[key] for r in runs) / len(runs)
    return {name: {key: mean(runs, key) for key in runs[0]} for name, runs in results.items()}


def oha(url, rate, seconds):
    """Open loop: `rate` requests/s whatever the answers' pace, latencies corrected for
    coordinated omission. Percentiles in ms."""
    out = subprocess.run(["taskset", "-c", CLIENT_CORE, "oha", "--no-tui", "--output-format", "json",
                          "--latency-correction", "-c", "32",
                          "-q", str(rate), "-z", f"{seconds}s", url], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    pct = data["latencyPercentiles"]
    ok = data.get("statusCodeDistribution", {}).get("200", 0)
    return {"rate": rate, "ok": ok, **{f"p{k}_ms": pct[f"p{k}"] * 1000 for k in ["50", "90", "99", "99.9"]}}


def latency(work, rates, seconds):
    """p50/p90/p99/p99.9 at fixed open-loop rates: direct, nginx and the sidecar (plain upstream)."""
    if not shutil.which("oha"):
        return {"skipped": "oha is not installed (bench/run.sh installs it with cargo install)"}
    child, port, _ = work.sidecar(work.config())
    assert get(port, "/plain/p")[0] == 200
    targets = {
        "direct": f"http://127.0.0.1:{work.upstream_plain}/p",
        "nginx": f"http://127.0.0.1:{work.nginx_plain}/api/p",
        "sidecar": f"http://127.0.0.1:{port}/plain/p",
    }
    rows = {name: [oha(url, rate, seconds) for rate in rates] for name, url in targets.items()}
    work.stop(child)
    return rows


def callgrind_instructions(work, command, port, path, env=None):
    """User-space instructions per request of `command`, a proxy listening on `port`, under
    callgrind: counted over a keep-alive load after a warm-up (token, connections), so start-up
    and the warm-up are not in it. Unlike time, this does not move with the machine's noise."""
    out = f"{work.dir}/callgrind-{port}"
    child = subprocess.Popen(["taskset", "-c", PROXY_CORE, "valgrind", "--tool=callgrind",
                              f"--callgrind-out-file={out}.%p", *command],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    work.children.append(child)
    try:
        wait_for(port, path, seconds=120)
        url = f"http://127.0.0.1:{port}{path}"
        wrk(url, 2, connections=8)
        subprocess.run(["callgrind_control", "-z", str(child.pid)], check=True, capture_output=True)
        run = wrk(url, 4, connections=8)
        subprocess.run(["callgrind_control", "-d", str(child.pid)], check=True, capture_output=True)
        total = 0
        for dump in glob.glob(f"{out}.{child.pid}.*"):  # the dump after zeroing, per thread
            with open(dump) as f:
                total += int(re.search(r"^summary: *(\d+)", f.read(), re.M).group(1))
        return {"requests": run["requests"], "instructions_per_request": total / run["requests"]}
    finally:
        child.kill()
        child.wait()


def instructions(work):
    """nginx and the sidecar doing the plain-upstream job, each under callgrind."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        return {"skipped": "valgrind is not installed (bench/run.sh installs it)"}
    port = free_port()
    prefix = f"{work.dir}/nginx-callgrind"
    os.makedirs(prefix)
    conf = work.proxy_conf().replace(f"{work.dir}/proxy", prefix)
    conf = conf.replace(f"listen 127.0.0.1:{work.nginx_plain};", f"listen 127.0.0.1:{port};")
    conf = conf.replace(f"listen 127.0.0.1:{work.nginx_tls};", f"listen 127.0.0.1:{free_port()};")
    with open(f"{prefix}/nginx.conf", "w") as f:
        f.write(conf)
    nginx = callgrind_instructions(work, [NGINX, "-p", prefix, "-c", f"{prefix}/nginx.conf",
                                          "-g", "daemon off; master_process off;"], port, "/api/p")
    sidecar_port, admin = free_port(), free_port()
    config = f"{work.dir}/sidecar-callgrind.toml"
    with open(config, "w") as f:
        f.write(work.config().replace("LISTEN", f"127.0.0.1:{sidecar_port}").replace("ADMIN", f"127.0.0.1:{admin}"))
    quiet = dict(os.environ, TOKEN_SIDECAR_LOG="warn")
    rows = {"nginx plain": nginx}
    baseline = os.environ.get("TOKEN_SIDECAR_BASELINE_BINARY")
    if baseline:
        rows["sidecar plain, baseline build"] = callgrind_instructions(
            work, [baseline, "run", "--config", config], sidecar_port, "/plain/p", env=quiet)
    rows["sidecar plain"] = callgrind_instructions(work, [BINARY, "run", "--config", config], sidecar_port,
                                                   "/plain/p", env=quiet)
    for label, sampler, ratio in [("100% sampled", "always_on", "1"), ("10% sampled", "traceidratio", "0.1")]:
        with OtlpSink() as collector:
            traced = dict(quiet, OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, OTEL_TRACES_SAMPLER=sampler,
                          OTEL_TRACES_SAMPLER_ARG=ratio)
            row = callgrind_instructions(work, [BINARY, "run", "--config", config], sidecar_port, "/plain/p",
                                         env=traced)
            row["exported_bytes"] = collector.received
            rows[f"sidecar plain, traced ({label})"] = row
    return rows


class OtlpSink:
    """A trace collector that takes every OTLP/HTTP export and keeps only its size."""

    def __enter__(self):
        import http.server
        import threading
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                sink.received += len(self.rfile.read(int(self.headers.get("content-length", 0))))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.received = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def latency_svg(rows, path):
    """Latency by percentile (log-spaced: 50, 90, 99, 99.9) at the highest rate, one line per job."""
    width, height, left, bottom = 640, 400, 60, 50
    keys = ["p50_ms", "p90_ms", "p99_ms", "p99.9_ms"]
    series = {name: [runs[-1][k] for k in keys] for name, runs in rows.items()}
    top = max(max(v) for v in series.values()) * 1.1 or 1
    x = lambda i: left + i * (width - left - 20) / (len(keys) - 1)
    y = lambda ms: height - bottom - ms / top * (height - bottom - 20)
    colours = {"direct": "#888888", "nginx": "#2b8a3e", "sidecar": "#1c7ed6"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="14">latency by percentile at {rows["sidecar"][-1]["rate"]} requests/s (open loop, corrected), ms</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 20}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="20" x2="{left}" y2="{height - bottom}" stroke="black"/>']
    for i, k in enumerate(keys):
        parts.append(f'<text x="{x(i)}" y="{height - bottom + 18}" text-anchor="middle">{k[1:-3]}%</text>')
    for step in range(5):
        ms = top * step / 4
        parts.append(f'<text x="{left - 6}" y="{y(ms) + 4}" text-anchor="end">{ms:.1f}</text>')
    for n, (name, values) in enumerate(series.items()):
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colours.get(name, "black")}" stroke-width="2"/>')
        parts.append(f'<text x="{width - 120}" y="{40 + 16 * n}" fill="{colours.get(name, "black")}">{name}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def memory(work, counts):
    """RSS with `n` credentials configured and no token yet, and with every token fetched (prefetch,
    then /readyz). Only small admin answers are asked for: /tokens and /metrics of 10k
    credentials are large, and what they allocate would be measured too."""
    rows = []
    for n in counts:
        child, port, admin = work.sidecar(work.config(credentials=n))
        time.sleep(2)
        configured = proc_status(child.pid, "VmRSS")
        work.stop(child)
        child, port, admin = work.sidecar(work.config(credentials=n, prefetch=True))
        wait_for(admin, "/readyz", seconds=900)
        time.sleep(2)
        cached = proc_status(child.pid, "VmRSS")
        before = cpu_seconds([child.pid])
        time.sleep(IDLE_SECONDS)
        idle_cpu = (cpu_seconds([child.pid]) - before) / IDLE_SECONDS
        rows.append({"credentials": n, "rss_configured_kb": configured, "rss_cached_kb": cached,
                     "idle_cpu_percent": 100 * idle_cpu})
        work.stop(child)
    return rows


def routing(work, counts, seconds):
    rows = []
    for n in counts:
        child, port, _ = work.sidecar(work.config(credentials=1, routes=n))
        last = f"/m{n - 1}/p"
        assert get(port, last)[0] == 200
        rows.append({"routes": n, **wrk(f"http://127.0.0.1:{port}{last}", seconds)})
        work.stop(child)
    return rows


def check_time(work, routes=10000):
    """`check`, and start-up (spawn until the admin listener answers /healthz), of `routes`
    routes each with its own credential: the best of 3 of each."""
    port, admin = free_port(), free_port()
    path = f"{work.dir}/check-{routes}.toml"
    with open(path, "w") as f:
        f.write(work.config(credentials=routes).replace("LISTEN", f"127.0.0.1:{port}").replace("ADMIN", f"127.0.0.1:{admin}"))
    check, startup = [], []
    for _ in range(3):
        started = time.monotonic()
        subprocess.run([BINARY, "check", "--config", path], check=True, capture_output=True)
        check.append(time.monotonic() - started)
        started = time.monotonic()
        child = subprocess.Popen(["taskset", "-c", PROXY_CORE, BINARY, "run", "--config", path],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(admin, "/healthz", poll=0.005)
        startup.append(time.monotonic() - started)
        work.stop(child)
    return {"routes": routes, "seconds": min(check), "startup_seconds": min(startup)}


def cold_burst(work, credentials=100, requests=1000):
    child, port, admin = work.sidecar(work.config(credentials=credentials), core="0,1")

    def one(i):
        return get(port, f"/m{i % credentials}/p", timeout=60)[0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=requests) as pool:
        statuses = list(pool.map(one, range(requests)))
    metrics = get(admin, "/metrics")[1].decode()
    fetches = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("token_sidecar_token_fetches_total{") and 'outcome="ok"' in line)
    work.stop(child)
    return {"credentials": credentials, "requests": requests, "ok": statuses.count(200), "fetches": fetches}


def table(r):
    out = []
    if "throughput" in r:
        throughput_table(r["throughput"], out)
    if "latency" in r:
        latency_table(r["latency"], out)
    if "instructions" in r:
        instructions_table(r["instructions"], out)
    if "memory" in r:
        memory_table(r["memory"], out)
    if "routing" in r:
        routing_table(r["routing"], out)
    if "check" in r:
        c = r["check"]
        out.append(f"\n`check` of {c['routes']} routes: **{c['seconds']:.2f} s**; start-up until /healthz answers: "
                   f"**{c['startup_seconds']:.2f} s** (target < 0.3 s each)")
    if "cold_burst" in r:
        b = r["cold_burst"]
        out.append(f"\ncold burst: {b['requests']} concurrent requests over {b['credentials']} cold credentials → "
                   f"{b['ok']} × 200, **{b['fetches']:.0f} token fetches** (target: exactly {b['credentials']})")
    return "\n".join(out)


def table_header(out, *columns, gap=False):
    """A Markdown table's header and separator lines (after a blank line when `gap`)."""
    out.append(("\n" if gap else "") + "| " + " | ".join(columns) + " |")
    out.append("|" + "---|" * len(columns))


def throughput_table(t, out):
    table_header(out, "job", "requests/s", "p50 ms", "p99 ms", "CPU-s per 10k", "upstream conns per 10k")
    for name, row in t.items():
        cpu = f"{row['cpu_s_per_10k']:.2f}" if "cpu_s_per_10k" in row else "—"
        out.append(f"| {name} | {row['rps']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {cpu} | {row['upstream_conns_per_10k']:.2f} |")
    for kind in ["plain", "tls"]:
        s, n, d = t[f"sidecar {kind}"], t[f"nginx {kind}"], t[f"direct plain"]
        added = lambda row: row["p99_ms"] - d["p99_ms"]
        out.append(f"\n{kind} upstream: sidecar/nginx throughput **{s['rps'] / n['rps']:.2f}×** (target ≥ 1.2); "
                   f"added p99 over direct {added(s):.2f} ms vs nginx {added(n):.2f} ms "
                   f"(**{added(s) / max(added(n), 1e-3):.2f}×**, target ≤ 0.8)")


def latency_table(rows, out):
    if "skipped" in rows:
        out.append(f"\nopen-loop latency: skipped ({rows['skipped']})")
        return
    table_header(out, "job", "rate/s", "answered", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", gap=True)
    for name, runs in rows.items():
        for row in runs:
            out.append(f"| {name} | {row['rate']} | {row['ok']} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
                       f"{row['p99_ms']:.2f} | {row['p99.9_ms']:.2f} |")


def instructions_table(rows, out):
    if "skipped" in rows:
        out.append(f"\ninstructions per request: skipped ({rows['skipped']})")
        return
    table_header(out, "job (under callgrind)", "requests", "user-space instructions per request", gap=True)
    for name, row in rows.items():
        out.append(f"| {name} | {row['requests']} | {row['instructions_per_request']:.0f} |")
    plain = rows["sidecar plain"]["instructions_per_request"]
    ratio = plain / rows["nginx plain"]["instructions_per_request"]
    out.append(f"\nsidecar/nginx user-space instructions per request: **{ratio:.2f}×** (the kernel's half of the "
               "CPU is not counted: see CPU-s per 10k above)")
    for name, label in [("sidecar plain, baseline build", "this build vs the baseline build, tracing off"),
                        ("sidecar plain, traced (100% sampled)", "tracing on (100% sampled) vs off"),
                        ("sidecar plain, traced (10% sampled)", "tracing on (10% sampled) vs off")]:
        if name in rows:
            other = rows[name]["instructions_per_request"]
            change = (plain / other - 1) if "baseline" in name else (other / plain - 1)
            out.append(f"\n{label}: **{change * 100:+.1f}%** instructions per request")


def memory_table(rows, out):
    table_header(out, "credentials", "RSS configured MB", "RSS all tokens cached MB", "idle CPU, % of a core", gap=True)
    for row in rows:
        out.append(f"| {row['credentials']} | {row['rss_configured_kb'] / 1024:.1f} | {row['rss_cached_kb'] / 1024:.1f} | "
                   f"{row.get('idle_cpu_percent', float('nan')):.1f} |")
    first = rows[0]
    last = next((row for row in rows if row["credentials"] == 10000), rows[-1])
    added = (last["rss_cached_kb"] - first["rss_cached_kb"]) / 1024
    out.append(f"\n{last['credentials']} credentials cached: **+{added:.1f} MB** over one (target ≤ +16 MB at 10k); "
               f"idle RSS **{first['rss_configured_kb'] / 1024:.1f} MB** (target ≤ 10 MB)")


def routing_table(rows, out):
    table_header(out, "routes", "requests/s to the last route", "p99 ms", gap=True)
    for row in rows:
        out.append(f"| {row['routes']} | {row['rps']:.0f} | {row['p99_ms']:.2f} |")
    first, last = rows[0], rows[-1]
    out.append(f"\nlast of {last['routes']} routes vs last of {first['routes']}: **{last['rps'] / first['rps']:.2f}×** (target ≥ 0.9)")


def main():
    mode_name = sys.argv[1] if len(sys.argv) > 1 else "quick"
    mode = MODES[mode_name]
    work = Work()
    try:
        started = time.monotonic()
        results = {
            "mode": mode_name,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.release()}",
            "git": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        }
        sections = {
            "throughput": lambda: throughput(work, mode),
            "latency": lambda: latency(work, mode["rates"], mode["seconds"]),
            "routing": lambda: routing(work, mode["routes"], mode["seconds"]),
            "check": lambda: check_time(work),
            "cold_burst": lambda: cold_burst(work),
            "memory": lambda: memory(work, mode["creds"]),
            "instructions": lambda: instructions(work),
        }
        wanted = sys.argv[2:] or list(sections)
        for name in wanted:
            results[name] = sections[name]()
        results["seconds"] = time.monotonic() - started
    finally:
        work.close()
    text = table(results)
    print(text)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    stem = os.path.join(ROOT, "bench", "results", f"{results['date'][:19].replace(':', '')}-{mode_name}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=2)
    if isinstance(results.get("latency"), dict) and "sidecar" in results["latency"]:
        latency_svg(results["latency"], stem + "-latency.svg")
    with open(stem + ".md", "w") as f:
        f.write(f"# {mode_name} run, {results['date']}, {results['machine']}, commit {results['git']}\n\n{text}\n")
    print(f"\n({results['seconds']:.0f} s; written to {stem}.json and .md)")


if __name__ == "__main__":
    main()
