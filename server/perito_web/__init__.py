"""The Perito web page: classify a photo, run a folder as a job, browse models and their cards.

A small Starlette app that talks to the gRPC service through the SDK's `AsyncClient`; it holds
no model itself. Run it with `perito web --server HOST:PORT`.
"""
