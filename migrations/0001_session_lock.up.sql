-- session-lock schema. Applied exactly once (a *.up.sql file): never edit it
-- after release; add a new numbered file instead.
--
-- Every time below is a timestamptz taken from the database clock (now()),
-- never from a client, so instances with skewed clocks still agree on who is
-- alive.

CREATE SCHEMA IF NOT EXISTS session_lock;

-- One row per session: the lease an instance of a runner holds while it is
-- alive. Sessions of the same name share that runner's tasks among
-- themselves; sessions of different names never interact.
CREATE TABLE session_lock.session (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        TEXT        NOT NULL CHECK (name <> '' AND length(name) <= 200),
    host        TEXT        NOT NULL DEFAULT '',
    pid         INTEGER     NOT NULL DEFAULT 0,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    bumped_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL,
    -- Set by end_session: the session gave its lease back.
    ended_at    TIMESTAMPTZ,
    -- Set when a surviving session of the same name released this expired
    -- session's tasks. A reclaimed session can never be bumped again, and only
    -- reclaimed sessions are deleted by reap_sessions, so no task is ever left
    -- pointing at a session nobody will release.
    reclaimed_at TIMESTAMPTZ,
    -- How many open tasks the session held when its last get_work or
    -- finish_tasks committed (session_lock.record_held). The other sessions
    -- of its name add these up instead of counting the tasks the live
    -- sessions hold, so a get_work reads the task table only for its own
    -- tasks and for as many free ones as its share could still need,
    -- however large the backlog (README: fair shares).
    held        INTEGER     NOT NULL DEFAULT 0 CHECK (held >= 0),
    CHECK (reclaimed_at IS NULL OR expires_at <= reclaimed_at)
)
-- Every heartbeat and every get_work rewrites its session's row. With room
-- left on each page and no index on the columns a bump or a get_work
-- changes (expires_at, bumped_at, held), those are HOT updates: no index
-- entry per heartbeat, no index bloat however busy the runners are.
WITH (fillfactor = 50);

COMMENT ON TABLE session_lock.session IS
    'Leases held by runner instances; see the session-lock README.';

-- Counting the live sessions of a name, and finding its expired ones that
-- are not yet reclaimed: both read the unreclaimed sessions of one name (a
-- handful: one per live instance, plus the recently dead) and check
-- expires_at on the row. expires_at is deliberately not indexed (see the
-- fillfactor above).
CREATE INDEX session_name_live_idx
    ON session_lock.session (name)
    WHERE reclaimed_at IS NULL;

-- reap_sessions deletes old reclaimed sessions.
CREATE INDEX session_reclaimed_idx
    ON session_lock.session (reclaimed_at)
    WHERE reclaimed_at IS NOT NULL;
