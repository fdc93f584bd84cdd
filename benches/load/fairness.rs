//! Fairness (BENCHMARKS.md, benchmark 5): how evenly n sessions of one name
//! share a steady backlog, and how many ticks a joining session takes to
//! hold its share.
//!
//! n runners in one process (max_tasks 10, tick 200 ms, jitter 200 ms,
//! LISTEN off, failed tasks kept) with a Tasker that completes nothing, so
//! the backlog stays put and every tick is a chance to rebalance. After 2 s of settling, the
//! tasks held per live session are sampled every 200 ms for 2 s; then an
//! (n+1)th runner joins and its ticks are counted until it holds its fair
//! floor, for at most 5 s.
//!
//! What limits the figure: the shares themselves, which are whole tasks
//! (a spread of 1 is the best when n does not divide the backlog), and the
//! ticks it takes the others to give back their surplus and the joiner to
//! pick it up.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use session_lock::{FailedTasks, Progress, Runner, RunnerConfig, TaskId, TaskerError};
use session_lock_testkit::example::ExampleTask;

use crate::common::{self, Table, median, quantile};
use crate::{Ctx, store, wait_live_sessions};

pub(crate) fn run(ctx: &Ctx) {
    let ns = [2usize, 4, 8, 16];
    // Shares are weighted by capacity; every session here has capacity 10,
    // so under the cap each holds floor(open / live) or one more (the
    // remainder spread over the sessions, the newest always among those
    // with one more) and rounding decides who holds what; over it every
    // session should hold max_tasks.
    type Backlog = fn(usize) -> usize;
    let scenarios: Vec<(&str, Backlog)> = if ctx.opts.full {
        vec![
            ("7n+3 (under the cap)", |n| 7 * n + 3),
            ("10n+5 (over the cap)", |n| 10 * n + 5),
        ]
    } else {
        vec![("7n+3 (under the cap)", |n| 7 * n + 3)]
    };
    let mut t = Table::new(
        "Fairness: n sessions holding a steady backlog (a tasker that completes nothing), max_tasks 10, tick 200 ms. Spread = max - min tasks held across the live sessions, sampled every 200 ms for 2 s after 2 s of settling; best possible spread is 1 when n does not divide the backlog. Join = ticks of an (n+1)th session until it holds its fair floor, min(floor(backlog / (n+1)), 10) (shares are weighted by capacity, 10 for all here; the newest session's share is the ceiling, so it may settle one above its floor); 'not in 25' = not within 25 ticks (5 s), with what it held then",
        &[
            "backlog",
            "sessions",
            "tasks",
            "best spread",
            "spread p50",
            "spread max",
            "unheld tasks p50",
            "join: ticks to fair floor (median)",
            "join: s to fair floor (median)",
            "joiner held / fair floor",
        ],
    );
    for (label, backlog_of) in &scenarios {
        for &n in &ns {
            let backlog = backlog_of(n);
            let mut spreads = Vec::new();
            let mut unheld = Vec::new();
            let mut joins = Vec::new();
            let mut held = Vec::new();
            let floor = (backlog / (n + 1)).min(10);
            for _ in 0..ctx.opts.reps {
                let r = actix_rt::System::new().block_on(fairness_once(ctx, n, backlog, floor));
                spreads.extend(r.spreads);
                unheld.extend(r.unheld);
                joins.push(r.join);
                held.push(r.joiner_held as f64);
            }
            let best = if backlog % n == 0 || backlog >= 10 * n {
                0
            } else {
                1
            };
            let (ticks, times): (Vec<f64>, Vec<f64>) = joins.iter().flatten().copied().unzip();
            let (tk, secs) = if ticks.len() * 2 > joins.len() {
                (
                    format!("{:.0}", median(&ticks)),
                    format!("{:.2}", median(&times)),
                )
            } else {
                ("not in 25".to_owned(), "-".to_owned())
            };
            t.row(vec![
                label.to_string(),
                n.to_string(),
                backlog.to_string(),
                best.to_string(),
                format!("{:.0}", quantile(&spreads, 0.5)),
                format!("{:.0}", quantile(&spreads, 1.0)),
                format!("{:.0}", quantile(&unheld, 0.5)),
                tk,
                secs,
                format!("{:.0} / {floor}", median(&held)),
            ]);
        }
    }
    t.emit("load");
}

struct FairnessRun {
    spreads: Vec<f64>,
    unheld: Vec<f64>,
    /// The joiner's ticks and seconds until it held its fair floor; `None`
    /// when it did not within 5 s.
    join: Option<(f64, f64)>,
    joiner_held: usize,
}

fn fairness_config(name: &str) -> RunnerConfig {
    RunnerConfig::builder(name)
        .max_tasks(10)
        .tick(Duration::from_millis(200))
        .jitter(Duration::from_millis(200))
        .listen(false)
        // What the Tasker does not complete stays held, to run again: with
        // the default (give back, after a backoff) no session would hold
        // anything.
        .failed_tasks(FailedTasks::Keep)
        .build()
        .expect("config")
}

/// A tasker that holds its tasks: it completes none, so (kept) they stay
/// assigned and the backlog stays steady.
fn holding_tasker() -> impl session_lock::Tasker<ExampleTask> {
    |_tasks: Vec<ExampleTask>, _p: Progress| async { Ok::<Vec<TaskId>, TaskerError>(Vec::new()) }
}

async fn fairness_once(ctx: &Ctx, n: usize, backlog: usize, floor: usize) -> FairnessRun {
    let client = common::connect(&ctx.url).await;
    common::seed(&client, backlog as u64).await;
    let mut handles = Vec::new();
    for _ in 0..n {
        handles.push(
            Runner::new(
                fairness_config("fair"),
                store(&ctx.url).await,
                holding_tasker(),
            )
            .start(),
        );
    }
    wait_live_sessions(&client, n as i64, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut spreads = Vec::new();
    let mut unheld = Vec::new();
    for _ in 0..10 {
        let row = client
            .query_one(
                "WITH held AS (
                    SELECT l.id, count(t.id) AS n
                      FROM session_lock.live_session l
                      LEFT JOIN public.example_task t ON t.session_id = l.id AND t.finished_at IS NULL
                     WHERE l.name = 'fair'
                     GROUP BY l.id)
                 SELECT coalesce(max(n) - min(n), 0)::float8,
                        (SELECT count(*) FROM public.example_task WHERE session_id IS NULL AND finished_at IS NULL)::float8
                   FROM held",
                &[],
            )
            .await
            .expect("spread");
        spreads.push(row.get(0));
        unheld.push(row.get(1));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A session joins: ticks until it holds its fair floor.
    let joiner = Runner::new(
        fairness_config("fair"),
        store(&ctx.url).await,
        holding_tasker(),
    )
    .start();
    let t0 = Instant::now();
    let mut rx = joiner.subscribe();
    let got = session_lock_testkit::wait_for_status(&mut rx, Duration::from_secs(5), |s| {
        s.tasks_held >= floor && s.ticks > 0
    })
    .await;
    let join = got.map(|s| (s.ticks as f64, t0.elapsed().as_secs_f64()));
    let joiner_held = joiner.status().tasks_held;
    handles.push(joiner);
    join_all(handles.iter().map(|h| h.stop())).await;
    FairnessRun {
        spreads,
        unheld,
        join,
        joiner_held,
    }
}
