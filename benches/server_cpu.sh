#!/usr/bin/env bash
# What a drain costs PostgreSQL, per 1,000 tasks, with the runner taken out
# (BENCHMARKS.md, benchmark 2, "Eight runners"): pgbench calls the example
# table's get_work as a runner does (one call per tick, finishing the batch
# the previous call answered, the finished ids in one row), and, alternating
# with it, runs the drain benchmark's pgbench limit (claim, then finish) or
# the same get_work sent another way. Each run reseeds the table, takes a
# CHECKPOINT (so that full-page writes weigh alike in every run), and reads
# the CPU of pgbench's backends from /proc over a window after the start:
# tasks/s and server CPU ms per 1,000 tasks, per run.
#
# What it keeps true: it writes only to the database it is given (its
# example_task table and sessions are truncated), and only on the machine's
# own server (it reads /proc of the backends).
#
# Usage, with a PostgreSQL the caller started (superuser `postgres` on
# 127.0.0.1:$PGPORT) and a database migrated with the example
# (`session-lock migrate --example`):
#   PGPORT=5499 CLIENTS=8 BATCH=10 ROUNDS=3 benches/server_cpu.sh DB [MODE ...]
# MODE: get_work (prepared, as the store sends it), get_work-unnamed (as it
# is sent behind a pooler), limit (the pgbench limit). Default: get_work limit.
set -euo pipefail

db=${1:?usage: server_cpu.sh DB [MODE ...]}
shift
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(get_work limit)
port=${PGPORT:-5432} clients=${CLIENTS:-8} batch=${BATCH:-10} rounds=${ROUNDS:-3}
tasks=${TASKS:-300000} window=${WINDOW:-6}
bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
psql_in() { psql -h 127.0.0.1 -p "$port" -U postgres -qtA -d "$db" "$@"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# get_work as a runner calls it at the start of a drain's tick: finish what
# the last answer named, no sweep, nothing known still held, the finished
# ids in one row. Each client has a session of its own (ids from :base), and
# its token is the one seed() gives it.
cat >"$work/get_work.sql" <<'SQL'
\set sid :client_id + :base
SELECT coalesce(array_agg(g.id) FILTER (WHERE g.id IS NOT NULL), '{}') AS fin FROM session_lock.example_task_get_work(:sid, ('00000000-0000-0000-0000-' || lpad((:sid)::text, 12, '0'))::uuid, :fin::bigint[], '{}'::bigint[], false, '{}'::bigint[], true) g \gset
SQL
# The drain benchmark's pgbench limit (benches/load/drain.rs).
cat >"$work/limit.sql" <<'SQL'
\set sid :client_id + 1
WITH claimed AS (UPDATE public.example_task SET session_id = :sid WHERE id = ANY (ARRAY(SELECT id FROM public.example_task WHERE session_id IS NULL AND finished_at IS NULL ORDER BY session_id, id FOR UPDATE SKIP LOCKED LIMIT :batch)) RETURNING id) SELECT coalesce(array_agg(id), '{}') AS ids FROM claimed \gset
UPDATE public.example_task SET finished_at = now(), finished_by = :sid WHERE id = ANY (:ids::bigint[]) AND session_id = :sid AND finished_at IS NULL;
SQL

# Reseeds the table and starts one session per client, each with a token
# made from its id; prints the first session's id.
seed() {
    psql_in -c "TRUNCATE public.example_task, public.example_task_run RESTART IDENTITY" \
        -c "DELETE FROM session_lock.session" \
        -c "INSERT INTO public.example_task (payload) SELECT 'noop' FROM generate_series(1, $tasks)" \
        -c "VACUUM ANALYZE public.example_task" >/dev/null
    for _ in $(seq 1 "$clients"); do
        psql_in -c "SELECT session_id FROM session_lock.start_session('server_cpu', '1 hour', $batch)" >/dev/null
    done
    psql_in -c "UPDATE session_lock.session SET token = ('00000000-0000-0000-0000-' || lpad(id::text, 12, '0'))::uuid" \
        -c "VACUUM ANALYZE session_lock.session" -c "CHECKPOINT" >/dev/null
    psql_in -c "SELECT min(id) FROM session_lock.session"
}

# The CPU ticks so far of the given pids.
ticks() {
    local t=0 p
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat")))
    done
    echo "$t"
}

finished() { psql_in -c "SELECT count(*) FROM public.example_task WHERE finished_at IS NOT NULL"; }

hz=$(getconf CLK_TCK)
for round in $(seq 1 "$rounds"); do
    for mode in "${modes[@]}"; do
        case $mode in
            get_work) script=get_work.sql protocol=prepared ;;
            get_work-unnamed) script=get_work.sql protocol=extended ;;
            limit) script=limit.sql protocol=prepared ;;
            *) echo "unknown mode $mode: get_work, get_work-unnamed or limit" >&2; exit 2 ;;
        esac
        base=$(seed)
        "$bin/pgbench" -n -M "$protocol" -h 127.0.0.1 -p "$port" -U postgres -c "$clients" -j 2 \
            -T $((window + 3)) -D batch="$batch" -D ids='{}' -D fin='{}' -D base="$base" \
            -f "$work/$script" "$db" >"$work/pgbench.out" 2>&1 &
        sleep 1.5
        mapfile -t pids < <(psql_in -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbench'")
        c0=$(ticks "${pids[@]}") f0=$(finished) t0=$(date +%s.%N)
        sleep "$window"
        c1=$(ticks "${pids[@]}") f1=$(finished) t1=$(date +%s.%N)
        wait
        if grep -qi "error\|abort" "$work/pgbench.out"; then
            grep -i "error\|abort" "$work/pgbench.out" | head -3 >&2
        fi
        awk -v r="$round" -v m="$mode" -v c="$((c1 - c0))" -v hz="$hz" -v f="$((f1 - f0))" \
            -v t0="$t0" -v t1="$t1" -v load="$(cut -d' ' -f1 /proc/loadavg)" 'BEGIN {
            printf "round %d %-16s %8.0f tasks/s  server CPU %6.1f ms per 1,000 tasks  load %s\n",
                r, m, f / (t1 - t0), (f > 0 ? c / hz * 1e6 / f : 0), load }'
    done
done
