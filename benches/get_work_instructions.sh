#!/usr/bin/env bash
# What one draining get_work costs PostgreSQL, in instructions (BENCHMARKS.md,
# "get_work in instructions"): a count that does not move with the machine's
# load, for comparing releases and SQL changes on a machine whose timings
# wander by 10 % from one minute to the next.
#
# For each database DB (already migrated by the build under test: protocol 2,
# or protocol 1's example functions), the script copies the caller's cluster,
# and in the copy, on a PostgreSQL in single-user mode under callgrind, seeds
# CALLS x BATCH + BATCH no-op tasks and drains them with one session: a
# procedure calls the example table's get_work CALLS times, each time
# finishing what the previous call answered, reads the answer as the runner
# does (every column), and commits after each call (synchronous_commit off:
# the flush is not an instruction count). Only the procedure is counted
# (callgrind's --toggle-collect on ExecuteCallStmt). It drains twice, CALLS
# calls and 2 x CALLS calls, each in a fresh copy, and prints the
# difference per call: calls CALLS+1 to 2 x CALLS, without the plans each
# statement makes on its first call (once per connection in a runner), which
# over the first 100 calls add a tenth. The same build, data and calls give
# the same count to within 0.1 %.
#
# What it keeps true: the caller's cluster is only read (pg_basebackup); the
# copy is made in a temporary directory and removed at the end.
#
# Usage, with a PostgreSQL the caller started (superuser `postgres` on
# 127.0.0.1:$PGPORT), valgrind installed, run as root or as postgres:
#   PGPORT=5499 CALLS=100 BATCH=100 benches/get_work_instructions.sh DB [DB ...]
# (PG_BIN: the server binaries, by default the newest /usr/lib/postgresql/*/bin.)
set -euo pipefail

port=${PGPORT:-5432} calls=${CALLS:-100} batch=${BATCH:-100}
bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
as_postgres() { if [ "$(id -u)" = 0 ]; then su postgres -c "$1"; else sh -c "$1"; fi; }
psql_in() { psql -h 127.0.0.1 -p "$port" -U postgres -qtA -d "$1" "${@:2}"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 777 "$work"

# The drain procedure, for the protocol the database speaks.
for db in "$@"; do
    if [ "$(psql_in "$db" -c "SELECT to_regproc('session_lock.example_task_get_work') IS NOT NULL")" = t ]; then
        psql_in "$db" >/dev/null <<'SQL'
CREATE OR REPLACE PROCEDURE public.sl_drain(p_calls int, p_batch int)
LANGUAGE plpgsql AS $$
DECLARE s bigint; tok uuid; fin bigint[] := '{}'; ids bigint[]; i int; r record;
BEGIN
  SELECT session_id, session_token INTO s, tok
    FROM session_lock.start_session('drain', interval '1 hour', p_batch, 'bench', 1);
  COMMIT;
  FOR i IN 1..p_calls LOOP
    ids := '{}';
    FOR r IN SELECT * FROM session_lock.example_task_get_work(s, tok, fin, '{}', i % 100 = 1, '{}'::bigint[]) LOOP
      IF r.sl_finished IS NULL THEN ids := ids || r.id; END IF;
    END LOOP;
    fin := ids;
    COMMIT;
  END LOOP;
END $$;
SQL
    else
        psql_in "$db" >/dev/null <<'SQL'
CREATE OR REPLACE PROCEDURE public.sl_drain(p_calls int, p_batch int)
LANGUAGE plpgsql AS $$
DECLARE s bigint; fin bigint[] := '{}'; ids bigint[]; i int; r record;
BEGIN
  s := session_lock.start_session('drain', interval '1 hour', 'bench', 1);
  COMMIT;
  FOR i IN 1..p_calls LOOP
    ids := '{}';
    FOR r IN SELECT * FROM public.example_task_get_work(s, p_batch, interval '1 hour', fin) LOOP
      ids := ids || r.id;
    END LOOP;
    fin := ids;
    COMMIT;
  END LOOP;
END $$;
SQL
    fi
done

as_postgres "pg_basebackup -h 127.0.0.1 -p $port -U postgres -D $work/data -X stream -c fast"

# One drain of n calls in a fresh copy; prints the instructions counted.
count() {
    local db=$1 n=$2
    rm -rf "$work/run"
    as_postgres "cp -a $work/data $work/run"
    # Single-user mode reads one statement per blank-line-terminated chunk.
    printf '%s;\n\n' \
        "TRUNCATE public.example_task RESTART IDENTITY CASCADE" \
        "DELETE FROM session_lock.session" \
        "INSERT INTO public.example_task (payload) SELECT 'noop' FROM generate_series(1, $n * $batch + $batch)" \
        "VACUUM ANALYZE public.example_task" \
        "CHECKPOINT" \
        "SET synchronous_commit = off" \
        "CALL public.sl_drain($n, $batch)" >"$work/in.sql"
    chmod 644 "$work/in.sql"
    as_postgres "valgrind --tool=callgrind --callgrind-out-file=$work/cg.out --toggle-collect=ExecuteCallStmt \
        $bin/postgres --single -j -D $work/run -c shared_preload_libraries= -c autovacuum=off $db \
        <$work/in.sql >$work/log 2>&1" || true
    if grep -q ERROR "$work/log"; then
        grep ERROR "$work/log" | head -3 >&2
        return 1
    fi
    grep -o 'Collected : [0-9]*' "$work/log" | awk '{ print $3 }'
}

for db in "$@"; do
    if ! one=$(count "$db" "$calls") || ! two=$(count "$db" $((2 * calls))); then
        echo "$db: the drain failed"
        continue
    fi
    awk -v db="$db" -v n="$calls" -v b="$batch" -v one="$one" -v two="$two" 'BEGIN {
        printf "%s batch=%s: %.0f instructions per get_work (calls %d to %d; %.0f over the first %d, plans included)\n",
            db, b, (two - one) / n, n + 1, 2 * n, one / n, n }'
done
