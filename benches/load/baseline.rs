//! The seed's design as a baseline (BENCHMARKS.md, benchmark 10): a model
//! of go-session-lock's SQL (`../shared/seed/seed-algorithm.md`) beside
//! session-lock's protocol, on the same server in the same run, whole-
//! database tasks/s with 8 sessions at batch 10 and a backlog held at 1k,
//! 100k and 1M open tasks.
//!
//! The model, in a schema of its own (`seed_model`) over a task table of the
//! same shape and the same partial open-task index as the worked example's:
//! every get_work locks one global row FOR UPDATE, bumps its session, counts
//! the live sessions and every open task, takes `least(ceil(open /
//! sessions), 10)` as the share, tops its holding up from tasks that are
//! unowned or held by an expired session, and returns its open tasks; a
//! finish marks the given ids finished, whoever holds them.
//!
//! Each of the 8 clients loops as its design's runner ticks, two statements
//! a tick for both: the seed's get_work, then its finish of what it got
//! with as many new tasks inserted in the same statement; session-lock's
//! get_work, which finishes the previous batch first (its runner's one
//! round trip a tick), then an insert of as many new tasks as it finished.
//! So the backlog stays where it is. tasks/s = tasks finished in the
//! measuring window (after a warm-up) / its length.
//!
//! What limits the figure: both run over loopback on this 2-core machine
//! with the clients in this process; the ratio, measured back to back, is
//! the figure to read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use session_lock::SessionStart;
use tokio_postgres::Client;

use crate::Ctx;
use crate::common::{self, Table};

const SESSIONS: usize = 8;
const BATCH: u32 = 10;

/// The model's schema: its session table, the global lock row, its task
/// table, and its functions, as the seed notes describe them.
const SEED_MODEL: &str = r"
DROP SCHEMA IF EXISTS seed_model CASCADE;
CREATE SCHEMA seed_model;
CREATE TABLE seed_model.session (id bigserial PRIMARY KEY, created timestamptz NOT NULL DEFAULT now(), expires timestamptz NOT NULL);
CREATE TABLE seed_model.work_lock (id int PRIMARY KEY);
INSERT INTO seed_model.work_lock VALUES (1);
CREATE TABLE seed_model.task (id bigserial PRIMARY KEY, payload text NOT NULL, session_id bigint, finished_at timestamptz);
CREATE INDEX seed_task_open_idx ON seed_model.task (session_id, id) WHERE finished_at IS NULL;
CREATE FUNCTION seed_model.new_session() RETURNS bigint LANGUAGE sql AS
  $$ INSERT INTO seed_model.session (expires) VALUES (now() + interval '2 minutes') RETURNING id $$;
CREATE FUNCTION seed_model.get_work(p_session bigint) RETURNS SETOF seed_model.task LANGUAGE plpgsql AS $$
DECLARE
    v_sessions bigint;
    v_open     bigint;
    v_share    bigint;
    v_held     bigint;
BEGIN
    PERFORM 1 FROM seed_model.work_lock FOR UPDATE;
    UPDATE seed_model.session SET expires = now() + interval '2 minutes'
     WHERE id = p_session AND expires > now();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'session % expired', p_session USING ERRCODE = 'SL001';
    END IF;
    SELECT count(*) INTO v_sessions FROM seed_model.session WHERE expires > now();
    SELECT count(*) INTO v_open FROM seed_model.task WHERE finished_at IS NULL;
    v_share := least(ceil(v_open::numeric / v_sessions), 10);
    SELECT count(*) INTO v_held FROM seed_model.task WHERE session_id = p_session AND finished_at IS NULL;
    IF v_held < v_share THEN
        UPDATE seed_model.task SET session_id = p_session
         WHERE id IN (SELECT t.id FROM seed_model.task t
                        LEFT JOIN seed_model.session s ON s.id = t.session_id
                       WHERE t.finished_at IS NULL
                         AND (t.session_id IS NULL OR s.expires <= now())
                       LIMIT v_share - v_held);
    END IF;
    RETURN QUERY SELECT * FROM seed_model.task WHERE session_id = p_session AND finished_at IS NULL;
END;
$$;
CREATE FUNCTION seed_model.finish_tasks(p_ids bigint[]) RETURNS SETOF bigint LANGUAGE sql AS
  $$ UPDATE seed_model.task SET finished_at = now() WHERE id = ANY (p_ids) AND finished_at IS NULL RETURNING id $$;
";

#[derive(Clone, Copy, PartialEq)]
enum Model {
    Seed,
    Ours,
}

impl Model {
    fn name(self) -> &'static str {
        match self {
            Model::Seed => "seed's design",
            Model::Ours => "session-lock",
        }
    }
}

pub(crate) fn run(ctx: &Ctx) {
    let backlogs: &[u64] = &[1_000, 100_000, 1_000_000];
    let window = Duration::from_secs(if ctx.opts.full { 30 } else { 10 });
    let mut table = Table::new(
        format!(
            "The seed's design beside session-lock: whole-database tasks/s, {SESSIONS} sessions, batch {BATCH}, backlog held steady, {} s windows, median of {} repetitions",
            window.as_secs(),
            ctx.opts.reps
        ),
        &["open tasks", "seed's design", "session-lock", "ratio"],
    );
    for &backlog in backlogs {
        let mut seed = Vec::new();
        let mut ours = Vec::new();
        for rep in 0..ctx.opts.reps {
            for model in [Model::Seed, Model::Ours] {
                let rate = actix_rt::System::new().block_on(measure(ctx, model, backlog, window));
                eprintln!(
                    "bench: baseline rep {rep} {} at {backlog} open: {rate:.0} tasks/s",
                    model.name()
                );
                match model {
                    Model::Seed => seed.push(rate),
                    Model::Ours => ours.push(rate),
                }
            }
        }
        let ratios: Vec<f64> = ours
            .iter()
            .zip(&seed)
            .map(|(o, s)| o / s.max(1e-9))
            .collect();
        table.row(vec![
            backlog.to_string(),
            format!("{:.0}", common::median(&seed)),
            format!("{:.0}", common::median(&ours)),
            format!("{:.0}x", common::median(&ratios)),
        ]);
    }
    table.emit("load");
}

/// Seeds `backlog` open tasks for `model`, runs its 8 clients for a warm-up
/// second and then `window`, and returns the tasks finished per second in
/// the window.
async fn measure(ctx: &Ctx, model: Model, backlog: u64, window: Duration) -> f64 {
    let admin = common::connect(&ctx.url).await;
    match model {
        Model::Seed => seed_model(&admin, backlog).await,
        Model::Ours => common::seed(&admin, backlog).await,
    }
    let stop = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..SESSIONS {
        let (url, stop, finished) = (ctx.url.clone(), stop.clone(), finished.clone());
        clients.push(actix_rt::spawn(async move {
            match model {
                Model::Seed => seed_client(&url, &stop, &finished).await,
                Model::Ours => our_client(&url, &stop, &finished).await,
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = (finished.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(window).await;
    let end = (finished.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("baseline client");
    }
    (end.0 - start.0) as f64 / (end.1 - start.1).as_secs_f64()
}

/// The model's schema, afresh, with `backlog` open tasks.
async fn seed_model(client: &Client, backlog: u64) {
    client
        .batch_execute(SEED_MODEL)
        .await
        .expect("seed model schema");
    client
        .execute(
            "INSERT INTO seed_model.task (payload) SELECT 'noop' FROM generate_series(1, $1::bigint)",
            &[&(backlog as i64)],
        )
        .await
        .expect("seed model tasks");
    client
        .batch_execute("VACUUM ANALYZE seed_model.task")
        .await
        .expect("vacuum");
}

async fn seed_client(url: &str, stop: &AtomicBool, finished: &AtomicU64) {
    let client = common::connect(url).await;
    let session: i64 = client
        .query_one("SELECT seed_model.new_session()", &[])
        .await
        .expect("seed session")
        .get(0);
    while !stop.load(Ordering::Relaxed) {
        let ids: Vec<i64> = client
            .query("SELECT id FROM seed_model.get_work($1)", &[&session])
            .await
            .expect("seed get_work")
            .iter()
            .map(|r| r.get(0))
            .collect();
        if ids.is_empty() {
            continue;
        }
        let n = client
            .execute(
                "WITH f AS (SELECT * FROM seed_model.finish_tasks($1))
                 INSERT INTO seed_model.task (payload) SELECT 'noop' FROM f",
                &[&ids],
            )
            .await
            .expect("seed finish");
        finished.fetch_add(n, Ordering::Relaxed);
    }
}

async fn our_client(url: &str, stop: &AtomicBool, finished: &AtomicU64) {
    let start = SessionStart::new("baseline", Duration::from_secs(120), BATCH);
    crate::steady_drain(url, start, None, stop, |_, _, n| {
        finished.fetch_add(n, Ordering::Relaxed);
    })
    .await;
}
