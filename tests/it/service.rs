//! The example actix-web service (examples/actix_web_service.rs), run as a
//! process against the test Postgres: every endpoint, then SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use session_lock_testkit::db::migrated_db;

const DEADLINE: Duration = Duration::from_secs(60);

/// The example's binary. `cargo test` builds examples, but a narrower run
/// such as `cargo test --test it` does not, and would find a stale one (or
/// none): build it (a no-op when it is fresh).
fn service_binary() -> PathBuf {
    // This test binary is target/<profile>/deps/it-<hash>.
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples")
        .join("actix_web_service");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", "actix_web_service"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build --example");
    assert!(status.success(), "building the example service failed");
    path
}

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP/1.1 GET: (status code, body).
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

async fn wait_until<F: FnMut() -> bool>(what: &str, mut done: F) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_service_serves_its_endpoints_and_drains_on_sigterm() {
    let db = migrated_db().await;
    let client = db.client().await;
    let port = free_port();
    let collector = OtlpCollector::start();
    let mut child = Command::new(service_binary())
        .env("DATABASE_URL", &db.url)
        .env("PORT", port.to_string())
        .env("TTL_MS", "4000")
        .env("HEARTBEAT_MS", "500")
        .env("TICK_MS", "100")
        .env("WORK_MS", "400")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the example service");
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let service = Service(child);

    wait_until("/healthz", || {
        get(port, "/healthz").is_ok_and(|(c, _)| c == 200)
    })
    .await;
    wait_until("/readyz to be ready", || {
        get(port, "/readyz").is_ok_and(|(c, _)| c == 200)
    })
    .await;

    client
        .execute(
            "INSERT INTO example_task (payload) SELECT 'svc' FROM generate_series(1, 30)",
            &[],
        )
        .await
        .unwrap();
    // Wait until tasks are in flight, so SIGTERM has something to drain.
    let mut in_flight = 0i64;
    let start = Instant::now();
    while in_flight == 0 {
        assert!(start.elapsed() < DEADLINE, "tasks never started");
        in_flight = client
            .query_one(
                "SELECT count(*) FROM example_task_run WHERE finished_at IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (code, body) = get(port, "/status").unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    let session = status["session_id"].as_i64().expect("a session id");
    assert_eq!(status["ready"], true);
    assert_eq!(status["runner"], "example");
    for field in [
        "tasks_held",
        "ticks",
        "finished",
        "failed",
        "last_tick_unix_ms",
    ] {
        assert!(status.get(field).is_some(), "/status has {field}: {body}");
    }
    // Counters appear once the first tick has completed.
    let mut metrics = String::new();
    wait_until("tick metrics on /metrics", || {
        metrics = get(port, "/metrics").map(|(_, b)| b).unwrap_or_default();
        metrics.contains("session_lock_ticks_total{")
    })
    .await;
    assert!(
        metrics.contains("session_lock_runner=\"example\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("session_lock_tick_duration_seconds_bucket{"),
        "{metrics}"
    );

    // SIGTERM mid-batch: HTTP stops, the runner drains, the session ends.
    let pid = service.0.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut service = service;
    let start = Instant::now();
    let exit = loop {
        if let Some(status) = service.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the service did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "clean exit; log:\n{}", log.lock().unwrap());

    let row = client
        .query_one(
            "SELECT ended_at IS NOT NULL FROM session_lock.session WHERE id = $1",
            &[&session],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the session was ended before exit");
    let unfinished_runs: i64 = client
        .query_one(
            "SELECT count(*) FROM example_task_run WHERE finished_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        unfinished_runs, 0,
        "every execution in flight ran to its end"
    );
    // Nothing lost: each run's task was finished, and no task is held by
    // the ended session.
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE t.finished_at IS NULL),
                    count(*) FILTER (WHERE t.finished_at IS NULL AND t.session_id = $1)
               FROM example_task t JOIN example_task_run r ON r.task_id = t.id",
            &[&session],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0, "every task that ran was finished");
    assert_eq!(row.get::<_, i64>(1), 0);
    let log = log.lock().unwrap();
    assert!(
        log.find("shutting down").unwrap() < log.find("runner stopped").unwrap(),
        "HTTP stops first, then the runner:\n{log}"
    );
    // The spans went out over OTLP/HTTP (flushed at the latest on exit),
    // and they carry the tick spans.
    let exports = collector.requests();
    assert!(
        exports.iter().any(|(path, body)| path == "/v1/traces"
            && body
                .windows(b"session_lock.tick".len())
                .any(|w| w == b"session_lock.tick")),
        "an OTLP export of the tick spans reached the collector; got {:?}",
        exports
            .iter()
            .map(|(p, b)| (p, b.len()))
            .collect::<Vec<_>>()
    );
}

/// Requests received: (path, body).
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A stand-in OTLP/HTTP collector: records each request's path and body,
/// answers 200.
struct OtlpCollector {
    port: u16,
    requests: Received,
}

impl OtlpCollector {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests: Received = Default::default();
        let sink = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &sink);
                });
            }
        });
        OtlpCollector { port, requests }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<(String, Vec<u8>)> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve_one(stream: TcpStream, sink: &Received) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_owned();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        sink.lock().unwrap().push((path, body));
        let mut out = stream.try_clone()?;
        out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")?;
    }
}
