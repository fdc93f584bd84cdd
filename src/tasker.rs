//! The Tasker: the user's code that does a batch of tasks.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use crate::task::{Task, TaskId};

/// An error a [`Tasker`] returns; its tasks not reported complete run again.
pub type TaskerError = Box<dyn std::error::Error + Send + Sync>;

/// Does a batch of tasks (the glossary's *Tasker*).
///
/// A runner hands each worker a slice of its batch. The tasker reports each
/// task it completes, either through [`Progress::complete`] as it goes (kept
/// even if the tasker later fails, panics or times out) or in the `Vec` it
/// returns; both are finished. Tasks it does not report stay assigned to the
/// session and run again on a later tick: execution is at-least-once, so
/// make tasks idempotent.
///
/// A closure `Fn(Vec<T>, Progress) -> impl Future<Output = Result<Vec<TaskId>, TaskerError>>`
/// is a Tasker.
pub trait Tasker<T: Task>: Send + Sync + 'static {
    /// Runs `tasks`; returns the ids of those completed.
    fn run(
        &self,
        tasks: Vec<T>,
        progress: Progress,
    ) -> impl Future<Output = Result<Vec<TaskId>, TaskerError>> + Send;
}

impl<T, F, Fut> Tasker<T> for F
where
    T: Task,
    F: Fn(Vec<T>, Progress) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<TaskId>, TaskerError>> + Send,
{
    fn run(
        &self,
        tasks: Vec<T>,
        progress: Progress,
    ) -> impl Future<Output = Result<Vec<TaskId>, TaskerError>> + Send {
        self(tasks, progress)
    }
}

/// Where a tasker reports tasks as it completes them, so that completed
/// work is finished even when the rest of the batch fails.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    done: Arc<Mutex<Vec<TaskId>>>,
}

impl Progress {
    /// Records that task `id` is complete.
    pub fn complete(&self, id: TaskId) {
        self.done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(id);
    }

    /// The ids reported so far.
    pub(crate) fn take(&self) -> Vec<TaskId> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(PoisonError::into_inner))
    }
}
