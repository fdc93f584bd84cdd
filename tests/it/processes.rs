//! Runner processes (`session-lock run`) against a real PostgreSQL: fair
//! sharing, failover after SIGKILL, fencing of a frozen (SIGSTOPped)
//! process, recovery from a database crash, and a graceful stop on SIGTERM.
//!
//! Every test waits on observable conditions: rows in the database (polled
//! every [`POLL`]) or the `session_id=` lines a runner prints on stdout, each
//! under a generous deadline. Each runner's stderr goes to a file whose tail is
//! printed when a test fails.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use session_lock_testkit::embedded::{EmbeddedOptions, EmbeddedPostgres, ShutdownMode};
use tokio_postgres::{Client, NoTls};

use session_lock_testkit::db::migrated_db;
use session_lock_testkit::{RunnerCommand, RunnerProcess};

/// Guards every wait: far longer than any condition should take.
pub(crate) const DEADLINE: Duration = Duration::from_secs(60);
/// How often the database is polled.
const POLL: Duration = Duration::from_millis(50);

/// A runner's settings, passed as its command-line flags.
#[derive(Debug, Clone, Copy)]
struct Opts {
    ttl_ms: u64,
    heartbeat_ms: u64,
    tick_ms: u64,
    max_tasks: u32,
    work_ms: u64,
}

impl Opts {
    /// Short leases and ticks, to keep the tests fast.
    const FAST: Opts = Opts {
        ttl_ms: 2000,
        heartbeat_ms: 400,
        tick_ms: 100,
        max_tasks: 10,
        work_ms: 300,
    };

    fn work_ms(self, work_ms: u64) -> Opts {
        Opts { work_ms, ..self }
    }

    fn args(&self) -> Vec<String> {
        [
            ("--ttl-ms", self.ttl_ms.to_string()),
            ("--heartbeat-ms", self.heartbeat_ms.to_string()),
            ("--tick-ms", self.tick_ms.to_string()),
            ("--max-tasks", self.max_tasks.to_string()),
            ("--work-ms", self.work_ms.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }
}

/// Starts a runner process with `opts`.
fn spawn(label: &str, url: &str, opts: Opts) -> RunnerProcess {
    RunnerCommand::new(url)
        .label(label)
        .args(opts.args())
        .keep_log(false)
        .spawn()
        .expect("spawn a runner process")
}

/// Polls `check` every [`POLL`] until it returns `Some`, failing after `within`.
pub(crate) async fn poll_until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `session` has started running tasks (rows in
/// example_task_run).
async fn wait_running(client: &Client, session: i64, what: &str) {
    poll_until(what, DEADLINE, || async {
        let running = count(
            client,
            "SELECT count(*) FROM example_task_run WHERE session_id = $1",
            &[&session],
        )
        .await;
        (running > 0).then_some(())
    })
    .await;
}

/// Inserts `n` open tasks and returns their ids.
async fn seed(client: &Client, n: i32) -> Vec<i64> {
    client
        .query(
            "INSERT INTO example_task (payload) SELECT 'task ' || g FROM generate_series(1, $1) g RETURNING id",
            &[&n],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

pub(crate) async fn count(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    client.query_one(sql, params).await.unwrap().get(0)
}

/// Asserts that every runner process of `runners` still runs, showing the
/// end of its log when one does not.
pub(crate) fn assert_running(runners: &mut [RunnerProcess]) {
    for r in runners {
        assert!(
            r.try_exit().is_none(),
            "{} exited:\n{}",
            r.label(),
            r.log_tail(30)
        );
    }
}

/// Stops every runner process of `runners` with SIGTERM and asserts that
/// each exits cleanly.
pub(crate) async fn stop_cleanly(runners: &mut [RunnerProcess]) {
    for r in runners {
        r.signal(libc::SIGTERM).expect("stop");
        assert!(r.wait_exit(DEADLINE).await.success(), "{}", r.log_tail(30));
    }
}

/// Open tasks held by `session`.
async fn held_by(client: &Client, session: i64) -> i64 {
    count(
        client,
        "SELECT count(*) FROM example_task WHERE finished_at IS NULL AND session_id = $1",
        &[&session],
    )
    .await
}

pub(crate) async fn unfinished(client: &Client) -> i64 {
    count(
        client,
        "SELECT count(*) FROM example_task WHERE finished_at IS NULL",
        &[],
    )
    .await
}

/// Waits until every task is finished.
pub(crate) async fn wait_all_finished(client: &Client, within: Duration) {
    poll_until("every task finished", within, || async {
        (unfinished(client).await == 0).then_some(())
    })
    .await;
}

/// Task id → the sessions of its runs, for tasks that ran more than once.
async fn duplicate_runs(client: &Client) -> BTreeMap<i64, Vec<i64>> {
    client
        .query(
            "SELECT task_id, array_agg(session_id ORDER BY id) FROM example_task_run GROUP BY task_id HAVING count(*) > 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Checks that hold after every test: every task finished, each by a session
/// that ran it, while that session's lease was live (the fence), and every
/// task ran at least once.
pub(crate) async fn assert_finished_and_fenced(client: &Client) {
    assert_eq!(unfinished(client).await, 0, "tasks left open");
    let late = client
        .query(
            "SELECT t.id, t.finished_by, t.finished_at::text, s.expires_at::text
               FROM example_task t JOIN session_lock.session s ON s.id = t.finished_by
              WHERE t.finished_at >= s.expires_at",
            &[],
        )
        .await
        .unwrap();
    let late: Vec<(i64, i64, String, String)> = late
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert!(
        late.is_empty(),
        "tasks finished by a session after its lease ran out (id, session, finished, expired): {late:?}"
    );
    let orphan = count(
        client,
        "SELECT count(*) FROM example_task t
          WHERE finished_by IS NULL
             OR NOT EXISTS (SELECT 1 FROM session_lock.session s WHERE s.id = t.finished_by)
             OR NOT EXISTS (SELECT 1 FROM example_task_run r
                             WHERE r.task_id = t.id AND r.session_id = t.finished_by)",
        &[],
    )
    .await;
    assert_eq!(
        orphan, 0,
        "tasks finished by no session, an unknown one, or one that never ran them"
    );
}

/// One snapshot (one statement) of the tasks with id >= `first`: open tasks
/// held per session, and how many are finished.
async fn holdings(client: &Client, first: i64) -> (BTreeMap<i64, i64>, i64) {
    let rows = client
        .query(
            "SELECT session_id, count(*) FROM example_task
              WHERE id >= $1 AND finished_at IS NULL AND session_id IS NOT NULL GROUP BY 1
             UNION ALL
             SELECT NULL, count(*) FROM example_task WHERE id >= $1 AND finished_at IS NOT NULL",
            &[&first],
        )
        .await
        .unwrap();
    let mut held = BTreeMap::new();
    let mut finished = 0;
    for r in rows {
        match r.get::<_, Option<i64>>(0) {
            Some(s) => {
                held.insert(s, r.get(1));
            }
            None => finished = r.get(1),
        }
    }
    (held, finished)
}

/// Seeds `n` tasks while `sessions` are live and idle, waits until their
/// first batches have taken every task they will take (the distribution has
/// settled) and samples the holdings until the first task finishes. Each
/// sample must give each session `expected` tasks, give or take one.
/// Returns the number of settled samples.
async fn seed_and_check_shares(
    client: &Client,
    sessions: &BTreeSet<i64>,
    n: i32,
    max_tasks: i64,
) -> usize {
    let live = sessions.len() as i64;
    let share = (i64::from(n) + live - 1) / live;
    let expected = share.min(max_tasks);
    let floor = (i64::from(n) / live).min(max_tasks);
    let total_held = (expected * live).min(i64::from(n));
    let ids = seed(client, n).await;
    let first = ids.iter().copied().min().expect("seeded");

    // Settled: every session has done the get_work of its first batch
    // since the seed, so together they hold all they will hold. Each of
    // them sees all `n` open tasks and `live` sessions then, since the
    // sessions were all live before the seed; their batches run for the
    // work time, so nothing moves until the first finish.
    let mut samples = Vec::new();
    let start = Instant::now();
    loop {
        let (held, finished) = holdings(client, first).await;
        let sum: i64 = held.values().sum();
        if finished > 0 {
            assert!(
                !samples.is_empty(),
                "a batch finished before the {n} tasks were shared out: {held:?}"
            );
            break;
        }
        if sum > total_held {
            panic!("more than {total_held} of {n} tasks held: {held:?}");
        }
        if sum == total_held {
            samples.push(held);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the {n} tasks were not shared out in time: {samples:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    for held in &samples {
        let holders: BTreeSet<i64> = held.keys().copied().collect();
        assert_eq!(&holders, sessions, "holders of the {n} tasks: {held:?}");
        for (session, &h) in held {
            assert!(
                h >= floor.min(expected) - 1 && h <= expected + 1,
                "session {session} holds {h} of {n} tasks, its fair share is {expected} (±1): {held:?}"
            );
        }
    }
    samples.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runners_share_slow_tasks_fairly() {
    let started = Instant::now();
    let db = migrated_db().await;
    let client = db.client().await;
    let opts = Opts::FAST.work_ms(1500);
    let mut runners: Vec<RunnerProcess> = (0..3)
        .map(|i| spawn(&format!("fair-{i}"), &db.url, opts))
        .collect();
    let mut sessions = BTreeSet::new();
    for runner in &mut runners {
        sessions.insert(runner.next_session(DEADLINE).await);
    }
    assert_eq!(sessions.len(), 3, "three distinct sessions");

    // Fewer than 3 × max_tasks: the share is ceil(24 / 3) = 8 each.
    let phase1 = seed_and_check_shares(&client, &sessions, 24, 10).await;
    wait_all_finished(&client, DEADLINE).await;
    // More than 3 × max_tasks: each holds its cap, 10, and 15 stay free.
    let phase2 = seed_and_check_shares(&client, &sessions, 45, 10).await;
    wait_all_finished(&client, DEADLINE).await;

    // Nobody lost a session on the way: the holders were checked against
    // the first sessions, and no runner announced another one.
    for runner in &mut runners {
        assert!(
            runner.try_exit().is_none(),
            "runner {} exited",
            runner.label()
        );
        assert!(
            !runner.announced_another(),
            "runner {} replaced its session",
            runner.label()
        );
    }
    assert_finished_and_fenced(&client).await;
    let dups = duplicate_runs(&client).await;
    assert!(dups.is_empty(), "tasks that ran more than once: {dups:?}");
    let total = count(&client, "SELECT count(*) FROM example_task_run", &[]).await;
    assert_eq!(total, 69, "every task ran once");
    let per_session: BTreeMap<i64, i64> = client
        .query(
            "SELECT session_id, count(*) FROM example_task_run GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let worked: BTreeSet<i64> = per_session.keys().copied().collect();
    assert_eq!(worked, sessions, "every runner did some: {per_session:?}");
    eprintln!(
        "three_runners_share_slow_tasks_fairly: {phase1} + {phase2} settled samples, runs per session {per_session:?}, {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_moves_the_tasks_to_the_survivors_within_the_bound() {
    let started = Instant::now();
    let db = migrated_db().await;
    let client = db.client().await;
    let opts = Opts::FAST; // ttl 2000 ms, tick 100 ms, survivors work 300 ms
    let mut survivors = vec![
        spawn("survivor-0", &db.url, opts),
        spawn("survivor-1", &db.url, opts),
    ];
    // The victim's batch outlasts the test: it is surely mid-batch when killed.
    let mut victim = spawn("victim", &db.url, opts.work_ms(60_000));
    let mut survivor_sessions = BTreeSet::new();
    for survivor in &mut survivors {
        survivor_sessions.insert(survivor.next_session(DEADLINE).await);
    }
    let victim_session = victim.next_session(DEADLINE).await;
    seed(&client, 90).await;

    // The victim holds tasks and has started running them.
    wait_running(&client, victim_session, "the victim runs tasks").await;
    victim
        .signal(libc::SIGKILL)
        .expect("signal the runner process");
    let killed = Instant::now();
    let killed_db: String = client
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .unwrap()
        .get(0);
    let status = victim.wait_exit(DEADLINE).await;
    assert!(!status.success(), "SIGKILL: {status:?}");
    let held_at_kill = held_by(&client, victim_session).await;
    assert!(held_at_kill > 0, "the victim held tasks when killed");

    poll_until("the victim's tasks are released", DEADLINE, || async {
        (held_by(&client, victim_session).await == 0).then_some(())
    })
    .await;
    let failover = killed.elapsed();
    let bound = Duration::from_millis(opts.ttl_ms + opts.tick_ms + 1000);
    assert!(
        failover <= bound,
        "the victim's tasks moved {failover:?} after the kill, more than ttl + tick + 1 s = {bound:?}"
    );
    // Reclaimed, and not before its lease ran out.
    let row = client
        .query_one(
            "SELECT reclaimed_at IS NOT NULL, reclaimed_at >= expires_at,
                    extract(epoch FROM reclaimed_at - $2::text::timestamptz)::float8
               FROM session_lock.session WHERE id = $1",
            &[&victim_session, &killed_db],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the victim's session is reclaimed");
    assert!(
        row.get::<_, bool>(1),
        "the victim's session was reclaimed before it expired"
    );
    let reclaim_after_kill_db: f64 = row.get(2);

    wait_all_finished(&client, DEADLINE).await;
    assert_running(&mut survivors);
    assert_finished_and_fenced(&client).await;
    let finishers: BTreeSet<i64> = client
        .query("SELECT DISTINCT finished_by FROM example_task", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        finishers.is_subset(&survivor_sessions),
        "only the survivors finished tasks: {finishers:?}"
    );
    // The victim's started tasks ran again elsewhere; nothing else ran twice.
    let victim_runs: BTreeSet<i64> = client
        .query(
            "SELECT task_id FROM example_task_run WHERE session_id = $1",
            &[&victim_session],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let dups = duplicate_runs(&client).await;
    for (task, runs) in &dups {
        assert!(
            runs.contains(&victim_session),
            "task {task} ran twice without the victim: sessions {runs:?}"
        );
        assert_eq!(runs.len(), 2, "task {task} ran more than twice: {runs:?}");
    }
    let dup_ids: BTreeSet<i64> = dups.keys().copied().collect();
    assert_eq!(
        dup_ids, victim_runs,
        "exactly the tasks the victim started ran twice"
    );
    eprintln!(
        "kill_9: victim held {held_at_kill}, started {}; failover {failover:?} (test clock), reclaimed {reclaim_after_kill_db:.3} s after the kill (db clock); bound {bound:?}; test {:?}",
        victim_runs.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_runner_is_fenced_and_its_finishes_rejected() {
    let started = Instant::now();
    let db = migrated_db().await;
    let client = db.client().await;
    let opts = Opts::FAST; // ttl 2000 ms, heartbeat 400 ms, tick 100 ms
    let mut survivor = spawn("survivor", &db.url, opts);
    // Its work (1500 ms) ends while it is frozen (at least ttl - heartbeat =
    // 1600 ms): when it resumes, its batch is done and wants finishing.
    let mut frozen = spawn("frozen", &db.url, opts.work_ms(1500));
    let survivor_session = survivor.next_session(DEADLINE).await;
    let frozen_session = frozen.next_session(DEADLINE).await;
    seed(&client, 40).await;

    wait_running(&client, frozen_session, "the frozen runner runs tasks").await;
    frozen
        .signal(libc::SIGSTOP)
        .expect("signal the runner process");
    let stopped = Instant::now();
    // Its first batch is in flight: none of it is finished.
    let in_flight: BTreeSet<i64> = client
        .query(
            "SELECT id FROM example_task WHERE session_id = $1 AND finished_at IS NULL",
            &[&frozen_session],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!in_flight.is_empty(), "the frozen runner holds tasks");
    let finished_before = count(
        &client,
        "SELECT count(*) FROM example_task WHERE finished_by = $1",
        &[&frozen_session],
    )
    .await;
    assert_eq!(finished_before, 0, "its first batch was still running");

    // Stopped past its lease: the survivor reclaims the session and takes
    // the tasks over.
    poll_until("the frozen session is reclaimed", DEADLINE, || async {
        let row = client
            .query_one(
                "SELECT reclaimed_at IS NOT NULL FROM session_lock.session WHERE id = $1",
                &[&frozen_session],
            )
            .await
            .unwrap();
        (row.get::<_, bool>(0) && held_by(&client, frozen_session).await == 0).then_some(())
    })
    .await;
    poll_until("the survivor runs the frozen runner's tasks", DEADLINE, || async {
        let taken = count(
            &client,
            "SELECT count(DISTINCT task_id) FROM example_task_run WHERE session_id = $1 AND task_id = ANY($2)",
            &[&survivor_session, &in_flight.iter().copied().collect::<Vec<_>>()],
        )
        .await;
        (taken as usize == in_flight.len()).then_some(())
    })
    .await;
    let frozen_for = stopped.elapsed();
    frozen
        .signal(libc::SIGCONT)
        .expect("signal the runner process");

    // It notices, and starts over with a new session.
    let new_session = frozen.next_session(DEADLINE).await;
    assert_ne!(new_session, frozen_session);
    let resumed_to_new_session = stopped.elapsed() - frozen_for;
    wait_all_finished(&client, DEADLINE).await;
    assert!(frozen.try_exit().is_none(), "the frozen runner exited");
    assert!(survivor.try_exit().is_none(), "the survivor exited");

    assert_finished_and_fenced(&client).await;
    let by_frozen = count(
        &client,
        "SELECT count(*) FROM example_task WHERE finished_by = $1",
        &[&frozen_session],
    )
    .await;
    assert_eq!(
        by_frozen, 0,
        "the frozen session's finishes after it resumed were accepted"
    );
    let dups = duplicate_runs(&client).await;
    for (task, runs) in &dups {
        assert!(
            runs.contains(&frozen_session),
            "task {task} ran twice without the frozen session: {runs:?}"
        );
    }
    // The frozen process ran its batch to the end (or was stopped by its
    // fence); either way, its completions were not counted.
    let frozen_runs_done = count(
        &client,
        "SELECT count(*) FROM example_task_run WHERE session_id = $1 AND finished_at IS NOT NULL",
        &[&frozen_session],
    )
    .await;
    eprintln!(
        "frozen: {} tasks in flight, frozen {frozen_for:?}, new session {:?} after SIGCONT, {frozen_runs_done} of its runs completed after resuming, {} duplicates; test {:?}",
        in_flight.len(),
        resumed_to_new_session,
        dups.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run_runners_recover() {
    let started = Instant::now();
    // A server of our own: the shared one serves the other tests.
    let pg = tokio::task::spawn_blocking(|| {
        EmbeddedPostgres::start_with(EmbeddedOptions {
            extra_settings: vec![("synchronous_commit".into(), "on".into())],
            ..EmbeddedOptions::default()
        })
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}"));
    let pg = Arc::new(pg);
    let url = pg.url("postgres");
    let connect = |url: String| async move {
        let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok::<Client, tokio_postgres::Error>(client)
    };
    let mut client = connect(url.clone()).await.unwrap();
    session_lock::Migrator::new()
        .with_example()
        .run(&mut client)
        .await
        .unwrap();
    const TASKS: i64 = 600;
    seed(&client, TASKS as i32).await;

    let opts = Opts {
        ttl_ms: 3000,
        heartbeat_ms: 500,
        tick_ms: 100,
        max_tasks: 10,
        work_ms: 20,
    };
    let mut runners = vec![
        spawn("pg-restart-0", &url, opts),
        spawn("pg-restart-1", &url, opts),
    ];
    for runner in &mut runners {
        runner.next_session(DEADLINE).await;
    }
    let before = poll_until("some tasks finished", DEADLINE, || async {
        let done = TASKS - unfinished(&client).await;
        (done >= 50).then_some(done)
    })
    .await;
    assert!(before < TASKS, "all tasks finished before the restart");
    let restart = Instant::now();
    let pg2 = pg.clone();
    tokio::task::spawn_blocking(move || pg2.restart(ShutdownMode::Immediate))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let restart_took = restart.elapsed();
    let client = connect(url.clone()).await.unwrap();
    let restarted_at: String = client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0);

    // This connection is made after the restart and the server stays up.
    wait_all_finished(&client, Duration::from_secs(90)).await;
    let recovered = restart.elapsed();
    for runner in &mut runners {
        let status = runner.try_exit();
        assert!(
            status.is_none(),
            "runner {} exited after the restart: {status:?}",
            runner.label()
        );
    }
    // Both hold a live session again, renewed since the restart.
    let pids: Vec<i32> = runners.iter().map(|r| r.pid() as i32).collect();
    poll_until("both runners hold live sessions", DEADLINE, || async {
        let live: BTreeSet<i32> = client
            .query(
                "SELECT pid FROM session_lock.live_session
                  WHERE pid = ANY($1) AND bumped_at > $2::text::timestamptz",
                &[&pids, &restarted_at],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        (live.len() == 2).then_some(())
    })
    .await;
    assert_finished_and_fenced(&client).await;
    let stuck = count(
        &client,
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
        &[],
    )
    .await;
    assert_eq!(stuck, 0, "backends left idle in a transaction");
    let sessions_started = count(
        &client,
        "SELECT count(*) FROM session_lock.session WHERE pid = ANY($1)",
        &[&pids],
    )
    .await;
    // A crash may cost the batches in flight (a run whose bookkeeping write
    // died with the server counts as failed and runs again), but nothing
    // that started after the server came back ran twice.
    let dups = duplicate_runs(&client).await.len();
    let late_dups: Vec<String> = client
        .query(
            "SELECT format('task %s: %s', task_id, string_agg(format('session %s %s..%s', session_id, started_at::time, finished_at::time), ', ' ORDER BY id))
               FROM example_task_run GROUP BY task_id
             HAVING count(*) > 1 AND min(started_at) >= $1::text::timestamptz",
            &[&restarted_at],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        late_dups.is_empty(),
        "tasks first started after the restart ({restarted_at}) ran twice: {late_dups:#?}"
    );

    drop(runners);
    drop(client);
    let pg = Arc::into_inner(pg).expect("no other owner");
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
    eprintln!(
        "pg restart: {before} of {TASKS} finished before; restart took {restart_took:?}; all finished {recovered:?} after it; {sessions_started} sessions in all, {dups} tasks ran twice; test {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_ends_the_session() {
    let started = Instant::now();
    let db = migrated_db().await;
    let client = db.client().await;
    // A lease far longer than the test: the second runner must not wait for
    // it to run out.
    let opts = Opts {
        ttl_ms: 30_000,
        heartbeat_ms: 1000,
        tick_ms: 100,
        max_tasks: 10,
        work_ms: 1000,
    };
    let mut first = spawn("draining", &db.url, opts);
    let first_session = first.next_session(DEADLINE).await;
    seed(&client, 25).await;
    wait_running(&client, first_session, "the runner runs tasks").await;
    first
        .signal(libc::SIGTERM)
        .expect("signal the runner process");
    let term = Instant::now();
    let status = first.wait_exit(Duration::from_secs(30)).await;
    let drain = term.elapsed();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");

    // Every task it started was completed and finished, by its session.
    let rows = client
        .query(
            "SELECT r.task_id, r.finished_at IS NOT NULL, t.finished_by
               FROM example_task_run r JOIN example_task t ON t.id = r.task_id
              WHERE r.session_id = $1",
            &[&first_session],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 10, "its first batch was its share, 10 tasks");
    for r in &rows {
        let task: i64 = r.get(0);
        assert!(r.get::<_, bool>(1), "the run of task {task} was cut short");
        assert_eq!(
            r.get::<_, Option<i64>>(2),
            Some(first_session),
            "task {task} was not finished by the draining session"
        );
    }
    assert_eq!(
        held_by(&client, first_session).await,
        0,
        "the stopped session still holds open tasks"
    );
    let ended: bool = client
        .query_one(
            "SELECT ended_at IS NOT NULL FROM session_lock.session WHERE id = $1",
            &[&first_session],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ended, "the session was ended on SIGTERM");
    let remaining = unfinished(&client).await;
    assert_eq!(remaining, 15);

    // A new runner is alone at once: its first get_work sees one live
    // session and takes its full share, min(15, 10), not ceil(15 / 2) = 8.
    let mut second = spawn("successor", &db.url, opts);
    let second_session = second.next_session(DEADLINE).await;
    let joined = Instant::now();
    let first_share = poll_until("the successor takes tasks", DEADLINE, || async {
        let h = held_by(&client, second_session).await;
        (h > 0).then_some(h)
    })
    .await;
    assert_eq!(first_share, 10, "the successor's first share");
    wait_all_finished(&client, DEADLINE).await;
    let took = joined.elapsed();
    assert!(
        took < Duration::from_millis(opts.ttl_ms),
        "the successor needed {took:?}"
    );
    assert_finished_and_fenced(&client).await;
    let dups = duplicate_runs(&client).await;
    assert!(dups.is_empty(), "tasks that ran twice: {dups:?}");
    let finishers: HashSet<i64> = client
        .query("SELECT DISTINCT finished_by FROM example_task", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(finishers, HashSet::from([first_session, second_session]));
    eprintln!(
        "sigterm: exited 0 {drain:?} after SIGTERM; successor finished the other {remaining} in {took:?}; test {:?}",
        started.elapsed()
    );
}
