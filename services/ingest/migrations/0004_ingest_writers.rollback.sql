-- Rollback of 0004_ingest_writers.
DROP TABLE IF EXISTS ingest_writers;
