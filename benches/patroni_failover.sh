#!/usr/bin/env bash
# Failovers under a real HA manager (BENCHMARKS.md, benchmark 9): Patroni
# with etcd managing two PostgreSQL 15 nodes on this machine, three
# `session-lock run` processes on a multi-host URL with
# target_session_attrs=read-write, tasks streaming in; then, ROUNDS times
# each, a planned switchover (`patronictl switchover`) and an unplanned
# failover (kill -9 of the leader's Patroni and postmaster, so that the
# replica takes over when the leader key expires). After each: the time
# from the switch or kill to the first task finished on the new primary
# (counted from the moment its REST API first answers as primary, polled
# every 0.2 s: a finish the old primary committed as it went down is not
# the new one's).
# At the end: every task in the table is finished (0 lost), every runner
# is alive, and how many tasks ran twice.
#
# Before each event it waits until the cluster is ready for it: the
# replica streaming on the leader's timeline and less than 1 MB behind, and
# in sync mode the synchronous standby (Patroni switches over only to that
# one), for five seconds in a row.
#
# What it keeps true: it only touches what it starts (its own ports and a
# directory under $TMPDIR, removed at the end; on failure the logs are kept
# in target/bench-results/patroni-<mode>-<time>/), and it exits non-zero if
# a task is left unfinished, a runner died, or a round found no new primary.
#
# Needs: apt-get install postgresql patroni etcd-server etcd-client curl;
# run as root (servers run as `postgres`), from the repository root:
#   benches/patroni_failover.sh [async|sync] [ROUNDS]
set -euo pipefail

MODE=${1:-async}
ROUNDS=${2:-3}
SYNC=false
[ "$MODE" = sync ] && SYNC=true
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
DIR=$(mktemp -d "${TMPDIR:-/tmp}/sl-patroni.XXXXXX")
chown postgres "$DIR"
ETCD_PORT=23790
PORTS=(54410 54420)
API=(18008 18009)
URL="postgres://postgres@127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]}/sl?target_session_attrs=read-write"
SL=${SESSION_LOCK_BIN:-target/release/session-lock}
PIDS=()

say() { printf '%s %s\n' "$(date -u +%T)" "$*" >&2; }
psql_rw() { "$PGBIN/psql" "$URL" -qAtX -c "$1"; }
cleanup() {
    local rc=$?
    if [ $rc -ne 0 ]; then
        local keep
        keep="target/bench-results/patroni-$MODE-$(date -u +%Y%m%dT%H%M%S)"
        mkdir -p "$keep"
        for f in "$DIR"/etcd.log "$DIR"/patroni*.log "$DIR"/runner*.log "$DIR"/events.log; do
            [ -f "$f" ] && { cp "$f" "$keep/"; echo "--- $f" >&2; tail -15 "$f" >&2; }
        done
        for i in 0 1; do
            [ -f "$DIR/node$i/log/postgresql.log" ] && cp "$DIR/node$i/log/postgresql.log" "$keep/postgres$i.log"
        done
        say "logs kept in $keep"
    fi
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    pkill -9 -f "$DIR" 2>/dev/null || true
    sleep 1
    rm -rf "$DIR"
}
trap cleanup EXIT

[ -x "$SL" ] || { say "build the CLI first: cargo build --release -p session-lock-cli"; exit 2; }

say "etcd on $ETCD_PORT"
etcd --name sl --data-dir "$DIR/etcd" --enable-v2=true \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster sl=http://127.0.0.1:23800 >"$DIR/etcd.log" 2>&1 &
PIDS+=($!)

node_conf() {
    local i=$1
    cat >"$DIR/node$i.yml" <<EOF
scope: sl-$$
name: node$i
log: {level: WARNING}
restapi: {listen: 127.0.0.1:${API[$i]}, connect_address: 127.0.0.1:${API[$i]}}
etcd: {host: 127.0.0.1:$ETCD_PORT}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
    synchronous_mode: $SYNC
    # Patroni's default (1 MB) refuses to promote a replica that was further
    # behind the leader's last reported position, and under this write load
    # a kill can land there: the cluster then has no primary at all. The
    # bench wants a failover every round; what an acknowledged write that
    # was never shipped becomes is what it measures.
    maximum_lag_on_failover: 104857600
    postgresql:
      use_pg_rewind: true
      remove_data_directory_on_rewind_failure: true
      remove_data_directory_on_diverged_timelines: true
      parameters: {wal_log_hints: 'on', max_connections: 200, synchronous_commit: 'on'}
  initdb: [{encoding: UTF8}, {locale: C}]
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:${PORTS[$i]}
  connect_address: 127.0.0.1:${PORTS[$i]}
  data_dir: $DIR/node$i
  bin_dir: $PGBIN
  pgpass: $DIR/pgpass$i
  authentication:
    superuser: {username: postgres, password: x}
    replication: {username: replicator, password: x}
    rewind: {username: postgres, password: x}
  parameters: {unix_socket_directories: '$DIR', logging_collector: 'on', log_directory: 'log', log_filename: 'postgresql.log'}
EOF
    chown postgres "$DIR/node$i.yml"
}
start_node() {
    runuser -u postgres -- patroni "$DIR/node$1.yml" >>"$DIR/patroni$1.log" 2>&1 &
    PIDS+=($!)
    echo $! >"$DIR/patroni$1.pid"
}
leader() {
    for i in 0 1; do
        if curl --noproxy "*" -fs -o /dev/null "http://127.0.0.1:${API[$i]}/primary"; then echo "$i"; return; fi
    done
    echo none
}
is_leader() { [ "$(leader)" = "$1" ]; }
has_leader() { [ "$(leader)" != none ]; }
all_finished() { [ "$(psql_rw "SELECT count(*) FROM example_task WHERE finished_at IS NULL" 2>/dev/null)" = 0 ]; }
healthy_replica() { curl --noproxy "*" -fs -o /dev/null "http://127.0.0.1:${API[$1]}/replica"; }
timeline() { # node: the timeline its Patroni reports, or nothing
    curl --noproxy "*" -fs "http://127.0.0.1:${API[$1]}/patroni" 2>/dev/null |
        python3 -c 'import json, sys; print(json.load(sys.stdin).get("timeline", ""))' 2>/dev/null
}
caught_up() { # node: streaming on the leader's timeline, less than 1 MB behind, and in sync mode the synchronous standby
    curl --noproxy "*" -fs -o /dev/null "http://127.0.0.1:${API[$1]}/replica?lag=1MB" || return 1
    [ "$SYNC" = false ] || curl --noproxy "*" -fs -o /dev/null "http://127.0.0.1:${API[$1]}/sync" || return 1
    local mine theirs
    mine=$(timeline "$1")
    theirs=$(timeline "$(leader)")
    [ -n "$mine" ] && [ "$mine" = "$theirs" ]
}
steady() { # node: caught_up at five checks a second apart. A killed leader
    # restarted as a replica first comes up on its old timeline, and only
    # then does Patroni stop it to rewind: one good reading is not enough.
    local i
    for i in 1 2 3 4 5; do
        caught_up "$1" || return 1
        sleep 1
    done
}
members() { runuser -u postgres -- patronictl -c "$DIR/node0.yml" list 2>&1 || true; }
wait_for() { # what, seconds, command...
    local what=$1 secs=$2; shift 2
    local end=$((SECONDS + secs))
    until "$@"; do
        [ $SECONDS -lt $end ] || { say "timed out: $what"; exit 1; }
        sleep 0.2
    done
}
now() { date +%s.%N; }

for i in 0 1; do node_conf $i; done
start_node 0
wait_for "node0 leads" 120 is_leader 0
start_node 1
wait_for "node1 replicates" 120 healthy_replica 1
say "cluster up ($MODE replication)"

"$PGBIN/psql" "postgres://postgres@127.0.0.1:${PORTS[0]}/postgres" -qAtX -c "CREATE DATABASE sl"
"$SL" migrate --database-url "$URL" --example >/dev/null
for r in 0 1 2; do
    "$SL" run --database-url "$URL" --name patroni --ttl-ms 5000 --heartbeat-ms 1000 \
        --tick-ms 200 --work-ms 20 --max-attempts 1000 >"$DIR/runner$r.out" 2>"$DIR/runner$r.log" &
    PIDS+=($!)
    echo $! >>"$DIR/runners.pid"
done
insert() { psql_rw "INSERT INTO example_task (payload) SELECT 'patroni ' || g FROM generate_series(1, $1) g" >/dev/null 2>&1; }
feed() { # keeps work flowing while the cluster switches; retried inserts count once
    while true; do
        if insert 20; then echo 20 >>"$DIR/inserted"; fi
        sleep 0.1
    done
}
feed & FEEDER=$!
PIDS+=($FEEDER)

first_after() { # t0 query: seconds from t0 to the time the query (T0 in it: t0) reads on the new primary
    local t0=$1 got=""
    local end=$((SECONDS + 120))
    while [ $SECONDS -lt $end ]; do
        got=$(psql_rw "${2//T0/$t0}" 2>/dev/null || true)
        if [ -n "$got" ]; then awk -v a="$got" -v b="$t0" 'BEGIN {printf "%.3f", a - b}'; return; fi
        sleep 0.05
    done
    echo "nan"
}
# A run the worked example's Tasker recorded: a get_work on the new primary
# handed it out (the first successful tick with work there).
FIRST_START="SELECT extract(epoch FROM min(started_at)) FROM example_task_run WHERE started_at > to_timestamp(T0)"
FIRST_FINISH="SELECT extract(epoch FROM min(finished_at)) FROM example_task WHERE finished_at > to_timestamp(T0)"
since_t0() { # first since t0: seconds from t0, or nan
    [ "$1" = nan ] && { echo nan; return; }
    awk -v a="$1" -v b="$2" -v c="$3" 'BEGIN {printf "%.3f", a + b - c}'
}

results=()
for round in $(seq 1 "$ROUNDS"); do
    for kind in switchover kill; do
        wait_for "a primary before round $round $kind" 120 has_leader
        wait_for "a caught-up replica before round $round $kind" 180 steady $((1 - $(leader)))
        old=$(leader)
        new=$((1 - old))
        { echo "== round $round $kind at $(date -u +%T.%N)"; members; } >>"$DIR/events.log"
        t0=$(now)
        if [ $kind = switchover ]; then
            # Finishes go on committing on the old primary until it steps
            # down: count only those after the candidate became primary.
            runuser -u postgres -- patronictl -c "$DIR/node$old.yml" switchover --leader "node$old" \
                --candidate "node$new" --force >/dev/null &
            local_switch=$!
            wait_for "node$new promoted" 120 curl --noproxy "*" -fs -o /dev/null "http://127.0.0.1:${API[$new]}/primary"
            since=$(now)
            wait "$local_switch"
        else
            # The leader's Patroni too, or it would restart its postgres
            # as the primary: the replica takes over when the key expires.
            # The old primary's backends outlive its postmaster for a
            # moment and may still commit (and ship) a finish: as above,
            # count only finishes after the candidate became primary.
            pm=$(head -1 "$DIR/node$old/postmaster.pid")
            pkill -9 -f "patroni $DIR/node$old.yml"
            kill -9 "$pm"
            wait_for "node$new promoted" 120 curl --noproxy "*" -fs -o /dev/null "http://127.0.0.1:${API[$new]}/primary"
            since=$(now)
        fi
        start=$(since_t0 "$(first_after "$since" "$FIRST_START")" "$since" "$t0")
        took=$(since_t0 "$(first_after "$since" "$FIRST_FINISH")" "$since" "$t0")
        say "round $round $kind: leader node$old -> node$(leader), first run started on the new primary after ${start} s, first finish after ${took} s"
        results+=("$kind start $start" "$kind finish $took")
        if [ $kind = kill ]; then
            pkill -9 -f "$DIR/node$old/" 2>/dev/null || true
            start_node "$old"
        fi
    done
done

kill "$FEEDER" 2>/dev/null || true
sleep 1
total=$(awk '{s+=$1} END {print s+0}' "$DIR/inserted")
wait_for "every task finished" 300 all_finished
rows=$(psql_rw "SELECT count(*) FROM example_task")
twice=$(psql_rw "SELECT count(*) FROM (SELECT task_id FROM example_task_run GROUP BY task_id HAVING count(*) > 1) d")
alive=0
while read -r p; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done <"$DIR/runners.pid"

quantiles() { grep -v nan | sort -n | awk '{a[NR]=$1} END {if (NR==0) {print "-"; exit}; p50=a[int((NR+1)/2)]; p99=a[NR]; printf "p50 %.2f s, max (p99 of %d) %.2f s", p50, NR, p99}'; }
echo "## Patroni ($MODE replication, $ROUNDS rounds, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg))"
for kind in switchover kill; do
    for what in start finish; do
        printf -- '- %s: first %s on the new primary: %s\n' "$kind" \
            "$([ $what = start ] && echo "run started" || echo finish)" \
            "$(printf '%s\n' "${results[@]}" | awk -v k=$kind -v w=$what '$1==k && $2==w {print $3}' | quantiles)"
    done
done
stalled=$(printf '%s\n' "${results[@]}" | grep -c nan || true)
[ "$stalled" = 0 ] || echo "- $stalled round(s) found no new primary within 120 s (see the Patroni logs above)"
echo "- tasks: $total inserts acknowledged, $rows in the table (fewer only if an acknowledged INSERT was never shipped: asynchronous replication), every one finished; $twice ran twice; runners alive: $alive of 3"
[ "$alive" = 3 ] && [ "$stalled" = 0 ]
