#!/usr/bin/env bash
# What putting the key authority in front of an API costs at nginx (README.md, "Gateways"), in one
# run: wrk against nginx on 127.0.0.1, in alternating phases,
#   (a) a small static file, no auth at all;
#   (b) the same file behind auth_request to the key authority's forward auth, with a warm valid
#       key: deploy/gateways/nginx.conf as documented, its `proxy_pass` to the API replaced by
#       the static file (`return 200` would answer before the access phase, so a file it is).
# nginx (one worker) and a release key-authority on SQLite share core 0; wrk runs on core 1.
# Prints requests/s and latency p50/p99 per phase and the ratio b/a.
#
#   bash bench/gateway.sh
#   PAIRS=3 DURATION=10s CONNECTIONS=16 bash bench/gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

LOG_TAG=gateway
WORK=$(mktemp -d /tmp/key-authority-gateway-bench.XXXXXX)
chmod 755 "$WORK"
ROOT_PID=$$
declare -A PIDS=()
PG_STARTED=0
OUT=${BENCH_OUT:-$ROOT/target/bench}
mkdir -p "$OUT"
# shellcheck source=bench/lib.sh
source bench/lib.sh
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in wrk buf taskset curl; do
    command -v "$tool" >/dev/null || die "$tool is needed (wrk: Debian wrk; buf: pip install buf-bin)"
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || die "nginx is needed (Debian nginx-light: it has auth_request)"

PAIRS=${PAIRS:-2}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-16}

log "building the release server"
cargo build --release --locked -p key-authority --bin key-authority >&2
# A copy, so a rebuild in the work tree during the run cannot swap the binary under us.
cp target/release/key-authority "$WORK/key-authority"

ADMIN_TOKEN=gateway-bench-admin
GRPC_PORT=$(free_port)
AUTH_PORT=$(free_port)
taskset -c 0 env KEY_AUTHORITY_ADMIN_TOKEN="$ADMIN_TOKEN" "$WORK/key-authority" serve \
    --listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$AUTH_PORT" \
    --database-url "sqlite://$WORK/keys.db" >"$OUT/gateway-server.log" 2>&1 &
PIDS[server]=$!
for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$AUTH_PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fs "http://127.0.0.1:$AUTH_PORT/healthz" >/dev/null || die "the key authority did not start (see $OUT/gateway-server.log)"

# nginx: the documented file, with the API replaced by a static file, plus a plain server for (a).
mkdir -p "$WORK/www" "$WORK/nginx"
printf '{"orders":[{"id":1,"total":"9.99"},{"id":2,"total":"12.50"}]}\n' >"$WORK/www/orders.json"
PLAIN_PORT=$(free_port)
GUARDED_PORT=$(free_port)
sed -e "s/127\.0\.0\.1:8081/127.0.0.1:$AUTH_PORT/" \
    -e "s/listen 8080;/listen 127.0.0.1:$GUARDED_PORT;/" \
    -e "s#proxy_pass http://protected_api;#root $WORK/www;#" \
    deploy/gateways/nginx.conf >"$WORK/nginx/site.conf"
grep -q "root $WORK/www;" "$WORK/nginx/site.conf" || die "deploy/gateways/nginx.conf changed: update bench/gateway.sh"
user=""
[ "$(id -u)" = 0 ] && user="user root;"
cat >"$WORK/nginx/nginx.conf" <<EOF
$user
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/client_body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    server {
        listen 127.0.0.1:$PLAIN_PORT;
        location / { root $WORK/www; }
    }
    include $WORK/nginx/site.conf;
}
EOF
taskset -c 0 "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" \
    -g 'daemon off;' >>"$WORK/nginx/error.log" 2>&1 &
PIDS[nginx]=$!

SECRET=$(buf curl --protocol grpc --http2-prior-knowledge \
    -H "authorization: Bearer $ADMIN_TOKEN" \
    -d '{"workspace_id": "bench", "name": "nginx gateway"}' \
    "http://127.0.0.1:$GRPC_PORT/keyauthority.v1.KeyService/IssueKey" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["secret"])')

PLAIN_URL="http://127.0.0.1:$PLAIN_PORT/orders.json"
GUARDED_URL="http://127.0.0.1:$GUARDED_PORT/orders.json"
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
for _ in $(seq 1 100); do
    [ "$(code "$PLAIN_URL")" = 200 ] && break
    sleep 0.1
done
[ "$(code "$PLAIN_URL")" = 200 ] || die "nginx does not serve the file: $(cat "$WORK/nginx/error.log")"
[ "$(code "$GUARDED_URL")" = 401 ] || die "the guarded file is served without a key"
# The first check of a key runs argon2; every later one is warm.
[ "$(code -H "Authorization: Bearer $SECRET" "$GUARDED_URL")" = 200 ] || die "the valid key is refused"

# wrk's summary of one phase as "RPS p50 p99 non-2xx" (latencies in µs).
wrk_phase() {
    taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$@" | wrk_summary
}

# Other processes on these cores (other people's builds) distort the figures: sample their CPU
# use (lib.sh's monitor) and print it beside each phase.
# Each phase first waits (up to QUIET_WAIT s) until they are quiet.
QUIET_WAIT=${QUIET_WAIT:-120}
FOREIGN_MAX=${FOREIGN_MAX:-15}
cpu_monitor >"$WORK/cpu.log" &
PIDS[monitor]=$!
sleep 3

log "measuring: $PAIRS pairs of $DURATION phases, $CONNECTIONS connections"
echo
echo "## nginx: a static file, without auth (a) and behind auth_request with a warm key (b)"
echo
echo "nginx $("$NGINX" -v 2>&1 | sed 's#.*/##'), 1 worker, and key-authority (release, SQLite) on core 0;"
echo "wrk -t1 -c$CONNECTIONS -d$DURATION on core 1; HTTP/1.1 keep-alive; $(nproc) cores."
echo
echo "| pair | phase | RPS | p50 µs | p99 µs | non-2xx | other processes' CPU, % of a core |"
echo "|---|---|---|---|---|---|---|"
ratios=()
quiet=()
for pair in $(seq 1 "$PAIRS"); do
    wait_quiet
    from=$(date +%s)
    read -r a_rps a_p50 a_p99 a_bad < <(wrk_phase "$PLAIN_URL")
    to=$(date +%s)
    a_foreign=$(foreign_average "$from" "$to")
    echo "| $pair | (a) no auth | $a_rps | $a_p50 | $a_p99 | $a_bad | $a_foreign |"
    wait_quiet
    from=$(date +%s)
    read -r b_rps b_p50 b_p99 b_bad < <(wrk_phase -H "Authorization: Bearer $SECRET" "$GUARDED_URL")
    to=$(date +%s)
    b_foreign=$(foreign_average "$from" "$to")
    echo "| $pair | (b) auth_request | $b_rps | $b_p50 | $b_p99 | $b_bad | $b_foreign |"
    ratio=$(awk -v a="$a_rps" -v b="$b_rps" 'BEGIN { printf "%.3f", b / a }')
    ratios+=("$ratio")
    if awk -v a="$a_foreign" -v b="$b_foreign" -v max="$FOREIGN_MAX" 'BEGIN { exit !(a <= max && b <= max) }'; then
        quiet+=("$ratio")
    fi
done
echo
echo "b/a requests/s per pair: ${ratios[*]}; in pairs where other processes stayed under" \
    "$FOREIGN_MAX % of a core: ${quiet[*]:-none}"
