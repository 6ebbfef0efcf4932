#!/usr/bin/env bash
# Runs the key-authority benchmarks on this machine and writes a report (see BENCHMARKS.md).
#
#   bench/run.sh                     # everything: about 2 minutes after the release build on a
#                                    # quiet machine (phases wait for and retry around others)
#   BENCH_DURATION=2s bench/run.sh   # shorter load phases, for a quick look
#   BENCH_PHASES="warm flood" bench/run.sh   # only some of: warm h2load tracing cold flood
#                                            # memory throughput propagation local scale
#
# What it does:
#   1. cargo build --release (key-authority and loadgen), and runs copies of the binaries;
#   2. starts a throwaway PostgreSQL cluster in a temp dir (as the `postgres` user when root);
#   3. starts replica A pinned to core 0 (one tokio worker) and replica B (unpinned) on it;
#   4. latency: loadgen pinned to core 1 (one worker) runs warm, cold and flood against A
#      (`loadgen all` runs the same three in one go; separate runs retry separately);
#   4b. h2load (C, pinned to core 1) against A: alternating Check / VerifyKey pairs;
#   4c. tracing: servers P (no tracing) and Q (OTLP export at a 1 % sampler, to a port where no
#      collector listens), both pinned to core 0, loaded alternately by loadgen on core 1;
#   5. throughput: a fresh server T, unpinned with default workers, loaded by an unpinned
#      loadgen with 2 workers (warm only);
#   6. propagation: RevokeKey on A, VerifyKey on B until REVOKED (loadgen pinned to core 1);
#   6a. local: loadgen's LocalVerifier (pinned to core 1) connected to B, changes made on A: a warm
#      key verified in process vs VerifyKey over gRPC, and how fast revocations, disablings,
#      updates and rotations reach it;
#   6b. memory: server M (unpinned) flooded for a minute; resident memory and threads before,
#      right after, and after the negative-cache TTL;
#   7. scale: server S (pinned like A) on a fresh database; 1k then 1M rows in api_key, cold
#      VerifyKey at each (loadgen pinned to core 1).
# Each phase waits until no other process uses the CPU, and is run again (BENCH_ATTEMPTS,
# default 3) when one did during it. Every server and the cluster are stopped,
# and the temp dir removed, on exit. Only 127.0.0.1 is used. The report goes to
# target/bench/report.md (BENCH_OUT to change).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DURATION=${BENCH_DURATION:-5s}
WARMUP=${BENCH_WARMUP:-1s}
ROUNDS=${BENCH_ROUNDS:-200}
PROPAGATION_BUDGET=${BENCH_PROPAGATION_BUDGET:-90s}
SIZES=${BENCH_SIZES:-1000,1000000}
MEMORY_FLOOD=${BENCH_MEMORY_FLOOD:-60s}
MEMORY_SETTLE=${BENCH_MEMORY_SETTLE:-70s}
PAIRS=${BENCH_PAIRS:-5}
PHASES=${BENCH_PHASES:-warm h2load tracing cold flood memory throughput propagation local scale}
OUT=${BENCH_OUT:-$ROOT/target/bench}
SERVER_CORE=0
LOADGEN_CORE=1

LOG_TAG=bench
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

command -v taskset >/dev/null || die "taskset (util-linux) is required"
[ "$(nproc)" -ge 2 ] || die "pinning needs at least 2 cores, this machine has $(nproc)"

# --- build -------------------------------------------------------------------------------------
log "building release binaries"
cargo build --release -p key-authority -p loadgen

# Each phase waits until the machine is quiet (at most BENCH_QUIET_WAIT seconds; see cpu_monitor
# in lib.sh), and is run again when foreign CPU went above BENCH_FOREIGN_MAX % of a core for a
# second during it.
QUIET_WAIT=${BENCH_QUIET_WAIT:-300}
FOREIGN_MAX=${BENCH_FOREIGN_MAX:-15}
ROOT_PID=$$

WORK=$(mktemp -d /tmp/key-authority-bench.XXXXXX)
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

# --- servers -----------------------------------------------------------------------------------
ADMIN_TOKEN=bench-admin-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export LOADGEN_ADMIN_TOKEN=$ADMIN_TOKEN

A_PORT=$(free_port)
B_PORT=$(free_port)
T_PORT=$(free_port)
S_PORT=$(free_port)
A=127.0.0.1:$A_PORT
B=127.0.0.1:$B_PORT
T=127.0.0.1:$T_PORT
S=127.0.0.1:$S_PORT
rm -f "$OUT"/server-*.log
start_server A "$A_PORT" "$SERVER_CORE" 1 "$DB_URL"
start_server B "$B_PORT" "" "" "$DB_URL"

REPORT=$OUT/report.md
{
    echo "# key-authority benchmark run, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr)"
    echo "- $(rustc --version), $("$PG_BIN/postgres" --version)"
    echo "- commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- servers A and S: taskset -c $SERVER_CORE, TOKIO_WORKER_THREADS=1; B: unpinned; T: unpinned, default workers; PostgreSQL unpinned"
} >"$REPORT"

# loadgen CORE WORKERS ARGS...: runs loadgen (pinned to CORE unless empty) and notes the command.
loadgen() {
    local core=$1 workers=$2
    shift 2
    local command=("$LOADGEN" --workers "$workers" "$@")
    [ -n "$core" ] && command=(taskset -c "$core" "${command[@]}")
    echo "${command[*]//$WORK\//}" >>"$WORK/commands"
    log "${command[*]}"
    "${command[@]}"
}

# phase NAME TITLE FUNCTION: runs FUNCTION (which calls loadgen) and appends its output to the
# report, if NAME is in BENCH_PHASES.
# When other builds ran during it, the attempt is discarded and the phase run again, up to
# BENCH_ATTEMPTS times; the last attempt is kept either way, with a warning.
ATTEMPTS=${BENCH_ATTEMPTS:-3}
phase() {
    local name=$1 title=$2 function=$3 attempt=1 started ended busy
    case " $PHASES " in
        *" $name "*) ;;
        *) log "skipping $name (not in BENCH_PHASES)"; return 0 ;;
    esac
    while :; do
        wait_quiet
        : >"$WORK/commands"
        started=$(date +%s)
        "$function" >"$WORK/phase.out" || { cat "$WORK/phase.out"; die "$title failed"; }
        ended=$(date +%s)
        busy=$(foreign_seconds "$started" "$ended")
        if [ "$busy" = 0 ] || [ "$attempt" -ge "$ATTEMPTS" ]; then
            break
        fi
        log "$title: other processes used more than $FOREIGN_MAX % of a core during $busy s of it: discarding this attempt"
        attempt=$((attempt + 1))
    done
    {
        echo
        echo "# $title"
        echo
        echo '```'
        cat "$WORK/commands"
        echo '```'
        cat "$WORK/phase.out"
        echo
        echo "CPU used outside the benchmark during this phase: $(foreign_average "$started" "$ended") % of a core on average (attempt $attempt)."
        if [ "$busy" != 0 ]; then
            echo "WARNING: other processes used more than $FOREIGN_MAX % of a core during $busy s of this phase: its figures are suspect."
        fi
    } | tee -a "$REPORT"
}

LOOPS=(--duration "$DURATION" --warmup "$WARMUP")

# 1-3. Latency: A on core 0, loadgen on core 1 (three phases, so that a build that disturbs one
#      costs only that one a re-run).
warm_pinned() {
    loadgen "$LOADGEN_CORE" 1 warm --target "$A" --server-pid "${PIDS[A]}" \
        --concurrency 1,16,64 --pairs "$PAIRS" "${LOOPS[@]}" || return 1
}
phase warm "Warm latency (server A on core $SERVER_CORE, loadgen on core $LOADGEN_CORE)" warm_pinned

# 1b. The same comparison by h2load (C; it reads no response, so the client's cost is the same
#     for both RPCs): 4 connections x 16 streams = c=64, PAIRS alternating pairs, median ratio.
h2load_rps() {
    # h2load BODY PATH: prints the measured requests per second ("finished in ..., N req/s").
    local output
    output=$(taskset -c "$LOADGEN_CORE" h2load -t 1 -c 4 -m 16 -D "${DURATION%s}" \
        --warm-up-time="${WARMUP%s}" -d "$1" -H 'content-type: application/grpc' \
        -H 'te: trailers' "http://$A$2") || return 1
    echo "$output" | grep -q ' 0 failed, 0 errored' || { echo "$output" >&2; return 1; }
    echo "$output" | sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p'
}
h2load_pairs() {
    command -v h2load >/dev/null || { echo "h2load not installed (Debian package nghttp2-client)"; return 1; }
    loadgen "$LOADGEN_CORE" 1 frames --target "$A" --out "$WORK/frames" >/dev/null || return 1
    echo "taskset -c $LOADGEN_CORE h2load -t 1 -c 4 -m 16 -D ${DURATION%s} --warm-up-time=${WARMUP%s} -d check.bin|verify.bin -H 'content-type: application/grpc' -H 'te: trailers' http://A/grpc.health.v1.Health/Check|/keyauthority.v1.VerifyService/VerifyKey" >>"$WORK/commands"
    echo
    echo "| pair | Check RPS | VerifyKey RPS | VerifyKey / Check |"
    echo "|---|---|---|---|"
    local ratios=() check verify pair
    for pair in $(seq 1 "$PAIRS"); do
        check=$(h2load_rps "$WORK/frames/check.bin" /grpc.health.v1.Health/Check) || return 1
        verify=$(h2load_rps "$WORK/frames/verify.bin" /keyauthority.v1.VerifyService/VerifyKey) || return 1
        ratios+=("$(awk -v v="$verify" -v c="$check" 'BEGIN { printf "%.3f", v / c }')")
        echo "| $pair | $check | $verify | ${ratios[-1]} |"
    done
    echo
    echo "Median VerifyKey / Check RPS over $PAIRS pairs: $(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }') (target: >= 0.95)."
    echo "(h2load counts HTTP answers; every answer was HTTP 200, and the warm key was VALID before the run.)"
}
phase h2load "h2load: warm VerifyKey vs Check (server A on core $SERVER_CORE, h2load on core $LOADGEN_CORE)" h2load_pairs

# 1c. Tracing: the same warm VerifyKey against P (no tracing) and Q (OTLP export, 1 % sampler;
#     nothing listens on the OTLP port, so exports fail in the background), alternately.
P_PORT=$(free_port)
Q_PORT=$(free_port)
tracing_pairs() {
    local otlp_port
    otlp_port=$(free_port)
    start_server P "$P_PORT" "$SERVER_CORE" 1 "$DB_URL"
    start_server Q "$Q_PORT" "$SERVER_CORE" 1 "$DB_URL" \
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$otlp_port" \
        OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01
    local status=0 pair plain traced ratios=()
    echo
    echo "| pair | VerifyKey RPS, no tracing (P) | VerifyKey RPS, tracing at 1 % (Q) | Q / P |"
    echo "|---|---|---|---|"
    for pair in $(seq 1 "$PAIRS"); do
        plain=$(loadgen "$LOADGEN_CORE" 1 warm --target "127.0.0.1:$P_PORT" --concurrency 64 \
            --pairs 1 "${LOOPS[@]}" | awk -F'|' '$5 ~ /VerifyKey/ { gsub(/ /, "", $6); print $6; exit }') || status=1
        traced=$(loadgen "$LOADGEN_CORE" 1 warm --target "127.0.0.1:$Q_PORT" --concurrency 64 \
            --pairs 1 "${LOOPS[@]}" | awk -F'|' '$5 ~ /VerifyKey/ { gsub(/ /, "", $6); print $6; exit }') || status=1
        [ -n "$plain" ] && [ -n "$traced" ] || { status=1; break; }
        ratios+=("$(awk -v t="$traced" -v p="$plain" 'BEGIN { printf "%.3f", t / p }')")
        echo "| $pair | $plain | $traced | ${ratios[-1]} |"
    done
    stop_server P
    stop_server Q
    [ "$status" = 0 ] || return 1
    echo
    echo "Median traced / untraced warm VerifyKey RPS over $PAIRS pairs (c=64): $(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }') (target: >= 0.95)."
}
phase tracing "Tracing at a 1 % sampler vs none (servers P and Q on core $SERVER_CORE, loadgen on core $LOADGEN_CORE)" tracing_pairs

cold() {
    loadgen "$LOADGEN_CORE" 1 cold --target "$A" --keys 200 || return 1
}
phase cold "Cold verify (server A on core $SERVER_CORE, loadgen on core $LOADGEN_CORE)" cold

flood() {
    loadgen "$LOADGEN_CORE" 1 flood --target "$A" --concurrency 16 --flood-concurrency 16 \
        --flood-keys 1000,8 "${LOOPS[@]}" || return 1
}
phase flood "Wrong-secret flood (server A on core $SERVER_CORE, loadgen on core $LOADGEN_CORE)" flood

# 3b. Memory: a fresh server M (unpinned, default workers, as deployed), flooded for a minute with
#     wrong secrets and unknown key ids; its resident memory and threads idle, right after, and
#     once the negative entries have expired.
M_PORT=$(free_port)
M=127.0.0.1:$M_PORT
memory() {
    start_server M "$M_PORT" "" "" "$DB_URL"
    local status=0
    loadgen "$LOADGEN_CORE" 1 memory --target "$M" --server-pid "${PIDS[M]}" \
        --flood-concurrency 32 --victims 1000 --flood-for "$MEMORY_FLOOD" \
        --settle "$MEMORY_SETTLE" || status=$?
    stop_server M
    return "$status"
}
phase memory "Memory and threads under a one-minute flood of wrong secrets and unknown key ids (server M unpinned)" memory

# 4. Throughput: a fresh server T and loadgen, both unpinned.
throughput() {
    start_server T "$T_PORT" "" "" "$DB_URL"
    local status=0
    loadgen "" 2 warm --target "$T" --server-pid "${PIDS[T]}" --concurrency 1,16,64 \
        --pairs "$PAIRS" "${LOOPS[@]}" || status=$?
    stop_server T
    return "$status"
}
phase throughput "Throughput (server T and loadgen unpinned, both free to use both cores): warm" throughput

# 5. Propagation: RevokeKey on A, VerifyKey on B until REVOKED.
propagation() {
    loadgen "$LOADGEN_CORE" 1 propagation --target "$A" --replica "$B" \
        --rounds "$ROUNDS" --time-budget "$PROPAGATION_BUDGET" || return 1
}
phase propagation "Propagation (RevokeKey on A, VerifyKey on B until REVOKED)" propagation

# 5b. The verifier inside the caller: LocalVerifier in loadgen (core 1) connected to B, changes
#     made on A.
local_verifier() {
    loadgen "$LOADGEN_CORE" 1 local --target "$B" --replica "$A" --duration "$DURATION" \
        --rounds "$ROUNDS" || return 1
}
phase local "The verifier inside the caller (LocalVerifier in loadgen on core $LOADGEN_CORE, connected to B; changes made on A)" local_verifier

# 6. Scale: a fresh database per attempt (the 1k size needs an almost empty table), server S
#    pinned like A.
SCALE_ATTEMPT=0
scale() {
    SCALE_ATTEMPT=$((SCALE_ATTEMPT + 1))
    local database=keyauthority_scale_$SCALE_ATTEMPT
    pg createdb -h 127.0.0.1 -p "$PG_PORT" -U postgres "$database" || return 1
    local url="postgres://postgres@127.0.0.1:$PG_PORT/$database" status=0
    start_server S "$S_PORT" "$SERVER_CORE" 1 "$url"
    loadgen "$LOADGEN_CORE" 1 scale --target "$S" --database-url "$url" --sizes "$SIZES" \
        --keys-per-size 100 || status=$?
    stop_server S
    return "$status"
}
phase scale "Scale (cold VerifyKey on S by rows in api_key)" scale

log "report written to $REPORT"
