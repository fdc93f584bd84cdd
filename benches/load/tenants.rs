//! Tenants (BENCHMARKS.md, benchmark 8): what round-robin pickup across
//! tenant groups costs, and what it buys.
//!
//! * Cost: one session's get_work at batch 10 on 1M open tasks spread over
//!   10,000 tenants, the table declared grouped by tenant and ungrouped,
//!   alternating in the same run (busy turns: after each timed call the
//!   session finishes its batch and as many tasks of random tenants are
//!   inserted, untimed, so the backlog stays put). Target: grouped p50
//!   within 1.5x of ungrouped.
//! * Starvation: one tenant of 1M tasks inserted before 100 tenants of 10;
//!   four runners in this process (batch 10) whose Tasker records when each
//!   tenant's first task starts and completes at once: the time until every
//!   small tenant has started. Ungrouped, their first task would wait for
//!   the million ahead of it; that wait is estimated from the rate measured.
//!
//! What limits the figures: a grouped pickup is one index probe per group
//! it takes (10 here), against one range scan; the starvation time is the
//! rounds it takes four sessions taking ten groups each to go round 101.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use session_lock::{
    Database, GetWork, Progress, Runner, RunnerConfig, SessionStart, TaskId, TaskerError,
};
use session_lock_testkit::example::ExampleTask;
use tokio_postgres::Client;

use crate::common::{self, Table, median, ms, quantile, verdict};
use crate::{Ctx, store};

/// Open tasks in both measurements.
const BACKLOG: i64 = 1_000_000;
/// Tenants of the cost measurement.
const TENANTS: i64 = 10_000;
/// Small tenants of the starvation measurement, and their tasks each.
const SMALL: i64 = 100;
const SMALL_TASKS: i64 = 10;

pub(crate) fn run(ctx: &Ctx) {
    let calls = if ctx.opts.full { 2000 } else { 500 };
    let cost = actix_rt::System::new().block_on(cost(ctx, calls));
    let mut t = Table::new(
        format!(
            "Tenants, cost: one session's get_work at batch 10 on {BACKLOG} open tasks over {TENANTS} tenants, grouped by tenant vs ungrouped, {calls} calls each per repetition, alternating (busy turns)"
        ),
        &[
            "declaration",
            "p50 ms",
            "p99 ms",
            "grouped / ungrouped p50",
            "target <= 1.5x",
        ],
    );
    let (plain_p50, grouped_p50) = (median(&cost.plain), median(&cost.grouped));
    t.row(vec![
        "ungrouped".into(),
        ms(plain_p50),
        ms(quantile(&cost.plain, 0.99)),
        String::new(),
        String::new(),
    ]);
    let ratio = grouped_p50 / plain_p50;
    t.row(vec![
        "grouped by tenant".into(),
        ms(grouped_p50),
        ms(quantile(&cost.grouped, 0.99)),
        format!("{ratio:.2}x"),
        verdict(ratio <= 1.5),
    ]);
    t.emit("load");

    let mut waits = Vec::new();
    let mut rates = Vec::new();
    for _ in 0..ctx.opts.reps {
        let s = actix_rt::System::new().block_on(starvation(ctx));
        waits.push(s.all_started);
        rates.push(s.rate);
    }
    let rate = median(&rates);
    let mut t = Table::new(
        format!(
            "Tenants, starvation: one tenant of {BACKLOG} tasks inserted before {SMALL} tenants of {SMALL_TASKS}, 4 runners in one process at batch 10, a Tasker that completes at once: time until every small tenant's first task started (median of {} runs)",
            ctx.opts.reps
        ),
        &[
            "pickup",
            "every small tenant started after",
            "tasks/s while draining",
        ],
    );
    t.row(vec![
        "grouped by tenant (round-robin)".into(),
        format!("{:.2} s", median(&waits)),
        format!("{rate:.0}"),
    ]);
    t.row(vec![
        "ungrouped (in order), estimated".into(),
        format!(
            "{:.0} s (the {BACKLOG} tasks ahead at that rate)",
            BACKLOG as f64 / rate
        ),
        String::new(),
    ]);
    t.emit("load");
}

struct Cost {
    plain: Vec<f64>,
    grouped: Vec<f64>,
}

async fn declare(client: &Client, grouped: bool) {
    let sql = if grouped {
        "SELECT session_lock.declare_task_table('public.example_task', finished_by => 'finished_by', group_by => 'tenant')"
    } else {
        "SELECT session_lock.declare_task_table('public.example_task', finished_by => 'finished_by')"
    };
    client.batch_execute(sql).await.expect("declare");
    client
        .batch_execute("ANALYZE public.example_task")
        .await
        .expect("analyze");
}

async fn cost(ctx: &Ctx, calls: usize) -> Cost {
    let client = common::connect(&ctx.url).await;
    common::seed_tenants(&client, BACKLOG as u64, &format!("'t' || (g % {TENANTS})")).await;
    let store = store(&ctx.url).await;
    let mut out = Cost {
        plain: Vec::new(),
        grouped: Vec::new(),
    };
    for _ in 0..ctx.opts.reps {
        for grouped in [false, true] {
            declare(&client, grouped).await;
            let session = store
                .start_session(&SessionStart::new("tenants", Duration::from_secs(600), 10))
                .await
                .expect("session");
            for _ in 0..calls {
                let t0 = Instant::now();
                let work = store
                    .get_work::<ExampleTask>(GetWork::new(&session))
                    .await
                    .expect("get_work");
                let elapsed = t0.elapsed().as_secs_f64() * 1e3;
                if grouped {
                    out.grouped.push(elapsed);
                } else {
                    out.plain.push(elapsed);
                }
                let ids: Vec<TaskId> = work.tasks.iter().map(|t| t.id).collect();
                client
                    .execute(
                        &format!(
                            "WITH f AS (SELECT * FROM session_lock.example_task_finish_tasks($1, $2, $3))
                             INSERT INTO public.example_task (payload, tenant)
                             SELECT 'noop', 't' || (random() * {TENANTS})::int FROM f"
                        ),
                        &[&session.id, &session.token, &ids],
                    )
                    .await
                    .expect("finish and replace");
            }
            store.end_session(&session).await.expect("end");
        }
    }
    // Back to the worked example's declaration.
    declare(&client, true).await;
    out
}

struct Starvation {
    /// Seconds until every small tenant's first task started.
    all_started: f64,
    /// Tasks finished per second meanwhile.
    rate: f64,
}

async fn starvation(ctx: &Ctx) -> Starvation {
    let client = common::connect(&ctx.url).await;
    common::seed_tenants(&client, BACKLOG as u64, "'big'").await;
    client
        .execute(
            &format!(
                "INSERT INTO public.example_task (payload, tenant)
                 SELECT 'noop', 'small-' || lpad((g % {SMALL})::text, 3, '0')
                   FROM generate_series(1, {}) g",
                SMALL * SMALL_TASKS
            ),
            &[],
        )
        .await
        .expect("seed the small tenants");
    declare(&client, true).await;
    let started: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let t0 = Instant::now();
    let mut runners = Vec::new();
    for _ in 0..4 {
        let started = started.clone();
        let tasker = move |tasks: Vec<ExampleTask>, _progress: Progress| {
            let mut s = started.lock().unwrap();
            for t in &tasks {
                if let Some(tenant) = t.tenant.as_deref().filter(|t| t.starts_with("small")) {
                    s.entry(tenant.to_owned()).or_insert_with(Instant::now);
                }
            }
            let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
            std::future::ready(Ok::<_, TaskerError>(ids))
        };
        let config = RunnerConfig::builder("tenants")
            .max_tasks(10)
            .tick(Duration::from_millis(100))
            .jitter(Duration::ZERO)
            .listen(false)
            .build()
            .expect("config");
        runners.push(Runner::new(config, store(&ctx.url).await, tasker).start());
    }
    let deadline = t0 + Duration::from_secs(300);
    let all_started = loop {
        {
            let s = started.lock().unwrap();
            if s.len() as i64 == SMALL {
                let last = s.values().max().copied().expect("every small tenant");
                break last.duration_since(t0).as_secs_f64();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the small tenants did not all start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let finished: i64 = client
        .query_one(
            "SELECT count(*) FROM public.example_task WHERE finished_at IS NOT NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    for r in &runners {
        r.stop().await;
    }
    Starvation {
        all_started,
        rate: finished as f64 / elapsed,
    }
}
