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
    /// Calls the table's generated `session_lock.<prefix>_get_work`:
    /// finishes the previous batch's completed tasks, then returns the
    /// session's tasks after moving it to its fair share. Parameters: `$1`
    /// session id (BIGINT), `$2` its token (UUID), `$3` ids to finish first
    /// (BIGINT[]), `$4` ids still running (BIGINT[]), `$5` whether to sweep
    /// for orphans (BOOLEAN), `$6` the ids the previous answer named, or
    /// NULL (BIGINT[]), `$7` whether to answer the finished ids in one array
    /// (BOOLEAN, always true). Returns the columns `sl_finished` (unused
    /// when `$7`) and `sl_finished_ids` (every id finished by this call, in
    /// one row whose other columns are NULL) followed by the task table's
    /// columns (a held task, both NULL).
    pub get_work: &'static str,
    /// Calls the table's generated `session_lock.<prefix>_finish_tasks`,
    /// the fenced finish. Parameters: `$1` session id (BIGINT), `$2` its
    /// token (UUID), `$3` task ids (BIGINT[]). Returns one row per task
    /// actually finished, its id first.
    pub finish: &'static str,
    /// Calls the table's generated `session_lock.<prefix>_fail_tasks`: gives
    /// back tasks whose run failed, each to wait out its retry backoff
    /// before it is picked up again. Parameters and result as `finish`.
    pub fail: &'static str,
    /// Calls the table's generated `session_lock.<prefix>_stats`, what the
    /// runner records as gauges every
    /// [`stats_interval`](crate::RunnerConfigBuilder::stats_interval).
    /// Parameters: `$1` session id (BIGINT), `$2` how many groups to name
    /// (INTEGER). Returns rows of `metric` (TEXT), `task_group` (TEXT) and
    /// `value` (BIGINT).
    pub stats: &'static str,
    /// Calls the table's generated `session_lock.<prefix>_quiet`: whether
    /// a listening runner may wait for a notification instead of its next
    /// tick (the lease is live and no open task could be picked up without
    /// an INSERT first). Parameters: `$1` session id (BIGINT), `$2` its
    /// token (UUID). Returns one BOOLEAN.
    pub quiet: &'static str,
    /// The channel the table notifies on when tasks are inserted, if any
    /// (a declaration's `notify`; `session_lock_<prefix>` by default).
    pub notify_channel: Option<&'static str>,
}

/// Whether `prefix` is a declaration's `fn_prefix` as [`task_queries!`]
/// takes it: not empty, no schema (no `.`), no double quote. The macro
/// quotes the generated names, so a prefix is matched exactly as declared
/// (case and all), as the migration's `format('%I')` created it.
#[doc(hidden)]
pub const fn is_fn_prefix(prefix: &str) -> bool {
    let bytes = prefix.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'.' || bytes[i] == b'"' {
            return false;
        }
        i += 1;
    }
    true
}

/// Builds the [`TaskQueries`] for a declared task table from its
/// declaration's `fn_prefix` (the table's name, unless the declaration
/// chose another), without a schema: the generated functions live in the
/// schema `session_lock`. The notify channel is the declaration's default,
/// `session_lock_<prefix>`, unless given.
///
/// ```
/// use session_lock::{task_queries, TaskQueries};
/// const QUERIES: TaskQueries = task_queries!("example_task");
/// assert_eq!(
///     QUERIES.finish,
///     r#"SELECT * FROM session_lock."example_task_finish_tasks"($1, $2, $3)"#
/// );
/// assert_eq!(QUERIES.notify_channel, Some("session_lock_example_task"));
/// // A table declared with notify => 'jobs_in':
/// const JOBS: TaskQueries = task_queries!("jobs", notify = "jobs_in");
/// assert_eq!(JOBS.notify_channel, Some("jobs_in"));
/// ```
///
/// A schema-qualified name is refused at compile time:
///
/// ```compile_fail
/// const BAD: session_lock::TaskQueries = session_lock::task_queries!("public.example_task");
/// ```
#[macro_export]
macro_rules! task_queries {
    ($prefix:literal) => {
        $crate::task_queries!($prefix, notify = concat!("session_lock_", $prefix))
    };
    ($prefix:literal, notify = $channel:expr) => {{
        const _: () = assert!(
            $crate::is_fn_prefix($prefix),
            "task_queries! takes the declaration's fn_prefix (by default the table's name) without a schema: the generated functions live in the schema session_lock"
        );
        $crate::TaskQueries {
            get_work: concat!(
                "SELECT * FROM session_lock.\"",
                $prefix,
                "_get_work\"($1, $2, $3, $4, $5, $6, $7)"
            ),
            finish: concat!(
                "SELECT * FROM session_lock.\"",
                $prefix,
                "_finish_tasks\"($1, $2, $3)"
            ),
            fail: concat!(
                "SELECT * FROM session_lock.\"",
                $prefix,
                "_fail_tasks\"($1, $2, $3)"
            ),
            stats: concat!(
                "SELECT metric, task_group, value FROM session_lock.\"",
                $prefix,
                "_stats\"($1, $2)"
            ),
            quiet: concat!("SELECT session_lock.\"", $prefix, "_quiet\"($1, $2)"),
            notify_channel: Some($channel),
        }
    }};
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
