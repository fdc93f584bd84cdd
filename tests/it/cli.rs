//! The operator commands, run as a user would: `migrate` and `status`, and
//! their one-line errors.

use std::process::{Command, Output};
use std::time::Duration;

use session_lock::{Database, GetWork, PgStore, SessionStart};
use session_lock_testkit::example::ExampleTask;

use session_lock_testkit::db::fresh_db;

fn session_lock(args: &[&str]) -> Output {
    Command::new(session_lock_testkit::session_lock_bin())
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run session-lock")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A failure is exactly one line on stderr, non-zero, and no panic.
fn assert_one_line_failure(out: &Output, expected: &str) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
}

#[tokio::test]
async fn migrate_then_status_shows_sessions_and_task_counts() {
    let db = fresh_db().await;
    let out = session_lock(&["migrate", "--database-url", &db.url, "--example"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("applied    session_lock/0001_session_lock.up.sql"),
        "{stdout}"
    );
    assert!(
        stdout.contains("applied    example/0001_example_task.up.sql"),
        "{stdout}"
    );
    let again = session_lock(&["migrate", "--database-url", &db.url, "--example"]);
    assert!(text(&again.stdout).contains("0 applied, 3 re-applied, 8 already applied"));

    let client = db.client().await;
    client
        .execute(
            "INSERT INTO example_task (payload) SELECT 'p' FROM generate_series(1, 12)",
            &[],
        )
        .await
        .unwrap();
    let store = PgStore::connect(&db.url).await.unwrap();
    let ttl = Duration::from_secs(60);
    let live = store
        .start_session(&SessionStart::new("status-test", ttl, 5))
        .await
        .unwrap();
    let dead = store
        .start_session(&SessionStart::new("status-test", ttl, 4))
        .await
        .unwrap();
    for session in [&live, &dead] {
        store
            .get_work::<ExampleTask>(GetWork::new(session))
            .await
            .unwrap();
    }
    client
        .execute(
            "UPDATE session_lock.session SET expires_at = now() - interval '1 s' WHERE id = $1",
            &[&dead.id],
        )
        .await
        .unwrap();

    let out = session_lock(&["status", "--database-url", &db.url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("live sessions: 1"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&live.id.to_string()))
        .unwrap_or_else(|| panic!("a row for session {}: {stdout}", live.id));
    assert!(row.contains("status-test"), "{row}");
    assert!(
        row.contains(&std::process::id().to_string()),
        "the pid of the session's process: {row}"
    );
    let last_two: Vec<&str> = row.split_whitespace().rev().take(2).collect();
    assert_eq!(last_two, ["5", "5"], "5 tasks held, counter 5: {row}");
    assert!(!stdout.contains("different number of tasks"), "{stdout}");
    assert!(
        stdout.contains("12 open, 5 assigned to live sessions, 3 unowned, 4 orphaned"),
        "{stdout}"
    );

    // A task finished behind session-lock's back: the session's counter
    // still says 5 until its next get_work, and status says so.
    client
        .execute(
            "UPDATE example_task SET finished_at = now()
              WHERE id = (SELECT min(id) FROM example_task WHERE session_id = $1)",
            &[&live.id],
        )
        .await
        .unwrap();
    let out = session_lock(&["status", "--database-url", &db.url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&live.id.to_string()))
        .unwrap_or_else(|| panic!("a row for session {}: {stdout}", live.id));
    let last_two: Vec<&str> = row.split_whitespace().rev().take(2).collect();
    assert_eq!(last_two, ["5", "4"], "4 tasks held, counter 5: {row}");
    assert!(
        stdout.contains("1 session(s) hold a different number of tasks than their counter says"),
        "{stdout}"
    );
}

#[tokio::test]
async fn operator_errors_are_one_line_and_name_the_problem() {
    let unreachable = session_lock(&[
        "status",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/x",
    ]);
    assert_one_line_failure(&unreachable, "cannot connect to the database");

    let bad_url = session_lock(&["migrate", "--database-url", "postgres://[oops"]);
    assert_one_line_failure(&bad_url, "bad database URL");

    let db = fresh_db().await;
    let unmigrated = session_lock(&["status", "--database-url", &db.url]);
    assert_one_line_failure(&unmigrated, "run `session-lock migrate");

    let out = session_lock(&["migrate", "--database-url", &db.url]);
    assert!(out.status.success());
    let no_such_table = session_lock(&[
        "status",
        "--database-url",
        &db.url,
        "--held",
        "public.nope_held",
    ]);
    assert_one_line_failure(
        &no_such_table,
        "task function public.nope_held does not exist",
    );

    let missing_dir = session_lock(&[
        "migrate",
        "--database-url",
        &db.url,
        "--dir",
        "/nonexistent/dir",
    ]);
    assert_one_line_failure(&missing_dir, "/nonexistent/dir");
}

#[tokio::test]
async fn status_lists_quarantined_tasks_and_retry_releases_them() {
    let db = fresh_db().await;
    let out = session_lock(&["migrate", "--database-url", &db.url, "--example"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let client = db.client().await;
    // Three tasks; two picked up max_attempts (5) times by holders that died.
    let ids: Vec<i64> = client
        .query(
            "INSERT INTO example_task (payload) SELECT 'p' FROM generate_series(1, 3) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    client
        .execute(
            "UPDATE example_task SET sl_attempts = 5, sl_last_session = 77 WHERE id = ANY ($1)",
            &[&&ids[..2]],
        )
        .await
        .unwrap();

    let status = session_lock(&["status", "--database-url", &db.url]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let stdout = text(&status.stdout);
    assert!(
        stdout.contains("quarantined (public.example_task): 2 task(s)"),
        "{stdout}"
    );
    let listed = stdout
        .lines()
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() == 3 && cols[1] == "5" && cols[2] == "77"
        })
        .count();
    assert_eq!(
        listed, 2,
        "each quarantined task with its attempts and last session: {stdout}"
    );

    let table = "public.example_task";
    let one = ids[0].to_string();
    let released = session_lock(&[
        "retry",
        "--database-url",
        &db.url,
        "--table",
        table,
        "--id",
        &one,
    ]);
    assert!(released.status.success(), "{}", text(&released.stderr));
    assert!(
        text(&released.stdout).contains(&format!("released 1 quarantined task(s) of {table}")),
        "{}",
        text(&released.stdout)
    );
    // A task that is not quarantined is named in a one-line error.
    let third = ids[2].to_string();
    let refused = session_lock(&[
        "retry",
        "--database-url",
        &db.url,
        "--table",
        table,
        "--id",
        &third,
    ]);
    assert_one_line_failure(
        &refused,
        &format!("tasks [{third}] of {table} are not quarantined"),
    );
    // --all releases the rest; an undeclared table is a clear error.
    let all = session_lock(&[
        "retry",
        "--database-url",
        &db.url,
        "--table",
        table,
        "--all",
    ]);
    assert!(
        text(&all.stdout).contains("released 1 quarantined"),
        "{}",
        text(&all.stdout)
    );
    let attempts: Vec<i32> = client
        .query("SELECT sl_attempts FROM example_task ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(attempts, vec![0, 0, 0]);
    let missing = session_lock(&[
        "retry",
        "--database-url",
        &db.url,
        "--table",
        "public.nope",
        "--all",
    ]);
    assert_one_line_failure(&missing, "public.nope does not exist");
    let neither = session_lock(&["retry", "--database-url", &db.url, "--table", table]);
    assert!(
        !neither.status.success(),
        "retry without --id or --all is refused"
    );
}
