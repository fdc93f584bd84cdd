-- session-lock task template, part 1 of 2: applied once.
--
-- Copy this file into your migrations directory, renumber it to run after the
-- migration that creates your task table, and follow the TODOs. The migrator
-- refuses a file that still contains a TODO(session-lock) marker and lists
-- the lines left to do. migrations/example/ holds the same two files filled
-- in for the table public.example_task.
--
-- Naming: this template calls your table `my_task` and prefixes every
-- function with `my_task_`. Replace both, everywhere, with your table's name,
-- so several task tables (one per runner name) can live in one database.

-- TODO(session-lock): replace my_task with your task table's name.
-- The column that records which session holds a task. NULL: nobody.
ALTER TABLE my_task ADD COLUMN IF NOT EXISTS session_id BIGINT;

-- TODO(session-lock): replace `finished_at IS NULL` with your table's
-- predicate for an open task (one that still needs doing), and `id` with its
-- BIGINT primary key if it is called something else.
-- One index over open tasks serves every query of the protocol: pickup scans
-- the (session_id IS NULL) range in id order, a session's tasks are the
-- (session_id = x) range, and the bounded count of free tasks is an
-- index-only scan. Being partial, it stays as small as the open backlog.
CREATE INDEX IF NOT EXISTS my_task_open_idx
    ON my_task (session_id, id)
    WHERE finished_at IS NULL;

-- If this table will hold a deep backlog (100,000 open tasks and more), let
-- autovacuum clear the dead index entries that pickups leave at the head of
-- the queue sooner than its default 20 % of the table (README: Vacuum):
--     ALTER TABLE my_task SET (autovacuum_vacuum_scale_factor = 0.01,
--                              autovacuum_vacuum_threshold = 10000);
