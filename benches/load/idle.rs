//! Idle cost (BENCHMARKS.md, benchmark 6): what 50 idle runners in one
//! process, with the default configuration, cost PostgreSQL and their own
//! process on an empty table.
//!
//! Over a window: statements per second per runner from
//! pg_stat_statements (top level, the bench's own left out), transactions
//! from `pg_stat_database`, the CPU of the postmaster and all its children,
//! and the bench process's own CPU.
//!
//! What limits the figure: one get_work per tick per runner (a write
//! transaction and its commit, once a second), a heartbeat every 30 s, and
//! one LISTEN connection each.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use session_lock::RunnerConfig;
use tokio_postgres::Client;

use crate::common::{self, Table, median};
use crate::{Ctx, noop_runner, wait_live_sessions};

pub(crate) fn run(ctx: &Ctx) {
    let n = 50usize;
    let window = Duration::from_secs(if ctx.opts.full { 60 } else { 15 });
    let mut qps = Vec::new();
    let mut xps = Vec::new();
    let mut pg = Vec::new();
    let mut client_cpu = Vec::new();
    let mut breakdown = String::new();
    for rep in 0..ctx.opts.reps {
        let r = actix_rt::System::new().block_on(idle_once(ctx, n, window));
        eprintln!(
            "bench: idle rep {rep}: {:.2} statements/s per runner, PG CPU {:.1} %",
            r.0, r.2
        );
        qps.push(r.0);
        xps.push(r.1);
        pg.push(r.2);
        client_cpu.push(r.3);
        breakdown = r.4;
    }
    let mut t = Table::new(
        format!(
            "Idle cost: {n} idle runners in one process, default config (tick 1 s, heartbeat 30 s, LISTEN on), {} s window (median of repetitions)",
            window.as_secs()
        ),
        &[
            "statements/s per runner",
            "transactions/s per runner",
            "PostgreSQL CPU (% of one core)",
            "runner process CPU (% of one core)",
        ],
    );
    t.row(vec![
        format!("{:.2}", median(&qps)),
        format!("{:.2}", median(&xps)),
        format!("{:.1}", median(&pg)),
        format!("{:.1}", median(&client_cpu)),
    ]);
    t.emit("load");
    if !breakdown.is_empty() {
        println!("{breakdown}");
    }
}

async fn idle_snapshot(c: &Client, tracked: bool, calls_q: &str, xact_q: &str) -> (f64, f64) {
    let calls: f64 = if tracked {
        c.query_one(calls_q, &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0.0)
    } else {
        0.0
    };
    // pg_stat_database is updated by backends at most every 500 ms (and
    // when idle): read a fresh snapshot.
    let _ = c.batch_execute("SELECT pg_stat_clear_snapshot()").await;
    let x: f64 = c
        .query_one(xact_q, &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0.0);
    (calls, x)
}

async fn idle_once(ctx: &Ctx, n: usize, window: Duration) -> (f64, f64, f64, f64, String) {
    let postmaster = ctx.pg.pid().expect("postmaster");
    let client = common::connect(&ctx.url).await;
    common::seed(&client, 0).await;
    let tracked = common::track_statements(&client, "top").await;
    let mut handles = Vec::new();
    for _ in 0..n {
        let config = RunnerConfig::builder("idle").build().expect("config");
        handles.push(noop_runner(&ctx.url, config).await);
    }
    wait_live_sessions(&client, n as i64, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls_q = "SELECT coalesce(sum(calls), 0)::float8 FROM pg_stat_statements
                    WHERE query NOT ILIKE '%pg_stat%' AND query NOT ILIKE '%live_session%'";
    let xact_q = "SELECT xact_commit::float8 + xact_rollback::float8 FROM pg_stat_database WHERE datname = current_database()";
    let (c0, x0) = idle_snapshot(&client, tracked, calls_q, xact_q).await;
    let pg0 = common::postgres_cpu_secs(postmaster);
    let self0 = common::self_cpu_secs();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let (c1, x1) = idle_snapshot(&client, tracked, calls_q, xact_q).await;
    let secs = t0.elapsed().as_secs_f64();
    let pg_cpu = (common::postgres_cpu_secs(postmaster) - pg0) / secs * 100.0;
    let self_cpu = (common::self_cpu_secs() - self0) / secs * 100.0;
    let mut breakdown = String::new();
    if tracked {
        if let Ok(rows) = client
            .query(
                "SELECT calls::float8, left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
                   FROM pg_stat_statements
                  WHERE query NOT ILIKE '%pg_stat%' AND query NOT ILIKE '%live_session%'
                  ORDER BY calls DESC LIMIT 6",
                &[],
            )
            .await
        {
            breakdown.push_str("idle: statements by calls since tracking started:\n");
            for r in rows {
                let calls: f64 = r.get(0);
                let q: String = r.get(1);
                breakdown.push_str(&format!("  {calls:>8.0}  {q}\n"));
            }
        }
    }
    join_all(handles.iter().map(|h| h.stop())).await;
    common::track_statements(&client, "none").await;
    let qps = if tracked {
        (c1 - c0) / n as f64 / secs
    } else {
        f64::NAN
    };
    // The two snapshot reads are themselves transactions; negligible.
    let xps = (x1 - x0) / n as f64 / secs;
    (qps, xps, pg_cpu, self_cpu, breakdown)
}
