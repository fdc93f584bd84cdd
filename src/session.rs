//! The session actor: starts the session, heartbeats, replaces a lost
//! session, fences itself when its lease may have run out, and on stop
//! ends the session, or leaves it to expire when work it started is still
//! running.
//!
//! Self-fencing: the actor keeps, on this process's monotonic clock, the
//! moment the last successful heartbeat was *sent*. The database extended
//! the lease from a moment no earlier than that (and never shortens a
//! lease), so `sent + ttl` is never later than the database's expiry. At
//! `sent + ttl - safety_margin` the actor tells the fetcher to stop using
//! the session: a frozen or partitioned process stops its work before the
//! others may take its tasks over. A later successful heartbeat lifts the
//! fence; SL001 means the session is gone, and a new one starts.
//!
//! The heartbeat is the only renewal. Each one is bounded by
//! `heartbeat_timeout`, and stores give it connections nothing else uses,
//! so neither a slow get_work nor the application's queries delay it.
//!
//! What it cannot stop, it does not renew: while the fetcher reports runs
//! that outlived every timeout (a Tasker blocking its thread), the actor
//! suspends the heartbeat, so the lease expires and the tasks move on,
//! instead of being held for ever by a run nobody can end.
//!
//! A session lives in one database. Before each heartbeat the actor checks
//! the database's identity; if the DbFinder now finds another database,
//! the session is dropped there (never ended with an id that means another
//! session here) and a new one starts in the new database.

use std::sync::Arc;
use tokio::time::Instant;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::backoff::{Backoff, process_seed};
use crate::catch::{bounded, caught};
use crate::config::RunnerConfig;
use crate::error::Error;
use crate::in_flight::{InFlight, Watch, report_stuck};
use crate::status::StatusTx;
use crate::store::{Database, DatabaseId, DbFinder, Session, SessionId, SessionStart};
use crate::telemetry::{
    Metrics, SPAN_HEARTBEAT_FAILURE, SPAN_SESSION_END, SPAN_SESSION_LOSS, SPAN_SESSION_START,
};

/// The session the fetcher may use, and the database it lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) session: Session,
    pub(crate) database: DatabaseId,
}

/// The session the fetcher may use changed: `None` means stop using any.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct LeaseChanged(pub(crate) Option<Lease>);

/// Sends lease changes to `0`, starting with the current state.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Subscribe(pub(crate) Recipient<LeaseChanged>);

/// The database reported `session` lost (SL001) or refused it (SL004).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Lost {
    pub(crate) session: SessionId,
}

/// The DbFinder found another database than `session`'s.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Moved {
    pub(crate) session: SessionId,
}

/// Runs of `session`'s tasks outlived every timeout (`true`): stop renewing
/// it; or they have all returned (`false`): renew it again if it is still
/// live.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Stuck {
    pub(crate) session: SessionId,
    pub(crate) stuck: bool,
}

/// Stop heartbeating. With `leave`, the session is left to expire (work it
/// started is still running); otherwise it is ended. Replies when done.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct EndSession {
    pub(crate) leave: bool,
}

pub(crate) struct SessionActor<F: DbFinder> {
    config: Arc<RunnerConfig>,
    finder: Arc<F>,
    status: StatusTx,
    metrics: Metrics,
    subscriber: Option<Recipient<LeaseChanged>>,
    lease: Option<Lease>,
    /// When the last successful heartbeat of `lease` was sent.
    renewed_at: Option<Instant>,
    fenced: bool,
    /// Runs of the session's tasks outlived every timeout: not renewed.
    suspended: bool,
    starting: bool,
    bumping: bool,
    stopped: bool,
    start_waiters: Vec<oneshot::Sender<()>>,
    backoff: Backoff,
    fence_timer: Option<SpawnHandle>,
    /// The fetcher's batch in flight: stuck past its deadline even when a
    /// Tasker blocks the fetcher's thread (see `in_flight`).
    in_flight: InFlight,
    /// A look at that batch due at its deadline.
    watch_timer: Option<SpawnHandle>,
}

impl<F: DbFinder> SessionActor<F> {
    pub(crate) fn new(
        config: Arc<RunnerConfig>,
        finder: Arc<F>,
        status: StatusTx,
        metrics: Metrics,
        in_flight: InFlight,
    ) -> Self {
        let seed = config.jitter_seed.unwrap_or_else(process_seed) ^ 0x5e55;
        let backoff = Backoff::new(config.retry_max, seed);
        SessionActor {
            config,
            finder,
            status,
            metrics,
            subscriber: None,
            lease: None,
            renewed_at: None,
            fenced: false,
            suspended: false,
            starting: false,
            bumping: false,
            stopped: false,
            start_waiters: Vec::new(),
            backoff,
            fence_timer: None,
            in_flight,
            watch_timer: None,
        }
    }

    fn session(&self) -> Option<SessionId> {
        self.lease.as_ref().map(|l| l.session.id)
    }

    /// The lease the fetcher may use now.
    fn usable(&self) -> Option<Lease> {
        if self.fenced || self.stopped || self.suspended {
            return None;
        }
        self.lease.clone()
    }

    fn publish(&self) {
        let lease = self.usable();
        if lease.is_none() {
            // The fetcher stops its runs on this too, unless a Tasker
            // blocks its thread: stop them from here as well.
            self.in_flight.abort();
        }
        self.status
            .send_modify(|s| s.session = lease.as_ref().map(|l| l.session.id));
        if let Some(sub) = &self.subscriber {
            sub.do_send(LeaseChanged(lease));
        }
    }

    fn start_session(&mut self, ctx: &mut Context<Self>) {
        if self.starting || self.stopped || self.lease.is_some() {
            return;
        }
        self.starting = true;
        let finder = self.finder.clone();
        let params = SessionStart::new(
            self.config.name.clone(),
            self.config.ttl,
            self.config.max_tasks,
        );
        let span = tracing::info_span!(
            SPAN_SESSION_START,
            otel.name = SPAN_SESSION_START,
            session_lock.runner = %self.config.name,
            session_lock.session.id = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            error.message = tracing::field::Empty,
        );
        let fut_span = span.clone();
        let sent_at = Instant::now();
        // Bounded: a start stuck behind a partition must not block the
        // retries (a start that timed out may leave a session row that
        // simply expires).
        let limit = self.config.heartbeat_timeout;
        let fut = bounded(limit, async move {
            let db = finder.find().await?;
            let database = db.database_identity().await?;
            let session = db.start_session(&params).await?;
            Ok(Lease { session, database })
        });
        let fut = caught(fut).instrument(fut_span);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.starting = false;
            match res {
                Ok(lease) if act.stopped => {
                    // Stop came while the start was in flight: a session
                    // nobody will use must not count in everyone's shares.
                    // The waiting EndSession ends it.
                    tracing::info!(parent: &span, session = lease.session.id, "session started after stop: ending it");
                    act.lease = Some(lease);
                }
                Ok(lease) => {
                    let id = lease.session.id;
                    span.record("session_lock.session.id", id);
                    tracing::info!(parent: &span, session = id, database = %lease.database, "session started");
                    act.lease = Some(lease);
                    act.fenced = false;
                    act.suspended = false;
                    act.backoff.reset();
                    act.status.send_modify(|s| {
                        s.session_starts += 1;
                        s.last_error = None;
                    });
                    act.renewed(ctx, id, sent_at);
                    act.publish();
                }
                Err(e) => {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.message", tracing::field::display(&e));
                    let delay = act.backoff.next_delay();
                    tracing::warn!(parent: &span, error = %e, retry_in = ?delay, "cannot start a session");
                    act.status
                        .send_modify(|s| s.last_error = Some(format!("starting a session: {e}")));
                    ctx.run_later(delay, |act, ctx| act.start_session(ctx));
                }
            }
            for w in act.start_waiters.drain(..) {
                let _ = w.send(());
            }
        }));
    }

    /// Looks at the fetcher's batch in flight: past its deadline, the
    /// session is no longer renewed until the batch has returned; running,
    /// it is looked at again at its deadline.
    fn watch(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        match self.in_flight.watch(now) {
            Watch::Until(deadline) => {
                if self.watch_timer.is_none() {
                    let wait = deadline.saturating_duration_since(now);
                    self.watch_timer = Some(ctx.run_later(wait, |act, ctx| {
                        act.watch_timer = None;
                        act.watch(ctx);
                    }));
                }
            }
            Watch::Stuck(session, timeout) => {
                report_stuck(
                    &self.config,
                    &self.metrics,
                    &self.status,
                    session,
                    &self.in_flight.ids(),
                    timeout,
                );
                self.stuck(ctx, session, true);
            }
            // The fetcher's report may still be on its way here.
            Watch::Reported(session) => self.stuck(ctx, session, true),
            // Every run returned: renew again, whether or not the
            // fetcher's word of it arrives (its tick may have been dropped).
            Watch::Nothing => {
                if let (true, Some(session)) = (self.suspended, self.session()) {
                    self.stuck(ctx, session, false);
                }
            }
            Watch::Orphaned => {}
        }
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        // Before renewing: a batch past its deadline stops the renewals.
        self.watch(ctx);
        let Some(lease) = self.lease.clone() else {
            return;
        };
        if self.bumping || self.stopped || self.suspended {
            return;
        }
        self.bumping = true;
        let finder = self.finder.clone();
        let ttl = self.config.ttl;
        let sent_at = Instant::now();
        let limit = self.config.heartbeat_timeout;
        let session = lease.session.id;
        let fut = caught(bounded(limit, async move {
            let db = finder.find().await?;
            if db.database_identity().await? != lease.database {
                return Ok(false);
            }
            db.bump_session(&lease.session, ttl).await.map(|()| true)
        }));
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.bumping = false;
            if act.session() != Some(session) || act.suspended {
                return; // replaced, ended or suspended while in flight
            }
            match res {
                Ok(true) => {
                    act.backoff.reset();
                    act.status.send_modify(|s| s.heartbeats += 1);
                    act.renewed(ctx, session, sent_at);
                }
                Ok(false) => act.moved(ctx, session),
                Err(e) if e.is_session_lost() || is_refused(&e) => {
                    act.lost(ctx, session, "heartbeat", &e)
                }
                Err(e) => {
                    act.metrics.heartbeat_failure();
                    let span = tracing::warn_span!(
                        SPAN_HEARTBEAT_FAILURE,
                        otel.name = SPAN_HEARTBEAT_FAILURE,
                        session_lock.runner = %act.config.name,
                        session_lock.session.id = session,
                        otel.status_code = "ERROR",
                        error.message = %e,
                    );
                    let retry = act.backoff.next_delay().min(act.config.heartbeat);
                    span.in_scope(
                        || tracing::warn!(error = %e, retry_in = ?retry, "heartbeat failed"),
                    );
                    act.status.send_modify(|s| {
                        s.heartbeat_failures += 1;
                        s.last_error = Some(format!("heartbeat: {e}"));
                    });
                    // Retry sooner than the next interval: the lease is running out.
                    ctx.run_later(retry, |act, ctx| act.heartbeat(ctx));
                }
            }
        }));
    }

    /// A heartbeat of `session` sent at `sent_at` succeeded: move the fence.
    fn renewed(&mut self, ctx: &mut Context<Self>, session: SessionId, sent_at: Instant) {
        if self.session() != Some(session) {
            return;
        }
        let latest = match self.renewed_at {
            Some(prev) if prev > sent_at => prev,
            _ => sent_at,
        };
        self.renewed_at = Some(latest);
        if let Some(timer) = self.fence_timer.take() {
            ctx.cancel_future(timer);
        }
        let fence_at = latest + (self.config.ttl - self.config.safety_margin);
        let wait = fence_at.saturating_duration_since(Instant::now());
        self.fence_timer = Some(ctx.run_later(wait, move |act, _| act.check_fence(session)));
        if self.fenced {
            tracing::info!(session, runner = %self.config.name, "lease renewed: fence lifted");
            self.fenced = false;
            self.publish();
        }
    }

    fn check_fence(&mut self, session: SessionId) {
        if self.session() != Some(session) || self.fenced || self.stopped {
            return;
        }
        let Some(renewed_at) = self.renewed_at else {
            return;
        };
        let fence_at = renewed_at + (self.config.ttl - self.config.safety_margin);
        if Instant::now() >= fence_at {
            tracing::warn!(
                session,
                runner = %self.config.name,
                since_renewal = ?renewed_at.elapsed(),
                "no successful heartbeat within ttl - safety margin: fencing the session"
            );
            self.fenced = true;
            self.metrics.fence();
            self.status.send_modify(|s| {
                s.fences += 1;
                s.last_error = Some(format!("session {session} fenced: no heartbeat in time"));
            });
            self.publish();
        }
    }

    /// Forgets the session (without ending it) and starts a new one.
    fn drop_session(&mut self, ctx: &mut Context<Self>) {
        self.lease = None;
        self.renewed_at = None;
        self.fenced = false;
        self.suspended = false;
        if let Some(timer) = self.fence_timer.take() {
            ctx.cancel_future(timer);
        }
        self.publish();
        self.start_session(ctx);
    }

    fn lost(&mut self, ctx: &mut Context<Self>, session: SessionId, during: &str, e: &Error) {
        if self.session() != Some(session) {
            return;
        }
        self.metrics.session_loss();
        let span = tracing::warn_span!(
            SPAN_SESSION_LOSS,
            otel.name = SPAN_SESSION_LOSS,
            session_lock.runner = %self.config.name,
            session_lock.session.id = session,
            otel.status_code = "ERROR",
        );
        span.in_scope(
            || tracing::warn!(session, during, error = %e, "session lost: starting a new one"),
        );
        self.status.send_modify(|s| {
            s.session_losses += 1;
            s.last_error = Some(format!("session {session} lost during {during}: {e}"));
        });
        self.drop_session(ctx);
    }

    fn moved(&mut self, ctx: &mut Context<Self>, session: SessionId) {
        if self.session() != Some(session) {
            return;
        }
        tracing::warn!(session, runner = %self.config.name,
            "the database moved: dropping the session there and starting one in the new database");
        self.status.send_modify(|s| {
            s.database_moves += 1;
            s.last_error = Some(format!(
                "session {session} dropped: the DbFinder found another database"
            ));
        });
        self.drop_session(ctx);
    }
}

/// Whether the database refused the session for good: another protocol
/// version (SL004). Handled like a loss: a new session is tried, and its
/// start reports the mismatch.
fn is_refused(e: &Error) -> bool {
    matches!(e, Error::ProtocolMismatch { .. })
}

/// Ends `session` in the database (idempotent), within `limit`; a failure
/// is not fatal: the lease runs out on its own.
async fn end_session<F: DbFinder>(
    finder: Arc<F>,
    name: String,
    session: Session,
    limit: std::time::Duration,
) {
    let id = session.id;
    let span = tracing::info_span!(
        SPAN_SESSION_END,
        otel.name = SPAN_SESSION_END,
        session_lock.runner = %name,
        session_lock.session.id = id,
        otel.status_code = tracing::field::Empty,
    );
    let res = caught(bounded(limit, async {
        let db = finder.find().await?;
        db.end_session(&session).await
    }))
    .instrument(span.clone())
    .await;
    match res {
        Ok(_) => tracing::info!(parent: &span, session = id, "session ended"),
        Err(e) => {
            span.record("otel.status_code", "ERROR");
            tracing::warn!(parent: &span, session = id, error = %e, "cannot end the session; it will expire after its ttl");
        }
    }
}

impl<F: DbFinder> Actor for SessionActor<F> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.start_session(ctx);
        ctx.run_interval(self.config.heartbeat, |act, ctx| act.heartbeat(ctx));
    }
}

impl<F: DbFinder> Supervised for SessionActor<F> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        // Timers and futures of the old context are gone; the session, if
        // any, is still ours and the fence is re-armed by the next renewal.
        self.starting = false;
        self.bumping = false;
        self.fence_timer = None;
        self.watch_timer = None;
        self.status.send_modify(|s| s.actor_restarts += 1);
    }
}

impl<F: DbFinder> Handler<Subscribe> for SessionActor<F> {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) {
        msg.0.do_send(LeaseChanged(self.usable()));
        self.subscriber = Some(msg.0);
    }
}

impl<F: DbFinder> Handler<Lost> for SessionActor<F> {
    type Result = ();

    fn handle(&mut self, msg: Lost, ctx: &mut Context<Self>) {
        let e = Error::SessionLost {
            session: msg.session,
        };
        self.lost(ctx, msg.session, "get_work or finish", &e);
    }
}

impl<F: DbFinder> Handler<Moved> for SessionActor<F> {
    type Result = ();

    fn handle(&mut self, msg: Moved, ctx: &mut Context<Self>) {
        self.moved(ctx, msg.session);
    }
}

impl<F: DbFinder> Handler<Stuck> for SessionActor<F> {
    type Result = ();

    fn handle(&mut self, msg: Stuck, ctx: &mut Context<Self>) {
        self.stuck(ctx, msg.session, msg.stuck);
    }
}

impl<F: DbFinder> SessionActor<F> {
    /// Runs of `session`'s tasks outlived every timeout (`stuck`), or have
    /// all returned since.
    fn stuck(&mut self, ctx: &mut Context<Self>, session: SessionId, stuck: bool) {
        if self.session() != Some(session) || self.suspended == stuck {
            return;
        }
        self.suspended = stuck;
        if stuck {
            tracing::error!(session, runner = %self.config.name,
                "runs outlived every timeout: no longer renewing the session, so that its lease expires and its tasks move on");
            self.publish();
        } else {
            tracing::info!(session, runner = %self.config.name,
                "the runs that outlived their timeouts returned: renewing the session again if it is still live");
            // The heartbeat lifts the fence if the lease is still live, and
            // starts a new session if not.
            self.fenced = true;
            self.heartbeat(ctx);
        }
    }
}

impl<F: DbFinder> Handler<EndSession> for SessionActor<F> {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: EndSession, ctx: &mut Context<Self>) -> Self::Result {
        self.stopped = true;
        if let Some(timer) = self.fence_timer.take() {
            ctx.cancel_future(timer);
        }
        self.publish();
        if msg.leave {
            if let Some(lease) = self.lease.take() {
                tracing::warn!(session = lease.session.id, runner = %self.config.name,
                    "stopping with runs still in flight: leaving the session to expire after its ttl");
            }
        }
        // A start in flight cannot be called back: wait for it, then end
        // whatever it started (its completion keeps the lease for us).
        let wait = self.starting.then(|| {
            let (tx, rx) = oneshot::channel();
            self.start_waiters.push(tx);
            rx
        });
        Box::pin(
            async move {
                if let Some(rx) = wait {
                    let _ = rx.await;
                }
            }
            .into_actor(self)
            .then(|(), act, _ctx| {
                let session = act.lease.take().map(|l| l.session);
                let finder = act.finder.clone();
                let name = act.config.name.clone();
                let limit = act.config.heartbeat_timeout;
                async move {
                    if let Some(session) = session {
                        end_session(finder, name, session, limit).await;
                    }
                }
                .into_actor(act)
            }),
        )
    }
}
