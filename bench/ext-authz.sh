#!/usr/bin/env bash
# Envoy ext_authz Check against VerifyKey of the same warm key, in one run (README.md, "Gateways",
# BENCHMARKS.md): a release server on SQLite pinned to core 0, the load generator on core 1.
#
#   bash bench/ext-authz.sh            # c=1 and c=16, 3 alternating pairs of 5 s phases
#   CONCURRENCY=1,16,64 PAIRS=5 bash bench/ext-authz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_TAG=ext-authz
WORK=$(mktemp -d)
ROOT_PID=$$
declare -A PIDS=()
PG_STARTED=0
# shellcheck source=bench/lib.sh
source bench/lib.sh

cargo build --release --locked --bin key-authority -p key-authority -p loadgen >&2
ADMIN_TOKEN=ext-authz-bench-admin
PORT=$(free_port)
taskset -c 0 target/release/key-authority serve \
    --listen "127.0.0.1:$PORT" \
    --database-url "sqlite://$WORK/keys.db" \
    --admin-token "$ADMIN_TOKEN" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"' EXIT
LOADGEN_ADMIN_TOKEN=$ADMIN_TOKEN taskset -c 1 target/release/loadgen --workers 1 ext-authz \
    --target "127.0.0.1:$PORT" \
    --concurrency "${CONCURRENCY:-1,16}" \
    --pairs "${PAIRS:-3}" --duration "${DURATION:-5s}" --warmup 1s
