#!/usr/bin/env bash
# Benchmarks: token-sidecar against nginx doing the same job, side by side in one run, and the
# sidecar's costs at scale (memory per credential, routing cost per route, `check` time, the
# cold burst). See bench/harness.py for what each job does.
#
# Usage: bench/run.sh [quick|full]    quick: ~2 minutes; full: 15 s runs, 3 rounds, up to 100k credentials
# Prints a Markdown table; raw JSON and the table go to bench/results/. It asserts nothing about
# timings: compare ratios from one run, not absolute numbers (these machines are shared).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-quick}
case "$MODE" in quick|full) ;; *) echo "usage: bench/run.sh [quick|full]" >&2; exit 2 ;; esac

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx && [ ! -x /usr/sbin/nginx ] || ! need wrk || ! need openssl || ! need taskset || ! need valgrind; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx-light wrk openssl util-linux valgrind >/dev/null
fi
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"
# Open-loop latency with coordinated-omission correction: oha (not packaged in Debian).
if ! need oha; then
  cargo install --locked --quiet oha || echo "oha did not install: open-loop latency is skipped" >&2
fi
if [ "$(nproc)" -lt 2 ]; then
  echo "bench/run.sh pins the client and the proxy to separate cores: it needs 2" >&2
  exit 2
fi
cargo build --release --quiet
exec python3 bench/harness.py "$MODE"
