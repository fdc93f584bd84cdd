#!/usr/bin/env bash
# Where get_work's time goes under a snapshot held elsewhere (BENCHMARKS.md,
# benchmark 11, "Per statement"): four runner processes drain a 1M-task
# backlog kept roughly level by an inserter (4,000 tasks a second), and
# pg_stat_statements (track = all, so the generated functions' own
# statements too) is read over 20 s windows: undisturbed, 5 s into a
# REPEATABLE READ snapshot held by another connection, HOLD - 35 s into it,
# and 5 s after its release. Per statement: calls, mean execution time (us)
# and shared buffers hit per call.
#
# What it keeps true: the database is DB alone (its example table is
# truncated and re-seeded), the runners and the inserter are stopped at the
# end however the script ends.
#
# Usage, with a PostgreSQL the caller started with
# shared_preload_libraries=pg_stat_statements and pg_stat_statements.track=all
# (superuser `postgres` on 127.0.0.1:$PGPORT) and an empty database DB:
#   PGPORT=5499 HOLD=100 benches/bloat_statements.sh DB "BIN run"
set -euo pipefail

db=$1 cmd=$2 hold=${HOLD:-100}
port=${PGPORT:-5432}
url="postgres://postgres@127.0.0.1:$port/$db"
psql_in() { psql -h 127.0.0.1 -p "$port" -U postgres -qtA -d "$db" "$@"; }
# The binary's migrate subcommand: "BIN run" -> "BIN migrate".
${cmd% *} migrate --database-url "$url" --example >/dev/null
psql_in -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" \
    -c "TRUNCATE public.example_task RESTART IDENTITY CASCADE" \
    -c "DELETE FROM session_lock.session" \
    -c "INSERT INTO public.example_task (payload) SELECT 'noop' FROM generate_series(1, 1000000)" \
    -c "VACUUM ANALYZE public.example_task" >/dev/null
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
for _ in 1 2 3 4; do
    # shellcheck disable=SC2086 # the command and its subcommand
    $cmd --database-url "$url" --noop --max-tasks 10 --jitter-ms 0 --name bloat >/dev/null 2>&1 &
done
(while sleep 1; do
    psql_in -c "INSERT INTO public.example_task (payload) SELECT 'noop' FROM generate_series(1, 4000)" >/dev/null
done) &
finished() { psql_in -c "SELECT count(*) FROM public.example_task WHERE finished_at IS NOT NULL"; }
window() {
    local f0 f1
    psql_in -c "SELECT pg_stat_statements_reset()" >/dev/null
    f0=$(finished)
    sleep 20
    f1=$(finished)
    echo "== $1: $(((f1 - f0) / 20)) tasks/s, load average $(cut -d' ' -f1-3 /proc/loadavg) (calls | mean us | buffers per call | statement)"
    psql_in -c "SELECT calls, round(mean_exec_time::numeric * 1000), round(shared_blks_hit::numeric / calls),
                       left(regexp_replace(query, '\s+', ' ', 'g'), 60)
                  FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND calls > 100
                 ORDER BY total_exec_time DESC LIMIT 8"
}
sleep 40
window undisturbed
psql_in -c "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM session_lock.session; SELECT pg_sleep($hold); COMMIT" >/dev/null &
holder=$!
sleep 5
window "snapshot held 5 s"
sleep $((hold - 60))
window "snapshot held $((hold - 35)) s"
wait $holder
sleep 5
window "released 5 s"
