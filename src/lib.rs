#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]

#[cfg(feature = "embedded")]
pub mod embedded;
mod error;
pub mod example;
pub mod migrate;
pub mod store;
mod task;

pub use error::{Error, Result, ScanError};
pub use error::{SQLSTATE_INVALID_ARGUMENT, SQLSTATE_SESSION_LOST, SQLSTATE_TEMPLATE_UNFILLED};
pub use migrate::{MigrateError, Migrator};
pub use store::{
    Database, DbFinder, PgStore, SessionId, SessionStart, StoreOptions, Work, WorkGet,
};
pub use task::{ScanTask, Task, TaskId, TaskQueries, column};

/// The names nearly every user needs.
pub mod prelude {
    pub use crate::{Database, DbFinder, Error, PgStore, ScanTask, Task, TaskId, TaskQueries};
}
