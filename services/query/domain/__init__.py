"""Pure query logic: request validation, strike selection, chain analytics, page tokens (no grpc/asyncpg/redis)."""
