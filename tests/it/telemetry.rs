//! What a runner exports through `tracing` (to OpenTelemetry) and through
//! the OpenTelemetry metrics API.
//!
//! The runner's actors run on arbiter threads of their own, so a thread-local
//! default subscriber would not see their spans: a global subscriber is
//! installed once per test process, exporting to memory, and each test
//! keeps only the spans of its own runner (attribute `session_lock.runner`).

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use session_lock::telemetry::{
    GROUP_ATTRIBUTE, SCOPE, SPAN_FINISH, SPAN_GET_WORK, SPAN_RUN_TASKS, SPAN_SESSION_END,
    SPAN_SESSION_START, SPAN_TICK,
};
use session_lock::{PgStore, Progress, Runner, RunnerConfig, Task, TaskId, TaskerError};
use session_lock_testkit::example::ExampleTask;
use session_lock_testkit::wait_for_status;
use tracing_subscriber::layer::SubscriberExt as _;

use session_lock_testkit::db::migrated_db;

const RUNNER: &str = "session_lock.runner";

/// The process's span exporter, behind the global subscriber installed on
/// first use.
fn spans() -> &'static (InMemorySpanExporter, SdkTracerProvider) {
    static TELEMETRY: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    TELEMETRY.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        // Simple processor: a span is exported as it closes.
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer =
            tracing_opentelemetry::layer().with_tracer(provider.tracer("session-lock-tests"));
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("no other test installs a global tracing subscriber");
        (exporter, provider)
    })
}

/// A meter provider of this test's own, exporting to memory.
fn meters() -> (InMemoryMetricExporter, SdkMeterProvider) {
    let metrics = InMemoryMetricExporter::default();
    let meters = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(metrics.clone()).build())
        .build();
    (metrics, meters)
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

/// A numeric attribute, whether recorded as an integer or (as
/// tracing-opentelemetry does for unsigned integers) as its decimal string.
fn count_attr(span: &SpanData, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Value::I64(n) => Some(*n),
        Value::String(s) => s.as_str().parse().ok(),
        _ => None,
    }
}

fn is_runners(runner: &str) -> impl Fn(&&SpanData) -> bool + '_ {
    move |span| attr(span, RUNNER).is_some_and(|v| v.as_str() == runner)
}

/// The value of a u64 counter's data point for `runner`, in the last export.
fn counter(metrics: &[ResourceMetrics], name: &str, runner: &str) -> Option<u64> {
    let last = metrics.last()?;
    last.scope_metrics()
        .flat_map(|scope| scope.metrics())
        .filter(|m| m.name() == name)
        .find_map(|m| match m.data() {
            AggregatedMetrics::U64(MetricData::Sum(sum)) => sum
                .data_points()
                .find(|p| {
                    p.attributes()
                        .any(|kv| *kv == KeyValue::new(RUNNER, runner.to_owned()))
                })
                .map(|p| p.value()),
            _ => None,
        })
}

#[actix_rt::test]
async fn one_tick_exports_one_tick_span_with_its_children() {
    let (exporter, provider) = spans();
    // Unique in the process: other tests' spans reach the same exporter.
    let name = format!("telemetry-{}", std::process::id());
    let db = migrated_db().await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO example_task (payload) SELECT 'task ' || g FROM generate_series(1, 3) g",
            &[],
        )
        .await
        .unwrap();
    let store = PgStore::connect(&db.url).await.unwrap();
    let (metrics, meters) = meters();
    // One tick only: an hour-long tick, no LISTEN, and 3 tasks do not fill a
    // share of 10 (no drain-mode tick).
    let config = RunnerConfig::builder(name.as_str())
        .ttl(Duration::from_secs(6))
        .heartbeat(Duration::from_secs(1))
        .tick(Duration::from_secs(3600))
        .jitter(Duration::ZERO)
        .listen(false)
        .workers(2)
        .build()
        .unwrap();
    let tasker = |tasks: Vec<ExampleTask>, _progress: Progress| {
        std::future::ready(Ok::<_, TaskerError>(
            tasks.iter().map(Task::id).collect::<Vec<TaskId>>(),
        ))
    };
    let runner = Runner::new(config, store, tasker)
        .meter(meters.meter(SCOPE))
        .start();
    let mut rx = runner.subscribe();
    let status = wait_for_status(&mut rx, Duration::from_secs(60), |s| {
        s.ticks >= 1 && s.fetched > 0
    })
    .await
    .unwrap_or_else(|| panic!("no tick fetched tasks: {:?}", runner.status()));
    assert_eq!((status.fetched, status.finished), (3, 3), "{status:?}");
    let session = status.session.expect("a session");
    runner.stop().await;
    provider.force_flush().unwrap();
    meters.force_flush().unwrap();

    let all = exporter.get_finished_spans().unwrap();
    let ours: Vec<&SpanData> = all.iter().filter(is_runners(&name)).collect();
    let named = |n: &str| -> Vec<&SpanData> {
        ours.iter()
            .copied()
            .filter(|s| s.name == n)
            .collect::<Vec<_>>()
    };
    let ticks = named(SPAN_TICK);
    assert_eq!(
        ticks.len(),
        1,
        "one tick, one span: {:?}",
        ours.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let tick = ticks[0];
    assert_eq!(
        attr(tick, "session_lock.session.id"),
        Some(&Value::I64(session))
    );
    assert_eq!(count_attr(tick, "session_lock.tasks.fetched"), Some(3));
    assert_eq!(count_attr(tick, "session_lock.tasks.finished"), Some(3));
    assert_eq!(count_attr(tick, "session_lock.tasks.failed"), Some(0));
    for child in [SPAN_GET_WORK, SPAN_RUN_TASKS, SPAN_FINISH] {
        let spans = named(child);
        assert_eq!(spans.len(), 1, "one {child} span");
        let span = spans[0];
        assert_eq!(
            span.parent_span_id,
            tick.span_context.span_id(),
            "{child} is a child of the tick"
        );
        assert_eq!(
            span.span_context.trace_id(),
            tick.span_context.trace_id(),
            "{child} is in the tick's trace"
        );
        assert!(
            span.start_time >= tick.start_time && span.end_time <= tick.end_time,
            "{child} runs within the tick"
        );
    }
    let order: Vec<_> = [SPAN_GET_WORK, SPAN_RUN_TASKS, SPAN_FINISH]
        .iter()
        .map(|n| named(n)[0].start_time)
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "get_work, then run_tasks, then finish"
    );

    let starts = named(SPAN_SESSION_START);
    assert_eq!(starts.len(), 1, "one session start");
    assert_eq!(
        attr(starts[0], "session_lock.session.id"),
        Some(&Value::I64(session))
    );
    let ends = named(SPAN_SESSION_END);
    assert_eq!(ends.len(), 1, "Stop ended the session");
    assert_eq!(
        attr(ends[0], "session_lock.session.id"),
        Some(&Value::I64(session))
    );

    let exported = metrics.get_finished_metrics().unwrap();
    assert_eq!(counter(&exported, "session_lock.ticks", &name), Some(1));
    assert_eq!(
        counter(&exported, "session_lock.tasks.finished", &name),
        Some(3)
    );
    assert_eq!(
        counter(&exported, "session_lock.tasks.fetched", &name),
        Some(3)
    );
}

/// The u64 gauge data points of `name` for `runner` in the last export, by
/// their `session_lock.group` attribute (`None` when there is none).
fn gauges(metrics: &[ResourceMetrics], name: &str, runner: &str) -> Vec<(Option<String>, u64)> {
    let Some(last) = metrics.last() else {
        return Vec::new();
    };
    let mut points = Vec::new();
    for m in last.scope_metrics().flat_map(|s| s.metrics()) {
        if m.name() != name {
            continue;
        }
        if let AggregatedMetrics::U64(MetricData::Gauge(g)) = m.data() {
            for p in g.data_points() {
                if !p
                    .attributes()
                    .any(|kv| *kv == KeyValue::new(RUNNER, runner.to_owned()))
                {
                    continue;
                }
                let group = p
                    .attributes()
                    .find(|kv| kv.key.as_str() == GROUP_ATTRIBUTE)
                    .map(|kv| kv.value.as_str().into_owned());
                points.push((group, p.value()));
            }
        }
    }
    points.sort();
    points
}

#[actix_rt::test]
async fn the_gauges_count_held_tasks_per_tenant_and_quarantined_tasks() {
    let name = format!("gauges-{}", std::process::id());
    let db = migrated_db().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO example_task (payload, tenant) VALUES ('a', 'acme'), ('a', 'acme'), ('b', 'bolt'), ('n', NULL);
             INSERT INTO example_task (payload, tenant, sl_attempts) VALUES ('q', 'acme', 5);",
        )
        .await
        .unwrap();
    let store = PgStore::connect(&db.url).await.unwrap();
    let (metrics, meters) = meters();
    let config = RunnerConfig::builder(name.as_str())
        .ttl(Duration::from_secs(6))
        .heartbeat(Duration::from_secs(1))
        .tick(Duration::from_secs(3600))
        .jitter(Duration::ZERO)
        .listen(false)
        .stats_interval(Duration::from_millis(100))
        .workers(4)
        .build()
        .unwrap();
    // The tasks stay held until the test lets them finish; each slice
    // says how many tasks it started.
    let (release, released) = tokio::sync::watch::channel(false);
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let tasker = move |tasks: Vec<ExampleTask>, _progress: Progress| {
        let mut released = released.clone();
        let _ = started_tx.send(tasks.len());
        async move {
            let _ = released.wait_for(|r| *r).await;
            Ok::<_, TaskerError>(tasks.iter().map(Task::id).collect::<Vec<TaskId>>())
        }
    };
    let runner = Runner::new(config, store, tasker)
        .meter(meters.meter(SCOPE))
        .start();
    let mut rx = runner.subscribe();
    let mut running = 0;
    while running < 4 {
        match tokio::time::timeout(Duration::from_secs(60), started.recv()).await {
            Ok(Some(n)) => running += n,
            _ => panic!("the four free tasks did not start: {:?}", runner.status()),
        }
    }

    let expected = vec![
        (Some("(none)".to_owned()), 1),
        (Some("acme".to_owned()), 2),
        (Some("bolt".to_owned()), 1),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (held, quarantined) = loop {
        meters.force_flush().unwrap();
        let exported = metrics.get_finished_metrics().unwrap();
        let held = gauges(&exported, "session_lock.tasks.held_by_group", &name);
        let quarantined = gauges(&exported, "session_lock.tasks.quarantined", &name);
        if held == expected || tokio::time::Instant::now() > deadline {
            break (held, quarantined);
        }
        metrics.reset();
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(held, expected, "held per tenant, NULL as (none)");
    assert_eq!(quarantined, vec![(None, 1)], "the task at max_attempts");

    // Once finished, the tenants read 0: no gauge keeps a count that went.
    release.send(true).unwrap();
    wait_for_status(&mut rx, Duration::from_secs(60), |s| s.finished >= 4)
        .await
        .unwrap_or_else(|| panic!("the tasks did not finish: {:?}", runner.status()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let held = loop {
        meters.force_flush().unwrap();
        let exported = metrics.get_finished_metrics().unwrap();
        let held = gauges(&exported, "session_lock.tasks.held_by_group", &name);
        if held.iter().all(|(_, n)| *n == 0) || tokio::time::Instant::now() > deadline {
            break held;
        }
        metrics.reset();
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(held.len(), 3, "the three tenants still reported: {held:?}");
    assert!(held.iter().all(|(_, n)| *n == 0), "all read 0: {held:?}");
    runner.stop().await;
}
