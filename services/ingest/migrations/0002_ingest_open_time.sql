-- depends: 0001_bars
-- Expand-only: the exchange time of each bar's first tick, so that merging ticks that arrive in several commits
-- (or late) keeps "open = LTP of the earliest tick" exact and idempotent. Nullable, no default: instant on PG 15.
ALTER TABLE bars_1m ADD COLUMN IF NOT EXISTS ce_open_time timestamptz, ADD COLUMN IF NOT EXISTS pe_open_time timestamptz;
ALTER TABLE bars_5m ADD COLUMN IF NOT EXISTS ce_open_time timestamptz, ADD COLUMN IF NOT EXISTS pe_open_time timestamptz;
ALTER TABLE bars_15m ADD COLUMN IF NOT EXISTS ce_open_time timestamptz, ADD COLUMN IF NOT EXISTS pe_open_time timestamptz;
ALTER TABLE bars_1h ADD COLUMN IF NOT EXISTS ce_open_time timestamptz, ADD COLUMN IF NOT EXISTS pe_open_time timestamptz;
ALTER TABLE underlying_bars ADD COLUMN IF NOT EXISTS open_time timestamptz;
