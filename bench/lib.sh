# Shared by bench/run.sh and bench/soak.sh (sourced, never run): logging, a throwaway PostgreSQL
# cluster, free ports, servers, the foreign-CPU monitor and the clean-up on exit.
#
# The sourcing script sets, before calling these functions:
#   LOG_TAG   the word in front of every log line (bench, soak)
#   WORK      a temp dir (mktemp -d), removed on exit; ROOT_PID the script's own pid ($$)
#   OUT       where reports and server logs go
#   SERVER    the key-authority binary to run; ADMIN_TOKEN the KeyService admin token
#   FOREIGN_MAX, QUIET_WAIT   (foreign_seconds, wait_quiet)
# and declares `declare -A PIDS=()` (servers and helpers to stop on exit) and PG_STARTED=0.

log() { printf '[%s %s] %s\n' "${LOG_TAG:-bench}" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

pg_bin_dir() {
    if [ -n "${KEY_AUTHORITY_PG_BIN:-}" ]; then
        echo "$KEY_AUTHORITY_PG_BIN"
        return
    fi
    local dir
    dir=$(pg_config --bindir 2>/dev/null || true)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
        echo "$dir"
        return
    fi
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] || die "no PostgreSQL binaries found (set KEY_AUTHORITY_PG_BIN)"
    echo "$dir"
}
PG_BIN=$(pg_bin_dir)
AS_ROOT=0
[ "$(id -u)" = 0 ] && AS_ROOT=1

# PostgreSQL refuses to run as root: as root, run its binaries as the postgres user.
pg() {
    local program=$1
    shift
    if [ "$AS_ROOT" = 1 ]; then
        runuser -u postgres -- "$PG_BIN/$program" "$@"
    else
        "$PG_BIN/$program" "$@"
    fi
}

free_port() {
    local port
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "no free port found"
}

# Other people's builds and tests on these 2 cores ruin latency figures. A monitor samples, once
# a second, the CPU time of user-space processes outside the calling script's process tree and
# our PostgreSQL cluster ("foreign" CPU, in % of one core), as `<unix seconds> <percent>` lines.
cpu_monitor() {
    # A vanished /proc entry must not end the monitor (it runs in its own subshell).
    set +e +o pipefail
    local prev=$WORK/ticks.prev current=$WORK/ticks.current postmaster
    : >"$prev"
    while sleep 1; do
        postmaster=$(head -n 1 "$WORK/pg/postmaster.pid" 2>/dev/null || echo -1)
        # One line per process: pid (comm) state ppid ... with utime and stime the 12th and 13th
        # fields after the comm's closing parenthesis. Foreign CPU is the CPU time, in ticks
        # (1/100 s, so % of one core per second), of every other user-space process: whoever
        # exits between two samples is missed, so our own exits never count as foreign.
        cat /proc/[0-9]*/stat 2>/dev/null | awk -v root="$ROOT_PID" \
            -v postmaster="$postmaster" -v prevfile="$prev" -v currentfile="$current" \
            -v now="$(date +%s)" '
            BEGIN { while ((getline line < prevfile) > 0) { split(line, kv, " "); before[kv[1]] = kv[2] } }
            /^[0-9]+ \(/ {
                pid = $1; rest = $0; sub(/^.*\) /, "", rest); split(rest, f, " ")
                parent[pid] = f[2]; ticks[pid] = f[12] + f[13]
            }
            END {
                foreign = 0
                for (pid in ticks) {
                    p = pid; mine = 0
                    for (depth = 0; depth < 64 && p > 0; depth++) {
                        # Ours, PostgreSQL'"'"'s, or a kernel thread (a child of kthreadd, pid 2).
                        if (p == root || p == postmaster || p == 2) { mine = 1; break }
                        if (!(p in parent)) break
                        p = parent[p]
                    }
                    if (!mine) { d = ticks[pid] - ((pid in before) ? before[pid] : 0); if (d > 0) foreign += d }
                    print pid, ticks[pid] > currentfile
                }
                print "sampled", 1 > currentfile
                if ("sampled" in before) print now, foreign
            }'
        mv "$current" "$prev"
    done
}

# Seconds in [FROM, TO] whose foreign CPU exceeded FOREIGN_MAX.
foreign_seconds() {
    awk -v from="$1" -v to="$2" -v max="$FOREIGN_MAX" \
        '$1 >= from && $1 <= to && $2 > max { n++ } END { print n + 0 }' "$WORK/cpu.log"
}

# Average foreign CPU (% of a core) over [FROM, TO].
foreign_average() {
    awk -v from="$1" -v to="$2" \
        '$1 >= from && $1 <= to { sum += $2; n++ } END { printf "%.1f", n ? sum / n : 0 }' "$WORK/cpu.log"
}

# Waits until the last 3 seconds were quiet, for at most QUIET_WAIT seconds.
wait_quiet() {
    local waited=0 now
    while :; do
        now=$(date +%s)
        if [ "$(wc -l <"$WORK/cpu.log")" -ge 3 ] && [ "$(foreign_seconds $((now - 3)) "$now")" = 0 ]; then
            return
        fi
        if [ "$waited" -ge "$QUIET_WAIT" ]; then
            log "the machine is still busy after ${QUIET_WAIT}s: measuring anyway (see the report)"
            return
        fi
        [ "$waited" = 0 ] && log "waiting for other processes' CPU use to stop before measuring"
        sleep 2
        waited=$((waited + 2))
    done
}

# Stops every server and helper in PIDS and the cluster, keeps the CPU log, removes WORK.
cleanup() {
    local status=$?
    set +e
    for name in "${!PIDS[@]}"; do
        kill -TERM "${PIDS[$name]}" 2>/dev/null
    done
    for name in "${!PIDS[@]}"; do
        wait "${PIDS[$name]}" 2>/dev/null
    done
    if [ "$PG_STARTED" = 1 ]; then
        pg pg_ctl -D "$WORK/pg" -m fast -w stop >/dev/null 2>&1
    fi
    cp "$WORK/cpu.log" "$OUT/foreign-cpu.log" 2>/dev/null
    rm -rf "$WORK"
    exit "$status"
}

# start_postgres: a throwaway cluster in $WORK/pg on a free port, with a database keyauthority;
# sets PG_PORT and DB_URL.
start_postgres() {
    PG_PORT=$(free_port)
    log "starting PostgreSQL ($PG_BIN) on 127.0.0.1:$PG_PORT in $WORK"
    pg initdb -D "$WORK/pg" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
    pg pg_ctl -D "$WORK/pg" -l "$WORK/pg.log" -w -t 60 start -o \
        "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $WORK -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        >/dev/null
    PG_STARTED=1
    pg createdb -h 127.0.0.1 -p "$PG_PORT" -U postgres keyauthority
    DB_URL="postgres://postgres@127.0.0.1:$PG_PORT/keyauthority"
}

# start_server NAME PORT CORE WORKERS DATABASE_URL [VAR=VALUE...]: CORE and WORKERS may be empty
# (unpinned, tokio's default worker count); the rest is extra environment for the server.
start_server() {
    local name=$1 port=$2 core=$3 workers=$4 url=$5
    shift 5
    local command=("$SERVER" serve --listen "127.0.0.1:$port" --database-url "$url")
    [ -n "$core" ] && command=(taskset -c "$core" "${command[@]}")
    local environment=(KEY_AUTHORITY_ADMIN_TOKEN="$ADMIN_TOKEN" "$@")
    [ -n "$workers" ] && environment+=(TOKIO_WORKER_THREADS="$workers")
    env "${environment[@]}" "${command[@]}" >>"$OUT/server-$name.log" 2>&1 &
    PIDS[$name]=$!
    log "server $name on 127.0.0.1:$port (pid ${PIDS[$name]}, cores ${core:-all}, workers ${workers:-default})"
}

stop_server() {
    local name=$1
    kill -TERM "${PIDS[$name]}" 2>/dev/null || true
    wait "${PIDS[$name]}" 2>/dev/null || true
    unset "PIDS[$name]"
}

# wrk_summary: wrk's `--latency` report on stdin as one line "RPS p50 p99 non-2xx" (latencies in
# µs), for bench/gateway.sh and bench/gateway-checks.sh.
wrk_summary() {
    awk '
        function us(v) { if (v ~ /us$/) return v+0; if (v ~ /ms$/) return v*1000; if (v ~ /s$/) return v*1000000; return v }
        /Requests\/sec/ { rps = $2 }
        /^ +50%/ { p50 = us($2) }
        /^ +99%/ { p99 = us($2) }
        /Non-2xx/ { bad = $NF }
        END { printf "%.0f %.0f %.0f %s\n", rps, p50, p99, (bad == "" ? 0 : bad) }'
}
