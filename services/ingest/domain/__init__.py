"""Pure ingest logic (no grpc, asyncpg or redis imports)."""
