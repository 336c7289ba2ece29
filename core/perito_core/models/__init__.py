"""The model side: the artifact's manifest, the versioned registry, the runtime that loads a
version, and its compiled forms (OpenVINO, ONNX Runtime)."""
