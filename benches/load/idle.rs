//! Idle cost (BENCHMARKS.md, benchmark 6): what a fleet of 200 idle
//! runners in one process costs PostgreSQL and their own process on an
//! empty table: with LISTEN and quiet ticks (the default), with LISTEN and
//! quiet ticks off, and without LISTEN; beside the floor, 200 connections
//! each sending `SELECT 1` once a second (what waking 200 backends once a
//! second costs on this machine, whatever they run).
//!
//! Over a window: statements per second per runner from
//! pg_stat_statements (top level, the bench's own left out), transactions
//! and commits that wrote (a transaction id taken) from
//! `pg_stat_database` and the WAL, the CPU of the postmaster and all its
//! children, and the bench process's own CPU.
//!
//! What limits the figure: one get_work per tick per runner (once a
//! second; an idle one reads and writes nothing; once per quiet tick, with
//! the question whether it may stay quiet, when quiet), a heartbeat every
//! 30 s, and with LISTEN one more connection each.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use session_lock::RunnerConfig;
use tokio_postgres::Client;

use crate::common::{self, Table, median};
use crate::{Ctx, noop_runner, wait_live_sessions};

/// Runners in the fleet.
const FLEET: usize = 200;

/// One window's figures.
struct Idle {
    statements: f64,
    transactions: f64,
    writes: f64,
    pg_cpu: f64,
    client_cpu: f64,
    breakdown: String,
}

pub(crate) fn run(ctx: &Ctx) {
    let window = Duration::from_secs(if ctx.opts.full { 60 } else { 15 });
    let mut t = Table::new(
        format!(
            "Idle cost: {FLEET} idle runners in one process, default config (tick 1 s, quiet tick 10 s, heartbeat 30 s), {} s window (median of repetitions); target: at most one statement per tick per runner, PostgreSQL under 10 % of a core",
            window.as_secs()
        ),
        &[
            "LISTEN",
            "statements/s per runner",
            "transactions/s per runner",
            "writing transactions/s per runner",
            "PostgreSQL CPU (% of one core)",
            "runner process CPU (% of one core)",
            "verdict",
        ],
    );
    let mut breakdown = String::new();
    let modes = [
        ("on, quiet ticks (default)", true, None),
        ("on, quiet ticks off", true, Some(Duration::ZERO)),
        ("off", false, None),
    ];
    for (label, listen, quiet_tick) in modes {
        let mut runs = Vec::new();
        for rep in 0..ctx.opts.reps {
            let r =
                actix_rt::System::new().block_on(idle_once(ctx, FLEET, listen, quiet_tick, window));
            eprintln!(
                "bench: idle rep {rep} listen {label}: {:.2} statements/s per runner, {:.3} writing transactions/s per runner, PG CPU {:.1} %",
                r.statements, r.writes, r.pg_cpu
            );
            runs.push(r);
        }
        let m = |f: fn(&Idle) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let (statements, pg_cpu) = (m(|r| r.statements), m(|r| r.pg_cpu));
        t.row(vec![
            label.into(),
            format!("{statements:.2}"),
            format!("{:.2}", m(|r| r.transactions)),
            format!("{:.3}", m(|r| r.writes)),
            format!("{pg_cpu:.1}"),
            format!("{:.1}", m(|r| r.client_cpu)),
            common::verdict(statements <= 1.05 && pg_cpu < 10.0),
        ]);
        if let Some(r) = runs.last() {
            breakdown.push_str(&format!("LISTEN {label}: {}", r.breakdown));
        }
    }
    let floor: Vec<f64> = (0..ctx.opts.reps)
        .map(|_| actix_rt::System::new().block_on(floor_once(ctx, FLEET, window)))
        .collect();
    eprintln!(
        "bench: idle floor (SELECT 1 once a second on {FLEET} connections): PG CPU {floor:.1?} %"
    );
    t.row(vec![
        format!("floor: {FLEET} connections, SELECT 1 once a second each"),
        "1.00".into(),
        "-".into(),
        "-".into(),
        format!("{:.1}", median(&floor)),
        "-".into(),
        "-".into(),
    ]);
    t.emit("load");
    if !breakdown.is_empty() {
        println!("{breakdown}");
    }
}

/// Statements (pg_stat_statements), transactions (`pg_stat_database`) and
/// transaction ids handed out so far.
async fn idle_snapshot(c: &Client, tracked: bool, calls_q: &str) -> (f64, f64, f64) {
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
    let row = c
        .query_one(
            "SELECT (SELECT xact_commit::float8 + xact_rollback::float8 FROM pg_stat_database
                      WHERE datname = current_database()),
                    pg_snapshot_xmax(pg_current_snapshot())::text::float8",
            &[],
        )
        .await
        .expect("transactions");
    (calls, row.get(0), row.get(1))
}

/// PostgreSQL's CPU (% of one core) while `n` connections each send
/// `SELECT 1` once a second, spread over the second.
async fn floor_once(ctx: &Ctx, n: usize, window: Duration) -> f64 {
    let postmaster = ctx.pg.pid().expect("postmaster");
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(common::connect(&ctx.url).await);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1).mul_f64(i as f64 / n as f64)).await;
                let mut every = tokio::time::interval(Duration::from_secs(1));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    every.tick().await;
                    let _ = c.simple_query("SELECT 1").await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pg0 = common::postgres_cpu_secs(postmaster);
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let pg_cpu = (common::postgres_cpu_secs(postmaster) - pg0) / t0.elapsed().as_secs_f64() * 100.0;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    join_all(loops).await;
    pg_cpu
}

async fn idle_once(
    ctx: &Ctx,
    n: usize,
    listen: bool,
    quiet_tick: Option<Duration>,
    window: Duration,
) -> Idle {
    let postmaster = ctx.pg.pid().expect("postmaster");
    let client = common::connect(&ctx.url).await;
    common::seed(&client, 0).await;
    let tracked = common::track_statements(&client, "top").await;
    let mut handles = Vec::new();
    for _ in 0..n {
        let mut config = RunnerConfig::builder("idle").listen(listen);
        if let Some(q) = quiet_tick {
            config = config.quiet_tick(q);
        }
        let config = config.build().expect("config");
        handles.push(noop_runner(&ctx.url, config).await);
    }
    wait_live_sessions(&client, n as i64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls_q = "SELECT coalesce(sum(calls), 0)::float8 FROM pg_stat_statements
                    WHERE query NOT ILIKE '%pg_stat%' AND query NOT ILIKE '%live_session%'
                      AND query NOT ILIKE '%pg_current_snapshot%'";
    let (c0, x0, w0) = idle_snapshot(&client, tracked, calls_q).await;
    let pg0 = common::postgres_cpu_secs(postmaster);
    let self0 = common::self_cpu_secs();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let (c1, x1, w1) = idle_snapshot(&client, tracked, calls_q).await;
    let secs = t0.elapsed().as_secs_f64();
    let pg_cpu = (common::postgres_cpu_secs(postmaster) - pg0) / secs * 100.0;
    let client_cpu = (common::self_cpu_secs() - self0) / secs * 100.0;
    let mut breakdown = String::new();
    if tracked {
        if let Ok(rows) = client
            .query(
                "SELECT calls::float8, left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
                   FROM pg_stat_statements
                  WHERE query NOT ILIKE '%pg_stat%' AND query NOT ILIKE '%live_session%'
                    AND query NOT ILIKE '%pg_current_snapshot%'
                  ORDER BY calls DESC LIMIT 6",
                &[],
            )
            .await
        {
            breakdown.push_str("statements by calls since tracking started:\n");
            for r in rows {
                let calls: f64 = r.get(0);
                let q: String = r.get(1);
                breakdown.push_str(&format!("  {calls:>8.0}  {q}\n"));
            }
        }
    }
    join_all(handles.iter().map(|h| h.stop())).await;
    common::track_statements(&client, "none").await;
    let per_runner = |d: f64| d / n as f64 / secs;
    Idle {
        statements: if tracked {
            per_runner(c1 - c0)
        } else {
            f64::NAN
        },
        // The snapshot reads are themselves transactions; negligible.
        transactions: per_runner(x1 - x0),
        writes: per_runner(w1 - w0),
        pg_cpu,
        client_cpu,
        breakdown,
    }
}
