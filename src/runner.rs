//! The supervisor: starts a runner's actors, restarts those that fail, and
//! stops them in order on [`Stop`]. Also [`RunnerServer`], which starts and
//! stops several runners together (the seed's RunnerServer).
//!
//! Layout of one runner:
//!
//! ```text
//!   RunnerSupervisor (caller's arbiter)      what the application holds
//!     ├─ control arbiter: SessionActor, Reaper, Gauges
//!     │                      │ LeaseChanged ▲ Lost/Moved/Stuck
//!     │                      ▼              │
//!     └─ worker arbiters: [Fetcher + Worker 0] │ Worker 1 │ … │ Worker N-1
//!                            └──────── RunSlice ────────────────┘
//! ```
//!
//! The session actor has an arbiter (thread) apart from the workers, and
//! each worker one of its own, so a Tasker that blocks its thread cannot
//! starve the heartbeat, nor hold up the other workers. The fetcher shares
//! worker 0's, so that a tick's hand-off to that worker (all of a fast
//! Tasker's batch) wakes no other thread; the runs in flight and their
//! batch's deadline are shared ([`InFlight`]), so that the session actor
//! and Stop see a batch stuck even when it blocks the fetcher. Every actor is
//! started under actix's `Supervisor`: an actor that stops itself (a worker
//! after a panic or timeout, the fetcher after a panic) is restarted in
//! place with the same address.
//!
//! Stop never frees running work: the session is ended only when the
//! drain reports that every run it started has returned; otherwise (or
//! when the drain does not answer past its own bound while runs are in
//! flight) it is left to expire, and the tasks left running are reported.

use std::marker::PhantomData;
use std::sync::Arc;

use actix::prelude::*;
use futures_util::future::join_all;
use opentelemetry::metrics::Meter;
use tokio::sync::{oneshot, watch};

use crate::config::RunnerConfig;
use crate::fetcher::STUCK_GRACE;
use crate::fetcher::{Drain, Fetcher};
use crate::gauges::Gauges;
use crate::in_flight::{InFlight, report_left};
use crate::reaper::Reaper;
use crate::session::{EndSession, SessionActor, Subscribe};
use crate::status::{RunnerStatus, StatusTx};
use crate::store::{DbFinder, ForRunner};
use crate::task::ScanTask;
use crate::tasker::Tasker;
use crate::telemetry::{Metrics, SCOPE};
use crate::workers::Worker;

/// Stops a runner (or every runner of a [`RunnerServer`]): no new tick
/// starts, tasks in flight finish (up to the drain timeout, then they are
/// stopped), completed tasks are finished, and the session is ended so its
/// tasks are free for the others at once. A run that does not return even
/// when stopped (a Tasker blocking its thread) is never freed for another
/// session to start: the session is then left to expire after its TTL, and
/// the tasks left running are in [`RunnerStatus::left_at_stop`]. Replies
/// when all of that is done, or at the latest after the drain timeout plus
/// a few seconds and two heartbeat timeouts when the database does not
/// answer. Idempotent, and safe to send at any time.
#[derive(Debug, Clone, Copy, Default, Message)]
#[rtype(result = "()")]
pub struct Stop;

/// A runner, configured but not started: the Tasker for one task type, the
/// database it is found in, and its configuration.
pub struct Runner<T, K, F> {
    config: RunnerConfig,
    finder: F,
    tasker: K,
    meter: Option<Meter>,
    _task: PhantomData<fn() -> T>,
}

impl<T, K, F> std::fmt::Debug for Runner<T, K, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> Runner<T, K, F> {
    /// A runner of tasks `T`, run by `tasker`, in the database `finder`
    /// finds on every tick.
    pub fn new(config: RunnerConfig, finder: F, tasker: K) -> Self {
        Runner {
            config,
            finder,
            tasker,
            meter: None,
            _task: PhantomData,
        }
    }

    /// Records metrics with `meter`. Defaults to the global meter provider's
    /// meter named `session_lock`, a no-op unless the application installed
    /// a provider.
    pub fn meter(mut self, meter: Meter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Starts the runner's actors. Must be called inside an actix System
    /// (for example in an actix-web `main`); the runner then runs until it
    /// gets [`Stop`] or the System stops.
    pub fn start(self) -> RunnerHandle {
        self.start_on(false)
    }

    /// Starts every actor on the current arbiter (tests with a paused clock).
    #[cfg(test)]
    pub(crate) fn start_inline(self) -> RunnerHandle {
        self.start_on(true)
    }

    fn start_on(self, inline: bool) -> RunnerHandle {
        let (status, rx) = watch::channel(RunnerStatus {
            name: self.config.name.clone(),
            ..RunnerStatus::default()
        });
        let name = self.config.name.clone();
        let meter = self
            .meter
            .unwrap_or_else(|| opentelemetry::global::meter(SCOPE));
        let metrics = Metrics::new(&meter, &self.config.name);
        let supervisor = RunnerSupervisor::<T, K, F> {
            config: Arc::new(self.config),
            finder: Arc::new(self.finder),
            tasker: Arc::new(self.tasker),
            status,
            metrics,
            running: None,
            state: State::Running,
            stop_waiters: Vec::new(),
            inline,
        }
        .start();
        RunnerHandle {
            name: name.into(),
            stop: supervisor.recipient(),
            status: rx,
        }
    }
}

/// What the application holds of a started runner.
#[derive(Debug, Clone)]
pub struct RunnerHandle {
    name: Arc<str>,
    stop: Recipient<Stop>,
    status: watch::Receiver<RunnerStatus>,
}

impl RunnerHandle {
    /// The runner's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends [`Stop`] and waits until the runner has stopped.
    pub async fn stop(&self) {
        // A closed mailbox means the runner is already gone.
        let _ = self.stop.send(Stop).await;
    }

    /// The recipient of [`Stop`], to send it yourself.
    pub fn stop_recipient(&self) -> Recipient<Stop> {
        self.stop.clone()
    }

    /// The runner's current status.
    pub fn status(&self) -> RunnerStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status updates, to wait on (e.g. "ticked", "has a
    /// session") instead of polling.
    pub fn subscribe(&self) -> watch::Receiver<RunnerStatus> {
        self.status.clone()
    }
}

enum State {
    Running,
    Stopping,
    Stopped,
}

struct Running<T: ScanTask, K: Tasker<T>, F: DbFinder> {
    control: Option<Arbiter>,
    worker_arbiters: Vec<Arbiter>,
    session: Addr<SessionActor<ForRunner<F>>>,
    fetcher: Addr<Fetcher<T, K, ForRunner<F>>>,
    in_flight: InFlight,
    _reaper: Addr<Reaper<ForRunner<F>>>,
    _gauges: Addr<Gauges<T, ForRunner<F>>>,
    _workers: Arc<[Addr<Worker<T, K>>]>,
}

/// The actor that owns one runner's actors.
pub(crate) struct RunnerSupervisor<T: ScanTask, K: Tasker<T>, F: DbFinder> {
    config: Arc<RunnerConfig>,
    finder: Arc<F>,
    tasker: Arc<K>,
    status: StatusTx,
    metrics: Metrics,
    running: Option<Running<T, K, F>>,
    state: State,
    stop_waiters: Vec<oneshot::Sender<()>>,
    inline: bool,
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> std::fmt::Debug for RunnerSupervisor<T, K, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerSupervisor")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> Actor for RunnerSupervisor<T, K, F> {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        // Inline (tests only): every actor on the caller's arbiter, so that
        // a paused test clock governs them all.
        let (control, worker_arbiters) = if self.inline {
            (None, Vec::new())
        } else {
            let workers = (0..self.config.workers).map(|_| Arbiter::new()).collect();
            (Some(Arbiter::new()), workers)
        };
        let on = |arbiter: Option<&Arbiter>| arbiter.map_or_else(Arbiter::current, Arbiter::handle);
        // Every actor reaches the database through handles made on its own
        // arbiter (see ForRunner): the fetcher's on worker 0's, the others'
        // on the control arbiter.
        let finder = Arc::new(ForRunner::new(self.finder.clone()));
        let fetcher_finder = Arc::new(ForRunner::new(self.finder.clone()));
        let in_flight = InFlight::default();
        let workers: Arc<[Addr<Worker<T, K>>]> = (0..self.config.workers)
            .map(|i| {
                let runner: Arc<str> = self.config.name.as_str().into();
                let tasker = self.tasker.clone();
                let status = self.status.clone();
                let metrics = self.metrics.clone();
                Supervisor::start_in_arbiter(&on(worker_arbiters.get(i)), move |_| {
                    Worker::new(i, runner, tasker, status, metrics)
                })
            })
            .collect();
        let session = {
            let (config, finder, status, metrics) = (
                self.config.clone(),
                finder.clone(),
                self.status.clone(),
                self.metrics.clone(),
            );
            let in_flight = in_flight.clone();
            Supervisor::start_in_arbiter(&on(control.as_ref()), move |_| {
                SessionActor::new(config, finder, status, metrics, in_flight)
            })
        };
        let fetcher = {
            let (config, finder, status, metrics) = (
                self.config.clone(),
                fetcher_finder,
                self.status.clone(),
                self.metrics.clone(),
            );
            let (session, workers, in_flight) =
                (session.clone(), workers.clone(), in_flight.clone());
            Supervisor::start_in_arbiter(&on(worker_arbiters.first()), move |_| {
                Fetcher::new(config, finder, status, metrics, session, workers, in_flight)
            })
        };
        session.do_send(Subscribe(fetcher.clone().recipient()));
        let reaper = {
            let (config, finder) = (self.config.clone(), finder.clone());
            Supervisor::start_in_arbiter(&on(control.as_ref()), move |_| {
                Reaper::new(config, finder)
            })
        };
        let gauges = {
            let (config, finder, status, metrics) = (
                self.config.clone(),
                finder.clone(),
                self.status.clone(),
                self.metrics.clone(),
            );
            Supervisor::start_in_arbiter(&on(control.as_ref()), move |_| {
                Gauges::<T, ForRunner<F>>::new(config, finder, status, metrics)
            })
        };
        tracing::info!(runner = %self.config.name, workers = self.config.workers, "runner started");
        self.running = Some(Running {
            control,
            worker_arbiters,
            session,
            fetcher,
            in_flight,
            _reaper: reaper,
            _gauges: gauges,
            _workers: workers,
        });
    }
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> Handler<Stop> for RunnerSupervisor<T, K, F> {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Stop, _ctx: &mut Context<Self>) -> Self::Result {
        match self.state {
            State::Stopped => return Box::pin(actix::fut::ready(())),
            State::Stopping => {
                let (tx, rx) = oneshot::channel();
                self.stop_waiters.push(tx);
                return Box::pin(
                    async move {
                        let _ = rx.await;
                    }
                    .into_actor(self),
                );
            }
            State::Running => self.state = State::Stopping,
        }
        let Some(running) = self.running.as_ref() else {
            self.finish_stop();
            return Box::pin(actix::fut::ready(()));
        };
        tracing::info!(runner = %self.config.name, "stopping: draining tasks in flight");
        let fetcher = running.fetcher.clone();
        let session = running.session.clone();
        let in_flight = running.in_flight.clone();
        let name = self.config.name.clone();
        let drain_timeout = self.config.drain_timeout;
        // The drain waits drain_timeout for the tick, then STUCK_GRACE for
        // its stopped runs; ending waits for a session start in flight and
        // for the end itself, each bounded by the heartbeat timeout.
        let drain_bound = drain_timeout + STUCK_GRACE + DRAIN_SETTLE;
        let drain_limit = drain_timeout + STUCK_GRACE + STOP_GRACE;
        let end_limit = self.config.heartbeat_timeout * 2 + STOP_GRACE;
        Box::pin(
            async move {
                // Order matters: the session must outlive the tasks in
                // flight (db-scheduler #365: heartbeats stopped before the
                // work did, and the work ran twice).
                let drain = fetcher.send(Drain {
                    timeout: drain_timeout,
                });
                tokio::pin!(drain);
                let left = match tokio::time::timeout(drain_bound, &mut drain).await {
                    Ok(answer) => answer.ok(),
                    Err(_) => {
                        let running = in_flight.ids();
                        if running.is_empty() {
                            // Nothing runs: the drain is finishing what the
                            // last tick completed.
                            tokio::time::timeout(drain_limit - drain_bound, &mut drain)
                                .await
                                .ok()
                                .and_then(Result::ok)
                        } else {
                            // Runs past the drain's own bound and no answer:
                            // a Tasker blocks the fetcher's thread (worker
                            // 0's), and the drain cannot stop them either.
                            report_left(&name, &running);
                            Some(running)
                        }
                    }
                };
                let leave = left.as_ref().is_none_or(|l| !l.is_empty());
                if left.is_none() {
                    tracing::warn!(
                        "the drain did not answer in time: leaving the session to expire"
                    );
                }
                if tokio::time::timeout(end_limit, session.send(EndSession { leave }))
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "ending the session did not finish in time; it will expire after its ttl"
                    );
                }
                left.unwrap_or_default()
            }
            .into_actor(self)
            .map(|left, act, _ctx| {
                act.status.send_modify(|s| s.left_at_stop = left);
                act.finish_stop()
            }),
        )
    }
}

impl<T: ScanTask, K: Tasker<T>, F: DbFinder> RunnerSupervisor<T, K, F> {
    fn finish_stop(&mut self) {
        if let Some(running) = self.running.take() {
            if let Some(control) = &running.control {
                control.stop();
            }
            for arbiter in &running.worker_arbiters {
                arbiter.stop();
            }
        }
        self.state = State::Stopped;
        self.status.send_modify(|s| {
            s.stopped = true;
            s.session = None;
        });
        tracing::info!(runner = %self.config.name, "runner stopped");
        for w in self.stop_waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

/// How long Stop waits, beyond its other bounds, for the fetcher and the
/// session actor to answer.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long past its own bound the drain may take to answer while runs are
/// still in flight before Stop takes them as left running.
const DRAIN_SETTLE: std::time::Duration = std::time::Duration::from_millis(250);

type StartFn = Box<dyn FnOnce() -> RunnerHandle + Send>;

/// Several runners (different names, taskers and tables) started and
/// stopped together. Send it [`Stop`] to stop them all.
#[derive(Default)]
pub struct RunnerServer {
    pending: Vec<StartFn>,
    runners: Vec<RunnerHandle>,
}

impl std::fmt::Debug for RunnerServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerServer")
            .field("runners", &self.runners)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl RunnerServer {
    /// An empty server.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a runner, started with the others.
    pub fn with<T: ScanTask, K: Tasker<T>, F: DbFinder>(mut self, runner: Runner<T, K, F>) -> Self {
        self.pending.push(Box::new(move || runner.start()));
        self
    }

    /// Starts every runner and returns the server's address and a handle on
    /// each runner, in the order they were added. Must be called inside an
    /// actix System.
    pub fn start_all(mut self) -> (Addr<RunnerServer>, Vec<RunnerHandle>) {
        let handles: Vec<RunnerHandle> = self.pending.drain(..).map(|start| start()).collect();
        self.runners = handles.clone();
        (Actor::start(self), handles)
    }
}

impl Actor for RunnerServer {
    type Context = Context<Self>;
}

impl Handler<Stop> for RunnerServer {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Stop, _ctx: &mut Context<Self>) -> Self::Result {
        let runners = self.runners.clone();
        Box::pin(async move {
            join_all(runners.iter().map(|r| r.stop())).await;
        })
    }
}
