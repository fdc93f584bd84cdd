//! Upgrading a database that session-lock 0.1 set up (protocol 1) to 0.2.
//!
//! Every test builds the 0.1 database from the SQL 0.1 shipped
//! (`tests/fixtures/v1/`), the way the 0.1 migrator applied it: each file in
//! its own transaction with its bookkeeping row, the crate's sets recorded
//! as applied by 0.1.0. The user's table `public.my_task` got the 0.1 task
//! template, filled in as its comments say, as the set `app`; the worked
//! example came with `with_example()`. The protocol-1 state is made by the
//! 0.1 SQL functions themselves: two sessions of a name holding tasks, one
//! expired (not yet reclaimed) session holding tasks, finished tasks and
//! free ones, in both tables. Then 0.2 migrates, the way the CHANGELOG says:
//! the template's once-file stays, its always-file is deleted, and the
//! table is declared (in a new migration file, or with
//! `Migrator::task_table`).
//!
//! 0.2 generates a declared table's functions in the schema `session_lock`
//! (`session_lock.my_task_get_work`, ...), and touches nothing in the
//! table's schema: the 0.1 functions there (the template's
//! `public.my_task_*`, the example's `public.example_task_*`) stay where
//! they are, and refuse with SL004 because the protocol-1 helpers they call
//! first (`session_lock.work_begin`, `session_lock.lock_session`) now do. So
//! a template always-file applied again, by a forgetful 0.2 user or by a 0.1
//! instance restarting mid-upgrade, is harmless.
//!
//! Every wait polls the database against a deadline, or waits on a runner's
//! status.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use session_lock::migrate::{Migration, MigrationKind, Migrator, Report};
use session_lock::{
    Database, GetWork, PgStore, Progress, Runner, RunnerConfig, RunnerHandle, ScanError, ScanTask,
    SessionId, SessionStart, Task, TaskId, TaskQueries, TaskTable, TaskerError, column,
    task_queries,
};
use session_lock_testkit::example::ExampleTask;
use session_lock_testkit::wait_for_status;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use session_lock_testkit::db::{TestDb, fresh_db};

/// Guards every wait against a hang; nothing here should take long.
/// A task row `t` as text, without the columns 0.2 adds to it: those
/// protocol 2 keeps on every task row, and the example's `tenant`.
const PROTOCOL_COLUMNS_DROPPED: &str = "(to_jsonb(t) - 'sl_attempts' - 'sl_retry_at' - 'sl_fence' - 'sl_last_session' - 'sl_server' - 'tenant')::text";

const DEADLINE: Duration = Duration::from_secs(60);

/// The release that applied the 0.1 database.
const V1_RELEASE: &str = "0.1.0";

/// The fill-in marker of the 0.1 task template, which the 0.1 migrator
/// refused to apply.
const TEMPLATE_MARKER: &str = "TODO(session-lock)";

/// The 0.1 migrator's bookkeeping table, created exactly as its BOOTSTRAP
/// did (and as 0.2's still does).
const BOOTSTRAP_0_1: &str = "\
CREATE SCHEMA IF NOT EXISTS session_lock;
CREATE TABLE IF NOT EXISTS session_lock.schema_migration (
    set_name   text        NOT NULL,
    file       text        NOT NULL,
    kind       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (set_name, file)
);
ALTER TABLE session_lock.schema_migration ADD COLUMN IF NOT EXISTS applied_by text;";

/// The 0.1 migrator's bookkeeping row for an always-file (a once-file's is
/// the same INSERT without the ON CONFLICT, and is written once).
const RECORD_0_1: &str = "INSERT INTO session_lock.schema_migration (set_name, file, kind, checksum, applied_by) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (set_name, file) DO UPDATE \
     SET kind = EXCLUDED.kind, checksum = EXCLUDED.checksum, applied_at = now(), \
         applied_by = EXCLUDED.applied_by";

/// The user's task table, which predates session-lock.
const USER_TABLE: &str = "CREATE TABLE public.my_task (
    id          bigserial PRIMARY KEY,
    payload     text NOT NULL,
    finished_at timestamptz
);";

const TEMPLATE_ONCE: &str = include_str!("../fixtures/v1/template/0001_tasks.up.sql");
const TEMPLATE_ALWAYS: &str = include_str!("../fixtures/v1/template/0002_tasks.alwaysup.sql");

/// The user's new migration declaring the table (the upgrade's first way).
const DECLARE_FILE: &str = "SELECT session_lock.declare_task_table('public.my_task');\n";

// ---------------------------------------------------------------------------
// The 0.1 database.
// ---------------------------------------------------------------------------

/// The 0.1 task template filled in for `public.my_task`, as its comments
/// ask: the `TODO(session-lock)` lines dropped, and each placeholder body
/// (a RAISE of SL002) replaced by the example body in the comment above
/// its function. The table is already called `my_task`, so no renaming.
fn filled_template(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut example: Vec<&str> = Vec::new();
    let mut in_example = false;
    let mut lines = template.lines();
    while let Some(line) = lines.next() {
        if line.starts_with("--") {
            if line.contains("Example body") {
                in_example = true;
                example.clear();
            } else if in_example {
                // Code is indented 5 after the `--`; notes are not.
                if let Some(code) = line.strip_prefix("--     ") {
                    example.push(code);
                }
            }
            if !line.contains(TEMPLATE_MARKER) {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        in_example = false;
        if line
            .trim_start()
            .starts_with("RAISE EXCEPTION 'task template function")
        {
            let using = lines.next().unwrap_or_default();
            assert!(using.contains("'SL002'"), "placeholder ends with {using:?}");
            assert!(!example.is_empty(), "no example body before {line:?}");
            for code in example.drain(..) {
                out.push_str("    ");
                out.push_str(code);
                out.push('\n');
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert!(!out.contains(TEMPLATE_MARKER), "a marker is left:\n{out}");
    assert!(!out.contains("'SL002'"), "a placeholder is left:\n{out}");
    out
}

/// The files the 0.1 migrator applied, in its order: `(set, file, sql)`;
/// without `template_always`, the user's directory lacks the template's
/// always-file.
fn v1_files(template_always: bool) -> Vec<(&'static str, &'static str, String)> {
    let mut files = vec![
        (
            "session_lock",
            "0001_session_lock.up.sql",
            include_str!("../fixtures/v1/0001_session_lock.up.sql").to_owned(),
        ),
        (
            "session_lock",
            "0002_session_lock.alwaysup.sql",
            include_str!("../fixtures/v1/0002_session_lock.alwaysup.sql").to_owned(),
        ),
        (
            "example",
            "0001_example_task.up.sql",
            include_str!("../fixtures/v1/example/0001_example_task.up.sql").to_owned(),
        ),
        (
            "example",
            "0002_example_task.alwaysup.sql",
            include_str!("../fixtures/v1/example/0002_example_task.alwaysup.sql").to_owned(),
        ),
        ("app", "0001_tasks.up.sql", filled_template(TEMPLATE_ONCE)),
    ];
    if template_always {
        files.push((
            "app",
            "0002_tasks.alwaysup.sql",
            filled_template(TEMPLATE_ALWAYS),
        ));
    }
    files
}

/// The hex SHA-256 the migrators record for a file.
fn checksum(set: &str, file: &str, sql: &str) -> String {
    Migration {
        set: set.to_owned(),
        file: file.to_owned(),
        kind: MigrationKind::from_file_name(file).expect("a migration file name"),
        sql: sql.to_owned().into(),
    }
    .checksum()
}

/// Whether release `a` is newer than `b`, as the 0.1 migrator compared them.
fn newer_than_0_1(a: &str, b: &str) -> bool {
    fn parts(v: &str) -> Vec<u64> {
        v.split(['-', '+'])
            .next()
            .unwrap_or("")
            .split('.')
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    }
    parts(a) > parts(b)
}

/// What a run of the 0.1 migrator did, each entry `set/file`.
#[derive(Debug, Default)]
struct Run0_1 {
    applied: Vec<String>,
    reapplied: Vec<String>,
    newer_kept: Vec<String>,
}

/// Runs the 0.1 files the way the 0.1 migrator did (src/migrate.rs of
/// 0.1.0): once-files not yet recorded and every always-file, each in its
/// own transaction with its bookkeeping row; an always-file of the crate's
/// sets left alone if a newer release recorded it. `template_always`: see
/// [`v1_files`].
async fn run_0_1_migrator(client: &mut Client, template_always: bool) -> Run0_1 {
    client.batch_execute(BOOTSTRAP_0_1).await.unwrap();
    let recorded: HashMap<(String, String), (String, Option<String>)> = client
        .query(
            "SELECT set_name, file, checksum, applied_by FROM session_lock.schema_migration",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();
    let mut run = Run0_1::default();
    for (set, file, sql) in v1_files(template_always) {
        let kind = MigrationKind::from_file_name(file).unwrap();
        let sum = checksum(set, file, &sql);
        let name = format!("{set}/{file}");
        let key = (set.to_owned(), file.to_owned());
        match (kind, recorded.get(&key)) {
            (MigrationKind::Once, Some((old, _))) => {
                assert_eq!(old, &sum, "0.1 would refuse the edited {name}");
                continue;
            }
            (MigrationKind::Always, Some((_, Some(by))))
                if set != "app" && newer_than_0_1(by, V1_RELEASE) =>
            {
                run.newer_kept.push(name);
                continue;
            }
            _ => {}
        }
        let by = (set != "app").then_some(V1_RELEASE);
        let tx = client.transaction().await.unwrap();
        tx.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("0.1 migrator: {name} failed: {}", db_error(&e)));
        tx.execute(RECORD_0_1, &[&set, &file, &kind.as_str(), &sum, &by])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        match kind {
            MigrationKind::Once => run.applied.push(name),
            MigrationKind::Always => run.reapplied.push(name),
        }
    }
    run
}

/// A fresh database as 0.1 left it: the user's table, then one run of the
/// 0.1 migrator with the example and the filled-in template.
async fn v1_database() -> (TestDb, Client) {
    let db = fresh_db().await;
    let mut client = db.client().await;
    client.batch_execute(USER_TABLE).await.unwrap();
    let run = run_0_1_migrator(&mut client, true).await;
    assert_eq!(run.applied.len() + run.reapplied.len(), 6, "{run:?}");
    (db, client)
}

// ---------------------------------------------------------------------------
// Protocol-1 state, made by the 0.1 functions.
// ---------------------------------------------------------------------------

/// A task table of protocol 1, the runner name its sessions use, and its
/// declaration's fn_prefix in 0.2.
#[derive(Debug, Clone, Copy)]
struct V1Table {
    table: &'static str,
    name: &'static str,
    prefix: &'static str,
}

const MINE: V1Table = V1Table {
    table: "public.my_task",
    name: "mine",
    prefix: "my_task",
};
const EXAMPLE: V1Table = V1Table {
    table: "public.example_task",
    name: "ex",
    prefix: "example_task",
};
const TABLES: [V1Table; 2] = [MINE, EXAMPLE];

/// Tasks per table.
const TASKS: i32 = 40;
/// The max_tasks the 0.1 runners asked for.
const V1_MAX_TASKS: i32 = 6;
/// The lease of the session left to expire.
const EXPIRING_TTL: Duration = Duration::from_secs(1);

async fn v1_start(client: &Client, name: &str, ttl: Duration) -> SessionId {
    client
        .query_one(
            "SELECT session_lock.start_session($1, make_interval(secs => $2), 'v1-host', 4242)",
            &[&name, &ttl.as_secs_f64()],
        )
        .await
        .unwrap_or_else(|e| panic!("0.1 start_session: {}", db_error(&e)))
        .get(0)
}

/// 0.1's get_work: finishes `finished`, moves the session to its share and
/// returns the ids of the tasks it holds.
async fn v1_get_work(
    client: &Client,
    t: V1Table,
    session: SessionId,
    ttl: Duration,
    finished: &[TaskId],
) -> Vec<TaskId> {
    let sql = format!(
        "SELECT id FROM {}_get_work($1, $2, make_interval(secs => $3), $4)",
        t.table
    );
    client
        .query(
            &sql,
            &[&session, &V1_MAX_TASKS, &ttl.as_secs_f64(), &finished],
        )
        .await
        .unwrap_or_else(|e| panic!("0.1 get_work of {}: {}", t.table, db_error(&e)))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// 0.1's fenced finish.
async fn v1_finish_tasks(
    client: &Client,
    t: V1Table,
    session: SessionId,
    ids: &[TaskId],
) -> Vec<TaskId> {
    let sql = format!("SELECT * FROM {}_finish_tasks($1, $2)", t.table);
    client
        .query(&sql, &[&session, &ids])
        .await
        .unwrap_or_else(|e| panic!("0.1 finish_tasks of {}: {}", t.table, db_error(&e)))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The sessions of one runner name that protocol 1 left behind.
#[derive(Debug, Clone, Copy)]
struct V1Sessions {
    /// Started with the caller's lease.
    live: [SessionId; 2],
    /// Started with [`EXPIRING_TTL`]; expired, not reclaimed.
    expired: SessionId,
}

impl V1Sessions {
    fn all(&self) -> Vec<SessionId> {
        vec![self.live[0], self.live[1], self.expired]
    }
}

/// Seeds [`TASKS`] tasks in `t` and runs three 0.1 runner sessions on it:
/// A finishes two tasks through get_work, B one through finish_tasks, and
/// C (the last to call anything, so that nobody reclaims it) one through
/// get_work, with a lease of [`EXPIRING_TTL`]. Each ends up holding tasks;
/// the rest are free.
async fn v1_sessions(client: &Client, t: V1Table, live_ttl: Duration) -> V1Sessions {
    let seed = format!(
        "INSERT INTO {} (payload) SELECT 'task ' || g FROM generate_series(1, $1) g",
        t.table
    );
    client.execute(&seed, &[&TASKS]).await.unwrap();

    let a = v1_start(client, t.name, live_ttl).await;
    let held = v1_get_work(client, t, a, live_ttl, &[]).await;
    assert_eq!(held.len(), V1_MAX_TASKS as usize);
    let held = v1_get_work(client, t, a, live_ttl, &held[..2]).await;
    assert_eq!(held.len(), V1_MAX_TASKS as usize);

    let b = v1_start(client, t.name, live_ttl).await;
    let held = v1_get_work(client, t, b, live_ttl, &[]).await;
    assert_eq!(held.len(), V1_MAX_TASKS as usize);
    assert_eq!(v1_finish_tasks(client, t, b, &held[..1]).await, &held[..1]);

    let c = v1_start(client, t.name, EXPIRING_TTL).await;
    let held = v1_get_work(client, t, c, EXPIRING_TTL, &[]).await;
    assert_eq!(held.len(), V1_MAX_TASKS as usize);
    let held = v1_get_work(client, t, c, EXPIRING_TTL, &held[..1]).await;
    assert_eq!(held.len(), V1_MAX_TASKS as usize);

    V1Sessions {
        live: [a, b],
        expired: c,
    }
}

/// A 0.1 database with protocol-1 state in both tables, once the sessions
/// started with [`EXPIRING_TTL`] have expired.
struct V1 {
    db: TestDb,
    client: Client,
    sessions: BTreeMap<&'static str, V1Sessions>,
    /// The state just before 0.2 migrates.
    before: State,
}

async fn v1_with_state(live_ttl: Duration) -> V1 {
    let (db, client) = v1_database().await;
    let mut sessions = BTreeMap::new();
    for t in TABLES {
        sessions.insert(t.table, v1_sessions(&client, t, live_ttl).await);
    }
    let expired: Vec<SessionId> = sessions.values().map(|s| s.expired).collect();
    poll(
        &client,
        "the sessions started with a 1 s lease to expire",
        "SELECT bool_and(expires_at <= clock_timestamp()) FROM session_lock.session WHERE id = ANY ($1)",
        &[&expired],
    )
    .await;

    // What protocol 1 left: every session holds tasks, its held counter
    // says how many, and nobody reclaimed or ended anything.
    for t in TABLES {
        let counted = format!(
            "SELECT s.id, s.held, s.reclaimed_at IS NULL AND s.ended_at IS NULL,
                    (SELECT count(*) FROM {} x WHERE x.session_id = s.id AND x.finished_at IS NULL)
               FROM session_lock.session s WHERE s.name = $1 ORDER BY s.id",
            t.table
        );
        let rows = client.query(&counted, &[&t.name]).await.unwrap();
        assert_eq!(rows.len(), 3, "{}: three sessions", t.table);
        for r in &rows {
            let (id, held, open, tasks): (i64, i32, bool, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            assert!(open, "{}: session {id} was reclaimed or ended", t.table);
            assert!(held > 0, "{}: session {id} holds nothing", t.table);
            assert_eq!(
                i64::from(held),
                tasks,
                "{}: session {id}'s held counter",
                t.table
            );
        }
        let counts = format!(
            "SELECT count(*) FILTER (WHERE finished_at IS NOT NULL),
                    count(*) FILTER (WHERE finished_at IS NULL AND session_id IS NULL)
               FROM {}",
            t.table
        );
        let row = client.query_one(&counts, &[]).await.unwrap();
        let (finished, free): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(finished, 4, "{}: finished by protocol 1", t.table);
        assert!(free > 0, "{}: no free task", t.table);
    }
    let before = state(&client).await;
    V1 {
        db,
        client,
        sessions,
        before,
    }
}

// ---------------------------------------------------------------------------
// What the tests compare.
// ---------------------------------------------------------------------------

/// Every task row and every session's protocol-1 columns, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    /// table -> id -> the whole row.
    tasks: BTreeMap<&'static str, BTreeMap<TaskId, String>>,
    /// id -> the columns protocol 1 had.
    sessions: BTreeMap<SessionId, String>,
    /// id -> held counter.
    held: BTreeMap<SessionId, i32>,
}

async fn state(client: &Client) -> State {
    let mut tasks = BTreeMap::new();
    for t in TABLES {
        // The columns protocol 2 adds to every task row (sl_attempts,
        // sl_retry_at, sl_fence, sl_last_session, sl_server) start at their defaults:
        // a row is what it was before without them.
        let sql = format!(
            "SELECT t.id, {PROTOCOL_COLUMNS_DROPPED} FROM {} t ORDER BY t.id",
            t.table
        );
        let rows = client.query(&sql, &[]).await.unwrap();
        tasks.insert(t.table, rows.iter().map(|r| (r.get(0), r.get(1))).collect());
    }
    let rows = client
        .query(
            "SELECT s.id, (s.id, s.name, s.host, s.pid, s.started_at, s.bumped_at, s.expires_at,
                           s.ended_at, s.reclaimed_at, s.held)::text, s.held
               FROM session_lock.session s ORDER BY s.id",
            &[],
        )
        .await
        .unwrap();
    State {
        tasks,
        sessions: rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        held: rows.iter().map(|r| (r.get(0), r.get(2))).collect(),
    }
}

/// Open tasks per holder, as the table's 0.1 `*_held` function (in the
/// table's schema) reports them.
async fn held_by_v1_function(client: &Client, t: V1Table) -> BTreeMap<Option<SessionId>, i64> {
    held_by(client, &format!("{}_held", t.table)).await
}

/// Open tasks per holder, as the table's generated `*_held` function (in
/// `session_lock`) reports them.
async fn held_by_generated_function(
    client: &Client,
    t: V1Table,
) -> BTreeMap<Option<SessionId>, i64> {
    held_by(client, &format!("session_lock.{}_held", t.prefix)).await
}

async fn held_by(client: &Client, function: &str) -> BTreeMap<Option<SessionId>, i64> {
    let sql = format!("SELECT session_id, tasks FROM {function}()");
    client
        .query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Everything a migration run could change: the state (all session
/// columns now), the bookkeeping (but an always-file's time), the
/// declarations (but when they were generated), and the definitions of
/// every function, index and trigger of both schemas.
async fn fingerprint(client: &Client) -> Vec<String> {
    let mut all = Vec::new();
    for sql in [
        "SELECT s::text FROM session_lock.session s ORDER BY s.id",
        "SELECT (set_name, file, kind, checksum, applied_by,
                 CASE WHEN kind = 'once' THEN applied_at END)::text
           FROM session_lock.schema_migration ORDER BY set_name, file",
        "SELECT (task_table, fn_prefix, id_column, open_when, finish, finished_by,
                 order_by, notify, lock_timeout, declared_at)::text
           FROM session_lock.task_table ORDER BY 1",
        "SELECT (p.oid::regprocedure, pg_get_function_result(p.oid), p.prosrc, p.proconfig,
                 p.prosecdef, p.proacl)::text
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname IN ('public', 'session_lock') ORDER BY 1",
        "SELECT pg_get_indexdef(i.indexrelid)
           FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname IN ('public', 'session_lock') ORDER BY 1",
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1",
    ] {
        for r in client.query(sql, &[]).await.unwrap() {
            all.push(r.get(0));
        }
    }
    for t in TABLES {
        let sql = format!(
            "SELECT {PROTOCOL_COLUMNS_DROPPED} FROM {} t ORDER BY t.id",
            t.table
        );
        for r in client.query(&sql, &[]).await.unwrap() {
            all.push(r.get(0));
        }
    }
    all
}

// ---------------------------------------------------------------------------
// The 0.2 migration.
// ---------------------------------------------------------------------------

/// How the user declares `public.my_task` to 0.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declare {
    /// A new once-file, `0003_declare.up.sql`.
    InFile,
    /// `Migrator::task_table(TaskTable::new("public.my_task"))`.
    InRust,
}

/// A scratch migrations directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "session-lock-upgrade-{tag}-{}-{}",
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

/// The user's migrations directory after the upgrade: the template's
/// once-file kept, its always-file deleted, and the declaration added if
/// it is made in a file.
fn upgraded_dir(declare: Declare) -> TempDir {
    let dir = TempDir::new("app");
    dir.write("0001_tasks.up.sql", &filled_template(TEMPLATE_ONCE));
    if declare == Declare::InFile {
        dir.write("0003_declare.up.sql", DECLARE_FILE);
    }
    dir
}

fn migrator_0_2(dir: &TempDir, declare: Declare) -> Migrator {
    let migrator = Migrator::new().with_example().with_dir(dir.path()).unwrap();
    match declare {
        Declare::InFile => migrator,
        Declare::InRust => migrator.task_table(TaskTable::new("public.my_task")),
    }
}

async fn migrate_0_2(client: &mut Client, dir: &TempDir, declare: Declare) -> Report {
    migrator_0_2(dir, declare)
        .run(client)
        .await
        .unwrap_or_else(|e| panic!("0.2 migrates the 0.1 database ({declare:?}): {e}"))
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|&n| n.to_owned()).collect()
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} (SQLSTATE {}; hint: {:?})",
            db.message(),
            db.code().code(),
            db.hint()
        ),
        None => e.to_string(),
    }
}

/// Polls a query returning one boolean every 25 ms until it is true.
async fn poll(client: &Client, what: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) {
    let start = Instant::now();
    loop {
        let done: Option<bool> = client.query_one(sql, params).await.unwrap().get(0);
        if done == Some(true) {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs a protocol-1 call and checks it is refused with SL004, naming
/// protocol 1 and hinting at the upgrade; returns the message.
async fn refused(client: &Client, what: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> String {
    let err = match client.query(sql, params).await {
        Ok(rows) => panic!(
            "{what} was accepted after the upgrade ({} rows)",
            rows.len()
        ),
        Err(e) => e,
    };
    let Some(db) = err.as_db_error() else {
        panic!("{what}: not an error of the server: {err}");
    };
    assert_eq!(db.code().code(), "SL004", "{what}: {}", db_error(&err));
    assert!(
        db.message().contains("protocol 1") && db.message().contains("protocol 2"),
        "{what}: {}",
        db.message()
    );
    let hint = db.hint().unwrap_or_default();
    assert!(
        hint.contains("Upgrade session-lock") && hint.contains("declaration"),
        "{what}: hint {hint:?}"
    );
    db.message().to_owned()
}

/// The lowest open task `session` holds in `t`.
async fn held_task(client: &Client, t: V1Table, session: SessionId) -> TaskId {
    client
        .query_one(
            &format!(
                "SELECT min(id) FROM {} WHERE session_id = $1 AND finished_at IS NULL",
                t.table
            ),
            &[&session],
        )
        .await
        .unwrap()
        .get::<_, Option<TaskId>>(0)
        .unwrap_or_else(|| panic!("{}: session {session} holds no open task", t.table))
}

/// Checks that the 0.1 entry points of `t`, in the table's schema (the
/// template's or the example's, left alone by 0.2), refuse a 0.1 runner's
/// tick and fenced finish with SL004: the protocol-1 helper each calls
/// first refuses.
async fn v1_entry_points_refuse(client: &Client, t: V1Table, session: SessionId, task: TaskId) {
    // A 0.1 runner's tick, with the previous batch to finish.
    let msg = refused(
        client,
        &format!("0.1 get_work of {}", t.table),
        &format!(
            "SELECT * FROM {}_get_work($1::bigint, $2::integer, make_interval(secs => $3::float8), $4::bigint[])",
            t.table
        ),
        &[&session, &V1_MAX_TASKS, &60.0f64, &vec![task]],
    )
    .await;
    assert!(msg.contains("work_begin"), "{msg}");
    // Its fenced finish.
    let msg = refused(
        client,
        &format!("0.1 finish_tasks of {}", t.table),
        &format!(
            "SELECT * FROM {}_finish_tasks($1::bigint, $2::bigint[])",
            t.table
        ),
        &[&session, &vec![task]],
    )
    .await;
    assert!(msg.contains("lock_session"), "{msg}");
}

/// The generated entry points of `public.my_task` (in `session_lock`), each
/// with whether it is still what session-lock generated.
async fn my_task_entry_points(client: &Client) -> Vec<(String, bool)> {
    client
        .query(
            "SELECT p.oid::regprocedure::text, p.prosrc LIKE '%Generated by session-lock%'
               FROM pg_proc p
              WHERE p.pronamespace = 'session_lock'::regnamespace
                AND p.proname IN ('my_task_get_work', 'my_task_finish_tasks', 'my_task_held')
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// What [`my_task_entry_points`] returns when they are intact.
fn generated_my_task_entry_points() -> Vec<(String, bool)> {
    [
        "session_lock.my_task_finish_tasks(bigint,uuid,bigint[])",
        "session_lock.my_task_get_work(bigint,uuid,bigint[],bigint[],boolean,bigint[],boolean)",
        "session_lock.my_task_held()",
    ]
    .into_iter()
    .map(|f| (f.to_owned(), true))
    .collect()
}

/// A 0.2 session of "mine" picks up a task of `public.my_task` and
/// finishes it through the generated functions; ends the session.
async fn a_0_2_session_finishes_a_task(url: &str) {
    let store = PgStore::connect(url).await.unwrap();
    let session = store
        .start_session(&SessionStart::new("mine", Duration::from_secs(60), 10))
        .await
        .unwrap();
    let work = store
        .get_work::<MyTask>(GetWork::new(&session))
        .await
        .unwrap_or_else(|e| panic!("a 0.2 session's get_work was refused: {e:?}"));
    let Some(first) = work.tasks.first().map(|t| t.id) else {
        panic!("the 0.2 session got no task: {work:?}");
    };
    match store.finish_tasks::<MyTask>(&session, &[first]).await {
        Ok(done) => assert_eq!(done, vec![first]),
        Err(e) => panic!("a 0.2 session's finish was refused: {e:?}"),
    }
    assert!(store.end_session(&session).await.unwrap());
}

/// The log lines at WARN or above that `f` emits on this thread.
async fn warnings<T>(f: impl std::future::Future<Output = T>) -> (T, String) {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let out = {
        let _guard = tracing::subscriber::set_default(subscriber);
        f.await
    };
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    (out, text)
}

/// A log sink for [`warnings`].
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn upgrade_keeps_every_task_holder_and_held_counter() {
    for declare in [Declare::InFile, Declare::InRust] {
        let mut v1 = v1_with_state(Duration::from_secs(60)).await;
        let held_v1: Vec<_> = {
            let mut h = Vec::new();
            for t in TABLES {
                h.push(held_by_v1_function(&v1.client, t).await);
            }
            h
        };
        let dir = upgraded_dir(declare);
        let report = migrate_0_2(&mut v1.client, &dir, declare).await;

        let mut applied = vec![
            "session_lock/0001_session_lock_v2.up.sql",
            "session_lock/0001_session_lock_v2_retries.up.sql",
            "session_lock/0001_session_lock_v2_task_groups.up.sql",
            "session_lock/0001_session_lock_v2_known.up.sql",
            "session_lock/0001_session_lock_v2_waiting.up.sql",
            "example/0001_example_task_tenant.up.sql",
        ];
        if declare == Declare::InFile {
            applied.push("app/0003_declare.up.sql");
        }
        assert_eq!(report.applied, strings(&applied), "{declare:?}");
        assert_eq!(
            report.skipped,
            strings(&[
                "session_lock/0001_session_lock.up.sql",
                "example/0001_example_task.up.sql",
                "app/0001_tasks.up.sql",
            ]),
            "{declare:?}"
        );
        assert_eq!(
            report.reapplied,
            strings(&[
                "session_lock/0002_session_lock.alwaysup.sql",
                "session_lock/0003_task_table.alwaysup.sql",
                "example/0002_example_task.alwaysup.sql",
            ]),
            "{declare:?}"
        );
        assert!(report.newer_kept.is_empty(), "{declare:?}: {report:?}");
        let declared: &[&str] = match declare {
            Declare::InFile => &[],
            Declare::InRust => &["public.my_task"],
        };
        assert_eq!(report.declared, strings(declared));

        // Not a task lost or changed, not a held counter moved.
        let after = state(&v1.client).await;
        assert_eq!(after.held, v1.before.held, "{declare:?}: held counters");
        for t in TABLES {
            assert_eq!(
                after.tasks[t.table], v1.before.tasks[t.table],
                "{declare:?}: the rows of {}",
                t.table
            );
        }
        assert_eq!(after, v1.before, "{declare:?}");

        // Both tables are declared, and their generated held functions (in
        // session_lock) see the holders protocol 1 left.
        let registry: Vec<String> = v1
            .client
            .query(
                "SELECT task_table::text FROM session_lock.task_table ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            registry,
            strings(&["example_task", "my_task"]),
            "{declare:?}"
        );
        for (t, held) in TABLES.into_iter().zip(&held_v1) {
            assert_eq!(
                &held_by_generated_function(&v1.client, t).await,
                held,
                "{declare:?}: session_lock.{}_held",
                t.prefix
            );
            // 0.2 generated nothing in, and dropped nothing from, the
            // table's schema: 0.1's own held function is still there.
            assert_eq!(
                &held_by_v1_function(&v1.client, t).await,
                held,
                "{declare:?}: {}_held of 0.1",
                t.table
            );
        }

        // The protocol-1 sessions are marked so, with their holdings as
        // their capacity; the live ones are still live.
        for (table, s) in &v1.sessions {
            for id in s.all() {
                let row = v1
                    .client
                    .query_one(
                        "SELECT protocol, capacity, held, expires_at > clock_timestamp()
                           FROM session_lock.session WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .unwrap();
                let (protocol, capacity, held, live): (i16, i32, i32, bool) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                assert_eq!(protocol, 1, "{declare:?}: {table} session {id}");
                assert_eq!(capacity, held.max(1), "{declare:?}: {table} session {id}");
                assert_eq!(
                    live,
                    id != s.expired,
                    "{declare:?}: {table} session {id} live"
                );
            }
        }
    }
}

#[tokio::test]
async fn protocol_1_calls_are_refused_with_sl004_naming_protocol_1() {
    let mut v1 = v1_with_state(Duration::from_secs(60)).await;
    let dir = upgraded_dir(Declare::InFile);
    migrate_0_2(&mut v1.client, &dir, Declare::InFile).await;
    let client = &v1.client;

    for t in TABLES {
        let s = v1.sessions[t.table];
        let a = s.live[0];
        let task = held_task(client, t, a).await;
        // A 0.1 runner's tick and its fenced finish, through the 0.1
        // functions still in the table's schema.
        v1_entry_points_refuse(client, t, a, task).await;
        // Its heartbeat, on a session that is still live.
        let msg = refused(
            client,
            &format!("0.1 heartbeat of {} session {a}", t.table),
            "SELECT session_lock.bump_session($1::bigint, make_interval(secs => $2::float8))",
            &[&a, &60.0f64],
        )
        .await;
        assert!(msg.contains("bump_session"), "{msg}");
        let live: bool = client
            .query_one(
                "SELECT expires_at > clock_timestamp() FROM session_lock.session WHERE id = $1",
                &[&a],
            )
            .await
            .unwrap()
            .get(0);
        assert!(live, "the refused heartbeat was tried on a live session");
        // A protocol-1 session is refused by protocol 2's own entry points
        // too, naming it (whatever token is presented: 0.1 never had one).
        let token = "SELECT gen_random_uuid()";
        let msg = refused(
            client,
            &format!("0.2 get_work of {} for 0.1 session {a}", t.table),
            &format!(
                "SELECT * FROM session_lock.{}_get_work($1::bigint, ({token}), $2::bigint[])",
                t.prefix
            ),
            &[&a, &vec![task]],
        )
        .await;
        assert!(msg.contains(&format!("session {a}")), "{msg}");
        let msg = refused(
            client,
            &format!("0.2 finish_tasks of {} for 0.1 session {a}", t.table),
            &format!(
                "SELECT * FROM session_lock.{}_finish_tasks($1::bigint, ({token}), $2::bigint[])",
                t.prefix
            ),
            &[&a, &vec![task]],
        )
        .await;
        assert!(msg.contains(&format!("session {a}")), "{msg}");
        let msg = refused(
            client,
            &format!("0.2 heartbeat of 0.1 session {a}"),
            &format!(
                "SELECT session_lock.bump_session($1::bigint, ({token}), make_interval(secs => $2::float8))"
            ),
            &[&a, &60.0f64],
        )
        .await;
        assert!(msg.contains(&format!("session {a}")), "{msg}");
    }
    // A 0.1 runner starting over.
    let msg = refused(
        client,
        "0.1 start_session",
        "SELECT session_lock.start_session($1::text, make_interval(secs => $2::float8), $3::text, $4::integer)",
        &[&"mine", &60.0f64, &"v1-host", &4242i32],
    )
    .await;
    assert!(msg.contains("start_session"), "{msg}");

    // The refused calls changed nothing: no task, no lease, no session.
    assert_eq!(state(client).await, v1.before);
}

/// A row of `public.my_task`.
#[derive(Debug)]
struct MyTask {
    id: TaskId,
}

impl Task for MyTask {
    fn id(&self) -> TaskId {
        self.id
    }
}

impl ScanTask for MyTask {
    const QUERIES: TaskQueries = task_queries!("my_task");

    fn scan(row: &Row) -> Result<Self, ScanError> {
        Ok(MyTask {
            id: column(row, None, "id")?,
        })
    }
}

/// How many times each task was handed to a Tasker.
type Runs = Arc<Mutex<HashMap<TaskId, u32>>>;

/// A Tasker that completes every task at once, counting runs.
fn completing<T: Task>(
    runs: Runs,
) -> impl Fn(Vec<T>, Progress) -> std::future::Ready<Result<Vec<TaskId>, TaskerError>>
+ Send
+ Sync
+ 'static {
    move |tasks: Vec<T>, _progress: Progress| {
        let mut counts = runs.lock().unwrap();
        for t in &tasks {
            *counts.entry(t.id()).or_default() += 1;
        }
        std::future::ready(Ok(tasks.iter().map(Task::id).collect()))
    }
}

fn runner_config(name: &str) -> RunnerConfig {
    RunnerConfig::builder(name)
        .ttl(Duration::from_secs(6))
        .heartbeat(Duration::from_secs(1))
        .tick(Duration::from_millis(50))
        .jitter(Duration::ZERO)
        .max_tasks(10)
        .workers(2)
        .build()
        .unwrap()
}

/// Waits until the runner has finished `n` tasks.
async fn finished(runner: &RunnerHandle, n: usize) {
    let mut rx = runner.subscribe();
    if wait_for_status(&mut rx, DEADLINE, |s| s.finished >= n as u64)
        .await
        .is_none()
    {
        panic!("{n} tasks not finished in time: {:?}", runner.status());
    }
}

/// Open tasks per table, by id.
async fn open_tasks(client: &Client, t: V1Table) -> Vec<TaskId> {
    let sql = format!(
        "SELECT id FROM {} WHERE finished_at IS NULL ORDER BY id",
        t.table
    );
    client
        .query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The sessions' leases: id -> expires_at.
async fn leases(client: &Client, ids: &[SessionId]) -> BTreeMap<SessionId, String> {
    client
        .query(
            "SELECT id, expires_at::text FROM session_lock.session WHERE id = ANY ($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[actix_rt::test]
async fn a_0_2_runner_finishes_every_task_protocol_1_left() {
    // The 0.1 runners' leases are short, so that they run out soon after
    // the upgrade refuses their renewals.
    let mut v1 = v1_with_state(Duration::from_secs(2)).await;
    let dir = upgraded_dir(Declare::InRust);
    migrate_0_2(&mut v1.client, &dir, Declare::InRust).await;
    let client = &v1.client;
    let mut open = BTreeMap::new();
    for t in TABLES {
        open.insert(t.table, open_tasks(client, t).await);
    }
    // What protocol 1 holds: (task, holder).
    let v1_held: Vec<(TaskId, SessionId)> = {
        let mut h = Vec::new();
        for t in TABLES {
            let sql = format!(
                "SELECT id, session_id FROM {} WHERE finished_at IS NULL AND session_id IS NOT NULL",
                t.table
            );
            for r in client.query(&sql, &[]).await.unwrap() {
                h.push((r.get(0), r.get(1)));
            }
        }
        h
    };
    assert!(!v1_held.is_empty());
    let v1_ids: Vec<SessionId> = v1.sessions.values().flat_map(V1Sessions::all).collect();
    let leases_at_upgrade = leases(client, &v1_ids).await;

    let mine_runs: Runs = Arc::default();
    let example_runs: Runs = Arc::default();
    let store = PgStore::connect(&v1.db.url).await.unwrap();
    let mine = Runner::new(
        runner_config(MINE.name),
        store.clone(),
        completing::<MyTask>(mine_runs.clone()),
    )
    .start();
    let example = Runner::new(
        runner_config(EXAMPLE.name),
        store,
        completing::<ExampleTask>(example_runs.clone()),
    )
    .start();

    // Until every task is finished, a task protocol 1 held moves only once
    // its holder is reclaimed (by then expired: its renewals are refused).
    let start = Instant::now();
    loop {
        let moved: Vec<String> = client
            .query(
                "SELECT format('task %s of session %s', h.task, h.holder)
                   FROM unnest($1::bigint[], $2::bigint[]) AS h(task, holder)
                   JOIN session_lock.session s ON s.id = h.holder
                   LEFT JOIN public.my_task m ON m.id = h.task AND s.name = 'mine'
                   LEFT JOIN public.example_task e ON e.id = h.task AND s.name = 'ex'
                  WHERE s.reclaimed_at IS NULL
                    AND coalesce(m.session_id, e.session_id) IS DISTINCT FROM h.holder",
                &[
                    &v1_held.iter().map(|h| h.0).collect::<Vec<_>>(),
                    &v1_held.iter().map(|h| h.1).collect::<Vec<_>>(),
                ],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(moved.is_empty(), "moved from a live holder: {moved:?}");
        let left: i64 = client
            .query_one(
                "SELECT (SELECT count(*) FROM public.my_task WHERE finished_at IS NULL)
                      + (SELECT count(*) FROM public.example_task WHERE finished_at IS NULL)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{left} tasks still open: {:?} / {:?}",
            mine.status(),
            example.status()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    finished(&mine, open[MINE.table].len()).await;
    finished(&example, open[EXAMPLE.table].len()).await;
    let (mine_status, example_status) = (mine.status(), example.status());
    mine.stop().await;
    example.stop().await;

    // Every task open at the upgrade ran exactly once; no other task ran.
    for (t, runs) in [(MINE, &mine_runs), (EXAMPLE, &example_runs)] {
        let runs = runs.lock().unwrap().clone();
        let expected: HashMap<TaskId, u32> = open[t.table].iter().map(|&id| (id, 1)).collect();
        assert_eq!(runs, expected, "{}: runs per task", t.table);
    }
    for s in [&mine_status, &example_status] {
        assert_eq!(
            (s.finished, s.failed, s.rejected, s.session_losses),
            (s.fetched, 0, 0, 0),
            "{s:?}"
        );
    }
    // The tasks protocol 1 finished are as it left them; the rest were
    // finished now. The example records who finished: the 0.2 runner.
    let after = state(client).await;
    for t in TABLES {
        for (id, row) in &v1.before.tasks[t.table] {
            if !open[t.table].contains(id) {
                assert_eq!(&after.tasks[t.table][id], row, "{}: task {id}", t.table);
            }
        }
    }
    let finished_by_others: i64 = client
        .query_one(
            "SELECT count(*) FROM public.example_task e
               JOIN session_lock.session s ON s.id = e.finished_by
              WHERE e.id = ANY ($1) AND NOT (s.protocol = 2 AND s.name = 'ex')",
            &[&open[EXAMPLE.table]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(finished_by_others, 0, "finished_by names the 0.2 session");
    // Every protocol-1 session was reclaimed, after it expired (never
    // renewed since the upgrade), and holds nothing.
    assert_eq!(leases(client, &v1_ids).await, leases_at_upgrade);
    for (table, s) in &v1.sessions {
        for id in s.all() {
            let row = client
                .query_one(
                    "SELECT reclaimed_at >= expires_at, held
                       FROM session_lock.session WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            let (after_expiry, held): (Option<bool>, i32) = (row.get(0), row.get(1));
            assert_eq!(after_expiry, Some(true), "{table}: session {id} reclaimed");
            assert_eq!(held, 0, "{table}: session {id}");
        }
    }
}

#[tokio::test]
async fn migrating_again_changes_nothing() {
    for declare in [Declare::InFile, Declare::InRust] {
        let mut v1 = v1_with_state(Duration::from_secs(60)).await;
        let dir = upgraded_dir(declare);
        migrate_0_2(&mut v1.client, &dir, declare).await;
        let first = fingerprint(&v1.client).await;

        let report = migrate_0_2(&mut v1.client, &dir, declare).await;
        assert!(report.applied.is_empty(), "{declare:?}: {report:?}");
        let mut skipped = vec![
            "session_lock/0001_session_lock.up.sql",
            "session_lock/0001_session_lock_v2.up.sql",
            "session_lock/0001_session_lock_v2_retries.up.sql",
            "session_lock/0001_session_lock_v2_task_groups.up.sql",
            "session_lock/0001_session_lock_v2_known.up.sql",
            "session_lock/0001_session_lock_v2_waiting.up.sql",
            "example/0001_example_task.up.sql",
            "example/0001_example_task_tenant.up.sql",
            "app/0001_tasks.up.sql",
        ];
        if declare == Declare::InFile {
            skipped.push("app/0003_declare.up.sql");
        }
        assert_eq!(report.skipped, strings(&skipped), "{declare:?}");
        let second = fingerprint(&v1.client).await;
        assert_eq!(
            first.len(),
            second.len(),
            "{declare:?}: the number of objects changed"
        );
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(a, b, "{declare:?}: changed by the second run");
        }
        assert_eq!(state(&v1.client).await, v1.before, "{declare:?}");
    }
}

#[tokio::test]
async fn a_forgotten_template_always_file_is_applied_harmlessly_with_a_warning() {
    for declare in [Declare::InFile, Declare::InRust] {
        let mut v1 = v1_with_state(Duration::from_secs(60)).await;
        // The user declared the table but kept the template's always-file.
        let dir = upgraded_dir(declare);
        dir.write("0002_tasks.alwaysup.sql", &filled_template(TEMPLATE_ALWAYS));
        let mut first = None;
        for run in 0..2 {
            // Every run applies the copy where it always was (its
            // functions live in the table's schema, away from the
            // generated ones), and names it in a warning.
            let (report, log) = warnings(migrator_0_2(&dir, declare).run(&mut v1.client)).await;
            let report = report.unwrap_or_else(|e| {
                panic!("{declare:?} run {run}: a forgotten template always-file is harmless: {e}")
            });
            assert!(
                report
                    .reapplied
                    .contains(&"app/0002_tasks.alwaysup.sql".to_owned()),
                "{declare:?} run {run}: {report:?}"
            );
            let warned = log.lines().any(|l| {
                l.contains("WARN")
                    && l.contains("app/0002_tasks.alwaysup.sql")
                    && l.contains("copied from session-lock 0.1")
            });
            assert!(
                warned,
                "{declare:?} run {run}: no warning naming the copy in:\n{log}"
            );
            // The generated functions are intact, and the copy's own
            // functions refuse a 0.1 runner's calls.
            assert_eq!(
                my_task_entry_points(&v1.client).await,
                generated_my_task_entry_points(),
                "{declare:?} run {run}"
            );
            let a = v1.sessions[MINE.table].live[0];
            let task = held_task(&v1.client, MINE, a).await;
            v1_entry_points_refuse(&v1.client, MINE, a, task).await;
            // Nothing was lost or changed, and the second run changes
            // nothing the first did not.
            assert_eq!(state(&v1.client).await, v1.before, "{declare:?} run {run}");
            let now = fingerprint(&v1.client).await;
            match &first {
                None => first = Some(now),
                Some(first) => assert_eq!(&now, first, "{declare:?}: changed by the second run"),
            }
        }
        // A 0.2 session works the table through the generated functions.
        a_0_2_session_finishes_a_task(&v1.db.url).await;
    }
}

#[tokio::test]
async fn a_0_1_instance_restarting_mid_upgrade_keeps_the_0_2_functions() {
    let mut v1 = v1_with_state(Duration::from_secs(60)).await;
    let dir = upgraded_dir(Declare::InFile);
    migrate_0_2(&mut v1.client, &dir, Declare::InFile).await;

    // Every file 0.2 ran is recorded with its checksum, the crate's with
    // 0.2's release, the user's with none; what 0.2 only skipped keeps 0.1's
    // record.
    let recorded: BTreeMap<String, (String, Option<String>)> = v1
        .client
        .query(
            "SELECT set_name || '/' || file, checksum, applied_by FROM session_lock.schema_migration",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let ran = migrator_0_2(&dir, Declare::InFile);
    for m in ran.migrations() {
        let (sum, by) = &recorded[&m.name()];
        assert_eq!(sum, &m.checksum(), "{}", m.name());
        let expected = match (m.set.as_str(), m.file.as_str()) {
            ("app", _) => None,
            ("session_lock", "0001_session_lock.up.sql")
            | ("example", "0001_example_task.up.sql") => Some(V1_RELEASE),
            _ => Some("0.2.0"),
        };
        assert_eq!(by.as_deref(), expected, "applied_by of {}", m.name());
    }
    assert_eq!(env!("CARGO_PKG_VERSION"), "0.2.0");

    // An instance still on 0.1 restarts and runs its migrator (its
    // migrations directory without the template's always-file, which the
    // next test is about): it keeps the crate's always-files that 0.2
    // recorded, and so every function 0.2 made.
    let before = fingerprint(&v1.client).await;
    let run = run_0_1_migrator(&mut v1.client, false).await;
    assert!(
        run.applied.is_empty() && run.reapplied.is_empty(),
        "{run:?}"
    );
    assert_eq!(
        run.newer_kept,
        strings(&[
            "session_lock/0002_session_lock.alwaysup.sql",
            "example/0002_example_task.alwaysup.sql",
        ])
    );
    assert_eq!(fingerprint(&v1.client).await, before);
}

#[tokio::test]
async fn a_0_1_instance_still_carrying_the_template_always_file_keeps_the_0_2_functions() {
    let mut v1 = v1_with_state(Duration::from_secs(60)).await;
    let dir = upgraded_dir(Declare::InFile);
    migrate_0_2(&mut v1.client, &dir, Declare::InFile).await;
    let before = fingerprint(&v1.client).await;

    // A 0.1 instance restarts mid-upgrade. Its build still has the
    // template's always-file (the upgrade deletes it from the 0.2 build),
    // a user file, which the 0.1 migrator re-applies whoever recorded it.
    let run = run_0_1_migrator(&mut v1.client, true).await;
    assert_eq!(run.reapplied, strings(&["app/0002_tasks.alwaysup.sql"]));
    assert!(run.applied.is_empty(), "{run:?}");
    assert_eq!(
        run.newer_kept,
        strings(&[
            "session_lock/0002_session_lock.alwaysup.sql",
            "example/0002_example_task.alwaysup.sql",
        ])
    );

    // The copy lands in the table's schema, where it already was: the
    // generated functions in session_lock are intact, and nothing at all
    // changed (the template's functions were already these).
    assert_eq!(
        my_task_entry_points(&v1.client).await,
        generated_my_task_entry_points()
    );
    assert_eq!(fingerprint(&v1.client).await, before);

    // The template's functions refuse a 0.1 runner's calls, as before the
    // restart...
    let a = v1.sessions[MINE.table].live[0];
    let task = held_task(&v1.client, MINE, a).await;
    v1_entry_points_refuse(&v1.client, MINE, a, task).await;
    assert_eq!(state(&v1.client).await, v1.before);
    // ... and a 0.2 session's tick and fenced finish work.
    a_0_2_session_finishes_a_task(&v1.db.url).await;
}
