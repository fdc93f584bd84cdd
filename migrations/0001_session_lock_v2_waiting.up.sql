-- Which sessions want to hear of new tasks: what protocol 2 records beyond
-- 0001_session_lock_v2_known.up.sql. Applied exactly once (a *.up.sql
-- file): never edit it after release.
--
-- A session is waiting while it holds fewer tasks than its capacity, as
-- the last of its calls that wrote its held counter left it (or its
-- runner asked to go quiet). It starts waiting (it holds nothing), and so
-- does every session live when this is applied, until its next call says
-- otherwise: a notification too many costs a tick's work, one too few a
-- tick's wait. A task table's INSERT trigger notifies only while a live
-- session of the table (or one that has not ticked yet) is waiting
-- (0003_task_table.alwaysup.sql): a notifying commit takes
-- PostgreSQL's one notify lock and holds it through its WAL flush, so
-- every notifying commit in the cluster waits for the one before it, and
-- a fleet that is busy with a backlog has no runner to wake. The index
-- holds the waiting sessions only: the trigger's read is one probe of a
-- small index, and renewals (which never change these columns) stay HOT.
ALTER TABLE session_lock.session
    ADD COLUMN waiting boolean NOT NULL DEFAULT true;

CREATE INDEX session_waiting_idx
    ON session_lock.session (task_table)
    WHERE waiting AND ended_at IS NULL AND reclaimed_at IS NULL;
