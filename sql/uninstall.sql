-- Removes pgreplica from a master: its triggers, functions, log and registry.
-- Events not yet applied by a slave are lost.
--
--   psql -d shop -f sql/uninstall.sql
DROP SCHEMA IF EXISTS pgreplica CASCADE;
-- WAL capture: the publications, and the slots (a forgotten slot keeps the
-- WAL forever; a slot still read by a running daemon makes this fail: stop it).
DROP PUBLICATION IF EXISTS pgreplica, pgreplica_log;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
 WHERE database = current_database() AND slot_name LIKE 'pgreplica\_%';
