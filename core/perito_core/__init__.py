"""Code shared by the Perito server, worker and training packages.

The registry, the model runtime, image decoding and validation, the artifact manifest and the
error types live here so that server, worker and training never import each other.
"""
