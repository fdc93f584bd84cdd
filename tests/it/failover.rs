//! A primary failover under runner processes, on servers of their own: a
//! primary and a streaming standby (`pg_basebackup -R`), runners on a
//! multi-host URL with `target_session_attrs=read-write`; mid-drain the
//! primary is stopped with `-m immediate` and the standby promoted. Checked:
//! every task finished on the new primary by a session within its lease,
//! every runner alive, tasks run twice counted; with synchronous
//! replication no finish the old primary acknowledged is redone; and the
//! time from the kill to the first run started (a get_work there handed it
//! out) and to the first finish on the new primary.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use session_lock::{Migrator, PgStore, Progress, Runner, RunnerConfig, Task, TaskerError};
use session_lock_testkit::embedded::{EmbeddedOptions, EmbeddedPostgres, ShutdownMode};
use session_lock_testkit::example::ExampleTask;
use session_lock_testkit::{RunnerCommand, RunnerProcess};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{Client, NoTls};

use crate::processes::{
    DEADLINE, assert_finished_and_fenced, assert_running, count, poll_until, stop_cleanly,
};

const TASKS: i32 = 600;
const DB: &str = "failover";

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

async fn finished(client: &Client) -> BTreeMap<i64, i64> {
    client
        .query(
            "SELECT id, finished_by FROM example_task WHERE finished_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn spawn(label: &str, url: &str) -> RunnerProcess {
    RunnerCommand::new(url)
        .label(label)
        .args([
            "--ttl-ms",
            "2000",
            "--heartbeat-ms",
            "400",
            "--tick-ms",
            "100",
            "--max-tasks",
            "10",
            "--work-ms",
            "20",
        ])
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {label}: {e}"))
}

/// Stops the primary with `-m immediate` and promotes the standby, on
/// blocking threads: both wait on processes.
async fn fail_over(
    primary: EmbeddedPostgres,
    standby: EmbeddedPostgres,
) -> (EmbeddedPostgres, EmbeddedPostgres) {
    let primary = tokio::task::spawn_blocking(move || {
        primary.stop(ShutdownMode::Immediate).map(|()| primary)
    })
    .await
    .unwrap()
    .expect("stop the primary");
    let standby = tokio::task::spawn_blocking(move || standby.promote().map(|()| standby))
        .await
        .unwrap()
        .expect("promote the standby");
    (primary, standby)
}

/// Servers started on blocking threads: their start waits on processes.
async fn start_servers(synchronous: bool) -> (EmbeddedPostgres, EmbeddedPostgres) {
    let primary = tokio::task::spawn_blocking(move || {
        let mut opts = EmbeddedOptions::default();
        if synchronous {
            opts.extra_settings
                .push(("synchronous_commit".into(), "on".into()));
        }
        EmbeddedPostgres::start_with(opts)
    })
    .await
    .unwrap()
    .expect("start the primary");
    let admin = connect(&primary.url("postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .await
        .unwrap();
    Migrator::new()
        .with_example()
        .run_url(&primary.url(DB))
        .await
        .expect("migrate the primary");
    let (primary, standby) = tokio::task::spawn_blocking(move || {
        let standby = EmbeddedPostgres::standby_of(&primary, EmbeddedOptions::default());
        (primary, standby)
    })
    .await
    .unwrap();
    let standby = standby.expect("start the standby");
    if synchronous {
        // ALTER SYSTEM refuses to run in a transaction block: one statement
        // each.
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "SELECT pg_reload_conf()",
        ] {
            admin.batch_execute(sql).await.unwrap();
        }
        poll_until("the standby is synchronous", DEADLINE, || async {
            let n = count(
                &admin,
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                &[],
            )
            .await;
            (n == 1).then_some(())
        })
        .await;
    }
    (primary, standby)
}

async fn failover(synchronous: bool) {
    let (primary, standby) = start_servers(synchronous).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{DB}?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let old = connect(&primary.url(DB)).await;
    let mut runners: Vec<RunnerProcess> = (0..3)
        .map(|i| spawn(&format!("failover-{i}"), &url))
        .collect();
    for r in &mut runners {
        r.next_session(DEADLINE).await;
    }
    old.execute(
        "INSERT INTO example_task (payload) SELECT 'failover ' || g FROM generate_series(1, $1) g",
        &[&TASKS],
    )
    .await
    .unwrap();
    poll_until("a quarter is finished", DEADLINE, || async {
        let n = count(
            &old,
            "SELECT count(*) FROM example_task WHERE finished_at IS NOT NULL",
            &[],
        )
        .await;
        (n >= i64::from(TASKS) / 4).then_some(())
    })
    .await;
    // What the old primary acknowledged, read just before its death.
    let acknowledged = finished(&old).await;
    let killed = Instant::now();
    let (primary, standby) = fail_over(primary, standby).await;
    let promoted = killed.elapsed();
    let new = connect(&standby.url(DB)).await;
    let at_promotion = finished(&new).await.len();
    // A run recorded on the new primary: a get_work there handed it out
    // (the first successful tick with work); then its finish.
    let runs = "SELECT count(*) FROM example_task_run";
    let runs_at_promotion = count(&new, runs, &[]).await;
    poll_until("a run started on the new primary", DEADLINE, || async {
        (count(&new, runs, &[]).await > runs_at_promotion).then_some(())
    })
    .await;
    let first_start = killed.elapsed();
    poll_until("a finish on the new primary", DEADLINE, || async {
        (finished(&new).await.len() > at_promotion).then_some(())
    })
    .await;
    let first_finish = killed.elapsed();
    poll_until(
        "every task finished on the new primary",
        DEADLINE * 2,
        || async { (finished(&new).await.len() == TASKS as usize).then_some(()) },
    )
    .await;

    assert_running(&mut runners);
    assert_finished_and_fenced(&new).await;
    let now = finished(&new).await;
    let redone: Vec<i64> = acknowledged
        .iter()
        .filter(|(id, by)| now.get(id) != Some(by))
        .map(|(id, _)| *id)
        .collect();
    let twice = count(
        &new,
        "SELECT count(*) FROM (SELECT task_id FROM example_task_run GROUP BY task_id HAVING count(*) > 1) d",
        &[],
    )
    .await;
    if synchronous {
        assert!(
            redone.is_empty(),
            "finishes the old primary acknowledged were redone under synchronous replication: {redone:?}"
        );
    }
    eprintln!(
        "failover ({}): {} acknowledged before the kill, {} of them redone; {twice} tasks ran twice; promoted {promoted:?} after the kill, first run started on the new primary {first_start:?} and first finish {first_finish:?} after it",
        if synchronous {
            "synchronous"
        } else {
            "asynchronous"
        },
        acknowledged.len(),
        redone.len()
    );
    stop_cleanly(&mut runners).await;
    drop(primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_synchronous_replication_redoes_no_acknowledged_finish() {
    failover(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_asynchronous_replication_loses_no_task() {
    failover(false).await;
}

/// A session comes over to a promoted asynchronous standby still holding a
/// task whose run wrote to the old primary only: its finish, deferred past
/// the failover, must not mark the task done on the new primary (the run's
/// writes are gone there); the task runs again. Deterministic: replication
/// is cut once the pickup has been shipped, before the run writes, and the
/// run reports only after the promotion.
#[actix_rt::test]
async fn a_run_whose_writes_died_with_the_old_primary_runs_again_on_the_new_one() {
    let (primary, standby) = start_servers(false).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{DB}?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let old = connect(&primary.url(DB)).await;
    let stand = connect(&standby.url(DB)).await;
    let id: i64 = old
        .query_one(
            "INSERT INTO example_task (payload) VALUES ('written twice?') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // The first run tells the test it started, writes its run row when
    // told, and reports only when told; later runs write and report.
    let (started_tx, mut started) = mpsc::unbounded_channel::<i64>();
    let (write_tx, write) = watch::channel(false);
    let (report_tx, report) = watch::channel(false);
    let (written_tx, mut written) = mpsc::unbounded_channel::<()>();
    let first = Arc::new(AtomicBool::new(true));
    let tasker_url = url.clone();
    let tasker = move |tasks: Vec<ExampleTask>, _progress: Progress| {
        let (url, first) = (tasker_url.clone(), first.clone());
        let (started_tx, written_tx) = (started_tx.clone(), written_tx.clone());
        let (mut write, mut report) = (write.clone(), report.clone());
        async move {
            let held = first.swap(false, Ordering::SeqCst);
            if held {
                let _ = started_tx.send(tasks[0].session_id.unwrap_or_default());
                let _ = write.wait_for(|go| *go).await;
            }
            let client = connect(&url).await;
            for t in &tasks {
                client
                    .execute(
                        "INSERT INTO example_task_run (task_id, session_id, started_at, finished_at) VALUES ($1, $2, now(), now())",
                        &[&t.id, &t.session_id],
                    )
                    .await
                    .map_err(|e| -> TaskerError { Box::new(e) })?;
            }
            if held {
                let _ = written_tx.send(());
                let _ = report.wait_for(|go| *go).await;
            }
            Ok::<_, TaskerError>(tasks.iter().map(Task::id).collect())
        }
    };
    let config = RunnerConfig::builder("lost-writes")
        .ttl(Duration::from_secs(30))
        .heartbeat(Duration::from_secs(1))
        .tick(Duration::from_millis(100))
        .jitter(Duration::ZERO)
        .build()
        .unwrap();
    let store = PgStore::connect(&url).await.unwrap();
    let runner = Runner::new(config, store, tasker).start();
    let session = tokio::time::timeout(DEADLINE, started.recv())
        .await
        .expect("the task is handed out")
        .unwrap();

    // The pickup reaches the standby; then replication stops.
    poll_until("the pickup is shipped", DEADLINE, || async {
        let holder: Option<i64> = stand
            .query_opt("SELECT session_id FROM example_task WHERE id = $1", &[&id])
            .await
            .unwrap()
            .and_then(|r| r.get(0));
        (holder == Some(session)).then_some(())
    })
    .await;
    for sql in [
        "ALTER SYSTEM SET primary_conninfo = ''",
        "SELECT pg_reload_conf()",
    ] {
        stand.batch_execute(sql).await.unwrap();
    }
    poll_until("replication stops", DEADLINE, || async {
        (count(&stand, "SELECT count(*) FROM pg_stat_wal_receiver", &[]).await == 0).then_some(())
    })
    .await;

    // The run writes to the old primary alone, which then dies.
    write_tx.send(true).unwrap();
    tokio::time::timeout(DEADLINE, written.recv())
        .await
        .expect("the run wrote")
        .unwrap();
    assert_eq!(
        count(&stand, "SELECT count(*) FROM example_task_run", &[]).await,
        0,
        "the run's write is not on the standby"
    );
    let (primary, standby) = fail_over(primary, standby).await;
    report_tx.send(true).unwrap();

    let new = connect(&standby.url(DB)).await;
    poll_until(
        "the task is finished on the new primary",
        DEADLINE,
        || async {
            let done: bool = new
                .query_one(
                    "SELECT finished_at IS NOT NULL FROM example_task WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap()
                .get(0);
            done.then_some(())
        },
    )
    .await;
    let ran = count(
        &new,
        "SELECT count(*) FROM example_task_run r JOIN example_task t ON t.id = r.task_id AND t.finished_by = r.session_id WHERE t.id = $1",
        &[&id],
    )
    .await;
    assert_eq!(
        ran, 1,
        "finished on the new primary by a session with a run of it there (the first run's write died with the old primary)"
    );
    runner.stop().await;
    drop(primary);
}
