//! Integration tests against a real PostgreSQL started by the harness (one server
//! per run, one database per test).
mod bad_input;
mod blocking;
mod chaos;
mod cli;
mod clock;
mod demo;
mod failover;
mod holes;
mod interleavings;
mod migrate;
mod pooler;
mod processes;
mod protocol;
mod quarantine;
mod retries;
mod runner;
mod security;
mod service;
mod telemetry;
mod tenants;
mod testkit;
mod upgrade;
