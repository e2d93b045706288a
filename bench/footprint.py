#!/usr/bin/env python3
"""Memory and CPU of a running `token-sidecar dev`: idle, then under a keep-alive load.

    cargo build --release && python3 bench/footprint.py [seconds] [threads]

Starts the release binary's `dev` demo on free ports, reads VmRSS idle, drives GET requests
through the PayU route from `threads` keep-alive connections for `seconds`, and prints the
peak RSS (VmHWM), the requests served and the CPU seconds per 10,000 requests. The figures size
the Kubernetes example's resource requests (README, "Deploying").
"""
import http.client
import os
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("TOKEN_SIDECAR_BINARY", os.path.join(ROOT, "target", "release", "token-sidecar"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(parts[11]) + int(parts[12])) / ticks


def wait_ready(admin):
    for _ in range(200):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=1)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("the sidecar did not become ready")


def load(port, deadline, counts, index):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    served = 0
    while time.monotonic() < deadline:
        conn.request("GET", "/acme/payu/payment-links")
        response = conn.getresponse()
        response.read()
        if response.status == 200:
            served += 1
    counts[index] = served


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    port, admin = free_port(), free_port()
    child = subprocess.Popen(
        [BINARY, "dev", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(admin)
        time.sleep(1)
        idle = status(child.pid)["VmRSS"]
        cpu_before = cpu_seconds(child.pid)
        counts = [0] * threads
        deadline = time.monotonic() + seconds
        workers = [threading.Thread(target=load, args=(port, deadline, counts, i)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        cpu = cpu_seconds(child.pid) - cpu_before
        after = status(child.pid)
        served = sum(counts)
        print(f"idle RSS: {idle}")
        print(f"under load: {served} requests in {seconds:.0f} s over {threads} connections "
              f"({served / seconds:.0f}/s, client-bound: Python)")
        print(f"peak RSS (VmHWM): {after['VmHWM']}; RSS after: {after['VmRSS']}")
        print(f"CPU: {cpu:.2f} s, {cpu / max(served, 1) * 10000:.2f} CPU-seconds per 10k requests")
    finally:
        child.terminate()
        child.wait(timeout=15)


if __name__ == "__main__":
    main()
