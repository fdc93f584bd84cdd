//! The runner's actors in-process against a real Postgres.
//!
//! Every test waits on signals (the runner's status channel, channels from
//! inside its Tasker, or the database polled every few tens of milliseconds);
//! the long deadlines are only guards against a hang.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use session_lock::{
    DbFinder, Error, FailedTasks, PgStore, Progress, Runner, RunnerConfig, RunnerHandle,
    RunnerServer, RunnerStatus, SessionId, Stop, Task, TaskId, TaskerError,
};
use session_lock_testkit::example::ExampleTask;
use session_lock_testkit::wait_for_status;
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use session_lock_testkit::db::migrated_db;

const DEADLINE: Duration = Duration::from_secs(60);
/// A tick interval no test lives to see: only the first tick, a drain-mode
/// tick or a NOTIFY can start work.
const NEVER: Duration = Duration::from_secs(3600);

fn fast_config(name: &str) -> session_lock::RunnerConfigBuilder {
    RunnerConfig::builder(name)
        .ttl(Duration::from_secs(6))
        .heartbeat(Duration::from_secs(1))
        .tick(Duration::from_millis(50))
        .jitter(Duration::ZERO)
        .max_tasks(10)
        .workers(4)
}

async fn seed(client: &Client, n: i32) {
    client
        .execute(
            "INSERT INTO example_task (payload) SELECT 'task ' || g FROM generate_series(1, $1) g",
            &[&n],
        )
        .await
        .unwrap();
}

/// Inserts one task per payload, in order, and returns their ids.
async fn insert(client: &Client, payloads: &[&str]) -> Vec<TaskId> {
    let mut ids = Vec::with_capacity(payloads.len());
    for p in payloads {
        let row = client
            .query_one(
                "INSERT INTO example_task (payload) VALUES ($1) RETURNING id",
                &[p],
            )
            .await
            .unwrap();
        ids.push(row.get(0));
    }
    ids
}

/// A task's row: (session_id, finished_by, finished).
async fn task_row(client: &Client, id: TaskId) -> (Option<SessionId>, Option<SessionId>, bool) {
    let row = client
        .query_one(
            "SELECT session_id, finished_by, finished_at IS NOT NULL FROM example_task WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn open_count(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM example_task WHERE finished_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn session_ended(client: &Client, session: SessionId) -> bool {
    client
        .query_one(
            "SELECT ended_at IS NOT NULL FROM session_lock.session WHERE id = $1",
            &[&session],
        )
        .await
        .unwrap()
        .get(0)
}

/// Polls a query returning one boolean every 25 ms until it is true.
async fn poll_sql(client: &Client, what: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) {
    let start = Instant::now();
    loop {
        let done: bool = client.query_one(sql, params).await.unwrap().get(0);
        if done {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until no task is open.
async fn all_finished(client: &Client) {
    poll_sql(
        client,
        "every task finished",
        "SELECT NOT EXISTS (SELECT 1 FROM example_task WHERE finished_at IS NULL)",
        &[],
    )
    .await;
}

/// Waits until the runner's status satisfies `pred`; panics with the last
/// status after `timeout`.
async fn status_until(
    runner: &RunnerHandle,
    what: &str,
    timeout: Duration,
    pred: impl FnMut(&RunnerStatus) -> bool,
) -> RunnerStatus {
    let mut rx = runner.subscribe();
    match wait_for_status(&mut rx, timeout, pred).await {
        Some(s) => s,
        None => panic!("timed out waiting for {what}: {:?}", runner.status()),
    }
}

/// How many times each task was handed to a Tasker.
type Runs = Arc<Mutex<HashMap<TaskId, u32>>>;

fn count_runs(runs: &Runs, tasks: &[ExampleTask]) {
    let mut runs = runs.lock().unwrap();
    for t in tasks {
        *runs.entry(t.id()).or_default() += 1;
    }
}

fn runs_of(runs: &Runs, id: TaskId) -> u32 {
    runs.lock().unwrap().get(&id).copied().unwrap_or(0)
}

/// A Tasker that completes every task it is given, counting runs.
fn completing(
    runs: Runs,
) -> impl Fn(Vec<ExampleTask>, Progress) -> std::future::Ready<Result<Vec<TaskId>, TaskerError>>
+ Send
+ Sync
+ 'static {
    move |tasks: Vec<ExampleTask>, _progress: Progress| {
        count_runs(&runs, &tasks);
        std::future::ready(Ok(tasks.iter().map(Task::id).collect()))
    }
}

#[actix_rt::test]
async fn one_runner_finishes_every_task_exactly_once() {
    let db = migrated_db().await;
    let client = db.client().await;
    seed(&client, 200).await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let runs: Arc<Mutex<HashMap<TaskId, u32>>> = Arc::default();
    let counted = runs.clone();
    let tasker = move |tasks: Vec<ExampleTask>, _progress: Progress| {
        {
            let mut runs = counted.lock().unwrap();
            for t in &tasks {
                *runs.entry(t.id()).or_default() += 1;
            }
        }
        async move { Ok::<_, TaskerError>(tasks.iter().map(Task::id).collect()) }
    };
    let runner = Runner::new(fast_config("once").build().unwrap(), store, tasker).start();
    let mut status = runner.subscribe();
    let done = wait_for_status(&mut status, DEADLINE, |s| s.finished >= 200).await;
    assert!(
        done.is_some(),
        "200 tasks finished in time: {:?}",
        runner.status()
    );
    let session = runner.status().session.expect("a live session");
    runner.stop().await;

    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 200, "every task ran");
    assert!(runs.values().all(|&n| n == 1), "no task ran twice");
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE finished_at IS NULL), count(*) FILTER (WHERE finished_by = $1) FROM example_task",
            &[&session],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0, "no task left open");
    assert_eq!(
        row.get::<_, i64>(1),
        200,
        "all finished by the runner's session"
    );
    let ended: bool = client
        .query_one(
            "SELECT ended_at IS NOT NULL FROM session_lock.session WHERE id = $1",
            &[&session],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ended, "Stop ended the session");
    let status = runner.status();
    assert!(status.stopped && status.session.is_none());
}

#[actix_rt::test]
async fn stop_drains_a_task_in_flight_then_ends_the_session() {
    let db = migrated_db().await;
    let client = db.client().await;
    let ids = insert(&client, &["t1", "t2", "t3", "t4", "t5"]).await;
    let store = PgStore::connect(&db.url).await.unwrap();

    // Runner A holds two tasks in one slice, blocks on a gate, then completes
    // only the first: the second stays held by its session. It ticks once.
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<Vec<TaskId>>();
    let (gate_tx, gate_rx) = watch::channel(false);
    let completed: Arc<Mutex<Vec<TaskId>>> = Arc::default();
    let tasker = {
        let completed = completed.clone();
        move |tasks: Vec<ExampleTask>, progress: Progress| {
            let ids: Vec<TaskId> = tasks.iter().map(Task::id).collect();
            let (started, mut gate, completed) =
                (started_tx.clone(), gate_rx.clone(), completed.clone());
            async move {
                let _ = started.send(ids.clone());
                let _ = gate.wait_for(|open| *open).await;
                progress.complete(ids[0]);
                completed.lock().unwrap().push(ids[0]);
                Ok::<_, TaskerError>(Vec::new())
            }
        }
    };
    // The task it leaves incomplete stays with the session (not given back
    // with a backoff), so that the second runner below finds all four.
    let config = fast_config("drain-on-stop")
        .max_tasks(2)
        .workers(1)
        .tick(NEVER)
        .drain_mode(false)
        .listen(false)
        .failed_tasks(FailedTasks::Keep)
        .build()
        .unwrap();
    let runner = Runner::new(config, store.clone(), tasker).start();
    let in_flight = tokio::time::timeout(DEADLINE, started_rx.recv())
        .await
        .expect("the tasker started")
        .unwrap();
    assert_eq!(in_flight, ids[..2], "the runner took the two oldest tasks");
    let session = runner.status().session.expect("a live session");

    // Two Stops while the task is in flight: both wait for the drain.
    let first = actix_rt::spawn({
        let runner = runner.clone();
        async move { runner.stop().await }
    });
    let second = actix_rt::spawn({
        let stop = runner.stop_recipient();
        async move { stop.send(Stop).await }
    });
    // A bounded "nothing happens" window: Stop must not reply, nor the
    // session end, while the task runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !first.is_finished() && !second.is_finished(),
        "Stop replied while a task was still in flight"
    );
    assert!(
        !session_ended(&client, session).await,
        "the session ended before its task in flight finished"
    );
    assert!(completed.lock().unwrap().is_empty());

    gate_tx.send(true).unwrap();
    tokio::time::timeout(DEADLINE, first)
        .await
        .expect("Stop replied")
        .unwrap();
    tokio::time::timeout(DEADLINE, second)
        .await
        .expect("the second Stop replied")
        .unwrap()
        .expect("the runner's mailbox was open");

    // Checked right after Stop replied: the drained task is finished and the
    // session is over.
    assert_eq!(*completed.lock().unwrap(), vec![ids[0]]);
    assert_eq!(
        task_row(&client, ids[0]).await,
        (Some(session), Some(session), true),
        "the task in flight was finished by the session before Stop replied"
    );
    assert_eq!(
        task_row(&client, ids[1]).await,
        (Some(session), None, false),
        "the task the tasker did not complete is still open"
    );
    for &id in &ids[2..] {
        assert_eq!(task_row(&client, id).await, (None, None, false));
    }
    assert!(
        session_ended(&client, session).await,
        "Stop ended the session"
    );
    let status = runner.status();
    assert!(status.stopped && status.session.is_none(), "{status:?}");

    // Once stopped, Stop replies at once.
    tokio::time::timeout(Duration::from_secs(5), runner.stop())
        .await
        .expect("a Stop after the runner stopped replied");

    // A new runner of the same name takes every open task on its first tick,
    // including the one the ended session still pointed at.
    let batches: Arc<Mutex<Vec<Vec<TaskId>>>> = Arc::default();
    let tasker_b = {
        let batches = batches.clone();
        move |tasks: Vec<ExampleTask>, _progress: Progress| {
            let ids: Vec<TaskId> = tasks.iter().map(Task::id).collect();
            batches.lock().unwrap().push(ids.clone());
            std::future::ready(Ok::<_, TaskerError>(ids))
        }
    };
    let config_b = fast_config("drain-on-stop")
        .tick(NEVER)
        .listen(false)
        .build()
        .unwrap();
    let runner_b = Runner::new(config_b, store, tasker_b).start();
    // Only one tick can happen: the tick is an hour and 4 tasks do not fill
    // a share of 10 (no drain-mode tick).
    let status_b = status_until(&runner_b, "the first tick", DEADLINE, |s| s.ticks >= 1).await;
    assert_eq!(
        (status_b.fetched, status_b.finished, status_b.failed),
        (4, 4, 0),
        "{status_b:?}"
    );
    let session_b = status_b.session.expect("runner B has a session");
    assert_ne!(session_b, session);
    let mut taken: Vec<TaskId> = batches.lock().unwrap().concat();
    taken.sort_unstable();
    assert_eq!(taken, ids[1..], "runner B took each remaining task once");
    for &id in &ids[1..] {
        assert_eq!(
            task_row(&client, id).await,
            (Some(session_b), Some(session_b), true)
        );
    }
    runner_b.stop().await;
    assert!(session_ended(&client, session_b).await);
}

#[actix_rt::test]
async fn stop_replies_before_a_session_could_start() {
    // Nothing listens on port 1: the session never starts.
    let store = PgStore::connect("postgres://postgres@127.0.0.1:1/x")
        .await
        .unwrap();
    let runner = Runner::new(
        fast_config("unreachable").build().unwrap(),
        store,
        completing(Runs::default()),
    )
    .start();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), runner.stop())
        .await
        .expect("Stop replied although no session ever started");
    let took = started.elapsed();
    let status = runner.status();
    assert!(status.stopped && status.session.is_none(), "{status:?}");
    assert_eq!(status.session_starts, 0);
    assert_eq!(status.ticks, 0);
    // The start in flight is waited for: at most the store's connect timeout
    // (5 s by default), never a retry loop.
    assert!(took < Duration::from_secs(7), "Stop took {took:?}");
    tokio::time::timeout(Duration::from_secs(1), runner.stop())
        .await
        .expect("a second Stop replied at once");
}

#[actix_rt::test]
async fn a_panicking_tasker_is_caught_and_its_worker_restarted() {
    let db = migrated_db().await;
    let client = db.client().await;
    let ids = insert(&client, &["a", "b", "boom", "c", "d"]).await;
    let boom = ids[2];
    let store = PgStore::connect(&db.url).await.unwrap();
    let runs = Runs::default();
    let exploded = Arc::new(AtomicBool::new(false));
    let tasker = {
        let (runs, exploded) = (runs.clone(), exploded.clone());
        move |tasks: Vec<ExampleTask>, progress: Progress| {
            let (runs, exploded) = (runs.clone(), exploded.clone());
            async move {
                count_runs(&runs, &tasks);
                let mut explode = false;
                for t in &tasks {
                    if t.payload == "boom" && !exploded.swap(true, Ordering::SeqCst) {
                        explode = true;
                    } else {
                        progress.complete(t.id);
                    }
                }
                if explode {
                    panic!("boom (a deliberate panic in the tasker)");
                }
                Ok::<_, TaskerError>(Vec::new())
            }
        }
    };
    // One worker: the panicking task shares its slice with the others.
    let config = fast_config("panicking").workers(1).build().unwrap();
    let runner = Runner::new(config, store, tasker).start();
    let status = status_until(&runner, "all 5 tasks finished", DEADLINE, |s| {
        s.finished >= 5
    })
    .await;
    let session = status.session.expect("the runner kept its session");
    assert!(status.worker_restarts >= 1, "{status:?}");
    assert_eq!(status.session_losses, 0, "{status:?}");
    assert_eq!(status.session_starts, 1, "{status:?}");
    assert!(status.failed >= 1, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("panicked")),
        "{status:?}"
    );
    assert_eq!(runs_of(&runs, boom), 2, "the panicking task ran again");
    for &id in ids.iter().filter(|&&id| id != boom) {
        assert_eq!(runs_of(&runs, id), 1, "task {id} ran once");
    }
    // The others were finished from the batch that panicked, before the
    // panicking task's retry.
    let early: bool = client
        .query_one(
            "SELECT bool_and(o.finished_at < b.finished_at) FROM example_task o, example_task b \
             WHERE b.id = $1 AND o.id <> $1",
            &[&boom],
        )
        .await
        .unwrap()
        .get(0);
    assert!(early, "the completed tasks were finished before the retry");
    for &id in &ids {
        assert_eq!(
            task_row(&client, id).await,
            (Some(session), Some(session), true)
        );
    }
    // The restarted worker keeps serving.
    let late = insert(&client, &["after the panic"]).await[0];
    poll_sql(
        &client,
        "the task inserted after the panic finished",
        "SELECT finished_at IS NOT NULL FROM example_task WHERE id = $1",
        &[&late],
    )
    .await;
    runner.stop().await;
}

#[actix_rt::test]
async fn a_tasker_panicking_before_returning_its_future_is_caught_too() {
    // A closure Tasker whose synchronous part (before the `async` block)
    // panics: a plain mistake such as an index out of bounds.
    let db = migrated_db().await;
    let client = db.client().await;
    let ids = insert(&client, &["boom", "a"]).await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let exploded = Arc::new(AtomicBool::new(false));
    let tasker = move |tasks: Vec<ExampleTask>, _progress: Progress| {
        if tasks.iter().any(|t| t.payload == "boom") && !exploded.swap(true, Ordering::SeqCst) {
            panic!("boom (a deliberate panic before the tasker's future)");
        }
        std::future::ready(Ok::<_, TaskerError>(tasks.iter().map(Task::id).collect()))
    };
    let config = fast_config("panicking-early").workers(1).build().unwrap();
    let runner = Runner::new(config, store, tasker).start();
    let mut rx = runner.subscribe();
    let done = wait_for_status(&mut rx, Duration::from_secs(10), |s| s.finished >= 2).await;
    let status = runner.status();
    runner.stop().await;
    assert!(
        done.is_some(),
        "the tasks were not finished after the tasker panicked: {status:?}"
    );
    assert!(status.worker_restarts >= 1, "{status:?}");
    for &id in &ids {
        assert!(task_row(&client, id).await.2, "task {id} finished");
    }
}

#[actix_rt::test]
async fn an_erroring_tasker_keeps_completed_tasks_and_retries_the_rest() {
    let db = migrated_db().await;
    let client = db.client().await;
    let ids = insert(&client, &["t1", "t2", "t3", "t4", "t5", "t6"]).await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let runs = Runs::default();
    let failed_once = Arc::new(AtomicBool::new(false));
    let tasker = {
        let runs = runs.clone();
        move |tasks: Vec<ExampleTask>, progress: Progress| {
            count_runs(&runs, &tasks);
            let fail = !failed_once.swap(true, Ordering::SeqCst);
            async move {
                if fail {
                    // Half done, then the rest of the batch fails.
                    for t in &tasks[..3] {
                        progress.complete(t.id);
                    }
                    return Err::<Vec<TaskId>, TaskerError>("the mail server is down".into());
                }
                Ok(tasks.iter().map(Task::id).collect())
            }
        }
    };
    let config = fast_config("erroring").workers(1).build().unwrap();
    let runner = Runner::new(config, store, tasker).start();
    let status = status_until(&runner, "all 6 tasks finished", DEADLINE, |s| {
        s.finished >= 6
    })
    .await;
    let session = status.session.expect("the runner kept its session");
    assert_eq!(status.failed, 3, "{status:?}");
    assert_eq!(status.worker_restarts, 0, "an error needs no restart");
    assert_eq!(status.actor_restarts, 0, "{status:?}");
    assert_eq!(status.session_losses, 0, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("the mail server is down")),
        "{status:?}"
    );
    for &id in &ids[..3] {
        assert_eq!(runs_of(&runs, id), 1, "completed task {id} was not rerun");
    }
    for &id in &ids[3..] {
        assert_eq!(runs_of(&runs, id), 2, "failed task {id} was retried once");
    }
    for &id in &ids {
        assert_eq!(
            task_row(&client, id).await,
            (Some(session), Some(session), true)
        );
    }
    runner.stop().await;
}

#[actix_rt::test]
async fn a_hung_tasker_is_stopped_by_the_batch_timeout() {
    let db = migrated_db().await;
    let client = db.client().await;
    let ids = insert(&client, &["ok1", "hang", "ok2"]).await;
    let hang = ids[1];
    let store = PgStore::connect(&db.url).await.unwrap();
    let runs = Runs::default();
    let hung = Arc::new(AtomicBool::new(false));
    let tasker = {
        let runs = runs.clone();
        move |tasks: Vec<ExampleTask>, progress: Progress| {
            count_runs(&runs, &tasks);
            let hung = hung.clone();
            async move {
                let mut hang = false;
                for t in &tasks {
                    if t.payload == "hang" && !hung.swap(true, Ordering::SeqCst) {
                        hang = true;
                    } else {
                        progress.complete(t.id);
                    }
                }
                if hang {
                    futures_util::future::pending::<()>().await;
                }
                Ok::<_, TaskerError>(Vec::new())
            }
        }
    };
    let config = fast_config("hung")
        .workers(1)
        .batch_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let runner = Runner::new(config, store, tasker).start();
    let first = status_until(&runner, "a session", DEADLINE, |s| s.session.is_some())
        .await
        .session
        .unwrap();
    let status = status_until(&runner, "all 3 tasks finished", DEADLINE, |s| {
        s.finished >= 3
    })
    .await;
    assert!(status.worker_restarts >= 1, "{status:?}");
    assert_eq!(status.session, Some(first), "the runner kept its session");
    assert_eq!(
        (status.session_starts, status.session_losses),
        (1, 0),
        "{status:?}"
    );
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("timed out")),
        "{status:?}"
    );
    assert_eq!(runs_of(&runs, hang), 2, "the hung task ran again");
    for &id in &ids {
        assert_eq!(
            task_row(&client, id).await,
            (Some(first), Some(first), true)
        );
    }
    runner.stop().await;
}

#[actix_rt::test]
async fn a_tasker_reporting_foreign_or_duplicate_ids_is_contained() {
    let db = migrated_db().await;
    let client = db.client().await;
    // With a share of 3 the runner holds t1..t3; t4 and t5 stay free.
    let ids = insert(&client, &["t1", "t2", "t3", "t4", "t5"]).await;
    let (free, missing) = (ids[4], 999_999);
    let store = PgStore::connect(&db.url).await.unwrap();
    let runs = Runs::default();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    // Later calls wait for the gate, so the first tick's outcome can be
    // inspected before anything else happens.
    let (gate_tx, gate_rx) = watch::channel(false);
    let tasker = {
        let runs = runs.clone();
        move |tasks: Vec<ExampleTask>, progress: Progress| {
            count_runs(&runs, &tasks);
            let call = calls.fetch_add(1, Ordering::SeqCst);
            let mut gate = gate_rx.clone();
            let given: Vec<TaskId> = tasks.iter().map(Task::id).collect();
            async move {
                if call == 0 {
                    // t1 twice (progress and return), t2 twice in the
                    // return, t3 never; an id that does not exist and a
                    // free task it was not given.
                    progress.complete(given[0]);
                    return Ok::<_, TaskerError>(vec![given[0], given[1], given[1], missing, free]);
                }
                let _ = gate.wait_for(|open| *open).await;
                Ok(given)
            }
        }
    };
    // Without drain mode, each tick finishes its own batch, so the first
    // tick's counts are final when it ends.
    let config = fast_config("foreign")
        .max_tasks(3)
        .workers(1)
        .listen(false)
        .drain_mode(false)
        .build()
        .unwrap();
    let runner = Runner::new(config, store, tasker).start();
    let status = status_until(&runner, "the first tick", DEADLINE, |s| s.ticks >= 1).await;
    let session = status.session.expect("a session");
    assert_eq!(
        (
            status.fetched,
            status.finished,
            status.failed,
            status.rejected
        ),
        (3, 2, 1, 0),
        "duplicates count once, foreign ids are not finished: {status:?}"
    );
    let error = status.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("not given")
            && error.contains("999999")
            && error.contains(&free.to_string()),
        "the foreign ids are reported: {error:?}"
    );
    assert_eq!(
        task_row(&client, ids[0]).await,
        (Some(session), Some(session), true)
    );
    assert_eq!(
        task_row(&client, ids[1]).await,
        (Some(session), Some(session), true)
    );
    assert_eq!(
        task_row(&client, ids[2]).await,
        (None, None, false),
        "the unreported task is given back, to be retried after its backoff"
    );
    let (_, finished_by, finished) = task_row(&client, free).await;
    assert!(
        !finished && finished_by.is_none(),
        "a task the tasker was not given was finished"
    );
    let phantom: i64 = client
        .query_one(
            "SELECT count(*) FROM example_task WHERE id = $1",
            &[&missing],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(phantom, 0);

    // The runner carries on: the rest is done normally.
    gate_tx.send(true).unwrap();
    let status = status_until(&runner, "all 5 tasks finished", DEADLINE, |s| {
        s.finished >= 5
    })
    .await;
    assert_eq!(status.finished, 5, "{status:?}");
    assert_eq!(status.rejected, 0, "{status:?}");
    assert_eq!(status.worker_restarts, 0, "{status:?}");
    all_finished(&client).await;
    assert_eq!(runs_of(&runs, ids[2]), 2, "the unreported task ran again");
    for &id in [ids[0], ids[1], ids[3], free].iter() {
        assert_eq!(runs_of(&runs, id), 1, "task {id} ran once");
    }
    runner.stop().await;
}

#[actix_rt::test]
async fn notify_wakes_an_idle_runner() {
    let db = migrated_db().await;
    let client = db.client().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let config = fast_config("notified").tick(NEVER).build().unwrap();
    let runner = Runner::new(config, store, completing(Runs::default())).start();
    let idle = status_until(&runner, "an idle first tick", DEADLINE, |s| {
        s.session.is_some() && s.ticks >= 1
    })
    .await;
    assert_eq!(idle.fetched, 0);

    // Far less than the hour-long tick: only the notification can do it.
    a_new_task_wakes(&runner, &client, Duration::from_secs(10)).await;
    runner.stop().await;
}

/// Inserts a task and waits, at most `within`, until the runner has
/// finished it with its own session.
async fn a_new_task_wakes(runner: &RunnerHandle, client: &Client, within: Duration) {
    let before = runner.status().finished;
    let id = insert(client, &["wake up"]).await[0];
    let status = status_until(runner, "the notified task finished", within, |s| {
        s.finished > before
    })
    .await;
    let session = status.session.unwrap();
    assert_eq!(
        task_row(client, id).await,
        (Some(session), Some(session), true)
    );
}

/// A runner calls the database on connections of its own, opened and
/// driven on the arbiter its actors run on (so that no call crosses
/// threads to reach its connection): opened once, not tick after tick, and
/// closed when the runner stops, while the store it was given stays
/// usable.
#[actix_rt::test]
async fn a_runner_keeps_its_own_connections_and_closes_them_when_it_stops() {
    let db = migrated_db().await;
    let client = db.client().await;
    seed(&client, 30).await;
    // The store's connections carry its application_name (the test's own
    // carry another), and the database is this test's alone.
    let app = "session-lock";
    let store = PgStore::connect(&db.url).await.unwrap();
    let config = fast_config("connections").listen(false).build().unwrap();
    let runner = Runner::new(config, store.clone(), completing(Runs::default())).start();
    let backends = "SELECT coalesce(array_agg(pid ORDER BY pid), '{}') FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1";
    status_until(&runner, "five ticks", DEADLINE, |s| s.ticks >= 5).await;
    let early: Vec<i32> = client.query_one(backends, &[&app]).await.unwrap().get(0);
    assert!(!early.is_empty(), "the runner's connections are seen");
    status_until(&runner, "thirty ticks", DEADLINE, |s| s.ticks >= 30).await;
    let later: Vec<i32> = client.query_one(backends, &[&app]).await.unwrap().get(0);
    assert!(
        early.iter().all(|pid| later.contains(pid)),
        "connections opened once, kept tick after tick: {early:?} then {later:?}"
    );
    assert!(
        later.len() <= 6,
        "at most a control pool (2) and a work pool (4): {later:?}"
    );

    runner.stop().await;
    poll_sql(
        &client,
        "the runner's connections to close",
        "SELECT count(*) = 0 FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
        &[&app],
    )
    .await;
    let conn = store.client().await.expect("the store still connects");
    let one: i32 = conn.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// On an empty table a listening runner stops ticking every tick (a
/// quiet tick no test lives to see) and is still woken by a new task at
/// once.
#[actix_rt::test]
async fn a_listening_runner_on_an_empty_table_goes_quiet_and_a_new_task_wakes_it() {
    let db = migrated_db().await;
    let client = db.client().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let config = fast_config("quiet").quiet_tick(NEVER).build().unwrap();
    let runner = Runner::new(config, store, completing(Runs::default())).start();
    let quiet = status_until(&runner, "a quiet runner", DEADLINE, |s| {
        s.quiet && s.listening
    })
    .await;
    // Two heartbeats (a second apart) would have seen some 40 ticks of
    // 50 ms; a quiet runner makes none.
    let calm = status_until(&runner, "two more heartbeats", DEADLINE, |s| {
        s.heartbeats >= quiet.heartbeats + 2
    })
    .await;
    assert!(
        calm.ticks <= quiet.ticks + 1,
        "a quiet runner ticked {} times in two heartbeats",
        calm.ticks - quiet.ticks
    );
    assert!(calm.quiet);

    a_new_task_wakes(&runner, &client, DEADLINE).await;
    runner.stop().await;
}

/// A runner never goes quiet while tasks are open elsewhere: when their
/// holder dies without a word, the runner takes them over on its tick.
#[actix_rt::test]
async fn a_runner_does_not_go_quiet_while_another_session_holds_tasks() {
    let db = migrated_db().await;
    let client = db.client().await;
    seed(&client, 5).await;
    // A session that takes every task and is then never heard of again.
    let row = client
        .query_one(
            "SELECT session_id, session_token FROM session_lock.start_session('quiet-holder', interval '2 seconds', 10, 'h', 0)",
            &[],
        )
        .await
        .unwrap();
    let (holder, token): (i64, session_lock::SessionToken) = (row.get(0), row.get(1));
    let taken = client
        .query(
            "SELECT 1 FROM session_lock.example_task_get_work($1, $2) w WHERE w.sl_finished IS NULL",
            &[&holder, &token],
        )
        .await
        .unwrap();
    assert_eq!(taken.len(), 5);

    let store = PgStore::connect(&db.url).await.unwrap();
    let config = fast_config("quiet-holder")
        .quiet_tick(NEVER)
        .build()
        .unwrap();
    let runner = Runner::new(config, store, completing(Runs::default())).start();
    // Only ticks can find the holder dead: a quiet runner would wait for
    // ever, as no INSERT comes.
    let status = status_until(&runner, "the dead holder's tasks finished", DEADLINE, |s| {
        s.finished >= 5
    })
    .await;
    assert_eq!(open_count(&client).await, 0);
    assert!(status.listening);
    runner.stop().await;
}

#[actix_rt::test]
async fn drain_mode_ticks_again_after_a_full_share() {
    let db = migrated_db().await;
    let client = db.client().await;
    seed(&client, 100).await;
    let store = PgStore::connect(&db.url).await.unwrap();
    // An hour-long tick and no LISTEN: only drain mode can start a second tick.
    let config = fast_config("draining")
        .tick(NEVER)
        .listen(false)
        .build()
        .unwrap();
    let runner = Runner::new(config, store, completing(Runs::default())).start();
    let status = status_until(&runner, "100 tasks finished", DEADLINE, |s| {
        s.finished >= 100
    })
    .await;
    assert!(status.ticks >= 10, "{status:?}");
    assert_eq!(open_count(&client).await, 0);
    runner.stop().await;
}

#[actix_rt::test]
async fn without_drain_mode_a_full_share_waits_for_the_next_tick() {
    // The negative control of drain_mode_ticks_again_after_a_full_share.
    let db = migrated_db().await;
    let client = db.client().await;
    seed(&client, 100).await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let config = fast_config("not-draining")
        .tick(NEVER)
        .listen(false)
        .drain_mode(false)
        .build()
        .unwrap();
    let runner = Runner::new(config, store, completing(Runs::default())).start();
    let status = status_until(&runner, "the first tick", DEADLINE, |s| s.ticks >= 1).await;
    assert_eq!((status.fetched, status.finished), (10, 10), "{status:?}");
    // A bounded "nothing happens" window: with drain mode on, the next tick
    // would start within milliseconds; one second shows it does not.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = runner.status();
    assert_eq!((status.ticks, status.finished), (1, 10), "{status:?}");
    assert_eq!(open_count(&client).await, 90);
    runner.stop().await;
}

#[actix_rt::test]
async fn several_runners_start_and_stop_together() {
    let db = migrated_db().await;
    let client = db.client().await;
    seed(&client, 40).await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let (runs_a, runs_b) = (Runs::default(), Runs::default());
    let (addr, handles) = RunnerServer::new()
        .with(Runner::new(
            fast_config("server-a").build().unwrap(),
            store.clone(),
            completing(runs_a.clone()),
        ))
        .with(Runner::new(
            fast_config("server-b").build().unwrap(),
            store,
            completing(runs_b.clone()),
        ))
        .start_all();
    assert_eq!(handles.len(), 2);
    assert_eq!(
        [handles[0].name(), handles[1].name()],
        ["server-a", "server-b"]
    );
    let mut sessions = Vec::new();
    for h in &handles {
        let s = status_until(h, "a session", DEADLINE, |s| s.session.is_some()).await;
        sessions.push(s.session.unwrap());
    }
    assert_ne!(sessions[0], sessions[1]);
    all_finished(&client).await;
    // Every task ran once, by one runner or the other.
    let (a, b) = (
        runs_a.lock().unwrap().clone(),
        runs_b.lock().unwrap().clone(),
    );
    assert_eq!(a.len() + b.len(), 40);
    assert!(a.keys().all(|id| !b.contains_key(id)));
    assert!(a.values().chain(b.values()).all(|&n| n == 1));

    tokio::time::timeout(DEADLINE, addr.send(Stop))
        .await
        .expect("the server's Stop replied")
        .unwrap();
    for (h, &session) in handles.iter().zip(&sessions) {
        let status = h.status();
        assert!(status.stopped && status.session.is_none(), "{status:?}");
        assert!(
            session_ended(&client, session).await,
            "session of {} ended",
            h.name()
        );
        let name: String = client
            .query_one(
                "SELECT name FROM session_lock.session WHERE id = $1",
                &[&session],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, h.name());
    }
}

/// A PgStore behind a switch: while `cut` is set, finding the database fails
/// as a network partition would.
struct Partitioned {
    store: PgStore,
    cut: Arc<AtomicBool>,
}

impl DbFinder for Partitioned {
    type Db = PgStore;

    async fn find(&self) -> session_lock::Result<PgStore> {
        if self.cut.load(Ordering::SeqCst) {
            Err(Error::PoolTimedOut)
        } else {
            Ok(self.store.clone())
        }
    }
}

#[actix_rt::test]
async fn a_partitioned_database_fences_the_session_before_its_ttl() {
    let db = migrated_db().await;
    let client = db.client().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let finder = Partitioned {
        store,
        cut: cut.clone(),
    };
    // Default safety margin: ttl / 5 = 600 ms.
    let config = RunnerConfig::builder("partitioned")
        .ttl(Duration::from_secs(3))
        .heartbeat(Duration::from_millis(500))
        .tick(Duration::from_millis(50))
        .jitter(Duration::ZERO)
        .retry_max(Duration::from_secs(1))
        .build()
        .unwrap();
    assert_eq!(config.safety_margin(), Duration::from_millis(600));
    let runs = Runs::default();
    let runner = Runner::new(config, finder, completing(runs.clone())).start();
    let session = status_until(&runner, "a session", DEADLINE, |s| {
        s.session.is_some() && s.ticks >= 1
    })
    .await
    .session
    .unwrap();

    let remaining_at_cut: f64 = client
        .query_one(
            "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 \
             FROM session_lock.session WHERE id = $1",
            &[&session],
        )
        .await
        .unwrap()
        .get(0);
    cut.store(true, Ordering::SeqCst);
    let cut_at = Instant::now();
    let fenced = status_until(&runner, "the fence", Duration::from_secs(10), |s| {
        s.session.is_none()
    })
    .await;
    let fenced_after = cut_at.elapsed();
    // The server-side lease must still be live when the runner fenced
    // itself. (A renewal in flight at the cut may have extended it; reading
    // it now accounts for that.)
    let (live, left): (bool, f64) = {
        let row = client
            .query_one(
                "SELECT expires_at > clock_timestamp() AND ended_at IS NULL, \
                 extract(epoch FROM expires_at - clock_timestamp())::float8 \
                 FROM session_lock.session WHERE id = $1",
                &[&session],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        live,
        "fenced {fenced_after:?} after the cut, but the lease had already run out \
         ({left:.3} s left; {remaining_at_cut:.3} s left at the cut)"
    );
    // The last renewal was sent before the cut: the fence is due at most
    // ttl - margin = 2.4 s later.
    assert!(
        fenced_after < Duration::from_secs(3),
        "fenced {fenced_after:?} after the cut"
    );
    assert!(!fenced.stopped);
    // The fence is counted, not read from last_error: the heartbeat keeps
    // retrying while fenced, and a watch receiver sees only the latest
    // status, so a failed retry right after the fence may already have
    // replaced the fence's message.
    assert_eq!(fenced.fences, 1, "{fenced:?}");
    assert_eq!(fenced.session_losses, 0, "{fenced:?}");
    assert!(
        fenced
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("fenced") || e.starts_with("heartbeat: ")),
        "{fenced:?}"
    );
    assert!(fenced.heartbeat_failures >= 1, "{fenced:?}");

    // Healed: a live session again (the same one if its lease survived, a
    // new one otherwise), and new tasks are finished.
    cut.store(false, Ordering::SeqCst);
    let healed = status_until(&runner, "a session after the heal", DEADLINE, |s| {
        s.session.is_some()
    })
    .await;
    let now_session = healed.session.unwrap();
    poll_sql(
        &client,
        "the session after the heal is live",
        "SELECT expires_at > clock_timestamp() AND ended_at IS NULL \
         FROM session_lock.session WHERE id = $1",
        &[&now_session],
    )
    .await;
    if now_session == session {
        assert_eq!(healed.session_starts, 1, "{healed:?}");
    } else {
        assert!(healed.session_starts >= 2, "{healed:?}");
    }
    let ids = insert(&client, &["after the heal 1", "after the heal 2"]).await;
    all_finished(&client).await;
    for &id in &ids {
        let (_, finished_by, _) = task_row(&client, id).await;
        assert_eq!(finished_by, runner.status().session);
        assert_eq!(runs_of(&runs, id), 1);
    }
    runner.stop().await;
}
