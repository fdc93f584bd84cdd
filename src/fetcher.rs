//! The fetcher actor: ticks, gets the session's work, hands it to the
//! worker pool, and finishes exactly the tasks that completed.
//!
//! Ticks never overlap: a tick is one future, and the next is scheduled only
//! when it is done. A tick that filled its whole share starts the next at
//! once (drain mode); a notification on the task table's channel wakes an
//! idle fetcher without waiting for the tick. When the session is fenced or
//! lost, the batch in flight is stopped; when the runner stops, no new tick
//! starts and the one in flight is drained.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use futures_util::FutureExt;
use futures_util::future::{AbortHandle, join_all};
use tokio::sync::oneshot;
use tracing::{Instrument, Span, field};

use crate::backoff::{Backoff, process_seed};
use crate::catch::{bounded, caught, panic_message};
use crate::config::RunnerConfig;
use crate::error::Error;
use crate::session::{Lease, LeaseChanged, Lost, Renewed, SessionActor};
use crate::status::StatusTx;
use crate::store::{Database, DbFinder, SessionId, WorkGet};
use crate::task::{ScanTask, TaskId};
use crate::tasker::Tasker;
use crate::telemetry::{Metrics, SPAN_FINISH, SPAN_GET_WORK, SPAN_RUN_TASKS, SPAN_TICK};
use crate::workers::{RunSlice, SliceOutcome, Worker};

/// New tasks may be waiting: tick now if idle.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Wake;

/// Stop ticking and let the tick in flight finish, stopping its tasks after
/// `timeout`; replies when no tick is in flight.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Drain {
    pub(crate) timeout: Duration,
}

type Aborts = Arc<Mutex<Vec<AbortHandle>>>;

pub(crate) struct Fetcher<T: ScanTask, K: Tasker<T>, F: DbFinder> {
    config: Arc<RunnerConfig>,
    finder: Arc<F>,
    status: StatusTx,
    metrics: Metrics,
    session: Addr<SessionActor<F>>,
    workers: Arc<[Addr<Worker<T, K>>]>,
    lease: Option<Lease>,
    ticking: bool,
    stopping: bool,
    wake_pending: bool,
    next_tick: Option<SpawnHandle>,
    in_flight: Option<Aborts>,
    /// Completed tasks not yet finished: deferred by drain mode so that the
    /// next tick's get_work finishes them in the same call, or left over
    /// from a finish that failed on a transient error. Finished first thing
    /// next tick if the session is still the same (otherwise they are
    /// lost to the old session, and run again: at-least-once).
    to_finish: Option<(SessionId, Vec<TaskId>)>,
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// A finish of the carried tasks is in flight (on stop).
    flushing: bool,
    backoff: Backoff,
    rng: fastrand::Rng,
    seed: u64,
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> Fetcher<T, K, F> {
    pub(crate) fn new(
        config: Arc<RunnerConfig>,
        finder: Arc<F>,
        status: StatusTx,
        metrics: Metrics,
        session: Addr<SessionActor<F>>,
        workers: Arc<[Addr<Worker<T, K>>]>,
    ) -> Self {
        let seed = config.jitter_seed.unwrap_or_else(process_seed);
        Fetcher {
            backoff: Backoff::new(config.retry_max, seed ^ 0xfe7c),
            rng: fastrand::Rng::with_seed(seed),
            seed,
            config,
            finder,
            status,
            metrics,
            session,
            workers,
            lease: None,
            ticking: false,
            stopping: false,
            wake_pending: false,
            next_tick: None,
            in_flight: None,
            to_finish: None,
            drain_waiters: Vec::new(),
            flushing: false,
        }
    }

    fn schedule(&mut self, ctx: &mut Context<Self>, delay: Duration) {
        if let Some(handle) = self.next_tick.take() {
            ctx.cancel_future(handle);
        }
        if self.stopping {
            return;
        }
        self.next_tick = Some(if delay.is_zero() {
            // Not run_later(ZERO): a timer fires on the next 1 ms timer tick,
            // which cost a draining runner about 1 ms per tick. A ready
            // future runs on the context's next poll.
            ctx.spawn(actix::ActorFutureExt::map(
                actix::fut::ready(()),
                |(), act: &mut Self, ctx| act.tick(ctx),
            ))
        } else {
            ctx.run_later(delay, |act, ctx| act.tick(ctx))
        });
    }

    fn abort_in_flight(&self) {
        if let Some(aborts) = &self.in_flight {
            for handle in aborts.lock().unwrap_or_else(PoisonError::into_inner).iter() {
                handle.abort();
            }
        }
    }

    /// On stop: finishes the completed tasks still carried for the next
    /// tick (if the session is still usable), then releases whoever waits
    /// for the drain.
    fn flush_then_release_drain(&mut self, ctx: &mut Context<Self>) {
        let carried = match (self.to_finish.take(), self.lease) {
            (Some((session, ids)), Some(lease)) if session == lease.session && !ids.is_empty() => {
                Some((session, ids))
            }
            _ => None,
        };
        let Some((session, ids)) = carried else {
            self.release_drain_waiters();
            return;
        };
        let finder = self.finder.clone();
        // Bounded like every database step of a tick: a stop must end even
        // when the database (or a DbFinder) never answers.
        let fut = caught(bounded(self.config.ttl, async move {
            let db = finder.find().await?;
            db.tasks_finish::<T>(session, &ids)
                .await
                .map(|done| (done.len(), ids.len()))
        }));
        self.flushing = true;
        ctx.spawn(fut.into_actor(self).map(|res, act, _| {
            act.flushing = false;
            match res {
                Ok((done, asked)) => {
                    act.metrics.completed(done);
                    act.metrics.rejected(asked - done);
                    act.status.send_modify(|s| {
                        s.finished += done as u64;
                        s.rejected += (asked - done) as u64;
                    });
                }
                Err(e) => {
                    tracing::warn!(runner = %act.config.name, error = %e, "cannot finish the last batch on stop; its tasks will run again");
                }
            }
            act.release_drain_waiters();
        }));
    }

    fn release_drain_waiters(&mut self) {
        for w in self.drain_waiters.drain(..) {
            let _ = w.send(());
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.next_tick = None;
        if self.stopping || self.ticking {
            return;
        }
        // Without a usable session there is nothing to do; the next
        // LeaseChanged starts ticking again.
        let Some(lease) = self.lease else {
            return;
        };
        self.ticking = true;
        self.wake_pending = false;
        let aborts: Aborts = Arc::default();
        self.in_flight = Some(aborts.clone());
        let to_finish = match self.to_finish.take() {
            Some((session, ids)) if session == lease.session => ids,
            _ => Vec::new(),
        };
        let span = tracing::info_span!(
            SPAN_TICK,
            otel.name = SPAN_TICK,
            otel.kind = "internal",
            session_lock.runner = %self.config.name,
            session_lock.session.id = lease.session,
            session_lock.tasks.fetched = field::Empty,
            session_lock.tasks.completed = field::Empty,
            session_lock.tasks.failed = field::Empty,
            otel.status_code = field::Empty,
            error.message = field::Empty,
        );
        let tick = TickRun::<T, K, F> {
            config: self.config.clone(),
            finder: self.finder.clone(),
            session_actor: self.session.clone(),
            workers: self.workers.clone(),
            session: lease.session,
            aborts,
            to_finish,
        };
        let started = Instant::now();
        let fut = AssertUnwindSafe(tick.run().instrument(span.clone())).catch_unwind();
        ctx.spawn(
            fut.into_actor(self)
                .map(move |res, act, ctx| act.tick_done(ctx, res, started, span)),
        );
    }

    fn tick_done(
        &mut self,
        ctx: &mut Context<Self>,
        res: Result<TickReport, Box<dyn std::any::Any + Send>>,
        started: Instant,
        span: Span,
    ) {
        self.ticking = false;
        self.in_flight = None;
        let mut panicked = false;
        let report = res.unwrap_or_else(|panic| {
            panicked = true;
            TickReport {
                error: Some(Error::Panicked(panic_message(&panic))),
                ..TickReport::default()
            }
        });
        let elapsed = started.elapsed();
        self.metrics.tick(elapsed.as_secs_f64());
        self.metrics.fetched(report.fetched);
        self.metrics.completed(report.finished);
        self.metrics.failed(report.failed);
        self.metrics.rejected(report.rejected);
        self.metrics.held(report.held);
        span.record("session_lock.tasks.fetched", report.fetched as i64);
        span.record("session_lock.tasks.completed", report.finished as i64);
        span.record("session_lock.tasks.failed", report.failed as i64);
        if let Some(e) = &report.error {
            span.record("otel.status_code", "ERROR");
            span.record("error.message", field::display(e));
            tracing::warn!(parent: &span, runner = %self.config.name, error = %e, "tick failed");
        } else if let Some(e) = &report.task_error {
            span.record("otel.status_code", "ERROR");
            span.record("error.message", field::display(e));
        }
        if let Some(ids) = report.to_finish {
            self.to_finish = Some((report.session, ids));
        }
        self.status.send_modify(|s| {
            s.ticks += 1;
            s.fetched += report.fetched as u64;
            s.finished += report.finished as u64;
            s.failed += report.failed as u64;
            s.rejected += report.rejected as u64;
            s.tasks_held = report.held;
            s.last_tick = Some(SystemTime::now());
            if let Some(e) = report.error.as_ref() {
                s.last_error = Some(e.to_string());
            } else if let Some(e) = report.task_error.as_ref() {
                s.last_error = Some(e.clone());
            }
        });
        if self.stopping {
            self.flush_then_release_drain(ctx);
            return;
        }
        if panicked {
            // Our own bug or a panicking ScanTask: start from a fresh actor.
            ctx.stop();
            return;
        }
        let delay = match &report.error {
            Some(e) if !e.is_session_lost() => self.backoff.next_delay(),
            _ => {
                self.backoff.reset();
                let drain = report.drain_next;
                if self.wake_pending || drain {
                    Duration::ZERO
                } else {
                    self.config.tick.saturating_sub(elapsed)
                }
            }
        };
        self.schedule(ctx, delay);
    }

    fn start_listener(&mut self, ctx: &mut Context<Self>) {
        let Some(channel) = T::QUERIES.notify_channel else {
            return;
        };
        if !self.config.listen {
            return;
        }
        let finder = self.finder.clone();
        let addr = ctx.address();
        let retry_max = self.config.retry_max;
        let seed = self.seed ^ 0x115e;
        let runner = self.config.name.clone();
        let fut = async move {
            let mut backoff = Backoff::new(retry_max, seed);
            loop {
                let res = caught(async {
                    let db = finder.find().await?;
                    db.listen(channel).await
                })
                .await;
                match res {
                    Ok(Some(mut listener)) => {
                        backoff.reset();
                        // Anything inserted while we were not listening.
                        addr.do_send(Wake);
                        while listener.notified().await {
                            addr.do_send(Wake);
                        }
                        tracing::debug!(%runner, channel, "listen connection closed; reconnecting");
                    }
                    Ok(None) => return, // this Database does not support LISTEN
                    Err(e) => {
                        tracing::debug!(%runner, channel, error = %e, "cannot listen; retrying")
                    }
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        };
        ctx.spawn(fut.into_actor(self));
    }
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> Actor for Fetcher<T, K, F> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let jitter = self.config.jitter.mul_f64(self.rng.f64());
        self.schedule(ctx, jitter);
        self.start_listener(ctx);
    }
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> Supervised for Fetcher<T, K, F> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::warn!(runner = %self.config.name, "fetcher restarted");
        self.ticking = false;
        self.next_tick = None;
        self.in_flight = None;
        self.status.send_modify(|s| s.actor_restarts += 1);
    }
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> Handler<LeaseChanged> for Fetcher<T, K, F> {
    type Result = ();

    fn handle(&mut self, msg: LeaseChanged, ctx: &mut Context<Self>) {
        let previous = self.lease;
        self.lease = msg.0;
        match msg.0 {
            None => {
                if previous.is_some() {
                    // Fenced or lost: stop running its tasks now.
                    self.abort_in_flight();
                }
            }
            Some(_) => {
                if !self.ticking && self.next_tick.is_none() {
                    self.schedule(ctx, Duration::ZERO);
                }
            }
        }
    }
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> Handler<Wake> for Fetcher<T, K, F> {
    type Result = ();

    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        if self.ticking {
            self.wake_pending = true;
        } else if self.lease.is_some() {
            self.schedule(ctx, Duration::ZERO);
        }
    }
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> Handler<Drain> for Fetcher<T, K, F> {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: Drain, ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        if let Some(handle) = self.next_tick.take() {
            ctx.cancel_future(handle);
        }
        let (tx, rx) = oneshot::channel();
        self.drain_waiters.push(tx);
        if !self.ticking {
            // Nothing in flight; finish what the last tick carried.
            self.flush_then_release_drain(ctx);
            return Box::pin(
                async move {
                    let _ = rx.await;
                }
                .into_actor(self),
            );
        }
        let timeout = msg.timeout;
        Box::pin(
            async move { tokio::time::timeout(timeout, rx).await.is_ok() }
                .into_actor(self)
                .then(|drained, act, _ctx| {
                    let rest = (!drained && (act.ticking || act.flushing)).then(|| {
                        tracing::warn!(runner = %act.config.name, "drain timeout: stopping the tasks in flight");
                        act.abort_in_flight();
                        let (tx, rx) = oneshot::channel();
                        act.drain_waiters.push(tx);
                        rx
                    });
                    async move {
                        if let Some(rx) = rest {
                            let _ = rx.await;
                        }
                    }
                    .into_actor(act)
                }),
        )
    }
}

/// What one tick did.
#[derive(Debug, Default)]
struct TickReport {
    session: SessionId,
    /// Tasks held after get_work (including rows that did not scan).
    held: usize,
    /// Tasks handed to the workers.
    fetched: usize,
    /// Tasks finished in the database.
    finished: usize,
    /// Tasks that failed, panicked, timed out, were stopped, or did not scan.
    failed: usize,
    /// Completed tasks whose finish the database refused.
    rejected: usize,
    /// Tasks this tick completed, or carried, that are not finished yet.
    to_finish: Option<Vec<TaskId>>,
    /// Whether the next tick should start at once (drain mode).
    drain_next: bool,
    /// A failure of the tick itself.
    error: Option<Error>,
    /// The first failure of a task, for the span.
    task_error: Option<String>,
}

/// Everything a tick needs, moved into its future.
struct TickRun<T: ScanTask, K: Tasker<T>, F: DbFinder> {
    config: Arc<RunnerConfig>,
    finder: Arc<F>,
    session_actor: Addr<SessionActor<F>>,
    workers: Arc<[Addr<Worker<T, K>>]>,
    session: SessionId,
    aborts: Aborts,
    to_finish: Vec<TaskId>,
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> TickRun<T, K, F> {
    async fn run(self) -> TickReport {
        let mut report = TickReport {
            session: self.session,
            ..TickReport::default()
        };
        // Every database step of a tick is bounded by the TTL: past it the
        // lease is gone anyway, and a tick must never hang.
        let limit = self.config.ttl;
        let db = match caught(bounded(limit, self.finder.find())).await {
            Ok(db) => db,
            Err(e) => {
                // Keep the completed-but-unfinished tasks for the next try.
                if !self.to_finish.is_empty() {
                    report.to_finish = Some(self.to_finish.clone());
                }
                report.error = Some(e);
                return report;
            }
        };

        // One call: finish what the last tick completed, then get work.
        let sent_at = Instant::now();
        let work = bounded(
            limit,
            db.work_finish_and_get::<T>(
                WorkGet {
                    session: self.session,
                    max_tasks: self.config.max_tasks,
                    ttl: self.config.ttl,
                },
                &self.to_finish,
            ),
        )
        .instrument(tracing::info_span!(
            SPAN_GET_WORK,
            otel.name = SPAN_GET_WORK,
            otel.kind = "client",
            db.system.name = "postgresql",
            db.operation.name = "get_work",
            session_lock.runner = %self.config.name,
            session_lock.tasks.finishing = self.to_finish.len() as i64,
        ))
        .await;
        let work = match work {
            Ok(work) => {
                report.finished += self.to_finish.len();
                work
            }
            Err(e) => {
                if e.is_session_lost() {
                    self.session_actor.do_send(Lost {
                        session: self.session,
                    });
                    report.rejected += self.to_finish.len();
                } else if !self.to_finish.is_empty() {
                    report.to_finish = Some(self.to_finish.clone());
                }
                report.error = Some(e);
                return report;
            }
        };
        self.session_actor.do_send(Renewed {
            session: self.session,
            sent_at,
        });
        report.held = work.tasks.len() + work.unreadable.len();
        report.failed += work.unreadable.len();
        for e in &work.unreadable {
            tracing::error!(runner = %self.config.name, error = %e, "task row does not scan; it stays assigned");
            report.task_error.get_or_insert_with(|| e.to_string());
        }
        if work.tasks.is_empty() {
            return report;
        }
        report.fetched = work.tasks.len();

        let outcomes = self
            .run_tasks(work.tasks)
            .instrument(tracing::info_span!(
                SPAN_RUN_TASKS,
                otel.name = SPAN_RUN_TASKS,
                session_lock.runner = %self.config.name,
                session_lock.tasks.count = report.fetched as i64,
            ))
            .await;
        let mut completed = Vec::with_capacity(report.fetched);
        for outcome in outcomes {
            completed.extend(outcome.completed);
            report.failed += outcome.failed;
            if let Some(e) = outcome.error {
                report.task_error.get_or_insert(e);
            }
        }
        let full_share = report.fetched >= self.config.max_tasks as usize;
        report.drain_next = self.config.drain_mode && full_share && !completed.is_empty();
        if report.drain_next {
            // The next tick starts at once: its get_work finishes these.
            report.to_finish = Some(completed);
        } else if !completed.is_empty() {
            self.finish(&db, completed, &mut report).await;
        }
        report
    }

    async fn run_tasks(&self, tasks: Vec<T>) -> Vec<SliceOutcome> {
        let n = self.workers.len().min(tasks.len());
        let mut slices: Vec<Vec<T>> = (0..n).map(|_| Vec::new()).collect();
        for (i, task) in tasks.into_iter().enumerate() {
            slices[i % n].push(task);
        }
        let timeout = self.config.batch_timeout;
        let sends = slices.into_iter().enumerate().map(|(i, tasks)| {
            let (handle, abort) = AbortHandle::new_pair();
            self.aborts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(handle);
            let count = tasks.len();
            let request = self.workers[i]
                .send(RunSlice {
                    tasks,
                    timeout,
                    abort,
                })
                // A worker stuck in blocking code never reaches its own
                // timeout; this one does not depend on it.
                .timeout(timeout.saturating_add(Duration::from_secs(5)));
            async move {
                request.await.unwrap_or_else(|e| SliceOutcome {
                    completed: Vec::new(),
                    failed: count,
                    error: Some(format!("worker {i} unavailable: {e}")),
                })
            }
        });
        join_all(sends).await
    }

    async fn finish(&self, db: &F::Db, ids: Vec<TaskId>, report: &mut TickReport) {
        let res = bounded(self.config.ttl, db.tasks_finish::<T>(self.session, &ids))
            .instrument(tracing::info_span!(
                SPAN_FINISH,
                otel.name = SPAN_FINISH,
                otel.kind = "client",
                db.system.name = "postgresql",
                db.operation.name = "finish_tasks",
                session_lock.runner = %self.config.name,
                session_lock.tasks.count = ids.len() as i64,
            ))
            .await;
        match res {
            Ok(done) => {
                report.finished += done.len();
                report.rejected += ids.len() - done.len();
                if done.len() < ids.len() {
                    tracing::warn!(
                        runner = %self.config.name,
                        session = self.session,
                        rejected = ids.len() - done.len(),
                        "finish refused for tasks the session no longer holds"
                    );
                }
            }
            Err(e) if e.is_session_lost() => {
                self.session_actor.do_send(Lost {
                    session: self.session,
                });
                report.rejected += ids.len();
                report.error = Some(e);
            }
            Err(e) => {
                // Retried first thing next tick, if the session survives.
                report.to_finish = Some(ids);
                report.error = Some(e);
            }
        }
    }
}
