//! The reaper: a periodic job that deletes sessions reclaimed long ago, so
//! the session table does not grow forever (the seed's did).
//!
//! It runs on its interval from a random offset, so replicas do not reap in
//! step; every replica may run it, the SQL is idempotent. Stopping the
//! runner's arbiter stops it.

use std::sync::Arc;

use actix::prelude::*;

use crate::backoff::process_seed;
use crate::catch::{bounded, caught};
use crate::config::RunnerConfig;
use crate::store::{Database, DbFinder};

pub(crate) struct Reaper<F: DbFinder> {
    config: Arc<RunnerConfig>,
    finder: Arc<F>,
    running: bool,
}

impl<F: DbFinder> Reaper<F> {
    pub(crate) fn new(config: Arc<RunnerConfig>, finder: Arc<F>) -> Self {
        Reaper {
            config,
            finder,
            running: false,
        }
    }

    fn reap(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            return;
        }
        self.running = true;
        let finder = self.finder.clone();
        let age = self.config.reap_after;
        let runner = self.config.name.clone();
        let fut = caught(bounded(self.config.ttl, async move {
            let db = finder.find().await?;
            db.reap_sessions(age).await
        }));
        ctx.spawn(fut.into_actor(self).map(move |res, act, _| {
            act.running = false;
            match res {
                Ok(0) => {}
                Ok(n) => tracing::info!(%runner, reaped = n, "deleted long-dead sessions"),
                Err(e) => {
                    tracing::debug!(%runner, error = %e, "reaping failed; next interval retries")
                }
            }
        }));
    }
}

impl<F: DbFinder> Actor for Reaper<F> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let interval = self.config.reap_interval;
        let seed = self.config.jitter_seed.unwrap_or_else(process_seed) ^ 0x4ea9;
        let offset = interval.mul_f64(fastrand::Rng::with_seed(seed).f64());
        ctx.run_later(offset, move |act, ctx| {
            act.reap(ctx);
            ctx.run_interval(interval, |act, ctx| act.reap(ctx));
        });
    }
}

impl<F: DbFinder> Supervised for Reaper<F> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.running = false;
    }
}
