//! STUB — being implemented by a helper. API contract below is fixed.
#![allow(missing_docs, dead_code, unused_variables)]
use std::path::Path;

/// Whether a migration file runs once or on every run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationKind { Once, Always }

#[derive(Debug, Clone)]
pub struct Migration { pub set: String, pub file: String, pub kind: MigrationKind, pub sql: std::borrow::Cow<'static, str> }

#[derive(Debug, Default, Clone)]
pub struct Report { pub applied: Vec<String>, pub skipped: Vec<String>, pub reapplied: Vec<String> }

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    #[error("stub")]
    Stub,
}

#[derive(Debug, Clone)]
pub struct Migrator { migrations: Vec<Migration> }

impl Default for Migrator { fn default() -> Self { Self::new() } }

impl Migrator {
    pub fn new() -> Self { todo!() }
    pub fn with_example(self) -> Self { todo!() }
    pub fn with_dir(self, dir: impl AsRef<Path>) -> Result<Self, MigrateError> { todo!() }
    pub fn migrations(&self) -> &[Migration] { &self.migrations }
    pub async fn run(&self, client: &mut tokio_postgres::Client) -> Result<Report, MigrateError> { todo!() }
}
