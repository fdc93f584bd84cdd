//! The worker pool: actors that run the user's Tasker on slices of a batch.
//!
//! Each worker has a thread (an arbiter) of its own, so a Tasker that
//! blocks its thread holds up only its own worker, and runs one slice at a
//! time: a worker never starts a slice before the previous one returned.
//! Each worker catches what the Tasker does wrong. An error keeps the tasks
//! it reported complete and gives the rest back for a later tick; a panic or
//! a timeout does the same and then restarts the worker (a panic could have
//! left the Tasker's state half-updated, and a timed-out Tasker's future is
//! dropped mid-flight). Ids the Tasker was not given are ignored and
//! reported; ids given twice count once.

use std::collections::HashSet;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::FutureExt;
use futures_util::future::{AbortRegistration, Abortable};

use crate::error::Panic;
use crate::status::StatusTx;
use crate::task::{Task, TaskId};
use crate::tasker::{Progress, Tasker};
use crate::telemetry::Metrics;

/// Run the Tasker on `tasks` (whose ids are `ids`, read by the fetcher),
/// giving up after `timeout` or when aborted.
pub(crate) struct RunSlice<T> {
    pub(crate) tasks: Vec<T>,
    pub(crate) ids: Vec<TaskId>,
    pub(crate) timeout: Duration,
    pub(crate) abort: AbortRegistration,
}

impl<T: Task> Message for RunSlice<T> {
    type Result = SliceOutcome;
}

/// What became of a slice.
#[derive(Debug, Default)]
pub(crate) struct SliceOutcome {
    /// Tasks the Tasker completed (reported through Progress or returned),
    /// restricted to the slice, each once.
    pub(crate) completed: Vec<TaskId>,
    /// Tasks of the slice not completed: they stay assigned and run again.
    pub(crate) failed: usize,
    /// Why some tasks failed, if they did.
    pub(crate) error: Option<String>,
}

pub(crate) struct Worker<T, K> {
    index: usize,
    runner: Arc<str>,
    tasker: Arc<K>,
    status: StatusTx,
    metrics: Metrics,
    _task: PhantomData<fn() -> T>,
}

impl<T: Task, K: Tasker<T>> Worker<T, K> {
    pub(crate) fn new(
        index: usize,
        runner: Arc<str>,
        tasker: Arc<K>,
        status: StatusTx,
        metrics: Metrics,
    ) -> Self {
        Worker {
            index,
            runner,
            tasker,
            status,
            metrics,
            _task: PhantomData,
        }
    }
}

impl<T: Task, K: Tasker<T>> Actor for Worker<T, K> {
    type Context = Context<Self>;
}

impl<T: Task, K: Tasker<T>> Supervised for Worker<T, K> {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        tracing::info!(runner = %self.runner, worker = self.index, "worker restarted");
        self.metrics.worker_restart();
        self.status.send_modify(|s| s.worker_restarts += 1);
    }
}

enum Ending {
    Returned(Vec<TaskId>),
    Failed(String),
    Panicked(String),
    TimedOut(Duration),
    Aborted,
}

impl<T: Task, K: Tasker<T>> Handler<RunSlice<T>> for Worker<T, K> {
    // Atomic: the worker takes no other message until the slice returns.
    type Result = AtomicResponse<Self, SliceOutcome>;

    fn handle(&mut self, msg: RunSlice<T>, _ctx: &mut Context<Self>) -> Self::Result {
        let given = msg.ids;
        let progress = Progress::default();
        let tasker = self.tasker.clone();
        let timeout = msg.timeout;
        let fut = async move {
            // The call itself goes inside the guarded future: a Tasker may
            // panic before it even returns its future.
            let reported = progress.clone();
            let run = AssertUnwindSafe(async move { tasker.run(msg.tasks, reported).await })
                .catch_unwind();
            let run = Abortable::new(tokio::time::timeout(timeout, run), msg.abort);
            let ending = match run.await {
                Err(_aborted) => Ending::Aborted,
                Ok(Err(_elapsed)) => Ending::TimedOut(timeout),
                Ok(Ok(Err(panic))) => Ending::Panicked(Panic::from_payload(&*panic).to_string()),
                Ok(Ok(Ok(Err(e)))) => Ending::Failed(e.to_string()),
                Ok(Ok(Ok(Ok(ids)))) => Ending::Returned(ids),
            };
            (ending, progress.take())
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(
            move |(ending, reported), act, ctx| act.outcome(ctx, &given, ending, reported),
        )))
    }
}

impl<T: Task, K: Tasker<T>> Worker<T, K> {
    fn outcome(
        &mut self,
        ctx: &mut Context<Self>,
        given: &[TaskId],
        ending: Ending,
        mut reported: Vec<TaskId>,
    ) -> SliceOutcome {
        let mut error = None;
        let mut restart = false;
        match ending {
            Ending::Returned(ids) => reported.extend(ids),
            Ending::Failed(e) => error = Some(format!("tasker failed: {e}")),
            Ending::Panicked(p) => {
                error = Some(format!("tasker panicked: {p}"));
                restart = true;
            }
            Ending::TimedOut(t) => {
                error = Some(format!("tasker timed out after {t:?} (batch timeout)"));
                restart = true;
            }
            Ending::Aborted => {
                error = Some("tasker stopped: session fenced or runner stopping".into())
            }
        }
        let given_set: HashSet<TaskId> = given.iter().copied().collect();
        let mut seen = HashSet::with_capacity(reported.len());
        let mut foreign = Vec::new();
        let mut completed = Vec::with_capacity(reported.len());
        for id in reported {
            if !given_set.contains(&id) {
                foreign.push(id);
            } else if seen.insert(id) {
                completed.push(id);
            }
        }
        if !foreign.is_empty() {
            tracing::warn!(
                runner = %self.runner,
                worker = self.index,
                ids = ?foreign,
                "the tasker reported ids it was not given; ignored"
            );
            let note = format!("tasker reported ids it was not given: {foreign:?}");
            error = Some(match error {
                Some(e) => format!("{e}; {note}"),
                None => note,
            });
        }
        let failed = given.len() - completed.len();
        if let Some(e) = &error {
            tracing::warn!(runner = %self.runner, worker = self.index, failed, error = %e, "slice did not fully complete");
        }
        if restart {
            // Supervised: actix starts a fresh worker on the same address.
            ctx.stop();
        }
        SliceOutcome {
            completed,
            failed,
            error,
        }
    }
}
