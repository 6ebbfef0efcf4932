#!/usr/bin/env bash
# The gateways' own cost, in one run each (README.md, "Gateways"; BENCHMARKS.md):
#   1. Envoy ext_authz Check against VerifyKey of the same warm key (loadgen ext-authz, gRPC);
#   2. HTTP forward auth `/auth` with a warm key against `/healthz` on the same listener (wrk,
#      HTTP/1.1 keep-alive): what deciding costs over answering at all.
# A release server on SQLite pinned to core 0, the load generators on core 1.
#
#   bash bench/gateway-checks.sh
#   CONCURRENCY=1,16,64 PAIRS=5 DURATION=10s bash bench/gateway-checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is needed (Debian package wrk)" >&2; exit 1; }
command -v buf >/dev/null || { echo "buf is needed (pip install buf-bin)" >&2; exit 1; }
LOG_TAG=gateway-checks
WORK=$(mktemp -d)
ROOT_PID=$$
declare -A PIDS=()
PG_STARTED=0
# shellcheck source=bench/lib.sh
source bench/lib.sh

cargo build --release --locked --bin key-authority -p key-authority -p loadgen >&2
ADMIN_TOKEN=gateway-bench-admin
PORT=$(free_port)
HTTP_PORT=$(free_port)
taskset -c 0 target/release/key-authority serve \
    --listen "127.0.0.1:$PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    --database-url "sqlite://$WORK/keys.db" \
    --admin-token "$ADMIN_TOKEN" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"' EXIT

PAIRS=${PAIRS:-3}
DURATION=${DURATION:-5s}
LOADGEN_ADMIN_TOKEN=$ADMIN_TOKEN taskset -c 1 target/release/loadgen --workers 1 ext-authz \
    --target "127.0.0.1:$PORT" --concurrency "${CONCURRENCY:-1,16}" \
    --pairs "$PAIRS" --duration "$DURATION" --warmup 1s

SECRET=$(buf curl --protocol grpc --http2-prior-knowledge \
    -H "authorization: Bearer $ADMIN_TOKEN" \
    -d '{"workspace_id": "bench", "name": "forward auth"}' \
    "http://127.0.0.1:$PORT/keyauthority.v1.KeyService/IssueKey" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["secret"])')
warm=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $SECRET" \
    -H 'X-Original-URI: /v1/orders' "http://127.0.0.1:$HTTP_PORT/auth")
[ "$warm" = 200 ] || die "the warm-up check answered $warm"

# wrk's summary of one phase as "RPS p50 p99" (latencies in µs).
wrk_phase() {
    taskset -c 1 wrk -t1 -c"${WRK_CONNECTIONS:-16}" -d"$DURATION" --latency "$@" | wrk_summary
}

echo
echo "## forward auth: /auth with a warm key vs /healthz, HTTP/1.1, ${WRK_CONNECTIONS:-16} connections, $DURATION phases"
echo
echo "| pair | endpoint | RPS | p50 µs | p99 µs | non-2xx |"
echo "|---|---|---|---|---|---|"
ratios=()
for pair in $(seq 1 "$PAIRS"); do
    read -r h_rps h_p50 h_p99 h_bad < <(wrk_phase "http://127.0.0.1:$HTTP_PORT/healthz")
    echo "| $pair | /healthz | $h_rps | $h_p50 | $h_p99 | $h_bad |"
    read -r a_rps a_p50 a_p99 a_bad < <(wrk_phase -H "Authorization: Bearer $SECRET" \
        -H 'X-Original-URI: /v1/orders' "http://127.0.0.1:$HTTP_PORT/auth")
    echo "| $pair | /auth | $a_rps | $a_p50 | $a_p99 | $a_bad |"
    ratios+=("$(awk -v a="$a_rps" -v h="$h_rps" 'BEGIN { printf "%.3f", a / h }')")
done
echo
echo "/auth RPS / /healthz RPS per pair: ${ratios[*]} (median $(printf '%s\n' "${ratios[@]}" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'))"
