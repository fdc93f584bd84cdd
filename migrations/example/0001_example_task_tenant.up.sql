-- The worked example's tenant: a nullable group key (NULL: no group),
-- declared as the table's group_by (0002_example_task.alwaysup.sql), so
-- that pickup goes round-robin across tenants.
ALTER TABLE public.example_task ADD COLUMN tenant TEXT;
