-- Rollback of 0001_bars: drops every optmon table and function (data loss: only for a fresh install).
DROP FUNCTION IF EXISTS optmon_drop_partitions_before(date);
DROP FUNCTION IF EXISTS optmon_ensure_partitions(date, date);
DROP TABLE IF EXISTS underlying_bars;
DROP TABLE IF EXISTS bars_latest;
DROP TABLE IF EXISTS bars_1h;
DROP TABLE IF EXISTS bars_15m;
DROP TABLE IF EXISTS bars_5m;
DROP TABLE IF EXISTS bars_1m;
