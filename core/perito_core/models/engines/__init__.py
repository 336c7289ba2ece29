"""The engines that run a model version, one module each, and the registry of those that build
and serve compiled forms.

- `torchscript`: `model.pt`, the reference, and the form that serves when no other does.
- `openvino`: IR forms in FP32, BF16 and INT8 (NNCF).
- `onnxruntime`: imported ONNX models, and ONNX forms in FP32 and INT8.

Each compiled-form engine is an `Engine` (`base.py`): it says whether it is installed, opens a
stored form (`load`) and builds candidate forms from `model.pt` (`build`). Which form serves
is chosen in `perito_core.models.selection`; which candidates are kept, in
`perito_core.models.gate`. Neither names an engine: they go through `ENGINES`.
"""

from __future__ import annotations

from perito_core.models.engines import onnxruntime, openvino
from perito_core.models.engines.base import Engine, cpu_flags, isa_summary
from perito_core.models.manifest import CompiledForm

# Every engine of compiled forms by name (`CompiledForm.engine`), in the order a build runs
# them: OpenVINO first, then ONNX Runtime.
ENGINES: dict[str, Engine] = {
    engine.name: engine for engine in (openvino.ENGINE, onnxruntime.ENGINE)
}
ENGINE_NAMES: tuple[str, ...] = tuple(ENGINES)


def unsupported_reason(form: CompiledForm) -> str | None:
    """Why this machine cannot run `form` at its precision, or None when it can."""
    engine = ENGINES[form.engine]
    if engine.version() is None:
        return f"{engine.title} is not installed (pip install 'perito[serve]')"
    if form.requires and not cpu_flags() & set(form.requires):
        return f"this CPU lacks {' or '.join(form.requires)} (has: {isa_summary()})"
    return None
