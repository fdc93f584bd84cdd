-- Tenant groups: what protocol 2 records for them beyond
-- 0001_session_lock_v2.up.sql. Applied exactly once (a *.up.sql file):
-- never edit it after release.
--
-- A declared table may name a group key (a tenant, a customer, a queue):
-- pickup then goes round-robin across the groups with free tasks, one task
-- of each in turn, instead of strictly in order, so that a group with ten
-- tasks is not starved by one with a million. Each session keeps, as
-- text, the group its last round stopped at.
ALTER TABLE session_lock.task_table ADD COLUMN group_by name;
ALTER TABLE session_lock.session ADD COLUMN group_cursor text;
