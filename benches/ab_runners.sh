#!/usr/bin/env bash
# Two builds' runner processes drained back to back, alternating, on one
# PostgreSQL (BENCHMARKS.md, "Runner processes back to back"): what tells a
# gap between releases from this machine's noise, since both sides share
# every minute's load. For each configuration (batch, runners) it runs
# REPS pairs in the order A B, B A, A B, ...; each run seeds TASKS no-op
# tasks, starts the runners (`--noop --max-tasks <batch> --jitter-ms 0`),
# and measures tasks/s over the span of the finishes' own stamps (first to
# last finished_at), and from the first finish to the last open task seen
# by a watcher, the runners' CPU and all postgres processes' CPU per 1,000
# tasks (from /proc).
#
# What it keeps true: each build works its own database (each migrates its
# own SQL when it starts), the runners are stopped with SIGINT after each
# run, and a run that does not drain within 120 s is reported and skipped.
#
# Usage, from anywhere, with a PostgreSQL the caller started (superuser
# `postgres`, reachable on 127.0.0.1:$PGPORT) and one database per build:
#   PGPORT=5499 benches/ab_runners.sh DB_A "BIN_A run" DB_B "BIN_B run" [REPS]
# A build of protocol 1 takes `worker` instead of `run`. The server should
# run pg_stat_statements (if loaded) at its defaults: `track = all` or
# `track_planning = on` charge every nested statement, and protocol 2's
# get_work runs more of them than protocol 1's. Configurations:
# CONFIGS="tasks:batch:runners ..." (default: 30000:10:1 60000:10:4
# 100000:100:1 100000:100:4).
set -euo pipefail

db_a=$1 cmd_a=$2 db_b=$3 cmd_b=$4 reps=${5:-5}
port=${PGPORT:-5432}
configs=${CONFIGS:-"30000:10:1 60000:10:4 100000:100:1 100000:100:4"}
psql_in() { psql -h 127.0.0.1 -p "$port" -U postgres -qtA -d "$1" "${@:2}"; }
# Processes come and go while /proc is read: a vanished one is skipped.
pg_cpu() { { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk '$2=="(postgres)" {s+=$14+$15} END {print s}'; }

# One run: database, command, tasks, batch, runners.
run() {
    local db=$1 cmd=$2 n=$3 batch=$4 runners=$5 pids=() i c0 c1 p0 p1 span
    psql_in "$db" -c "TRUNCATE public.example_task RESTART IDENTITY CASCADE" \
        -c "DELETE FROM session_lock.session" \
        -c "INSERT INTO public.example_task (payload) SELECT 'noop' FROM generate_series(1, $n)" \
        -c "VACUUM ANALYZE public.example_task" >/dev/null
    # The drain is watched over one connection, not a psql started per
    # look: a process and a backend started twenty times a second cost
    # more CPU than a runner, on the same two cores.
    coproc POLL { psql -h 127.0.0.1 -p "$port" -U postgres -qtA -d "$db" 2>&1; }
    ask() {
        local line
        echo "$1" >&"${POLL[1]}"
        read -r -t 10 line <&"${POLL[0]}" || line=
        echo "$line"
    }
    for ((i = 0; i < runners; i++)); do
        # shellcheck disable=SC2086 # the command and its subcommand
        $cmd --database-url "postgres://postgres@127.0.0.1:$port/$db" --noop \
            --max-tasks "$batch" --jitter-ms 0 --name ab >/dev/null 2>&1 &
        pids+=($!)
    done
    # A runner that has exited counts 0 (the run is reported as usual).
    cpu() {
        local s=0 p t
        for p in "${pids[@]}"; do
            t=$(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null) || t=0
            s=$((s + ${t:-0}))
        done
        echo "$s"
    }
    local deadline=$((SECONDS + 120))
    until [ "$(ask "SELECT EXISTS (SELECT 1 FROM public.example_task WHERE finished_at IS NOT NULL);")" = t ]; do
        [ $SECONDS -lt $deadline ] || break
        sleep 0.01
    done
    c0=$(cpu) p0=$(pg_cpu)
    until [ "$(ask "SELECT NOT EXISTS (SELECT 1 FROM public.example_task WHERE finished_at IS NULL);")" = t ]; do
        [ $SECONDS -lt $deadline ] || break
        sleep 0.01
    done
    c1=$(cpu) p1=$(pg_cpu)
    # The drain's span as its finishes recorded it (each finish stamps
    # its transaction's start), not as the watcher saw it.
    span=$(ask "SELECT extract(epoch FROM max(finished_at) - min(finished_at)) FROM public.example_task;")
    kill -INT "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    exec {POLL[1]}>&-
    wait "$POLL_PID" 2>/dev/null || true
    if [ $SECONDS -ge $deadline ]; then
        echo "$db batch=$batch runners=$runners: did not drain within 120 s"
        return
    fi
    echo "$n $span $c0 $c1 $p0 $p1" | awk -v db="$db" -v b="$batch" -v r="$runners" '{
        k = $1 / 1000
        printf "%s batch=%s runners=%s: %.0f tasks/s, runner CPU %.1f ms per 1k, PostgreSQL CPU %.1f ms per 1k\n",
            db, b, r, $1 / $2, ($4 - $3) * 10 / k, ($6 - $5) * 10 / k }'
}

# No runner outlives the script, however it ends.
trap 'kill -INT $(jobs -p) 2>/dev/null || true' EXIT

for cfg in $configs; do
    IFS=: read -r n batch runners <<<"$cfg"
    for ((rep = 0; rep < reps; rep++)); do
        if ((rep % 2 == 0)); then
            run "$db_a" "$cmd_a" "$n" "$batch" "$runners"
            run "$db_b" "$cmd_b" "$n" "$batch" "$runners"
        else
            run "$db_b" "$cmd_b" "$n" "$batch" "$runners"
            run "$db_a" "$cmd_a" "$n" "$batch" "$runners"
        fi
    done
done
