#!/usr/bin/env bash
# Warm-path cost of verify tokens and of tracing: one pinned server per variant, same loadgen.
set -u
# Usage: cargo build --release -p key-authority -p loadgen && bench/warm-variants.sh
mkdir -p "${OUT:-/tmp/ka-warm-variants}"
bin=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release}
run() {
  name=$1; shift
  rm -f ${OUT:-/tmp/ka-warm-variants}/$name.db*
  env "$@" KEY_AUTHORITY_ADMIN_TOKEN=bench taskset -c 0 $bin/key-authority serve --listen 127.0.0.1:50999 \
    --database-url sqlite://${OUT:-/tmp/ka-warm-variants}/$name.db 2>${OUT:-/tmp/ka-warm-variants}/$name.log &
  pid=$!
  sleep 1
  tok=""
  [ -n "${VERIFY:-}" ] && tok="--verify-token $VERIFY"
  taskset -c 1 $bin/loadgen warm --target 127.0.0.1:50999 --admin-token bench $tok --duration 4s --concurrency 1,16,64 > ${OUT:-/tmp/ka-warm-variants}/$name.out 2>&1
  kill -TERM $pid; wait $pid
}
VERIFY= run baseline KA_X=1
VERIFY=svc-token run token KEY_AUTHORITY_VERIFY_TOKENS=svc-token
VERIFY= run tracing1pct OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01
