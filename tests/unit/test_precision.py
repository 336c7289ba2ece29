"""Which precision serves a request (`perito_core.models.selection`): the caller may ask only
for a more exact form than the server's setting, and a precision it names is honoured or
refused, naming `precision` and the forms the version has; the server's setting is a
preference, never refused."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from perito_core.errors import ErrorCode, InvalidArgument
from perito_core.models.manifest import (
    Artifact,
    CompiledForm,
    FormFile,
    ModelManifest,
    TensorContract,
)
from perito_core.models.selection import (
    Asked,
    PrecisionUnavailable,
    candidate_forms,
    check_precision,
    requested_precision,
)
from tests.helpers import unpublished_manifest


@pytest.mark.parametrize(
    ("requested", "server", "served"),
    [
        ("", "auto", Asked("auto")),
        ("", "int8", Asked("int8")),
        ("auto", "auto", Asked("auto")),
        ("int8", "int8", Asked("int8", required=True)),
        ("int8", "auto", Asked("int8", required=True)),
        ("bf16", "int8", Asked("bf16", required=True)),
        ("fp32", "auto", Asked("fp32", required=True)),
        ("torchscript", "fp32", Asked("torchscript", required=True)),
        ("torchscript", "torchscript", Asked("torchscript", required=True)),
    ],
)
def test_a_named_precision_is_required_the_servers_preferred(
    requested: str, server: str, served: Asked
) -> None:
    assert requested_precision(requested, server) == served


@pytest.mark.parametrize(
    ("requested", "server"),
    [
        ("int8", "fp32"),
        ("auto", "int8"),
        ("fp32", "torchscript"),
        ("fp64", "auto"),
        ("FP32", "auto"),
        ("fp16", "auto"),
    ],
)
def test_less_exact_or_unknown_is_refused_naming_the_field(requested: str, server: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        requested_precision(requested, server)
    assert refused.value.field == "precision"
    assert requested in refused.value.message or "one of" in refused.value.message


def _form(name: str) -> CompiledForm:
    engine, precision = name.split("-")
    return CompiledForm(
        name=name,
        engine=engine,
        engine_version="1",
        precision=precision,
        files=[FormFile(file="model.xml", sha256="0" * 64, size_bytes=1)],
        requires=["no_such_cpu_flag"] if precision == "bf16" else [],
        agreement=1.0,
        max_abs_diff=0.0,
        images=8,
    )


def _version(*forms: str, skipped: dict[str, str] | None = None) -> ModelManifest:
    return unpublished_manifest(
        ["a", "b"], forms=[_form(name) for name in forms], skipped_forms=skipped or {}
    )


def _onnx(dtype: str) -> ModelManifest:
    return unpublished_manifest(
        ["a", "b"],
        artifact=Artifact(file="model.onnx", sha256="0" * 64, size_bytes=0, format="onnx"),
        tensor=TensorContract(layout="NHWC", dtype=dtype, scale=1 / 255),
    )


def _refusal(manifest: ModelManifest, precision: str, **where: Any) -> str:
    with pytest.raises(PrecisionUnavailable) as refused:
        check_precision(manifest, Asked(precision, required=True), **where)
    error = refused.value
    assert (error.code, error.reason, error.field) == (
        ErrorCode.FAILED_PRECONDITION,
        "PRECISION_UNAVAILABLE",
        "precision",
    )
    return error.message


def test_a_precision_the_version_lacks_is_refused_listing_its_forms() -> None:
    version = _version("openvino-fp32", skipped={"openvino-int8": "agreement 91% under 99%"})
    message = _refusal(version, "int8")
    assert message.startswith("precision int8: m@1 has no int8 form; its forms: ")
    assert "torchscript-fp32, openvino-fp32" in message
    assert "openvino-int8: agreement 91% under 99%" in message  # why the gate refused it
    assert "bf16" in _refusal(version, "bf16")
    for honoured in ("fp32", "torchscript", "auto"):
        check_precision(version, Asked(honoured, required=honoured != "auto"))


def test_the_servers_setting_is_a_preference_never_refused() -> None:
    for precision in ("int8", "bf16", "fp32", "torchscript"):
        check_precision(_version(), Asked(precision))
        check_precision(_onnx("float16"), Asked(precision))


def test_on_this_machine_a_form_it_cannot_run_does_not_count() -> None:
    version = _version("openvino-bf16", "openvino-int8")
    check_precision(version, Asked("bf16", required=True))  # job submission: the manifest
    assert "this CPU lacks no_such_cpu_flag" in _refusal(version, "bf16", device="cpu")
    message = _refusal(version, "int8", device="cuda:0")
    assert "compiled forms serve on the CPU only" in message


def test_an_onnx_graph_counts_as_its_input_tensors_precision() -> None:
    half, single = _onnx("float16"), _onnx("float32")
    message = _refusal(half, "fp32")
    assert "its forms: onnxruntime-fp16 " in message
    for precision in ("int8", "bf16", "torchscript"):
        assert "its forms: onnxruntime-fp32 " in _refusal(single, precision)
    check_precision(single, Asked("fp32", required=True))


def test_a_preference_falls_back_to_more_exact_forms_first() -> None:
    version = _version("openvino-int8", "openvino-bf16", "onnxruntime-fp32")
    names = [[f.name for f in tier] for tier in candidate_forms(version, "int8")]
    assert names == [["openvino-int8"], ["openvino-bf16", "onnxruntime-fp32"]]
    names = [[f.name for f in tier] for tier in candidate_forms(version, "bf16")]
    assert names == [["openvino-bf16"], ["onnxruntime-fp32"]]
    assert candidate_forms(version, "torchscript") == []
    assert len(candidate_forms(version, "auto")[0]) == 3
    # A version without forms has nothing to try: no "no compiled form loads" warning.
    assert candidate_forms(_version(), "auto") == []


def test_a_form_that_gave_way_on_this_machine_is_refused_with_its_reason() -> None:
    version = _version("openvino-int8", "openvino-fp32")
    reasons = {"openvino-int8": "sha256 mismatch", "openvino-fp32": "slower here (9 images/s)"}
    fallback = SimpleNamespace(form="openvino-fp32", passed_over=reasons)
    message = _refusal(version, "int8", served=fallback)
    assert "has no int8 form that serves here" in message
    assert "openvino-int8: sha256 mismatch" in message and "slower" not in message
    check_precision(version, Asked("fp32", required=True), served=fallback)  # type: ignore[arg-type]
