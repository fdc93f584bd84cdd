//! The bad-input table (README, "Bad input"): each case gets a clear error
//! that names the problem, no panic, and no lost task. Cases covered
//! elsewhere are listed in the README next to their tests.

use std::time::Duration;

use session_lock::embedded::{EmbeddedOptions, EmbeddedPostgres, ShutdownMode};
use session_lock::example::{ExampleTask, NoopTasker};
use session_lock::status::wait_for_status;
use session_lock::{
    Database, Error, Migrator, PgStore, Runner, RunnerConfig, SessionStart, WorkGet,
};

use crate::harness::{fresh_db, migrated_db};

const DEADLINE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(30);

fn quick(name: &str) -> RunnerConfig {
    RunnerConfig::builder(name)
        .ttl(Duration::from_secs(6))
        .heartbeat(Duration::from_secs(1))
        .tick(Duration::from_millis(50))
        .jitter(Duration::ZERO)
        .retry_max(Duration::from_millis(300))
        .build()
        .unwrap()
}

#[actix_rt::test]
async fn a_database_down_at_start_is_retried_until_it_comes_up() {
    let pg =
        tokio::task::spawn_blocking(|| EmbeddedPostgres::start_with(EmbeddedOptions::default()))
            .await
            .unwrap()
            .unwrap();
    let mut client = session_lock::connect_one(&pg.url("postgres"))
        .await
        .unwrap();
    Migrator::new()
        .with_example()
        .run(&mut client)
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO example_task (payload) SELECT 'late' FROM generate_series(1, 5)",
        )
        .await
        .unwrap();
    drop(client);
    let pg = std::sync::Arc::new(pg);
    let stopper = pg.clone();
    tokio::task::spawn_blocking(move || stopper.stop(ShutdownMode::Fast))
        .await
        .unwrap()
        .unwrap();

    let store = PgStore::connect(&pg.url("postgres")).await.unwrap();
    let runner =
        Runner::<ExampleTask, _, _>::new(quick("down-at-start"), store, NoopTasker).start();
    let mut status = runner.subscribe();
    let reported = wait_for_status(&mut status, DEADLINE, |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot connect to the database"))
    })
    .await
    .expect("the runner reports why it has no session");
    assert!(!reported.is_ready(), "not ready without a session");
    assert_eq!(reported.session_starts, 0);

    let starter = pg.clone();
    tokio::task::spawn_blocking(move || starter.start_again())
        .await
        .unwrap()
        .unwrap();
    let done = wait_for_status(&mut status, DEADLINE, |s| s.finished >= 5).await;
    assert!(
        done.is_some(),
        "it kept retrying, got a session and did the work: {:?}",
        runner.status()
    );
    assert!(runner.status().is_ready());
    runner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_reported_as_such() {
    let pg =
        tokio::task::spawn_blocking(|| EmbeddedPostgres::start_with(EmbeddedOptions::default()))
            .await
            .unwrap()
            .unwrap();
    let admin = session_lock::connect_one(&pg.url("postgres"))
        .await
        .unwrap();
    admin
        .batch_execute("CREATE ROLE app LOGIN PASSWORD 'right'")
        .await
        .unwrap();
    // Password authentication for TCP connections, trust kept for the
    // superuser so the test can still manage the server.
    let hba = pg.data_dir().join("pg_hba.conf");
    let owner = std::fs::metadata(&hba).unwrap();
    std::fs::write(
        &hba,
        "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\nlocal all all trust\n",
    )
    .unwrap();
    std::os::unix::fs::chown(
        &hba,
        Some(std::os::unix::fs::MetadataExt::uid(&owner)),
        Some(std::os::unix::fs::MetadataExt::gid(&owner)),
    )
    .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();

    let url = format!("postgres://app:wrong@127.0.0.1:{}/postgres", pg.port());
    // The reload is asynchronous: retry until the new rule applies.
    let start = std::time::Instant::now();
    let err = loop {
        let store = PgStore::connect(&url).await.unwrap();
        match store.session_start(&SessionStart::new("pw", TTL)).await {
            Err(e @ Error::Connect(_)) => break e,
            other => {
                assert!(start.elapsed() < DEADLINE, "never refused: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(
        err.to_string()
            .contains("password authentication failed for user \"app\""),
        "{err}"
    );
    assert!(
        err.is_transient(),
        "a connection failure is retried by the runner"
    );
    let err = session_lock::connect_one(&url).await.unwrap_err();
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );
}

#[actix_rt::test]
async fn a_runner_on_an_unmigrated_database_says_to_run_migrate() {
    let db = fresh_db().await;
    let store = PgStore::connect(&db.url).await.unwrap();
    let runner = Runner::<ExampleTask, _, _>::new(quick("unmigrated"), store, NoopTasker).start();
    let mut status = runner.subscribe();
    let status = wait_for_status(&mut status, DEADLINE, |s| s.last_error.is_some())
        .await
        .expect("an error is reported");
    let error = status.last_error.unwrap();
    assert!(error.contains("run `session-lock migrate"), "{error}");
    assert!(status.session.is_none());
    runner.stop().await;
}

/// The template as shipped, with its TODO markers removed so that it
/// applies: every placeholder raises SL002 naming itself.
fn template_without_markers(file: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/migrations/template/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace("TODO(session-lock)", "TODO")
}

#[tokio::test]
async fn template_functions_left_unfilled_name_themselves() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    Migrator::new().run(&mut client).await.unwrap();
    client
        .batch_execute("CREATE TABLE my_task (id bigserial PRIMARY KEY, payload text, finished_at timestamptz)")
        .await
        .unwrap();
    client
        .batch_execute(&template_without_markers("0001_tasks.up.sql"))
        .await
        .unwrap();
    client
        .batch_execute(&template_without_markers("0002_tasks.alwaysup.sql"))
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO my_task (payload) VALUES ('x')")
        .await
        .unwrap();

    #[derive(Debug)]
    struct MyTask;
    impl session_lock::Task for MyTask {
        fn id(&self) -> i64 {
            0
        }
    }
    impl session_lock::ScanTask for MyTask {
        const QUERIES: session_lock::TaskQueries = session_lock::task_queries!("my_task");
        fn scan(_: &tokio_postgres::Row) -> Result<Self, session_lock::ScanError> {
            Ok(MyTask)
        }
    }
    let store = PgStore::connect(&db.url).await.unwrap();
    let session = store
        .session_start(&SessionStart::new("tpl", TTL))
        .await
        .unwrap();
    let err = store
        .work_get::<MyTask>(WorkGet {
            session,
            max_tasks: 10,
            ttl: TTL,
        })
        .await
        .unwrap_err();
    match &err {
        Error::TemplateUnfilled { detail } => {
            assert!(
                detail.contains("my_task_count_for_session is not filled in"),
                "{detail}"
            )
        }
        other => panic!("expected TemplateUnfilled, got {other:?}"),
    }
    assert_eq!(err.db_code(), Some("SL002"));
    let err = store
        .tasks_finish::<MyTask>(session, &[1])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("my_task_finish is not filled in"),
        "{err}"
    );
    // Nothing was assigned or finished by the failed calls.
    let row = client
        .query_one("SELECT count(*) FILTER (WHERE session_id IS NULL AND finished_at IS NULL) FROM my_task", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
}

#[tokio::test]
async fn nulls_where_values_are_expected_are_rejected_by_name() {
    let db = migrated_db().await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO example_task (payload) SELECT 'n' FROM generate_series(1, 3)")
        .await
        .unwrap();
    let session: i64 = client
        .query_one(
            "SELECT session_lock.start_session('nulls', interval '1 minute')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let cases: &[(&str, &str, &str)] = &[
        (
            "SELECT session_lock.start_session(NULL, interval '1 minute')",
            "SL003",
            "session name",
        ),
        (
            "SELECT session_lock.start_session('x', NULL)",
            "SL003",
            "ttl",
        ),
        ("SELECT session_lock.bump_session($1, NULL)", "SL003", "ttl"),
        (
            "SELECT session_lock.bump_session(NULL, interval '1 minute')",
            "SL001",
            "session",
        ),
        (
            "SELECT * FROM example_task_get_work($1, NULL, interval '1 minute')",
            "SL003",
            "max_tasks",
        ),
        (
            "SELECT * FROM example_task_get_work($1, 10, NULL)",
            "SL003",
            "ttl",
        ),
        (
            "SELECT * FROM example_task_get_work(NULL, 10, interval '1 minute')",
            "SL001",
            "session",
        ),
        (
            "SELECT * FROM example_task_finish_tasks(NULL, ARRAY[1::bigint])",
            "SL001",
            "session",
        ),
        (
            "SELECT session_lock.reap_sessions(NULL)",
            "SL003",
            "reap age",
        ),
    ];
    for (sql, code, names) in cases {
        let result = if sql.contains("$1") {
            client.query(*sql, &[&session]).await
        } else {
            client.query(*sql, &[]).await
        };
        let err = result.expect_err(sql);
        let db_err = err.as_db_error().expect("a server error");
        assert_eq!(db_err.code().code(), *code, "{sql}: {}", db_err.message());
        assert!(
            db_err.message().contains(names),
            "{sql}: {}",
            db_err.message()
        );
    }
    // A NULL list of ids finishes nothing and is no error.
    let rows = client
        .query(
            "SELECT * FROM example_task_finish_tasks($1, NULL)",
            &[&session],
        )
        .await
        .unwrap();
    assert!(rows.is_empty());
    // None of it assigned, released or finished anything.
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE session_id IS NULL AND finished_at IS NULL) FROM example_task",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);
}
