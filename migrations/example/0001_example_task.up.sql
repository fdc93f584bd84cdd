-- The worked example: the task template filled in for a table of tasks.
-- Used by the tests, the demo, the benchmarks and `session-lock worker`.
-- Its tables are a contract other tools read: keep their columns stable.

-- One row per task. A task is open while finished_at IS NULL; session_id is
-- the session holding it (NULL: nobody); finished_by is the session that
-- finished it.
CREATE TABLE public.example_task (
    id          BIGSERIAL PRIMARY KEY,
    payload     TEXT        NOT NULL,
    session_id  BIGINT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ,
    finished_by BIGINT
);

-- The one index the protocol needs, over open tasks only, so its size
-- follows the open backlog and not the table's history:
--   * pickup scans the (session_id IS NULL) range in id order;
--   * a session's own tasks are the (session_id = x) range;
--   * the bounded count of free tasks is an index-only scan.
CREATE INDEX example_task_open_idx
    ON public.example_task (session_id, id)
    WHERE finished_at IS NULL;

-- One row per execution, written by the example tasker (started_at when it
-- starts, finished_at when its work is done), so duplicate executions can be
-- counted: a task with two rows ran twice.
CREATE TABLE public.example_task_run (
    id          BIGSERIAL PRIMARY KEY,
    task_id     BIGINT      NOT NULL,
    session_id  BIGINT      NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ
);

CREATE INDEX example_task_run_task_idx ON public.example_task_run (task_id);
