#!/usr/bin/env bash
# Side-by-side throughput and latency: token-sidecar vs nginx doing the same job — plain HTTP in
# on loopback, an Authorization header added, forwarded over keep-alive TLS to the same upstream
# (nginx serving a small JSON answer, and a token endpoint for the sidecar). The sidecar's token
# is cached after the first request, so this measures the request path, not token fetching.
#
# Usage: bench/run.sh [seconds per run, default 10] [connections, default 32]
# Prints each run and the sidecar/nginx ratios. Runs alternate (A B A B) because shared
# machines are noisy; compare ratios, not absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
CONNECTIONS=${2:-32}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk || ! need openssl; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx-light wrk openssl >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --quiet
WORK=$(mktemp -d)
stop_all() {
  kill $(jobs -p) 2>/dev/null || true
  for part in upstream proxy; do
    [ -f "$WORK/$part/nginx.pid" ] && "$NGINX" -p "$WORK/$part" -c "$WORK/$part/nginx.conf" -s stop 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap stop_all EXIT

# A CA and a certificate for 127.0.0.1.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bench CA" \
  -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' > "$WORK/san.ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 2 -extfile "$WORK/san.ext" -out "$WORK/server.pem" 2>/dev/null

mkdir -p "$WORK/upstream" "$WORK/proxy"
common() { # prefix → shared nginx settings
  cat <<NGINX
error_log $1/error.log warn;
pid $1/nginx.pid;
events { worker_connections 4096; }
NGINX
}
temp_paths() { echo "client_body_temp_path $1/body; proxy_temp_path $1/proxy; fastcgi_temp_path $1/fcgi; uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;"; }

# The upstream: a partner API and its token endpoint, over TLS (HTTP/1.1: what nginx proxies
# with, so both proxies do the same job). One nginx of its own, shared by both runs.
cat > "$WORK/upstream/nginx.conf" <<NGINX
worker_processes 1;
$(common "$WORK/upstream")
http {
  access_log off;
  $(temp_paths "$WORK/upstream")
  server {
    listen 127.0.0.1:18443 ssl;
    ssl_certificate $WORK/server.pem;
    ssl_certificate_key $WORK/server.key;
    keepalive_requests 1000000;
    location /oauth/token { default_type application/json; return 200 '{"access_token":"bench-token","expires_in":3600}'; }
    location / { default_type application/json; return 200 '{"status":"ok","payments":[]}'; }
  }
}
NGINX

# The baseline: nginx as the injecting proxy, with as many workers as the sidecar has threads.
cat > "$WORK/proxy/nginx.conf" <<NGINX
worker_processes $(nproc);
$(common "$WORK/proxy")
http {
  access_log off;
  $(temp_paths "$WORK/proxy")
  upstream partner { server 127.0.0.1:18443; keepalive 64; }
  server {
    listen 127.0.0.1:18081;
    keepalive_requests 1000000;
    location /api/ {
      proxy_pass https://partner/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer bench-token";
      proxy_ssl_trusted_certificate $WORK/ca.pem;
      proxy_ssl_verify on;
      proxy_ssl_name 127.0.0.1;
      proxy_ssl_session_reuse on;
    }
  }
}
NGINX
"$NGINX" -p "$WORK/upstream" -c "$WORK/upstream/nginx.conf"
"$NGINX" -p "$WORK/proxy" -c "$WORK/proxy/nginx.conf"

cat > "$WORK/sidecar.toml" <<TOML
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19901"
[tls]
ca_file = "$WORK/ca.pem"
[providers.partner]
token_url = "https://127.0.0.1:18443/oauth/token"
[credentials.bench]
provider = "partner"
client_id = "bench"
client_secret = "bench-secret"
[[routes]]
path_prefix = "/api"
upstream = "https://127.0.0.1:18443"
credential = "bench"
TOML
TOKEN_SIDECAR_LOG=warn target/release/token-sidecar run --config "$WORK/sidecar.toml" &
for _ in $(seq 50); do curl -sf http://127.0.0.1:19901/healthz >/dev/null && break; sleep 0.1; done
curl -sS --fail-with-body -o /dev/null http://127.0.0.1:18080/api/payments   # warm the token cache
curl -sS --fail-with-body -o /dev/null http://127.0.0.1:18081/api/payments

run() { # name url → "rps p50_ms p99_ms"
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$2" | awk -v name="$1" '
    /Requests\/sec/ { rps = $2 }
    /^ +50%/ { p50 = $2 } /^ +99%/ { p99 = $2 }
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    END { printf "%s %.0f %.3f %.3f\n", name, rps, ms(p50), ms(p99) }'
}
RESULTS=$WORK/results
for round in 1 2; do
  run sidecar http://127.0.0.1:18080/api/payments | tee -a "$RESULTS"
  run nginx http://127.0.0.1:18081/api/payments | tee -a "$RESULTS"
done
awk '
  { rps[$1] += $2; p50[$1] += $3; p99[$1] += $4; n[$1]++ }
  END {
    printf "\nmean of %d runs each   requests/s   p50 ms   p99 ms\n", n["sidecar"]
    for (k in n) printf "%-20s %12.0f %8.3f %8.3f\n", k, rps[k]/n[k], p50[k]/n[k], p99[k]/n[k]
    printf "\nsidecar/nginx: throughput %.2f, p50 latency %.2f, p99 latency %.2f\n",
      (rps["sidecar"]/n["sidecar"]) / (rps["nginx"]/n["nginx"]),
      (p50["sidecar"]/n["sidecar"]) / (p50["nginx"]/n["nginx"]),
      (p99["sidecar"]/n["sidecar"]) / (p99["nginx"]/n["nginx"])
  }' "$RESULTS"
