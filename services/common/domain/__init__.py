"""Pure domain logic shared by the services (no grpc, asyncpg or redis imports)."""
