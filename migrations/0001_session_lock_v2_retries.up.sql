-- Retries, quarantine and fencing tokens: what protocol 2 records for
-- them beyond 0001_session_lock_v2.up.sql. Applied exactly once (a
-- *.up.sql file): never edit it after release.
--
-- Per declared table: after how many pickups an unfinished task is
-- quarantined (NULL: never), and the backoff before a failed task can be
-- picked up again (retry_backoff, doubling per attempt up to
-- retry_backoff_max). The columns these act on (sl_attempts, sl_retry_at,
-- sl_fence, sl_last_session) are added to each task table when it is
-- declared (0003_task_table.alwaysup.sql).
ALTER TABLE session_lock.task_table
    ADD COLUMN max_attempts      integer  DEFAULT 5
        CHECK (max_attempts IS NULL OR max_attempts BETWEEN 1 AND 1000000),
    ADD COLUMN retry_backoff     interval NOT NULL DEFAULT '1 second',
    ADD COLUMN retry_backoff_max interval NOT NULL DEFAULT '10 minutes';

-- Fencing tokens: every pickup of a task draws the next value, so a task's
-- token grows with every change of holder, whichever session takes it
-- (session ids do not: an older session may take over from a newer one).
CREATE SEQUENCE session_lock.fence AS bigint;
