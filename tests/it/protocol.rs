//! The SQL session protocol, exercised through the store against a real
//! Postgres: weighted shares, capacities, rebalancing, expiry, fencing,
//! orphans and reaping.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_lock::{
    Database, Error, GetWork, PgStore, Session, SessionId, SessionStart, SessionToken,
    StoreOptions, TaskId, Work,
};
use session_lock_testkit::example::ExampleTask;

use session_lock_testkit::db::{TestDb, fresh_db, migrated_db};

const TTL: Duration = Duration::from_secs(60);

struct Setup {
    db: TestDb,
    store: PgStore,
    client: tokio_postgres::Client,
}

async fn setup(tasks: usize) -> Setup {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store connects");
    let client = db.client().await;
    seed(&client, tasks).await;
    Setup { db, store, client }
}

async fn seed(client: &tokio_postgres::Client, tasks: usize) -> Vec<TaskId> {
    let rows = client
        .query(
            "INSERT INTO example_task (payload) SELECT 'task ' || g FROM generate_series(1, $1::int) g RETURNING id",
            &[&(tasks as i32)],
        )
        .await
        .expect("seed tasks");
    rows.iter().map(|r| r.get(0)).collect()
}

/// Starts a session of `name` with room for 10 tasks.
async fn start(store: &PgStore, name: &str) -> Session {
    start_cap(store, name, 10).await
}

/// Starts a session of `name` with room for `capacity` tasks.
async fn start_cap(store: &PgStore, name: &str, capacity: u32) -> Session {
    store
        .start_session(&SessionStart::new(name, TTL, capacity))
        .await
        .expect("session starts")
}

async fn work(store: &PgStore, session: &Session) -> Vec<TaskId> {
    try_work(store, session).await.expect("get_work succeeds")
}

async fn try_work(store: &PgStore, session: &Session) -> session_lock::Result<Vec<TaskId>> {
    let w = store.get_work::<ExampleTask>(GetWork::new(session)).await?;
    assert!(
        w.unreadable.is_empty(),
        "every example row scans: {:?}",
        w.unreadable
    );
    Ok(w.tasks.iter().map(|t| t.id).collect())
}

/// get_work finishing `finished` first, with `running` still running in
/// the caller's process.
async fn finish_and_work(
    store: &PgStore,
    session: &Session,
    finished: &[TaskId],
    running: &[TaskId],
) -> session_lock::Result<Work<ExampleTask>> {
    store
        .get_work::<ExampleTask>(GetWork {
            finished,
            running,
            ..GetWork::new(session)
        })
        .await
}

/// A connection of someone else's whose open transaction holds task `id`
/// FOR UPDATE until it rolls back.
async fn lock_row(db: &TestDb, id: TaskId) -> tokio_postgres::Client {
    let foreign = db.client().await;
    foreign
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM example_task WHERE id = {id} FOR UPDATE"
        ))
        .await
        .unwrap();
    foreign
}

/// Marks `ids` as handed out by another server than this one (a server
/// since failed over from, or restarted).
async fn hand_out_elsewhere(client: &tokio_postgres::Client, ids: &[TaskId]) {
    client
        .execute(
            "UPDATE example_task SET sl_server = pg_postmaster_start_time() - interval '1 hour' WHERE id = ANY ($1)",
            &[&ids],
        )
        .await
        .expect("mark as handed out elsewhere");
}

/// Open tasks held per session, from the table itself (None: unowned).
async fn holdings(client: &tokio_postgres::Client) -> BTreeMap<Option<i64>, i64> {
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

/// Makes a session's lease run out now, as if its heartbeats had stopped a
/// TTL ago: deterministic, unlike sleeping past a short TTL.
async fn expire(client: &tokio_postgres::Client, session: SessionId) {
    let n = client
        .execute(
            "UPDATE session_lock.session SET expires_at = now() - interval '1 second', bumped_at = now() - interval '2 seconds' WHERE id = $1",
            &[&session],
        )
        .await
        .expect("expire session");
    assert_eq!(n, 1, "session {session} exists");
}

fn assert_lost(result: session_lock::Result<impl std::fmt::Debug>, what: &str) {
    match result {
        Err(e @ Error::SessionLost { .. }) => {
            assert!(e.is_session_lost());
            assert_eq!(e.db_code(), Some("SL001"));
        }
        other => panic!("{what}: expected SessionLost (SL001), got {other:?}"),
    }
}

#[tokio::test]
async fn shares_are_weighted_by_capacity_and_add_up_to_the_open_tasks() {
    // A session's share: floor(open * (before + C) / W) - floor(open * before / W),
    // at most its capacity C, where W is the live sessions' total capacity
    // and `before` that of the sessions with a lower id. The shares add up
    // to the open tasks (up to W), each within one task of open * C / W.
    // (capacities in session order, tasks, expected holdings after every
    // session ticked twice)
    let cases: &[(&[u32], usize, &[i64])] = &[
        (&[10], 20, &[10]),
        (&[10], 5, &[5]),
        (&[10, 10], 20, &[10, 10]),
        (&[10, 10], 15, &[7, 8]),
        (&[10, 10, 10], 20, &[6, 7, 7]),
        (&[10, 10, 10], 100, &[10, 10, 10]),
        (&[10; 7], 20, &[2, 3, 3, 3, 3, 3, 3]),
        (&[4; 7], 1000, &[4, 4, 4, 4, 4, 4, 4]),
        (&[100, 5], 100, &[95, 5]),
        (&[5, 100], 100, &[4, 96]),
        (&[10, 20, 30], 30, &[5, 10, 15]),
        (&[1, 1000], 500, &[0, 500]),
    ];
    for &(capacities, tasks, expected) in cases {
        let s = setup(tasks).await;
        let mut ids = Vec::new();
        for &c in capacities {
            ids.push(start_cap(&s.store, "share", c).await);
        }
        let mut held = Vec::new();
        for _round in 0..2 {
            held.clear();
            for id in &ids {
                held.push(work(&s.store, id).await.len() as i64);
            }
        }
        assert_eq!(held, expected, "capacities {capacities:?}, {tasks} tasks");
        let table = holdings(&s.client).await;
        let assigned: i64 = table
            .iter()
            .filter(|(k, _)| k.is_some())
            .map(|(_, v)| v)
            .sum();
        assert_eq!(
            assigned,
            expected.iter().sum::<i64>(),
            "the table agrees with what get_work returned"
        );
    }
}

#[tokio::test]
async fn runners_of_different_names_do_not_share_a_count() {
    let s = setup(20).await;
    let a = start_cap(&s.store, "alpha", 15).await;
    let b = start_cap(&s.store, "beta", 15).await;
    // One live session of each name: each counts only itself, so each may
    // take all 20 up to its capacity of 15, and beta gets what alpha left.
    assert_eq!(work(&s.store, &a).await.len(), 15);
    assert_eq!(work(&s.store, &b).await.len(), 5);
}

#[tokio::test]
async fn a_joining_session_gets_its_share_within_two_ticks() {
    let s = setup(20).await;
    let a = start(&s.store, "join").await;
    let b = start(&s.store, "join").await;
    assert_eq!(work(&s.store, &a).await.len(), 10);
    assert_eq!(work(&s.store, &b).await.len(), 10);

    let c = start(&s.store, "join").await;
    // Tick 1 of the newcomer: everything is held, nothing to pick up yet.
    assert_eq!(work(&s.store, &c).await.len(), 0);
    // The incumbents' next ticks release their surplus over their shares
    // of 20 among three: 6 and 7.
    assert_eq!(work(&s.store, &a).await.len(), 6);
    assert_eq!(work(&s.store, &b).await.len(), 7);
    // Tick 2 of the newcomer: it holds the rest, within one of the others.
    assert_eq!(work(&s.store, &c).await.len(), 7);
    let table = holdings(&s.client).await;
    assert_eq!(table.get(&None), None, "no task is left unowned");
}

#[tokio::test]
async fn an_expired_sessions_tasks_move_to_the_survivors() {
    let s = setup(20).await;
    let ids = [
        start(&s.store, "exp").await,
        start(&s.store, "exp").await,
        start(&s.store, "exp").await,
    ];
    for _ in 0..2 {
        for id in &ids {
            work(&s.store, id).await;
        }
    }
    let dead = ids[2].clone();
    let dead_tasks = work(&s.store, &dead).await;
    assert_eq!(dead_tasks.len(), 7);
    expire(&s.client, dead.id).await;

    let a = work(&s.store, &ids[0]).await;
    let b = work(&s.store, &ids[1]).await;
    assert_eq!((a.len(), b.len()), (10, 10), "two survivors split 20 tasks");
    for t in &dead_tasks {
        assert!(
            a.contains(t) || b.contains(t),
            "task {t} of the dead session moved to a survivor"
        );
    }
    let reclaimed: bool = s
        .client
        .query_one(
            "SELECT reclaimed_at IS NOT NULL FROM session_lock.session WHERE id = $1",
            &[&dead.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reclaimed, "the dead session is marked reclaimed");
    assert_lost(
        try_work(&s.store, &dead).await,
        "get_work of the reclaimed session",
    );
}

#[tokio::test]
async fn end_session_frees_its_tasks_on_the_others_next_tick() {
    let s = setup(20).await;
    let a = start_cap(&s.store, "end", 20).await;
    let b = start_cap(&s.store, "end", 20).await;
    assert_eq!(work(&s.store, &a).await.len(), 10);
    assert_eq!(work(&s.store, &b).await.len(), 10);

    assert!(
        s.store.end_session(&b).await.unwrap(),
        "ending a live session reports it"
    );
    assert!(
        !s.store.end_session(&b).await.unwrap(),
        "ending twice is a no-op"
    );
    assert_eq!(
        work(&s.store, &a).await.len(),
        20,
        "a takes everything on its very next tick"
    );
    assert_lost(try_work(&s.store, &b).await, "get_work after end");
}

#[tokio::test]
async fn a_lost_session_gets_sl001_from_bump_get_work_and_finish() {
    let s = setup(5).await;
    let a = start(&s.store, "lost").await;
    let tasks = work(&s.store, &a).await;
    s.store
        .bump_session(&a, TTL)
        .await
        .expect("a live session bumps");
    expire(&s.client, a.id).await;

    assert_lost(s.store.bump_session(&a, TTL).await, "bump");
    assert_lost(try_work(&s.store, &a).await, "get_work");
    assert_lost(
        s.store.finish_tasks::<ExampleTask>(&a, &tasks).await,
        "finish",
    );
    let missing = Session {
        id: 987_654_321,
        token: SessionToken([7; 16]),
    };
    assert_lost(
        s.store.bump_session(&missing, TTL).await,
        "bump of a missing session",
    );
    assert_lost(
        try_work(&s.store, &missing).await,
        "get_work of a missing session",
    );
    // Nothing was finished by the expired session.
    let finished: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM example_task WHERE finished_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(finished, 0);
}

#[tokio::test]
async fn finish_is_fenced_to_the_tasks_the_session_still_holds() {
    let s = setup(10).await;
    let a = start(&s.store, "fence").await;
    let b = start(&s.store, "fence").await;
    let mine = work(&s.store, &a).await;
    let theirs = work(&s.store, &b).await;
    assert_eq!((mine.len(), theirs.len()), (5, 5));

    let mut asked: Vec<TaskId> = mine[..3].to_vec();
    asked.extend(&theirs[..2]);
    asked.push(999_999); // no such task
    let mut done = s
        .store
        .finish_tasks::<ExampleTask>(&a, &asked)
        .await
        .unwrap();
    done.sort();
    assert_eq!(done, mine[..3].to_vec(), "only a's own tasks are finished");
    // Finishing again returns nothing: they are no longer open.
    assert!(
        s.store
            .finish_tasks::<ExampleTask>(&a, &mine[..3])
            .await
            .unwrap()
            .is_empty()
    );

    let rows = s
        .client
        .query(
            "SELECT id, finished_by FROM example_task WHERE finished_at IS NOT NULL ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let finished: Vec<(i64, Option<i64>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        finished,
        mine[..3]
            .iter()
            .map(|&id| (id, Some(a.id)))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_stalled_session_cannot_finish_tasks_that_moved_on() {
    let s = setup(4).await;
    let a = start(&s.store, "stall").await;
    let held = work(&s.store, &a).await;
    assert_eq!(held.len(), 4);
    // a freezes past its TTL; b starts and takes the work over.
    expire(&s.client, a.id).await;
    let b = start(&s.store, "stall").await;
    assert_eq!(work(&s.store, &b).await, held);
    // a wakes up and tries to finish what it was running: rejected.
    assert_lost(
        s.store.finish_tasks::<ExampleTask>(&a, &held).await,
        "stale finish",
    );
    let done = s
        .store
        .finish_tasks::<ExampleTask>(&b, &held)
        .await
        .unwrap();
    assert_eq!(done.len(), 4, "the new holder finishes them");
}

#[tokio::test]
async fn reap_deletes_only_sessions_reclaimed_long_enough_ago() {
    let s = setup(3).await;
    let live = start(&s.store, "reap").await;
    let ended = start(&s.store, "reap").await;
    let expired_elsewhere = start(&s.store, "other-name").await;
    work(&s.store, &ended).await;
    s.store.end_session(&ended).await.unwrap();
    expire(&s.client, expired_elsewhere.id).await;
    // live reclaims `ended` (same name), not `expired_elsewhere`, which
    // holds no task of this table for the sweep to find.
    work(&s.store, &live).await;

    assert_eq!(
        s.store
            .reap_sessions(Duration::from_secs(3600))
            .await
            .unwrap(),
        0,
        "reclaimed just now: younger than the age"
    );
    assert_eq!(s.store.reap_sessions(Duration::ZERO).await.unwrap(), 1);
    let left: Vec<i64> = s
        .client
        .query("SELECT id FROM session_lock.session ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        left,
        vec![live.id, expired_elsewhere.id],
        "the unreclaimed expired session stays until a session of its name reclaims it"
    );
}

#[tokio::test]
async fn bad_arguments_are_rejected_with_a_clear_error() {
    let s = setup(1).await;
    let a = start(&s.store, "args").await;
    for (capacity, what) in [(0, "zero"), (100_000, "enormous")] {
        match s
            .store
            .start_session(&SessionStart::new("args", TTL, capacity))
            .await
        {
            Err(Error::InvalidArgument(msg)) => {
                assert!(
                    msg.contains("capacity"),
                    "{what}: message names the capacity: {msg}"
                )
            }
            other => panic!("{what} capacity: expected InvalidArgument, got {other:?}"),
        }
    }
    match s.store.start_session(&SessionStart::new("", TTL, 10)).await {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains("name"), "{msg}"),
        other => panic!("empty name: expected InvalidArgument, got {other:?}"),
    }
    match s
        .store
        .start_session(&SessionStart::new("x", Duration::ZERO, 10))
        .await
    {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains("ttl"), "{msg}"),
        other => panic!("zero ttl: expected InvalidArgument, got {other:?}"),
    }
    // The session survived the rejected calls and still works.
    assert_eq!(work(&s.store, &a).await.len(), 1);
    drop(s.db);
}

#[tokio::test]
async fn an_unmigrated_database_says_to_run_migrate() {
    let db = fresh_db().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let err = store
        .start_session(&SessionStart::new("x", TTL, 10))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotMigrated { .. }), "got {err:?}");
    assert!(err.to_string().contains("session-lock migrate"), "{err}");
}

/// The generated functions plan each statement once per connection, and
/// a generic plan estimates a LIMIT of a variable at a tenth of the table:
/// where the ids are scattered over the heap (correlation about 0), that
/// makes a sequential scan and a sort look cheaper than the open-task
/// index. The functions keep to their indexes anyway, on every call, with
/// the caller's cost settings as hostile as can be: no call scans the task
/// table (the transaction's count of its sequential scans stays 0),
/// through pickups, finishes, round-robin probes, counts (a session that
/// has not ticked yet keeps the others off the fast path) and the sweep.
/// A caller that names the tasks its last answer gave it (`known`) gets
/// the answer a range read gives: its open tasks and what it picks up now;
/// ids of other sessions' tasks, finished ones and ids no row has change
/// nothing.
#[tokio::test]
async fn a_get_work_that_names_what_its_session_holds_answers_as_a_range_read_does() {
    let Setup { store, client, .. } = setup(30).await;
    let a = start(&store, "known").await;
    let b = start(&store, "known").await;
    let mine = work(&store, &a).await;
    let theirs = work(&store, &b).await;
    assert_eq!((mine.len(), theirs.len()), (10, 10));
    let mut naming: Vec<TaskId> = mine.iter().chain(&theirs).copied().collect();
    naming.push(1_000_000_000_000);
    let w = store
        .get_work::<ExampleTask>(GetWork {
            finished: &mine[..3],
            known: Some(&naming),
            ..GetWork::new(&a)
        })
        .await
        .expect("get_work naming what it holds");
    assert_eq!(w.finished, mine[..3].to_vec(), "the finish as usual");
    let held: Vec<TaskId> = w.tasks.iter().map(|t| t.id).collect();
    assert_eq!(held.len(), 10, "the 7 kept and 3 picked up: {held:?}");
    assert!(mine[3..].iter().all(|t| held.contains(t)), "kept: {held:?}");
    assert!(
        theirs.iter().all(|t| !held.contains(t)),
        "another session's tasks, though named, are not the caller's: {held:?}"
    );
    let in_table: Vec<TaskId> = client
        .query(
            "SELECT id FROM example_task WHERE session_id = $1 AND finished_at IS NULL ORDER BY id",
            &[&a.id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(held, in_table, "the answer is the table's, in pickup order");
    assert_eq!(held_counters(&client).await[&a.id], 10);
    let again = store
        .get_work::<ExampleTask>(GetWork::new(&a))
        .await
        .expect("get_work reading the range");
    let by_range: Vec<TaskId> = again.tasks.iter().map(|t| t.id).collect();
    assert_eq!(by_range, held, "a range read agrees");
}

/// What a get_work of `session` finishing `finished` answers, with the
/// finished ids in one array or a row each (`array`): per row, sl_finished,
/// sl_finished_ids and the task id. In a transaction rolled back, so that
/// both shapes answer from the same state.
async fn answer_rows(
    client: &mut tokio_postgres::Client,
    session: &Session,
    finished: &[TaskId],
    array: bool,
) -> Vec<(Option<TaskId>, Option<Vec<TaskId>>, Option<TaskId>)> {
    let tx = client.transaction().await.unwrap();
    let rows = tx
        .query(
            "SELECT w.sl_finished, w.sl_finished_ids, w.id
               FROM session_lock.example_task_get_work($1, $2, $3, '{}', true, NULL, $4) w",
            &[&session.id, &session.token, &finished, &array],
        )
        .await
        .expect("get_work");
    tx.rollback().await.unwrap();
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// A runner asks for the finished ids in one row (`sl_finished_ids`); an
/// older runner's call, without the last argument, still gets a row per
/// id (`sl_finished`). Either way the same ids, the same tasks after them,
/// and an id the call did not finish (another session's) in neither.
#[tokio::test]
async fn get_work_answers_the_finished_ids_in_one_row_or_a_row_each() {
    let Setup {
        store, mut client, ..
    } = setup(20).await;
    let a = start(&store, "answer").await;
    let b = start(&store, "answer").await;
    let mine = work(&store, &a).await;
    let theirs = work(&store, &b).await;
    assert_eq!((mine.len(), theirs.len()), (10, 10));
    let mut finishing = mine[..4].to_vec();
    finishing.push(theirs[0]);

    let array = answer_rows(&mut client, &a, &finishing, true).await;
    assert_eq!(
        array[0],
        (None, Some(mine[..4].to_vec()), None),
        "one row of finished ids first, the rest of it NULL: {array:?}"
    );
    let held: Vec<TaskId> = array[1..]
        .iter()
        .map(|row| match row {
            (None, None, Some(id)) => *id,
            other => panic!("a held task's row, the finished columns NULL: {other:?}"),
        })
        .collect();
    assert_eq!(held, mine[4..].to_vec());

    let each = answer_rows(&mut client, &a, &finishing, false).await;
    let expected: Vec<_> = mine[..4]
        .iter()
        .map(|id| (Some(*id), None, None))
        .chain(held.iter().map(|id| (None, None, Some(*id))))
        .collect();
    assert_eq!(each, expected, "an older runner's answer");
    // The call of an older runner: five arguments, the same rows.
    let tx = client.transaction().await.unwrap();
    let older: Vec<Option<TaskId>> = tx
        .query(
            "SELECT w.sl_finished FROM session_lock.example_task_get_work($1, $2, $3, '{}', true) w",
            &[&a.id, &a.token, &finishing],
        )
        .await
        .expect("get_work with five arguments")
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.rollback().await.unwrap();
    assert_eq!(older, expected.iter().map(|r| r.0).collect::<Vec<_>>());

    // Nothing finished: no finished row at all.
    let none = answer_rows(&mut client, &a, &[theirs[1]], true).await;
    assert!(
        none.iter()
            .all(|(f, ids, id)| f.is_none() && ids.is_none() && id.is_some()),
        "{none:?}"
    );
    assert_eq!(none.len(), 10);
    // And the store reads the one row.
    let w = finish_and_work(&store, &a, &finishing, &[]).await.unwrap();
    assert_eq!(w.finished, mine[..4].to_vec());
    let kept: Vec<TaskId> = w.tasks.iter().map(|t| t.id).collect();
    assert_eq!(kept, mine[4..].to_vec(), "nothing free to pick up");
}

/// Named tasks are looked up by key, one probe of the primary key each,
/// never by reading the session's stretch of the open index (where a
/// snapshot held elsewhere keeps a dead entry for every task it held), and
/// whatever the statistics: here the open index is small, which is when a
/// range read filtered by the ids looks cheapest to the planner.
#[tokio::test]
async fn named_tasks_are_looked_up_by_key_not_read_from_the_range() {
    let Setup { store, client, .. } = setup(10).await;
    let a = start(&store, "by-key").await;
    let mine = work(&store, &a).await;
    assert_eq!(mine.len(), 10, "all there is: no free task left to count");
    client.batch_execute("ANALYZE example_task").await.unwrap();
    // At capacity, finishing nothing: the call counts what it holds and
    // answers, both by key (the finish, not tested here, updates its ids
    // where the plan finds them).
    let rows = client
        .query(
            "WITH w AS (SELECT * FROM session_lock.example_task_get_work($1, $2, '{}', '{}', false, $3))
             SELECT (SELECT count(*) FROM w WHERE w.sl_finished IS NULL),
                    pg_stat_get_xact_tuples_returned('example_task_open_idx'::regclass),
                    pg_stat_get_xact_numscans('example_task_pkey'::regclass)",
            &[&a.id, &a.token, &mine],
        )
        .await
        .expect("get_work naming its tasks");
    let (held, from_range, probes): (i64, i64, i64) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!(held, 10);
    assert_eq!(
        from_range, 0,
        "no entry of the session's range read ({probes} primary-key scans)"
    );
    assert!(probes > 0, "looked up by key");
}

/// Named tasks are trusted only on the server whose answers named them:
/// after a failover or a restart the rows may be older than what the
/// caller read (a finish lost with the old primary leaves its task held),
/// so the first call there reads the session's whole range, and records the
/// server.
#[tokio::test]
async fn on_another_server_a_call_naming_its_tasks_reads_the_whole_range() {
    let Setup { store, client, .. } = setup(20).await;
    let a = start(&store, "known-server").await;
    let mine = work(&store, &a).await;
    assert_eq!(mine.len(), 10);
    // As if the finish of mine[0] had been answered, and then lost.
    let naming = &mine[1..];
    client
        .execute(
            "UPDATE session_lock.session SET server = server - interval '1 hour' WHERE id = $1",
            &[&a.id],
        )
        .await
        .unwrap();
    let w = store
        .get_work::<ExampleTask>(GetWork {
            known: Some(naming),
            ..GetWork::new(&a)
        })
        .await
        .unwrap();
    let held: Vec<TaskId> = w.tasks.iter().map(|t| t.id).collect();
    assert_eq!(
        held, mine,
        "the whole range, with the task the caller no longer named"
    );
    let recorded: bool = client
        .query_one(
            "SELECT server = pg_postmaster_start_time() FROM session_lock.session WHERE id = $1",
            &[&a.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(recorded, "the call records the server it ran on");
    assert_eq!(held_counters(&client).await[&a.id], 10);
}

#[tokio::test]
async fn get_work_keeps_to_the_indexes_whatever_the_statistics_say() {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store connects");
    let mut client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO example_task (id, payload, tenant)
             SELECT g, 'task ' || g, CASE WHEN g % 3 = 0 THEN 't' || (g % 7) END
               FROM generate_series(1, 100000) g ORDER BY random();
             SELECT setval('example_task_id_seq', 100000);
             ANALYZE example_task;
             SET random_page_cost = 1000;
             SET plan_cache_mode = force_custom_plan;",
        )
        .await
        .expect("seed scattered tasks");
    let correlation: f32 = client
        .query_one(
            "SELECT correlation FROM pg_stats WHERE tablename = 'example_task' AND attname = 'id'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(correlation.abs() < 0.1, "ids scattered: {correlation}");
    let big = start_cap(&store, "scan", 100).await;
    let small = start_cap(&store, "scan", 5).await;
    let _not_ticked = start_cap(&store, "scan", 10).await;
    let mut finished: HashMap<SessionId, Vec<TaskId>> = HashMap::new();
    // What each session's previous answer named: passed in two rounds of
    // three (the lookup by key), not in the third (the range read).
    let mut known: HashMap<SessionId, Vec<TaskId>> = HashMap::new();
    for round in 0..8 {
        for session in [&big, &small] {
            let tx = client.transaction().await.unwrap();
            let knowing = known.remove(&session.id).filter(|_| round % 3 != 0);
            let rows = tx
                .query(
                    "SELECT w.sl_finished, w.id
                       FROM session_lock.example_task_get_work($1, $2, $3, '{}', $4, $5) AS w",
                    &[
                        &session.id,
                        &session.token,
                        &finished.remove(&session.id).unwrap_or_default(),
                        &(round % 2 == 0),
                        &knowing,
                    ],
                )
                .await
                .expect("get_work");
            let scans: i64 = tx
                .query_one(
                    "SELECT pg_stat_get_xact_numscans('example_task'::regclass)",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            tx.commit().await.unwrap();
            assert_eq!(
                scans, 0,
                "round {round}, session {}: get_work scanned the task table",
                session.id
            );
            let held: Vec<TaskId> = rows
                .iter()
                .filter(|r| r.get::<_, Option<TaskId>>(0).is_none())
                .map(|r| r.get(1))
                .collect();
            assert!(
                !held.is_empty(),
                "round {round}: session {} got work",
                session.id
            );
            // Finish half of what is held: the other half stays, so later
            // calls count and top up rather than only refill.
            finished.insert(session.id, held[..held.len() / 2].to_vec());
            known.insert(session.id, held);
        }
    }
}

/// A tiny deterministic generator, so a failing interleaving can be replayed.
fn next(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sessions_never_hold_the_same_task() {
    const SESSIONS: usize = 8;
    const TICKS: usize = 40;
    let s = setup(400).await;
    // Which session believes it holds each task. A session claims its tasks
    // after get_work commits and drops its claims before its next get_work,
    // so its beliefs always lie inside its real holding in the database: two
    // claims on one task can only mean the database handed one task to two
    // live sessions.
    let claims: Arc<Mutex<HashMap<TaskId, SessionId>>> = Arc::default();
    let mut handles = Vec::new();
    for n in 0..SESSIONS {
        // Each session gets its own pooled store, hence its own connections.
        let store = PgStore::connect(&s.db.url).await.unwrap();
        let claims = claims.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = 0x5eed_u64 + n as u64;
            // Half the sessions join late, so surplus is released and
            // re-picked while others run.
            if n % 2 == 1 {
                tokio::task::yield_now().await;
            }
            // Sessions of every capacity from 3 to 10.
            let capacity = 3 + (next(&mut rng) % 8) as u32;
            let mut session = start_cap(&store, "race", capacity).await;
            let mut mine: Vec<TaskId> = Vec::new();
            let mut finished = 0usize;
            for tick in 0..TICKS {
                claims.lock().unwrap().retain(|_, s| *s != session.id);
                if n % 3 == 0 && tick == TICKS / 2 {
                    // Leave and rejoin under a new session mid-run.
                    store.end_session(&session).await.unwrap();
                    session = start_cap(&store, "race", capacity).await;
                }
                mine = work(&store, &session).await;
                {
                    let mut claims = claims.lock().unwrap();
                    for &t in &mine {
                        if let Some(other) = claims.insert(t, session.id) {
                            panic!(
                                "task {t} is held by session {other} and handed to {} too",
                                session.id
                            );
                        }
                    }
                }
                let some: Vec<TaskId> = mine
                    .iter()
                    .copied()
                    .filter(|_| next(&mut rng) % 3 == 0)
                    .collect();
                let done = store
                    .finish_tasks::<ExampleTask>(&session, &some)
                    .await
                    .unwrap();
                assert_eq!(
                    done.len(),
                    some.len(),
                    "a live session finishes every task it holds"
                );
                finished += done.len();
            }
            let _ = mine;
            finished
        }));
    }
    let mut finished = 0;
    for h in handles {
        finished += h.await.expect("session task panicked");
    }
    let rows: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM example_task WHERE finished_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows as usize, finished,
        "every reported finish is in the table, once"
    );
    assert!(finished > 0);
    // Eight sessions picking up, releasing, finishing, ending and rejoining
    // at once left every counter equal to what its session holds.
    assert_counters_match(&s.client, "the race").await;
}

/// A task type whose scan is wrong for the example table: `payload` is TEXT.
#[derive(Debug)]
struct MisreadTask {
    id: TaskId,
}

impl session_lock::Task for MisreadTask {
    fn id(&self) -> TaskId {
        self.id
    }
}

impl session_lock::ScanTask for MisreadTask {
    const QUERIES: session_lock::TaskQueries = session_lock::task_queries!("example_task");

    fn scan(row: &tokio_postgres::Row) -> Result<Self, session_lock::ScanError> {
        let id = session_lock::column(row, None, "id")?;
        let _: i64 = session_lock::column(row, Some(id), "payload")?;
        Ok(MisreadTask { id })
    }
}

#[tokio::test]
async fn a_row_that_does_not_scan_is_reported_by_column_and_stays_assigned() {
    let s = setup(2).await;
    let a = start(&s.store, "scan").await;
    let work = s
        .store
        .get_work::<MisreadTask>(GetWork::new(&a))
        .await
        .expect("get_work itself succeeds");
    assert!(work.tasks.is_empty());
    assert_eq!(work.unreadable.len(), 2, "both rows are reported");
    let e = &work.unreadable[0];
    assert_eq!(e.column, "payload");
    assert!(e.task_id.is_some());
    assert!(e.to_string().contains("`payload`"), "{e}");
    // Nothing was dropped: the tasks are still held by the session.
    assert_eq!(holdings(&s.client).await.get(&Some(a.id)), Some(&2));
}

#[tokio::test]
async fn pooled_connections_carry_the_statement_timeout() {
    let s = setup(0).await;
    let conn = s.store.client().await.expect("a pooled connection");
    let row = conn.query_one("SHOW statement_timeout", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "30s");
    let row = conn.query_one("SHOW application_name", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "session-lock");
}

#[tokio::test]
async fn shares_stay_within_one_and_a_joiner_gets_its_share_in_two_ticks_under_the_cap() {
    // The benchmark's case: 16 sessions, 115 tasks (under the cap of 10).
    // With ceil(open / live) for everyone, early tickers took 8 each and
    // the last ones 3 and 0.
    let s = setup(115).await;
    let mut ids = Vec::new();
    for _ in 0..16 {
        ids.push(start(&s.store, "fair").await);
    }
    let mut held = Vec::new();
    for _ in 0..2 {
        held.clear();
        for id in &ids {
            held.push(work(&s.store, id).await.len());
        }
    }
    assert_eq!(held.iter().sum::<usize>(), 115, "every task is held");
    let (min, max) = (held.iter().min().unwrap(), held.iter().max().unwrap());
    assert!(max - min <= 1, "spread at most 1: {held:?}");

    // 4 sessions and 31 tasks, then a fifth joins: 31 / 5 = 6 rest 1.
    let s = setup(31).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(start(&s.store, "join-fair").await);
    }
    for id in &ids {
        work(&s.store, id).await;
    }
    let joiner = start(&s.store, "join-fair").await;
    ids.push(joiner);
    let mut held = Vec::new();
    for _round in 0..2 {
        held.clear();
        for id in &ids {
            held.push(work(&s.store, id).await.len());
        }
    }
    assert_eq!(
        held,
        vec![6, 6, 6, 6, 7],
        "the joiner holds its share after two ticks"
    );
}

/// Each session's `held` counter, as the other sessions read it.
async fn held_counters(client: &tokio_postgres::Client) -> BTreeMap<i64, i64> {
    client
        .query(
            "SELECT id, held::bigint FROM session_lock.session WHERE reclaimed_at IS NULL",
            &[],
        )
        .await
        .expect("read held counters")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Open tasks held by each holding session, in session order.
async fn held_per_session(client: &tokio_postgres::Client) -> Vec<i64> {
    holdings(client)
        .await
        .into_iter()
        .filter_map(|(session, n)| session.map(|_| n))
        .collect()
}

/// Every unreclaimed session's counter equals the open tasks it holds.
async fn assert_counters_match(client: &tokio_postgres::Client, after: &str) {
    let table = holdings(client).await;
    for (session, counter) in held_counters(client).await {
        let actual = table.get(&Some(session)).copied().unwrap_or(0);
        assert_eq!(
            counter, actual,
            "after {after}: session {session}'s held counter says {counter}, it holds {actual}"
        );
    }
}

#[tokio::test]
async fn held_counters_follow_pickup_release_finish_and_reclaim() {
    // get_work counts the tasks of the other live sessions by their held
    // counters instead of walking them, so a counter that drifted would
    // skew every share: check it after each kind of change.
    let s = setup(25).await;
    let ids = [
        start(&s.store, "held").await,
        start(&s.store, "held").await,
        start(&s.store, "held").await,
    ];
    for _ in 0..2 {
        for id in &ids {
            work(&s.store, id).await;
        }
    }
    assert_counters_match(&s.client, "pickup").await;
    assert_eq!(
        held_counters(&s.client)
            .await
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![8, 8, 9]
    );

    // The fenced finish.
    let a_tasks = work(&s.store, &ids[0]).await;
    let done = s
        .store
        .finish_tasks::<ExampleTask>(&ids[0], &a_tasks[..5])
        .await
        .expect("finish");
    assert_eq!(done.len(), 5);
    assert_counters_match(&s.client, "finish_tasks").await;

    // The finish inside get_work.
    let b_tasks = work(&s.store, &ids[1]).await;
    let w = finish_and_work(&s.store, &ids[1], &b_tasks[..3], &[])
        .await
        .expect("finish and get");
    assert_eq!(
        w.finished,
        b_tasks[..3].to_vec(),
        "it says what it finished"
    );
    assert!(w.tasks.iter().all(|t| !b_tasks[..3].contains(&t.id)));
    assert_counters_match(&s.client, "get_work with finished ids").await;

    // 17 open tasks now: the session above its share releases the surplus
    // and two more ticks each settle 5, 6, 6.
    for _ in 0..2 {
        for id in &ids {
            work(&s.store, id).await;
        }
    }
    assert_counters_match(&s.client, "rebalancing").await;
    assert_eq!(held_per_session(&s.client).await, vec![5, 6, 6]);

    // A new session joins: 17 among 4 gives 4, 4, 4, 5; the others release.
    let d = start(&s.store, "held").await;
    for _ in 0..2 {
        for id in ids.iter().chain([&d]) {
            work(&s.store, id).await;
        }
    }
    assert_counters_match(&s.client, "release to a joiner").await;
    assert_eq!(held_per_session(&s.client).await, vec![4, 4, 4, 5]);

    // An expired session's tasks are reclaimed, and its counter with them.
    expire(&s.client, ids[2].id).await;
    work(&s.store, &ids[0]).await;
    let reclaimed: i32 = s
        .client
        .query_one(
            "SELECT held FROM session_lock.session WHERE id = $1 AND reclaimed_at IS NOT NULL",
            &[&ids[2].id],
        )
        .await
        .expect("the expired session is reclaimed")
        .get(0);
    assert_eq!(reclaimed, 0);
    assert_counters_match(&s.client, "reclaim").await;
    for id in [&ids[1], &d, &ids[0]] {
        work(&s.store, id).await;
    }
    assert_counters_match(&s.client, "after the reclaim").await;
    let table = holdings(&s.client).await;
    assert_eq!(table.get(&None), None, "no task is left free: {table:?}");
    assert_eq!(table.values().sum::<i64>(), 17, "{table:?}");
}

#[tokio::test]
async fn a_share_ignores_a_counter_that_drifted_once_its_session_ticks() {
    // Tasks finished behind session-lock's back (a direct UPDATE) leave
    // their session's counter high until that session's next get_work:
    // the others see a larger backlog for that long, never a smaller one,
    // so nothing is released early and nobody is starved.
    let s = setup(20).await;
    let (a, b) = (
        start(&s.store, "drift").await,
        start(&s.store, "drift").await,
    );
    for _ in 0..2 {
        work(&s.store, &a).await;
        work(&s.store, &b).await;
    }
    s.client
        .execute(
            "UPDATE example_task SET finished_at = now() WHERE session_id = $1",
            &[&a.id],
        )
        .await
        .expect("finish a's tasks directly");
    // b still believes a holds 10: 10 + 10 = 20 open, b keeps its 10.
    assert_eq!(work(&s.store, &b).await.len(), 10);
    // a's own tick corrects its counter (it counts its own tasks); nothing
    // is free yet, and with 10 open tasks left b gives 5 back on its next
    // tick, which a then picks up.
    assert_eq!(work(&s.store, &a).await.len(), 0);
    assert_counters_match(&s.client, "a's tick").await;
    assert_eq!(work(&s.store, &b).await.len(), 5);
    assert_eq!(work(&s.store, &a).await.len(), 5);
    assert_counters_match(&s.client, "both ticked").await;
}

#[tokio::test]
async fn a_pickup_that_proves_a_full_backlog_stands_in_for_the_count() {
    // When the other sessions' counters leave no more free tasks to find
    // than this session wants, get_work picks up first and counts only if
    // the pickup came up short. Both ways must give the same shares.
    let s = setup(20).await;
    let (a, b) = (
        start(&s.store, "proof").await,
        start(&s.store, "proof").await,
    );
    assert_eq!(work(&s.store, &a).await.len(), 10, "a counts: 20 open");
    // b: a holds 10, so 10 more make the bound of 20: the pickup decides.
    let b_tasks = work(&s.store, &b).await;
    assert_eq!(b_tasks.len(), 10, "b's pickup finds all 10");
    assert_counters_match(&s.client, "a full pickup").await;

    // b finishes everything and 5 new tasks arrive: 15 open. b's pickup
    // comes up short (5 of 10), so it counts: 15 between two gives b (the
    // younger) 8, of which only the 5 free ones are there to take.
    s.store
        .finish_tasks::<ExampleTask>(&b, &b_tasks)
        .await
        .expect("finish");
    seed(&s.client, 5).await;
    assert_eq!(work(&s.store, &b).await.len(), 5);
    assert_counters_match(&s.client, "a short pickup").await;
    // a's share is now 7: it releases 3, which b then picks up.
    assert_eq!(work(&s.store, &a).await.len(), 7);
    assert_eq!(work(&s.store, &b).await.len(), 8);
    assert_counters_match(&s.client, "settled").await;
    assert_eq!(held_per_session(&s.client).await, vec![7, 8]);
}

/// A task table of another shape than the example's: its own key name, an
/// open state instead of a timestamp, a priority order, and functions of
/// another prefix.
#[derive(Debug)]
struct Job {
    id: TaskId,
    priority: i32,
}

impl session_lock::Task for Job {
    fn id(&self) -> TaskId {
        self.id
    }
}

impl session_lock::ScanTask for Job {
    const QUERIES: session_lock::TaskQueries = session_lock::task_queries!("jobq");

    fn scan(row: &tokio_postgres::Row) -> Result<Self, session_lock::ScanError> {
        let id = session_lock::column(row, None, "job_id")?;
        Ok(Job {
            id,
            priority: session_lock::column(row, Some(id), "priority")?,
        })
    }
}

#[tokio::test]
async fn two_declared_tables_and_three_names_share_one_database() {
    let s = setup(12).await;
    s.client
        .batch_execute(
            "CREATE TABLE public.jobs (
                 job_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 state    text NOT NULL DEFAULT 'new',
                 priority int NOT NULL,
                 done_by  bigint);
             SELECT session_lock.declare_task_table('public.jobs',
                 id_column => 'job_id', open_when => 'state <> ''done''',
                 finish => 'state = ''done''', finished_by => 'done_by',
                 order_by => 'priority DESC, job_id', fn_prefix => 'jobq');
             INSERT INTO public.jobs (priority) SELECT g % 5 FROM generate_series(1, 20) g;",
        )
        .await
        .unwrap();
    // Two names on the example table, one on the jobs table.
    let e1 = start_cap(&s.store, "example-a", 6).await;
    let e2 = start_cap(&s.store, "example-b", 6).await;
    let j = start_cap(&s.store, "jobs", 4).await;
    assert_eq!(work(&s.store, &e1).await.len(), 6);
    assert_eq!(work(&s.store, &e2).await.len(), 6);
    let jobs = s
        .store
        .get_work::<Job>(GetWork::new(&j))
        .await
        .expect("get_work on the jobs table");
    let priorities: Vec<i32> = jobs.tasks.iter().map(|t| t.priority).collect();
    assert_eq!(priorities, vec![4, 4, 4, 4], "picked up by priority");
    let ids: Vec<TaskId> = jobs.tasks.iter().map(|t| t.id).collect();
    let w = s
        .store
        .get_work::<Job>(GetWork {
            finished: &ids,
            ..GetWork::new(&j)
        })
        .await
        .unwrap();
    assert_eq!(w.finished, ids, "the finish of another table's shape");
    let done: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM public.jobs WHERE state = 'done' AND done_by = $1",
            &[&j.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(done, 4);
    // The tables never touch each other's tasks.
    assert_eq!(
        holdings(&s.client).await.values().sum::<i64>(),
        12,
        "the example's tasks are all still open"
    );
}

#[tokio::test]
async fn a_task_still_running_is_never_given_back_as_surplus() {
    let s = setup(20).await;
    let a = start(&s.store, "running").await;
    let mine = work(&s.store, &a).await;
    assert_eq!(mine.len(), 10);
    let b = start(&s.store, "running").await;
    assert_eq!(work(&s.store, &b).await.len(), 10);
    // A third session joins: a's share drops to 6, but 7 of its tasks are
    // still running in its process: only the other 3 may go.
    let c = start(&s.store, "running").await;
    work(&s.store, &c).await;
    let running = &mine[..7];
    let w = finish_and_work(&s.store, &a, &[], running).await.unwrap();
    let held: Vec<TaskId> = w.tasks.iter().map(|t| t.id).collect();
    assert_eq!(held.len(), 7, "{held:?}");
    for t in running {
        assert!(held.contains(t), "running task {t} kept");
    }
    // Once they returned, the share applies.
    assert_eq!(work(&s.store, &a).await.len(), 6);
}

/// Whether a get_work of `session`, with `finished` and `running`, wrote
/// anything (took a transaction id): in a transaction of its own, rolled
/// back.
async fn get_work_writes(
    client: &mut tokio_postgres::Client,
    session: &Session,
    finished: &[TaskId],
    running: &[TaskId],
) -> bool {
    let tx = client.transaction().await.unwrap();
    tx.query(
        "SELECT * FROM session_lock.example_task_get_work($1, $2, $3, $4, true)",
        &[&session.id, &session.token, &finished, &running],
    )
    .await
    .expect("get_work");
    let xid: Option<String> = tx
        .query_one("SELECT pg_current_xact_id_if_assigned()::text", &[])
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();
    xid.is_some()
}

#[tokio::test]
async fn an_idle_get_work_writes_nothing_and_a_busy_one_holds_its_lease() {
    let mut s = setup(4).await;
    let a = start(&s.store, "idle").await;
    let b = start(&s.store, "idle").await;
    let mine = work(&s.store, &a).await;
    work(&s.store, &b).await;
    assert_eq!(mine.len(), 2, "{mine:?}");
    // Settled: every task held, each session at its share.
    assert!(
        !get_work_writes(&mut s.client, &a, &[], &mine).await,
        "a settled get_work with nothing to finish takes no transaction id"
    );
    // An idle fleet: nothing open at all.
    s.client
        .batch_execute("UPDATE example_task SET finished_at = now()")
        .await
        .unwrap();
    work(&s.store, &a).await;
    work(&s.store, &b).await;
    assert!(!get_work_writes(&mut s.client, &b, &[], &[]).await);
    // On an empty queue a session of the name that ended is still
    // reclaimed by the next idle call.
    let c = start(&s.store, "idle").await;
    assert!(s.store.end_session(&c).await.unwrap());
    work(&s.store, &b).await;
    let reclaimed: bool = s
        .client
        .query_one(
            "SELECT reclaimed_at IS NOT NULL FROM session_lock.session WHERE id = $1",
            &[&c.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        reclaimed,
        "the ended session is reclaimed on an empty queue"
    );
    assert!(!get_work_writes(&mut s.client, &b, &[], &[]).await);
    // Work to do (b's share of one task, the later session's): the lease
    // is held, against reclaimers, until commit.
    seed(&s.client, 1).await;
    assert!(!get_work_writes(&mut s.client, &a, &[], &[]).await);
    assert!(get_work_writes(&mut s.client, &b, &[], &[]).await);
    let tx = s.client.transaction().await.unwrap();
    let rows = tx
        .query(
            "SELECT w.id FROM session_lock.example_task_get_work($1, $2, '{}', '{}', true) w",
            &[&b.id, &b.token],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "b picked the task up");
    let reclaimer = s.db.client().await;
    let locked = reclaimer
        .query(
            "SELECT id FROM session_lock.session WHERE id = $1 FOR UPDATE SKIP LOCKED",
            &[&b.id],
        )
        .await
        .unwrap();
    assert!(locked.is_empty(), "a reclaimer skips a session at work");
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_completed_task_someone_else_has_locked_stays_held_until_it_can_be_finished() {
    let s = setup(4).await;
    let a = start(&s.store, "locked").await;
    let held = work(&s.store, &a).await;
    let foreign = lock_row(&s.db, held[0]).await;
    let started = std::time::Instant::now();
    let w = finish_and_work(&s.store, &a, &held[..2], &[])
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the locked row was waited for briefly, not for long: {:?}",
        started.elapsed()
    );
    assert_eq!(w.finished, vec![held[1]], "the unlocked one is finished");
    let still: Vec<TaskId> = w.tasks.iter().map(|t| t.id).collect();
    assert!(still.contains(&held[0]), "the locked one is still held");
    foreign.batch_execute("ROLLBACK").await.unwrap();
    let w = finish_and_work(&s.store, &a, &held[..1], &[])
        .await
        .unwrap();
    assert_eq!(w.finished, vec![held[0]], "finished once the lock is gone");
}

#[tokio::test]
async fn a_finish_that_gave_up_on_a_locked_row_waits_for_the_table_under_the_declared_lock_timeout()
{
    // The finish waits at most 100 ms for a row, then skips locked rows;
    // that second try waits for the table itself (here behind a queued
    // ACCESS EXCLUSIVE) under the declaration's lock_timeout (1 s), not
    // the 100 ms meant for rows.
    let s = setup(4).await;
    let a = start(&s.store, "behind-ddl").await;
    let held = work(&s.store, &a).await;
    let foreign = lock_row(&s.db, held[0]).await;
    let ddl = s.db.client().await;
    let ddl_pid: i32 = ddl
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let queued = tokio::spawn(async move {
        ddl.batch_execute("BEGIN; LOCK TABLE example_task IN ACCESS EXCLUSIVE MODE; ROLLBACK")
            .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !s
        .client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)",
            &[&ddl_pid],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(std::time::Instant::now() < deadline, "the DDL never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = std::time::Instant::now();
    let err = finish_and_work(&s.store, &a, &held[..2], &[])
        .await
        .expect_err("the table stays locked past the lock_timeout");
    let waited = started.elapsed();
    assert!(err.is_transient(), "a lock timeout, to retry: {err:?}");
    assert!(
        waited >= Duration::from_millis(900),
        "gave up on the table after {waited:?}: the row's 100 ms, not the declared 1 s"
    );
    foreign.batch_execute("ROLLBACK").await.unwrap();
    queued.await.unwrap().unwrap();
    let w = finish_and_work(&s.store, &a, &held[..2], &[])
        .await
        .unwrap();
    let mut finished = w.finished;
    finished.sort_unstable();
    assert_eq!(finished, held[..2].to_vec(), "finished once the locks go");
}

#[tokio::test]
async fn the_first_releases_calls_are_refused_as_another_protocol() {
    let s = setup(2).await;
    let a = start(&s.store, "old").await;
    // A session a runner of the first release left behind.
    let old: i64 = s
        .client
        .query_one(
            "UPDATE session_lock.session SET protocol = 1 WHERE id = $1 RETURNING id",
            &[&a.id],
        )
        .await
        .unwrap()
        .get(0);
    for (sql, with_session) in [
        (
            "SELECT session_lock.start_session('old', interval '1 minute', 'host', 1)",
            false,
        ),
        (
            "SELECT session_lock.bump_session($1, interval '1 minute')",
            true,
        ),
        (
            "SELECT session_lock.work_begin($1, 10, interval '1 minute')",
            true,
        ),
        ("SELECT session_lock.lock_session($1)", true),
    ] {
        let err = if with_session {
            s.client.query(sql, &[&old]).await
        } else {
            s.client.query(sql, &[]).await
        }
        .expect_err(sql);
        let db = err.as_db_error().unwrap();
        assert_eq!(db.code().code(), "SL004", "{sql}: {}", db.message());
        assert!(
            db.message().contains("protocol 1"),
            "{sql}: {}",
            db.message()
        );
        assert!(
            db.hint().unwrap_or("").contains("Upgrade session-lock"),
            "{sql}: {:?}",
            db.hint()
        );
    }
    // Through the store, the refusal is a typed error.
    match s.store.bump_session(&a, TTL).await {
        Err(Error::ProtocolMismatch { detail }) => {
            assert!(detail.contains("protocol 1"), "{detail}")
        }
        other => panic!("expected ProtocolMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn a_session_answers_only_to_its_token() {
    let s = setup(6).await;
    let a = start(&s.store, "owned").await;
    let held = work(&s.store, &a).await;
    assert_eq!(held.len(), 6);
    // Someone with the same role and a's id, but not its token.
    let forged = Session {
        id: a.id,
        token: SessionToken([0x5a; 16]),
    };
    assert_lost(
        s.store.bump_session(&forged, TTL).await,
        "a forged heartbeat",
    );
    assert_lost(try_work(&s.store, &forged).await, "a forged get_work");
    assert_lost(
        s.store.finish_tasks::<ExampleTask>(&forged, &held).await,
        "a forged finish",
    );
    assert!(
        !s.store.end_session(&forged).await.unwrap(),
        "a forged end ends nothing"
    );
    // a is untouched: live, holding its tasks, nothing finished.
    assert_eq!(work(&s.store, &a).await, held);
    assert_eq!(holdings(&s.client).await.get(&Some(a.id)), Some(&6));
    s.store.bump_session(&a, TTL).await.expect("a renews");
    // Nor does an operator's end by id need the token.
    let ended: bool = s
        .client
        .query_one("SELECT session_lock.end_session($1::bigint)", &[&a.id])
        .await
        .unwrap()
        .get(0);
    assert!(ended, "the operator ends a by id");
    assert_lost(
        try_work(&s.store, &a).await,
        "a after the operator ended it",
    );
}

/// `quiet` for `session`, which must answer.
async fn quiet(store: &PgStore, session: &Session) -> bool {
    store
        .quiet::<ExampleTask>(session)
        .await
        .expect("quiet answers")
}

/// `quiet` says yes only when no open task could be picked up without an
/// INSERT first, and only to a live session: a task free, held by anyone,
/// or waiting out its retry backoff keeps every runner ticking; a
/// quarantined one does not, and releasing it notifies like an INSERT.
#[actix_rt::test]
async fn quiet_only_when_nothing_open_could_be_picked_up_without_an_insert() {
    let s = setup(0).await;
    let a = start(&s.store, "quiet").await;
    let b = start(&s.store, "quiet").await;
    assert!(quiet(&s.store, &a).await, "an empty table is quiet");

    let ids = seed(&s.client, 1).await;
    assert!(!quiet(&s.store, &a).await, "a free task is not quiet");
    assert_eq!(work(&s.store, &b).await, ids);
    assert!(
        !quiet(&s.store, &a).await,
        "a task another session holds is not quiet: it may die"
    );

    // Failed: back with a backoff, open, not free yet.
    let failed = s
        .store
        .fail_tasks::<ExampleTask>(&b, &ids)
        .await
        .expect("fail_tasks");
    assert_eq!(failed, ids);
    assert!(
        !quiet(&s.store, &a).await,
        "a task waiting out its backoff is not quiet"
    );

    // Quarantined: picked up max_attempts times; only a retry brings it back.
    s.client
        .execute(
            "UPDATE example_task SET sl_attempts = 5, sl_retry_at = NULL WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .expect("quarantine");
    assert!(
        quiet(&s.store, &a).await,
        "a quarantined task alone is quiet"
    );

    let mut listener = s
        .store
        .listen("session_lock_example_task")
        .await
        .expect("listen")
        .expect("a listener");
    let released: Vec<i64> = s
        .client
        .query("SELECT * FROM session_lock.example_task_retry(NULL)", &[])
        .await
        .expect("retry")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(released, ids);
    assert!(
        tokio::time::timeout(Duration::from_secs(30), listener.notified()).await == Ok(true),
        "the release notified"
    );
    assert!(!quiet(&s.store, &a).await, "a released task is not quiet");

    s.client
        .batch_execute("UPDATE example_task SET finished_at = now()")
        .await
        .expect("finish all");
    assert!(quiet(&s.store, &a).await, "all finished: quiet again");
    expire(&s.client, a.id).await;
    assert!(
        !quiet(&s.store, &a).await,
        "never to a session that is not live"
    );
    let forged = Session {
        token: SessionToken([0x5a; 16]),
        ..b.clone()
    };
    assert!(
        !quiet(&s.store, &forged).await,
        "never to a session without its token"
    );
}

/// Every notification on the worked example's channel, payload and all,
/// in the order the server delivers them (the senders' commit order).
struct Notifications {
    _client: tokio_postgres::Client,
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Notifications {
    async fn listen(db: &TestDb) -> Self {
        let (client, mut conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
            .await
            .expect("listener connects");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = message
                    && tx.send(n.payload().to_owned()).is_err()
                {
                    break;
                }
            }
        });
        client
            .batch_execute("LISTEN session_lock_example_task")
            .await
            .expect("listen");
        Notifications {
            _client: client,
            rx,
        }
    }

    /// What every transaction committed before now notified: the payloads
    /// delivered ahead of a mark this sends now.
    async fn until_now(&mut self, client: &tokio_postgres::Client) -> Vec<String> {
        let mark = format!("mark {}", fastrand::u64(..));
        client
            .execute(
                "SELECT pg_notify('session_lock_example_task', $1)",
                &[&mark],
            )
            .await
            .expect("notify the mark");
        let mut heard = Vec::new();
        loop {
            let payload = tokio::time::timeout(Duration::from_secs(30), self.rx.recv())
                .await
                .expect("the mark arrives within 30 s")
                .expect("still listening");
            if payload == mark {
                return heard;
            }
            heard.push(payload);
        }
    }
}

/// An INSERT notifies only while a live session of the table has room (a
/// notifying commit takes the cluster's one notify lock through its WAL
/// flush, so inserts into a backlog that nobody can take yet commit
/// without it), or may have (a session that has not ticked yet), or when
/// it cannot tell: a REPEATABLE READ insert reads the sessions as of its
/// snapshot, and always notifies.
#[actix_rt::test]
async fn an_insert_notifies_only_while_a_session_of_the_table_has_room() {
    let s = setup(2).await;
    let mut heard = Notifications::listen(&s.db).await;
    let nothing: Vec<String> = Vec::new();
    let woken = vec![String::new()];
    assert_eq!(
        heard.until_now(&s.client).await,
        nothing,
        "no session: nobody to wake"
    );

    let a = start_cap(&s.store, "room", 2).await;
    seed(&s.client, 1).await;
    assert_eq!(
        heard.until_now(&s.client).await,
        woken,
        "a session that has not ticked yet may work this table"
    );

    let held = work(&s.store, &a).await;
    assert_eq!(held.len(), 2);
    seed(&s.client, 1).await;
    assert_eq!(
        heard.until_now(&s.client).await,
        nothing,
        "a session at its capacity has no room for the task"
    );

    let finished = s
        .store
        .finish_tasks::<ExampleTask>(&a, &held)
        .await
        .unwrap();
    assert_eq!(finished, held);
    seed(&s.client, 1).await;
    assert_eq!(
        heard.until_now(&s.client).await,
        woken,
        "a session with room (after its finish) is woken"
    );

    expire(&s.client, a.id).await;
    let b = start_cap(&s.store, "room", 2).await;
    assert!(s.store.end_session(&b).await.unwrap());
    seed(&s.client, 1).await;
    assert_eq!(
        heard.until_now(&s.client).await,
        nothing,
        "neither a session whose lease ran out nor an ended one can take it"
    );

    let foreign = s.db.client().await;
    foreign
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; \
             INSERT INTO example_task (payload) VALUES ('repeatable read'); COMMIT",
        )
        .await
        .unwrap();
    assert_eq!(
        heard.until_now(&s.client).await,
        woken,
        "a REPEATABLE READ insert cannot tell, and notifies"
    );
}

/// A runner goes quiet (waits `quiet_tick` for a notification) only on
/// quiet's yes, so quiet must never say yes while an INSERT is in flight
/// whose trigger saw no session waiting: that insert did not notify, and
/// its task is invisible until it commits. And a yes marks the session
/// waiting, so that every insert after it notifies, whether or not a
/// get_work marked it before.
#[actix_rt::test]
async fn quiet_says_no_while_an_insert_is_in_flight_and_its_yes_marks_the_session_waiting() {
    let s = setup(1).await;
    let mut heard = Notifications::listen(&s.db).await;
    let a = start_cap(&s.store, "in-flight", 1).await;
    let held = work(&s.store, &a).await;
    assert_eq!(held.len(), 1, "a at its capacity");
    let producer = s.db.client().await;
    producer
        .batch_execute("BEGIN; INSERT INTO example_task (payload) VALUES ('in flight')")
        .await
        .unwrap();
    let w = finish_and_work(&s.store, &a, &held, &[]).await.unwrap();
    assert_eq!(w.finished, held);
    assert!(w.tasks.is_empty(), "the insert is not committed yet");
    assert!(!quiet(&s.store, &a).await, "an insert in flight: not quiet");
    producer.batch_execute("ROLLBACK").await.unwrap();
    assert!(quiet(&s.store, &a).await, "rolled back: quiet");
    assert_eq!(heard.until_now(&s.client).await, Vec::<String>::new());

    // A session that never ticked, marked by quiet alone.
    assert!(s.store.end_session(&a).await.unwrap());
    let b = start_cap(&s.store, "in-flight", 1).await;
    assert!(quiet(&s.store, &b).await);
    seed(&s.client, 1).await;
    assert_eq!(heard.until_now(&s.client).await, vec![String::new()]);
}

/// After a failover to an asynchronous standby, a session can come over
/// still holding tasks whose runs wrote to the old primary only: their
/// completions must not be finished on the new primary (the work would be
/// lost), but run again. Simulated by marking rows as handed out by
/// another server (`sl_server`, the postmaster start time at pickup).
#[actix_rt::test]
async fn only_the_server_that_handed_a_task_out_finishes_it() {
    let s = setup(4).await;
    let a = start(&s.store, "elsewhere").await;
    let held = work(&s.store, &a).await;
    assert_eq!(held.len(), 4);
    let (moved_done, moved_running, here) = (held[0], held[1], &held[2..]);
    hand_out_elsewhere(&s.client, &[moved_done, moved_running]).await;

    // Everything completed; one of the moved ones is still running.
    let finished: Vec<TaskId> = held
        .iter()
        .copied()
        .filter(|id| *id != moved_running)
        .collect();
    let w = finish_and_work(&s.store, &a, &finished, &[moved_running])
        .await
        .expect("get_work");
    assert_eq!(
        w.finished,
        here.to_vec(),
        "only this server's pickups are finished"
    );
    let still: Vec<TaskId> = w.tasks.iter().map(|t| t.id).collect();
    assert_eq!(
        still,
        vec![moved_running],
        "the running one stays until it returns, and nothing comes straight back"
    );
    let row = s
        .client
        .query_one(
            "SELECT session_id, finished_at IS NULL FROM example_task WHERE id = $1",
            &[&moved_done],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, Option<i64>>(0), row.get::<_, bool>(1)),
        (None, true),
        "the moved completed one is open and free, to run again"
    );
    assert_counters_match(&s.client, "the give-back").await;

    // It returned: carried to the next call, refused, and given back.
    let w = finish_and_work(&s.store, &a, &[moved_running], &[])
        .await
        .expect("get_work");
    assert!(w.finished.is_empty(), "refused: {:?}", w.finished);
    assert!(w.tasks.is_empty(), "nothing held: {:?}", w.tasks);
    assert_eq!(holdings(&s.client).await, BTreeMap::from([(None, 2)]));

    // Picked up again, now from this server, and finished by it.
    let mut again = work(&s.store, &a).await;
    again.sort_unstable();
    assert_eq!(again, vec![moved_done, moved_running]);
    let w = finish_and_work(&s.store, &a, &again, &[])
        .await
        .expect("get_work");
    assert_eq!(w.finished, again, "picked up here: finished here");
    assert_counters_match(&s.client, "the finish").await;
}

/// A task handed out by another server that someone else has locked is
/// neither waited for nor finished: it stays held until the lock goes, and
/// is then given back like the others.
#[tokio::test]
async fn a_locked_task_from_another_server_is_given_back_once_the_lock_goes() {
    let s = setup(3).await;
    let a = start(&s.store, "elsewhere-locked").await;
    let held = work(&s.store, &a).await;
    hand_out_elsewhere(&s.client, &held[..2]).await;
    let foreign = lock_row(&s.db, held[0]).await;
    let w = finish_and_work(&s.store, &a, &held, &[])
        .await
        .expect("get_work does not wait for the locked row");
    assert_eq!(
        w.finished,
        vec![held[2]],
        "only this server's pickup is finished"
    );
    let still: Vec<TaskId> = w.tasks.iter().map(|t| t.id).collect();
    assert_eq!(
        still,
        vec![held[0]],
        "the locked one stays held; the other went back"
    );
    assert_counters_match(&s.client, "the give-back around a lock").await;

    foreign.batch_execute("ROLLBACK").await.unwrap();
    let w = finish_and_work(&s.store, &a, &held[..1], &[])
        .await
        .expect("get_work");
    assert!(
        w.finished.is_empty(),
        "never finished here: {:?}",
        w.finished
    );
    assert!(w.tasks.is_empty(), "given back: {:?}", w.tasks);
    assert_eq!(holdings(&s.client).await, BTreeMap::from([(None, 2)]));
    assert_counters_match(&s.client, "the give-back after the lock").await;
}

/// On a connection straight to PostgreSQL the store prepares each call's
/// statement once and keeps it. When the table gains a column and its
/// functions are generated again, the server refuses the kept get_work
/// before running it (its answer's row type changed): the store prepares
/// it again and the call goes through, instead of failing on that
/// connection until it closes.
#[tokio::test]
async fn a_kept_get_work_statement_is_prepared_again_once_the_answer_gains_a_column() {
    let s = setup(6).await;
    // One connection per pool, so that every call reuses the statement.
    let options = StoreOptions {
        pool_size: 1,
        ..StoreOptions::default()
    };
    let store = PgStore::from_config(s.db.config(), options)
        .await
        .expect("store");
    let a = start(&store, "kept").await;
    assert_eq!(work(&store, &a).await.len(), 6);
    s.client
        .batch_execute(
            "ALTER TABLE example_task ADD COLUMN note text DEFAULT 'n';
             SELECT session_lock.generate_task_tables();",
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let held = try_work(&store, &a)
            .await
            .expect("the kept statement is prepared again");
        assert_eq!(held.len(), 6);
    }
}

#[tokio::test]
async fn get_work_answers_with_the_columns_of_its_last_generation_and_a_dropped_one_fails_naming_the_fix()
 {
    let s = setup(3).await;
    let a = start(&s.store, "columns").await;
    let held = work(&s.store, &a).await;
    assert_eq!(held.len(), 3);
    let columns = |rows: &[tokio_postgres::Row]| -> Vec<String> {
        rows[0]
            .columns()
            .iter()
            .map(|c| c.name().to_owned())
            .collect()
    };
    let call = "SELECT * FROM session_lock.example_task_get_work($1, $2, $3)";
    let none: Vec<TaskId> = Vec::new();

    // A column added: left out of the answer until the functions are
    // generated again, then in it, last.
    s.client
        .batch_execute("ALTER TABLE example_task ADD COLUMN note text DEFAULT 'n'")
        .await
        .unwrap();
    let rows = s
        .client
        .query(call, &[&a.id, &a.token, &none])
        .await
        .unwrap();
    assert!(
        !columns(&rows).contains(&"note".to_owned()),
        "{:?}",
        columns(&rows)
    );
    s.client
        .batch_execute("SELECT session_lock.generate_task_tables()")
        .await
        .unwrap();
    let rows = s
        .client
        .query(call, &[&a.id, &a.token, &none])
        .await
        .unwrap();
    let names = columns(&rows);
    assert_eq!(names.first().map(String::as_str), Some("sl_finished"));
    assert_eq!(names.last().map(String::as_str), Some("note"), "{names:?}");
    assert_eq!(
        rows[0].get::<_, Option<String>>("note").as_deref(),
        Some("n")
    );

    // A column dropped without generating again: the call fails saying
    // what to do, and undoes everything it did (its finish too).
    s.client
        .batch_execute("ALTER TABLE example_task DROP COLUMN note")
        .await
        .unwrap();
    let err = s
        .client
        .query(call, &[&a.id, &a.token, &vec![held[0]]])
        .await
        .expect_err("a dropped column fails the call");
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "SL005", "{db_err:?}");
    assert!(db_err.message().contains("columns changed"), "{db_err:?}");
    assert!(
        db_err
            .hint()
            .is_some_and(|h| h.contains("generate_task_tables")),
        "{db_err:?}"
    );
    let open: i64 = s
        .client
        .query_one(
            "SELECT count(*) FROM example_task WHERE finished_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 3, "the failed call finished nothing");

    // Generated again, the runner's own statement works and finishes.
    s.client
        .batch_execute("SELECT session_lock.generate_task_tables()")
        .await
        .unwrap();
    let w = finish_and_work(&s.store, &a, &held[..1], &[])
        .await
        .unwrap();
    assert_eq!(w.finished, vec![held[0]]);
    assert_eq!(w.tasks.len(), 2);
}

/// A partitioned task table: rows of different partitions share row
/// addresses, so the pickup and the answer must not go by address alone.
#[tokio::test]
async fn a_partitioned_table_hands_out_each_task_once() {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store");
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE jobs (id bigint PRIMARY KEY, payload text, finished_at timestamptz)
                 PARTITION BY RANGE (id);
             CREATE TABLE jobs_a PARTITION OF jobs FOR VALUES FROM (1) TO (1000);
             CREATE TABLE jobs_b PARTITION OF jobs FOR VALUES FROM (1000) TO (2000);
             INSERT INTO jobs (id, payload) SELECT g, 'a' FROM generate_series(1, 5) g;
             INSERT INTO jobs (id, payload) SELECT g, 'b' FROM generate_series(1000, 1004) g;
             SELECT session_lock.declare_task_table('public.jobs',
                 open_when => 'finished_at IS NULL', finish => 'finished_at = now()');",
        )
        .await
        .expect("a partitioned task table");
    // a alone first: its pickup fills its capacity (no count, no give-back
    // to hide a pickup that took more).
    let a = start_cap(&store, "parts", 3).await;
    let answer = |rows: Vec<tokio_postgres::Row>| -> Vec<TaskId> {
        rows.iter()
            .filter(|r| r.get::<_, Option<TaskId>>("sl_finished").is_none())
            .map(|r| r.get("id"))
            .collect()
    };
    let call = "SELECT * FROM session_lock.jobs_get_work($1, $2, $3, '{}', true, $4)";
    let none: Vec<TaskId> = Vec::new();
    let mine = answer(
        client
            .query(call, &[&a.id, &a.token, &none, &none])
            .await
            .unwrap(),
    );
    let b = start_cap(&store, "parts", 7).await;
    let theirs = answer(
        client
            .query(call, &[&b.id, &b.token, &none, &none])
            .await
            .unwrap(),
    );
    let held = |session: SessionId| {
        let client = &client;
        async move {
            let rows = client
                .query(
                    "SELECT id FROM jobs WHERE session_id = $1 AND finished_at IS NULL ORDER BY id",
                    &[&session],
                )
                .await
                .unwrap();
            rows.iter()
                .map(|r| r.get::<_, TaskId>(0))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(mine, vec![1, 2, 3], "a's share, in order");
    assert_eq!(
        held(a.id).await,
        mine,
        "a holds what it was answered, no more"
    );
    assert_eq!(theirs, vec![4, 5, 1000, 1001, 1002, 1003, 1004]);
    assert_eq!(held(b.id).await, theirs);
    // Finishing and naming what it holds: the rest by key, across
    // partitions.
    let again = answer(
        client
            .query(
                call,
                &[
                    &b.id,
                    &b.token,
                    &vec![4_i64, 1000],
                    &vec![5_i64, 1001, 1002, 1003, 1004],
                ],
            )
            .await
            .unwrap(),
    );
    assert_eq!(again, vec![5, 1001, 1002, 1003, 1004]);
    assert_eq!(held(b.id).await, again);
}

/// A free task updated by someone else since it was inserted lives at a
/// new row address: the pickup locks and updates that version, once, and
/// the answer carries what the other writer wrote. One still being
/// updated (its row locked) is passed over, and taken once the writer
/// commits.
#[tokio::test]
async fn a_free_task_rewritten_by_another_transaction_is_picked_up_as_rewritten() {
    let Setup {
        db, store, client, ..
    } = setup(0).await;
    let ids = seed(&client, 2).await;
    client
        .execute(
            "UPDATE example_task SET payload = 'rewritten' WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    let writer = db.client().await;
    writer
        .batch_execute(&format!(
            "BEGIN; UPDATE example_task SET payload = 'being rewritten' WHERE id = {}",
            ids[1]
        ))
        .await
        .unwrap();
    let a = start(&store, "rewritten").await;
    let w = store
        .get_work::<ExampleTask>(GetWork::new(&a))
        .await
        .expect("get_work");
    let got: Vec<(TaskId, String)> = w.tasks.iter().map(|t| (t.id, t.payload.clone())).collect();
    assert_eq!(
        got,
        vec![(ids[0], "rewritten".to_owned())],
        "the locked one passed over"
    );
    writer.batch_execute("COMMIT").await.unwrap();
    let w = store
        .get_work::<ExampleTask>(GetWork {
            known: Some(&ids[..1]),
            ..GetWork::new(&a)
        })
        .await
        .expect("get_work");
    let got: Vec<(TaskId, String)> = w.tasks.iter().map(|t| (t.id, t.payload.clone())).collect();
    assert_eq!(
        got,
        vec![
            (ids[0], "rewritten".to_owned()),
            (ids[1], "being rewritten".to_owned())
        ]
    );
    assert_eq!(held_counters(&client).await[&a.id], 2);
    let holders = holdings(&client).await;
    assert_eq!(holders.get(&Some(a.id)), Some(&2), "{holders:?}");
}

/// One get_work of `session` finishing `finished`, sweeping or not, naming
/// `kept` as the rest it holds: the ids it now holds.
async fn pick_keeping(
    store: &PgStore,
    session: &Session,
    finished: &[TaskId],
    kept: &[TaskId],
    sweep: bool,
) -> Vec<TaskId> {
    let w = store
        .get_work::<ExampleTask>(GetWork {
            finished,
            sweep,
            known: Some(kept),
            ..GetWork::new(session)
        })
        .await
        .expect("get_work");
    let mut done = w.finished.clone();
    done.sort_unstable();
    let mut asked = finished.to_vec();
    asked.sort_unstable();
    assert_eq!(done, asked, "finished as asked");
    w.tasks.iter().map(|t| t.id).collect()
}

/// [`pick_keeping`] of a session that finishes all it held.
async fn pick(store: &PgStore, session: &Session, finished: &[TaskId], sweep: bool) -> Vec<TaskId> {
    pick_keeping(store, session, finished, &[], sweep).await
}

/// A pickup in key order starts where the table's last pickup began, not
/// at the head of the free range (so that it steps over no more than the
/// tasks taken since). A task left behind it, here one a foreign
/// transaction had locked while the pickups passed it, waits for a call
/// that sweeps (once a tick): that one starts from the head, and takes it
/// first.
#[tokio::test]
async fn a_pickup_starts_where_the_last_began_and_a_sweeping_call_takes_what_it_left_behind() {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store connects");
    let client = db.client().await;
    let ids = seed(&client, 30).await;
    let a = start_cap(&store, "cursor", 5).await;

    let foreign = lock_row(&db, ids[0]).await;
    assert_eq!(pick(&store, &a, &[], false).await, ids[1..6].to_vec());
    foreign.batch_execute("ROLLBACK").await.unwrap();
    // Unlocked now, but behind the cursor (where the last pickup began).
    assert_eq!(
        pick(&store, &a, &ids[1..6], false).await,
        ids[6..11].to_vec(),
        "a call that does not sweep starts at the cursor"
    );
    let swept = pick(&store, &a, &ids[6..11], true).await;
    assert_eq!(
        swept,
        [&ids[..1], &ids[11..15]].concat(),
        "a sweeping call starts from the head"
    );
    // On from where that one began (the head): past the tasks taken since.
    assert_eq!(pick(&store, &a, &swept, false).await, ids[15..20].to_vec());
    // A stretch from the cursor too short for the room: the rest from the
    // head, where a task was reopened behind the cursor.
    client
        .execute(
            "UPDATE example_task SET finished_at = now() WHERE id > $1",
            &[&ids[20]],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE example_task SET finished_at = NULL, finished_by = NULL, session_id = NULL WHERE id = $1",
            &[&ids[1]],
        )
        .await
        .unwrap();
    assert_eq!(
        pick(&store, &a, &ids[15..20], false).await,
        vec![ids[1], ids[20]]
    );
}

/// Freeing a dead session's tasks moves the pickup cursor back to them:
/// the next pickup of any session of the name takes them first, sweeping
/// or not, as it would without a cursor.
#[tokio::test]
async fn a_dead_sessions_tasks_freed_behind_the_cursor_are_picked_up_next() {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store connects");
    let client = db.client().await;
    let ids = seed(&client, 40).await;
    let a = start_cap(&store, "behind", 5).await;
    let b = start_cap(&store, "behind", 5).await;
    let c = start_cap(&store, "behind", 5).await;
    assert_eq!(pick(&store, &a, &[], false).await, ids[..5].to_vec());
    let mine = pick(&store, &b, &[], false).await;
    assert_eq!(mine, ids[5..10].to_vec());
    assert_eq!(pick(&store, &c, &[], false).await, ids[10..15].to_vec());
    expire(&client, a.id).await;
    // c reclaims a, frees its tasks and has no room for any of them.
    assert_eq!(
        pick_keeping(&store, &c, &[], &ids[10..15], false).await,
        ids[10..15].to_vec()
    );
    assert_eq!(holdings(&client).await.get(&None), Some(&30));
    // b, not sweeping, finds them where the cursor now is.
    assert_eq!(pick(&store, &b, &mine, false).await, ids[..5].to_vec());
}

/// Index entries a get_work of `session` read, finishing `finished`,
/// sweeping or not, in the open-task index and in the primary key: the
/// backend's counts before and after it, in one transaction (rolled back),
/// since the counts also hold what earlier transactions read until they
/// are reported.
async fn index_reads(
    client: &mut tokio_postgres::Client,
    session: &Session,
    finished: &[TaskId],
    sweep: bool,
) -> (i64, i64) {
    let counts = "SELECT pg_stat_get_xact_tuples_returned('example_task_open_idx'::regclass),
                         pg_stat_get_xact_tuples_returned('example_task_pkey'::regclass)";
    let tx = client.transaction().await.unwrap();
    let before = tx.query_one(counts, &[]).await.unwrap();
    tx.query(
        "SELECT * FROM session_lock.example_task_get_work($1, $2, $3, '{}', $4, '{}', true)",
        &[&session.id, &session.token, &finished, &sweep],
    )
    .await
    .expect("get_work");
    let after = tx.query_one(counts, &[]).await.unwrap();
    tx.rollback().await.unwrap();
    let read = |i: usize| after.get::<_, i64>(i) - before.get::<_, i64>(i);
    (read(0), read(1))
}

/// The open-task index's entries [`index_reads`] counts.
async fn open_index_reads(
    client: &mut tokio_postgres::Client,
    session: &Session,
    finished: &[TaskId],
    sweep: bool,
) -> i64 {
    index_reads(client, session, finished, sweep).await.0
}

/// Holds a snapshot open on another connection (REPEATABLE READ, one read
/// taken), then drains 1,010 tasks through `session`, ten a call, so that
/// their dead entries stay at the head of the open index: the connection
/// holding the snapshot (COMMIT it when done) and the ten held last.
async fn drain_under_a_held_snapshot(
    db: &TestDb,
    store: &PgStore,
    session: &Session,
) -> (tokio_postgres::Client, Vec<TaskId>) {
    let snapshot = db.client().await;
    snapshot
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM example_task")
        .await
        .unwrap();
    let mut held = pick(store, session, &[], false).await;
    for _ in 0..100 {
        held = pick(store, session, &held, false).await;
        assert_eq!(held.len(), 10);
    }
    (snapshot, held)
}

/// While a snapshot held elsewhere keeps every dead entry of the open-task
/// index, a draining call that does not sweep reads the entries of the
/// tasks taken since the last pickup began, not every task taken since the
/// snapshot (which a walk from the head of the free range reads, as a
/// sweeping call still does once a tick).
#[tokio::test]
async fn under_a_held_snapshot_a_draining_pickup_reads_no_dead_head() {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store connects");
    let mut client = db.client().await;
    seed(&client, 2_000).await;
    let a = start_cap(&store, "held", 10).await;
    let (snapshot, held) = drain_under_a_held_snapshot(&db, &store, &a).await;
    let draining = open_index_reads(&mut client, &a, &held, false).await;
    let clock = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint";
    let began: i64 = client.query_one(clock, &[]).await.unwrap().get(0);
    let sweeping = open_index_reads(&mut client, &a, &held, true).await;
    let due: i64 = client
        .query_one(
            "SELECT pg_sequence_last_value('session_lock.example_task_head_at')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        due >= began + 1_000,
        "the head is next due a second after this walk began at the earliest"
    );
    // The head is walked by the first sweeping call once it is due: one
    // before that (here it is due in 30 s, so that no pause of this
    // machine can make it due) starts at the cursor too; after the clock
    // went back over a minute, it walks.
    let due_in = |ahead_ms: i64| {
        format!(
            "SELECT setval('session_lock.example_task_head_at', (extract(epoch FROM clock_timestamp()) * 1000)::bigint + {ahead_ms})"
        )
    };
    client.batch_execute(&due_in(30_000)).await.unwrap();
    let second = open_index_reads(&mut client, &a, &held, true).await;
    client.batch_execute(&due_in(7_200_000)).await.unwrap();
    let went_back = open_index_reads(&mut client, &a, &held, true).await;
    snapshot.batch_execute("COMMIT").await.unwrap();
    assert!(
        sweeping > 1_000,
        "a walk from the head reads the dead entries of the 1,010 tasks taken: {sweeping}"
    );
    assert!(
        draining < 100,
        "a draining pickup reads past the tasks taken since the last began: {draining}"
    );
    assert!(
        second < 100,
        "a sweeping call before the head is due starts at the cursor: {second}"
    );
    assert!(went_back > 1_000, "{went_back}");
}

/// A share is sized by a count of the free tasks (when the others' held
/// counters leave more to find than the session wants). Counted from the
/// pickup cursor on, and behind it for what that stretch lacks: here a
/// task a foreign transaction had locked while the first pickup passed it
/// is behind the cursor, and the count that sizes the second session's
/// share still finds it (12 open: 6 each; without it, 11, and 5).
#[tokio::test]
async fn a_share_counts_the_free_tasks_behind_the_cursor_too() {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store connects");
    let client = db.client().await;
    let ids = seed(&client, 12).await;
    let first = start_cap(&store, "behind", 10).await;
    let second = start_cap(&store, "behind", 10).await;

    let foreign = lock_row(&db, ids[0]).await;
    assert_eq!(pick(&store, &second, &[], false).await, ids[1..7].to_vec());
    foreign.batch_execute("ROLLBACK").await.unwrap();
    let mut taken = pick(&store, &first, &[], false).await;
    taken.sort_unstable();
    let mut expected = ids[7..12].to_vec();
    expected.push(ids[0]);
    expected.sort_unstable();
    assert_eq!(
        taken, expected,
        "the first session's share of 12 open tasks is 6"
    );
}

/// A session whose share needs the count (its peer has room for 90 and
/// holds nothing, as between a quick batch and the next tick) counts from
/// the pickup cursor: under a held snapshot it reads no more of the open
/// index than the count's bound and its own pickup, however many dead
/// entries the tasks taken before the cursor left at the head.
#[tokio::test]
async fn under_a_held_snapshot_a_count_reads_no_dead_head() {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store connects");
    let mut client = db.client().await;
    seed(&client, 2_000).await;
    let a = start_cap(&store, "counted", 10).await;
    let _peer = start_cap(&store, "counted", 90).await;
    let (snapshot, held) = drain_under_a_held_snapshot(&db, &store, &a).await;
    // No count left by an earlier call to stand in for this one's.
    client
        .batch_execute("SELECT setval('session_lock.example_task_free_seen', 0)")
        .await
        .unwrap();
    let counting = open_index_reads(&mut client, &a, &held, false).await;
    snapshot.batch_execute("COMMIT").await.unwrap();
    assert!(
        counting < 500,
        "the count reads up to 300 free tasks from the cursor and the pickup 10 past the 10 taken since: {counting}"
    );
}

/// Under generic plans (get_work's own, made once per connection; and here
/// every statement's, with plan_cache_mode = force_generic_plan), where
/// the planner knows no bound of the pickup's or the count's stretches, a
/// get_work still walks the open index from the cursor: it reads no range
/// of the primary key, whatever the backlog (with the statistics of 200k
/// tasks, the generic plan of a range between two unknowns sorted it out
/// of the key).
#[tokio::test]
async fn under_generic_plans_a_pickup_and_a_count_walk_the_open_index() {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store connects");
    let mut client = db.client().await;
    seed(&client, 200_000).await;
    client
        .batch_execute("VACUUM ANALYZE example_task")
        .await
        .unwrap();
    client
        .batch_execute("SET plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    let a = start_cap(&store, "generic", 10).await;
    let _peer = start_cap(&store, "generic", 90).await;
    let mut held = pick(&store, &a, &[], false).await;
    held = pick(&store, &a, &held, false).await;
    for sweep in [false, true] {
        let (open, key) = index_reads(&mut client, &a, &held, sweep).await;
        assert!(
            open < 500 && key < 100,
            "sweep {sweep}: {open} open-index entries and {key} primary-key entries read"
        );
    }
}

/// A count of the free tasks goes on to three times what it needs, and
/// the calls after it take what it found, less the largest capacity of
/// the table's live sessions for every pickup since, instead of counting
/// again: here the second call reads no more of the open index than its
/// pickup, and once the pickups since could have taken what the count
/// found beyond the need, a call counts again.
#[tokio::test]
async fn a_count_is_left_for_the_calls_after_it_until_pickups_could_have_used_it_up() {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store connects");
    let mut client = db.client().await;
    seed(&client, 3_000).await;
    // With no statistics yet, the finish reads the open index whole.
    client.batch_execute("ANALYZE example_task").await.unwrap();
    let a = start_cap(&store, "seen", 10).await;
    let _peer = start_cap(&store, "seen", 90).await;
    // a's count needs 100 free tasks (its name's capacity), finds 300.
    let first = open_index_reads(&mut client, &a, &[], false).await;
    let seen: i64 = client
        .query_one(
            "SELECT pg_sequence_last_value('session_lock.example_task_free_seen')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        seen, 300,
        "the count goes on to three times the 100 it needs"
    );
    // One pickup since (that call's, rolled back): 300 - 90 >= 100, no
    // count.
    let second = open_index_reads(&mut client, &a, &[], false).await;
    // Two: 300 - 180 >= 100, no count.
    let held = pick(&store, &a, &[], false).await;
    assert_eq!(held.len(), 10);
    // Three could have taken 270 of the 300: it counts.
    let third = open_index_reads(&mut client, &a, &held, false).await;
    assert!(
        first >= 300,
        "the first call counts 300 free tasks: {first}"
    );
    assert!(
        second < 50,
        "the second reads only its pickup's stretch: {second}"
    );
    assert!(
        third >= 300,
        "once pickups could have used up the count, a call counts again: {third}"
    );
}

/// The pickups since a count left for later calls are taken off it at the
/// largest capacity of any live session of the table, another name's too:
/// here, after a session of another name took 20 of the 40 free tasks a
/// count saw, the next session of the first name counts again and takes
/// its fair share of what is left (7 of 10, with 3 left for the third),
/// not all of it.
#[tokio::test]
async fn a_count_left_by_an_earlier_call_is_spent_by_other_names_pickups() {
    let db = migrated_db().await;
    let store = PgStore::connect(&db.url).await.expect("store connects");
    let client = db.client().await;
    seed(&client, 40).await;
    let a = start_cap(&store, "spent", 10).await;
    let b = start_cap(&store, "spent", 10).await;
    let c = start_cap(&store, "spent", 10).await;
    let other = start_cap(&store, "another name", 20).await;
    assert_eq!(pick_keeping(&store, &a, &[], &[], false).await.len(), 10);
    assert_eq!(
        pick_keeping(&store, &other, &[], &[], false).await.len(),
        20
    );
    assert_eq!(
        pick_keeping(&store, &b, &[], &[], false).await.len(),
        7,
        "b's share of 20 open among 30 of capacity, after a's 10"
    );
    assert_eq!(pick_keeping(&store, &c, &[], &[], false).await.len(), 3);
}
