//! The worked example's task type: a row of `public.example_task`, the table
//! that `migrations/example/` creates and fills the task template in for.
//! The tests, the demo, the benchmarks and `session-lock worker` use it.

use std::time::SystemTime;

use tokio_postgres::Row;

use crate::error::ScanError;
use crate::task::{ScanTask, Task, TaskId, TaskQueries, column};

/// The channel `public.example_task` notifies on when tasks are inserted.
pub const EXAMPLE_NOTIFY_CHANNEL: &str = "session_lock_example_task";

/// A row of `public.example_task`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExampleTask {
    /// The task's id.
    pub id: TaskId,
    /// What to do; opaque to session-lock.
    pub payload: String,
    /// When the task was inserted.
    pub created_at: SystemTime,
    /// The session holding the task when it was fetched.
    pub session_id: Option<i64>,
}

impl Task for ExampleTask {
    fn id(&self) -> TaskId {
        self.id
    }
}

impl ScanTask for ExampleTask {
    const QUERIES: TaskQueries =
        crate::task_queries!("public.example_task", notify = "session_lock_example_task");

    fn scan(row: &Row) -> Result<Self, ScanError> {
        let id = column(row, None, "id")?;
        Ok(ExampleTask {
            id,
            payload: column(row, Some(id), "payload")?,
            created_at: column(row, Some(id), "created_at")?,
            session_id: column(row, Some(id), "session_id")?,
        })
    }
}
