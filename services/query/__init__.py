"""QueryService: read views over the stored bars behind a two-level cache (see docs/query.md)."""
