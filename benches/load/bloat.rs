//! A deep queue under a long transaction (BENCHMARKS.md, benchmark 11):
//! what a snapshot held open elsewhere does to get_work while a steady
//! stream drains, and how long the figures take to recover once it goes.
//!
//! 1M open tasks, kept there: four sessions of one name at the default
//! max_tasks (10) loop as a drain-mode runner does (get_work finishing the
//! previous batch, a sweep once a second), each inserting as many new tasks
//! as it finished. First an undisturbed stretch; then another connection
//! opens a `REPEATABLE READ` transaction, takes its snapshot and stays
//! idle in it, so no dead row or index entry made from then on can be
//! removed; then it commits, and the drain goes on. Per minute: tasks/s
//! and get_work p50 / p99; and, from 10 s windows, how long after the
//! release throughput and p99 are back (p99 within 1.2x of the undisturbed
//! one, throughput at 90 % of it).
//!
//! Long (about 16 minutes with the defaults), so it runs only when named:
//! `cargo bench --bench load -- bloat [--minutes N]` (N minutes with the
//! snapshot held, default 10).
//!
//! Targets (the issue's): p99 within 2x of the undisturbed run while the
//! snapshot is held, and throughput never below 50 % of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use session_lock::SessionStart;

use crate::Ctx;
use crate::common::{self, Table, quantile};

const SESSIONS: usize = 4;
const BATCH: u32 = 10;
const BACKLOG: u64 = 1_000_000;
const UNDISTURBED: Duration = Duration::from_secs(60);
const AFTER: Duration = Duration::from_secs(300);
const WINDOW: f64 = 10.0;

/// One get_work: seconds since the start, its latency in ms, tasks it
/// finished.
type Call = (f64, f64, u32);

pub(crate) fn run(ctx: &Ctx) {
    let held = Duration::from_secs(60 * ctx.opts.minutes);
    let calls = actix_rt::System::new().block_on(drain(ctx, held));
    report(&calls, held);
}

async fn drain(ctx: &Ctx, held: Duration) -> Vec<Call> {
    let admin = common::connect(&ctx.url).await;
    eprintln!("bench: bloat: seeding {BACKLOG} open tasks");
    common::seed(&admin, BACKLOG).await;
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..SESSIONS {
        let (url, stop) = (ctx.url.clone(), stop.clone());
        clients.push(actix_rt::spawn(
            async move { client(&url, &stop, t0).await },
        ));
    }
    tokio::time::sleep(UNDISTURBED).await;
    let holder = common::connect(&ctx.url).await;
    holder
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM session_lock.session",
        )
        .await
        .expect("hold a snapshot");
    eprintln!(
        "bench: bloat: snapshot held at {:.0} s for {} s",
        t0.elapsed().as_secs_f64(),
        held.as_secs()
    );
    tokio::time::sleep(held).await;
    holder.batch_execute("COMMIT").await.expect("release");
    eprintln!(
        "bench: bloat: snapshot released at {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    tokio::time::sleep(AFTER).await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = Vec::new();
    for c in clients {
        calls.extend(c.await.expect("bloat client"));
    }
    calls.sort_by(|a, b| a.0.total_cmp(&b.0));
    calls
}

/// A drain-mode runner's loop (a sweep once a second), recording every
/// call.
async fn client(url: &str, stop: &AtomicBool, t0: Instant) -> Vec<Call> {
    let start = SessionStart::new("bloat", Duration::from_secs(3600), BATCH);
    let mut calls = Vec::new();
    crate::steady_drain(
        url,
        start,
        Some(Duration::from_secs(1)),
        stop,
        |started, took, n| {
            calls.push((
                (started - t0).as_secs_f64(),
                took.as_secs_f64() * 1e3,
                n as u32,
            ))
        },
    )
    .await;
    calls
}

/// tasks/s, p50 and p99 of the calls that started in [from, to).
fn figures(calls: &[Call], from: f64, to: f64) -> (f64, f64, f64) {
    let slice: Vec<&Call> = calls.iter().filter(|c| c.0 >= from && c.0 < to).collect();
    let lat: Vec<f64> = slice.iter().map(|c| c.1).collect();
    let tasks: u64 = slice.iter().map(|c| c.2 as u64).sum();
    if lat.is_empty() {
        return (0.0, f64::NAN, f64::NAN);
    }
    (
        tasks as f64 / (to - from),
        quantile(&lat, 0.5),
        quantile(&lat, 0.99),
    )
}

fn report(calls: &[Call], held: Duration) {
    let undisturbed_end = UNDISTURBED.as_secs_f64();
    let release = undisturbed_end + held.as_secs_f64();
    let end = calls.last().map(|c| c.0).unwrap_or(0.0);
    // The undisturbed figures: its last 45 s (the first 15 s warm up).
    let base = figures(calls, undisturbed_end - 45.0, undisturbed_end);
    let mut t = Table::new(
        format!(
            "A deep queue under a held snapshot: {SESSIONS} sessions at max_tasks {BATCH}, {BACKLOG} open tasks kept steady, snapshot held {} min (per minute; get_work in ms)",
            held.as_secs() / 60
        ),
        &[
            "minute",
            "snapshot",
            "tasks/s",
            "of undisturbed",
            "get_work p50",
            "p99",
            "p99 / undisturbed p99",
        ],
    );
    let mut worst_rate = f64::INFINITY;
    let mut worst_p99 = 0.0f64;
    let mut minute = 0.0;
    while minute + 60.0 <= end + 1.0 {
        let (rate, p50, p99) = figures(calls, minute, minute + 60.0);
        let phase = if minute + 60.0 <= undisturbed_end {
            "none"
        } else if minute >= undisturbed_end && minute + 60.0 <= release {
            worst_rate = worst_rate.min(rate / base.0);
            worst_p99 = worst_p99.max(p99 / base.2);
            "held"
        } else {
            "released"
        };
        t.row(vec![
            format!("{}", (minute / 60.0) as u32 + 1),
            phase.into(),
            format!("{rate:.0}"),
            format!("{:.0} %", rate / base.0 * 100.0),
            common::ms(p50),
            common::ms(p99),
            format!("{:.2}x", p99 / base.2),
        ]);
        minute += 60.0;
    }
    // Recovery: the first 10 s window after the release from which every
    // window is back.
    let mut recovered = None;
    let mut w = release;
    while w + WINDOW <= end {
        let (rate, _, p99) = figures(calls, w, w + WINDOW);
        let back = rate >= 0.9 * base.0 && p99 <= 1.2 * base.2;
        match (back, recovered) {
            (true, None) => recovered = Some(w - release),
            (false, Some(_)) => recovered = None,
            _ => {}
        }
        w += WINDOW;
    }
    t.emit("load");
    let mut targets = Table::new(
        format!(
            "Held snapshot targets (undisturbed: {:.0} tasks/s, p50 {} ms, p99 {} ms)",
            base.0,
            common::ms(base.1),
            common::ms(base.2)
        ),
        &["target", "figure", "verdict"],
    );
    targets.row(vec![
        "p99 within 2x of undisturbed while held (worst minute)".into(),
        format!("{worst_p99:.2}x"),
        common::verdict(worst_p99 <= 2.0),
    ]);
    targets.row(vec![
        "throughput never below 50 % while held (worst minute)".into(),
        format!("{:.0} %", worst_rate * 100.0),
        common::verdict(worst_rate >= 0.5),
    ]);
    targets.row(vec![
        "back after the release (tasks/s >= 90 %, p99 <= 1.2x, 10 s windows)".into(),
        recovered
            .map(|s| format!("after {s:.0} s"))
            .unwrap_or_else(|| "not within the run".into()),
        "-".into(),
    ]);
    targets.emit("load");
}
