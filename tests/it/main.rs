//! Integration tests against a real PostgreSQL started by the harness (one server
//! per run, one database per test).
mod bad_input;
mod blocking;
mod chaos;
mod cli;
mod demo;
mod harness;
mod holes;
mod interleavings;
mod migrate;
mod process;
mod protocol;
mod runner;
mod security;
mod service;
mod telemetry;
mod upgrade;
mod worker;
