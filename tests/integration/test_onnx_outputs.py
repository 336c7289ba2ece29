"""ONNX graphs with several outputs, through `perito models import` as a user runs it.

Two graphs: one whose first output is an auxiliary head (`aux`, whose top-1 is never the class
scores' top-1) before the class scores (`scores`), and a converter's `[label, probabilities]`
(an int64 label first, as sklearn-onnx gives with `zipmap=False`). Imported without
`--output-name`, each is refused with its outputs listed; with it, `Classify` over a real socket
(the SDK) and a bulk job through a real `perito worker` answer from the named output, exactly
what ONNX Runtime gives for it on the same pixels, and the version's card records the name.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import perito
from perito_core.imaging import load_model_input
from perito_core.models.registry import ModelRegistry
from tests.helpers import ServerThread, Stores, WorkerProcess, run_perito
from tests.onnx_helpers import (
    auxiliary_first_model,
    keras_rescale,
    label_and_probabilities_model,
    ort_probabilities,
    waste_model,
)

pytest.importorskip("onnxruntime", reason="ONNX Runtime (perito[serve]) not installed")

pytestmark = pytest.mark.integration

SIZE = 64
LABELS = ["bolt", "nut", "washer"]


@dataclass
class Service:
    stores: Stores
    env: dict[str, str]
    files: dict[str, Path]
    photos: list[bytes]
    registry: ModelRegistry
    client: perito.Client

    def imports(self, file: str, name: str, *flags: str) -> list[str]:
        """The `perito models import` arguments for one of the files, as a Keras user types
        them (NHWC, pixels / 255, probabilities)."""
        return [
            *("models", "import", str(self.files[file]), "--name", name),
            *("--labels", str(self.stores.work / "labels.txt"), "--input-size", str(SIZE)),
            *("--layout", "NHWC", "--scale", "1/255", *flags),
        ]

    def onnx_runtime(self, file: str, output: str) -> np.ndarray:
        """ONNX Runtime's `output` for every photo, fed by hand as in training."""
        spec = self.registry.manifest(file, "1").input.spec()
        pixels = np.stack([load_model_input(photo, spec) for photo in self.photos])
        return ort_probabilities(self.files[file], keras_rescale(pixels), output)


def _served(predictions: list[list[perito.Prediction]]) -> np.ndarray:
    served = np.full((len(predictions), len(LABELS)), np.nan)
    for row, answer in enumerate(predictions):
        for prediction in answer:
            served[row, prediction.class_index] = prediction.probability
    return served


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, photos: dict[str, Path]
) -> Iterator[Service]:
    stores = Stores(tmp_path_factory.mktemp("onnx-outputs"), redis_url)
    work = stores.work
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
    files = {
        "heads": auxiliary_first_model(work / "heads.onnx", SIZE),
        "label": label_and_probabilities_model(work / "label.onnx", SIZE),
    }
    photo_bytes = [path.read_bytes() for path in photos.values()]
    with (
        ServerThread(stores.server_settings()) as server,
        perito.Client(server.target, timeout=60) as client,
    ):
        yield Service(
            stores,
            stores.worker_env(),
            files,
            photo_bytes,
            stores.open_registry(),
            client,
        )


def test_several_outputs_without_output_name_are_refused_listing_them(service: Service) -> None:
    heads = run_perito(*service.imports("heads", "heads"), env=service.env, check=False)
    assert heads.returncode == 1
    assert (
        "heads.onnx has 2 outputs: 'aux' float32 [batch, 3], 'scores' float32 [batch, 3]; "
        "name the one that gives the class scores with --output-name"
    ) in heads.stderr
    label = run_perito(*service.imports("label", "label"), env=service.env, check=False)
    assert label.returncode == 1
    assert "'label' int64 [batch], 'probabilities' float32 [batch, 3]" in label.stderr
    wrong = run_perito(
        *service.imports("heads", "heads", "--output-name", "probabilities"),
        env=service.env,
        check=False,
    )
    assert wrong.returncode == 1
    assert (
        "output name 'probabilities' is not an output of the graph; its outputs: "
        "'aux' float32 [batch, 3], 'scores' float32 [batch, 3]"
    ) in wrong.stderr
    assert service.registry.list_versions("heads") == []
    assert service.registry.list_versions("label") == []


@pytest.fixture(scope="module")
def imported(service: Service) -> Service:
    """Both graphs imported with the output to serve named."""
    run_perito(*service.imports("heads", "heads", "--output-name", "scores"), env=service.env)
    run_perito(
        *service.imports("label", "label", "--output-name", "probabilities"), env=service.env
    )
    return service


@pytest.mark.parametrize(("file", "output"), [("heads", "scores"), ("label", "probabilities")])
def test_classify_answers_from_the_named_output(imported: Service, file: str, output: str) -> None:
    expected = imported.onnx_runtime(file, output)
    assert float(expected.std(axis=0).max()) > 1e-3  # the photos tell apart
    results = imported.client.classify(imported.photos, model=file, top_k=len(LABELS))
    np.testing.assert_allclose(_served([r.predictions for r in results]), expected, atol=1e-5)
    assert [r.predictions[0].label for r in results] == [LABELS[i] for i in expected.argmax(1)]
    if file == "heads":  # the auxiliary head, served, would give another top-1 for every photo
        aux = imported.onnx_runtime(file, "aux")
        assert (aux.argmax(1) != expected.argmax(1)).all()


def test_the_card_records_the_served_output(imported: Service) -> None:
    cards = {name: imported.client.get_model(name).versions[-1].card for name in ("heads", "label")}
    assert cards["heads"]["tensor"]["output_name"] == "scores"
    assert cards["label"]["tensor"]["output_name"] == "probabilities"
    shown = run_perito(
        "models", "show", "heads", "--server", imported.client.target, env=imported.env
    ).stdout
    assert "; output: probabilities (graph output scores)" in shown, shown
    # A one-output graph needs no flag; its output's name is recorded all the same.
    waste = waste_model(imported.stores.work / "waste.onnx", SIZE)
    (imported.stores.work / "waste.txt").write_text("organic\nrecyclable\n")
    run_perito(
        *("models", "import", str(waste), "--name", "waste", "--input-size", str(SIZE)),
        *("--labels", str(imported.stores.work / "waste.txt")),
        *("--layout", "NHWC", "--scale", "1/255", "--output", "sigmoid"),
        env=imported.env,
    )
    tensor = imported.registry.manifest("waste", "1").tensor
    assert tensor is not None and tensor.output_name == "output"


def test_a_bulk_job_through_a_worker_answers_from_the_named_output(imported: Service) -> None:
    expected = imported.onnx_runtime("heads", "scores")
    with WorkerProcess(imported.env, imported.stores.work / "worker.log").wait_ready():
        job = imported.client.submit_job(imported.photos, model="heads", top_k=len(LABELS))
        done = job.wait(timeout=120)
    assert done.state is perito.JobState.SUCCEEDED, done
    items = sorted(imported.client.job(done.id).results(), key=lambda item: item.index)
    answers = [item.classification.predictions for item in items if item.classification]
    assert len(answers) == len(imported.photos)
    np.testing.assert_allclose(_served(answers), expected, atol=1e-5)


def test_no_compiled_form_is_built_from_an_onnx_import(imported: Service) -> None:
    """Compiled forms (OpenVINO, INT8) are built from TorchScript files only: an ONNX version
    serves its own graph, so no form could read another output than the named one."""
    refused = run_perito(
        *imported.imports("heads", "heads", "--output-name", "scores"),
        *("--forms", "fp32,int8", "--calibration", str(imported.stores.work)),
        env=imported.env,
        check=False,
    )
    assert refused.returncode == 2
    assert "compiled forms are built from a TorchScript file" in refused.stderr
    assert imported.registry.list_versions("heads") == ["1"]
