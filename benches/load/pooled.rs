//! Drain through PgBouncer (BENCHMARKS.md, benchmark 2, "through
//! PgBouncer"): the in-process drain of [`drain`](crate::drain), once
//! directly and once through a PgBouncer in transaction mode with its
//! default settings in front of the same server, back to back in each
//! repetition, so the ratio compares like moments. Skipped, saying so,
//! when `pgbouncer` is not installed.
//!
//! What the pooler adds: a hop per statement (client to PgBouncer to the
//! server and back) and PgBouncer's own CPU on the same 2 vCPUs.

use std::time::Duration;

use session_lock_testkit::pgbouncer::{PgBouncer, PgBouncerError};

use crate::Ctx;
use crate::common::{self, Table, median};
use crate::drain::drain_in_process;

pub(crate) fn run(ctx: &Ctx) {
    let mut bouncer = match PgBouncer::start(ctx.pg.host(), ctx.pg.port()) {
        Ok(b) => b,
        Err(e @ PgBouncerError::NotFound) => {
            eprintln!("bench: pooled skipped: {e}");
            return;
        }
        Err(e) => panic!("start pgbouncer: {e}"),
    };
    let dbname = ctx
        .url
        .rsplit('/')
        .next()
        .expect("the bench database's name");
    let pooled = bouncer.url(dbname);
    let runners = 4;
    let tasks = ctx.opts.tasks.min(50_000);
    let mut t = Table::new(
        "Drain through PgBouncer (transaction mode, default settings): in-process runners, tasks/s, median of repetitions; ratio = median of pooled / direct in the same repetition",
        &[
            "batch",
            "runners",
            "tasks",
            "direct",
            "through PgBouncer",
            "pooled / direct",
        ],
    );
    for batch in [10u32, 100] {
        let (mut direct, mut through, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..ctx.opts.reps {
            let d = drain(&ctx.url, &ctx.url, runners, batch, tasks);
            let p = drain(&ctx.url, &pooled, runners, batch, tasks);
            eprintln!(
                "bench: pooled rep {rep} batch={batch} runners={runners}: direct {d:.0} tasks/s, through PgBouncer {p:.0} tasks/s"
            );
            direct.push(d);
            through.push(p);
            ratios.push(p / d);
        }
        t.row(vec![
            batch.to_string(),
            runners.to_string(),
            tasks.to_string(),
            format!("{:.0}", median(&direct)),
            format!("{:.0}", median(&through)),
            format!("{:.0} %", median(&ratios) * 100.0),
        ]);
    }
    t.emit("load");
    bouncer.kill();
}

/// Reseeds the table (through `direct`) and drains it through `url`;
/// tasks/s on the database clock.
fn drain(direct: &str, url: &str, runners: usize, batch: u32, tasks: u64) -> f64 {
    actix_rt::System::new().block_on(async {
        let direct = common::connect(direct).await;
        common::seed(&direct, tasks).await;
        drain_in_process(url, runners, batch, tasks, Duration::from_secs(900)).await;
        crate::drain::drain_rate(&direct, None).await.1
    })
}
