-- session-lock protocol 2: the schema it adds to the first release's.
-- Applied exactly once (a *.up.sql file): never edit it after release.
-- (It sorts after 0001_session_lock.up.sql and before the always-files,
-- which use what it creates.)

-- A session's capacity is the most tasks it may hold (the runner's
-- max_tasks), and its weight in the fair shares of its name: shares are
-- proportional to capacity. Sessions of the first release get the tasks
-- they hold as their capacity; they cannot renew any more (protocol below)
-- and expire within their TTL.
-- protocol is the version of the protocol the session's runner speaks:
-- the functions of protocol 2 refuse sessions of another version with
-- SQLSTATE SL004, so a runner of an older release stops clearly instead of
-- misreading a newer protocol's rows.
-- token is the session's secret: start_session returns it once, and every
-- call that acts for the session must present it, so that holding the
-- runtime role is not enough to end, renew or finish for another process's
-- session. task_table is the one task table the session works, bound by its
-- first get_work: shares, held counters and the sweep are per name and
-- table.
ALTER TABLE session_lock.session
    ADD COLUMN capacity integer NOT NULL DEFAULT 1
        CHECK (capacity BETWEEN 1 AND 10000),
    ADD COLUMN protocol smallint NOT NULL DEFAULT 1,
    ADD COLUMN token uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    ADD COLUMN task_table regclass;

UPDATE session_lock.session
   SET capacity = least(greatest(held, 1), 10000)
 WHERE reclaimed_at IS NULL;

ALTER TABLE session_lock.session
    ALTER COLUMN capacity DROP DEFAULT,
    ALTER COLUMN protocol DROP DEFAULT;

-- The declared task tables. A row is a declaration, written by
-- session_lock.declare_task_table; from it session-lock generates the
-- table's protocol functions in this schema (0003_task_table.alwaysup.sql),
-- again on every migration, so a new release's protocol reaches every
-- declared table without anyone copying SQL.
CREATE TABLE session_lock.task_table (
    -- regclass: kept by name through pg_dump and restore.
    task_table   regclass    PRIMARY KEY,
    -- The leading name of the generated functions
    -- (session_lock.<fn_prefix>_get_work, ..._finish_tasks, ..._held).
    fn_prefix    text        NOT NULL UNIQUE,
    -- The BIGINT primary key column.
    id_column    name        NOT NULL,
    -- Which rows are open: a boolean SQL expression over the row's columns.
    open_when    text        NOT NULL,
    -- How a row is marked finished: a SET list over the row's columns.
    finish       text        NOT NULL,
    -- A BIGINT column that receives the finishing session's id, if any.
    finished_by  name,
    -- The order of pickup: an ORDER BY list over the row's columns.
    order_by     text        NOT NULL,
    -- The channel notified when rows are inserted, if any.
    notify       text,
    -- The longest any statement of the table's protocol waits for a lock.
    lock_timeout interval    NOT NULL,
    declared_at  timestamptz NOT NULL DEFAULT now(),
    generated_at timestamptz
);

COMMENT ON TABLE session_lock.task_table IS
    'Task tables declared to session-lock; see session_lock.declare_task_table and the README.';
