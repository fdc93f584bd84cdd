//! Pickup latency (BENCHMARKS.md, benchmark 3): from a task's INSERT to the
//! moment an idle runner's Tasker starts it, woken by LISTEN/NOTIFY and by
//! its tick alone.
//!
//! One idle runner (tick 1 s, no jitter) on an empty table; the bench
//! inserts one task at a time at random gaps, so inserts land at every
//! phase of the tick. The latency runs from the task's `created_at` (the
//! inserting transaction's `now()`) to the wall clock read in the Tasker:
//! both this machine's one real-time clock.
//!
//! What limits the figure: with NOTIFY, a handful of wake-ups (the insert's
//! commit, the notification, the listener waking the fetcher, one get_work
//! round trip and commit, a hop to a worker thread), each of which can wait
//! for the scheduler's tick on a busy machine; on the tick alone, the tick,
//! as designed (uniform over its 1 s).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use session_lock::{Progress, Runner, RunnerConfig, TaskId, TaskerError};
use session_lock_testkit::example::ExampleTask;

use crate::common::{self, Table, ms, quantile, verdict};
use crate::{Ctx, store};

pub(crate) fn run(ctx: &Ctx) {
    let samples = |listen: bool| match (ctx.opts.full, listen) {
        (true, _) => 100,
        (false, true) => 40,
        (false, false) => 20,
    };
    let mut t = Table::new(
        "Pickup latency: INSERT to execution start on an idle runner (ms; all repetitions pooled)",
        &[
            "wake-up", "tick", "samples", "p50", "p90", "p99", "max", "target", "verdict",
        ],
    );
    for listen in [true, false] {
        let mut all = Vec::new();
        for rep in 0..ctx.opts.reps {
            let xs = actix_rt::System::new().block_on(pickup_once(ctx, listen, samples(listen)));
            eprintln!(
                "bench: pickup rep {rep} listen={listen}: p50 {:.1} ms p99 {:.1} ms",
                quantile(&xs, 0.5),
                quantile(&xs, 0.99)
            );
            all.extend(xs);
        }
        let p50 = quantile(&all, 0.5);
        t.row(vec![
            if listen {
                "LISTEN/NOTIFY + tick"
            } else {
                "tick alone"
            }
            .into(),
            "1 s".into(),
            all.len().to_string(),
            ms(p50),
            ms(quantile(&all, 0.9)),
            ms(quantile(&all, 0.99)),
            ms(quantile(&all, 1.0)),
            if listen { "p50 <= 10 ms" } else { "(none)" }.into(),
            if listen {
                verdict(p50 <= 10.0)
            } else {
                "-".into()
            },
        ]);
    }
    t.emit("load");
}

async fn pickup_once(ctx: &Ctx, listen: bool, samples: usize) -> Vec<f64> {
    let client = common::connect(&ctx.url).await;
    common::seed(&client, 0).await;
    let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let rec = lat.clone();
    // Execution start: the wall clock when the tasker is called, against the
    // task's created_at (now() of the inserting transaction), both read from
    // this machine's one real-time clock.
    let tasker = move |tasks: Vec<ExampleTask>, _p: Progress| {
        let now = SystemTime::now();
        let mut ids = Vec::with_capacity(tasks.len());
        {
            let mut rec = rec.lock().unwrap_or_else(|e| e.into_inner());
            for t in &tasks {
                let d = now.duration_since(t.created_at).unwrap_or(Duration::ZERO);
                rec.push(d.as_secs_f64() * 1e3);
                ids.push(t.id);
            }
        }
        async move { Ok::<Vec<TaskId>, TaskerError>(ids) }
    };
    let config = RunnerConfig::builder("pickup")
        .listen(listen)
        .jitter(Duration::ZERO)
        .build()
        .expect("config");
    let runner = Runner::new(config, store(&ctx.url).await, tasker).start();
    let mut status = runner.subscribe();
    session_lock_testkit::wait_for_status(&mut status, Duration::from_secs(10), |s| s.ticks > 0)
        .await
        .expect("runner ticked");
    // Random gaps, so inserts land at every phase of the tick.
    let mut rng = fastrand::Rng::with_seed(42 + listen as u64);
    for _ in 0..samples {
        let gap = if listen {
            rng.u64(50..300)
        } else {
            rng.u64(200..1200)
        };
        tokio::time::sleep(Duration::from_millis(gap)).await;
        client
            .execute(
                "INSERT INTO public.example_task (payload) VALUES ('pickup')",
                &[],
            )
            .await
            .expect("insert");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while lat.lock().map(|v| v.len()).unwrap_or(0) < samples && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runner.stop().await;
    lat.lock().unwrap_or_else(|e| e.into_inner()).clone()
}
