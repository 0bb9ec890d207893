-- depends: 0002_ingest_open_time
-- Bars are updated in place many times while their bucket is open (every commit that touches the contract), and
-- bars_latest on every commit: leave room on each page so those updates stay HOT (no index churn). Daily bar
-- partitions get the same setting when ingest creates them (services/ingest/store/pg.py: ensure_partitions).
ALTER TABLE bars_latest SET (fillfactor = 50);
ALTER TABLE underlying_bars SET (fillfactor = 70);
