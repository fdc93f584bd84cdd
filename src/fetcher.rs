//! The fetcher actor: ticks, gets the session's work, hands it to the
//! workers, and finishes exactly the tasks that completed.
//!
//! What it keeps true:
//! - Ticks never overlap, and a tick ends only when every slice it handed
//!   out has returned, so no task is dispatched while a run of it has not
//!   returned. The ids of runs in flight also go to get_work, which never
//!   gives them back as surplus.
//! - A completed task counts as finished only when the database says so.
//!   Completed tasks are finished by the next get_work (drain mode) or by a
//!   finish_tasks now; those the database did not finish but the session
//!   still holds (a row someone else had locked) are carried to the next
//!   call and never run again while carried; those it no longer holds are
//!   counted rejected.
//! - Runs that outlive `batch_timeout` and every attempt to stop them (a
//!   Tasker blocking its thread) are reported stuck, and the session actor
//!   stops renewing the session, so its lease expires and the tasks move
//!   on, instead of being held for ever; the tick keeps waiting for them.
//!   The fetcher runs on worker 0's thread: when that thread is the one
//!   blocked, the session actor sees the batch's deadline pass instead
//!   (`in_flight`).
//! - A failed tick backs off; a notification does not cut the wait short.
//! - A tick waits `quiet_tick` instead of `tick` only when the database
//!   said, after a tick that found and held nothing, that no open task
//!   could be picked up without an INSERT first, and LISTEN was up, the
//!   same connection, from before that tick's get_work until the answer:
//!   every task that appears after it notifies and wakes the runner.
//! - When the session is fenced or lost, the batch in flight is stopped.
//!   When the runner stops, no new tick starts, a batch fetched meanwhile is
//!   not started, and the tick in flight is waited for, then stopped, then
//!   (if its runs still do not return) left running and reported.
//! - Every tick first checks that the DbFinder still finds the session's
//!   database; if not, nothing of the old session is used there.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use actix::prelude::*;
use futures_util::FutureExt;
use futures_util::future::{AbortHandle, join_all};
use tokio::sync::oneshot;
use tracing::{Instrument, Span, field};

use crate::backoff::{Backoff, process_seed};
use crate::catch::{bounded, caught};
use crate::config::{FailedTasks, RunnerConfig};
use crate::error::{Error, Panic};
use crate::in_flight::{InFlight, report_left, report_stuck};
use crate::session::{Lease, LeaseChanged, Lost, Moved, SessionActor, Stuck};
use crate::status::StatusTx;
use crate::store::{Database, DbFinder, GetWork};
use crate::task::{ScanTask, TaskId};
use crate::tasker::Tasker;
use crate::telemetry::{Metrics, SPAN_FAIL, SPAN_FINISH, SPAN_GET_WORK, SPAN_RUN_TASKS, SPAN_TICK};
use crate::workers::{self, RunSlice, SliceOutcome, Worker};

/// How long past `batch_timeout` a slice may take to return (a Tasker
/// dropped at its timeout returns at once; one blocking its thread cannot)
/// before its runs are reported stuck, and how long Stop waits for a
/// stopped batch to return before leaving it running.
pub(crate) const STUCK_GRACE: Duration = Duration::from_secs(2);

/// New tasks may be waiting: tick now if idle and not backing off.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Wake;

/// Stop ticking and let the tick in flight finish, stopping its tasks after
/// `timeout`; replies with the tasks whose runs still had not returned
/// (their session must be left to expire, not ended).
#[derive(Debug, Message)]
#[rtype(result = "Vec<TaskId>")]
pub(crate) struct Drain {
    pub(crate) timeout: Duration,
}

/// What the tick in flight reads of the actor's state as it changes.
#[derive(Debug, Default)]
struct Gate {
    /// The runner is stopping: start nothing new.
    stopping: AtomicBool,
    /// Bumped on every lease change: a tick that sees it move does not
    /// start the batch it fetched.
    epoch: AtomicU64,
    /// Bumped when a LISTEN connection is up and again when it is down:
    /// odd while listening. A tick that reads the same odd value before
    /// its get_work and after asking whether it may be quiet listened
    /// throughout.
    listen_gen: AtomicU64,
}

/// Completed tasks the database has not confirmed finished yet, with the
/// lease they were completed under.
#[derive(Debug)]
struct Carried {
    lease: Lease,
    ids: Vec<TaskId>,
}

/// The tasks the lease's last get_work answered it holds: every task it may
/// hold now (only its own get_work gives it tasks), passed to the next
/// call so that the database looks them up by key (`GetWork::known`).
/// Forgotten whenever an answer may have been missed.
#[derive(Debug)]
struct Known {
    lease: Lease,
    ids: Vec<TaskId>,
}

pub(crate) struct Fetcher<T: ScanTask, K: Tasker<T>, F: DbFinder> {
    config: Arc<RunnerConfig>,
    finder: Arc<F>,
    status: StatusTx,
    metrics: Metrics,
    session: Addr<SessionActor<F>>,
    workers: Arc<[Addr<Worker<T, K>>]>,
    lease: Option<Lease>,
    gate: Arc<Gate>,
    /// The runs in flight, shared with the session actor and the supervisor.
    runs: InFlight,
    ticking: bool,
    wake_pending: bool,
    /// The next tick is a retry after an error: notifications wait for it.
    backing_off: bool,
    next_tick: Option<SpawnHandle>,
    carried: Option<Carried>,
    known: Option<Known>,
    last_sweep: Option<Instant>,
    /// The Tasker's time per task in the last batch that ran in full:
    /// what the next batch is spread over the workers by.
    pace: Option<Duration>,
    /// Empty ticks still to go before asking again whether the runner may
    /// be quiet, and how many to wait after the next "no".
    quiet_skip: u32,
    quiet_backoff: u32,
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
        in_flight: InFlight,
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
            gate: Arc::default(),
            runs: in_flight,
            ticking: false,
            wake_pending: false,
            backing_off: false,
            next_tick: None,
            carried: None,
            known: None,
            last_sweep: None,
            pace: None,
            quiet_skip: 0,
            quiet_backoff: 1,
            drain_waiters: Vec::new(),
            flushing: false,
        }
    }

    fn is_stopping(&self) -> bool {
        self.gate.stopping.load(Ordering::Relaxed)
    }

    fn schedule(&mut self, ctx: &mut Context<Self>, delay: Duration) {
        if let Some(handle) = self.next_tick.take() {
            ctx.cancel_future(handle);
        }
        if self.is_stopping() {
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

    /// On stop: finishes the completed tasks still carried (if the session
    /// is still usable), then releases whoever waits for the drain.
    fn flush_then_release_drain(&mut self, ctx: &mut Context<Self>) {
        let carried = match (self.carried.take(), &self.lease) {
            (Some(c), Some(lease)) if c.lease == *lease && !c.ids.is_empty() => Some(c),
            _ => None,
        };
        let Some(Carried { lease, ids }) = carried else {
            self.release_drain_waiters();
            return;
        };
        let finder = self.finder.clone();
        // Bounded like every database step of a tick: a stop must end even
        // when the database (or a DbFinder) never answers.
        let fut = caught(bounded(self.config.ttl, async move {
            let db = finder.find().await?;
            if db.database_identity().await? != lease.database {
                return Ok((0, ids.len()));
            }
            db.finish_tasks::<T>(&lease.session, &ids)
                .await
                .map(|done| (done.len(), ids.len()))
        }));
        self.flushing = true;
        ctx.spawn(fut.into_actor(self).map(|res, act, _| {
            act.flushing = false;
            match res {
                Ok((done, asked)) => {
                    act.metrics.finished(done);
                    act.status.send_modify(|s| s.finished += done as u64);
                    if done < asked {
                        tracing::warn!(runner = %act.config.name, unfinished = asked - done,
                            "completed tasks not finished on stop; they will run again");
                    }
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
        if self.is_stopping() || self.ticking {
            return;
        }
        // Without a usable session there is nothing to do; the next
        // LeaseChanged starts ticking again.
        let Some(lease) = self.lease.clone() else {
            return;
        };
        self.ticking = true;
        self.wake_pending = false;
        self.backing_off = false;
        let stops = self.runs.tick_began();
        let carried = match self.carried.take() {
            Some(c) if c.lease == lease => c.ids,
            Some(c) => {
                // Completed under a session that is gone: nobody may finish
                // them now; they run again (at-least-once).
                self.metrics.rejected(c.ids.len());
                self.status
                    .send_modify(|s| s.rejected += c.ids.len() as u64);
                Vec::new()
            }
            None => Vec::new(),
        };
        let known = match self.known.take() {
            Some(k) if k.lease == lease => Some(k.ids),
            _ => None,
        };
        let sweep = self
            .last_sweep
            .is_none_or(|at| at.elapsed() >= self.config.tick);
        let ask_quiet = self.config.quiet_tick > self.config.tick
            && self.config.listen
            && T::QUERIES.notify_channel.is_some()
            && self.quiet_skip == 0;
        self.quiet_skip = self.quiet_skip.saturating_sub(1);
        let span = tracing::info_span!(
            SPAN_TICK,
            otel.name = SPAN_TICK,
            otel.kind = "internal",
            session_lock.runner = %self.config.name,
            session_lock.session.id = lease.session.id,
            session_lock.tasks.fetched = field::Empty,
            session_lock.tasks.finished = field::Empty,
            session_lock.tasks.failed = field::Empty,
            otel.status_code = field::Empty,
            error.message = field::Empty,
        );
        let tick = TickRun::<T, K, F> {
            config: self.config.clone(),
            finder: self.finder.clone(),
            session_actor: self.session.clone(),
            workers: self.workers.clone(),
            status: self.status.clone(),
            metrics: self.metrics.clone(),
            gate: self.gate.clone(),
            epoch: self.gate.epoch.load(Ordering::Relaxed),
            runs: self.runs.clone(),
            pace: self.pace,
            lease,
            stops,
            carried,
            known,
            sweep,
            ask_quiet,
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
        self.runs.tick_ended();
        let mut panicked = false;
        let mut report = res.unwrap_or_else(|panic| {
            panicked = true;
            TickReport {
                error: Some(Error::Panicked(Panic::from_payload(&*panic))),
                ..TickReport::default()
            }
        });
        let elapsed = started.elapsed();
        self.metrics.tick(elapsed.as_secs_f64());
        self.metrics.fetched(report.fetched);
        self.metrics.finished(report.finished);
        self.metrics.failed(report.failed);
        self.metrics.rejected(report.rejected);
        self.metrics.given_back(report.given_back);
        if let Some(pace) = report.pace {
            self.pace = pace;
        }
        if let Some(held) = report.held {
            self.metrics.held(held);
        }
        span.record("session_lock.tasks.fetched", report.fetched as i64);
        span.record("session_lock.tasks.finished", report.finished as i64);
        span.record("session_lock.tasks.failed", report.failed as i64);
        if let Some(e) = &report.error {
            span.record("otel.status_code", "ERROR");
            span.record("error.message", field::display(e));
            tracing::warn!(parent: &span, runner = %self.config.name, error = %e, "tick failed");
        } else if let Some(e) = &report.task_error {
            span.record("otel.status_code", "ERROR");
            span.record("error.message", field::display(e));
        }
        if report.rejected > 0 {
            tracing::warn!(
                runner = %self.config.name,
                rejected = report.rejected,
                "finish refused for completed tasks the session no longer holds; they run again elsewhere"
            );
        }
        if report.swept {
            self.last_sweep = Some(started);
        }
        let quiet = report.quiet == Some(true);
        match report.quiet {
            Some(true) => self.quiet_backoff = 1,
            Some(false) => {
                // Tasks are open somewhere: ask again after 1, 2, 4, ...
                // empty ticks, at most one in quiet_tick / tick.
                let most = (self.config.quiet_tick.as_secs_f64() / self.config.tick.as_secs_f64())
                    .clamp(1.0, 1_000.0) as u32;
                self.quiet_skip = self.quiet_backoff.min(most);
                self.quiet_backoff = self.quiet_backoff.saturating_mul(2).min(most);
            }
            None if report.fetched > 0 => {
                self.quiet_skip = 0;
                self.quiet_backoff = 1;
            }
            None => {}
        }
        if let (Some(lease), Some(ids)) = (report.lease.clone(), report.known.take()) {
            self.known = Some(Known { lease, ids });
        }
        if let Some(lease) = report.lease.clone() {
            if !report.carry.is_empty() {
                self.carried = Some(Carried {
                    lease,
                    ids: report.carry,
                });
            }
        }
        self.status.send_modify(|s| {
            s.ticks += 1;
            s.fetched += report.fetched as u64;
            s.finished += report.finished as u64;
            s.failed += report.failed as u64;
            s.rejected += report.rejected as u64;
            s.given_back += report.given_back as u64;
            if let Some(held) = report.held {
                s.tasks_held = held;
            }
            s.last_tick = Some(SystemTime::now());
            s.quiet = quiet;
            if let Some(e) = report.error.as_ref() {
                s.last_error = Some(e.to_string());
            } else if let Some(e) = report.task_error.as_ref() {
                s.last_error = Some(e.clone());
            }
        });
        if self.is_stopping() {
            self.flush_then_release_drain(ctx);
            return;
        }
        if panicked {
            // Our own bug: start from a fresh actor.
            ctx.stop();
            return;
        }
        let delay = match &report.error {
            Some(e) if !e.is_session_lost() && !report.lease_gone => {
                self.backing_off = true;
                self.backoff.next_delay()
            }
            _ => {
                self.backoff.reset();
                if self.wake_pending || report.drain_next {
                    Duration::ZERO
                } else if quiet {
                    self.config.quiet_tick.saturating_sub(elapsed)
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
        let status = self.status.clone();
        let gate = self.gate.clone();
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
                        gate.listen_gen.fetch_add(1, Ordering::SeqCst);
                        status.send_modify(|s| s.listening = true);
                        // Anything inserted while we were not listening.
                        addr.do_send(Wake);
                        while listener.notified().await {
                            addr.do_send(Wake);
                        }
                        gate.listen_gen.fetch_add(1, Ordering::SeqCst);
                        status.send_modify(|s| s.listening = false);
                        tracing::debug!(%runner, channel, "listen connection closed; reconnecting");
                    }
                    Ok(None) => {
                        tracing::info!(%runner, channel, "no LISTEN here: new tasks wait for the next tick");
                        return;
                    }
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
        self.runs.tick_ended();
        // The tick that failed may have had an answer nobody read.
        self.known = None;
        self.status.send_modify(|s| s.actor_restarts += 1);
    }
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> Handler<LeaseChanged> for Fetcher<T, K, F> {
    type Result = ();

    fn handle(&mut self, msg: LeaseChanged, ctx: &mut Context<Self>) {
        let previous = std::mem::replace(&mut self.lease, msg.0);
        if previous == self.lease {
            return;
        }
        self.gate.epoch.fetch_add(1, Ordering::Relaxed);
        match &self.lease {
            None => {
                if previous.is_some() {
                    // Fenced, lost or suspended: stop running its tasks now.
                    self.runs.abort();
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
        if self.is_stopping() {
            return;
        }
        if self.ticking || self.backing_off {
            // A tick in flight ticks again when it ends; a retry after an
            // error keeps its wait.
            self.wake_pending = true;
        } else if self.lease.is_some() {
            self.schedule(ctx, Duration::ZERO);
        }
    }
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> Handler<Drain> for Fetcher<T, K, F> {
    type Result = ResponseActFuture<Self, Vec<TaskId>>;

    fn handle(&mut self, msg: Drain, ctx: &mut Context<Self>) -> Self::Result {
        self.gate.stopping.store(true, Ordering::Relaxed);
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
                .into_actor(self)
                .map(|(), act, _| {
                    // Runs of a tick that was dropped (its actor restarted)
                    // may still be going: the session is then left.
                    let left = act.runs.ids();
                    if !left.is_empty() {
                        report_left(&act.config.name, &left);
                    }
                    left
                }),
            );
        }
        let timeout = msg.timeout;
        Box::pin(
            async move { tokio::time::timeout(timeout, rx).await.is_ok() }
                .into_actor(self)
                .then(|drained, act, _ctx| {
                    let rest = (!drained && (act.ticking || act.flushing)).then(|| {
                        tracing::warn!(runner = %act.config.name, "drain timeout: stopping the tasks in flight");
                        act.runs.abort();
                        let (tx, rx) = oneshot::channel();
                        act.drain_waiters.push(tx);
                        rx
                    });
                    async move {
                        match rest {
                            Some(rx) => tokio::time::timeout(STUCK_GRACE, rx).await.is_ok(),
                            None => true,
                        }
                    }
                    .into_actor(act)
                })
                .map(|returned, act, _ctx| {
                    if returned {
                        return Vec::new();
                    }
                    let left = act.runs.ids();
                    report_left(&act.config.name, &left);
                    left
                }),
        )
    }
}

/// What one tick did.
#[derive(Debug, Default)]
struct TickReport {
    /// The lease the tick ran under, if it got that far.
    lease: Option<Lease>,
    /// Tasks held after get_work (including rows that did not scan), when
    /// it succeeded.
    held: Option<usize>,
    /// Tasks handed to the workers.
    fetched: usize,
    /// Tasks the database confirmed finished.
    finished: usize,
    /// Tasks that failed, panicked, timed out, were stopped, or did not scan.
    failed: usize,
    /// Completed tasks the database did not finish: no longer held.
    rejected: usize,
    /// Tasks not completed that the database took back, to retry later.
    given_back: usize,
    /// Completed tasks not confirmed finished, still held: for the next call.
    carry: Vec<TaskId>,
    /// Whether the next tick should start at once (drain mode).
    drain_next: bool,
    /// Whether get_work swept for orphans.
    swept: bool,
    /// Every task the lease holds by get_work's answer, when the answer
    /// was read in full.
    known: Option<Vec<TaskId>>,
    /// The answer to "may the runner be quiet?", when the tick asked.
    quiet: Option<bool>,
    /// The Tasker's pace in this tick's batch, when one ran: `Some(None)`
    /// when some of it failed.
    pace: Option<Option<Duration>>,
    /// The session is gone (lost, refused, or its database moved).
    lease_gone: bool,
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
    status: StatusTx,
    metrics: Metrics,
    gate: Arc<Gate>,
    /// The lease epoch when the tick started.
    epoch: u64,
    runs: InFlight,
    /// The Tasker's pace, if known (`workers::slices`).
    pace: Option<Duration>,
    lease: Lease,
    /// The count of stops of the runs in flight when the tick began.
    stops: u64,
    /// Completed tasks of this lease not yet confirmed finished.
    carried: Vec<TaskId>,
    /// What the lease's previous answer said it holds, if it was read.
    known: Option<Vec<TaskId>>,
    sweep: bool,
    /// Ask, if the tick finds and holds nothing, whether the runner may be
    /// quiet.
    ask_quiet: bool,
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> TickRun<T, K, F> {
    async fn run(self) -> TickReport {
        let mut report = TickReport {
            lease: Some(self.lease.clone()),
            carry: self.carried.clone(),
            ..TickReport::default()
        };
        // Every database step of a tick is bounded by the TTL: past it the
        // lease is gone anyway, and a tick must never hang.
        let limit = self.config.ttl;
        let found = caught(bounded(limit, async {
            let db = self.finder.find().await?;
            let identity = db.database_identity().await?;
            Ok((db, identity))
        }))
        .await;
        let db = match found {
            Ok((db, identity)) if identity == self.lease.database => db,
            Ok((_, identity)) => {
                // Another database: the session and the carried ids mean
                // nothing (or something else) there.
                self.session_actor.do_send(Moved {
                    session: self.lease.session.id,
                });
                report.rejected += report.carry.len();
                report.carry.clear();
                report.lease_gone = true;
                report.error = Some(Error::Moved {
                    from: self.lease.database.to_string(),
                    to: identity.to_string(),
                });
                return report;
            }
            Err(e) => {
                report.error = Some(e);
                return report;
            }
        };

        let listen_gen = self.gate.listen_gen.load(Ordering::SeqCst);
        // One call: finish what completed, then get work.
        let running: Vec<TaskId> = self.runs.ids();
        // What the last answer named, less what this call finishes (it
        // looks up itself those it does not finish).
        // (A draining tick finishes exactly what the last answer named.)
        let known: Option<Vec<TaskId>> = self.known.as_ref().map(|known| {
            if *known == self.carried {
                return Vec::new();
            }
            let finishing: HashSet<TaskId> = self.carried.iter().copied().collect();
            known
                .iter()
                .copied()
                .filter(|id| !finishing.contains(id))
                .collect()
        });
        let work = bounded(
            limit,
            db.get_work::<T>(GetWork {
                session: &self.lease.session,
                finished: &self.carried,
                running: &running,
                sweep: self.sweep,
                known: known.as_deref(),
            }),
        )
        .instrument(tracing::info_span!(
            SPAN_GET_WORK,
            otel.name = SPAN_GET_WORK,
            otel.kind = "client",
            db.system.name = "postgresql",
            db.operation.name = "get_work",
            session_lock.runner = %self.config.name,
            session_lock.tasks.finishing = self.carried.len() as i64,
        ))
        .await;
        let work = match work {
            Ok(work) => work,
            Err(e) => {
                if e.is_session_lost() || matches!(e, Error::ProtocolMismatch { .. }) {
                    self.session_actor.do_send(Lost {
                        session: self.lease.session.id,
                    });
                    report.rejected += report.carry.len();
                    report.carry.clear();
                    report.lease_gone = true;
                }
                report.error = Some(e);
                return report;
            }
        };
        report.swept = self.sweep;

        // What the database says: finished, still held, or gone.
        let mut tasks = Vec::with_capacity(work.tasks.len());
        let mut held: HashSet<TaskId> = HashSet::with_capacity(work.tasks.len());
        for task in work.tasks {
            match AssertUnwindSafe(|| task.id()).catch_unwind_sync() {
                Ok(id) => {
                    held.insert(id);
                    tasks.push((id, task));
                }
                Err(panic) => {
                    report.failed += 1;
                    let e = format!("Task::id panicked: {}", Panic::from_payload(&*panic));
                    tracing::error!(runner = %self.config.name, error = %e, "a task's id cannot be read; it stays assigned");
                    report.task_error.get_or_insert(e);
                }
            }
        }
        report.held = Some(held.len() + work.unreadable.len() + report.failed);
        // A row whose id cannot be read leaves the answer unknown in part.
        let all_ids = report.failed == 0 && work.unreadable.iter().all(|e| e.task_id.is_some());
        report.failed += work.unreadable.len();
        for e in &work.unreadable {
            if let Some(id) = e.task_id {
                held.insert(id);
            }
            tracing::error!(runner = %self.config.name, error = %e, "task row does not scan; it stays assigned");
            report.task_error.get_or_insert_with(|| e.to_string());
        }
        if all_ids {
            // In the answer's order, which is the order a one-slice batch
            // completes in: the next tick compares the two.
            report.known = Some(
                tasks
                    .iter()
                    .map(|(id, _)| *id)
                    .chain(work.unreadable.iter().filter_map(|e| e.task_id))
                    .collect(),
            );
        }
        report.finished += work.finished.len();
        // The database finishes only ids it was passed, each once: as many
        // finished as carried is all of them (a draining tick).
        if work.finished.len() == report.carry.len() {
            report.carry.clear();
        } else {
            let finished: HashSet<TaskId> = work.finished.into_iter().collect();
            let mut still_carried = Vec::new();
            for id in report.carry.drain(..) {
                if finished.contains(&id) {
                    continue;
                }
                if held.contains(&id) {
                    still_carried.push(id);
                } else {
                    report.rejected += 1;
                }
            }
            report.carry = still_carried;
        }
        let skip: HashSet<TaskId> = report.carry.iter().chain(running.iter()).copied().collect();
        tasks.retain(|(id, _)| !skip.contains(id));

        if report.held == Some(0) && report.carry.is_empty() && running.is_empty() && self.ask_quiet
        {
            report.quiet = Some(self.quiet(&db, listen_gen).await);
        }
        if tasks.is_empty() {
            return report;
        }
        if self.gate.stopping.load(Ordering::Relaxed)
            || self.gate.epoch.load(Ordering::Relaxed) != self.epoch
        {
            // Stop or a fence came during get_work: start nothing. The
            // tasks stay held; an ended or expired session frees them.
            return report;
        }
        report.fetched = tasks.len();
        let full_share = held.len() >= self.config.max_tasks as usize;
        let dispatched: Vec<TaskId> = tasks.iter().map(|(id, _)| *id).collect();

        let outcomes = self
            .run_tasks(tasks)
            .instrument(tracing::info_span!(
                SPAN_RUN_TASKS,
                otel.name = SPAN_RUN_TASKS,
                session_lock.runner = %self.config.name,
                session_lock.tasks.count = report.fetched as i64,
            ))
            .await;
        report.pace = Some(workers::pace(&outcomes));
        let mut completed = Vec::with_capacity(report.fetched);
        for outcome in outcomes {
            completed.extend(outcome.completed);
            report.failed += outcome.failed;
            if let Some(e) = outcome.error {
                report.task_error.get_or_insert(e);
            }
        }
        report.drain_next = self.config.drain_mode && full_share && !completed.is_empty();
        // Each dispatched task is completed at most once: as many completed
        // as dispatched is all of them.
        if self.config.failed_tasks == FailedTasks::GiveBack && completed.len() < dispatched.len() {
            let done: HashSet<TaskId> = completed.iter().copied().collect();
            let failed: Vec<TaskId> = dispatched
                .into_iter()
                .filter(|id| !done.contains(id))
                .collect();
            if !failed.is_empty() {
                self.give_back(&db, failed, &mut report).await;
            }
        }
        report.carry.extend(completed);
        if !report.drain_next && !report.carry.is_empty() {
            let ids = std::mem::take(&mut report.carry);
            self.finish(&db, ids, &mut report).await;
        }
        report
    }

    /// Whether the runner may wait `quiet_tick` for a notification instead
    /// of ticking: the database says no open task could be picked up
    /// without an INSERT first, and LISTEN was up on one connection since
    /// before get_work (`listen_gen`). An error is a "no": the next ask
    /// comes later (an older release's database has no `quiet` at all).
    async fn quiet(&self, db: &F::Db, listen_gen: u64) -> bool {
        if listen_gen % 2 == 0 {
            return false;
        }
        match bounded(self.config.ttl, db.quiet::<T>(&self.lease.session)).await {
            Ok(quiet) => quiet && self.gate.listen_gen.load(Ordering::SeqCst) == listen_gen,
            Err(e) => {
                tracing::debug!(runner = %self.config.name, error = %e, "cannot ask whether the table is quiet; ticking as usual");
                false
            }
        }
    }

    /// Runs the tasks on as many workers as their pace pays for
    /// (`workers::slices`), a slice each, and waits until every slice has
    /// returned. Runs still going `STUCK_GRACE` past the batch
    /// timeout are reported stuck, and their session left to expire.
    async fn run_tasks(&self, tasks: Vec<(TaskId, T)>) -> Vec<SliceOutcome> {
        let n = workers::slices(
            self.workers.len(),
            tasks.len(),
            self.pace,
            self.config.quantum,
        );
        let mut slices: Vec<(Vec<TaskId>, Vec<T>)> =
            (0..n).map(|_| (Vec::new(), Vec::new())).collect();
        for (i, (id, task)) in tasks.into_iter().enumerate() {
            slices[i % n].0.push(id);
            slices[i % n].1.push(task);
        }
        let timeout = self.config.batch_timeout;
        let session = self.lease.session.id;
        let begun = self.runs.begin(session, timeout, STUCK_GRACE);
        let sends = slices.into_iter().enumerate().map(|(i, (ids, tasks))| {
            let (handle, abort) = AbortHandle::new_pair();
            self.runs.hand_out(handle, self.stops);
            let ids: Arc<[TaskId]> = ids.into();
            self.runs.add(&ids);
            let count = ids.len();
            let runs = self.runs.clone();
            let request = self.workers[i].send(RunSlice {
                tasks,
                ids: ids.clone(),
                timeout,
                abort,
                runs: runs.clone(),
            });
            async move {
                let outcome = request.await.unwrap_or_else(|e| SliceOutcome {
                    completed: Vec::new(),
                    failed: count,
                    error: Some(format!("worker {i} unavailable: {e}")),
                    ran: Duration::ZERO,
                });
                runs.returned(&ids);
                outcome
            }
        });
        let all = join_all(sends);
        tokio::pin!(all);
        let outcomes =
            match tokio::time::timeout(timeout.saturating_add(STUCK_GRACE), &mut all).await {
                Ok(outcomes) => outcomes,
                Err(_) => {
                    // Unless the session actor saw the deadline first (this
                    // thread was blocked past it).
                    if self.runs.report() {
                        let stuck = self.runs.ids();
                        report_stuck(
                            &self.config,
                            &self.metrics,
                            &self.status,
                            session,
                            &stuck,
                            timeout,
                        );
                        self.session_actor.do_send(Stuck {
                            session,
                            stuck: true,
                        });
                    }
                    all.await
                }
            };
        if begun.end() {
            self.session_actor.do_send(Stuck {
                session,
                stuck: false,
            });
        }
        outcomes
    }

    /// Gives back the tasks the batch did not complete, to be retried after
    /// their backoff. Those it cannot give back stay held, and run again
    /// on the next tick.
    async fn give_back(&self, db: &F::Db, ids: Vec<TaskId>, report: &mut TickReport) {
        let res = bounded(
            self.config.ttl,
            db.fail_tasks::<T>(&self.lease.session, &ids),
        )
        .instrument(tracing::info_span!(
            SPAN_FAIL,
            otel.name = SPAN_FAIL,
            otel.kind = "client",
            db.system.name = "postgresql",
            db.operation.name = "fail_tasks",
            session_lock.runner = %self.config.name,
            session_lock.tasks.count = ids.len() as i64,
        ))
        .await;
        match res {
            Ok(given) => {
                report.given_back += given.len();
                if let Some(held) = report.held.as_mut() {
                    *held = held.saturating_sub(given.len());
                }
            }
            Err(e) if e.is_session_lost() || matches!(e, Error::ProtocolMismatch { .. }) => {
                self.session_actor.do_send(Lost {
                    session: self.lease.session.id,
                });
                report.lease_gone = true;
                report.error = Some(e);
            }
            Err(e) => {
                tracing::warn!(runner = %self.config.name, error = %e, tasks = ?ids, "could not give back failed tasks; they run again next tick");
                report.error.get_or_insert(e);
            }
        }
    }

    async fn finish(&self, db: &F::Db, ids: Vec<TaskId>, report: &mut TickReport) {
        let res = bounded(
            self.config.ttl,
            db.finish_tasks::<T>(&self.lease.session, &ids),
        )
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
                // The rest are still held (a row locked by someone else) or
                // gone: the next get_work tells which.
                let done: HashSet<TaskId> = done.into_iter().collect();
                report.carry = ids.into_iter().filter(|id| !done.contains(id)).collect();
            }
            Err(e) if e.is_session_lost() || matches!(e, Error::ProtocolMismatch { .. }) => {
                self.session_actor.do_send(Lost {
                    session: self.lease.session.id,
                });
                report.rejected += ids.len();
                report.lease_gone = true;
                report.error = Some(e);
            }
            Err(e) => {
                // Retried by the next get_work, if the session survives.
                report.carry = ids;
                report.error = Some(e);
            }
        }
    }
}

/// `catch_unwind` for a closure, as a method.
trait CatchUnwindSync<R> {
    fn catch_unwind_sync(self) -> std::thread::Result<R>;
}

impl<R, C: FnOnce() -> R> CatchUnwindSync<R> for AssertUnwindSafe<C> {
    fn catch_unwind_sync(self) -> std::thread::Result<R> {
        std::panic::catch_unwind(self)
    }
}
