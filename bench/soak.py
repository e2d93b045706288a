#!/usr/bin/env python3
"""A chaos soak of token-sidecar, on loopback only, bounded in time.

Three sidecars (the release binary) share one redis-server. Stand-in token endpoints of the
four seed shapes (Nuapay, Setu, the booking API, PayU) and an RFC 6749 one issue 10 s tokens; an
upstream checks every token it gets: issued by that endpoint, unexpired, not revoked, for the
merchant of the request's path. An open-loop load at a fixed rate goes over many credentials,
half on kept-alive connections and half on new ones. Meanwhile, overlapping:

- a reload every 10 s on every sidecar (the file rewritten, then POST /config/reload),
  alternating configs, one in four invalid, one in four rotating a secret file;
- Redis SIGKILLed every 3 minutes (once in the short run) and restarted 20 s later;
- the token endpoints flapping for 15 s of every 60 s: 503 with `Retry-After: 2`, 3 s answers,
  garbage JSON, dropped connections (each endpoint its own kind);
- an upstream 401 burst: every token of ten merchants revoked;
- one sidecar SIGSTOPped for 5 s; one restarted.

Each failed request is classified, and marked *explained* when an injected fault that no
fallback could serve accounts for it (its sidecar stopped or restarting; its credential's
endpoint down, or just back within the time a probe takes) — otherwise **not explained**.

  python3 bench/soak.py                  # the short run (< 3 min): asserts only invariants
  python3 bench/soak.py --minutes 60     # the hour; JSON into bench/results/

Invariants (the exit code): 0 expired tokens sent, 0 tokens the endpoints never issued, 0
tokens for another merchant, 0 unexplained failures, and per sidecar RSS and open file
descriptors flat: the last minute's mean within 1.5x + 10 MB (RSS) and 1.5x + 16 (fds; pooled
connections come and go with bursts) of the first minute's. Nothing about time is asserted.
"""

import argparse
import base64
import collections
import datetime
import http.client
import json
import os
import queue
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("TOKEN_SIDECAR_BINARY", os.path.join(ROOT, "target", "release", "token-sidecar"))
SHAPES = ["nuapay", "setu", "booking", "payu", "rfc6749"]
LIFETIME = 10.0
FAULT_KINDS = ["503", "slow", "garbage", "drop"]
# After an endpoint's fault ends, how long a 503 is still explained: the last probe may fail just
# as the fault ends, and the next comes at most max_probe_interval (5 s) later (or the
# provider's Retry-After of 2 s), plus that probe's own round trip and a margin.
RECOVERY_ALLOWANCE = 8.0
NUAPAY_KEY = "soak-nuapay-api-key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now():
    return time.time()


# --- the stand-ins ---------------------------------------------------------------------------


class World:
    """What the stand-ins issued, what the upstream saw, and the faults in force."""

    def __init__(self, merchants):
        self.lock = threading.Lock()
        self.merchants = merchants  # name -> shape
        self.secrets = {m: {"secret-" + m} for m in merchants}
        self.tokens = {}  # token -> [merchant, shape, expires, revoked]
        self.fetches = collections.Counter()  # merchant -> fetches answered with a token
        self.endpoint_requests = collections.Counter()  # shape -> requests
        self.faults = {}  # shape -> kind, while in force
        self.sent = collections.Counter()  # ok, expired, revoked, unknown, wrong_merchant
        self.revoked_at = {}  # merchant -> when its tokens were revoked

    def issue(self, merchant, shape):
        token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        if shape in ("nuapay", "setu", "booking"):
            issued = now()
            claims = {"sub": merchant, "iat": issued, "exp": issued + LIFETIME}
            payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
            token = "eyJhbGciOiJub25lIn0.%s.%s" % (payload, token[:16])
        with self.lock:
            self.tokens[token] = [merchant, shape, now() + LIFETIME, False]
            self.fetches[merchant] += 1
        return token

    def check(self, token, merchant):
        with self.lock:
            entry = self.tokens.get(token)
            if entry is None:
                verdict = "unknown"
            elif entry[3]:
                verdict = "revoked"
            elif now() > entry[2]:
                verdict = "expired"
            elif entry[0] != merchant:
                verdict = "wrong_merchant"
            else:
                verdict = "ok"
            self.sent[verdict] += 1
        return verdict

    def revoke(self, merchants):
        with self.lock:
            for entry in self.tokens.values():
                if entry[0] in merchants:
                    entry[3] = True
            for merchant in merchants:
                self.revoked_at[merchant] = now()


def tls_context(certs):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.path.join(certs, "server.pem"), os.path.join(certs, "server.key"))
    return context


class Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        return self.rfile.read(int(self.headers.get("content-length") or 0))


def endpoint_handler(world):
    class Endpoint(Quiet):
        def do_POST(self):
            raw = self.body()
            path = self.path
            shape = (
                "nuapay" if path.startswith("/organisations/") else
                {"/auth/token": "setu", "/api/oauth/token": "booking", "/oauth/token": "payu",
                 "/rfc/token": "rfc6749"}.get(path)
            )
            if shape is None:
                return self.answer(404, {"error": "not_found"})
            if path.endswith("/revoke"):
                return self.answer(200, {"data": {"status": "REVOKED"}})
            with world.lock:
                world.endpoint_requests[shape] += 1
                fault = world.faults.get(shape)
            if fault == "503":
                return self.answer(503, {"error": "temporarily_unavailable"}, [("retry-after", "2")])
            if fault == "garbage":
                return self.answer(200, b"{\"access_token\": not json")
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault == "slow":
                time.sleep(3)
            merchant = self.authenticate(shape, raw)
            if merchant is None:
                return self.answer(401, {"error": "invalid_client"})
            token = world.issue(merchant, shape)
            if shape == "nuapay":
                issued = int(now() * 1000)
                return self.answer(201, {"data": {"id": token[-12:], "accessToken": token,
                                                  "expiryTime": issued + int(LIFETIME * 1000),
                                                  "createdTimestamp": issued}})
            if shape == "setu":
                return self.answer(200, {"accessToken": token})
            return self.answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": LIFETIME})

        def authenticate(self, shape, raw):
            if shape == "nuapay":
                expected = "Basic " + base64.b64encode((NUAPAY_KEY + ":").encode()).decode()
                if self.headers.get("authorization") != expected:
                    return None
                org = self.path.split("/")[2]
                return org if org in world.merchants else None
            if shape == "rfc6749":
                try:
                    kind, value = self.headers.get("authorization", "").split(" ", 1)
                    client, secret = base64.b64decode(value).decode().split(":", 1)
                except ValueError:
                    return None
                client, secret = urllib.parse.unquote(client), urllib.parse.unquote(secret)
            elif shape == "booking":
                fields = json.loads(raw or b"{}")
                client, secret = fields.get("client_id"), fields.get("client_secret")
            else:
                fields = urllib.parse.parse_qs(raw.decode())
                client = fields.get("client_id", [None])[0]
                secret = fields.get("client_secret", [None])[0]
            with world.lock:
                return client if secret in world.secrets.get(client, ()) else None

    return Endpoint


def upstream_handler(world):
    class Upstream(Quiet):
        def do_GET(self):
            self.body()
            parts = self.path.split("/")
            merchant = parts[2] if len(parts) > 2 and parts[1] == "up" else None
            token = (self.headers.get("authorization") or "").removeprefix("Bearer ")
            verdict = world.check(token, merchant)
            if verdict != "ok":
                return self.answer(401, {"error": "invalid_token", "verdict": verdict},
                                   [("www-authenticate", 'Bearer error="invalid_token"')])
            return self.answer(200, {"ok": True})

        do_POST = do_GET

    return Upstream


def serve(handler, certs):
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.socket = tls_context(certs).wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return port


def make_certs(directory):
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    ca_key, ca = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.pem")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=soak-ca", "-keyout", ca_key, "-out", ca)
    key, csr = os.path.join(directory, "server.key"), os.path.join(directory, "server.csr")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", key, "-out", csr)
    ext = os.path.join(directory, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
            "-extfile", ext, "-out", os.path.join(directory, "server.pem"))


# --- the sidecars and Redis ------------------------------------------------------------------


def config_text(variant, ports, merchants, redis_port):
    """One of the configs the reloads alternate between ('a', 'b'; 'invalid' is broken)."""
    if variant == "invalid":
        return "[server]\nlisten = \"127.0.0.1:%d\"\nlisten_typo = true\n" % ports["listen"]
    key = base64.b64encode(b"\x05" * 32).decode()
    ep = "https://127.0.0.1:%d" % ports["endpoint"]
    lines = [
        "[server]",
        'listen = "127.0.0.1:%d"' % ports["listen"],
        'admin_listen = "127.0.0.1:%d"' % ports["admin"],
        "access_log = false",
        "[tls]",
        'ca_file = "ca.pem"',
        "[cache.shared]",
        'redis_url = "redis://127.0.0.1:%d"' % redis_port,
        'encryption_key = "%s"' % key,
        'key_prefix = "soak:"',
        "[providers.nuapay]", 'kind = "nuapay"', 'base_url = "%s"' % ep, 'api_key = "%s"' % NUAPAY_KEY,
        'expires_in = "10s"',
        "[providers.setu]", 'token_url = "%s/auth/token"' % ep, 'token_field = "/accessToken"',
        'default_ttl = "15m"',
        "[providers.booking]", 'token_url = "%s/api/oauth/token"' % ep, 'body = "json"',
        "[providers.payu]", 'token_url = "%s/oauth/token"' % ep,
        "[providers.rfc6749]", 'token_url = "%s/rfc/token"' % ep, 'client_auth = "basic"',
    ]
    for merchant, shape in merchants.items():
        lines += ["[credentials.%s]" % merchant, 'provider = "%s"' % shape]
        if shape == "nuapay":
            lines += ['organisation = "%s"' % merchant, 'scopes = ["openbanking_pisp"]']
        else:
            secret = '{ file = "secrets/%s" }' % merchant if merchant == ROTATED else '"secret-%s"' % merchant
            lines += ['client_id = "%s"' % merchant, "client_secret = %s" % secret]
            if shape == "payu":
                lines.append('scopes = ["create_payment_links"]')
        lines += ["[[routes]]", 'path_prefix = "/%s"' % merchant,
                  'upstream = "https://127.0.0.1:%d/up/%s"' % (ports["upstream"], merchant),
                  'credential = "%s"' % merchant]
        if variant == "b":
            lines.append('headers = { "x-soak-variant" = "b" }')
    return "\n".join(lines) + "\n"


ROTATED = "m3"


class Sidecar:
    def __init__(self, index, work, ports, certs):
        self.index = index
        self.dir = os.path.join(work, "sidecar-%d" % index)
        os.makedirs(os.path.join(self.dir, "secrets"), exist_ok=True)
        shutil.copy(os.path.join(certs, "ca.pem"), self.dir)
        self.ports = ports
        self.process = None
        self.samples = []  # (t, rss_kb, fds)

    def write(self, text):
        staging = os.path.join(self.dir, "sidecar.toml.staging")
        with open(staging, "w") as f:
            f.write(text)
        os.rename(staging, os.path.join(self.dir, "sidecar.toml"))

    def write_secret(self, merchant, secret):
        with open(os.path.join(self.dir, "secrets", merchant), "w") as f:
            f.write(secret + "\n")

    def start(self):
        log = open(os.path.join(self.dir, "sidecar.log"), "ab")
        self.process = subprocess.Popen(
            [BINARY, "run", "--log-format", "json", "--config", os.path.join(self.dir, "sidecar.toml")],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "TOKEN_SIDECAR_LOG": "warn"})
        deadline = now() + 20
        while now() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.ports["admin"]), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sidecar %d did not start" % self.index)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def sockets(self):
        """The sidecar's open sockets by what they are connected to."""
        if not self.process or self.process.poll() is not None:
            return {}
        pid = self.process.pid
        inodes = set()
        try:
            for fd in os.listdir("/proc/%d/fd" % pid):
                target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            return {}
        names = {self.ports["listen"]: "clients", self.ports["admin"]: "admin clients",
                 self.ports["upstream"]: "upstream", self.ports["endpoint"]: "token endpoint",
                 self.ports.get("redis"): "redis"}
        kinds = collections.Counter()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    rows = f.readlines()[1:]
            except OSError:
                continue
            for row in rows:
                fields = row.split()
                if fields[9] not in inodes:
                    continue
                local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
                if fields[3] == "0A":
                    kinds["listening"] += 1
                else:
                    kinds[names.get(remote) or names.get(local) or "other"] += 1
        return dict(kinds)

    def sample(self):
        if not self.process or self.process.poll() is not None:
            return
        pid = self.process.pid
        try:
            with open("/proc/%d/status" % pid) as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            fds = len(os.listdir("/proc/%d/fd" % pid))
        except (OSError, StopIteration):
            return
        self.samples.append((now(), rss, fds))

    def admin(self, method, path):
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["admin"], timeout=15)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


class Redis:
    def __init__(self, work):
        self.port = free_port()
        self.dir = os.path.join(work, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = now() + 10
        while now() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self):
        if self.process:
            self.process.kill()
            self.process.wait()
            self.process = None


# --- the load ----------------------------------------------------------------------------


Result = collections.namedtuple("Result", "sent done sidecar merchant status code error kept")


class Load:
    """Open-loop: a request every 1/rate s whatever the answers, each timed from when it was
    due (so a slow answer cannot hide the requests it delays)."""

    def __init__(self, rate, sidecars, merchants, workers=48):
        self.rate, self.sidecars, self.merchants = rate, sidecars, list(merchants)
        self.jobs = queue.Queue()
        self.results = []
        self.lock = threading.Lock()
        self.stopping = False
        self.stale_retries = 0
        self.workers = [threading.Thread(target=self.work, daemon=True) for _ in range(workers)]

    def run(self, until):
        for worker in self.workers:
            worker.start()
        interval, due, n = 1.0 / self.rate, now(), 0
        while due < until:
            delay = due - now()
            if delay > 0:
                time.sleep(delay)
            sidecar = self.sidecars[n % len(self.sidecars)]
            merchant = self.merchants[random.randrange(len(self.merchants))]
            self.jobs.put((due, sidecar, merchant, n % 2 == 0))
            due += interval
            n += 1
        self.stopping = True

    def work(self):
        kept = {}
        while True:
            try:
                due, sidecar, merchant, keep = self.jobs.get(timeout=1)
            except queue.Empty:
                if self.stopping:
                    return
                continue
            status, code, error = 0, None, None
            conn = kept.get(sidecar.index) if keep else None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", sidecar.ports["listen"], timeout=12)
                    reused = False
                else:
                    reused = True
                try:
                    conn.request("GET", "/%s/payments" % merchant)
                    response = conn.getresponse()
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    if not reused:
                        raise
                    # A kept-alive connection the server closed as it was reused: sent again on a
                    # new one, as HTTP clients do for an idempotent request (urllib3, reqwest).
                    with self.lock:
                        self.stale_retries += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", sidecar.ports["listen"], timeout=12)
                    conn.request("GET", "/%s/payments" % merchant)
                    response = conn.getresponse()
                response.read()
                status = response.status
                code = response.getheader("x-token-sidecar-error")
                if keep and not response.will_close:
                    kept[sidecar.index] = conn
                else:
                    conn.close()
                    kept.pop(sidecar.index, None)
            except (OSError, http.client.HTTPException) as err:
                error = type(err).__name__
                kept.pop(sidecar.index, None)
                try:
                    conn.close()
                except Exception:
                    pass
            with self.lock:
                self.results.append(Result(due, now(), sidecar.index, merchant, status, code, error, keep))


# --- the schedule and the verdicts ---------------------------------------------------------


class Timeline:
    def __init__(self):
        self.events = []  # (start, end, kind, target)
        self.lock = threading.Lock()

    def add(self, start, end, kind, target):
        with self.lock:
            self.events.append((start, end, kind, target))

    def explains(self, result, merchants):
        shape = merchants[result.merchant]
        for start, end, kind, target in self.events:
            if kind in ("sigstop", "restart") and target == result.sidecar:
                if result.sent <= end + 2 and result.done >= start - 0.5:
                    return kind
            if kind == "endpoint" and target[0] == shape and result.code == "token_unavailable":
                if result.done >= start and result.sent <= end + RECOVERY_ALLOWANCE:
                    return "endpoint %s" % target[1]
        return None


COMMIT_AT_START = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip()


def run(args):
    if shutil.which("redis-server") is None:
        print("SKIPPED bench/soak.py: redis-server is not installed (apt-get install redis-server)")
        return 0
    if not os.path.exists(BINARY):
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    duration = args.minutes * 60 if args.minutes else args.seconds
    short = not args.minutes
    work = tempfile.mkdtemp(prefix="token-sidecar-soak-")
    certs = os.path.join(work, "certs")
    os.makedirs(certs)
    make_certs(certs)
    merchants = {"m%d" % i: SHAPES[i % len(SHAPES)] for i in range(args.merchants)}
    world = World(merchants)
    endpoint = serve(endpoint_handler(world), certs)
    upstream = serve(upstream_handler(world), certs)
    redis = Redis(work)
    redis.start()
    sidecars = []
    for i in range(3):
        ports = {"listen": free_port(), "admin": free_port(), "endpoint": endpoint, "upstream": upstream,
                 "redis": redis.port}
        sidecar = Sidecar(i, work, ports, certs)
        sidecar.write_secret(ROTATED, "secret-" + ROTATED)
        sidecar.write(config_text("a", ports, merchants, redis.port))
        sidecar.start()
        sidecars.append(sidecar)

    timeline = Timeline()
    started = now()
    until = started + duration
    stop = threading.Event()

    def at(offset):
        return started + offset

    def sleep_until(t):
        while now() < t and not stop.is_set():
            time.sleep(min(0.2, max(0, t - now())))
        return not stop.is_set()

    reloads = collections.Counter()

    def reloading():
        n = 0
        while sleep_until(at(10 * (n + 1))):
            step = ["a", "b", "invalid", "rotate"][n % 4]
            variant = "a" if step == "rotate" else step
            if step == "rotate":
                secret = "secret-%s-%d" % (ROTATED, n)
                with world.lock:
                    world.secrets[ROTATED].add(secret)
                for sidecar in sidecars:
                    sidecar.write_secret(ROTATED, secret)
            for sidecar in sidecars:
                sidecar.write(config_text(variant, sidecar.ports, merchants, redis.port))
                try:
                    status, _ = sidecar.admin("POST", "/config/reload")
                except OSError:
                    status = 0
                reloads["%s:%d" % (step, status)] += 1
            n += 1

    def periodic(first, period, length, fault):
        """Runs `fault(t, k)` at `first + k * period` s while a `length` s fault still fits the run."""
        k = 0
        while True:
            t = at(first + period * k)
            if t + length > until or not sleep_until(t):
                return
            fault(t, k)
            k += 1

    def redis_fault(kill, _):
        redis.kill()
        sleep_until(kill + 20)
        redis.start()
        timeline.add(kill, now(), "redis", None)

    def endpoint_fault(start, k):
        kinds = {shape: FAULT_KINDS[(k + j) % len(FAULT_KINDS)] for j, shape in enumerate(SHAPES)}
        with world.lock:
            world.faults.update(kinds)
        sleep_until(start + 15)
        with world.lock:
            world.faults.clear()
        for shape, kind in kinds.items():
            timeline.add(start, now(), "endpoint", (shape, kind))

    def revocation(t, _):
        victims = random.sample(sorted(merchants), 10)
        world.revoke(victims)
        timeline.add(t, t, "revoke", tuple(victims))

    def sigstop(t, _):
        target = sidecars[1]
        target.process.send_signal(signal.SIGSTOP)
        sleep_until(t + 5)
        target.process.send_signal(signal.SIGCONT)
        timeline.add(t, now(), "sigstop", 1)

    def restart(t, _):
        target = sidecars[2]
        target.stop()
        target.start()
        timeline.add(t, now(), "restart", 2)

    faults = [
        lambda: periodic(30, 180, 20, redis_fault),
        lambda: periodic(15, 60, 15, endpoint_fault),
        lambda: periodic(100, 120, 10, revocation),
        lambda: periodic(110, 300, 5, sigstop),
        lambda: periodic(140, 420, 10, restart),
    ]

    def sampling():
        while sleep_until(now() + 5):
            for sidecar in sidecars:
                sidecar.sample()

    threads = [threading.Thread(target=f, daemon=True)
               for f in [reloading, sampling, *faults]]
    for thread in threads:
        thread.start()
    load = Load(args.rate, sidecars, merchants)
    print("soak: %d s, %d requests/s over 3 sidecars, %d credentials (10 s tokens), work dir %s"
          % (duration, args.rate, len(merchants), work), flush=True)
    load.run(until)
    stop.set()
    time.sleep(8)  # the last requests finish
    for thread in threads:
        thread.join(timeout=30)
    sockets = {}
    for sidecar in sidecars:
        sidecar.sample()
        sockets["sidecar %d" % sidecar.index] = sidecar.sockets()
        sidecar.stop()
    redis.kill()

    report = summarize(load.results, timeline, world, sidecars, merchants, started, duration, reloads, args)
    report["sockets_at_the_end"] = sockets
    report["stale_keep_alive_retries"] = load.stale_retries
    print_report(report)
    if args.minutes or args.json:
        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%S")
        path = os.path.join(ROOT, "bench", "results", "%s-soak-%dm.json" % (stamp, duration // 60))
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print("soak: results in %s" % os.path.relpath(path, ROOT))
    if report["invariants"]["held"]:
        shutil.rmtree(work, ignore_errors=True)
        return 0
    print("soak: INVARIANTS BROKEN (work dir kept: %s)" % work)
    return 1


def failure_class(result):
    if result.error:
        return "connection:" + result.error
    if result.code:
        return "%d %s" % (result.status, result.code)
    return "%d from the upstream" % result.status


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def peaks_by_minute(samples, started, duration):
    """The largest RSS (MB) sampled in each minute of the run; None for a minute with no sample."""
    peaks = []
    for minute in range(int(duration // 60)):
        rss = [s[1] for s in samples if started + 60 * minute <= s[0] < started + 60 * (minute + 1)]
        peaks.append(round(max(rss) / 1024, 1) if rss else None)
    return peaks


def summarize(results, timeline, world, sidecars, merchants, started, duration, reloads, args):
    minutes = collections.defaultdict(lambda: {"requests": 0, "latency": [], "failures": collections.Counter()})
    failures = collections.Counter()
    unexplained = []
    for result in results:
        minute = int((result.sent - started) // 60)
        bucket = minutes[minute]
        bucket["requests"] += 1
        bucket["latency"].append(result.done - result.sent)
        if result.status == 200:
            continue
        why = timeline.explains(result, merchants)
        label = "%s (%s)" % (failure_class(result), "explained: " + why if why else "NOT explained")
        bucket["failures"][label] += 1
        failures[label] += 1
        if not why:
            record = result._asdict()
            record["sent_s"] = round(result.sent - started, 2)
            record["done_s"] = round(result.done - started, 2)
            record["shape"] = merchants[result.merchant]
            unexplained.append(record)
    per_minute = []
    for minute in sorted(minutes):
        bucket = minutes[minute]
        per_minute.append({
            "minute": minute + 1,
            "requests": bucket["requests"],
            "p50_ms": round(percentile(bucket["latency"], 0.5) * 1000, 1),
            "p99_ms": round(percentile(bucket["latency"], 0.99) * 1000, 1),
            "failures": dict(bucket["failures"]),
        })
    latency = [r.done - r.sent for r in results]
    lifetimes = duration / LIFETIME
    fetches = {m: world.fetches[m] for m in merchants}
    footprint = {}
    flat = True
    for sidecar in sidecars:
        first = [s for s in sidecar.samples if s[0] < started + 60]
        last = [s for s in sidecar.samples if s[0] >= started + duration - 60]
        if not first or not last:
            continue
        rss_first = statistics.mean(s[1] for s in first) / 1024
        rss_last = statistics.mean(s[1] for s in last) / 1024
        fds_first = statistics.mean(s[2] for s in first)
        fds_last = statistics.mean(s[2] for s in last)
        ok = rss_last <= rss_first * 1.5 + 10 and fds_last <= fds_first * 1.5 + 16
        flat &= ok
        footprint["sidecar %d" % sidecar.index] = {
            "rss_mb_first_minute": round(rss_first, 1), "rss_mb_last_minute": round(rss_last, 1),
            "fds_first_minute": round(fds_first, 1), "fds_last_minute": round(fds_last, 1), "flat": ok,
            # A leak climbs minute after minute; a high-water mark (a burst's buffers kept by the
            # allocator) steps up at a fault and stays.
            "rss_mb_peak_by_minute": peaks_by_minute(sidecar.samples, started, duration)}
    sent = dict(world.sent)
    invariants = {
        "expired_tokens_sent": sent.get("expired", 0),
        "unknown_tokens_sent": sent.get("unknown", 0),
        "tokens_for_another_merchant": sent.get("wrong_merchant", 0),
        "unexplained_failures": len(unexplained),
        "rss_and_fds_flat": flat,
    }
    invariants["held"] = (invariants["expired_tokens_sent"] == 0 and invariants["unknown_tokens_sent"] == 0
                          and invariants["tokens_for_another_merchant"] == 0
                          and invariants["unexplained_failures"] == 0 and flat)
    return {
        "command": "python3 bench/soak.py" + (" --minutes %d" % args.minutes if args.minutes else ""),
        "binary": os.path.relpath(BINARY, ROOT),
        # HEAD when the soak started (the binary may be another build: TOKEN_SIDECAR_BINARY).
        "commit": COMMIT_AT_START,
        "seconds": duration,
        "rate": args.rate,
        "credentials": len(merchants),
        "requests": len(results),
        "p50_ms": round(percentile(latency, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latency, 0.99) * 1000, 1),
        "failures": dict(failures),
        "unexplained": unexplained[:50],
        "tokens_sent_by_verdict": sent,
        "token_fetches": sum(fetches.values()),
        "token_fetches_per_credential_per_lifetime": round(sum(fetches.values()) / len(merchants) / lifetimes, 2),
        "endpoint_requests": dict(world.endpoint_requests),
        "reloads": dict(reloads),
        "faults": [{"start_s": round(s - started, 1), "end_s": round(e - started, 1), "kind": k,
                    "target": t if not isinstance(t, tuple) else list(t)} for s, e, k, t in timeline.events],
        "footprint": footprint,
        "per_minute": per_minute,
        "invariants": invariants,
    }


def print_report(report):
    print()
    print("| minute | requests | p50 ms | p99 ms | failures |")
    print("|---|---|---|---|---|")
    for minute in report["per_minute"]:
        failures = "; ".join("%s × %d" % (k, v) for k, v in sorted(minute["failures"].items())) or "—"
        print("| %d | %d | %s | %s | %s |" % (minute["minute"], minute["requests"], minute["p50_ms"],
                                              minute["p99_ms"], failures))
    print()
    print("total: %d requests, p50 %s ms, p99 %s ms; tokens sent by verdict %s; %d token fetches (%s per credential per 10 s lifetime); reloads %s"
          % (report["requests"], report["p50_ms"], report["p99_ms"], report["tokens_sent_by_verdict"],
             report["token_fetches"], report["token_fetches_per_credential_per_lifetime"], report["reloads"]))
    for label, count in sorted(report["failures"].items()):
        print("  %6d  %s" % (count, label))
    print("  stale keep-alive connections retried: %s; sockets at the end: %s"
          % (report.get("stale_keep_alive_retries"), report.get("sockets_at_the_end")))
    for record in report["unexplained"][:10]:
        print("  unexplained: %s" % {k: record[k] for k in ("sent_s", "done_s", "sidecar", "merchant", "shape", "status", "code", "error")})
    for name, figures in report["footprint"].items():
        print("  %s: RSS %s → %s MB, fds %s → %s" % (name, figures["rss_mb_first_minute"], figures["rss_mb_last_minute"],
                                                     figures["fds_first_minute"], figures["fds_last_minute"]))
        print("    peak RSS by minute, MB: %s" % " ".join(str(p) for p in figures["rss_mb_peak_by_minute"]))
    print("invariants: %s" % json.dumps(report["invariants"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=int, default=0, help="the long run (e.g. 60); default: the short one")
    parser.add_argument("--seconds", type=int, default=150, help="the short run's length")
    parser.add_argument("--rate", type=int, default=300, help="requests a second over the three sidecars")
    parser.add_argument("--merchants", type=int, default=40, help="credentials (a fifth of each shape)")
    parser.add_argument("--json", action="store_true", help="also write the short run's JSON to bench/results/")
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
