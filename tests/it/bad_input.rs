//! The bad-input table (README, "Bad input"): each case gets a clear error
//! that names the problem, no panic, and no lost task. Cases covered
//! elsewhere are listed in the README next to their tests.

use std::time::Duration;

use session_lock::{Database, Error, Migrator, PgStore, Runner, RunnerConfig, SessionStart};
use session_lock_testkit::embedded::{EmbeddedOptions, EmbeddedPostgres, ShutdownMode};
use session_lock_testkit::example::{ExampleTask, NoopTasker};
use session_lock_testkit::wait_for_status;

use session_lock_testkit::db::{fresh_db, migrated_db};

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
        match store.start_session(&SessionStart::new("pw", TTL, 10)).await {
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

/// Declares `public.jobs` as given; the error's SQLSTATE and message.
async fn declare(client: &tokio_postgres::Client, args: &str) -> Result<(), (String, String)> {
    client
        .batch_execute(&format!(
            "SELECT session_lock.declare_task_table('public.jobs'{args})"
        ))
        .await
        .map_err(|e| {
            let db = e.as_db_error().expect("a server error");
            (db.code().code().to_owned(), db.message().to_owned())
        })
}

#[tokio::test]
async fn a_declaration_that_cannot_work_names_the_problem() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    Migrator::new().run(&mut client).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE jobs (id bigint PRIMARY KEY, small_id integer, done_at timestamptz,
                                state text, done_by text);
             CREATE VIEW jobs_view AS SELECT * FROM jobs;",
        )
        .await
        .unwrap();
    // (arguments, words the message must contain)
    let cases: &[(&str, &[&str])] = &[
        (
            ", open_when => 'done_at IS NULL'",
            &["finish", "finished_at"],
        ),
        (
            ", open_when => 'nosuch IS NULL', finish => 'done_at = now()'",
            &["open_when", "nosuch"],
        ),
        (
            ", open_when => 'done_at', finish => 'done_at = now()'",
            &["open_when", "boolean"],
        ),
        (
            ", open_when => 'done_at IS NULL; DROP TABLE jobs', finish => 'done_at = now()'",
            &["may not contain ; or $"],
        ),
        (
            ", open_when => 'done_at IS NULL', finish => 'done_at = $$x$$'",
            &["may not contain ; or $"],
        ),
        (
            ", open_when => 'done_at IS NULL', finish => 'done_at = now()', id_column => 'small_id'",
            &["id column", "BIGINT", "integer"],
        ),
        (
            ", open_when => 'done_at IS NULL', finish => 'done_at = now()', id_column => 'nope'",
            &["id column", "missing"],
        ),
        (
            ", open_when => 'done_at IS NULL', finish => 'done_at = now()', finished_by => 'done_by'",
            &["finished_by", "BIGINT", "text"],
        ),
        (
            ", open_when => 'done_at IS NULL', finish => 'done_at = now()', order_by => 'nosuch'",
            &["order_by", "nosuch"],
        ),
        (
            ", open_when => 'done_at IS NULL', finish => 'done_at = now()', lock_timeout => '0'",
            &["lock_timeout"],
        ),
        (
            ", open_when => '', finish => 'done_at = now()'",
            &["must not be empty"],
        ),
    ];
    for (args, words) in cases {
        let (code, message) = declare(&client, args)
            .await
            .expect_err(&format!("declaring with {args} is refused"));
        assert_eq!(code, "SL005", "{args}: {message}");
        assert!(
            message.contains("public.jobs"),
            "{args}: names the table: {message}"
        );
        for w in *words {
            assert!(message.contains(w), "{args}: {message} (wanted {w:?})");
        }
    }
    let err = client
        .batch_execute("SELECT session_lock.declare_task_table('jobs_view')")
        .await
        .unwrap_err();
    assert!(
        err.as_db_error().unwrap().message().contains("not a table"),
        "{err:?}"
    );
    // A column named like a generated function's variable.
    client
        .batch_execute("ALTER TABLE jobs ADD COLUMN p_session bigint")
        .await
        .unwrap();
    let (code, message) = declare(
        &client,
        ", open_when => 'done_at IS NULL', finish => 'done_at = now()'",
    )
    .await
    .unwrap_err();
    assert_eq!(code, "SL005");
    assert!(message.contains("p_session"), "{message}");
    // Nothing of a refused declaration stays behind.
    let declared: i64 = client
        .query_one("SELECT count(*) FROM session_lock.task_table", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(declared, 0);
}

#[tokio::test]
async fn a_declared_finish_that_leaves_the_task_open_gives_it_back() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    Migrator::new().run(&mut client).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE jobs (id bigserial PRIMARY KEY, state text NOT NULL DEFAULT 'new', note text);
             INSERT INTO jobs (state) VALUES ('new');
             SELECT session_lock.declare_task_table('public.jobs',
                 open_when => 'state = ''new''', finish => 'note = ''seen''');",
        )
        .await
        .unwrap();
    #[derive(Debug)]
    struct Job(i64);
    impl session_lock::Task for Job {
        fn id(&self) -> i64 {
            self.0
        }
    }
    impl session_lock::ScanTask for Job {
        const QUERIES: session_lock::TaskQueries = session_lock::task_queries!("jobs");
        fn scan(row: &tokio_postgres::Row) -> Result<Self, session_lock::ScanError> {
            Ok(Job(session_lock::column(row, None, "id")?))
        }
    }
    let store = PgStore::connect(&db.url).await.unwrap();
    let session = store
        .start_session(&SessionStart::new("jobs", TTL, 10))
        .await
        .unwrap();
    let held = store
        .get_work::<Job>(session_lock::GetWork::new(&session))
        .await
        .unwrap();
    assert_eq!(held.tasks.len(), 1);
    // The finish leaves the row open (the declaration's finish does not
    // close it, as an application reopening the task would): it is not
    // counted finished, and it is given back, to run again, rather than
    // held by a session that believes it done.
    let done = store
        .finish_tasks::<Job>(&session, &[held.tasks[0].0])
        .await
        .expect("the finish itself succeeds");
    assert!(done.is_empty(), "nothing counted finished: {done:?}");
    let row = client
        .query_one("SELECT state, note, session_id FROM jobs", &[])
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, Option<String>>(1),
            row.get::<_, Option<i64>>(2)
        ),
        ("new".to_owned(), Some("seen".to_owned()), None),
        "the task is open and free again"
    );
    let again = store
        .get_work::<Job>(session_lock::GetWork::new(&session))
        .await
        .unwrap();
    assert_eq!(again.tasks.len(), 1, "and it runs again");
}

#[tokio::test]
async fn nulls_where_values_are_expected_are_rejected_by_name() {
    let db = migrated_db().await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO example_task (payload) SELECT 'n' FROM generate_series(1, 3)")
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT session_id, session_token::text FROM session_lock.start_session('nulls', interval '1 minute', 10)",
            &[],
        )
        .await
        .unwrap();
    let (session, token): (i64, String) = (row.get(0), row.get(1));
    // $1 is the session's id, $2 its token.
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
        (
            "SELECT session_lock.start_session('x', interval '1 minute', NULL)",
            "SL003",
            "capacity",
        ),
        (
            "SELECT session_lock.bump_session($1, $2::text::uuid, NULL)",
            "SL003",
            "ttl",
        ),
        (
            "SELECT session_lock.bump_session(NULL, $2::text::uuid, interval '1 minute') WHERE $1::bigint IS NOT NULL",
            "SL001",
            "session",
        ),
        (
            "SELECT session_lock.bump_session($1, NULL, interval '1 minute')",
            "SL001",
            "session",
        ),
        (
            "SELECT * FROM session_lock.example_task_get_work($1, $2::text::uuid, NULL::bigint[])",
            "SL003",
            "finished",
        ),
        (
            "SELECT * FROM session_lock.example_task_get_work($1, $2::text::uuid, '{}', NULL::bigint[])",
            "SL003",
            "running",
        ),
        (
            "SELECT * FROM session_lock.example_task_get_work($1, $2::text::uuid, '{}', '{}', NULL::boolean)",
            "SL003",
            "sweep",
        ),
        (
            "SELECT * FROM session_lock.example_task_get_work(NULL::bigint, $2::text::uuid) WHERE $1::bigint IS NOT NULL",
            "SL001",
            "session",
        ),
        (
            "SELECT * FROM session_lock.example_task_get_work($1, NULL::uuid)",
            "SL001",
            "session",
        ),
        (
            "SELECT * FROM session_lock.example_task_finish_tasks($1, $2::text::uuid, NULL::bigint[])",
            "SL003",
            "ids",
        ),
        (
            "SELECT * FROM session_lock.example_task_finish_tasks(NULL, $2::text::uuid, ARRAY[1::bigint]) WHERE $1::bigint IS NOT NULL",
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
        let result = if sql.contains("$2") {
            client.query(*sql, &[&session, &token]).await
        } else if sql.contains("$1") {
            client.query(*sql, &[&session]).await
        } else {
            client.query(*sql, &[]).await
        };
        let err = result.expect_err(sql);
        let db_err = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{sql}: a server error, not {err:?}"));
        assert_eq!(db_err.code().code(), *code, "{sql}: {}", db_err.message());
        assert!(
            db_err.message().contains(names),
            "{sql}: {}",
            db_err.message()
        );
    }
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
