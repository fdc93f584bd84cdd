//! An actix-web service that runs a session-lock runner: the integration a
//! service author copies.
//!
//! Run several replicas against one database and they share the worked
//! example's tasks (`public.example_task`):
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/app PORT=8080 \
//!     cargo run --example actix_web_service
//! ```
//!
//! * `GET /healthz`: 200 while the process is alive.
//! * `GET /readyz`: 200 while the runner holds a live session, else 503.
//! * `GET /status`: JSON: session id, tasks held, last tick, counters.
//! * `GET /metrics`: the OpenTelemetry metrics as Prometheus text.
//! * Traces go out over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//!   (e.g. `http://jaeger:4318`).
//! * On SIGTERM or SIGINT the HTTP server stops accepting, the runner gets
//!   `Stop` (drains its tasks in flight, finishes them, ends its session),
//!   and only then does the process exit.
//!
//! Environment: `DATABASE_URL` (required; a multi-host URL with
//! `target_session_attrs=read-write` follows a primary failover),
//! `DIRECT_DATABASE_URL` (when `DATABASE_URL` goes through PgBouncer in
//! transaction mode: the same database reached directly, for the
//! migrations and for LISTEN), `PORT` (8080), `RUNNER_NAME` (example),
//! `TTL_MS`, `HEARTBEAT_MS`, `TICK_MS`, `MAX_TASKS`, `WORKERS`, `WORK_MS`
//! (per-task simulated work, default 100), `MIGRATE` (default 1: apply the
//! migrations on start).

use std::time::{Duration, UNIX_EPOCH};

use actix_web::{App, HttpResponse, HttpServer, web};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus::{Encoder, Registry, TextEncoder};
use session_lock::{Migrator, PgStore, Runner, RunnerConfig, RunnerHandle};
use session_lock_testkit::example::ExampleTasker;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::prelude::*;

struct AppState {
    runner: RunnerHandle,
    registry: Registry,
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok\n")
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let status = state.runner.status();
    match status.session {
        Some(id) if status.is_ready() => HttpResponse::Ok().body(format!("ready: session {id}\n")),
        _ => HttpResponse::ServiceUnavailable().body("not ready: no live session\n"),
    }
}

async fn status(state: web::Data<AppState>) -> HttpResponse {
    let s = state.runner.status();
    let last_tick_ms = s
        .last_tick
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64);
    HttpResponse::Ok().json(serde_json::json!({
        "runner": s.name,
        "ready": s.is_ready(),
        "session_id": s.session,
        "tasks_held": s.tasks_held,
        "last_tick_unix_ms": last_tick_ms,
        "ticks": s.ticks,
        "fetched": s.fetched,
        "finished": s.finished,
        "failed": s.failed,
        "rejected": s.rejected,
        "stuck_tasks": s.stuck_tasks,
        "left_at_stop": s.left_at_stop,
        "database_moves": s.database_moves,
        "session_starts": s.session_starts,
        "session_losses": s.session_losses,
        "heartbeats": s.heartbeats,
        "heartbeat_failures": s.heartbeat_failures,
        "worker_restarts": s.worker_restarts,
        "actor_restarts": s.actor_restarts,
        "last_error": s.last_error,
    }))
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(body),
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

fn env_ms(name: &str) -> Result<Option<Duration>, String> {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|e| format!("{name}={v:?}: {e}"))
        })
        .transpose()
}

fn env_num<T: std::str::FromStr>(name: &str) -> Result<Option<T>, String>
where
    T::Err: std::fmt::Display,
{
    std::env::var(name)
        .ok()
        .map(|v| v.parse::<T>().map_err(|e| format!("{name}={v:?}: {e}")))
        .transpose()
}

fn runner_config() -> Result<RunnerConfig, String> {
    let name = std::env::var("RUNNER_NAME").unwrap_or_else(|_| "example".into());
    let mut b = RunnerConfig::builder(name);
    if let Some(v) = env_ms("TTL_MS")? {
        b = b.ttl(v);
    }
    if let Some(v) = env_ms("HEARTBEAT_MS")? {
        b = b.heartbeat(v);
    }
    if let Some(v) = env_ms("TICK_MS")? {
        b = b.tick(v);
    }
    if let Some(v) = env_num("MAX_TASKS")? {
        b = b.max_tasks(v);
    }
    if let Some(v) = env_num("WORKERS")? {
        b = b.workers(v);
    }
    b.build().map_err(|e| e.to_string())
}

/// Tracing to stderr, plus OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
/// The application, not the library, installs these.
fn init_tracing() -> Result<Option<SdkTracerProvider>, String> {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    let filter = tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO);
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
        tracing_subscriber::registry().with(fmt).with(filter).init();
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("session-lock-example")
                .build(),
        )
        .build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("session-lock-example"));
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .init();
    Ok(Some(provider))
}

async fn migrate(url: &str) -> Result<(), String> {
    Migrator::new()
        .with_example()
        .run_url(url)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn serve() -> Result<(), String> {
    let tracer_provider = init_tracing()?;
    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set".to_owned())?;
    let direct = std::env::var("DIRECT_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let port: u16 = env_num("PORT")?.unwrap_or(8080);
    let work = env_ms("WORK_MS")?.unwrap_or(Duration::from_millis(100));
    let config = runner_config()?;
    if std::env::var("MIGRATE").map_or(true, |v| v != "0") {
        migrate(direct.as_deref().unwrap_or(&url)).await?;
    }

    let registry = Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()
        .map_err(|e| format!("cannot build the Prometheus exporter: {e}"))?;
    let meter_provider = SdkMeterProvider::builder().with_reader(exporter).build();
    let meter = opentelemetry::metrics::MeterProvider::meter(&meter_provider, "session_lock");

    // The store is made here, on the System's arbiter, so its connections
    // live as long as the process.
    let store = PgStore::connect_with_direct(&url, direct.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    let runner = Runner::new(config, store.clone(), ExampleTasker::new(store, work))
        .meter(meter)
        .start();

    let state = web::Data::new(AppState {
        runner: runner.clone(),
        registry,
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/status", web::get().to(status))
            .route("/metrics", web::get().to(metrics))
    })
    .workers(2)
    // We handle the signals: the order of shutdown matters.
    .disable_signals()
    .bind(("0.0.0.0", port))
    .map_err(|e| format!("cannot listen on port {port}: {e}"))?
    .run();
    let http = server.handle();
    let server = tokio::spawn(server);
    tracing::info!(port, "listening");

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down: HTTP first, then the runner");
    http.stop(true).await;
    let _ = server.await;
    runner.stop().await;
    tracing::info!("runner stopped; exiting");
    if let Some(provider) = tracer_provider {
        let _ = provider.shutdown();
    }
    let _ = meter_provider.shutdown();
    Ok(())
}

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    match serve().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("actix_web_service: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
