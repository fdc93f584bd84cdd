//! Runners behind PgBouncer in transaction mode, with its default settings:
//! the store recognises the pooler by its refusal of the startup parameter
//! `options` and connects without it; nothing relies on a session
//! surviving its transaction; LISTEN goes to the direct URL or, without
//! one, the runner relies on its tick and says so; the migrator refuses the
//! pooler's URL with a reason. Runner processes drain through it while one
//! of them is killed and PgBouncer itself restarts, and nothing is lost.

use std::collections::BTreeSet;
use std::time::Duration;

use session_lock::{
    Error, Migrator, PgStore, Progress, Runner, RunnerConfig, RunnerStatus, StoreOptions, Task,
    TaskId, TaskerError,
};
use session_lock_testkit::db::{TestDb, migrated_db};
use session_lock_testkit::example::ExampleTask;
use session_lock_testkit::pgbouncer::{PgBouncer, PgBouncerError};
use session_lock_testkit::{RunnerCommand, RunnerProcess, wait_for_status};
use tokio_postgres::Client;
use tokio_postgres::config::Host;

use crate::blocking::db_now;
use crate::processes::{
    DEADLINE, assert_finished_and_fenced, assert_running, count, poll_until, stop_cleanly,
    unfinished, wait_all_finished,
};

/// How long after PgBouncer is back a run may still be cut by it: a
/// pooled connection that the restart broke fails when next used.
const RESTART_GRACE: Duration = Duration::from_secs(5);

/// PgBouncer in front of the test database's server.
fn bouncer_for(db: &TestDb) -> PgBouncer {
    bouncer_started(db, PgBouncer::start)
}

/// A PgBouncer in front of the test database's server, started by `start`.
fn bouncer_started(
    db: &TestDb,
    start: fn(&str, u16) -> Result<PgBouncer, PgBouncerError>,
) -> PgBouncer {
    let config = db.config();
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        other => panic!("the test server is not on TCP: {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    start(&host, port).unwrap_or_else(|e| panic!("start pgbouncer: {e}"))
}

async fn seed(client: &Client, n: i32) {
    client
        .execute(
            "INSERT INTO example_task (payload) SELECT 'pooled ' || g FROM generate_series(1, $1) g",
            &[&n],
        )
        .await
        .unwrap();
}

/// One runner on a store of `url` until it finished 200 tasks; its status
/// then, once it has stopped.
async fn drain_200_through(url: &str) -> RunnerStatus {
    let store = PgStore::connect(url).await.expect("a store on the pooler");
    let config = RunnerConfig::builder("pooled")
        .ttl(Duration::from_secs(6))
        .heartbeat(Duration::from_secs(1))
        .tick(Duration::from_millis(100))
        .jitter(Duration::ZERO)
        .build()
        .unwrap();
    let runner = Runner::new(config, store, completing).start();
    let mut rx = runner.subscribe();
    let status = wait_for_status(&mut rx, DEADLINE, |s| s.finished >= 200)
        .await
        .unwrap_or_else(|| panic!("not drained through the pooler: {:?}", runner.status()));
    runner.stop().await;
    status
}

fn completing(
    tasks: Vec<ExampleTask>,
    _progress: Progress,
) -> std::future::Ready<Result<Vec<TaskId>, TaskerError>> {
    std::future::ready(Ok(tasks.iter().map(Task::id).collect()))
}

#[actix_rt::test]
async fn a_runner_through_pgbouncer_drains_on_its_tick_and_says_it_cannot_listen() {
    let db = migrated_db().await;
    let client = db.client().await;
    let bouncer = bouncer_for(&db);
    let pooled = bouncer.url(&db.name);
    seed(&client, 200).await;

    let status = drain_200_through(&pooled).await;
    assert!(!status.listening, "no LISTEN through a transaction pooler");
    assert_eq!(status.session_losses, 0, "{status:?}");
    assert_eq!(unfinished(&client).await, 0);
    let live = count(
        &client,
        "SELECT count(*) FROM session_lock.session WHERE ended_at IS NULL",
        &[],
    )
    .await;
    assert_eq!(live, 0, "Stop ended the session through the pooler");
}

/// A PgBouncer that lets the startup parameter `options` through cannot be
/// told by its refusal: the store tells it by its cancel key, which names
/// no backend, and then sends every call as an unnamed statement (a named
/// one would be missing on the next server connection, or be another
/// client's) and does not LISTEN through it.
#[actix_rt::test]
async fn a_pooler_that_lets_options_through_is_told_by_its_cancel_key() {
    let db = migrated_db().await;
    let client = db.client().await;
    let bouncer = bouncer_started(&db, PgBouncer::start_ignoring_options);
    seed(&client, 200).await;

    let status = drain_200_through(&bouncer.url(&db.name)).await;
    assert!(
        !status.listening,
        "taken for a pooler: no LISTEN through it"
    );
    assert_eq!(status.session_losses, 0, "{status:?}");
    assert_eq!(status.last_error, None, "{status:?}");
    assert_eq!(unfinished(&client).await, 0);
}

#[actix_rt::test]
async fn with_a_direct_url_a_pooled_runner_is_woken_by_notify() {
    let db = migrated_db().await;
    let client = db.client().await;
    let bouncer = bouncer_for(&db);
    let pooled = bouncer.url(&db.name);
    let options = StoreOptions::default()
        .with_direct_url(&db.url)
        .expect("the direct URL");
    let store = PgStore::from_config(pooled.parse().unwrap(), options)
        .await
        .expect("a store on the pooler");
    // An hour-long tick: only a notification can start the second tick.
    let config = RunnerConfig::builder("pooled-listen")
        .ttl(Duration::from_secs(6))
        .heartbeat(Duration::from_secs(1))
        .tick(Duration::from_secs(3600))
        .jitter(Duration::ZERO)
        .build()
        .unwrap();
    let runner = Runner::new(config, store, completing).start();
    let mut rx = runner.subscribe();
    wait_for_status(&mut rx, DEADLINE, |s| s.listening && s.ticks >= 1)
        .await
        .unwrap_or_else(|| panic!("not listening on the direct URL: {:?}", runner.status()));
    seed(&client, 3).await;
    let status = wait_for_status(&mut rx, DEADLINE, |s| s.finished >= 3)
        .await
        .unwrap_or_else(|| {
            panic!(
                "the notification did not wake the runner: {:?}",
                runner.status()
            )
        });
    assert!(status.listening);
    runner.stop().await;
}

#[tokio::test]
async fn the_migrator_refuses_a_pooler_url_and_says_why() {
    let db = migrated_db().await;
    let bouncer = bouncer_for(&db);
    let err = Migrator::new()
        .run_url(&bouncer.url(&db.name))
        .await
        .expect_err("no advisory lock through a transaction pooler");
    assert!(matches!(err, Error::NeedsSession { .. }), "{err:?}");
    assert!(err.to_string().contains("directly"), "{err}");
}

fn spawn(label: &str, pooled: &str, direct: &str, work_ms: u64) -> RunnerProcess {
    RunnerCommand::new(pooled)
        .label(label)
        .args([
            "--direct-url",
            direct,
            "--ttl-ms",
            "2000",
            "--heartbeat-ms",
            "400",
            "--tick-ms",
            "100",
            "--max-tasks",
            "10",
        ])
        .args(["--work-ms".to_owned(), work_ms.to_string()])
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {label}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_drain_through_pgbouncer_while_one_dies_and_pgbouncer_restarts() {
    let db = migrated_db().await;
    let client = db.client().await;
    let mut bouncer = bouncer_for(&db);
    let pooled = bouncer.url(&db.name);
    let mut survivors = vec![
        spawn("pooled-0", &pooled, &db.url, 50),
        spawn("pooled-1", &pooled, &db.url, 50),
    ];
    let mut victim = spawn("pooled-victim", &pooled, &db.url, 60_000);
    let mut sessions = BTreeSet::new();
    for r in &mut survivors {
        sessions.insert(r.next_session(DEADLINE).await);
    }
    let victim_session = victim.next_session(DEADLINE).await;
    seed(&client, 300).await;

    poll_until("the victim runs tasks", DEADLINE, || async {
        let n = count(
            &client,
            "SELECT count(*) FROM example_task_run WHERE session_id = $1",
            &[&victim_session],
        )
        .await;
        (n > 0).then_some(())
    })
    .await;
    victim.signal(libc::SIGKILL).expect("kill the victim");
    victim.wait_exit(DEADLINE).await;

    // Mid-drain, the pooler goes away and comes back.
    poll_until("a third is finished", DEADLINE, || async {
        (300 - unfinished(&client).await >= 100).then_some(())
    })
    .await;
    let restarted_from = db_now(&client).await;
    bouncer.restart().expect("restart pgbouncer");
    let restarted_to = db_now(&client).await;

    wait_all_finished(&client, DEADLINE).await;
    assert_running(&mut survivors);
    assert_finished_and_fenced(&client).await;
    assert_eq!(unfinished(&client).await, 0, "nothing lost");
    // A task ran twice only if the victim had started it, if its first
    // run began around the restart (a write or a finish cut by it may or
    // may not have committed, and the task runs again: at least once, never
    // lost; "around": the pools find their connections broken only when
    // they next use them, so a cut may come a little after the pooler is
    // back, RESTART_GRACE), or if a survivor's lease ran out (its heartbeat
    // held up past the 2 s TTL on a loaded machine: its session was
    // reclaimed, and its tasks moved on).
    let twice = client
        .query(
            "SELECT r.task_id, array_agg(r.session_id), extract(epoch FROM min(r.started_at))::float8,
                    bool_or(s.reclaimed_at IS NOT NULL)
               FROM example_task_run r
               LEFT JOIN session_lock.session s ON s.id = r.session_id
              GROUP BY r.task_id HAVING count(*) > 1",
            &[],
        )
        .await
        .unwrap();
    let mut cut_by_restart = 0;
    let mut lease_lost = 0;
    for row in &twice {
        let runs: Vec<i64> = row.get(1);
        let first: f64 = row.get(2);
        if runs.contains(&victim_session) {
            continue;
        }
        if row.get::<_, bool>(3) {
            lease_lost += 1;
            continue;
        }
        assert!(
            first <= restarted_to + RESTART_GRACE.as_secs_f64(),
            "task {} ran twice without the victim, first {:.3} s after the restart: {runs:?}",
            row.get::<_, i64>(0),
            first - restarted_to
        );
        cut_by_restart += 1;
    }
    eprintln!(
        "pooler: {} tasks ran twice, {cut_by_restart} of them cut by the restart ({:.3} s), {lease_lost} after a survivor's lease ran out",
        twice.len(),
        restarted_to - restarted_from
    );
    stop_cleanly(&mut survivors).await;
}
