//! `session-lock demo` end to end, as the README's first command: runner
//! processes share the tasks, one is killed, its tasks move, a fresh one
//! joins, and nothing is lost. Runs against a fresh database of the test
//! server through `DATABASE_URL`, so the demo starts no server of its own.

use std::process::{Command, Stdio};

use session_lock_testkit::db::fresh_db;

const TASKS: u64 = 300;
const MAX_TASKS: u64 = 10;
const TTL_MS: u64 = 2000;
const TICK_MS: u64 = 100;

#[tokio::test]
async fn demo_kills_a_runner_and_loses_no_task() {
    let db = fresh_db().await;
    let url = db.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(session_lock_testkit::session_lock_bin())
            .args(["demo", "--json", "--runners", "2", "--timeout-s", "90"])
            .args(["--tasks", &TASKS.to_string()])
            .args(["--max-tasks", &MAX_TASKS.to_string()])
            .args(["--ttl-ms", &TTL_MS.to_string()])
            .args(["--tick-ms", &TICK_MS.to_string()])
            .args(["--heartbeat-ms", "400", "--work-ms", "50"])
            .env("DATABASE_URL", &url)
            .env_remove("SESSION_LOCK_LOG")
            .stdin(Stdio::null())
            .output()
    })
    .await
    .expect("the blocking task")
    .expect("run session-lock demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let summary: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{stdout}"));
    let n = |key: &str| {
        summary[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} is not a number in {summary}"))
    };
    assert_eq!(n("tasks"), TASKS, "{summary}");
    assert_eq!(n("finished"), TASKS, "{summary}");
    assert_eq!(n("lost"), 0, "{summary}");
    // Only the killed runner's tasks in flight may run twice.
    assert!(n("duplicates") <= MAX_TASKS, "{summary}");
    assert!(
        summary["tasks_per_s"].as_f64().is_some_and(|r| r > 0.0),
        "{summary}"
    );

    let failover = summary["failover_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("failover_ms is null: {summary}"));
    assert!(
        failover <= TTL_MS + TICK_MS + 1000,
        "failover took {failover} ms: {summary}"
    );

    let sessions = summary["per_session"].as_array().expect("per_session");
    assert_eq!(sessions.len(), 3, "2 runners + the fresh one: {summary}");
    let killed: Vec<_> = sessions.iter().filter(|s| s["killed"] == true).collect();
    assert_eq!(killed.len(), 1, "{summary}");
    let finished: u64 = sessions
        .iter()
        .map(|s| s["finished"].as_u64().expect("finished"))
        .sum();
    assert_eq!(finished, TASKS, "{summary}");
    for s in sessions {
        assert!(s["session_id"].as_i64().is_some(), "{s}");
        assert!(s["pid"].as_u64().is_some(), "{s}");
        assert!(s["executions"].as_u64() >= s["finished"].as_u64(), "{s}");
    }
}
