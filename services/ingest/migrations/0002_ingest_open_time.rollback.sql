-- Rollback of 0002_ingest_open_time (contract step: drops the open-time columns).
ALTER TABLE underlying_bars DROP COLUMN IF EXISTS open_time;
ALTER TABLE bars_1h DROP COLUMN IF EXISTS ce_open_time, DROP COLUMN IF EXISTS pe_open_time;
ALTER TABLE bars_15m DROP COLUMN IF EXISTS ce_open_time, DROP COLUMN IF EXISTS pe_open_time;
ALTER TABLE bars_5m DROP COLUMN IF EXISTS ce_open_time, DROP COLUMN IF EXISTS pe_open_time;
ALTER TABLE bars_1m DROP COLUMN IF EXISTS ce_open_time, DROP COLUMN IF EXISTS pe_open_time;
