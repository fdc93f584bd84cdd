//! The gauges actor: every `stats_interval`, one call of the task table's
//! `stats` records what no tick sees: the session's held tasks per group,
//! and the table's quarantined and suspect tasks.
//!
//! What it keeps true:
//! - Cardinality stays bounded: a reading names at most [`STATS_GROUPS`]
//!   groups (those the session holds most of), the rest are one `(other)`,
//!   and a group named before but not now reads 0 rather than keeping a
//!   count the session no longer holds.
//! - It only reads: one indexed query, at most one in flight, bounded by
//!   the heartbeat timeout; a failure is logged and the next interval
//!   tries again. Without a session it records nothing.
//! - Replicas do not read in step: the first reading comes after a random
//!   offset within the interval.

use std::marker::PhantomData;
use std::sync::Arc;

use actix::prelude::*;

use crate::backoff::process_seed;
use crate::catch::{bounded, caught};
use crate::config::RunnerConfig;
use crate::status::StatusTx;
use crate::store::{Database, DbFinder};
use crate::task::ScanTask;
use crate::telemetry::Metrics;

/// How many groups one reading names.
pub(crate) const STATS_GROUPS: u32 = 10;

pub(crate) struct Gauges<T: ScanTask, F: DbFinder> {
    config: Arc<RunnerConfig>,
    finder: Arc<F>,
    status: StatusTx,
    metrics: Metrics,
    /// The groups the last reading named, to be read as 0 when they go.
    named: Vec<String>,
    running: bool,
    _task: PhantomData<fn() -> T>,
}

impl<T: ScanTask, F: DbFinder> Gauges<T, F> {
    pub(crate) fn new(
        config: Arc<RunnerConfig>,
        finder: Arc<F>,
        status: StatusTx,
        metrics: Metrics,
    ) -> Self {
        Gauges {
            config,
            finder,
            status,
            metrics,
            named: Vec::new(),
            running: false,
            _task: PhantomData,
        }
    }

    fn read(&mut self, ctx: &mut Context<Self>) {
        let Some(id) = self.status.borrow().session else {
            return;
        };
        if self.running {
            return;
        }
        self.running = true;
        let finder = self.finder.clone();
        let fut = caught(bounded(self.config.heartbeat_timeout, async move {
            let db = finder.find().await?;
            db.task_stats::<T>(id, STATS_GROUPS).await
        }));
        let runner = self.config.name.clone();
        ctx.spawn(fut.into_actor(self).map(move |res, act, _| {
            act.running = false;
            match res {
                Ok(Some(stats)) => act.named = act.metrics.task_stats(&stats, &act.named),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(%runner, error = %e, "reading the task gauges failed; the next interval tries again")
                }
            }
        }));
    }
}

impl<T: ScanTask, F: DbFinder> Actor for Gauges<T, F> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let interval = self.config.stats_interval;
        let seed = self.config.jitter_seed.unwrap_or_else(process_seed) ^ 0x9a06;
        let offset = interval.mul_f64(fastrand::Rng::with_seed(seed).f64());
        ctx.run_later(offset, move |act, ctx| {
            act.read(ctx);
            ctx.run_interval(interval, |act, ctx| act.read(ctx));
        });
    }
}

impl<T: ScanTask, F: DbFinder> Supervised for Gauges<T, F> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.running = false;
    }
}
