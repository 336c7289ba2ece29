"""The `perito.v1` API contract: what the SDK and the service both speak.

The messages and stubs (`*_pb2.py`, `*_pb2_grpc.py`) are generated from
`proto/perito/v1/*.proto` by `scripts/gen_protos.py`; `vocabulary` (job and item states,
`Prediction`) is written by hand. This is the only part of the SDK distribution that the
server-side packages import (an import-linter contract), and importing it loads none of the
SDK's client code.
"""
