//! Tasks: what a runner fetches, runs and finishes, and how rows become tasks.

use tokio_postgres::Row;
use tokio_postgres::types::FromSql;

use crate::error::ScanError;

/// A task's id: the BIGINT primary key of its row.
pub type TaskId = i64;

/// A job that needs to be done once (the glossary's *Task*).
///
/// Implement it on the type your rows scan into.
pub trait Task: Send + Sync + 'static {
    /// The task's id, as stored in the task table.
    fn id(&self) -> TaskId;
}

/// Turns a row returned by the task table's `get_work` entry point into a
/// task, and names the SQL that fetches and finishes it.
///
/// A row that fails to scan is reported as a [`ScanError`]; its task stays
/// assigned to the session and comes back on the next tick, so nothing is
/// dropped silently.
pub trait ScanTask: Task + Sized {
    /// The statements that call the task table's entry points, usually made
    /// with [`task_queries!`](crate::task_queries).
    const QUERIES: TaskQueries;

    /// Reads one row. Use [`column()`] to get errors that name the column.
    fn scan(row: &Row) -> Result<Self, ScanError>;
}

/// The SQL statements a runner sends for one task table.
///
/// They are fixed strings chosen by the developer, never built from input;
/// every value travels as a bind parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskQueries {
    /// Calls the table's generated `<prefix>_get_work`: finishes the
    /// previous batch's completed tasks, then returns the session's tasks
    /// after moving it to its fair share. Parameters: `$1` session id
    /// (BIGINT), `$2` ids to finish first (BIGINT[]), `$3` ids still running
    /// (BIGINT[]), `$4` whether to sweep for orphans (BOOLEAN). Returns the
    /// column `sl_finished` (an id finished by this call, the other columns
    /// NULL) followed by the task table's columns (a held task,
    /// `sl_finished` NULL).
    pub get_work: &'static str,
    /// Calls the table's generated `<prefix>_finish_tasks`, the fenced
    /// finish. Parameters: `$1` session id (BIGINT), `$2` task ids
    /// (BIGINT[]). Returns one row per task actually finished, its id first.
    pub finish: &'static str,
    /// The channel the table notifies on when tasks are inserted, if any
    /// (a declaration's `notify`; `session_lock_<table>` by default).
    pub notify_channel: Option<&'static str>,
}

/// Builds the [`TaskQueries`] for a declared task table whose generated
/// functions have the given schema-qualified prefix (the table's name,
/// unless its declaration chose another `fn_prefix`).
///
/// ```
/// use session_lock::{task_queries, TaskQueries};
/// const QUERIES: TaskQueries = task_queries!("public.example_task");
/// assert_eq!(
///     QUERIES.finish,
///     "SELECT * FROM public.example_task_finish_tasks($1, $2)"
/// );
/// // With the channel the table's insert trigger notifies on:
/// const WITH_NOTIFY: TaskQueries =
///     task_queries!("public.example_task", notify = "session_lock_example_task");
/// assert_eq!(WITH_NOTIFY.notify_channel, Some("session_lock_example_task"));
/// ```
#[macro_export]
macro_rules! task_queries {
    ($prefix:literal) => {
        $crate::TaskQueries {
            get_work: concat!(
                "SELECT w.sl_finished, (w.sl_task).* FROM ",
                $prefix,
                "_get_work($1, $2, $3, $4) AS w"
            ),
            finish: concat!("SELECT * FROM ", $prefix, "_finish_tasks($1, $2)"),
            notify_channel: None,
        }
    };
    ($prefix:literal, notify = $channel:literal) => {
        $crate::TaskQueries {
            notify_channel: Some($channel),
            ..$crate::task_queries!($prefix)
        }
    };
}

/// Reads column `name` of a task row, with an error naming the column and,
/// when known, the task.
pub fn column<'a, T: FromSql<'a>>(
    row: &'a Row,
    task_id: Option<TaskId>,
    name: &str,
) -> Result<T, ScanError> {
    row.try_get::<_, T>(name)
        .map_err(|e| ScanError::new(task_id, name, e))
}
