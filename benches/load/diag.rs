//! Diagnosis (BENCHMARKS.md, "where the time goes"): which statements the
//! server spends its time on, with pg_stat_statements tracking the
//! statements inside the PL/pgSQL functions too (so an entry point's time
//! includes its parts).
//!
//! Two drains in one process (1 runner at batch 10, 4 at batch 100), the
//! server's execution time per tick set against the wall time per tick;
//! then get_work at 1M open tasks with 100 sessions of max_tasks 100.
//!
//! What limits the figure: it is a breakdown to read, not a target to meet;
//! the tracking itself adds to the server's time, so its rows compare with
//! each other rather than with the other measurements. It needs the
//! pg_stat_statements extension installed, and says so otherwise.

use std::time::Duration;

use session_lock_testkit::example::ExampleTask;
use tokio_postgres::Client;

use crate::common::{self, Table};
use crate::drain::{InProcessDrain, drain_in_process};
use crate::{Ctx, store};

pub(crate) fn run(ctx: &Ctx) {
    if !common::pg_stat_statements_installed() {
        eprintln!("bench: diag needs pg_stat_statements");
        return;
    }
    for (n, batch) in [(1usize, 10u32), (4, 100)] {
        actix_rt::System::new().block_on(diag_drain(ctx, n, batch));
    }
    actix_rt::System::new().block_on(diag_get_work(ctx, 1_000_000, 100, 100));
}

/// A drain in one process with nested statements tracked: the server's
/// time per tick against the wall time per tick.
async fn diag_drain(ctx: &Ctx, n: usize, batch: u32) {
    let client = common::connect(&ctx.url).await;
    let tasks = ctx.opts.tasks.min(50_000);
    common::seed(&client, tasks).await;
    common::track_statements(&client, "all").await;
    let InProcessDrain { wall, ticks } =
        drain_in_process(&ctx.url, n, batch, tasks, Duration::from_secs(600)).await;
    let server_ms: f64 = client
        .query_one(
            "SELECT coalesce(sum(total_exec_time), 0) FROM pg_stat_statements
              WHERE toplevel AND (query ILIKE '%example_task_get_work%' OR query ILIKE '%example_task_finish_tasks%')",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0.0);
    println!(
        "diag: {n} runner(s), batch {batch}: {tasks} tasks in {wall:.2} s, {ticks} ticks; wall per tick per runner {:.3} ms; server execution (get_work + finish, commit excluded) per tick {:.3} ms",
        wall * 1e3 * n as f64 / ticks.max(1) as f64,
        server_ms / ticks.max(1) as f64
    );
    print_statements(
        &client,
        &format!("drain, {n} runner(s) in one process, batch {batch}, {tasks} tasks in {wall:.1} s, {ticks} ticks"),
    )
    .await;
    common::track_statements(&client, "none").await;
}

/// get_work at a large backlog with many sessions, nested statements
/// tracked: which part of the tick costs what.
async fn diag_get_work(ctx: &Ctx, backlog: u64, sessions: usize, max_tasks: u32) {
    use session_lock::{Database, GetWork, SessionStart};
    let client = common::connect(&ctx.url).await;
    common::seed(&client, backlog).await;
    let store = store(&ctx.url).await;
    let ttl = Duration::from_secs(3600);
    let mut ids = Vec::new();
    for _ in 0..sessions {
        ids.push(
            store
                .start_session(&SessionStart::new("diag", ttl, max_tasks))
                .await
                .expect("session"),
        );
    }
    common::track_statements(&client, "all").await;
    for round in 0..3 {
        for session in &ids {
            let work = store
                .get_work::<ExampleTask>(GetWork::new(session))
                .await
                .expect("get_work");
            let done: Vec<i64> = work.tasks.iter().map(|t| t.id).collect();
            if round > 0 {
                common::finish_and_replace(&client, session, &done).await;
            }
        }
    }
    print_statements(
        &client,
        &format!(
            "get_work at {backlog} open tasks, {sessions} sessions, max_tasks {max_tasks}, 3 rounds"
        ),
    )
    .await;
    common::track_statements(&client, "none").await;
}

async fn print_statements(client: &Client, what: &str) {
    let rows = client
        .query(
            "SELECT calls::float8, total_exec_time, mean_exec_time, rows::float8,
                    shared_blks_hit::float8 / greatest(calls, 1),
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 110)
               FROM pg_stat_statements
              WHERE query NOT ILIKE '%pg_stat%'
              ORDER BY total_exec_time DESC LIMIT 16",
            &[],
        )
        .await
        .expect("pg_stat_statements");
    let mut t = Table::new(
        format!(
            "Diagnosis: statements by total time ({what}; nested statements included, so entry points include their parts)"
        ),
        &[
            "calls",
            "total ms",
            "mean ms",
            "rows",
            "blocks hit / call",
            "statement",
        ],
    );
    for r in rows {
        let q: String = r.get(5);
        t.row(vec![
            format!("{:.0}", r.get::<_, f64>(0)),
            format!("{:.0}", r.get::<_, f64>(1)),
            format!("{:.3}", r.get::<_, f64>(2)),
            format!("{:.0}", r.get::<_, f64>(3)),
            format!("{:.1}", r.get::<_, f64>(4)),
            q.replace('|', "\\|"),
        ]);
    }
    t.emit("load");
}
