#!/usr/bin/env bash
# A soak of key-authority (not part of CI): high VerifyKey load on two replicas sharing one
# PostgreSQL database, with a steady mix of management calls beside it, for 10 minutes.
#
#   bench/soak.sh                      # 10 minutes of load, about 11 after the release build
#   SOAK_DURATION=1m bench/soak.sh     # a quick check
#
# Settings (environment): SOAK_DURATION (10m), SOAK_INTERVAL (the reported interval, 1m),
# SOAK_KEYS (200, the verified set, half issued on each replica), SOAK_LOOPS (32 closed VerifyKey
# loops, half on each replica), SOAK_MANAGEMENT_EVERY (1s: one management cycle of about a dozen
# calls), SOAK_WORKERS (loadgen's tokio workers, 2), SOAK_OUT (target/bench).
#
# What it does:
#   1. cargo build --release (key-authority and loadgen), and runs copies of the binaries;
#   2. starts a throwaway PostgreSQL cluster in a temp dir (as the `postgres` user when root);
#   3. starts replicas A and B on it, unpinned, with tokio's default workers (as deployed);
#   4. runs `loadgen soak` against both: it issues the verified set, verifies each key once on
#      each replica, then runs the VerifyKey loops and the management cycle for SOAK_DURATION,
#      reading each replica's VmRSS (/proc/PID/status) at the start, at the end of every
#      interval, in the middle and at the end; afterwards it waits past a usage flush and checks
#      every key's total_requests against the VALID answers it saw;
#   5. writes target/bench/soak.md: errors, resident memory, VerifyKey p50/p99 per interval,
#      usage exactness, and the CPU that other processes used meanwhile ("foreign" CPU, sampled
#      every second by the monitor of lib.sh). The soak does not wait for a quiet machine:
#      foreign CPU moves its latencies, never its errors, memory or counts.
# Exits 1 when a check failed (an error, a usage count off, memory not flat). Every server and
# the cluster are stopped, and the temp dir removed, on exit. Only 127.0.0.1 is used.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DURATION=${SOAK_DURATION:-10m}
INTERVAL=${SOAK_INTERVAL:-1m}
KEYS=${SOAK_KEYS:-200}
LOOPS=${SOAK_LOOPS:-32}
MANAGEMENT_EVERY=${SOAK_MANAGEMENT_EVERY:-1s}
WORKERS=${SOAK_WORKERS:-2}
OUT=${SOAK_OUT:-$ROOT/target/bench}
FOREIGN_MAX=15
ROOT_PID=$$

LOG_TAG=soak
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

log "building release binaries"
cargo build --release -p key-authority -p loadgen

WORK=$(mktemp -d /tmp/key-authority-soak.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$OUT"
declare -A PIDS=()
PG_STARTED=0
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$AS_ROOT" = 1 ] && chown postgres: "$WORK"
# Run copies, so a rebuild in the work tree during the run cannot swap the binaries under us.
SERVER=$WORK/key-authority
LOADGEN=$WORK/loadgen
cp "$ROOT/target/release/key-authority" "$SERVER"
cp "$ROOT/target/release/loadgen" "$LOADGEN"
cpu_monitor >"$WORK/cpu.log" 2>/dev/null &
PIDS[monitor]=$!
start_postgres

ADMIN_TOKEN=soak-admin-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export LOADGEN_ADMIN_TOKEN=$ADMIN_TOKEN
A_PORT=$(free_port)
B_PORT=$(free_port)
rm -f "$OUT"/server-soak-*.log
start_server soak-A "$A_PORT" "" "" "$DB_URL"
start_server soak-B "$B_PORT" "" "" "$DB_URL"

REPORT=$OUT/soak.md
command=("$LOADGEN" --workers "$WORKERS" --loops-per-connection 8 soak
    --targets "127.0.0.1:$A_PORT,127.0.0.1:$B_PORT"
    --server-pids "${PIDS[soak-A]},${PIDS[soak-B]}"
    --duration "$DURATION" --interval "$INTERVAL" --keys "$KEYS" --verify-loops "$LOOPS"
    --management-every "$MANAGEMENT_EVERY" --foreign-cpu-log "$WORK/cpu.log")
{
    echo "# key-authority soak, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr)"
    echo "- $(rustc --version), $("$PG_BIN/postgres" --version)"
    echo "- commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- replicas A and B: unpinned, tokio's default workers, default flags; loadgen unpinned, $WORKERS workers; PostgreSQL unpinned; all on the same $(nproc) cores"
    echo
    echo '```'
    echo "${command[*]//$WORK\//}"
    echo '```'
} >"$REPORT"
log "${command[*]}"
status=0
"${command[@]}" >"$WORK/soak.out" || status=$?
cat "$WORK/soak.out" >>"$REPORT"
cat "$WORK/soak.out"
[ "$status" = 0 ] || die "loadgen soak failed (exit $status)"
log "report written to $REPORT"
if grep -q '| MISSED |' "$WORK/soak.out"; then
    log "a soak check failed: see the report"
    exit 1
fi
