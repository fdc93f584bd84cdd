#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]

mod backoff;
mod catch;
pub mod config;
mod error;
mod fetcher;
mod gauges;
mod in_flight;
pub mod migrate;
mod reaper;
mod runner;
#[cfg(test)]
mod runtime_tests;
#[cfg(test)]
mod scripted;
mod session;
pub mod status;
pub mod store;
mod task;
pub mod task_table;
pub mod tasker;
pub mod telemetry;
pub mod tls;
mod workers;

pub use config::{ConfigError, FailedTasks, RunnerConfig, RunnerConfigBuilder};
pub use error::{Error, ErrorChain, Panic, Result, ScanError};
pub use error::{
    SQLSTATE_BAD_DECLARATION, SQLSTATE_INVALID_ARGUMENT, SQLSTATE_PROTOCOL_MISMATCH,
    SQLSTATE_SESSION_LOST,
};
pub use migrate::{MigrateError, Migrator};
pub use runner::{Runner, RunnerHandle, RunnerServer, Stop};
pub use status::RunnerStatus;
pub use store::{
    Database, DatabaseId, DbFinder, GetWork, Listener, PgStore, Session, SessionId, SessionStart,
    SessionToken, StoreClient, StoreOptions, TaskStats, Work, connect_one, connect_one_with,
};
#[doc(hidden)]
pub use task::is_fn_prefix;
pub use task::{ScanTask, Task, TaskId, TaskQueries, column};
pub use task_table::TaskTable;
pub use tasker::{Progress, Tasker, TaskerError};
pub use tls::TlsMode;

/// The names nearly every user needs.
pub mod prelude {
    pub use crate::{
        Database, DbFinder, Error, PgStore, Progress, Runner, RunnerConfig, RunnerHandle,
        RunnerServer, ScanTask, Stop, Task, TaskId, TaskQueries, Tasker, TaskerError,
    };
}
