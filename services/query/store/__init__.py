"""Adapters: PostgreSQL reads (``pg``), Redis cache and update stream (``redis`` in services.query.cache)."""
