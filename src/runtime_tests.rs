//! The runtime's timing, unit-tested against the scripted database with a
//! paused clock: every actor runs on the test's arbiter, so tokio's paused
//! time governs them all, and a test of seconds of runner time takes
//! milliseconds. The real-database tests (tests/it) check the same runner
//! against PostgreSQL; these check what is hard to time there: the fence,
//! the drain, Stop in the middle of things, backoff under notifications,
//! carried completions and a database that moves.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RunnerConfig;
use crate::runner::{Runner, RunnerHandle};
use crate::scripted::{Fault, Method, POISONED, ScriptedDb, ScriptedFinder, TestTask};
use crate::status::RunnerStatus;
use crate::task::TaskId;
use crate::tasker::{Progress, TaskerError};

const MS: Duration = Duration::from_millis(1);

/// ttl 1 s, heartbeat 300 ms (timeout 100 ms), fence at 800 ms, tick 100 ms.
fn config() -> crate::config::RunnerConfigBuilder {
    RunnerConfig::builder("scripted")
        .ttl(1000 * MS)
        .heartbeat(300 * MS)
        .heartbeat_timeout(100 * MS)
        .safety_margin(200 * MS)
        .tick(100 * MS)
        .jitter(Duration::ZERO)
        .retry_max(2000 * MS)
        .drain_timeout(300 * MS)
        .max_tasks(4)
        .workers(2)
}

/// What a test's Tasker returns for a batch.
type Run = futures_util::future::BoxFuture<'static, Result<Vec<TaskId>, TaskerError>>;

/// How many times each task's run started.
type Runs = Arc<Mutex<BTreeMap<TaskId, u32>>>;

/// A Tasker that records each run and completes every task after `work`.
fn tasker(
    runs: Runs,
    work: Duration,
) -> impl Fn(Vec<TestTask>, Progress) -> Run + Send + Sync + 'static {
    move |tasks: Vec<TestTask>, progress: Progress| {
        let runs = runs.clone();
        Box::pin(async move {
            for t in &tasks {
                *runs.lock().unwrap().entry(t.id).or_default() += 1;
            }
            tokio::time::sleep(work).await;
            for t in &tasks {
                progress.complete(t.id);
            }
            Ok(Vec::new())
        })
    }
}

fn start(db: &ScriptedDb, config: RunnerConfig, runs: &Runs, work: Duration) -> RunnerHandle {
    Runner::<TestTask, _, _>::new(
        config,
        ScriptedFinder::new(db.clone()),
        tasker(runs.clone(), work),
    )
    .start_inline()
}

/// Waits (in paused time) until `runs` says `n` distinct tasks have started.
async fn started(runs: &Runs, n: usize) {
    let deadline = Instant::now() + 5000 * MS;
    while runs.lock().unwrap().len() < n {
        assert!(Instant::now() < deadline, "runs never started: {runs:?}");
        tokio::time::sleep(MS).await;
    }
}

async fn until(
    runner: &RunnerHandle,
    within: Duration,
    pred: impl FnMut(&RunnerStatus) -> bool,
) -> RunnerStatus {
    let mut rx = runner.subscribe();
    match tokio::time::timeout(within, rx.wait_for(pred)).await {
        Ok(Ok(status)) => status.clone(),
        _ => panic!("status never came: {:?}", runner.status()),
    }
}

#[actix_rt::test]
async fn the_runner_fences_itself_at_ttl_minus_margin_after_its_last_heartbeat() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 0);
    let runs = Runs::default();
    let t0 = Instant::now();
    let runner = start(&db, config().build().unwrap(), &runs, MS);
    until(&runner, 5000 * MS, |s| s.session.is_some()).await;
    // The first heartbeat (at 300 ms) succeeds; every later one fails.
    until(&runner, 5000 * MS, |s| s.heartbeats >= 1).await;
    let renewed = db.calls(Method::Bump).len();
    assert_eq!(renewed, 1);
    db.failing(Method::Bump, true);
    let fenced = until(&runner, 5000 * MS, |s| s.fences == 1).await;
    let at = t0.elapsed();
    // Sent at 300 ms: fenced at 300 + 1000 - 200 = 1100 ms, not later.
    assert!(
        at >= 1100 * MS && at < 1110 * MS,
        "fenced at {at:?}: {fenced:?}"
    );
    assert!(fenced.session.is_none(), "a fenced runner has no session");
    // A heartbeat that succeeds again lifts the fence.
    db.failing(Method::Bump, false);
    let lifted = until(&runner, 5000 * MS, |s| s.session.is_some()).await;
    assert_eq!(lifted.fences, 1);
    assert_eq!(lifted.session_starts, 1, "the same session, no new one");
    runner.stop().await;
}

#[actix_rt::test]
async fn a_notification_does_not_cut_the_backoff_short() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 3);
    let runs = Runs::default();
    let runner = start(&db, config().build().unwrap(), &runs, MS);
    until(&runner, 5000 * MS, |s| s.session.is_some()).await;
    db.failing(Method::GetWork, true);
    let before = db.calls(Method::GetWork).len();
    // A notification every 20 ms for 10 s while get_work keeps failing.
    let end = Instant::now() + 10_000 * MS;
    while Instant::now() < end {
        db.notify();
        tokio::time::sleep(20 * MS).await;
    }
    let calls = db.calls(Method::GetWork).len() - before;
    // Backoff from 100 ms doubling to 2 s: about 8 tries in 10 s. Without
    // it, one every 20 ms: 500.
    assert!((4..=12).contains(&calls), "{calls} get_work calls in 10 s");
    runner.stop().await;
}

/// Waits (in paused time) until the database has seen `n` get_work calls.
async fn get_works(db: &ScriptedDb, n: usize) -> usize {
    let deadline = Instant::now() + 5000 * MS;
    loop {
        let seen = db.with(|s| s.known.len());
        if seen >= n {
            return seen;
        }
        assert!(Instant::now() < deadline, "only {seen} get_work calls");
        tokio::time::sleep(MS).await;
    }
}

/// A get_work names the tasks the last answer gave (less those it
/// finishes) only when that answer was read: never the first call, never
/// the first after calls that failed.
#[actix_rt::test]
async fn the_runner_names_its_tasks_only_after_an_answer_it_read() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 1000);
    let runs = Runs::default();
    let runner = start(&db, config().build().unwrap(), &runs, 10 * MS);
    let on = get_works(&db, 5).await;
    db.failing(Method::GetWork, true);
    let off = get_works(&db, on + 2).await;
    db.failing(Method::GetWork, false);
    get_works(&db, off + 5).await;
    runner.stop().await;
    let known = db.with(|s| s.known.clone());
    let calls = db.calls(Method::GetWork);
    assert_eq!(known.len(), calls.len());
    assert_eq!(known[0], None, "the first call knows nothing");
    for i in 1..known.len() {
        let after_failure = (on + 1..=off).contains(&i);
        match &known[i] {
            None => assert!(after_failure, "call {i} named nothing: {known:?}"),
            Some(named) => {
                assert!(
                    !after_failure,
                    "call {i} named {named:?} after a failed call"
                );
                assert!(
                    named.iter().all(|id| !calls[i].ids.contains(id)),
                    "call {i} named {named:?}, which it finishes: {:?}",
                    calls[i].ids
                );
            }
        }
    }
    assert!(
        known[off].is_none() && known[off + 1].is_some(),
        "{known:?}"
    );
}

#[actix_rt::test]
async fn status_keeps_what_is_held_after_a_failed_tick() {
    tokio::time::pause();
    // More tasks than the capacity: every tick holds 4.
    let db = ScriptedDb::new("db", 1000);
    let runs = Runs::default();
    let runner = start(&db, config().build().unwrap(), &runs, 50 * MS);
    until(&runner, 5000 * MS, |s| s.tasks_held == 4).await;
    db.failing(Method::GetWork, true);
    let failed = until(&runner, 5000 * MS, |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("no answer"))
    })
    .await;
    assert_eq!(failed.tasks_held, 4, "{failed:?}");
    runner.stop().await;
}

#[actix_rt::test]
async fn a_completed_task_locked_elsewhere_is_carried_not_run_again_and_counted_once() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 2);
    // Task 1 is locked by someone else: its finish is skipped.
    db.with(|s| s.locked.insert(1));
    let runs = Runs::default();
    let runner = start(&db, config().max_tasks(2).build().unwrap(), &runs, MS);
    until(&runner, 5000 * MS, |s| s.finished >= 1).await;
    // Several ticks go by with task 1 held, completed and unfinished.
    tokio::time::sleep(1000 * MS).await;
    let status = runner.status();
    assert_eq!(status.finished, 1, "only task 2 is finished: {status:?}");
    assert_eq!(status.rejected, 0, "task 1 is still held: {status:?}");
    assert_eq!(runs.lock().unwrap()[&1], 1, "task 1 never ran again");
    // The lock goes: the next call finishes it.
    db.with(|s| s.locked.clear());
    until(&runner, 5000 * MS, |s| s.finished == 2).await;
    assert_eq!(
        db.with(|s| s.finished.len()),
        2,
        "the database agrees: two finished"
    );
    assert_eq!(runs.lock().unwrap()[&1], 1);
    runner.stop().await;
}

#[actix_rt::test]
async fn a_session_started_while_stopping_is_ended() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 0);
    // The start answers after 80 ms (within the heartbeat timeout).
    db.fault(Method::Start, Fault::Delay(80 * MS));
    let runs = Runs::default();
    let runner = start(&db, config().build().unwrap(), &runs, MS);
    tokio::time::sleep(10 * MS).await;
    assert_eq!(db.calls(Method::Start).len(), 1, "the start is in flight");
    runner.stop().await;
    let sessions = db.with(|s| s.sessions.clone());
    assert_eq!(sessions.len(), 1);
    let session = sessions.values().next().unwrap();
    assert!(
        session.ended && !session.live,
        "the session the stopping runner started was ended: {session:?}"
    );
}

#[actix_rt::test]
async fn a_batch_fetched_while_stop_arrives_is_not_started() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 3);
    // The first get_work answers late; Stop comes while it is in flight.
    db.fault(Method::GetWork, Fault::Delay(200 * MS));
    let runs = Runs::default();
    let runner = start(&db, config().build().unwrap(), &runs, MS);
    until(&runner, 5000 * MS, |s| s.session.is_some()).await;
    tokio::time::sleep(50 * MS).await;
    assert_eq!(db.calls(Method::GetWork).len(), 1, "get_work in flight");
    runner.stop().await;
    assert!(runs.lock().unwrap().is_empty(), "nothing ran: {runs:?}");
    assert_eq!(
        db.with(|s| s.tasks.values().filter(|h| h.is_some()).count()),
        0,
        "the ended session's tasks are free again"
    );
}

#[actix_rt::test]
async fn stop_waits_for_the_drain_then_stops_the_batch_and_ends_the_session() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 2);
    let runs = Runs::default();
    // Tasks that take 10 s: longer than the drain timeout (300 ms).
    let runner = start(&db, config().build().unwrap(), &runs, 10_000 * MS);
    started(&runs, 2).await;
    let t0 = Instant::now();
    runner.stop().await;
    let took = t0.elapsed();
    assert!(
        took >= 300 * MS && took < 400 * MS,
        "Stop waited the drain timeout, then stopped the batch: {took:?}"
    );
    let status = runner.status();
    assert!(status.left_at_stop.is_empty(), "the stopped runs returned");
    assert_eq!(db.with(|s| s.finished.len()), 0, "nothing completed");
    assert!(
        db.with(|s| s.sessions.values().all(|s| s.ended)),
        "the session was ended"
    );
}

#[actix_rt::test]
async fn a_database_that_moves_gets_a_new_session_and_never_the_old_ids() {
    tokio::time::pause();
    let first = ScriptedDb::new("first", 4);
    let second = ScriptedDb::new("second", 4);
    let finder = ScriptedFinder::new(first.clone());
    let runs = Runs::default();
    // Drain mode carries completed ids to the next get_work.
    let runner = Runner::<TestTask, _, _>::new(
        config().max_tasks(4).build().unwrap(),
        finder.clone(),
        tasker(runs.clone(), 20 * MS),
    )
    .start_inline();
    until(&runner, 5000 * MS, |s| s.fetched >= 4).await;
    finder.move_to(second.clone());
    let moved = until(&runner, 5000 * MS, |s| s.database_moves >= 1).await;
    until(&runner, 5000 * MS, |s| s.session_starts >= 2).await;
    until(&runner, 5000 * MS, |s| s.finished >= 4).await;
    // In the second database, session 1 is the one started there; nothing
    // used an id of the first database before that start.
    let calls = second.with(|s| s.calls.clone());
    let first_start = calls
        .iter()
        .position(|c| c.method == Method::Start)
        .expect("a session started in the second database");
    for c in &calls[..first_start] {
        assert!(
            c.session.is_none() && c.ids.is_empty(),
            "an id from the first database reached the second: {c:?} ({moved:?})"
        );
    }
    for c in &calls[first_start..] {
        if let Some(s) = c.session {
            assert!(
                second.with(|st| st.sessions.contains_key(&s)),
                "{c:?} names a session of the second database"
            );
        }
    }
    runner.stop().await;
}

#[actix_rt::test]
async fn a_task_whose_id_panics_is_reported_and_the_rest_run() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 0);
    db.with(|s| {
        s.tasks.insert(1, None);
        s.tasks.insert(POISONED, None);
        s.tasks.insert(2, None);
    });
    let runs = Runs::default();
    let runner = start(&db, config().build().unwrap(), &runs, MS);
    let status = until(&runner, 5000 * MS, |s| s.finished >= 2).await;
    assert!(status.failed >= 1, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("Task::id panicked")),
        "{status:?}"
    );
    assert_eq!(
        runs.lock().unwrap().keys().copied().collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(status.actor_restarts, 0, "no actor died");
    runner.stop().await;
}

#[actix_rt::test]
async fn a_lost_session_is_replaced_and_its_carried_ids_are_not_counted_finished() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 4);
    let runs = Runs::default();
    let runner = start(&db, config().build().unwrap(), &runs, 200 * MS);
    started(&runs, 4).await;
    // The session is lost (a survivor reclaimed it) while its batch runs.
    db.with(|s| {
        for sess in s.sessions.values_mut() {
            sess.live = false;
        }
        for holder in s.tasks.values_mut() {
            *holder = None;
        }
    });
    let status = until(&runner, 5000 * MS, |s| s.session_losses >= 1).await;
    assert_eq!(
        status.finished, 0,
        "nothing the database refused counts: {status:?}"
    );
    let after = until(&runner, 5000 * MS, |s| s.finished == 4).await;
    assert_eq!(after.session_starts, 2, "{after:?}");
    assert_eq!(db.with(|s| s.finished.len()), 4);
    assert!(
        runs.lock().unwrap().values().all(|&n| n == 2),
        "each ran again under the new session: {runs:?}"
    );
    runner.stop().await;
}

/// What [`writing_tasker`] did: how many times each task's side effect was
/// written (as the example Tasker writes its run row's `finished_at`), and
/// how many times its completion was reported through Progress.
#[derive(Debug, Default)]
struct Writes {
    written: BTreeMap<TaskId, u32>,
    reported: BTreeMap<TaskId, u32>,
}

/// A Tasker shaped like the example's: for each task it writes its side
/// effect, then waits for that write's reply (until `replies` is true, as a
/// reply held up by a slow link), and only then reports the task complete.
/// Tasks for which `at_once` holds are reported right after their write.
fn writing_tasker(
    writes: Arc<Mutex<Writes>>,
    replies: tokio::sync::watch::Receiver<bool>,
    at_once: fn(TaskId) -> bool,
) -> impl Fn(Vec<TestTask>, Progress) -> Run + Send + Sync + 'static {
    move |tasks: Vec<TestTask>, progress: Progress| {
        let writes = writes.clone();
        let mut replies = replies.clone();
        Box::pin(async move {
            for t in &tasks {
                *writes.lock().unwrap().written.entry(t.id).or_default() += 1;
                if at_once(t.id) {
                    progress.complete(t.id);
                    *writes.lock().unwrap().reported.entry(t.id).or_default() += 1;
                }
            }
            let _ = replies.wait_for(|open| *open).await;
            for t in tasks.iter().filter(|t| !at_once(t.id)) {
                progress.complete(t.id);
                *writes.lock().unwrap().reported.entry(t.id).or_default() += 1;
            }
            Ok(Vec::new())
        })
    }
}

/// Waits (in paused time) until every one of `ids` has been written `n` times.
async fn written(writes: &Arc<Mutex<Writes>>, ids: &[TaskId], n: u32) {
    let deadline = Instant::now() + 5000 * MS;
    while !ids
        .iter()
        .all(|id| writes.lock().unwrap().written.get(id) == Some(&n))
    {
        assert!(Instant::now() < deadline, "never written: {writes:?}");
        tokio::time::sleep(MS).await;
    }
}

#[actix_rt::test]
async fn a_run_cut_by_a_fence_between_its_write_and_its_report_runs_again_in_the_same_session() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 2);
    let writes = Arc::new(Mutex::new(Writes::default()));
    let (replies, replies_rx) = tokio::sync::watch::channel(false);
    // Keep: the cut runs stay with the session (with GiveBack they are given
    // back, and picked up again after their backoff: the same runs again).
    let runner = Runner::<TestTask, _, _>::new(
        config()
            .workers(1)
            .failed_tasks(crate::config::FailedTasks::Keep)
            .build()
            .unwrap(),
        ScriptedFinder::new(db.clone()),
        writing_tasker(writes.clone(), replies_rx, |_| false),
    )
    .start_inline();
    // Both runs have written; their replies are held up, and so are the
    // heartbeats: the session fences itself while the replies are in flight.
    written(&writes, &[1, 2], 1).await;
    db.failing(Method::Bump, true);
    until(&runner, 5000 * MS, |s| s.fences == 1).await;
    let cut = until(&runner, 5000 * MS, |s| s.failed >= 2).await;
    assert!(cut.session.is_none(), "fenced: {cut:?}");
    // The replies arrive after the cut: nobody is left to report them.
    replies.send_replace(true);
    tokio::time::sleep(100 * MS).await;
    assert!(
        writes.lock().unwrap().reported.is_empty(),
        "a run cut by the fence reported nothing: {writes:?}"
    );
    assert!(
        db.calls(Method::Finish)
            .iter()
            .chain(&db.calls(Method::GetWork))
            .all(|c| c.ids.is_empty()),
        "no completion was claimed for the cut runs"
    );
    assert_eq!(
        db.with(|s| s.tasks.clone()),
        BTreeMap::from([(1, Some(1)), (2, Some(1))]),
        "the fenced session still holds both tasks"
    );
    // The heartbeat gets through: the fence lifts on the same session,
    // which runs both tasks again (at-least-once) and finishes them.
    db.failing(Method::Bump, false);
    let done = until(&runner, 5000 * MS, |s| s.finished == 2).await;
    assert_eq!(done.session_starts, 1, "the same session: {done:?}");
    assert_eq!(done.fences, 1, "{done:?}");
    assert_eq!(done.rejected, 0, "{done:?}");
    let Writes { written, reported } = std::mem::take(&mut *writes.lock().unwrap());
    assert_eq!(
        written,
        BTreeMap::from([(1, 2), (2, 2)]),
        "each task's side effect was written twice"
    );
    assert_eq!(reported, BTreeMap::from([(1, 1), (2, 1)]));
    assert_eq!(db.with(|s| s.finished.clone()), vec![(1, 1), (2, 1)]);
    runner.stop().await;
}

#[actix_rt::test]
async fn a_completion_reported_before_a_fence_is_finished_after_it_and_never_run_again() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 2);
    let writes = Arc::new(Mutex::new(Writes::default()));
    let (replies, replies_rx) = tokio::sync::watch::channel(false);
    // One slice of both tasks: task 1 is reported at once, task 2 waits for
    // its reply when the fence cuts the slice.
    let runner = Runner::<TestTask, _, _>::new(
        config().workers(1).build().unwrap(),
        ScriptedFinder::new(db.clone()),
        writing_tasker(writes.clone(), replies_rx, |id| id == 1),
    )
    .start_inline();
    written(&writes, &[1, 2], 1).await;
    // The link is down for the heartbeat and for the finish that follows
    // the cut: the completion of task 1 must outlive the fence.
    db.failing(Method::Bump, true);
    db.failing(Method::Finish, true);
    until(&runner, 5000 * MS, |s| s.fences == 1).await;
    until(&runner, 5000 * MS, |s| s.failed >= 1).await;
    let tried = db.calls(Method::Finish);
    assert!(
        tried.iter().any(|c| c.ids == [1]),
        "the fenced tick tried to finish task 1: {tried:?}"
    );
    assert!(db.with(|s| s.finished.is_empty()), "nothing finished yet");
    replies.send_replace(true);
    db.failing(Method::Finish, false);
    db.failing(Method::Bump, false);
    let done = until(&runner, 5000 * MS, |s| s.finished == 2).await;
    assert_eq!(done.session_starts, 1, "the same session: {done:?}");
    assert_eq!(done.rejected, 0, "{done:?}");
    let Writes { written, reported } = std::mem::take(&mut *writes.lock().unwrap());
    assert_eq!(
        written,
        BTreeMap::from([(1, 1), (2, 2)]),
        "task 1, reported before the fence, never ran again; task 2 did"
    );
    assert_eq!(reported, BTreeMap::from([(1, 1), (2, 1)]));
    assert_eq!(db.with(|s| s.finished.clone()), vec![(1, 1), (2, 1)]);
    runner.stop().await;
}

/// A Tasker that records each run and completes every task but `failing`.
fn failing_tasker(
    runs: Runs,
    failing: TaskId,
) -> impl Fn(Vec<TestTask>, Progress) -> Run + Send + Sync + 'static {
    move |tasks: Vec<TestTask>, progress: Progress| {
        let runs = runs.clone();
        Box::pin(async move {
            for t in &tasks {
                *runs.lock().unwrap().entry(t.id).or_default() += 1;
                if t.id != failing {
                    progress.complete(t.id);
                }
            }
            Ok(Vec::new())
        })
    }
}

#[actix_rt::test]
async fn a_task_the_batch_did_not_complete_is_given_back_once_per_run() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 2);
    let runs = Runs::default();
    let runner = Runner::<TestTask, _, _>::new(
        config().max_tasks(2).build().unwrap(),
        ScriptedFinder::new(db.clone()),
        failing_tasker(runs.clone(), 1),
    )
    .start_inline();
    let status = until(&runner, 5000 * MS, |s| s.finished >= 1 && s.given_back >= 2).await;
    let session = status.session.expect("a session");
    let given = db.with(|s| s.given_back.clone());
    assert!(
        given.iter().all(|&(id, by)| id == 1 && by == session),
        "only the failed task is given back, by its holder: {given:?}"
    );
    // Each run of task 1 is given back once: never held across a tick.
    let runs_of_1 = runs.lock().unwrap()[&1];
    let given_now = db.with(|s| s.given_back.len()) as u32;
    assert!(
        runs_of_1 == given_now || runs_of_1 == given_now + 1,
        "{runs_of_1} runs of task 1, {given_now} given back"
    );
    assert_eq!(db.with(|s| s.finished.clone()), vec![(2, session)]);
    runner.stop().await;
}

#[actix_rt::test]
async fn with_keep_a_task_the_batch_did_not_complete_stays_and_runs_next_tick() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 2);
    let runs = Runs::default();
    let runner = Runner::<TestTask, _, _>::new(
        config()
            .max_tasks(2)
            .failed_tasks(crate::config::FailedTasks::Keep)
            .build()
            .unwrap(),
        ScriptedFinder::new(db.clone()),
        failing_tasker(runs.clone(), 1),
    )
    .start_inline();
    let status = until(&runner, 5000 * MS, |s| s.finished >= 1 && s.ticks >= 4).await;
    assert!(runs.lock().unwrap()[&1] >= 3, "rerun every tick: {runs:?}");
    assert_eq!(status.given_back, 0, "{status:?}");
    assert!(db.with(|s| s.given_back.is_empty()), "nothing given back");
    let session = status.session.expect("a session");
    assert_eq!(
        db.with(|s| s.tasks.get(&1).copied()),
        Some(Some(session)),
        "the session still holds task 1"
    );
    runner.stop().await;
}

/// A Tasker that records the size of each slice it is handed and takes
/// `cost` per task of real time, blocking its thread: the pace is wall
/// time, which the paused clock does not stop.
fn pacing_tasker(
    slices: Arc<Mutex<Vec<usize>>>,
    cost: Arc<Mutex<Duration>>,
) -> impl Fn(Vec<TestTask>, Progress) -> Run + Send + Sync + 'static {
    move |tasks: Vec<TestTask>, _progress: Progress| {
        slices.lock().unwrap().push(tasks.len());
        let cost = *cost.lock().unwrap();
        Box::pin(async move {
            std::thread::sleep(cost * tasks.len() as u32);
            Ok(tasks.iter().map(|t| t.id).collect())
        })
    }
}

#[actix_rt::test]
async fn a_batch_goes_over_as_many_workers_as_the_last_batchs_pace_pays_for() {
    tokio::time::pause();
    let db = ScriptedDb::new("db", 4);
    let slices = Arc::new(Mutex::new(Vec::new()));
    let cost = Arc::new(Mutex::new(Duration::ZERO));
    // A quantum long enough that no stall of a loaded machine makes a
    // batch of no time look slow.
    let mut config = config().max_tasks(4).workers(2).build().unwrap();
    config.quantum = 50 * MS;
    let runner = Runner::<TestTask, _, _>::new(
        config,
        ScriptedFinder::new(db.clone()),
        pacing_tasker(slices.clone(), cost.clone()),
    )
    .start_inline();
    let mut next_id: TaskId = 5;
    // Each step adds a batch of 4 once the last has finished, then says
    // how it was sliced.
    let mut batch = async |finished: u64| {
        if finished > 4 {
            db.with(|s| {
                for id in next_id..next_id + 4 {
                    s.tasks.insert(id, None);
                }
            });
            next_id += 4;
        }
        until(&runner, 5000 * MS, |s| s.finished >= finished).await;
        std::mem::take(&mut *slices.lock().unwrap())
    };
    // Pace unknown: every worker.
    assert_eq!(batch(4).await, vec![2, 2]);
    // Four tasks of no time: one worker.
    assert_eq!(batch(8).await, vec![4]);
    // Tasks of 25 ms, each batch sliced by the last one's pace: the first
    // still on one worker, the next (100 ms, two quanta) on both.
    *cost.lock().unwrap() = 25 * MS;
    assert_eq!(batch(12).await, vec![4]);
    assert_eq!(batch(16).await, vec![2, 2]);
    // Quick again: one worker, after one more batch at the old pace.
    *cost.lock().unwrap() = Duration::ZERO;
    assert_eq!(batch(20).await, vec![2, 2]);
    assert_eq!(batch(24).await, vec![4]);
    runner.stop().await;
}
