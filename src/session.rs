//! The session actor: starts the session, heartbeats, replaces a lost
//! session, fences itself when its lease may have run out, and ends the
//! session on stop.
//!
//! Self-fencing: the actor keeps, on this process's monotonic clock, the
//! moment the last successful renewal was *sent* (a heartbeat, or a
//! `get_work`, which also renews). The database extended the lease from a
//! moment no earlier than that, so `sent + ttl` is never later than the
//! database's expiry. At `sent + ttl - safety_margin` the actor tells the
//! fetcher to stop using the session: a frozen or partitioned process stops
//! its work before the others may take its tasks over. If a later heartbeat
//! succeeds the fence is lifted; if it reports SL001, a new session starts.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::backoff::{Backoff, process_seed};
use crate::catch::{bounded, caught};
use crate::config::RunnerConfig;
use crate::status::StatusTx;
use crate::store::{Database, DbFinder, SessionId, SessionStart};
use crate::telemetry::{
    Metrics, SPAN_HEARTBEAT_FAILURE, SPAN_SESSION_END, SPAN_SESSION_LOSS, SPAN_SESSION_START,
};

/// The session the fetcher may use, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) session: SessionId,
}

/// The session the fetcher may use changed: `None` means stop using any.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct LeaseChanged(pub(crate) Option<Lease>);

/// Sends lease changes to `0`, starting with the current state.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Subscribe(pub(crate) Recipient<LeaseChanged>);

/// A `get_work` for `session`, sent at `sent_at`, succeeded: it renewed the
/// lease like a heartbeat.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Renewed {
    pub(crate) session: SessionId,
    pub(crate) sent_at: Instant,
}

/// The database reported `session` lost (SL001).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Lost {
    pub(crate) session: SessionId,
}

/// Stop heartbeating and end the session; replies when it is ended.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct EndSession;

pub(crate) struct SessionActor<F: DbFinder> {
    config: Arc<RunnerConfig>,
    finder: Arc<F>,
    status: StatusTx,
    metrics: Metrics,
    subscriber: Option<Recipient<LeaseChanged>>,
    session: Option<SessionId>,
    /// When the last successful renewal of `session` was sent.
    renewed_at: Option<Instant>,
    fenced: bool,
    starting: bool,
    bumping: bool,
    stopped: bool,
    start_waiters: Vec<oneshot::Sender<()>>,
    backoff: Backoff,
    fence_timer: Option<SpawnHandle>,
}

impl<F: DbFinder> SessionActor<F> {
    pub(crate) fn new(
        config: Arc<RunnerConfig>,
        finder: Arc<F>,
        status: StatusTx,
        metrics: Metrics,
    ) -> Self {
        let seed = config.jitter_seed.unwrap_or_else(process_seed) ^ 0x5e55;
        let backoff = Backoff::new(config.retry_max, seed);
        SessionActor {
            config,
            finder,
            status,
            metrics,
            subscriber: None,
            session: None,
            renewed_at: None,
            fenced: false,
            starting: false,
            bumping: false,
            stopped: false,
            start_waiters: Vec::new(),
            backoff,
            fence_timer: None,
        }
    }

    /// The lease the fetcher may use now.
    fn lease(&self) -> Option<Lease> {
        match (self.session, self.fenced, self.stopped) {
            (Some(session), false, false) => Some(Lease { session }),
            _ => None,
        }
    }

    fn publish(&self) {
        let lease = self.lease();
        self.status
            .send_modify(|s| s.session = lease.map(|l| l.session));
        if let Some(sub) = &self.subscriber {
            sub.do_send(LeaseChanged(lease));
        }
    }

    fn start_session(&mut self, ctx: &mut Context<Self>) {
        if self.starting || self.stopped || self.session.is_some() {
            return;
        }
        self.starting = true;
        let finder = self.finder.clone();
        let params = SessionStart::new(self.config.name.clone(), self.config.ttl);
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
        // retries (a timed-out start may leave a session row that simply
        // expires).
        let limit = self.config.ttl;
        let fut = bounded(limit, async move {
            let db = finder.find().await?;
            db.session_start(&params).await
        });
        let fut = caught(fut).instrument(fut_span);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.starting = false;
            match res {
                Ok(id) => {
                    span.record("session_lock.session.id", id);
                    tracing::info!(parent: &span, session = id, "session started");
                    act.session = Some(id);
                    act.fenced = false;
                    act.backoff.reset();
                    act.status.send_modify(|s| {
                        s.session_starts += 1;
                        s.last_error = None;
                    });
                    act.renewed(ctx, id, sent_at);
                    if !act.stopped {
                        act.publish();
                    }
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

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        let Some(session) = self.session else {
            return;
        };
        if self.bumping || self.stopped {
            return;
        }
        self.bumping = true;
        let finder = self.finder.clone();
        let ttl = self.config.ttl;
        let sent_at = Instant::now();
        // Bounded by the time left before the fence: a bump that gets no
        // answer by then is a failed heartbeat, retried, not one that never
        // ends. (Not by the heartbeat interval: a slow but working link,
        // say 500 ms each way, would then fail every heartbeat.)
        let limit = self.config.ttl - self.config.safety_margin;
        let fut = caught(bounded(limit, async move {
            let db = finder.find().await?;
            db.session_bump(session, ttl).await
        }));
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.bumping = false;
            if act.session != Some(session) {
                return; // replaced or ended while the heartbeat was in flight
            }
            match res {
                Ok(()) => {
                    act.backoff.reset();
                    act.status.send_modify(|s| s.heartbeats += 1);
                    act.renewed(ctx, session, sent_at);
                }
                Err(e) if e.is_session_lost() => act.lost(ctx, session, "heartbeat"),
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

    /// A renewal of `session` sent at `sent_at` succeeded: move the fence.
    fn renewed(&mut self, ctx: &mut Context<Self>, session: SessionId, sent_at: Instant) {
        if self.session != Some(session) {
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
        if self.session != Some(session) || self.fenced || self.stopped {
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

    fn lost(&mut self, ctx: &mut Context<Self>, session: SessionId, during: &'static str) {
        if self.session != Some(session) {
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
        span.in_scope(|| {
            tracing::warn!(session, during, "session lost (SL001): starting a new one")
        });
        self.session = None;
        self.renewed_at = None;
        self.fenced = false;
        if let Some(timer) = self.fence_timer.take() {
            ctx.cancel_future(timer);
        }
        self.status.send_modify(|s| {
            s.session_losses += 1;
            s.last_error = Some(format!("session {session} lost during {during}"));
        });
        self.publish();
        self.start_session(ctx);
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
        self.status.send_modify(|s| s.actor_restarts += 1);
    }
}

impl<F: DbFinder> Handler<Subscribe> for SessionActor<F> {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, _ctx: &mut Context<Self>) {
        msg.0.do_send(LeaseChanged(self.lease()));
        self.subscriber = Some(msg.0);
    }
}

impl<F: DbFinder> Handler<Renewed> for SessionActor<F> {
    type Result = ();

    fn handle(&mut self, msg: Renewed, ctx: &mut Context<Self>) {
        self.renewed(ctx, msg.session, msg.sent_at);
    }
}

impl<F: DbFinder> Handler<Lost> for SessionActor<F> {
    type Result = ();

    fn handle(&mut self, msg: Lost, ctx: &mut Context<Self>) {
        self.lost(ctx, msg.session, "get_work or finish");
    }
}

impl<F: DbFinder> Handler<EndSession> for SessionActor<F> {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: EndSession, ctx: &mut Context<Self>) -> Self::Result {
        self.stopped = true;
        if let Some(timer) = self.fence_timer.take() {
            ctx.cancel_future(timer);
        }
        // A start in flight cannot be called back: wait for it, then end
        // whatever session it produced.
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
                let session = act.session.take();
                act.publish();
                let finder = act.finder.clone();
                let name = act.config.name.clone();
                async move {
                    let Some(session) = session else {
                        return;
                    };
                    let span = tracing::info_span!(
                        SPAN_SESSION_END,
                        otel.name = SPAN_SESSION_END,
                        session_lock.runner = %name,
                        session_lock.session.id = session,
                        otel.status_code = tracing::field::Empty,
                    );
                    let res = caught(async {
                        let db = finder.find().await?;
                        db.session_end(session).await
                    })
                    .instrument(span.clone())
                    .await;
                    match res {
                        Ok(_) => tracing::info!(parent: &span, session, "session ended"),
                        Err(e) => {
                            span.record("otel.status_code", "ERROR");
                            // Not fatal: the lease runs out on its own.
                            tracing::warn!(parent: &span, session, error = %e, "cannot end the session; it will expire after its ttl");
                        }
                    }
                }
                .into_actor(act)
            }),
        )
    }
}
