"""OpenVINO: compiled IR forms in FP32, BF16 and INT8 (NNCF), run on the CPU.

Build: `model.pt`'s fixed-size forward pass is converted to an FP32 IR (weights kept FP32, not
`save_model`'s FP16 default); BF16 is that IR compiled with the `bf16` precision hint (on a
CPU that has it); INT8 is NNCF post-training quantization of the IR (`quantize`), and, when
the gate refuses it, NNCF's accuracy control. OpenVINO and NNCF are optional (`perito[serve]`)
and imported only when a form is built or loaded.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perito_core.errors import ModelLoadError
from perito_core.models.calibration import rescale
from perito_core.models.engines.base import (
    MAX_CALIBRATION_IMAGES,
    BuildContext,
    Candidate,
    LoadedModel,
    in_batches,
    isa_summary,
)
from perito_core.models.fixed_size import fixed_size
from perito_core.models.manifest import MIN_AGREEMENT, CompiledForm, InputContract, ModelManifest

log = logging.getLogger(__name__)

BF16_FLAGS = ["avx512_bf16", "amx_bf16"]
# Accuracy control's time bound (`quantize`'s `seconds`): EfficientNet-Lite0 on a 2-core AVX2
# CPU must stay within about 3 minutes of import with its plain INT8 and the gate.
ACCURACY_CONTROL_SECONDS = 120.0
# The images accuracy control ranks the quantized groups on: those whose metric dropped most.
RANKING_IMAGES = 64
# An accuracy-control metric: (compiled model, (image batch, FP32 probabilities) items) ->
# (the metric, its value per item).
Metric = Callable[[object, Iterable[tuple[np.ndarray, np.ndarray]]], tuple[float, list[float]]]


# The fewest images accuracy control ranks the quantized groups on, however short its time.
MIN_RANKING_IMAGES = 8


class OpenVinoModel(LoadedModel):
    """A compiled OpenVINO IR form: the same contract, compiled for this CPU at load.

    The IR holds no ISA-specific code: `compile_model` picks oneDNN kernels for the CPU it runs
    on, so a form built on one machine loads on any x86-64 CPU. The precision hint is always
    explicit: on CPUs with BF16 OpenVINO would otherwise run an FP32 or INT8 IR's float parts
    in BF16, which is not what the accuracy gate measured.

    A form whose calibration was re-fitted at publish (`CompiledForm.temperature`,
    `confidence_threshold`) serves `softmax(log(p) / temperature)` of the IR's probabilities
    p, and its `manifest` carries the form's `uncertain` threshold in place of the version's,
    so the server and the workers apply the served form's own.
    """

    def __init__(self, manifest: ModelManifest, form: CompiledForm, xml: Path) -> None:
        import openvino

        super().__init__(manifest.served_by(form), torch.device("cpu"), form.name)
        self.temperature = form.temperature
        core = openvino.Core()
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if form.precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads()),
        }
        self._compiled = core.compile_model(str(xml), "CPU", config)
        self._request = self._compiled.create_infer_request()

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        result = self._request.infer([np.ascontiguousarray(batch.numpy())])
        probabilities = np.array(result[0], dtype=np.float32, copy=True)
        return torch.from_numpy(rescale(probabilities, self.temperature))


class OpenVinoEngine:
    """The `Engine` for OpenVINO IR forms (`model.xml` and its weights)."""

    name = "openvino"
    title = "OpenVINO"
    suffix = ".xml"

    def version(self) -> str | None:
        """The installed OpenVINO's version, or None when it is not installed."""
        try:
            import openvino
        except ImportError:
            return None
        return str(openvino.__version__)

    def load(self, path: Path, manifest: ModelManifest, form: CompiledForm) -> LoadedModel:
        """Compile the IR at `path` for this CPU and check one batch.

        Raises:
            ModelLoadError: the IR does not compile here, or breaks the contract.
        """
        try:
            model = OpenVinoModel(manifest, form, path)
        except Exception as exc:  # noqa: BLE001 - any engine failure here is a bad or foreign form
            raise ModelLoadError(f"{form.name} does not compile here: {exc}") from None
        probe = model._probe_batch()
        model._check_contract(probe, model._forward(probe))
        return model

    def build(self, build: BuildContext) -> None:
        """FP32 IR, BF16 (that IR with the `bf16` precision hint, on a CPU that has it) and
        INT8 (NNCF, `quantize`; its `retry` quantizes again with accuracy control) into
        `build.candidates`, or why not into `build.built.skipped`."""
        names = [f"openvino-{p}" for p in build.precisions]
        version = self.version()
        if version is None:
            build.built.skipped.update({name: "OpenVINO is not installed" for name in names})
            return
        import openvino

        try:
            ov_model = convert(build.module, build.contract)
        except Exception as exc:  # noqa: BLE001 - a network the converter cannot take is skipped
            reason = f"OpenVINO cannot convert this module: {str(exc).splitlines()[0][:300]}"
            build.built.skipped.update({name: reason for name in names})
            return
        core = openvino.Core()
        fp32_dir = build.folder("openvino-fp32")
        openvino.save_model(ov_model, str(fp32_dir / "model.xml"), compress_to_fp16=False)

        def candidate(precision: str, folder: Path, hint: str, **more: Any) -> Candidate:
            def compile_form() -> object:  # by the candidate, on first use
                config = {
                    "INFERENCE_PRECISION_HINT": hint,
                    "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                }
                return core.compile_model(str(folder / "model.xml"), "CPU", config)

            return Candidate(
                self.name, version, precision, folder, compile_form, probabilities, **more
            )

        if "fp32" in build.precisions:
            build.candidates.append(candidate("fp32", fp32_dir, "f32"))
        if "bf16" in build.precisions:
            if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                # The FP32 IR's own files, compiled with another hint: no copy of them.
                build.candidates.append(candidate("bf16", fp32_dir, "bf16", requires=BF16_FLAGS))
            else:
                build.built.skipped["openvino-bf16"] = (
                    f"this CPU cannot run BF16 ({isa_summary()}): built and verified only on one "
                    "with avx512_bf16 or AMX"
                )

        def int8(control: bool) -> Candidate | None:
            """INT8 (plain, or by accuracy control) written to `openvino-int8`; None when it
            failed."""
            checks = None
            if control:
                validation = build.validation
                checks = build.images if validation is None else validation[:MAX_CALIBRATION_IMAGES]
            try:
                quantized = quantize(
                    ov_model,
                    build.images,
                    validation=checks,
                    min_agreement=build.control_agreement,
                    metric=build.control_metric,
                )
            except Exception as exc:  # noqa: BLE001 - a failed quantization skips the form only
                build.built.skipped["openvino-int8"] = f"quantization failed: {exc}"
                return None
            int8_dir = build.folder("openvino-int8")
            openvino.save_model(quantized, str(int8_dir / "model.xml"), compress_to_fp16=False)
            return candidate(
                "int8",
                int8_dir,
                "f32",
                calibrated=len(build.images),
                quantization="accuracy-control" if control else "post-training",
                fp32_layers=fp32_layers(quantized),
                retry=None if control else lambda: int8(control=True),
            )

        if "int8" in build.precisions:
            plain = int8(control=False)
            if plain is not None:
                build.candidates.append(plain)


ENGINE = OpenVinoEngine()


def convert(module: torch.jit.ScriptModule, contract: InputContract) -> object:
    """`module`'s fixed-size forward pass (`fixed_size`) as an `openvino.Model`: uint8
    (N, 3, H, W) in at the contract's size, the batch dynamic, probabilities out.

    Raises:
        Whatever `openvino.convert_model` raises for a module it cannot take.
    """
    import openvino

    example = torch.randint(0, 256, (1, 3, contract.height, contract.width), dtype=torch.uint8)
    shape = [-1, 3, contract.height, contract.width]
    source = fixed_size(module)
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        return openvino.convert_model(
            source, example_input=example, input=[(shape, openvino.Type.u8)]
        )


def quantize(
    ov_model: object,
    images: np.ndarray,
    *,
    validation: np.ndarray | None = None,
    min_agreement: float = MIN_AGREEMENT,
    metric: str = "agreement",
    seconds: float | None = ACCURACY_CONTROL_SECONDS,
) -> object:
    """NNCF INT8 of `ov_model` (uint8 N x 3 x H x W input), chosen for an IR that must be exact
    on every x86 CPU.

    - `OverflowFix.ENABLE`: weights get 7 bits. Without VNNI (AVX2-only CPUs) oneDNN's u8 x s8
      products saturate their 16-bit sums; NNCF's default fixes only the first layer, and on
      this AVX2 EPYC EfficientNet-Lite0 then agreed with FP32 on 64% of photo crops, 81% with
      the fix. A form is built once and may serve on either kind of CPU.
    - Depthwise (group) convolutions stay FP32: with them quantized too, Lite0 agreed on 81%
      of 36 photo framings, without 97%; networks without them (ResNet) are unchanged.
    - `MIXED` preset: asymmetric activations (inputs after the normalisation are not centred).
    - The first convolution stays FP32 (`first_convolution`): it takes the normalised pixels,
      whose 8-bit grid is coarse against the small differences a trained network's first
      filters respond to. Measured on a ResNet-18 trained by the `resnet18-finetune` recipe
      (64 px, 4 classes), 240 held-out images, oneDNN limited to AVX2: agreement with model.pt
      89.6% with it quantized, 93.8% without (max probability difference 0.200 -> 0.087),
      both about 2.2x the FP32 IR at batch 8. `PERFORMANCE` (symmetric activations) 93.3%,
      no overflow fix or NNCF's full bias correction 89.6-91.7%.

    With `validation` (uint8 images (N, H, W, 3), never the gate's held-out images), accuracy
    control (NNCF docs, "Post-training Quantization with Accuracy Control"): quantized as
    above, then the fewest of the most sensitive quantized groups go back to FP32 until the
    metric drops by at most `1 - min_agreement` (absolute), ranked once and searched within
    `seconds` (`restore_layers`; None: no bound). The metric (`metric`) compares with the FP32
    IR on `validation`, so no labels are needed: `agreement`, top-1 agreement (`_agreement`),
    or `fidelity`, 1 - the largest probability difference (`_fidelity`); both are 1.0 for the
    FP32 IR itself. The gate then judges that form on the held-out images like any other.

    Returns:
        The quantized `openvino.Model`.

    Raises:
        ValueError: no calibration images.
        nncf errors: as `nncf.quantize` and NNCF's accuracy control.
    """
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    # The logger's level only: nncf.set_log_level also sets every handler on it (pytest's too)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    batches = [np.ascontiguousarray(image.transpose(2, 0, 1)[None]) for image in images]
    if not batches:
        raise ValueError("no calibration images")
    first = first_convolution(ov_model)
    options: dict[str, object] = {
        "subset_size": len(batches),
        "preset": nncf.QuantizationPreset.MIXED,
        "ignored_scope": nncf.IgnoredScope(
            names=[first] if first else [], types=["GroupConvolution"], validate=False
        ),
    }
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    if validation is None or len(validation) == 0:
        return nncf.quantize(
            ov_model, nncf.Dataset(batches), advanced_parameters=advanced, **options
        )
    import openvino
    from nncf.openvino.quantization.backend_parameters import BackendParameters

    # Weights stay FP32 behind their FakeQuantize until the end, so a layer can be reverted.
    advanced.backend_params[BackendParameters.COMPRESS_WEIGHTS] = False
    quantized = nncf.quantize(
        ov_model, nncf.Dataset(batches), advanced_parameters=advanced, **options
    )
    checks = [np.ascontiguousarray(image.transpose(2, 0, 1)[None]) for image in validation]
    fp32 = openvino.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    reference = [np.array(fp32([batch])[0][0], dtype=np.float32) for batch in checks]
    items = list(zip(checks, reference, strict=True))
    restored = restore_layers(
        ov_model,
        quantized,
        nncf.Dataset(items, lambda item: item[0]),
        _fidelity if metric == "fidelity" else _agreement,
        max_drop=1.0 - min_agreement,
        seconds=seconds,
    )
    from openvino._offline_transformations import compress_quantize_weights_transformation

    compress_quantize_weights_transformation(restored)
    return restored


def restore_layers(
    ov_model: object,
    quantized: object,
    validation: Any,
    metric: Metric,
    *,
    max_drop: float,
    seconds: float | None = ACCURACY_CONTROL_SECONDS,
    ranking_images: int = RANKING_IMAGES,
    clock: Callable[[], float] = time.monotonic,
) -> object:
    """The fewest of `quantized`'s quantized groups reverted to FP32 for `metric` on
    `validation` to drop by at most `max_drop` from `ov_model`'s, found within `seconds`.

    NNCF's pieces of accuracy control, in a bounded order: its `Ranker` ranks each group of
    quantizers once (the group alone reverted, scored on at most `ranking_images` of the items
    whose metric dropped most), then a bisection over how many of the most harmful groups to
    revert (`revert_prefix`): log2(groups) validations, not NNCF's re-ranking after every
    revert that made the metric worse (6-20 minutes for EfficientNet-Lite0 on 2 cores). When
    `seconds` pass first, the smallest prefix that met the target is kept, else the largest
    one that failed (`fewest_reverted`); the gate judges it like any other form. The ranking,
    which costs groups x images forward passes, gets at most half the time left after the
    first validation (fewer images, never under `MIN_RANKING_IMAGES`), so a network with
    hundreds of groups cannot run the import far past `seconds`.

    Args:
        ov_model: the FP32 `openvino.Model`.
        quantized: its NNCF quantization with uncompressed weights (FakeQuantize on them).
        validation: an `nncf.Dataset` of (batch, reference) items `metric` takes.
        metric: as `quantize`'s (`_agreement`, `_fidelity`).

    Returns:
        The `openvino.Model` with that prefix reverted (`quantized` itself when it already
        meets the target).
    """
    from nncf.common.factory import build_graph
    from nncf.common.utils.backend import BackendType
    from nncf.quantization.algorithms.accuracy_control.algorithm import (
        QuantizationAccuracyRestorer,
        get_algo_backend,
    )
    from nncf.quantization.algorithms.accuracy_control.evaluator import Evaluator
    from nncf.quantization.algorithms.accuracy_control.ranker import Ranker

    end = None if seconds is None else clock() + seconds
    evaluator = Evaluator(metric)
    evaluator.enable_iteration_count()
    began = clock()
    initial = evaluator.collect_metric_results(ov_model, validation, model_name="initial")
    size = evaluator.num_passed_iterations
    per_image = (clock() - began) / max(1, size)  # seconds of one image through the model
    evaluator.disable_iteration_count()
    plain = evaluator.collect_metric_results(quantized, validation, model_name="quantized")
    if initial.metric_value - plain.metric_value <= max_drop:
        log.warning(
            "INT8 accuracy control reverted nothing: the quantized model's metric on the %d "
            "validation images (%.4f against FP32's %.4f) already meets the target: %d layers "
            "in FP32, all never quantized (the first convolution and the group (depthwise) "
            "convolutions)",
            size,
            plain.metric_value,
            initial.metric_value,
            len(fp32_layers(quantized)),
        )
        return quantized
    backend = get_algo_backend(BackendType.OPENVINO)
    graph = build_graph(quantized)
    QuantizationAccuracyRestorer._collect_original_biases_and_weights(
        build_graph(ov_model), graph, ov_model, backend
    )
    groups = Ranker(1, validation, backend, evaluator, 1).find_groups_of_quantizers_to_rank(graph)
    subset = min(ranking_images, size)
    if end is not None:  # ranking runs every group on the subset: half the time left at most
        affordable = (end - clock()) / 2 / max(1e-6, per_image * max(1, len(groups)))
        subset = max(min(subset, MIN_RANKING_IMAGES), min(subset, int(affordable)))
    ranker = Ranker(subset, validation, backend, evaluator, 1)
    log.info("ranking %d quantized groups on %d images", len(groups), subset)
    ranked = ranker.rank_groups_of_quantizers(
        groups,
        quantized,
        graph,
        initial.values_for_each_item,
        plain.values_for_each_item,
    )
    harmful = list(reversed(ranked))  # NNCF ranks the most harmful group last

    def meets(count: int) -> tuple[bool, object]:
        model = revert_prefix(quantized, graph, harmful[:count], backend)
        value, _ = evaluator.validate(model, validation)
        log.info("INT8 with %d of %d groups reverted: metric %.4f", count, len(harmful), value)
        return initial.metric_value - value <= max_drop, model

    count, model = fewest_reverted(len(harmful), meets, end=end, clock=clock)
    stopped = end is not None and clock() >= end
    if model is None:
        model = revert_prefix(quantized, graph, harmful[:count], backend)
    # In layers, as the card and the gate's refusal count them (`fp32_layers`).
    log.warning(
        "INT8 accuracy control reverted %d of %d quantized groups to FP32 (a group: the "
        "layers one quantizer feeds)%s: %d layers in FP32, %d of them never quantized (the "
        "first convolution, and any group (depthwise) convolutions)",
        count,
        len(harmful),
        f" (stopped at its {seconds:.0f} s bound)" if stopped else "",
        len(fp32_layers(model)),
        len(fp32_layers(quantized)),
    )
    return model


def fewest_reverted(
    total: int,
    meets: Callable[[int], tuple[bool, object]],
    *,
    end: float | None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[int, object | None]:
    """The fewest of `total` ranked groups to revert, by bisection: `meets(count)` builds the
    model with the first `count` reverted and says whether it meets the target. No groups is
    known to fail and all of them is taken to pass; the metric is taken to rise with the count
    (about log2(total) calls). Stops when `clock()` reaches `end` (None: never).

    Returns:
        (count, its model, or None where it was not built): the smallest count that met the
        target; when time ran out before one did, the largest count that failed (0, None when
        none was tried); when every count under `total` failed, (total, None).
    """
    failing, passing = 0, total
    found: object | None = None
    failed: tuple[int, object | None] = (0, None)
    while passing - failing > 1 and (end is None or clock() < end):
        middle = (failing + passing) // 2
        ok, model = meets(middle)
        if ok:
            passing, found = middle, model
        else:
            failing, failed = middle, (middle, model)  # failing only grows: the largest
    if found is not None:
        return passing, found
    if passing - failing <= 1:
        return total, None
    return failed


def revert_prefix(quantized: object, graph: Any, groups: Sequence[Any], backend: Any) -> object:
    """`quantized` with NNCF's ranked quantizer `groups` reverted to FP32 (their operations'
    activations and weights, original biases restored)."""
    from nncf.common.quantization.quantizer_removal import (
        revert_operations_to_floating_point_precision,
    )
    from nncf.quantization.advanced_parameters import RestoreMode

    model = quantized
    for group in groups:
        model = revert_operations_to_floating_point_precision(
            group.operations,
            group.quantizers,
            model,
            graph,
            RestoreMode.ACTIVATIONS_AND_WEIGHTS,
            backend.get_op_with_weights_metatypes(),
            backend.is_node_with_weight,
            backend.get_weight_tensor_port_ids,
        )
    return model


def first_convolution(ov_model: object) -> str | None:
    """The friendly name of the first `Convolution` in `ov_model`'s execution order (the one
    that takes the normalised pixels), or None when it has none."""
    for op in ov_model.get_ordered_ops():  # type: ignore[attr-defined]
        if op.get_type_name() == "Convolution":
            return str(op.get_friendly_name())
    return None


def fp32_layers(quantized: object) -> list[str]:
    """The convolutions and matrix products of a quantized `openvino.Model` whose weights
    stayed FP32 (kept by the ignored scope, or reverted by accuracy control), in execution
    order, each as `describe_layer` says it ("conv 1 7x7 3->64 stride 2"): the converter's
    own names (`Multiply_7024`, left by folding the batch norm into the convolution) tell a
    reader nothing. Quantized weights reach a layer through a `FakeQuantize` or, as NNCF
    stores them compressed, as an 8-bit constant converted and scaled."""
    kept, number = [], 0
    for op in quantized.get_ordered_ops():  # type: ignore[attr-defined]
        if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul"):
            number += 1
            if not _quantized_weights(op.input_value(1).get_node()):
                kept.append(describe_layer(op, number))
    return kept


def describe_layer(op: Any, number: int) -> str:
    """A weighted layer as a reader finds it in the network: its kind, its number among the
    convolutions and matrix products in execution order (from 1), kernel, channels in and out,
    and stride: `conv 1 7x7 3->64 stride 2`, `conv 9 3x3 depthwise x96 stride 2`,
    `conv 12 1x1 96->24`, `matmul 53 1280->1000`. `op` is an OpenVINO Convolution (weights
    [out, in, kh, kw]), GroupConvolution ([groups, out/groups, in/groups, kh, kw]) or MatMul
    ([out, in] with `transpose_b`, else [in, out])."""
    shape = [int(d.get_length()) for d in op.input(1).get_partial_shape()]
    attributes = op.get_attributes()
    if op.get_type_name() == "MatMul":
        outputs, inputs = shape[-2:] if attributes.get("transpose_b") else shape[-2:][::-1]
        return f"matmul {number} {inputs}->{outputs}"
    kernel = "x".join(str(side) for side in shape[-2:])
    strides = set(attributes.get("strides", [1]))
    stride = f" stride {max(strides)}" if max(strides) > 1 else ""
    if op.get_type_name() == "GroupConvolution":
        groups, per_out, per_in = shape[:3]
        if per_out == per_in == 1:
            return f"conv {number} {kernel} depthwise x{groups}{stride}"
        channels = f"{per_in * groups}->{per_out * groups} in {groups} groups"
    else:
        channels = f"{shape[1]}->{shape[0]}"
    return f"conv {number} {kernel} {channels}{stride}"


def _quantized_weights(node: Any, depth: int = 6) -> bool:
    """Whether `node` (a layer's weight input) is, or is computed from, a FakeQuantize or an
    8-bit (or 4-bit) constant, looking up to `depth` operations back."""
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind == "Constant":
        return str(node.get_element_type().get_type_name()) in ("i8", "u8", "i4", "u4")
    if depth == 0:
        return False
    return any(
        _quantized_weights(node.input_value(i).get_node(), depth - 1)
        for i in range(node.get_input_size())
    )


def _agreement(
    compiled: object, items: Iterable[tuple[np.ndarray, np.ndarray]]
) -> tuple[float, list[float]]:
    """Accuracy control's metric: top-1 agreement with the FP32 reference, and per item."""
    hits = [
        float(np.argmax(compiled([batch])[0]) == np.argmax(reference))  # type: ignore[operator]
        for batch, reference in items
    ]
    return (float(np.mean(hits)) if hits else 1.0), hits


def _fidelity(
    compiled: object, items: Iterable[tuple[np.ndarray, np.ndarray]]
) -> tuple[float, list[float]]:
    """Accuracy control's stricter metric: 1 - the largest probability difference from the FP32
    reference, per item and averaged. A top-1 flip needs a difference of at least half the
    reference's top-1 / top-2 margin, so bounding it protects unseen images' top-1 too."""
    values = [
        1.0 - float(np.abs(np.asarray(compiled([batch])[0])[0] - reference).max())  # type: ignore[operator]
        for batch, reference in items
    ]
    return (float(np.mean(values)) if values else 1.0), values


def probabilities(compiled: object, images: np.ndarray) -> np.ndarray:
    """A compiled IR's probabilities, float32 (N, classes), for uint8 `images` (N, H, W, 3)."""
    request = compiled.create_infer_request()  # type: ignore[attr-defined]
    # Copied: the request's output tensor is overwritten by its next batch.
    return in_batches(
        images, lambda batch: np.array(request.infer([batch])[0], dtype=np.float32, copy=True)
    )
