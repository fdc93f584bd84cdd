//! A poison task that crashes its runner process, among ordinary ones, with
//! runner processes restarted as they die (as a supervisor would): it runs
//! at most max_attempts times across the fleet and ends quarantined, the
//! tasks that crashed with it are not quarantined with it, and every other
//! task finishes.

use std::time::{Duration, Instant};

use session_lock_testkit::db::migrated_db;
use session_lock_testkit::{RunnerCommand, RunnerProcess};
use tokio_postgres::Client;

const MAX_ATTEMPTS: i32 = 3;
const DEADLINE: Duration = Duration::from_secs(120);

fn runner(url: &str, label: String) -> RunnerProcess {
    RunnerCommand::new(url)
        .label(label)
        .args([
            "--ttl-ms",
            "1500",
            "--heartbeat-ms",
            "300",
            "--tick-ms",
            "100",
            "--max-tasks",
            "5",
            "--work-ms",
            "20",
            "--max-attempts",
            &MAX_ATTEMPTS.to_string(),
            "--retry-backoff-ms",
            "0",
        ])
        .spawn()
        .expect("spawn a runner process")
}

async fn count(client: &Client, sql: &str, task: i64) -> i64 {
    client.query_one(sql, &[&task]).await.expect("count").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_crashes_its_runner_is_quarantined_and_the_rest_finish() {
    let db = migrated_db().await;
    let client = db.client().await;
    // The example table is declared with max_attempts by the runners
    // themselves (--max-attempts); the first one to start declares it.
    let mut runners = vec![runner(&db.url, "r0".into()), runner(&db.url, "r1".into())];
    let mut crashes = 0;
    // Ordinary tasks on both sides of the poison one in pickup order, so
    // that it shares batches with them.
    let poison: i64 = client
        .query_one(
            "WITH a AS (INSERT INTO example_task (payload) SELECT 'ok' FROM generate_series(1, 12)),
                  p AS (INSERT INTO example_task (payload) VALUES ('crash:poison') RETURNING id),
                  b AS (INSERT INTO example_task (payload) SELECT 'ok' FROM generate_series(1, 12))
             SELECT id FROM p",
            &[],
        )
        .await
        .expect("seed")
        .get(0);

    let start = Instant::now();
    loop {
        // A supervisor: runners that died are started again.
        for (i, r) in runners.iter_mut().enumerate() {
            if let Some(status) = r.try_exit() {
                assert!(
                    !status.success(),
                    "runner {} exited by itself: {status:?}",
                    r.label()
                );
                crashes += 1;
                *r = runner(&db.url, format!("r{i}.{crashes}"));
            }
        }
        let open_ok: i64 = count(
            &client,
            "SELECT count(*) FROM example_task WHERE finished_at IS NULL AND id <> $1",
            poison,
        )
        .await;
        let quarantined: Vec<i64> = client
            .query(
                "SELECT task_id FROM session_lock.quarantined_tasks('public.example_task')",
                &[],
            )
            .await
            .expect("quarantined")
            .iter()
            .map(|r| r.get(0))
            .collect();
        if open_ok == 0 && quarantined == vec![poison] {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "not settled: {open_ok} ordinary tasks open, quarantined {quarantined:?}, {crashes} crashes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let runs = count(
        &client,
        "SELECT count(*) FROM example_task_run WHERE task_id = $1",
        poison,
    )
    .await;
    assert!(
        (1..=i64::from(MAX_ATTEMPTS)).contains(&runs),
        "the poison task ran {runs} times, at most {MAX_ATTEMPTS} allowed"
    );
    assert_eq!(
        runs,
        i64::from(MAX_ATTEMPTS),
        "it ran until quarantined: {crashes} crashes"
    );
    let attempts: i32 = client
        .query_one(
            "SELECT sl_attempts FROM example_task WHERE id = $1",
            &[&poison],
        )
        .await
        .expect("attempts")
        .get(0);
    assert_eq!(attempts, MAX_ATTEMPTS);
    // It stays quarantined while the fleet keeps ticking.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs_later = count(
        &client,
        "SELECT count(*) FROM example_task_run WHERE task_id = $1",
        poison,
    )
    .await;
    assert_eq!(runs_later, runs, "a quarantined task ran again");
    for r in &mut runners {
        assert!(
            r.try_exit().is_none(),
            "runner {} died without the poison task",
            r.label()
        );
    }
}
