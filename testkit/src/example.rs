//! The worked example's task type: a row of `public.example_task`, the table
//! that `migrations/example/` creates and declares a task table. The tests,
//! the demo, the benchmarks and `session-lock run` use it.
//! [`NoopTasker`] completes every task at once, for measuring the
//! coordination alone (`session-lock run --noop`, the benchmarks).

use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use tokio_postgres::Row;
use tokio_postgres::types::Type;

use session_lock::{
    PgStore, Progress, ScanError, ScanTask, Task, TaskId, TaskQueries, Tasker, TaskerError, column,
    task_queries,
};

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
    /// Its tenant, the table's group key (NULL: no group).
    pub tenant: Option<String>,
    /// Pickups so far, this one included (`sl_attempts`).
    pub attempts: i32,
    /// The fencing token of this pickup (`sl_fence`): larger than that of
    /// every earlier pickup of the task, whichever session made it.
    pub fence: Option<i64>,
}

impl Task for ExampleTask {
    fn id(&self) -> TaskId {
        self.id
    }
}

impl ScanTask for ExampleTask {
    const QUERIES: TaskQueries = task_queries!("example_task");

    fn scan(row: &Row) -> Result<Self, ScanError> {
        let id = column(row, None, "id")?;
        Ok(ExampleTask {
            id,
            payload: column(row, Some(id), "payload")?,
            created_at: column(row, Some(id), "created_at")?,
            session_id: column(row, Some(id), "session_id")?,
            tenant: column(row, Some(id), "tenant")?,
            attempts: column(row, Some(id), "sl_attempts")?,
            fence: column(row, Some(id), "sl_fence")?,
        })
    }
}

/// The worked example's Tasker, used by `session-lock run`, the demo and
/// the example service.
///
/// For each task it writes an `example_task_run` row (`started_at`), works
/// for the configured time, sets the row's `finished_at`, and reports the
/// task complete. The run rows are how tools count executions: a task with
/// two rows ran twice, and two rows whose times overlap ran twice at once.
/// The tasks of a slice run concurrently.
///
/// A payload can ask for misbehaviour, so that tests can drive a runner
/// from the outside:
/// - `block:<ms>` blocks the worker's thread for that long, as a
///   synchronous Tasker (CPU-bound work, a blocking client) would: no
///   timeout can stop it;
/// - `fail:...` fails the run (the task is not completed);
/// - `panic:...` panics in the Tasker;
/// - `crash:...` aborts the whole process, as a segfault would.
///
/// Each writes its run row first, so every execution is counted.
#[derive(Debug, Clone)]
pub struct ExampleTasker {
    store: PgStore,
    work: Duration,
}

impl ExampleTasker {
    /// A tasker recording runs through `store` and working `work` per task.
    pub fn new(store: PgStore, work: Duration) -> Self {
        ExampleTasker { store, work }
    }

    async fn execute(&self, task: &ExampleTask) -> Result<TaskId, TaskerError> {
        let session = task.session_id.unwrap_or(0);
        // Unnamed statements (query_typed): they work behind a transaction
        // pooler too, where a named prepared statement may be gone by the
        // next transaction.
        let conn = self.store.client().await?;
        let rows = conn
            .query_typed(
                "INSERT INTO example_task_run (task_id, session_id, started_at) VALUES ($1, $2, now()) RETURNING id",
                &[(&task.id, Type::INT8), (&session, Type::INT8)],
            )
            .await?;
        let run: i64 = rows
            .first()
            .ok_or("INSERT ... RETURNING returned no row")?
            .get(0);
        drop(conn);
        if task.payload.starts_with("fail:") {
            return Err(format!("task {}: its payload asks it to fail", task.id).into());
        }
        if task.payload.starts_with("panic:") {
            panic!("task {}: its payload asks it to panic", task.id);
        }
        if task.payload.starts_with("crash:") {
            eprintln!("task {}: its payload asks the process to crash", task.id);
            std::process::abort();
        }
        if let Some(ms) = task.payload.strip_prefix("block:") {
            let ms: u64 = ms
                .trim()
                .parse()
                .map_err(|e| format!("payload {:?}: {e}", task.payload))?;
            std::thread::sleep(Duration::from_millis(ms));
        }
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        let conn = self.store.client().await?;
        conn.query_typed(
            "UPDATE example_task_run SET finished_at = now() WHERE id = $1",
            &[(&run, Type::INT8)],
        )
        .await?;
        Ok(task.id)
    }
}

impl Tasker<ExampleTask> for ExampleTasker {
    async fn run(
        &self,
        tasks: Vec<ExampleTask>,
        progress: Progress,
    ) -> Result<Vec<TaskId>, TaskerError> {
        let results = join_all(tasks.iter().map(|t| async {
            let res = self.execute(t).await;
            if let Ok(id) = res {
                progress.complete(id);
            }
            res
        }))
        .await;
        match results.into_iter().find_map(Result::err) {
            Some(e) => Err(e),
            None => Ok(Vec::new()),
        }
    }
}

/// A Tasker that completes every task at once and records nothing: no
/// `example_task_run` row, no sleep. `session-lock run --noop` and the
/// throughput benchmarks use it, so that they measure the coordination
/// (get_work and finish) alone. Works for any task type.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopTasker;

impl<T: Task> Tasker<T> for NoopTasker {
    async fn run(&self, tasks: Vec<T>, _progress: Progress) -> Result<Vec<TaskId>, TaskerError> {
        Ok(tasks.iter().map(Task::id).collect())
    }
}
