//! Footprint (BENCHMARKS.md, benchmark 7): what one runner process costs
//! while it drains, read from the drain's multi-process runs: its peak RSS
//! (`VmHWM`) and its CPU (`utime + stime`) just before it is stopped, and
//! PostgreSQL's CPU over the same run, per 1,000 tasks.
//!
//! What limits the figure: the runner's CPU is spent per tick, not per
//! task, so it falls with the batch size; PostgreSQL spends several times
//! what the runner does. RSS is the runtime and the pool, flat with the
//! batch size and the backlog.

use crate::common::{Table, median};
use crate::drain::{DrainRun, Mode};

pub(crate) fn report(runs: &[DrainRun]) {
    let mut t = Table::new(
        "Runner process footprint during the drain (median of repetitions)",
        &[
            "sync commit",
            "batch",
            "runner processes",
            "peak RSS per runner (MiB)",
            "runner CPU s per 1k tasks (all runners)",
            "PostgreSQL CPU s per 1k tasks",
        ],
    );
    let mut keys: Vec<(bool, u32, usize)> = runs
        .iter()
        .filter(|r| r.mode == Mode::Processes)
        .map(|r| (r.sync, r.batch, r.runners))
        .collect();
    keys.sort();
    keys.dedup();
    keys.reverse();
    for (sync, batch, n) in keys {
        let sel: Vec<&DrainRun> = runs
            .iter()
            .filter(|r| {
                r.mode == Mode::Processes && r.sync == sync && r.batch == batch && r.runners == n
            })
            .collect();
        let per_k = |f: &dyn Fn(&DrainRun) -> f64| {
            median(
                &sel.iter()
                    .map(|r| f(r) / (r.tasks.max(1) as f64) * 1000.0)
                    .collect::<Vec<_>>(),
            )
        };
        t.row(vec![
            if sync { "on" } else { "off" }.into(),
            batch.to_string(),
            n.to_string(),
            format!(
                "{:.1}",
                median(&sel.iter().map(|r| r.peak_rss_mib).collect::<Vec<_>>())
            ),
            format!("{:.4}", per_k(&|r| r.client_cpu)),
            format!("{:.4}", per_k(&|r| r.pg_cpu)),
        ]);
    }
    t.emit("load");
}
