"""Pure stream logic: filters, the per-underlying book, windows following ATM, deltas and conflation.

No grpc, asyncpg, redis or protobuf imports here: :mod:`services.stream.codec` translates protos to these types.
"""
