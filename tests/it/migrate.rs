//! The migrator: once/always files, bookkeeping, checksums, concurrency and
//! error reporting.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use session_lock::TaskTable;
use session_lock::migrate::{MigrateError, MigrationKind, Migrator};
use tokio_postgres::Client;

use session_lock_testkit::db::fresh_db;

/// A scratch migrations directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "session-lock-migrate-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn write(&self, file: &str, sql: &str) -> &Self {
        std::fs::write(self.0.join(file), sql).unwrap();
        self
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn names(m: &Migrator, kind: MigrationKind) -> Vec<String> {
    m.migrations()
        .iter()
        .filter(|m| m.kind == kind)
        .map(|m| m.name())
        .collect()
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Rows of the bookkeeping table for one `set/file`.
async fn recorded(client: &Client, set: &str, file: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM session_lock.schema_migration WHERE set_name = $1 AND file = $2",
            &[&set, &file],
        )
        .await
        .unwrap()
        .get(0)
}

/// Advisory locks this session still holds.
async fn held_advisory_locks(client: &Client) -> i64 {
    count(
        client,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    )
    .await
}

async fn table_exists(client: &Client, name: &str) -> bool {
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn running_twice_applies_once_files_once() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    let migrator = Migrator::new().with_example();
    let once = names(&migrator, MigrationKind::Once);
    let always = names(&migrator, MigrationKind::Always);
    assert!(once.contains(&"session_lock/0001_session_lock.up.sql".to_owned()));
    assert!(once.contains(&"example/0001_example_task.up.sql".to_owned()));

    let first = migrator.run(&mut client).await.unwrap();
    assert_eq!(first.applied, once);
    assert!(first.skipped.is_empty());
    assert_eq!(first.reapplied, always);

    let second = migrator.run(&mut client).await.unwrap();
    assert!(second.applied.is_empty(), "{:?}", second.applied);
    assert_eq!(second.skipped, once);
    assert_eq!(second.reapplied, always);

    let rows = count(
        &client,
        "SELECT count(*) FROM session_lock.schema_migration",
    )
    .await;
    assert_eq!(rows as usize, migrator.migrations().len());
    for m in migrator.migrations() {
        let row = client
            .query_one(
                "SELECT kind, checksum FROM session_lock.schema_migration WHERE set_name = $1 AND file = $2",
                &[&m.set, &m.file],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), m.kind.as_str());
        assert_eq!(row.get::<_, String>(1), m.checksum());
    }
    assert_eq!(held_advisory_locks(&client).await, 0);
}

#[tokio::test]
async fn user_dir_once_and_always_files() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    let dir = TempDir::new("once-always");
    dir.write(
        "0001_counter.up.sql",
        "CREATE TABLE app_counter (n int);\nINSERT INTO app_counter VALUES (1);\n",
    )
    .write(
        "0002_version.alwaysup.sql",
        "CREATE OR REPLACE FUNCTION app_version() RETURNS int LANGUAGE plpgsql AS $$\nBEGIN\n  RETURN 1;\nEND;\n$$;\n",
    )
    .write("README.md", "not SQL: ignored");

    for _ in 0..2 {
        let report = Migrator::new()
            .with_dir(dir.path())
            .unwrap()
            .run(&mut client)
            .await
            .unwrap();
        assert!(
            report
                .reapplied
                .contains(&"app/0002_version.alwaysup.sql".to_owned())
        );
    }
    let version = "SELECT app_version()::int8";
    assert_eq!(count(&client, version).await, 1);

    dir.write(
        "0002_version.alwaysup.sql",
        "CREATE OR REPLACE FUNCTION app_version() RETURNS int LANGUAGE plpgsql AS $$\nBEGIN\n  RETURN 2;\nEND;\n$$;\n",
    );
    let migrator = Migrator::new().with_dir(dir.path()).unwrap();
    let report = migrator.run(&mut client).await.unwrap();
    assert_eq!(
        report.skipped,
        vec![
            "session_lock/0001_session_lock.up.sql".to_owned(),
            "session_lock/0001_session_lock_v2.up.sql".to_owned(),
            "session_lock/0001_session_lock_v2_retries.up.sql".to_owned(),
            "session_lock/0001_session_lock_v2_task_groups.up.sql".to_owned(),
            "session_lock/0001_session_lock_v2_known.up.sql".to_owned(),
            "session_lock/0001_session_lock_v2_waiting.up.sql".to_owned(),
            "app/0001_counter.up.sql".to_owned(),
        ]
    );
    assert!(report.applied.is_empty());
    assert_eq!(count(&client, "SELECT count(*) FROM app_counter").await, 1);
    assert_eq!(count(&client, version).await, 2);

    let checksum: String = client
        .query_one(
            "SELECT checksum FROM session_lock.schema_migration WHERE set_name = 'app' AND file = '0002_version.alwaysup.sql'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let now = migrator
        .migrations()
        .iter()
        .find(|m| m.file == "0002_version.alwaysup.sql")
        .unwrap()
        .checksum();
    assert_eq!(checksum, now);
}

#[tokio::test]
async fn an_edited_once_file_is_refused() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    let dir = TempDir::new("edited");
    let original = "CREATE TABLE edited_a (id int);\n";
    dir.write("0001_a.up.sql", original);
    Migrator::new()
        .with_dir(dir.path())
        .unwrap()
        .run(&mut client)
        .await
        .unwrap();

    dir.write("0001_a.up.sql", "CREATE TABLE edited_a (id bigint);\n")
        .write("0002_b.up.sql", "CREATE TABLE edited_b (id int);\n")
        .write(
            "0003_c.alwaysup.sql",
            "CREATE OR REPLACE FUNCTION edited_c() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;\n",
        );
    let err = Migrator::new()
        .with_dir(dir.path())
        .unwrap()
        .run(&mut client)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, MigrateError::Edited { .. }), "{msg}");
    assert!(
        msg.contains("migration app/0001_a.up.sql was edited after it was applied"),
        "{msg}"
    );
    assert!(msg.contains("add a new file instead"), "{msg}");

    // Nothing ran: neither the later once-file nor the always-file.
    assert!(!table_exists(&client, "edited_b").await);
    assert_eq!(recorded(&client, "app", "0002_b.up.sql").await, 0);
    assert_eq!(recorded(&client, "app", "0003_c.alwaysup.sql").await, 0);
    assert_eq!(held_advisory_locks(&client).await, 0);

    // Restoring the file lets the run go on.
    dir.write("0001_a.up.sql", original);
    let report = Migrator::new()
        .with_dir(dir.path())
        .unwrap()
        .run(&mut client)
        .await
        .unwrap();
    assert_eq!(report.applied, vec!["app/0002_b.up.sql".to_owned()]);
    assert!(table_exists(&client, "edited_b").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrators_apply_each_once_file_once() {
    const MIGRATORS: usize = 8;
    let db = fresh_db().await;
    let dir = TempDir::new("concurrent");
    dir.write(
        "0001_hits.up.sql",
        "CREATE TABLE hits (file text NOT NULL);\nINSERT INTO hits VALUES ('0001');\n",
    )
    .write("0002_more.up.sql", "INSERT INTO hits VALUES ('0002');\n")
    .write(
        "0003_fn.alwaysup.sql",
        "CREATE OR REPLACE FUNCTION hits_total() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM hits $$;\n",
    );
    let migrator = Arc::new(Migrator::new().with_example().with_dir(dir.path()).unwrap());

    let mut clients = Vec::new();
    for _ in 0..MIGRATORS {
        clients.push(db.client().await);
    }
    let start = Arc::new(tokio::sync::Barrier::new(MIGRATORS));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let migrator = migrator.clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                migrator.run(&mut client).await
            })
        })
        .collect();
    let mut applied = Vec::new();
    for task in tasks {
        let report = task.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        applied.extend(report.applied);
    }
    applied.sort();
    let mut once = names(&migrator, MigrationKind::Once);
    once.sort();
    assert_eq!(
        applied, once,
        "each once-file applied by exactly one migrator"
    );

    let client = db.client().await;
    for m in migrator.migrations() {
        assert_eq!(recorded(&client, &m.set, &m.file).await, 1, "{}", m.name());
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM hits WHERE file = '0001'").await,
        1
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM hits WHERE file = '0002'").await,
        1
    );
    assert_eq!(count(&client, "SELECT hits_total()").await, 2);
}

#[tokio::test]
async fn a_broken_file_names_file_line_and_statement() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    let dir = TempDir::new("broken");
    dir.write("0001_ok.up.sql", "CREATE TABLE broken_ok (id int);\n")
        .write(
            "0002_broken.up.sql",
            "-- creates two tables\nCREATE TABLE broken_fine (id int);\nCREATE TABLEE broken_bad (id int);\n",
        );
    let err = Migrator::new()
        .with_dir(dir.path())
        .unwrap()
        .run(&mut client)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "migration app/0002_broken.up.sql failed at line 3, column 8: syntax error at or near \"TABLEE\" (SQLSTATE 42601)"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("\n  statement: CREATE TABLEE broken_bad (id int)"),
        "{msg}"
    );
    match &err {
        MigrateError::Failed {
            set,
            file,
            line,
            column,
            statement,
            ..
        } => {
            assert_eq!((set.as_str(), file.as_str()), ("app", "0002_broken.up.sql"));
            assert_eq!((*line, *column), (Some(3), Some(8)));
            assert_eq!(
                statement.as_deref(),
                Some("CREATE TABLEE broken_bad (id int)")
            );
        }
        other => panic!("expected Failed, got {other:?}"),
    }

    // The earlier file stays applied; the broken one left nothing behind.
    assert!(table_exists(&client, "broken_ok").await);
    assert_eq!(recorded(&client, "app", "0001_ok.up.sql").await, 1);
    assert!(!table_exists(&client, "broken_fine").await);
    assert_eq!(recorded(&client, "app", "0002_broken.up.sql").await, 0);
    assert_eq!(held_advisory_locks(&client).await, 0);
}

#[tokio::test]
async fn stray_sql_files_are_refused() {
    let stray = TempDir::new("stray");
    stray
        .write("0001_a.up.sql", "SELECT 1;")
        .write("foo.sql", "SELECT 2;")
        .write("notes.txt", "ignored");
    let err = Migrator::new().with_dir(stray.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, MigrateError::UnexpectedFiles { .. }), "{msg}");
    assert!(
        msg.contains(&stray.path().join("foo.sql").display().to_string()),
        "{msg}"
    );
    assert!(!msg.contains("0001_a.up.sql"), "{msg}");

    let missing = std::env::temp_dir().join("session-lock-migrate-does-not-exist");
    let err = Migrator::new().with_dir(&missing).unwrap_err();
    assert!(matches!(err, MigrateError::ReadDir { .. }), "{err}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let err = Migrator::new()
        .with_named_dir("session_lock", stray.path())
        .unwrap_err();
    assert!(matches!(err, MigrateError::InvalidSetName { .. }), "{err}");
}

#[tokio::test]
async fn several_dirs_get_distinct_set_names() {
    let a = TempDir::new("set-a");
    a.write("0001_x.up.sql", "SELECT 1;");
    let b = TempDir::new("set-b");
    b.write("0001_x.up.sql", "SELECT 2;");
    let c = TempDir::new("set-c");
    c.write("0001_x.up.sql", "SELECT 3;");
    let migrator = Migrator::new()
        .with_dir(a.path())
        .unwrap()
        .with_dir(b.path())
        .unwrap()
        .with_named_dir("billing", c.path())
        .unwrap()
        .with_example();
    let sets: Vec<&str> = migrator
        .migrations()
        .iter()
        .map(|m| m.set.as_str())
        .collect();
    assert_eq!(
        sets,
        vec![
            "session_lock",
            "session_lock",
            "session_lock",
            "session_lock",
            "session_lock",
            "session_lock",
            "session_lock",
            "session_lock",
            "example",
            "example",
            "example",
            "app",
            "app2",
            "billing"
        ]
    );

    let db = fresh_db().await;
    let mut client = db.client().await;
    let report = migrator.run(&mut client).await.unwrap();
    assert!(report.applied.contains(&"app2/0001_x.up.sql".to_owned()));
    assert!(report.applied.contains(&"billing/0001_x.up.sql".to_owned()));
}

#[tokio::test]
async fn a_runtime_error_names_the_statement() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    let dir = TempDir::new("runtime");
    dir.write(
        "0001_div.alwaysup.sql",
        "CREATE TABLE IF NOT EXISTS runtime_t (id int);\nINSERT INTO runtime_t VALUES (1);\n\n-- oops\nSELECT 1/0;\nSELECT 2;\n",
    );
    let err = Migrator::new()
        .with_dir(dir.path())
        .unwrap()
        .run(&mut client)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "migration app/0001_div.alwaysup.sql failed in the statement at line 5: division by zero (SQLSTATE 22012)"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("\n  statement: SELECT 1/0\n") || msg.ends_with("statement: SELECT 1/0"),
        "{msg}"
    );
    assert!(!table_exists(&client, "runtime_t").await, "rolled back");
    assert_eq!(held_advisory_locks(&client).await, 0);

    // Raised inside a function the file calls: the calling statement, and
    // the server's context.
    let db = fresh_db().await;
    let mut client = db.client().await;
    let dir = TempDir::new("runtime-fn");
    dir.write(
        "0001_fn.alwaysup.sql",
        "CREATE OR REPLACE FUNCTION app_boom(d int) RETURNS int LANGUAGE plpgsql AS $$\nBEGIN\n  RETURN 1 / d;\nEND;\n$$;\n\nSELECT app_boom(0);\n",
    );
    let err = Migrator::new()
        .with_dir(dir.path())
        .unwrap()
        .run(&mut client)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("migration app/0001_fn.alwaysup.sql failed in the statement at line 7"),
        "{msg}"
    );
    assert!(msg.contains("statement: SELECT app_boom(0)"), "{msg}");
    assert!(
        msg.contains("where: PL/pgSQL function app_boom(integer) line 3"),
        "{msg}"
    );
}

#[tokio::test]
async fn an_error_in_a_function_body_points_into_the_body() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    let dir = TempDir::new("body");
    dir.write(
        "0001_fn.alwaysup.sql",
        "SELECT 1;\nCREATE OR REPLACE FUNCTION app_body() RETURNS int LANGUAGE plpgsql AS $fn$\nBEGIN\n  RETURN 1;\n  RETURNN 2;\nEND;\n$fn$;\n",
    );
    let err = Migrator::new()
        .with_dir(dir.path())
        .unwrap()
        .run(&mut client)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("migration app/0001_fn.alwaysup.sql failed at line 5, column 3: syntax error at or near \"RETURNN\""),
        "{msg}"
    );
    assert!(
        msg.contains("statement: CREATE OR REPLACE FUNCTION app_body()"),
        "{msg}"
    );
}

#[tokio::test]
async fn an_older_release_does_not_downgrade_functions_a_newer_one_applied() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    Migrator::new().run(&mut client).await.unwrap();
    let by: Option<String> = client
        .query_one(
            "SELECT applied_by FROM session_lock.schema_migration WHERE file = '0002_session_lock.alwaysup.sql'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(by.as_deref(), Some(env!("CARGO_PKG_VERSION")));

    // A newer release applied its own version of the functions...
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION session_lock.fair_share(p_open_tasks bigint, p_live_sessions integer, p_live_rank integer, p_max_tasks integer)
             RETURNS integer LANGUAGE sql IMMUTABLE AS 'SELECT 42';
             UPDATE session_lock.schema_migration SET applied_by = '999.0.0'
              WHERE set_name = 'session_lock' AND kind = 'always';",
        )
        .await
        .unwrap();
    // ...and an old instance restarts during the rolling upgrade.
    let report = Migrator::new().run(&mut client).await.unwrap();
    assert_eq!(
        report.newer_kept,
        vec![
            "session_lock/0002_session_lock.alwaysup.sql".to_owned(),
            "session_lock/0003_task_table.alwaysup.sql".to_owned()
        ]
    );
    assert!(report.reapplied.is_empty());
    let share: i32 = client
        .query_one("SELECT session_lock.fair_share(10, 1, 0, 10)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(share, 42, "the newer functions were left in place");
}

#[tokio::test]
async fn a_task_table_declared_in_rust_gets_its_protocol_at_the_end_of_the_run() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    // The table is created by the user's own migration of the same run.
    let dir = TempDir::new("declared");
    dir.write(
        "0001_jobs.up.sql",
        "CREATE TABLE public.jobs (job_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                   state text NOT NULL DEFAULT 'new', priority int NOT NULL DEFAULT 0,
                                   done_by bigint);",
    );
    let migrator = Migrator::new().with_dir(dir.path()).unwrap().task_table(
        TaskTable::new("public.jobs")
            .id_column("job_id")
            .open_when("state <> 'done'")
            .finish("state = 'done'")
            .finished_by("done_by")
            .order_by("priority DESC, job_id")
            .fn_prefix("jobq")
            .no_notify(),
    );
    let report = migrator.run(&mut client).await.unwrap();
    assert_eq!(report.declared, vec!["public.jobs".to_owned()]);
    let functions = count(
        &client,
        "SELECT count(*) FROM pg_proc WHERE proname IN ('jobq_get_work', 'jobq_finish_tasks', 'jobq_held')",
    )
    .await;
    assert_eq!(functions, 3, "get_work, finish_tasks, held");
    assert_eq!(
        count(&client, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.jobs'::regclass AND NOT tgisinternal").await,
        0,
        "no notify trigger"
    );
    // Running again changes nothing and keeps the declaration.
    let report = migrator.run(&mut client).await.unwrap();
    assert_eq!(report.declared, vec!["public.jobs".to_owned()]);
    assert_eq!(
        count(&client, "SELECT count(*) FROM session_lock.task_table").await,
        1
    );
}

/// Where each function of the schema session_lock and the schema itself
/// stand in the catalog (their row versions: a connection compiles a
/// function again, and drops the plans that use it, when its row has a new
/// version), and who may call the generated get_work.
async fn catalog_rows(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT 'function ' || p.oid::regprocedure::text || ' ' || p.xmin::text || ' ' || p.ctid::text
               FROM pg_proc p
              WHERE p.pronamespace = 'session_lock'::regnamespace
                AND p.proname LIKE 'example_task%'
             UNION ALL
             SELECT 'schema ' || n.xmin::text || ' ' || n.ctid::text
               FROM pg_namespace n WHERE n.nspname = 'session_lock'
             UNION ALL
             SELECT 'runtime may call get_work: '
                    || has_function_privilege('session_lock_runtime',
                           'session_lock.example_task_get_work(bigint, uuid, bigint[], bigint[], boolean, bigint[], boolean)',
                           'EXECUTE')::text
                    || ', public may: '
                    || has_function_privilege('public',
                           'session_lock.example_task_get_work(bigint, uuid, bigint[], bigint[], boolean, bigint[], boolean)',
                           'EXECUTE')::text
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_run_that_changes_nothing_leaves_the_fleets_functions_and_plans_alone() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'session_lock_runtime') THEN
                     CREATE ROLE session_lock_runtime NOLOGIN;
                 END IF;
             EXCEPTION WHEN duplicate_object THEN NULL;
             END $$;",
        )
        .await
        .unwrap();
    let migrator = Migrator::new().with_example();
    migrator.run(&mut client).await.unwrap();
    let before = catalog_rows(&client).await;
    assert!(
        before.iter().filter(|r| r.starts_with("function ")).count() >= 10,
        "{before:?}"
    );
    assert!(
        before.contains(&"runtime may call get_work: true, public may: false".to_owned()),
        "{before:?}"
    );

    // Every instance of a fleet runs the migrator when it starts: a run
    // with nothing to change rewrites no function's row and no schema's
    // (a grant rewrites its object's row even when it changes nothing).
    migrator.run(&mut client).await.unwrap();
    assert_eq!(catalog_rows(&client).await, before);

    // A change to the table still reaches its functions: get_work answers
    // with the new column.
    client
        .batch_execute("ALTER TABLE public.example_task ADD COLUMN note text")
        .await
        .unwrap();
    migrator.run(&mut client).await.unwrap();
    let after = catalog_rows(&client).await;
    assert_ne!(after, before);
    assert!(
        after.contains(&"runtime may call get_work: true, public may: false".to_owned()),
        "{after:?}"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_attribute
              WHERE attrelid = (SELECT typrelid FROM pg_type WHERE typname = 'example_task_answer')
                AND attname = 'note'"
        )
        .await,
        1
    );
    // And the run after that changes nothing again.
    migrator.run(&mut client).await.unwrap();
    assert_eq!(catalog_rows(&client).await, after);
}

/// A file of the user's that defines a function session-lock generates.
const REPLACES_GENERATED: &str = "
CREATE OR REPLACE FUNCTION session_lock.jobs_finish_tasks(p_session bigint, p_token uuid, p_ids bigint[])
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT unnest(p_ids);
END;
$$;
";

/// The always-file of a task template copied from session-lock 0.1: its
/// functions live in the table's schema, away from the generated ones.
const COPIED_TEMPLATE: &str = "
CREATE OR REPLACE FUNCTION public.jobs_finish_tasks(p_session bigint, p_ids bigint[])
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM session_lock.lock_session(p_session);
    RETURN QUERY SELECT unnest(p_ids);
END;
$$;
CREATE OR REPLACE FUNCTION public.jobs_get_work(p_session bigint, p_max_tasks integer, p_ttl interval, p_finished bigint[] DEFAULT NULL)
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN
    PERFORM session_lock.work_begin(p_session, p_max_tasks, p_ttl);
END;
$$;
";

#[tokio::test]
async fn a_file_that_would_replace_generated_functions_is_refused() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    let dir = TempDir::new("replaces");
    dir.write(
        "0001_jobs.up.sql",
        "CREATE TABLE public.jobs (id bigserial PRIMARY KEY, finished_at timestamptz);
         SELECT session_lock.declare_task_table('public.jobs');",
    )
    .write("0002_tasks.alwaysup.sql", REPLACES_GENERATED);
    // The run that declares the table: the file replaces a generated
    // function after the declaration; the migrator notices, generates it
    // again, and says so.
    let err = Migrator::new()
        .with_dir(dir.path())
        .unwrap()
        .run(&mut client)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MigrateError::GeneratedReplaced { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("jobs_finish_tasks"), "{err}");
    let generated = count(
        &client,
        "SELECT count(*) FROM pg_proc WHERE proname = 'jobs_finish_tasks' AND prosrc LIKE '%Generated by session-lock%'",
    )
    .await;
    assert_eq!(generated, 1, "the generated finish is back");
    // Every later run refuses before applying anything.
    let err = Migrator::new()
        .with_dir(dir.path())
        .unwrap()
        .run(&mut client)
        .await
        .unwrap_err();
    match &err {
        MigrateError::ReplacesGenerated {
            set,
            file,
            function,
            table,
        } => {
            assert_eq!(
                (
                    set.as_str(),
                    file.as_str(),
                    function.as_str(),
                    table.as_str()
                ),
                (
                    "app",
                    "0002_tasks.alwaysup.sql",
                    "session_lock.jobs_finish_tasks",
                    "jobs"
                )
            );
        }
        other => panic!("expected ReplacesGenerated, got {other}"),
    }
    let generated = count(
        &client,
        "SELECT count(*) FROM pg_proc WHERE proname = 'jobs_finish_tasks' AND prosrc LIKE '%Generated by session-lock%'",
    )
    .await;
    assert_eq!(generated, 1, "nothing was applied");
}

#[tokio::test]
async fn a_copied_0_1_template_left_in_place_touches_nothing_of_protocol_2() {
    let db = fresh_db().await;
    let mut client = db.client().await;
    let dir = TempDir::new("copied");
    dir.write(
        "0001_jobs.up.sql",
        "CREATE TABLE public.jobs (id bigserial PRIMARY KEY, finished_at timestamptz);
         SELECT session_lock.declare_task_table('public.jobs');",
    )
    .write("0002_tasks.alwaysup.sql", COPIED_TEMPLATE);
    for _ in 0..2 {
        Migrator::new()
            .with_dir(dir.path())
            .unwrap()
            .run(&mut client)
            .await
            .expect("the copy is applied where it always was, and harms nothing");
    }
    let generated = count(
        &client,
        "SELECT count(*) FROM pg_proc p WHERE p.pronamespace = 'session_lock'::regnamespace
            AND p.proname IN ('jobs_get_work', 'jobs_finish_tasks', 'jobs_held')
            AND p.prosrc LIKE '%Generated by session-lock%'",
    )
    .await;
    assert_eq!(generated, 3, "the generated entry points are intact");
    // The copy's own functions refuse, naming protocol 1.
    let err = client
        .query(
            "SELECT * FROM public.jobs_finish_tasks(1, ARRAY[1::bigint])",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("SL004"), "{err:?}");
}
