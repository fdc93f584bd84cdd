//! The runner's actors in-process against a real Postgres.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use session_lock::example::ExampleTask;
use session_lock::status::wait_for_status;
use session_lock::{PgStore, Progress, Runner, RunnerConfig, Task, TaskId, TaskerError};

use crate::harness::migrated_db;

const DEADLINE: Duration = Duration::from_secs(60);

fn fast_config(name: &str) -> session_lock::RunnerConfigBuilder {
    RunnerConfig::builder(name)
        .ttl(Duration::from_secs(6))
        .heartbeat(Duration::from_secs(1))
        .tick(Duration::from_millis(50))
        .jitter(Duration::ZERO)
        .max_tasks(10)
        .workers(4)
}

async fn seed(client: &tokio_postgres::Client, n: i32) {
    client
        .execute(
            "INSERT INTO example_task (payload) SELECT 'task ' || g FROM generate_series(1, $1) g",
            &[&n],
        )
        .await
        .unwrap();
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
