"""Generated messages of the Open Inference Protocol (`proto/inference/grpc_service.proto`).

Build output of `scripts/gen_protos.py` (`make proto`); git-ignored.
"""
