-- Removes pgreplica from a master: its triggers, functions, log and registry.
-- Events not yet applied by a slave are lost.
--
--   psql -d shop -f sql/uninstall.sql
DROP SCHEMA IF EXISTS pgreplica CASCADE;
