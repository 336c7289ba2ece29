"""ONNX Runtime: imported ONNX models, and compiled ONNX forms (FP32, INT8) of TorchScript
versions, run on the CPU behind the same `LoadedModel` interface.

Imported models. Teams that train in Keras or TensorFlow reach Perito through ONNX
(`tf2onnx`, `keras2onnx`, `torch.onnx.export`). Such a graph rarely normalises inside and
rarely takes uint8: it takes what its training pipeline fed it, so the version's manifest
carries that contract (`perito_core.models.manifest.TensorContract`): layout (NCHW / NHWC),
dtype, scale, mean and std, channel order, and what the output is (probabilities, logits, or
one sigmoid unit). The image itself is prepared by the one shared function
(`perito_core.imaging.load_model_input`: decode, orientation, colour, resize), exactly as for
TorchScript; only the step from those uint8 RGB pixels to the graph's input tensor is driven by
the contract (`tensor_from_images`), and the graph's output is turned into class probabilities
by `probabilities_from_output`. Of a graph's outputs, only the one the contract names
(`TensorContract.output_name`, `served_output`) is asked for and read.
`perito_core.models.selection.load_model` opens `OnnxModel` when the manifest's artifact is
ONNX, after the registry has verified `model.onnx`'s sha256.

Compiled forms. `model.pt`'s fixed-size forward pass is exported to ONNX (TorchScript-based
exporter, opset 17; uint8 N x 3 x H x W in, probabilities out, a dynamic batch) as FP32, and
quantized to INT8 by ONNX Runtime's static quantization (QDQ, per-channel weights,
`quantize_int8`). BF16 is OpenVINO's only. ONNX Runtime is optional (`perito[serve]`) and
imported only when a graph is opened or built.

Devices. A graph runs on the CPU unless opened for a CUDA device (`OnnxModel.open(device=)`):
then ONNX Runtime is asked for TensorRT, then CUDA, then the CPU, those its build offers
(`execution_providers`), and the model says which provider it got (`OnnxModel.provider`,
logged at load); on an install without them (the CPU wheel) the CPU serves. TensorRT runs
FP16 kernels only when asked (`fp16`), and the form then names its precision `fp16`: like
`torchscript-fp16`, such a form is for a caller that checks it against FP32 first
(`perito_core.models.reduced_precision.serve_verified`).
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from perito_core.errors import ModelLoadError
from perito_core.models.calibration import rescale, softmax
from perito_core.models.engines.base import (
    BuildContext,
    Candidate,
    LoadedModel,
    in_batches,
    nchw,
)
from perito_core.models.fixed_size import fixed_size
from perito_core.models.manifest import CompiledForm, InputContract, ModelManifest, TensorContract
from perito_core.models.summary import output_faults

log = logging.getLogger(__name__)

ONNX_ENGINE = "onnxruntime"

# What a compiled ONNX Runtime form takes and gives (`export_form`): the serving pipeline's
# uint8 pixels, NCHW, and probabilities (normalisation and softmax inside).
COMPILED_FORM_TENSOR = TensorContract(layout="NCHW", dtype="uint8", scale=1.0)

_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "uint8": "tensor(uint8)"}
# Output types that can be class scores (ONNX Runtime's names).
_SCORE_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)")


@functools.cache
def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime's version, or None when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def onnx_form_name(contract: TensorContract) -> str:
    """What `Classify` results and job items name as the form: `onnxruntime-fp32` (or fp16)."""
    return f"{ONNX_ENGINE}-{contract.precision}"


def tensor_from_images(images: np.ndarray, contract: TensorContract) -> np.ndarray:
    """The graph's input tensor for a batch of prepared images.

    Args:
        images: uint8 RGB array (N, H, W, 3) from `perito_core.imaging.load_model_input`.
        contract: the manifest's tensor contract.

    Returns:
        A C-contiguous array in `contract.layout` ((N, 3, H, W) or (N, H, W, 3)) of
        `contract.dtype`: `(pixel * scale - mean[c]) / std[c]`, computed in float32, with the
        channels in `contract.channel_order` (mean and std are given in that order). uint8
        passes the pixels through unchanged (only the channel order and layout apply).

    Raises:
        ValueError: `images` is not a uint8 (N, H, W, 3) array.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    x: np.ndarray = images[..., ::-1] if contract.channel_order == "BGR" else images
    if contract.dtype != "uint8":
        x = x.astype(np.float32) * np.float32(contract.scale)
        if contract.mean != (0.0, 0.0, 0.0):
            x -= np.asarray(contract.mean, dtype=np.float32)
        if contract.std != (1.0, 1.0, 1.0):
            x /= np.asarray(contract.std, dtype=np.float32)
    if contract.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.dtype(contract.dtype))


def probabilities_from_output(output: np.ndarray, contract: TensorContract) -> np.ndarray:
    """Class probabilities from the graph's served output (`served_output`).

    Args:
        output: (N, classes) for `probabilities` and `logits`; (N, 1) or (N,) for `sigmoid`.
        contract: the manifest's tensor contract (`output` says which of the three it is).

    Returns:
        float32 (N, classes): as they are for `probabilities`, softmaxed `logits`, and
        `[1 - p, p]` per image for a `sigmoid` unit p (the second label's probability).
    """
    values = np.asarray(output, dtype=np.float32)
    if contract.output == "sigmoid":
        p = values.reshape(len(values), -1)[:, :1]
        return np.concatenate([1.0 - p, p], axis=1)
    if contract.output == "logits":
        return softmax(values).astype(np.float32, copy=False)
    return values


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime's session options as Perito runs every graph: `threads` intra-op threads
    (default: torch's thread count, the TorchScript runtime's budget), one inter-op thread,
    every graph optimisation, and no spin-waiting between runs (the decode threads share these
    cores: Lite0 at batch 4 beside two threads decoding 640x480 JPEGs, this 2-core EPYC, 3
    interleaved rounds under load: 21.5 images/s without spinning, 15.3 with)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def execution_providers(
    device: torch.device | str = "cpu",
    *,
    fp16: bool = False,
    available: Sequence[str] | None = None,
) -> list[str | tuple[str, dict[str, Any]]]:
    """The execution providers to ask ONNX Runtime for, in its order of preference.

    Args:
        device: where the graph should run; a CUDA device asks for TensorRT, then CUDA (each
            on that device's index), then the CPU for what they leave; anything else, the CPU.
        fp16: let TensorRT pick FP16 kernels (`trt_fp16_enable`); its engine is built when
            the session is made (minutes for a large graph), held in memory only.
        available: the providers this ONNX Runtime offers; default
            `onnxruntime.get_available_providers()`.

    Returns:
        Names and (name, options) pairs for `InferenceSession(providers=...)`, the CPU last.
    """
    target = torch.device(device)
    if target.type != "cuda":
        return [CPU]
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    index = target.index or 0
    wanted: list[str | tuple[str, dict[str, Any]]] = []
    if TENSORRT in available:
        wanted.append((TENSORRT, {"device_id": index, "trt_fp16_enable": fp16}))
    if CUDA in available:
        wanted.append((CUDA, {"device_id": index}))
    return [*wanted, CPU]


# Operators of a quantized (INT8) graph: QDQ and QOperator forms (the ONNX operator set,
# https://onnx.ai/onnx/operators/; ONNX Runtime's quantization writes these).
_QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}
)


def graph_is_fp32(path: Path) -> bool:
    """Whether the ONNX graph at `path` computes in FP32: no quantization operator
    (`_QUANTIZED_OPS`, `QLinear*`: an INT8 graph) and no FLOAT16 or BFLOAT16 weight (an FP16
    graph). False when it cannot be told: the `onnx` package, which reads the graph, is not
    installed, or the file is not a graph it reads (`OnnxModel.open` refuses it then)."""
    try:
        import onnx
    except ImportError:
        log.info("the onnx package is not installed: %s is not taken for an FP32 graph", path)
        return False
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a graph: the session refuses it, naming why
        return False
    if any(
        n.op_type in _QUANTIZED_OPS or n.op_type.startswith("QLinear") for n in model.graph.node
    ):
        return False
    halves = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    return not any(tensor.data_type in halves for tensor in model.graph.initializer)


def inference_session(
    path: Path,
    threads: int | None = None,
    device: torch.device | str = "cpu",
    *,
    fp16: bool = False,
) -> Any:
    """An ONNX Runtime session for the graph at `path`, with `session_options`, on the
    providers `execution_providers(device, fp16=fp16)` lists (the CPU's alone by default).
    `session.get_providers()` says which it got, the one that runs the graph first."""
    import onnxruntime

    return onnxruntime.InferenceSession(
        str(path),
        sess_options=session_options(threads),
        providers=execution_providers(device, fp16=fp16),
    )


def _dims(shape: Sequence[Any] | None) -> str:
    if shape is None:  # not a tensor (a sequence or a map)
        return "[]"
    return "[" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in shape) + "]"


def _type(onnx_type: str) -> str:
    """`tensor(float)` as numpy names it, `float32`; a type that is not a tensor as it is."""
    if not onnx_type.startswith("tensor(") or not onnx_type.endswith(")"):
        return onnx_type
    element = onnx_type[len("tensor(") : -1]
    return {"float": "float32", "double": "float64"}.get(element, element)


def describe_outputs(session: Any) -> str:
    """A graph's outputs as a person reads them: `'label' int64 [batch], 'probabilities'
    float32 [batch, 3]` (name, dtype, shape; a dynamic dimension by its name or `?`)."""
    return ", ".join(
        f"{o.name!r} {_type(str(o.type))} {_dims(o.shape)}" for o in session.get_outputs()
    )


def _describe(manifest: ModelManifest) -> str:
    """`waste@3: model.onnx`; for a draft being imported (version 0), the file the user gave
    (`source.imported_from`), else the artifact's name."""
    if manifest.version == "0":
        return manifest.source.imported_from or manifest.artifact.file
    return f"{manifest.name}@{manifest.version}: {manifest.artifact.file}"


def served_output(session: Any, manifest: ModelManifest, *, require_name: bool = False) -> Any:
    """The graph output that serves the class scores: the one `tensor.output_name` names, else
    the graph's only output.

    Args:
        session: an `onnxruntime.InferenceSession` on the file.
        manifest: the (draft or stored) manifest with its `tensor` contract.
        require_name: refuse a graph of several outputs when the contract names none (an
            import). Otherwise such a graph (a version stored before the name was recorded)
            serves its first output, as it was imported and checked, with a warning.

    Returns:
        The output's `onnxruntime.NodeArg` (`name`, `type`, `shape`).

    Raises:
        ModelLoadError: the named output is not one of the graph's, or (with `require_name`)
            the graph has several and none is named; the message lists the graph's outputs
            with their dtypes and shapes.
    """
    contract = manifest.tensor
    assert contract is not None
    what = _describe(manifest)
    outputs = session.get_outputs()
    if contract.output_name is not None:
        named = next((o for o in outputs if o.name == contract.output_name), None)
        if named is None:
            raise ModelLoadError(
                f"{what}: output name {contract.output_name!r} is not an output of the graph; "
                f"its outputs: {describe_outputs(session)}"
            )
        return named
    if len(outputs) > 1:
        if require_name:
            raise ModelLoadError(
                f"{what} has {len(outputs)} outputs: {describe_outputs(session)}; name the one "
                "that gives the class scores with --output-name"
            )
        log.warning(
            "%s has %d outputs (%s) and its manifest names none (imported before the name was "
            "recorded): serving the first, %r, as it was imported; import it again with "
            "--output-name to choose",
            what,
            len(outputs),
            describe_outputs(session),
            outputs[0].name,
        )
    return outputs[0]


class GraphCheck(NamedTuple):
    """What `check_graph` found: the output that serves, and the graph's fixed batch size
    (None when the batch dimension is dynamic)."""

    output_name: str
    fixed_batch: int | None


def check_graph(session: Any, manifest: ModelManifest, *, require_name: bool = False) -> GraphCheck:
    """Check the graph's input and served output against the manifest before anything runs.

    Args:
        session: an `onnxruntime.InferenceSession` on the file.
        manifest: the (draft or stored) manifest with its `tensor` contract.
        require_name: as `served_output`: a graph of several outputs needs
            `tensor.output_name` (at import).

    Returns:
        The served output's name and the graph's fixed batch size.

    Raises:
        ModelLoadError: the graph's input shape or type contradicts the declared layout,
            input size or dtype; the served output is not found (`served_output`), not a float
            tensor, or cannot be the declared output kind for the manifest's labels; the
            message names the field at fault.
    """
    contract = manifest.tensor
    assert contract is not None
    what = _describe(manifest)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs)
        raise ModelLoadError(f"{what} takes {len(inputs)} inputs ({names}); an image model takes 1")
    graph_input = inputs[0]
    shape = list(graph_input.shape)
    height, width = manifest.input.height, manifest.input.width
    nchw, nhwc = ["N", 3, height, width], ["N", height, width, 3]
    wanted = nchw if contract.layout == "NCHW" else nhwc
    if len(shape) != 4:
        raise ModelLoadError(
            f"{what}: input {graph_input.name!r} has shape {_dims(shape)}; layout "
            f"{contract.layout} needs a 4-D batch {_dims(wanted)}"
        )

    def fits(expected: list[Any]) -> bool:
        return all(
            not isinstance(got, int) or got == want
            for got, want in zip(shape[1:], expected[1:], strict=True)
        )

    if not fits(wanted):
        other, other_shape = ("NHWC", nhwc) if contract.layout == "NCHW" else ("NCHW", nchw)
        if fits(other_shape):
            raise ModelLoadError(
                f"{what}: layout {contract.layout} contradicts input {graph_input.name!r} of "
                f"shape {_dims(shape)}, which is {other}: declare layout {other}"
            )
        raise ModelLoadError(
            f"{what}: input {graph_input.name!r} of shape {_dims(shape)} does not take "
            f"{_dims(wanted)}: check the input size ({height}x{width}) and layout "
            f"({contract.layout})"
        )
    expected_type = _ONNX_TYPES[contract.dtype]
    if graph_input.type != expected_type:
        raise ModelLoadError(
            f"{what}: dtype {contract.dtype} contradicts input {graph_input.name!r}, which "
            f"is {graph_input.type}"
        )
    output = served_output(session, manifest, require_name=require_name)
    if output.type not in _SCORE_TYPES:
        others = (
            f"; its outputs: {describe_outputs(session)}" if len(session.get_outputs()) > 1 else ""
        )
        raise ModelLoadError(
            f"{what}: output {output.name!r} is {_type(str(output.type))} {_dims(output.shape)}, "
            f"not class scores (a float tensor){others}"
        )
    out_shape = list(output.shape)
    classes = len(manifest.labels)
    units = 1 if contract.output == "sigmoid" else classes
    one_unit = contract.output == "sigmoid" and len(out_shape) == 1  # (N,): one unit too
    last = 1 if one_unit else (out_shape[-1] if out_shape else None)
    if (len(out_shape) != 2 and not one_unit) or (isinstance(last, int) and last != units):
        need = "(N, 1) for one sigmoid unit" if units == 1 else f"(N, {classes}) for the labels"
        raise ModelLoadError(
            f"{what}: output {contract.output} with {classes} labels needs {need}, but output "
            f"{output.name!r} has shape {_dims(out_shape)}"
        )
    batch = shape[0]
    return GraphCheck(output.name, batch if isinstance(batch, int) and batch > 0 else None)


class OnnxModel(LoadedModel):
    """An imported ONNX model run by ONNX Runtime (on the CPU unless opened for a CUDA
    device), with the manifest's contract.

    Like every `LoadedModel`: `predict` takes uint8 (N, H, W, 3) images from the shared
    preprocessing and returns float32 (N, labels) probabilities; one batch at a time.
    """

    def __init__(
        self,
        session: Any,
        manifest: ModelManifest,
        graph: GraphCheck,
        device: torch.device | str = "cpu",
    ) -> None:
        assert manifest.tensor is not None
        # The execution providers the session got, the one that runs the graph first
        # (`execution_providers`): `CPUExecutionProvider` on the CPU.
        providers: list[str] = list(session.get_providers())
        runs_on = torch.device(device) if providers[0] != CPU else torch.device("cpu")
        super().__init__(manifest, runs_on, onnx_form_name(manifest.tensor))
        self.providers = providers
        self.provider = providers[0]
        self.contract = manifest.tensor
        self._session = session
        self._input_name: str = session.get_inputs()[0].name
        # The one output asked for and read (`served_output`).
        self.output_name = graph.output_name
        self._fixed_batch = graph.fixed_batch
        # A compiled form's re-fitted calibration (`open_form`): softmax(log(p) / temperature).
        self.temperature = 1.0

    @classmethod
    def open(
        cls,
        path: Path,
        manifest: ModelManifest,
        *,
        warmup_batch_sizes: tuple[int, ...] = (1,),
        threads: int | None = None,
        require_output_name: bool = False,
        device: torch.device | str = "cpu",
        fp16: bool = False,
    ) -> OnnxModel:
        """Open, check and warm an ONNX file that has already been sha256-verified.

        Args:
            path: the local, verified `model.onnx`.
            manifest: its manifest (`artifact.format == "onnx"`, with `tensor`).
            warmup_batch_sizes: batch sizes run twice each before the model serves.
            threads: ONNX Runtime's intra-op threads (default: torch's thread count, the
                same budget the TorchScript runtime uses).
            require_output_name: refuse a graph of several outputs whose contract names none
                (`served_output`'s `require_name`; an import).
            device: where to run it: a CUDA device asks for TensorRT, CUDA, then the CPU
                (`execution_providers`); the provider it got is `provider`, logged.
            fp16: let TensorRT run FP16 kernels, for an FP32 graph only (`graph_is_fp32`: an
                INT8 or FP16 graph is opened as it is); where TensorRT is the provider it got,
                its form is then named `onnxruntime-fp16` (verify it against FP32 before it
                serves).

        Raises:
            ModelLoadError: ONNX Runtime is not installed, the file is not a loadable ONNX
                graph, or its input / output contradicts the manifest (naming the field).
        """
        start = time.perf_counter()
        if manifest.tensor is None:
            raise ModelLoadError(f"{manifest.name}@{manifest.version}: no tensor contract")
        if onnxruntime_version() is None:
            raise ModelLoadError("ONNX Runtime is not installed (pip install 'perito[serve]')")
        fp16 = fp16 and torch.device(device).type == "cuda" and graph_is_fp32(path)
        try:
            session = inference_session(path, threads, device, fp16=fp16)
        except Exception as exc:  # noqa: BLE001 - any failure here is a bad artifact
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
            if "external data" in first.lower():
                raise ModelLoadError(
                    f"{_describe(manifest)} keeps its weights in a separate file (ONNX external "
                    "data), which a version does not carry: save the graph as one file "
                    "(onnx.save_model(model, path, save_as_external_data=False), up to 2 GB)"
                ) from None
            raise ModelLoadError(
                f"{_describe(manifest)}: not a loadable ONNX file: {first}"
            ) from None
        graph = check_graph(session, manifest, require_name=require_output_name)
        model = cls(session, manifest, graph, device)
        if fp16 and model.provider == TENSORRT:
            model.form = f"{ONNX_ENGINE}-fp16"
        if torch.device(device).type != "cpu":
            log.info(
                "%s: ONNX Runtime runs it with %s on %s (asked for %s)",
                _describe(manifest),
                model.provider,
                model.device,
                ", ".join(
                    str(p if isinstance(p, str) else p[0])
                    for p in execution_providers(device, fp16=fp16)
                ),
            )
        probe = model._probe_batch()
        try:
            output = model._forward(probe)
        except Exception as exc:  # noqa: BLE001 - a graph that fails on a valid batch
            raise ModelLoadError(
                f"{_describe(manifest)}: ONNX Runtime fails on a batch of 3: {exc}"
            ) from None
        model._check_contract(probe, output)
        model.warm(warmup_batch_sizes)
        model.load_seconds = time.perf_counter() - start
        return model

    @classmethod
    def open_form(cls, path: Path, manifest: ModelManifest, form: CompiledForm) -> OnnxModel:
        """A compiled ONNX Runtime form of a TorchScript version (`OnnxRuntimeEngine.build`): the
        graph takes the uint8 N x 3 x H x W images and returns probabilities, like an OpenVINO
        IR; it serves the form's re-fitted temperature and `uncertain` threshold, and names
        itself by the form (`onnxruntime-int8`).

        Raises:
            ModelLoadError: as `open`.
        """
        served = manifest.served_by(form).model_copy(update={"tensor": COMPILED_FORM_TENSOR})
        model = cls.open(path, served)
        model.form = form.name
        model.temperature = form.temperature
        return model

    def _check_output(self, output: torch.Tensor, batch_size: int) -> None:
        if self.contract.output == "sigmoid" and not bool(
            ((output >= 0) & (output <= 1)).all().item()
        ):
            raise ModelLoadError(
                f"{_describe(self.manifest)}: output sigmoid, but the unit "
                "gives values outside [0, 1] (logits? the sigmoid must be inside the graph)"
            )
        super()._check_output(output, batch_size)

    def _check_contract(self, probe: torch.Tensor, output: torch.Tensor) -> None:
        """The base checks, and for `output logits` that the graph's output is not already
        probabilities: softmaxing those again would flatten every answer (0.44 -> 0.37)."""
        super()._check_contract(probe, output)
        if self.contract.output != "logits":
            return
        images = np.ascontiguousarray(probe.numpy().transpose(0, 2, 3, 1))
        raw = np.asarray(self.run_graph(tensor_from_images(images, self.contract)))
        if len(raw) and not output_faults(list(raw.astype(np.float32))):
            raise ModelLoadError(
                f"{_describe(self.manifest)}: output logits, but on every probe image the "
                "graph's output is already probabilities (each in [0, 1], summing to 1); "
                "softmaxing them again would flatten every answer: import it with --output "
                "probabilities"
            )

    def run_graph(self, tensor: np.ndarray) -> np.ndarray:
        """The served output (`output_name`), the only one asked of ONNX Runtime, for an input
        tensor already laid out by the contract.

        A graph with a fixed batch size runs in slices of that size (the last one padded).
        """
        fixed = self._fixed_batch
        if fixed is None or len(tensor) == fixed:
            return np.asarray(self._session.run([self.output_name], {self._input_name: tensor})[0])
        outputs = []
        for start in range(0, len(tensor), fixed):
            part = tensor[start : start + fixed]
            real = len(part)
            if real < fixed:
                pad = np.zeros((fixed - real, *part.shape[1:]), dtype=part.dtype)
                part = np.concatenate([part, pad])
            result = self._session.run([self.output_name], {self._input_name: part})[0]
            outputs.append(np.asarray(result)[:real])
        return np.concatenate(outputs)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch of prepared images.

        Args:
            images: uint8 RGB array (N, H, W, 3) at the manifest's input size.

        Returns:
            float32 array (N, number of labels).
        """
        tensor = tensor_from_images(np.asarray(images), self.contract)
        probabilities = probabilities_from_output(self.run_graph(tensor), self.contract)
        return rescale(probabilities, self.temperature)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(batch.numpy().transpose(0, 2, 3, 1))
        return torch.from_numpy(self.predict(images))


class OnnxRuntimeEngine:
    """The `Engine` for ONNX Runtime forms (`model.onnx`)."""

    name = ONNX_ENGINE
    title = "ONNX Runtime"
    suffix = ".onnx"

    def version(self) -> str | None:
        """The installed ONNX Runtime's version, or None when it is not installed."""
        return onnxruntime_version()

    def load(self, path: Path, manifest: ModelManifest, form: CompiledForm) -> LoadedModel:
        """`OnnxModel.open_form`.

        Raises:
            ModelLoadError: as `OnnxModel.open`.
        """
        return OnnxModel.open_form(path, manifest, form)

    def build(self, build: BuildContext) -> None:
        """ONNX Runtime's forms of the module into `candidates` (or the reason into
        `built.skipped`): the module exported to ONNX (TorchScript-based exporter, opset 17; uint8
        N x 3 x H x W in, probabilities out, a dynamic batch) as FP32, and INT8 by ONNX Runtime's
        static quantization (QDQ, per-channel weights, `quantize_int8`). BF16 is OpenVINO's
        only.
        """
        wanted = [p for p in build.precisions if p in ("fp32", "int8")]
        if "bf16" in build.precisions:
            build.built.skipped["onnxruntime-bf16"] = (
                "ONNX Runtime forms are FP32 or INT8 (BF16: OpenVINO)"
            )
        if not wanted:
            return
        version = onnxruntime_version()
        if version is None:
            build.built.skipped.update(
                {f"{ONNX_ENGINE}-{p}": "ONNX Runtime is not installed" for p in wanted}
            )
            return
        fp32_dir = build.folder(f"{ONNX_ENGINE}-fp32")
        try:
            export_form(build.module, build.contract, fp32_dir / "model.onnx")
        except Exception as exc:  # noqa: BLE001 - a module the exporter cannot take is skipped
            reason = f"cannot export this module to ONNX: {str(exc).strip().splitlines()[0][:300]}"
            build.built.skipped.update({f"{ONNX_ENGINE}-{p}": reason for p in wanted})
            return

        def candidate(precision: str, folder: Path, **more: Any) -> Candidate:
            # The serving runtime's session (`OnnxModel.open`'s), opened on first use.
            open_session = functools.partial(inference_session, folder / "model.onnx")
            return Candidate(
                ONNX_ENGINE,
                version,
                precision,
                folder,
                open_session,
                probabilities,
                **more,
            )

        if "fp32" in wanted:
            build.candidates.append(candidate("fp32", fp32_dir))
        if "int8" in wanted:
            int8_dir = build.folder(f"{ONNX_ENGINE}-int8")
            try:
                mode = quantize_int8(fp32_dir / "model.onnx", int8_dir / "model.onnx", build.images)
            except Exception as exc:  # noqa: BLE001 - a failed quantization skips the form only
                build.built.skipped[f"{ONNX_ENGINE}-int8"] = f"quantization failed: {exc}"
            else:
                build.candidates.append(
                    candidate("int8", int8_dir, calibrated=len(build.images), quantization=mode)
                )


ENGINE = OnnxRuntimeEngine()


def export_onnx(
    network: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    input_name: str = "input",
    output_name: str | Sequence[str] = "output",
    dynamic_batch: bool = True,
) -> Path:
    """`network` (a module or a scripted one) as an ONNX graph at `path`: one input and one
    output, named (or one name per output of a network that returns a tuple), the batch
    dimension dynamic unless `dynamic_batch` is False, opset 17. By the TorchScript-based
    exporter (`dynamo=False`: no onnxscript needed, and it takes scripted modules, which the
    dynamo exporter does not)."""
    output_names = [output_name] if isinstance(output_name, str) else list(output_name)
    batch = {name: {0: "batch"} for name in (input_name, *output_names)}
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network,
            (example,),
            str(path),
            dynamo=False,
            input_names=[input_name],
            output_names=output_names,
            dynamic_axes=batch if dynamic_batch else None,
            opset_version=17,
        )
    return path


def export_form(module: torch.jit.ScriptModule, contract: InputContract, path: Path) -> None:
    """The module's fixed-size forward pass (`fixed_size`) as ONNX: uint8 `images`
    (N, 3, H, W) in, `probabilities` out, the batch dynamic. Scripted first: the artifact's
    network is already TorchScript, which tracing cannot step into."""
    example = torch.zeros((1, 3, contract.height, contract.width), dtype=torch.uint8)
    export_onnx(
        torch.jit.script(fixed_size(module)),
        example,
        path,
        input_name="images",
        output_name="probabilities",
    )


def quantize_int8(source: Path, target: Path, images: np.ndarray) -> str:
    """ONNX Runtime's static INT8 of `source` into `target`, calibrated on uint8 `images`
    (N, H, W, 3); returns how, for the record (`CompiledForm.quantization`).

    QDQ format, weights per channel (`onnxruntime.quantization.quantize_static`, after its
    `quant_pre_process`), asymmetric uint8 activations; weights get 7 bits (`reduce_range`)
    whatever CPU builds the form: on a CPU without VNNI (AVX2 only) MLAS multiplies u8 x s8
    with VPMADDUBSW, whose 16-bit pair sums saturate with 8-bit weights (ONNX Runtime's
    quantization docs), and a form built once serves on either kind of CPU. It used to follow
    the building CPU, so a form built on a VNNI machine saturated on AVX2 ones. Measured on a
    ResNet-18 trained by the `resnet18-finetune` recipe (64 px), 240 held-out images:
    agreement with model.pt 96.3% with 7-bit weights, 95.0% 8-bit, 94.2% u8 x u8, 95.0%
    symmetric int8 activations (and 1.3x FP32 where 7-bit gives 3.6x), 91.7% per-tensor.
    On EfficientNet-Lite0, 36 crops of the sample photos, 72 calibration images, this AVX2
    EPYC: 83% (MinMax or entropy calibration), 81% percentile or QOperator, 78% with 8-bit
    or uint8 weights, 56% with the depthwise convolutions left FP32 (which helps NNCF: 97%);
    the gate refuses it there, and `auto` serves another form.

    Raises:
        ValueError: no calibration images; onnxruntime.quantization's errors.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(images) == 0:
        raise ValueError("no calibration images")
    batches = iter([{"images": nchw(images[i : i + 1])} for i in range(len(images))])

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    prepared = target.with_name("prepared.onnx")
    quant_pre_process(str(source), str(prepared))
    # The softmax stays FP32: quantized, its outputs no longer sum to 1 (the serving contract).
    softmax = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Softmax"]
    try:
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=softmax,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return "post-training (QDQ, per-channel, 7-bit weights)"


def probabilities(session: Any, images: np.ndarray) -> np.ndarray:
    """A compiled form's probabilities, float32 (N, classes), for uint8 `images` (N, H, W, 3)."""
    return in_batches(
        images,
        lambda batch: np.asarray(session.run(None, {"images": batch})[0], dtype=np.float32),
    )
