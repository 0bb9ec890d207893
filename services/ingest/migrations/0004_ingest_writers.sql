-- depends: 0003_ingest_fillfactor
-- One row per underlying, bumped by every ingest commit that touches it. An ingest process compares the version
-- with the one it last wrote (under a per-underlying advisory lock) to detect that another replica wrote in between,
-- and then reloads the per-contract state it keeps in memory from the bars (services/ingest/pipeline.py).
CREATE TABLE ingest_writers (
  underlying text PRIMARY KEY,
  version bigint NOT NULL DEFAULT 0,      -- commits that touched the underlying
  updated_at timestamptz NOT NULL DEFAULT now()
);
