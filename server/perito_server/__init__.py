"""The Perito gRPC front service: `Classify` with dynamic batching, models, and bulk jobs."""
