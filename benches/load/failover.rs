//! Failover (BENCHMARKS.md, benchmark 4): how long the tasks of a runner
//! process killed with SIGKILL wait before they run again elsewhere and are
//! finished.
//!
//! Four runner processes (the example tasker with 100 ms of work a task,
//! max_tasks 10, tick 1 s, heartbeat TTL/4) on a backlog that keeps all four
//! at their cap; after 3 s one is killed. Its session id comes from its
//! stdout, the tasks it held from the table; times are seconds after the
//! kill: when its session was reclaimed, when each of its tasks first
//! started in another session, when each was finished.
//!
//! What limits the figure: the TTL, as designed (a survivor reclaims the
//! dead session on its first get_work after the lease runs out), plus the
//! survivors' next tick, 0.1 to 0.2 s while they work at their cap.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::{self, Table, median, quantile, verdict};
use crate::{Ctx, spawn_runners, stop_runners, wait_live_sessions};

pub(crate) fn run(ctx: &Ctx) {
    let ttls: Vec<u64> = if ctx.opts.full {
        vec![2, 5, 30]
    } else {
        vec![2, 5]
    };
    let tick_s = 1.0;
    let mut t = Table::new(
        "Failover: kill -9 one of 4 runner processes (s after the kill; per-task times pooled over repetitions, 'all' = median over repetitions of the last of the victim's tasks)",
        &[
            "TTL",
            "tasks held by victim",
            "session reclaimed (median)",
            "re-claimed p50 / p99 / all",
            "finished p50 / p99 / all",
            "target p99 <= TTL + tick + 1 s",
            "verdict (finished p99)",
        ],
    );
    for ttl in ttls {
        let mut reclaimed_at = Vec::new();
        let mut restarted = Vec::new();
        let mut finished = Vec::new();
        let mut last_restart = Vec::new();
        let mut last_finish = Vec::new();
        let mut held_counts = Vec::new();
        for rep in 0..ctx.opts.reps {
            let r = actix_rt::System::new().block_on(failover_once(ctx, ttl));
            eprintln!(
                "bench: failover rep {rep} ttl={ttl}s: {} tasks, reclaimed {}, last re-claim {:.2} s, last finish {:.2} s",
                r.held,
                r.session_reclaimed
                    .map_or("never".to_owned(), |s| format!("{s:.2} s")),
                quantile(&r.restarted, 1.0),
                quantile(&r.finished, 1.0)
            );
            held_counts.push(r.held as f64);
            reclaimed_at.push(r.session_reclaimed);
            last_restart.push(quantile(&r.restarted, 1.0));
            last_finish.push(quantile(&r.finished, 1.0));
            restarted.extend(r.restarted);
            finished.extend(r.finished);
        }
        let bound = ttl as f64 + tick_s + 1.0;
        let p99 = quantile(&finished, 0.99);
        t.row(vec![
            format!("{ttl} s"),
            format!("{:.0}", median(&held_counts)),
            reclaimed_cell(&reclaimed_at),
            format!(
                "{:.2} / {:.2} / {:.2}",
                quantile(&restarted, 0.5),
                quantile(&restarted, 0.99),
                median(&last_restart)
            ),
            format!(
                "{:.2} / {:.2} / {:.2}",
                quantile(&finished, 0.5),
                p99,
                median(&last_finish)
            ),
            format!("{bound:.0} s"),
            verdict(p99 <= bound),
        ]);
    }
    t.emit("load");
}

/// The median of the times the victim's session was reclaimed, and how
/// many repetitions it never was in.
fn reclaimed_cell(reclaimed_at: &[Option<f64>]) -> String {
    let reclaimed: Vec<f64> = reclaimed_at.iter().flatten().copied().collect();
    match reclaimed_at.len() - reclaimed.len() {
        0 => format!("{:.2}", median(&reclaimed)),
        _ if reclaimed.is_empty() => "never".to_owned(),
        never => format!(
            "{:.2} (never in {never} of {})",
            median(&reclaimed),
            reclaimed_at.len()
        ),
    }
}

struct FailoverRun {
    held: usize,
    /// Seconds after the kill; `None` when the session was not reclaimed.
    session_reclaimed: Option<f64>,
    restarted: Vec<f64>,
    finished: Vec<f64>,
}

async fn failover_once(ctx: &Ctx, ttl_s: u64) -> FailoverRun {
    let client = common::connect(&ctx.url).await;
    common::set_synchronous_commit(&client, true).await;
    // Enough backlog that every runner stays at its cap (10) throughout.
    common::seed(&client, 2_000 + 500 * (ttl_s + 10)).await;
    let ttl_ms = ttl_s * 1000;
    let args: Vec<String> = [
        "--name",
        "failover",
        "--max-tasks",
        "10",
        "--work-ms",
        "100",
        "--tick-ms",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--ttl-ms".to_string(),
        ttl_ms.to_string(),
        "--heartbeat-ms".to_string(),
        (ttl_ms / 4).to_string(),
    ])
    .collect();
    let mut runners = spawn_runners(&ctx.url, 4, &args);
    let victim = runners.processes()[0].pid();
    wait_live_sessions(&client, 4, Duration::from_secs(30)).await;
    // The victim's session id, from its stdout.
    tokio::time::timeout(Duration::from_secs(30), async {
        while runners.get(victim).is_some_and(|p| p.sessions().is_empty()) {
            runners.next_event().await;
        }
    })
    .await
    .expect("victim session id");
    // Let all four run at their cap for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    while runners.try_next_event().is_some() {}
    let victim = runners.get_mut(victim).expect("the victim");
    let victim_session = *victim.sessions().last().expect("victim session id");
    // Times count from the signal, not from the reaping.
    victim.signal(libc::SIGKILL).expect("SIGKILL the victim");
    let t_kill = now_epoch();
    victim.kill().expect("reap the victim");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let held: Vec<i64> = client
        .query(
            "SELECT id FROM public.example_task WHERE session_id = $1 AND finished_at IS NULL",
            &[&victim_session],
        )
        .await
        .expect("held")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(ttl_s + 60);
    loop {
        let open: i64 = client
            .query_one(
                "SELECT count(*) FROM public.example_task WHERE id = ANY ($1) AND finished_at IS NULL",
                &[&held],
            )
            .await
            .expect("open")
            .get(0);
        if open == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = client
        .query(
            "SELECT (SELECT extract(epoch FROM min(r.started_at))::float8 - $3
                       FROM public.example_task_run r
                      WHERE r.task_id = t.id AND r.session_id <> $2),
                    extract(epoch FROM t.finished_at)::float8 - $3
               FROM public.example_task t WHERE t.id = ANY ($1)",
            &[&held, &victim_session, &t_kill],
        )
        .await
        .expect("times");
    let never = (ttl_s + 60) as f64;
    let restarted = rows
        .iter()
        .map(|r| r.get::<_, Option<f64>>(0).unwrap_or(never))
        .collect();
    let finished = rows
        .iter()
        .map(|r| r.get::<_, Option<f64>>(1).unwrap_or(never))
        .collect();
    let session_reclaimed: Option<f64> = client
        .query_opt(
            "SELECT extract(epoch FROM reclaimed_at)::float8 - $2 FROM session_lock.session WHERE id = $1",
            &[&victim_session, &t_kill],
        )
        .await
        .expect("reclaimed_at")
        .and_then(|r| r.get(0));
    stop_runners(&mut runners).await;
    FailoverRun {
        held: held.len(),
        session_reclaimed,
        restarted,
        finished,
    }
}

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}
