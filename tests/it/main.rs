//! Integration tests against a real PostgreSQL started by the harness (one server
//! per run, one database per test).
mod harness;
mod migrate;
mod protocol;
mod runner;
mod cli;
