"""The response cache: L1 in-process + L2 Redis holding serialized response bytes, invalidated by generation
(per underlying and timeframe, from ingest's BarUpdate sequence numbers). See docs/query.md."""
