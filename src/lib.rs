#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]

#[cfg(feature = "embedded")]
pub mod embedded;
mod error;
pub mod migrate;

pub use error::{Error, Result, ScanError};
pub use error::{SQLSTATE_INVALID_ARGUMENT, SQLSTATE_SESSION_LOST, SQLSTATE_TEMPLATE_UNFILLED};
pub use migrate::{MigrateError, Migrator};
