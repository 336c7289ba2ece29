"""The `perito.v1` API contract: code generated from `proto/perito/v1/*.proto`."""
