//! The holes an adversarial review found in protocol 1, one test each: what
//! others' rows, statements and roles did to it. Every test asserts the
//! behaviour protocol 2 keeps, and failed on protocol 1 (written and run
//! there first, through the same adapter; the failures are recorded in the
//! CHANGELOG): a foreign row lock stalled failover (1), a delayed get_work
//! moved a lease backwards (2), a slow get_work starved its own heartbeat
//! (3), tasks of vanished sessions were stranded (4), mixed capacities left
//! work idle (5), a planted overload ran as the owner (6), calendar
//! intervals wrote leases out of range (7), and a combined finish could not
//! say what it finished (8).
//!
//! Every protocol call goes through the small adapter right below (start,
//! work, finish, bump, finish_and_work). Raw SQL is used only for what a
//! test stages around the protocol: expiring a session, foreign
//! transactions and locks, reading the session and task tables, and the
//! SQL-level attacks of holes 6 and 7.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use session_lock::{
    Database, GetWork, Migrator, PgStore, Session, SessionId, SessionStart, TaskId,
};
use session_lock_testkit::example::ExampleTask;
use tokio::time::timeout;
use tokio_postgres::{Client, NoTls};

use session_lock_testkit::db::{TestDb, migrated_db};

// ---------------------------------------------------------------------------
// The adapter. Nothing below it calls the store's protocol methods or the
// SQL entry points, except the raw-SQL attacks of holes 6 and 7.
// ---------------------------------------------------------------------------

/// The lease every session gets unless a test asks for another.
const TTL: Duration = Duration::from_secs(60);

/// Starts a session of runner `name` that may hold up to `capacity` tasks.
async fn start(store: &PgStore, name: &str, capacity: u32) -> Session {
    start_with_ttl(store, name, capacity, TTL).await
}

/// [`start`] with a lease other than [`TTL`].
async fn start_with_ttl(store: &PgStore, name: &str, capacity: u32, ttl: Duration) -> Session {
    store
        .start_session(&SessionStart::new(name, ttl, capacity))
        .await
        .expect("session starts")
}

/// One tick: the session's tasks after the protocol moved it to its share.
async fn work(store: &PgStore, session: &Session) -> session_lock::Result<Vec<TaskId>> {
    Ok(finish_and_work(store, session, &[]).await?.held)
}

/// Finishes those of `ids` the session holds; returns the ones finished.
async fn finish(
    store: &PgStore,
    session: &Session,
    ids: &[TaskId],
) -> session_lock::Result<Vec<TaskId>> {
    store.finish_tasks::<ExampleTask>(session, ids).await
}

/// Extends the session's lease by `ttl` (the heartbeat).
async fn bump(store: &PgStore, session: &Session, ttl: Duration) -> session_lock::Result<()> {
    store.bump_session(session, ttl).await
}

/// What a combined finish-and-tick reports.
#[derive(Debug)]
struct FinishAndWork {
    /// The ids this call finished.
    finished: Vec<TaskId>,
    /// The tasks the session holds afterwards.
    held: Vec<TaskId>,
}

/// Finishes `ids` and ticks, in one call (sweeping for orphans).
async fn finish_and_work(
    store: &PgStore,
    session: &Session,
    ids: &[TaskId],
) -> session_lock::Result<FinishAndWork> {
    let w = store
        .get_work::<ExampleTask>(GetWork {
            finished: ids,
            ..GetWork::new(session)
        })
        .await?;
    assert!(
        w.unreadable.is_empty(),
        "every example row scans: {:?}",
        w.unreadable
    );
    Ok(FinishAndWork {
        finished: w.finished,
        held: w.tasks.iter().map(|t| t.id).collect(),
    })
}

// ---------------------------------------------------------------------------
// Staging helpers: plain SQL on the superuser connection.
// ---------------------------------------------------------------------------

struct Setup {
    db: TestDb,
    store: PgStore,
    client: Client,
}

async fn setup(tasks: usize) -> Setup {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store connects");
    let client = db.client().await;
    seed(&client, tasks).await;
    Setup { db, store, client }
}

async fn seed(client: &Client, tasks: usize) -> Vec<TaskId> {
    client
        .query(
            "INSERT INTO example_task (payload) SELECT 'task ' || g FROM generate_series(1, $1::int) g RETURNING id",
            &[&(tasks as i32)],
        )
        .await
        .expect("seed tasks")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Open tasks per holding session (None: unowned).
async fn holdings(client: &Client) -> BTreeMap<Option<i64>, i64> {
    client
        .query(
            "SELECT session_id, count(*) FROM example_task WHERE finished_at IS NULL GROUP BY 1",
            &[],
        )
        .await
        .expect("count holdings")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The session_id column of a task.
async fn owner(client: &Client, task: TaskId) -> Option<i64> {
    client
        .query_one(
            "SELECT session_id FROM example_task WHERE id = $1",
            &[&task],
        )
        .await
        .expect("read a task's owner")
        .get(0)
}

/// Makes a session's lease run out now, as if its heartbeats had stopped.
async fn expire(client: &Client, session: SessionId) {
    let n = client
        .execute(
            "UPDATE session_lock.session SET expires_at = now() - interval '1 second', bumped_at = now() - interval '2 seconds' WHERE id = $1",
            &[&session],
        )
        .await
        .expect("expire session");
    assert_eq!(n, 1, "session {session} exists");
}

/// The session's committed expires_at, as Unix seconds.
async fn expires_at(client: &Client, session: SessionId) -> f64 {
    client
        .query_one(
            "SELECT extract(epoch FROM expires_at)::float8 FROM session_lock.session WHERE id = $1",
            &[&session],
        )
        .await
        .expect("read expires_at")
        .get(0)
}

/// Seconds until the session's lease runs out (negative: it has).
async fn lease_left(client: &Client, session: SessionId) -> f64 {
    client
        .query_one(
            "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 FROM session_lock.session WHERE id = $1",
            &[&session],
        )
        .await
        .expect("read the lease left")
        .get(0)
}

/// Waits (up to 5 s) until a get_work statement of this database waits for a
/// lock, and returns its backend pid and what it waits for.
async fn wait_for_blocked_get_work(client: &Client) -> (i32, String) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows = client
            .query(
                "SELECT a.pid,
                        coalesce(string_agg(l.locktype || ' ' || l.mode || coalesce(' on ' || l.relation::regclass::text, ''), ', '), '?')
                   FROM pg_stat_activity a
                   LEFT JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted
                  WHERE a.datname = current_database()
                    AND a.wait_event_type = 'Lock'
                    AND a.query LIKE '%\\_get\\_work%'
                  GROUP BY a.pid",
                &[],
            )
            .await
            .expect("read pg_stat_activity");
        if let Some(row) = rows.first() {
            return (row.get(0), row.get(1));
        }
        assert!(
            Instant::now() < deadline,
            "get_work never became blocked on the foreign lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// Fails the enclosing fn (which returns `Result<_, String>`) with a message.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

// ---------------------------------------------------------------------------
// Hole 1: a foreign row lock on one task of an expired session stalls the
// failover of all its tasks.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum ForeignLock {
    /// An ordinary child-row insert: its foreign-key check takes FOR KEY
    /// SHARE on the task row.
    ForeignKeyChild,
    /// `SELECT ... FOR UPDATE` on the task row.
    SelectForUpdate,
}

#[tokio::test]
async fn hole1_a_foreign_row_lock_does_not_stall_failover() {
    let mut failures = Vec::new();
    for variant in [ForeignLock::ForeignKeyChild, ForeignLock::SelectForUpdate] {
        if let Err(e) = failover_past_a_foreign_lock(variant).await {
            failures.push(format!("{variant:?}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "failover stalls behind a foreign row lock:\n{}",
        failures.join("\n")
    );
}

async fn failover_past_a_foreign_lock(variant: ForeignLock) -> Result<(), String> {
    let s = setup(10).await;
    let a = start(&s.store, "n", 100).await;
    let a_tasks = work(&s.store, &a).await.expect("a's work");
    assert_eq!(a_tasks.len(), 10, "a holds every task");
    let b = start(&s.store, "n", 100).await;
    expire(&s.client, a.id).await;
    let locked = a_tasks[3];

    let foreign = s.db.client().await;
    match variant {
        ForeignLock::ForeignKeyChild => {
            s.client
                .batch_execute(
                    "CREATE TABLE example_task_note (task_id bigint REFERENCES example_task (id), note text)",
                )
                .await
                .unwrap();
            foreign.batch_execute("BEGIN").await.unwrap();
            foreign
                .execute(
                    "INSERT INTO example_task_note VALUES ($1, 'a note')",
                    &[&locked],
                )
                .await
                .unwrap();
        }
        ForeignLock::SelectForUpdate => {
            foreign.batch_execute("BEGIN").await.unwrap();
            foreign
                .query_one(
                    "SELECT id FROM example_task WHERE id = $1 FOR UPDATE",
                    &[&locked],
                )
                .await
                .unwrap();
        }
    }
    // The foreign transaction now holds its row lock (the statement that
    // takes it has returned) and stays open.

    let t0 = Instant::now();
    let tick = timeout(Duration::from_secs(5), work(&s.store, &b)).await;
    let took = t0.elapsed();
    match tick {
        Err(_) => {
            return Err(format!(
                "survivor b's work was still blocked after {took:.2?} (limit 3 s) behind the foreign lock on task {locked}"
            ));
        }
        Ok(Err(e)) => return Err(format!("survivor b's work failed after {took:.2?}: {e}")),
        Ok(Ok(_)) => {}
    }
    ensure!(
        took < Duration::from_secs(3),
        "survivor b's work took {took:.2?} (limit 3 s)"
    );
    let rows = s
        .client
        .query(
            "SELECT id FROM example_task WHERE session_id = $1 AND finished_at IS NULL AND id <> $2",
            &[&a.id, &locked],
        )
        .await
        .unwrap();
    ensure!(
        rows.is_empty(),
        "{} unlocked tasks of the expired session stayed with it: {:?}",
        rows.len(),
        rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>()
    );
    ensure!(
        matches!(
            timeout(Duration::from_secs(1), bump(&s.store, &b, TTL)).await,
            Ok(Ok(()))
        ),
        "b is not live after the failover"
    );

    foreign
        .batch_execute(match variant {
            ForeignLock::ForeignKeyChild => "COMMIT",
            ForeignLock::SelectForUpdate => "ROLLBACK",
        })
        .await
        .unwrap();
    let next = timeout(Duration::from_secs(3), work(&s.store, &b)).await;
    let held = match next {
        Ok(Ok(held)) => held,
        other => return Err(format!("b's next work: {other:?}")),
    };
    ensure!(
        held.contains(&locked),
        "after the foreign transaction ended, b's next work did not take task {locked} (owner now {:?})",
        owner(&s.client, locked).await
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Hole 2: a delayed get_work writes an expiry older than one already written.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hole2_a_lease_never_moves_backwards() {
    let s = setup(5).await;
    let a = start(&s.store, "lease", 10).await;
    let mut seen = vec![("start", expires_at(&s.client, a.id).await)];
    let mut failures = Vec::new();

    // A foreign transaction holds the task table.
    let foreign = s.db.client().await;
    foreign
        .batch_execute("BEGIN; LOCK TABLE example_task IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // a's tick, on a connection of its own (as a pool might hand it a new
    // one), is held up by it.
    let tick_store = PgStore::connect(&s.db.url).await.unwrap();
    let ticking = a.clone();
    let delayed = tokio::spawn(async move { work(&tick_store, &ticking).await });
    let (pid, waits_for) = wait_for_blocked_get_work(&s.client).await;
    let touched_session: bool = s
        .client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND relation = 'session_lock.session'::regclass)",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "hole2: the delayed get_work (pid {pid}) waits for {waits_for}; it has touched the session table: {touched_session}"
    );

    // A heartbeat while the tick is held up. (The sleep only makes the
    // difference between the two clocks large enough to read; it stays
    // well inside get_work's lock_timeout of 1 s, so that the held-up tick
    // usually completes after the heartbeat.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    match timeout(Duration::from_secs(1), bump(&s.store, &a, TTL)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failures.push(format!("the heartbeat failed: {e}")),
        Err(_) => failures.push(format!(
            "the heartbeat was still blocked after {:.2?} (hole 3)",
            t0.elapsed()
        )),
    }
    seen.push(("bump", expires_at(&s.client, a.id).await));

    // The foreign lock goes; the held-up tick completes.
    foreign.batch_execute("COMMIT").await.unwrap();
    // It completes, or (on a machine slow enough to keep it waiting past
    // its lock_timeout) gives up without writing: either way the lease
    // must not move backwards.
    match timeout(Duration::from_secs(10), delayed).await {
        Ok(Ok(Ok(held))) => eprintln!("hole2: the delayed get_work returned {} tasks", held.len()),
        Ok(Ok(Err(e))) if e.to_string().contains("lock timeout") => {
            eprintln!("hole2: the delayed get_work gave up at its lock_timeout: {e}")
        }
        other => failures.push(format!("the delayed get_work: {other:?}")),
    }
    seen.push(("delayed get_work", expires_at(&s.client, a.id).await));

    for pair in seen.windows(2) {
        let ((before, e0), (after, e1)) = (pair[0], pair[1]);
        if e1 < e0 {
            failures.push(format!(
                "expires_at moved backwards by {:.3} s: {e0:.6} after {before}, {e1:.6} after {after}",
                e0 - e1
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "the lease (delayed get_work waited for {waits_for}, session table touched before the wait: {touched_session}):\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Hole 3: a session's own slow get_work blocks its heartbeat.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hole3_a_slow_get_work_never_blocks_its_own_heartbeat() {
    let s = setup(20).await;
    let ttl = Duration::from_secs(2);
    let hold = ttl * 2; // the tick is held up for twice the lease
    let a = start_with_ttl(&s.store, "slow", 10, ttl).await;

    // EXCLUSIVE: reads of the task table go on, writes wait. a's tick bumps
    // its session, reads, then waits at its pickup.
    let foreign = s.db.client().await;
    foreign
        .batch_execute("BEGIN; LOCK TABLE example_task IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let tick_store = s.store.clone();
    let ticking = a.clone();
    let slow = tokio::spawn(async move {
        let t0 = Instant::now();
        let r = work(&tick_store, &ticking).await;
        (
            r.map(|held| held.len()).map_err(|e| e.to_string()),
            t0.elapsed(),
        )
    });
    let (_, waits_for) = wait_for_blocked_get_work(&s.client).await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        foreign.batch_execute("COMMIT").await.unwrap();
    });

    // The heartbeat, on connections of its own, every 250 ms while the tick
    // is held up and a little after.
    let heart = PgStore::connect(&s.db.url).await.unwrap();
    let until = Instant::now() + hold + Duration::from_millis(500);
    let mut beats = Vec::new();
    while Instant::now() < until {
        let t0 = Instant::now();
        let r = timeout(hold + Duration::from_secs(5), bump(&heart, &a, ttl)).await;
        let outcome = match r {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(e)) => format!("error {e}"),
            Err(_) => "no answer".to_owned(),
        };
        beats.push((t0.elapsed(), outcome));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    release.await.unwrap();
    let (tick, tick_took) = slow.await.unwrap();
    let left = lease_left(&s.client, a.id).await;

    let report = format!(
        "get_work waited for {waits_for} and returned {tick:?} after {tick_took:.2?}; lease left at the end: {left:.3} s; heartbeats (time, outcome): {:?}",
        beats
            .iter()
            .map(|(t, o)| format!("{t:.2?} {o}"))
            .collect::<Vec<_>>()
    );
    eprintln!("hole3: {report}");
    let slow_or_failed: Vec<_> = beats
        .iter()
        .filter(|(t, o)| *t >= Duration::from_secs(1) || o != "ok")
        .collect();
    assert!(
        slow_or_failed.is_empty(),
        "{} of {} heartbeats were slow (>= 1 s) or failed while the session's own get_work was held up: {report}",
        slow_or_failed.len(),
        beats.len()
    );
    assert!(left > 0.0, "the session died: {report}");
}

// ---------------------------------------------------------------------------
// Hole 4: open tasks whose session_id points at nobody who will release them.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hole4_stranded_tasks_are_picked_up() {
    let mut failures = Vec::new();
    for case in ["a", "b", "c"] {
        let r = match case {
            "a" => stranded_on_a_missing_session().await,
            "b" => stranded_on_another_names_expired_session().await,
            _ => stranded_by_reopening_after_reap().await,
        };
        if let Err(e) = r {
            failures.push(format!("({case}) {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "stranded tasks:\n{}",
        failures.join("\n")
    );
}

/// Ticks `session` up to twice; Ok once it holds every task of `wanted`.
async fn picks_up(s: &Setup, session: &Session, wanted: &[TaskId]) -> Result<(), String> {
    let mut held = Vec::new();
    for _ in 0..2 {
        held = work(&s.store, session).await.map_err(|e| e.to_string())?;
        if wanted.iter().all(|t| held.contains(t)) {
            return Ok(());
        }
    }
    let mut owners = Vec::new();
    for &t in wanted {
        owners.push((t, owner(&s.client, t).await));
    }
    Err(format!(
        "after two ticks live session {} holds {held:?}; the stranded tasks (id, session_id) are {owners:?}",
        session.id
    ))
}

/// (a) session_id names a session that does not exist.
async fn stranded_on_a_missing_session() -> Result<(), String> {
    let s = setup(3).await;
    let tasks: Vec<TaskId> = s
        .client
        .query("SELECT id FROM example_task ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let ghost: i64 = 999_999;
    let exists: bool = s
        .client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM session_lock.session WHERE id = $1)",
            &[&ghost],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists);
    s.client
        .execute(
            "UPDATE example_task SET session_id = $1 WHERE id = $2",
            &[&ghost, &tasks[0]],
        )
        .await
        .unwrap();
    let live = start(&s.store, "n", 10).await;
    picks_up(&s, &live, &tasks).await
}

/// (b) session_id names an expired session of another runner name.
async fn stranded_on_another_names_expired_session() -> Result<(), String> {
    let s = setup(3).await;
    let old = start(&s.store, "old-name", 10).await;
    let old_tasks = work(&s.store, &old).await.unwrap();
    assert_eq!(old_tasks.len(), 3);
    expire(&s.client, old.id).await;
    let new = start(&s.store, "new-name", 10).await;
    picks_up(&s, &new, &old_tasks).await
}

/// (c) a finished task re-opened after its finishing session was reclaimed
/// and reaped.
async fn stranded_by_reopening_after_reap() -> Result<(), String> {
    let s = setup(3).await;
    let f = start(&s.store, "n", 10).await;
    let f_tasks = work(&s.store, &f).await.unwrap();
    assert_eq!(f_tasks.len(), 3);
    let t = f_tasks[0];
    assert_eq!(finish(&s.store, &f, &[t]).await.unwrap(), vec![t]);
    expire(&s.client, f.id).await;
    let g = start(&s.store, "n", 10).await;
    work(&s.store, &g).await.unwrap(); // reclaims f
    let reclaimed: bool = s
        .client
        .query_one(
            "SELECT reclaimed_at IS NOT NULL FROM session_lock.session WHERE id = $1",
            &[&f.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reclaimed, "g's tick reclaimed f");
    let reaped: i32 = s
        .client
        .query_one("SELECT session_lock.reap_sessions('0')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(reaped >= 1, "f was reaped");
    s.client
        .execute(
            "UPDATE example_task SET finished_at = NULL, finished_by = NULL WHERE id = $1",
            &[&t],
        )
        .await
        .unwrap();
    picks_up(&s, &g, &f_tasks).await
}

// ---------------------------------------------------------------------------
// Hole 5: sessions of different capacities leave work idle.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hole5_different_capacities_hold_every_task() {
    let s = setup(100).await;
    let big = start(&s.store, "mixed", 100).await;
    let small = start(&s.store, "mixed", 5).await;
    let (mut held_big, mut held_small) = (0, 0);
    for _round in 0..4 {
        held_big = work(&s.store, &big).await.unwrap().len();
        held_small = work(&s.store, &small).await.unwrap().len();
    }
    let table = holdings(&s.client).await;
    assert_eq!(
        held_big + held_small,
        100,
        "every task held after 4 rounds: capacity 100 holds {held_big}, capacity 5 holds {held_small}; table {table:?}"
    );
    // Weighted shares: 100 * 100/105 = 95.2 and 100 * 5/105 = 4.8.
    assert!(
        (94..=96).contains(&held_big) && (4..=5).contains(&held_small),
        "weighted shares: capacity 100 holds {held_big} (want ~95), capacity 5 holds {held_small} (want ~5)"
    );
}

// ---------------------------------------------------------------------------
// Hole 6: a role that may create objects where the entry points look runs
// code as their owner. On protocol 1 an overload planted in public
// (example_task_release(bigint[], text), a better match for an untyped
// NULL) ran as the owner. Here the runtime role owns a schema first on its
// search_path, may create in the task table's schema, and plants shadows of
// every function and operator the protocol uses, overloads of the generated
// helpers, and a temporary table named like the session table.
// ---------------------------------------------------------------------------

/// Functions and operators the hostile role plants, each logging who ran it
/// and then doing what the real one does.
const SHADOWS: &str = r#"
CREATE FUNCTION %s.cardinality(anyarray) RETURNS integer LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, '%s.cardinality'); RETURN pg_catalog.cardinality($1); END $f$;
CREATE FUNCTION %s.clock_timestamp() RETURNS timestamptz LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, '%s.clock_timestamp'); RETURN pg_catalog.clock_timestamp(); END $f$;
CREATE FUNCTION %s.now() RETURNS timestamptz LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, '%s.now'); RETURN pg_catalog.now(); END $f$;
CREATE FUNCTION %s.unnest(bigint[]) RETURNS SETOF bigint LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, '%s.unnest'); RETURN QUERY SELECT pg_catalog.unnest($1); END $f$;
CREATE FUNCTION %s.pg_notify(text, text) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, '%s.pg_notify'); PERFORM pg_catalog.pg_notify($1, $2); END $f$;
CREATE FUNCTION %s.h_eq(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, '%s.= bigint'); RETURN pg_catalog.int8eq($1, $2); END $f$;
CREATE OPERATOR %s.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = %s.h_eq);
CREATE FUNCTION %s.h_lt(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, '%s.< bigint'); RETURN pg_catalog.int8lt($1, $2); END $f$;
CREATE OPERATOR %s.< (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = %s.h_lt);
CREATE FUNCTION %s.h_gt_ts(timestamptz, timestamptz) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, '%s.> timestamptz'); RETURN pg_catalog.timestamptz_gt($1, $2); END $f$;
CREATE OPERATOR %s.> (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = %s.h_gt_ts);
CREATE FUNCTION %s.h_plus_ts(timestamptz, interval) RETURNS timestamptz LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, '%s.+ timestamptz'); RETURN pg_catalog.timestamptz_pl_interval($1, $2); END $f$;
CREATE OPERATOR %s.+ (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = %s.h_plus_ts);
CREATE FUNCTION %s.h_minus(bigint, bigint) RETURNS bigint LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, '%s.- bigint'); RETURN pg_catalog.int8mi($1, $2); END $f$;
CREATE OPERATOR %s.- (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = %s.h_minus);
CREATE FUNCTION %s.h_mod(bigint, integer) RETURNS bigint LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, '%s.% bigint'); RETURN pg_catalog.int8mod($1, $2::bigint); END $f$;
CREATE OPERATOR %s.% (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = %s.h_mod);
"#;

/// Looser overloads of the generated helpers, where they could go: in the
/// task table's schema (protocol 2 generates into session_lock, so these
/// are never called), and in session_lock itself (refused: only
/// session-lock's owner creates there).
const OVERLOADS: &str = r#"
CREATE FUNCTION public.example_task_free_of(anyarray, bigint) RETURNS integer LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, 'overload free_of'); RETURN 0; END $f$;
CREATE FUNCTION public.example_task_free_of(bigint[], text) RETURNS integer LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, 'overload free_of text'); RETURN 0; END $f$;
CREATE FUNCTION public.example_task_count_open(text, bigint, bigint, bigint) RETURNS bigint LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, 'overload count_open'); RETURN 0; END $f$;
CREATE FUNCTION public.example_task_sweep(bigint, bigint, text) RETURNS integer LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, 'overload sweep'); RETURN 0; END $f$;
CREATE FUNCTION public.example_task_finish_ids(bigint, anyarray) RETURNS bigint[] LANGUAGE plpgsql AS $f$
BEGIN INSERT INTO public.hijack_log VALUES (current_user, 'overload finish_ids'); RETURN '{}'; END $f$;
"#;

#[tokio::test]
async fn hole6_planted_functions_never_run_as_the_owner() {
    let s = setup(6).await;
    let hostile = format!("{}_hostile", s.db.name);
    s.client
        .batch_execute(&format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'session_lock_runtime') THEN
                     CREATE ROLE session_lock_runtime NOLOGIN;
                 END IF;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
             END $$;
             CREATE ROLE \"{hostile}\" LOGIN;
             GRANT session_lock_runtime TO \"{hostile}\";
             GRANT CREATE ON SCHEMA public TO \"{hostile}\";
             CREATE SCHEMA hostile_ns AUTHORIZATION \"{hostile}\";
             ALTER ROLE \"{hostile}\" SET search_path = hostile_ns, public, pg_catalog;"
        ))
        .await
        .unwrap();
    // Re-applying the always-files grants the runtime role its EXECUTEs.
    let mut owner_client = s.db.client().await;
    Migrator::new()
        .with_example()
        .run(&mut owner_client)
        .await
        .unwrap();

    // The hostile role, over the harness's trust login.
    let mut config = s.db.config();
    config.user(&hostile);
    let (h, conn) = config.connect(NoTls).await.expect("hostile logs in");
    tokio::spawn(conn);
    h.batch_execute(
        "CREATE TABLE public.hijack_log (who text NOT NULL, via text NOT NULL);
         GRANT INSERT ON public.hijack_log TO PUBLIC;
         CREATE TEMP TABLE session (id bigint, name text, expires_at timestamptz);",
    )
    .await
    .expect("the hostile role's log and temporary table");
    for schema in ["hostile_ns", "public"] {
        h.batch_execute(&SHADOWS.replace("%s", schema))
            .await
            .unwrap_or_else(|e| panic!("the hostile role plants its shadows in {schema}: {e:?}"));
    }
    h.batch_execute(OVERLOADS)
        .await
        .expect("the hostile role plants its overloads in public");
    let refused = h
        .batch_execute(&OVERLOADS.replace("public.example_task_", "session_lock.example_task_"))
        .await
        .expect_err("nobody but session-lock's owner creates in session_lock");
    assert_eq!(sqlstate(&refused), "42501", "{refused:?}");

    // Every path of the protocol: a session that expires at once (so the
    // next get_work reclaims it), orphans (a task of a missing session, one
    // of an expired session of another name), a finish inside get_work, the
    // sweep, a fenced finish, heartbeats, an end and a reap.
    let dead: i64 = h
        .query_one(
            "SELECT session_id FROM session_lock.start_session('h', interval '1 millisecond', 3)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let other: i64 = h
        .query_one(
            "SELECT session_id FROM session_lock.start_session('other-name', interval '1 millisecond', 3)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    s.client
        .batch_execute(&format!(
            "UPDATE example_task SET session_id = {dead} WHERE id = 1;
             UPDATE example_task SET session_id = {other} WHERE id = 2;
             UPDATE example_task SET session_id = 987654321 WHERE id = 3;"
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while lease_left(&s.client, dead).await > 0.0 || lease_left(&s.client, other).await > 0.0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let row = h
        .query_one(
            "SELECT session_id, session_token::text FROM session_lock.start_session('h', interval '60 s', 10)",
            &[],
        )
        .await
        .unwrap();
    let (session, token): (i64, String) = (row.get(0), row.get(1));
    let mut calls = Vec::new();
    let held: Vec<i64> = h
        .query(
            "SELECT w.id FROM session_lock.example_task_get_work($1, $2::text::uuid) w WHERE w.sl_finished IS NULL",
            &[&session, &token],
        )
        .await
        .expect("get_work as the hostile role")
        .iter()
        .map(|r| r.get(0))
        .collect();
    calls.push(format!("get_work: holds {held:?}"));
    let finished = h
        .query(
            "SELECT w.sl_finished FROM session_lock.example_task_get_work($1, $2::text::uuid, ARRAY[$3]::bigint[], '{}', true) w WHERE w.sl_finished IS NOT NULL",
            &[&session, &token, &held[0]],
        )
        .await
        .expect("get_work finishing a task as the hostile role")
        .len();
    calls.push(format!("get_work finished {finished}"));
    let fenced = h
        .query(
            "SELECT * FROM session_lock.example_task_finish_tasks($1, $2::text::uuid, ARRAY[$3]::bigint[])",
            &[&session, &token, &held[1]],
        )
        .await
        .expect("finish_tasks as the hostile role")
        .len();
    calls.push(format!("finish_tasks finished {fenced}"));
    for sql in [
        "SELECT session_lock.bump_session($1, $2::text::uuid, interval '60 s')::text",
        "SELECT session_lock.end_session($1, $2::text::uuid)::text",
    ] {
        let r: String = h.query_one(sql, &[&session, &token]).await.unwrap().get(0);
        calls.push(format!("{sql}: {r}"));
    }
    let reaped: i32 = h
        .query_one("SELECT session_lock.reap_sessions(interval '0')", &[])
        .await
        .unwrap()
        .get(0);
    calls.push(format!("reaped {reaped}"));
    let log: Vec<(String, String)> = s
        .client
        .query("SELECT who, via FROM public.hijack_log", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    drop(h);
    let _ = s
        .client
        .batch_execute(&format!(
            "DROP SCHEMA hostile_ns CASCADE; DROP OWNED BY \"{hostile}\"; DROP ROLE \"{hostile}\""
        ))
        .await;

    assert_eq!(
        held.len(),
        6,
        "the protocol works for the runtime role, orphans included: {calls:?}"
    );
    assert_eq!((finished, fenced), (1, 1), "{calls:?}");
    let as_owner: Vec<_> = log.iter().filter(|(who, _)| *who != hostile).collect();
    assert!(
        as_owner.is_empty(),
        "code planted by {hostile} ran as someone else inside the entry points ({calls:?}): {as_owner:?}"
    );
}

// ---------------------------------------------------------------------------
// Hole 7: intervals with months or days pass the TTL check by their nominal
// length (30-day months) but are added to now() by the calendar.
// ---------------------------------------------------------------------------

/// Each passes check_ttl (nominally 1 s to 1 day); by the calendar they span
/// up to 3 days or less than nothing, depending on today's date. On any date
/// at least one of them is out of range.
const CALENDAR_TTLS: [&str; 4] = [
    "1 mon -29 days",
    "2 mon -59 days",
    "-1 mon 31 days",
    "-1 mon 30 days 1 second",
];

#[tokio::test]
async fn hole7_calendar_intervals_never_write_a_lease_out_of_range() {
    let s = setup(3).await;
    let c = &s.client;
    let today: String = c.query_one("SELECT now()::text", &[]).await.unwrap().get(0);
    let mut failures = Vec::new();
    let mut seen = Vec::new();
    // The lease a call wrote: expires_at - bumped_at (both from its now()).
    let written = |id: i64| async move {
        let row = c
            .query_one(
                "SELECT extract(epoch FROM expires_at - bumped_at)::float8, expires_at <= now() FROM session_lock.session WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (row.get::<_, f64>(0), row.get::<_, bool>(1))
    };
    for ttl in CALENDAR_TTLS {
        let row = c
            .query_one(
                "SELECT extract(epoch FROM $1::text::interval)::float8, extract(epoch FROM (now() + $1::text::interval) - now())::float8",
                &[&ttl],
            )
            .await
            .unwrap();
        let (nominal, calendar): (f64, f64) = (row.get(0), row.get(1));
        seen.push(format!(
            "'{ttl}': nominal {nominal} s, today by the calendar {calendar} s"
        ));
        // (get_work takes no interval since protocol 2: only the heartbeat
        // renews a lease.)
        for call in ["start_session", "bump_session"] {
            let result = match call {
                "start_session" => c
                    .query_one(
                        "SELECT session_id FROM session_lock.start_session('x', $1::text::interval)",
                        &[&ttl],
                    )
                    .await
                    .map(|r| r.get::<_, i64>(0)),
                _ => {
                    let row = c
                        .query_one(
                            "SELECT session_id, session_token::text FROM session_lock.start_session('x', interval '60 s')",
                            &[],
                        )
                        .await
                        .unwrap();
                    let (id, token): (i64, String) = (row.get(0), row.get(1));
                    c.query_one(
                        "SELECT session_lock.bump_session($1, $2::text::uuid, $3::text::interval)::text",
                        &[&id, &token, &ttl],
                    )
                    .await
                    .map(|_| id)
                }
            };
            match result {
                Err(e) if e.code().map(|c| c.code()) == Some("SL003") => {}
                Err(e) => failures.push(format!("{call}('{ttl}'): error {}", sqlstate(&e))),
                Ok(id) => {
                    let (lease, past) = written(id).await;
                    if lease <= 0.0 || lease > 86_400.0 || past {
                        failures.push(format!(
                            "{call}('{ttl}') was accepted and wrote a lease of {lease} s (expires_at <= now(): {past})"
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "on {today} ({}):\n{}",
        seen.join("; "),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Hole 8: a combined finish-and-tick cannot say what it finished.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hole8_finish_and_work_reports_what_it_finished() {
    let s = setup(10).await;
    let a = start(&s.store, "counts", 10).await;
    let held = work(&s.store, &a).await.unwrap();
    assert_eq!(held.len(), 10);
    let gone = &held[..3];
    s.client
        .execute(
            "UPDATE example_task SET finished_at = now() WHERE id = ANY ($1)",
            &[&gone],
        )
        .await
        .unwrap();
    let r = finish_and_work(&s.store, &a, gone).await.unwrap();
    let by_a: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM example_task WHERE id = ANY ($1) AND finished_by = $2",
            &[&gone, &a.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(by_a, 0, "the table: a finished none of them");
    assert_eq!(
        r.finished,
        Vec::<TaskId>::new(),
        "the call must report that a finished none of {gone:?}"
    );
    // And what it did finish, it reports.
    let r = finish_and_work(&s.store, &a, &held[3..5]).await.unwrap();
    assert_eq!(r.finished, held[3..5].to_vec());
}
