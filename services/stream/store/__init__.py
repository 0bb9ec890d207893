"""Adapters of the stream service: the Redis BarUpdate consumer and the QueryService snapshot client."""
