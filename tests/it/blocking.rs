//! Tasks that block their worker's thread (the example Tasker's `block:<ms>`
//! payloads: a synchronous Tasker no timeout can stop), driven through runner
//! processes (`session-lock run`), and what must hold whatever they do:
//!
//! * no two runs of one task overlap in time;
//! * nothing is lost: every task is finished in the end;
//! * the first runner's session is never ended while its runs are in flight.
//!
//! All three are read from the database: `example_task_run` has one row per
//! run, `[started_at, finished_at]`, and `session_lock.session` the sessions.
//!
//! A run that was dropped rather than returned (its batch timed out, or was
//! stopped, after the block ended) has no `finished_at`: the example Tasker
//! writes it after its work, and a dropped future never gets there. Counting
//! such a run as running until the end of the test would make every later
//! run of its task an overlap, so it is taken to last until the first
//! moment its runner's own output shows it over (see [`Ends`]): the return
//! of the stuck tick's slices it was reported in (each worker logs its
//! slice's return; a task is never dispatched again before its tick ends),
//! or the runner's exit as the test saw it. Without either it counts as
//! running until the end of the test.
//!
//! A dropped future's queries already handed to its connection still run:
//! a task queued behind a block in the same worker's slice can have its
//! `example_task_run` insert land after the slice returned (even after its
//! session was reclaimed), a run that "starts" when the runtime had already
//! let its task go. The tests that check overlaps from a stuck tick give
//! each task a worker of its own.
//!
//! Timing: the stuck report comes `batch_timeout` + 2 s after a batch
//! starts; a session no longer renewed expires at most `ttl` after its last
//! heartbeat; Stop gives up on runs that do not return `drain_timeout` +
//! 2 s after it starts. The blocks are chosen well inside those bounds (see
//! each test), so that a loaded machine shifts nothing across them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::processes::{
    DEADLINE, assert_finished_and_fenced, count, poll_until, wait_all_finished,
};
use session_lock_testkit::db::migrated_db;
use session_lock_testkit::{RunnerCommand, RunnerProcess};

/// What the fetcher logs when runs outlive `batch_timeout` + 2 s
/// (src/fetcher.rs, `run_tasks`).
const STUCK_LINE: &str = "runs outlived the batch timeout and cannot be stopped";
/// What the session actor logs once those runs have all returned.
const RETURNED_LINE: &str = "the runs that outlived their timeouts returned";
/// What a worker logs when its slice returns with tasks not completed
/// (src/workers.rs).
const SLICE_FAILED_LINE: &str = "slice did not fully complete";
/// What the fetcher logs when Stop leaves runs that do not return.
const LEFT_LINE: &str = "stopping with runs that do not return";
/// What `session-lock run` logs about them once stopped.
const LEFT_AT_STOP_LINE: &str = "tasks still running at stop";

/// `--flag value` pairs.
fn args(pairs: &[(&str, u64)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(k, v)| [format!("--{k}"), v.to_string()])
        .collect()
}

/// The second runner: room for every task (its fair share dwarfs the first
/// runner's, so the first keeps none of the few tasks left), and a batch
/// timeout far past any block, so that it completes what it runs.
fn second_runner_args() -> Vec<String> {
    args(&[
        ("batch-timeout-ms", 30_000),
        ("ttl-ms", 3000),
        ("heartbeat-ms", 500),
        ("tick-ms", 100),
        ("max-tasks", 20),
        ("workers", 2),
        ("work-ms", 200),
    ])
}

/// Inserts tasks with these payloads, in order, and returns their ids.
async fn seed(client: &Client, payloads: &[&str]) -> Vec<i64> {
    let payloads: Vec<String> = payloads.iter().map(|p| p.to_string()).collect();
    client
        .query(
            "INSERT INTO example_task (payload) SELECT p FROM unnest($1::text[]) WITH ORDINALITY u(p, n) ORDER BY n RETURNING id",
            &[&payloads],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The database's clock, in seconds since the epoch.
/// The database's clock, in seconds since the epoch.
pub(crate) async fn db_now(client: &Client) -> f64 {
    client
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until `session` has started runs of every task in `tasks` that
/// have not finished: they are blocking their threads.
async fn wait_blocked(client: &Client, session: i64, tasks: &[i64]) {
    poll_until(
        &format!("session {session} runs tasks {tasks:?}"),
        DEADLINE,
        || async {
            let n = count(
                client,
                "SELECT count(DISTINCT task_id) FROM example_task_run
                  WHERE session_id = $1 AND task_id = ANY($2) AND finished_at IS NULL",
                &[&session, &tasks],
            )
            .await;
            (n == tasks.len() as i64).then_some(())
        },
    )
    .await;
}

/// Waits until the runner's stderr has a line containing `needle`, and
/// returns that line.
async fn wait_log(runner: &RunnerProcess, needle: &str) -> String {
    let label = runner.label().to_owned();
    poll_until(
        &format!("runner {label} logs {needle:?}"),
        DEADLINE,
        || async {
            runner
                .log_text()
                .lines()
                .find(|l| l.contains(needle))
                .map(str::to_string)
        },
    )
    .await
}

/// `key=<digits>` in a log line (`key` preceded by a space, so that
/// `session=` does not match `session_lock.session.id=`).
fn field_i64(line: &str, key: &str) -> Option<i64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// `key=[1, 2, 3]` in a log line.
fn field_ids(line: &str, key: &str) -> Option<Vec<i64>> {
    let at = line.find(&format!(" {key}=["))? + key.len() + 3;
    let end = at + line[at..].find(']')?;
    Some(
        line[at..end]
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
    )
}

/// A log line's timestamp (its first word, RFC 3339), as the database
/// reads it: seconds since the epoch.
async fn log_time(client: &Client, line: &str) -> f64 {
    let stamp = line.split_whitespace().next().unwrap_or_default();
    client
        .query_one(
            "SELECT extract(epoch FROM $1::text::timestamptz)::float8",
            &[&stamp],
        )
        .await
        .unwrap_or_else(|e| panic!("no timestamp in log line {line:?}: {e}"))
        .get(0)
}

/// A stuck tick as its runner logged it.
#[derive(Debug)]
struct StuckTick {
    session: i64,
    /// The tasks still running when the stuck report came.
    tasks: Vec<i64>,
    reported_at: f64,
    /// When the last of its slices that did not complete returned (each
    /// worker logs it on its own thread as soon as its slice's future is
    /// dropped, before replying to the fetcher), if they all returned.
    returned_at: Option<f64>,
}

/// The stuck ticks in a runner's stderr. A tick's slices have all returned
/// when the session actor logs [`RETURNED_LINE`]; the last "slice did not
/// fully complete" line before it (the runs left unfinished are those of
/// such slices) is when the last of them ended, and comes before anything
/// the fetcher does next (that log line precedes the slice's reply), unlike
/// the session actor's own line.
async fn stuck_ticks(client: &Client, runner: &RunnerProcess) -> Vec<StuckTick> {
    let mut ticks: Vec<StuckTick> = Vec::new();
    let mut last_slice: Option<f64> = None;
    for line in runner.log_text().lines() {
        let open = ticks.last().is_some_and(|t| t.returned_at.is_none());
        if line.contains(STUCK_LINE) {
            let (Some(session), Some(tasks)) =
                (field_i64(line, "session"), field_ids(line, "tasks"))
            else {
                panic!(
                    "runner {}: unreadable stuck report {line:?}",
                    runner.label()
                );
            };
            assert!(
                !open,
                "runner {}: a stuck report before the last stuck tick returned: {line}",
                runner.label()
            );
            ticks.push(StuckTick {
                session,
                tasks,
                reported_at: log_time(client, line).await,
                returned_at: None,
            });
            last_slice = None;
        } else if open && line.contains(SLICE_FAILED_LINE) {
            last_slice = Some(log_time(client, line).await);
        } else if open && line.contains(RETURNED_LINE) {
            let tick = ticks.last_mut().expect("an open tick");
            assert_eq!(
                field_i64(line, "session"),
                Some(tick.session),
                "runner {}: the stuck tick's runs returned for another session: {line}",
                runner.label()
            );
            let logged = log_time(client, line).await;
            tick.returned_at = Some(last_slice.take().unwrap_or(logged));
        }
    }
    ticks
}

/// What the runners' own output tells about when runs without a
/// `finished_at` ended.
#[derive(Debug, Default)]
struct Ends {
    /// Stuck ticks: a run of a listed task, of the tick's session, started
    /// before the tick's runs had returned, ended by then.
    stuck: Vec<StuckTick>,
    /// Sessions of runners that exited, and when the test saw them gone
    /// (database clock): none of their runs outlived that.
    exited: BTreeMap<i64, f64>,
    /// The end of the test (database clock), for runs nothing else ends.
    now: f64,
}

impl Ends {
    /// When `run` ended at the latest, and how that is known.
    fn end(&self, run: &Run) -> (f64, &'static str) {
        if let Some(end) = run.finished {
            return (end, "finished");
        }
        let stuck = self
            .stuck
            .iter()
            .filter(|t| t.session == run.session && t.tasks.contains(&run.task))
            .filter(|t| t.returned_at.is_some_and(|at| at >= run.started))
            .min_by(|a, b| a.reported_at.total_cmp(&b.reported_at))
            .and_then(|t| t.returned_at);
        match (stuck, self.exited.get(&run.session)) {
            (Some(s), Some(&e)) if e < s => (e, "runner exited"),
            (Some(s), _) => (s, "stuck tick returned"),
            (None, Some(&e)) => (e, "runner exited"),
            (None, None) => (self.now, "unfinished: end of test"),
        }
    }
}

/// One row of `example_task_run`, times in seconds since the epoch.
#[derive(Debug, Clone)]
struct Run {
    id: i64,
    task: i64,
    payload: String,
    session: i64,
    started: f64,
    finished: Option<f64>,
}

async fn runs(client: &Client) -> Vec<Run> {
    client
        .query(
            "SELECT r.id, r.task_id, t.payload, r.session_id,
                    extract(epoch FROM r.started_at)::float8,
                    extract(epoch FROM r.finished_at)::float8
               FROM example_task_run r JOIN example_task t ON t.id = r.task_id
              ORDER BY r.task_id, r.started_at, r.id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Run {
            id: r.get(0),
            task: r.get(1),
            payload: r.get(2),
            session: r.get(3),
            started: r.get(4),
            finished: r.get(5),
        })
        .collect()
}

/// The rows of `example_task_run`, `example_task` and `session_lock.session`,
/// for failure messages.
async fn dump(client: &Client) -> String {
    let mut out = String::from("example_task_run:\n");
    let queries = [
        "SELECT format('  run %s: task %s (%s) session %s, %s .. %s', r.id, r.task_id, t.payload, r.session_id,
                r.started_at::time, coalesce(r.finished_at::time::text, 'NULL'))
           FROM example_task_run r JOIN example_task t ON t.id = r.task_id ORDER BY r.task_id, r.started_at, r.id",
        "SELECT 'example_task:'",
        "SELECT format('  task %s (%s): held by %s, finished %s by %s', id, payload, coalesce(session_id::text, '-'),
                coalesce(finished_at::time::text, 'NULL'), coalesce(finished_by::text, '-'))
           FROM example_task ORDER BY id",
        "SELECT 'session_lock.session:'",
        "SELECT format('  session %s (pid %s): started %s, bumped %s, expires %s, ended %s, reclaimed %s',
                id, pid, started_at::time, bumped_at::time, expires_at::time,
                coalesce(ended_at::time::text, 'NULL'), coalesce(reclaimed_at::time::text, 'NULL'))
           FROM session_lock.session ORDER BY id",
    ];
    for sql in queries {
        for r in client.query(sql, &[]).await.unwrap() {
            out.push_str(&r.get::<_, String>(0));
            out.push('\n');
        }
    }
    out
}

/// Seconds since the epoch as the time of day (UTC), for messages.
fn tod(t: f64) -> String {
    let day = t.rem_euclid(86_400.0);
    let h = (day / 3600.0) as u64;
    let m = ((day % 3600.0) / 60.0) as u64;
    format!("{h:02}:{m:02}:{:09.6}", day % 60.0)
}

/// Checks that no two runs of one task overlap, each run lasting until its
/// end as `ends` tells. Returns the smallest gap between a run's end and the
/// next run of its task (seconds), if any task ran twice.
async fn assert_no_overlap(client: &Client, ends: &Ends) -> Option<f64> {
    let runs = runs(client).await;
    let mut by_task: BTreeMap<i64, Vec<&Run>> = BTreeMap::new();
    for r in &runs {
        by_task.entry(r.task).or_default().push(r);
    }
    let mut overlaps = Vec::new();
    let mut min_gap: Option<f64> = None;
    for task_runs in by_task.values() {
        for (i, a) in task_runs.iter().enumerate() {
            let (a_end, how) = ends.end(a);
            for b in &task_runs[i + 1..] {
                let gap = b.started - a_end;
                min_gap = Some(min_gap.map_or(gap, |g| g.min(gap)));
                if gap < 0.0 {
                    // A blocked run lasts at least its block: then the
                    // overlap is certain, not only possible.
                    let block_ms: Option<f64> = a
                        .payload
                        .strip_prefix("block:")
                        .and_then(|ms| ms.parse().ok());
                    let certain = a.finished.is_some()
                        || block_ms.is_some_and(|ms| b.started < a.started + ms / 1000.0);
                    overlaps.push(format!(
                        "task {} ({}): run {} (session {}, {} .. {} [{how}]) and run {} (session {}, from {}): {:.3} s{}",
                        a.task,
                        a.payload,
                        a.id,
                        a.session,
                        tod(a.started),
                        tod(a_end),
                        b.id,
                        b.session,
                        tod(b.started),
                        -gap,
                        if certain { ", certain" } else { ", possible" }
                    ));
                }
            }
        }
    }
    if !overlaps.is_empty() {
        panic!(
            "runs of one task overlap:\n{}\nrunner-reported ends: {:#?}\n{}",
            overlaps.join("\n"),
            ends,
            dump(client).await
        );
    }
    min_gap
}

/// With `SESSION_LOCK_BLOCKING_VERBOSE=1`, prints the rows and the
/// runner-reported ends of a passing test too.
async fn verbose(client: &Client, what: &str, ends: &Ends) {
    if std::env::var_os("SESSION_LOCK_BLOCKING_VERBOSE").is_some() {
        eprintln!(
            "{what}: runner-reported ends {ends:#?}\n{}",
            dump(client).await
        );
    }
}

/// The session's `ended_at` (seconds since the epoch), if it was ended.
async fn ended_at(client: &Client, session: i64) -> Option<f64> {
    client
        .query_one(
            "SELECT extract(epoch FROM ended_at)::float8 FROM session_lock.session WHERE id = $1",
            &[&session],
        )
        .await
        .unwrap()
        .get(0)
}

/// Checks that `session` was not ended while any of its runs was in flight
/// (each lasting until its end as `ends` tells). Returns when it was ended.
async fn assert_not_ended_in_flight(client: &Client, session: i64, ends: &Ends) -> Option<f64> {
    let ended = ended_at(client, session).await?;
    let in_flight: Vec<String> = runs(client)
        .await
        .iter()
        .filter(|r| r.session == session)
        .filter_map(|r| {
            let (end, how) = ends.end(r);
            (end > ended).then(|| {
                format!(
                    "run {} of task {} ({}): {} .. {} [{how}]",
                    r.id,
                    r.task,
                    r.payload,
                    tod(r.started),
                    tod(end)
                )
            })
        })
        .collect();
    assert!(
        in_flight.is_empty(),
        "session {session} was ended at {} with runs in flight:\n{}\n{}",
        tod(ended),
        in_flight.join("\n"),
        dump(client).await
    );
    Some(ended)
}

/// Task ids as text, for messages.
fn ids_text(ids: &BTreeSet<i64>) -> String {
    let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
    ids.join(",")
}

/// Runner A runs two `block:3500` tasks and two normal ones, one per worker,
/// with a batch timeout of 500 ms: the blocks outlive it and every attempt
/// to stop them, so A reports them stuck and stops renewing its session.
/// Runner B joins while they block. The blocks end (3.5 s into the batch)
/// after the stuck report (2.5 s) and before A's lease could run out (no
/// earlier than 2 s + ttl = 5 s): A's session survives, it finishes the
/// normal tasks it completed, and its next get_work gives the blocked ones
/// to B (whose capacity leaves A no share of the few left), which completes
/// them. Every task is finished, no run overlaps another of its task, and
/// A's session is ended only by a SIGTERM at the end, when nothing runs.
///
/// One task per worker: a normal task dealt into a blocked worker's slice
/// would have its `example_task_run` insert queued on a connection driven
/// by that blocked thread, and the insert can land after the slice was
/// dropped and returned, recording a run that "starts" when the runtime
/// already let the task go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_past_batch_timeout_then_a_second_runner_joins() {
    let started = Instant::now();
    let db = migrated_db().await;
    let client = db.client().await;
    let mut a = RunnerCommand::new(db.url.as_str())
        .label("blocked")
        .args(args(&[
            ("batch-timeout-ms", 500),
            ("ttl-ms", 3000),
            ("heartbeat-ms", 500),
            ("tick-ms", 100),
            ("max-tasks", 4),
            ("workers", 4),
            ("work-ms", 200),
        ]))
        .keep_log(false)
        .spawn()
        .expect("spawn a runner process");
    let a_session = a.next_session(DEADLINE).await;
    // Alone, A's share is its capacity: the first four, in id order.
    let ids = seed(
        &client,
        &[
            "block:3500",
            "block:3500",
            "normal",
            "normal",
            "normal",
            "normal",
            "normal",
            "normal",
        ],
    )
    .await;
    let (blocked, normal) = (&ids[..2], &ids[2..4]);
    wait_blocked(&client, a_session, blocked).await;
    let blocked_at = started.elapsed();

    let mut b = RunnerCommand::new(db.url.as_str())
        .label("joining")
        .args(second_runner_args())
        .keep_log(false)
        .spawn()
        .expect("spawn a runner process");
    let b_session = b.next_session(DEADLINE).await;

    // A reports its runs stuck and stops renewing, then they return.
    let stuck_line = wait_log(&a, STUCK_LINE).await;
    assert_eq!(
        field_i64(&stuck_line, "session"),
        Some(a_session),
        "the stuck report names A's session: {stuck_line}"
    );
    let stuck_tasks: BTreeSet<i64> = field_ids(&stuck_line, "tasks")
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert!(
        blocked.iter().all(|id| stuck_tasks.contains(id)),
        "the stuck report lists the blocked tasks {blocked:?}: {stuck_line}"
    );
    wait_log(
        &a,
        "no longer renewing the session, so that its lease expires",
    )
    .await;
    wait_log(&a, RETURNED_LINE).await;

    wait_all_finished(&client, DEADLINE).await;
    let all_finished = started.elapsed();
    assert!(a.try_exit().is_none(), "A exited");
    assert!(b.try_exit().is_none(), "B exited");
    assert_finished_and_fenced(&client).await;

    // The blocks ended well before A's lease could run out: A kept its
    // session (the premise of this test; a lease lost mid-block is
    // a_run_stuck_past_its_lease_moves_on_only_after_the_lease_ran_out), and
    // finished what it completed in the stuck batch.
    let row = client
        .query_one(
            "SELECT reclaimed_at IS NULL AND ended_at IS NULL FROM session_lock.session WHERE id = $1",
            &[&a_session],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "A's session is over: its lease ran out while its runs blocked\n{}",
        dump(&client).await
    );
    let by_a = count(
        &client,
        "SELECT count(*) FROM example_task WHERE id = ANY($1) AND finished_by = $2",
        &[&normal, &a_session],
    )
    .await;
    assert_eq!(
        by_a,
        2,
        "A finished the normal tasks it completed beside the blocked ones\n{}",
        dump(&client).await
    );
    // The blocked tasks ran again, to the end, on B.
    let rerun = count(
        &client,
        "SELECT count(DISTINCT task_id) FROM example_task_run
          WHERE session_id = $1 AND task_id = ANY($2) AND finished_at IS NOT NULL",
        &[&b_session, &blocked],
    )
    .await;
    assert_eq!(
        rerun,
        2,
        "B completed the blocked tasks\n{}",
        dump(&client).await
    );

    // Now nothing runs on A: a SIGTERM ends its session.
    a.signal(libc::SIGTERM).expect("signal the runner process");
    let status = a.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "A's exit status after SIGTERM: {status:?}"
    );
    let ends = Ends {
        stuck: stuck_ticks(&client, &a).await,
        exited: BTreeMap::from([(a_session, db_now(&client).await)]),
        now: db_now(&client).await,
    };
    let min_gap = assert_no_overlap(&client, &ends).await;
    let ended = assert_not_ended_in_flight(&client, a_session, &ends).await;
    verbose(&client, "blocked+join", &ends).await;
    assert!(
        ended.is_some(),
        "A's session was not ended on SIGTERM with nothing running\n{}",
        dump(&client).await
    );
    let a_runs = count(
        &client,
        "SELECT count(*) FROM example_task_run WHERE session_id = $1",
        &[&a_session],
    )
    .await;
    eprintln!(
        "blocked+join: A blocked {blocked_at:?} in, stuck tasks [{}], {a_runs} runs on A, all finished {all_finished:?} in; smallest gap between runs of a task {:.3} s; test {:?}",
        ids_text(&stuck_tasks),
        min_gap.unwrap_or(f64::NAN),
        started.elapsed()
    );
}

/// Runner A runs two `block:5000` tasks (a normal task behind each, in its
/// worker's slice) and gets SIGTERM as soon as they block, with a drain
/// timeout of 300 ms: the drain gives up, stopping the runs fails (they
/// block their threads), and STUCK_GRACE (2 s) later Stop leaves them
/// running and replies, about 2.3 s after SIGTERM, well before the blocks
/// end. A exits 0 naming the tasks left running, without ending its
/// session: the lease runs out, and runner B, which joined right after the
/// SIGTERM, takes the tasks over only then and finishes every task. No run
/// overlaps another of its task (A's runs end with A at the latest), and
/// A's session is never ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_blocked_leaves_the_session_to_expire() {
    const BLOCK_S: f64 = 5.0;
    let started = Instant::now();
    let db = migrated_db().await;
    let client = db.client().await;
    let mut a = RunnerCommand::new(db.url.as_str())
        .label("terminated")
        .args(args(&[
            ("drain-timeout-ms", 300),
            ("ttl-ms", 3000),
            ("heartbeat-ms", 500),
            ("tick-ms", 100),
            ("max-tasks", 4),
            ("workers", 2),
            ("work-ms", 200),
        ]))
        .keep_log(false)
        .spawn()
        .expect("spawn a runner process");
    let a_session = a.next_session(DEADLINE).await;
    // Alone, A takes the first four: slices are dealt round-robin in id
    // order, so each worker gets a block and a normal task behind it.
    let ids = seed(
        &client,
        &[
            "block:5000",
            "block:5000",
            "normal",
            "normal",
            "normal",
            "normal",
            "normal",
            "normal",
        ],
    )
    .await;
    let blocked = &ids[..2];
    wait_blocked(&client, a_session, blocked).await;
    a.signal(libc::SIGTERM).expect("signal the runner process");
    let term = Instant::now();
    let term_db = db_now(&client).await;
    let mut b = RunnerCommand::new(db.url.as_str())
        .label("joining")
        .args(second_runner_args())
        .keep_log(false)
        .spawn()
        .expect("spawn a runner process");
    let b_session = b.next_session(DEADLINE).await;

    let status = a.wait_exit(Duration::from_secs(30)).await;
    let exited = db_now(&client).await;
    let stop_took = term.elapsed();
    let a_log = a.log_text();
    assert!(
        status.success(),
        "A's exit status after SIGTERM: {status:?}; stderr:\n{a_log}"
    );
    // Stop gave up on the runs, named them, and replied while they blocked.
    let line = |needle: &str| -> String {
        a_log
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("A's stderr has no {needle:?}:\n{a_log}"))
            .to_string()
    };
    let left_line = line(LEFT_LINE);
    let left: BTreeSet<i64> = field_ids(&left_line, "tasks")
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert!(
        blocked.iter().all(|id| left.contains(id)),
        "Stop names the blocked tasks {blocked:?} as left running: {left_line}"
    );
    let at_stop = line(LEFT_AT_STOP_LINE);
    let at_stop_tasks: BTreeSet<i64> = field_ids(&at_stop, "tasks")
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert_eq!(
        at_stop_tasks, left,
        "the runner process reports the tasks Stop left running: {at_stop}"
    );
    let first_block = runs(&client)
        .await
        .iter()
        .filter(|r| r.session == a_session && blocked.contains(&r.task))
        .map(|r| r.started)
        .min_by(f64::total_cmp)
        .expect("A's runs of the blocked tasks");
    assert!(
        exited < first_block + BLOCK_S,
        "A exited at {}, after its blocks ended (the first began at {}, SIGTERM at {}): Stop waited for them\n{}",
        tod(exited),
        tod(first_block),
        tod(term_db),
        dump(&client).await
    );

    wait_all_finished(&client, DEADLINE).await;
    let all_finished = started.elapsed();
    assert!(b.try_exit().is_none(), "B exited");
    assert_finished_and_fenced(&client).await;

    let ends = Ends {
        stuck: stuck_ticks(&client, &a).await,
        exited: BTreeMap::from([(a_session, exited)]),
        now: db_now(&client).await,
    };
    let min_gap = assert_no_overlap(&client, &ends).await;
    let ended = assert_not_ended_in_flight(&client, a_session, &ends).await;
    verbose(&client, "sigterm+blocked", &ends).await;
    assert!(
        ended.is_none(),
        "A's session was ended although Stop left runs in flight\n{}",
        dump(&client).await
    );
    // Its lease ran out, and only then did B take the tasks over.
    let row = client
        .query_one(
            "SELECT extract(epoch FROM expires_at)::float8, reclaimed_at >= expires_at
               FROM session_lock.session WHERE id = $1",
            &[&a_session],
        )
        .await
        .unwrap();
    let expires: f64 = row.get(0);
    assert_eq!(
        row.get::<_, Option<bool>>(1),
        Some(true),
        "A's session is reclaimed, after it expired\n{}",
        dump(&client).await
    );
    let early: Vec<String> = runs(&client)
        .await
        .iter()
        .filter(|r| r.session != a_session && left.contains(&r.task) && r.started < expires)
        .map(|r| format!("run {} of task {} at {}", r.id, r.task, tod(r.started)))
        .collect();
    assert!(
        early.is_empty(),
        "tasks A left running ran elsewhere before its lease ran out at {}: {early:?}\n{}",
        tod(expires),
        dump(&client).await
    );
    let by_b = count(
        &client,
        "SELECT count(*) FROM example_task WHERE id = ANY($1) AND finished_by = $2",
        &[&ids, &b_session],
    )
    .await;
    assert_eq!(
        by_b,
        ids.len() as i64,
        "B finished every task\n{}",
        dump(&client).await
    );
    eprintln!(
        "sigterm+blocked: SIGTERM {:.3} s after the first block began; A exited 0 {stop_took:?} after it, left [{}] running; its lease ran out {:.3} s after it exited; all finished {all_finished:?} in; smallest gap between runs of a task {:.3} s; test {:?}",
        term_db - first_block,
        ids_text(&left),
        expires - exited,
        min_gap.unwrap_or(f64::NAN),
        started.elapsed()
    );
}

/// Like [`blocked_past_batch_timeout_then_a_second_runner_joins`], but the
/// blocks (7 s) outlast A's lease: A stops renewing at the stuck report
/// (2.5 s into the batch), so its lease runs out while its runs still
/// block. That is the documented limit of a run nobody can stop (README,
/// "Runs nobody can stop"): its tasks move on rather than being held for
/// ever, and may then run beside the stuck run. What holds, and is checked:
/// no other session starts a blocked task before A's lease ran out, A's
/// late completion of it is refused (the task is finished by the session
/// that ran it after A), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stuck_past_its_lease_moves_on_only_after_the_lease_ran_out() {
    let db = migrated_db().await;
    let client = db.client().await;
    let mut a = RunnerCommand::new(db.url.as_str())
        .label("blocked-long")
        .args(args(&[
            ("batch-timeout-ms", 500),
            ("ttl-ms", 3000),
            ("heartbeat-ms", 500),
            ("tick-ms", 100),
            ("max-tasks", 4),
            ("workers", 4),
        ]))
        .keep_log(false)
        .spawn()
        .expect("spawn a runner process");
    let a_session = a.next_session(DEADLINE).await;
    let ids = seed(
        &client,
        &["block:7000", "block:7000", "normal", "normal", "normal"],
    )
    .await;
    let blocked = ids[..2].to_vec();
    wait_blocked(&client, a_session, &blocked).await;
    let _b = RunnerCommand::new(db.url.as_str())
        .label("joining")
        .args(second_runner_args())
        .keep_log(false)
        .spawn()
        .expect("spawn a runner process");
    wait_all_finished(&client, DEADLINE).await;
    wait_log(&a, RETURNED_LINE).await;
    assert_finished_and_fenced(&client).await;
    let early: Vec<String> = client
        .query(
            "SELECT format('task %s run %s by session %s started %s, %s before session %s expired at %s',
                           r.task_id, r.id, r.session_id, r.started_at, s.expires_at - r.started_at,
                           s.id, s.expires_at)
               FROM example_task_run r, session_lock.session s
              WHERE s.id = $1 AND r.task_id = ANY ($2) AND r.session_id <> s.id
                AND r.started_at < s.expires_at",
            &[&a_session, &blocked],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        early.is_empty(),
        "a blocked task started elsewhere before A's lease ran out:\n{}\n{}",
        early.join("\n"),
        dump(&client).await
    );
    let by_a = count(
        &client,
        "SELECT count(*) FROM example_task WHERE id = ANY ($1) AND finished_by = $2",
        &[&blocked, &a_session],
    )
    .await;
    assert_eq!(
        by_a,
        0,
        "A's late completion of the blocked tasks was refused\n{}",
        dump(&client).await
    );
}

/// Runner A runs a `block:6000` task on worker 0, whose thread its fetcher
/// shares, and a normal task (4 s of async work) on worker 1. Its session
/// is then lost (expired in the database): A's next heartbeat learns it,
/// and the run on worker 1, which can be stopped, must stop then, while
/// worker 0 and the fetcher are still blocked; run on, it would overlap
/// the run of whoever takes its task after the lease. So that run is
/// dropped, never finished (the example Tasker writes `finished_at` after
/// its work), and worker 1 reports its slice stopped before worker 0's
/// returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_stops_the_other_workers_runs_while_worker_0_blocks() {
    let db = migrated_db().await;
    let client = db.client().await;
    let mut a = RunnerCommand::new(db.url.as_str())
        .label("lost")
        .args(args(&[
            ("batch-timeout-ms", 30_000),
            ("ttl-ms", 3000),
            ("heartbeat-ms", 500),
            ("tick-ms", 100),
            ("max-tasks", 2),
            ("workers", 2),
            ("work-ms", 4000),
        ]))
        .keep_log(false)
        .spawn()
        .expect("spawn a runner process");
    let a_session = a.next_session(DEADLINE).await;
    // Slices are dealt in id order: the block to worker 0, the other to 1.
    let ids = seed(&client, &["block:6000", "normal"]).await;
    wait_blocked(&client, a_session, &ids).await;
    client
        .execute(
            "UPDATE session_lock.session SET expires_at = now() - interval '1 second',
                    bumped_at = now() - interval '2 seconds'
              WHERE id = $1",
            &[&a_session],
        )
        .await
        .unwrap();

    let stopped = "tasker stopped: session fenced or runner stopping";
    let worker_0 = poll_until("worker 0's slice returns", DEADLINE, || async {
        a.log_text()
            .lines()
            .position(|l| l.contains(SLICE_FAILED_LINE) && l.contains("worker=0"))
    })
    .await;
    let log = a.log_text();
    let worker_1 = log.lines().position(|l| {
        l.contains(SLICE_FAILED_LINE) && l.contains("worker=1") && l.contains(stopped)
    });
    assert!(
        worker_1.is_some_and(|w1| w1 < worker_0),
        "worker 1's run was stopped before worker 0's block ended:\n{log}\n{}",
        dump(&client).await
    );
    let finished = count(
        &client,
        "SELECT count(*) FROM example_task_run
          WHERE task_id = $1 AND session_id = $2 AND finished_at IS NOT NULL",
        &[&ids[1], &a_session],
    )
    .await;
    assert_eq!(
        finished,
        0,
        "the lost session's run of task {} was stopped, not finished\n{}",
        ids[1],
        dump(&client).await
    );
    assert!(a.try_exit().is_none(), "A exited:\n{log}");
}
