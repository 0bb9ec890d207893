-- Rollback of 0003_ingest_fillfactor: back to the default fill factor.
ALTER TABLE underlying_bars RESET (fillfactor);
ALTER TABLE bars_latest RESET (fillfactor);
