"""Local infrastructure for the embedded default, the tests and the benchmarks: a private PostgreSQL cluster,
a private Redis and Envoy, each started as a child process on loopback with its data under a given directory."""
