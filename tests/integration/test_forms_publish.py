"""`perito publish --forms`: a trained run's compiled forms, calibrated on its validation split
and gated on its test split, with the evidence in the manifest. Where the gate passes INT8 it
is built, recorded and served; where it refuses INT8, the card and the CLI say why."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from perito_core.models.manifest import RunCard
from perito_core.models.registry import ModelRegistry
from perito_core.models.selection import load_model
from perito_training.pipeline import publish_run, train_run
from tests.helpers import write_pattern_images
from tests.integration.test_training import quick_config
from tests.unit.test_compiled_forms import cpu_runs_bf16

pytest.importorskip("openvino", reason="OpenVINO (optional engine, perito[serve]) not installed")
pytest.importorskip("nncf", reason="NNCF (INT8 quantization) not installed")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunCard]:
    """One run of the quick recipe on pattern images (36 validation, 36 test images)."""
    work = tmp_path_factory.mktemp("forms-publish")
    patterns = write_pattern_images(work / "patterns", per_class=60, size=40)
    card = train_run(quick_config(patterns), work / "run", log=lambda _: None, progress=False)
    return work / "run", card


def test_where_the_gate_passes_int8_it_is_built_recorded_and_served(
    trained: tuple[Path, RunCard], tmp_path: Path
) -> None:
    run, card = trained
    registry = ModelRegistry.open(str(tmp_path / "registry"), cache_dir=tmp_path / "cache")
    lines: list[str] = []
    # A gate every form passes: what is tested is what a passed form carries, not the figures.
    manifest = publish_run(
        run,
        registry,
        forms=("fp32", "int8", "bf16"),
        min_agreement=0.0,
        max_accuracy_drop=1.0,
        log=lines.append,
    )

    forms = {form.name: form for form in manifest.forms}
    bf16 = {"openvino-bf16"} if cpu_runs_bf16() else set()
    openvino_forms = {name for name in forms if name.startswith("openvino-")}
    assert openvino_forms == {"openvino-fp32", "openvino-int8"} | bf16, manifest.skipped_forms
    fp32 = forms["openvino-fp32"]
    assert fp32.agreement == 1.0 and fp32.evaluated_on == "test split" and fp32.images == 36
    assert fp32.accuracy == pytest.approx(card.metrics.accuracy)
    assert fp32.ece is not None
    # Temperature and threshold re-fitted on the form's own outputs over the validation split
    # (as the trainer fitted model.pt's), never on the test split that gates it.
    assert fp32.temperature > 0 and fp32.calibration_fitted_on == "calibration images"
    assert fp32.confidence_threshold is not None  # the recipe's calibration.target_accuracy

    int8 = forms["openvino-int8"]
    assert int8.calibration_images == 36  # the validation split
    assert int8.quantization == "post-training"  # passed at once: no accuracy control
    assert int8.evaluated_on == "test split" and int8.images == 36
    assert int8.accuracy is not None and 0.0 <= int8.agreement <= 1.0
    assert "openvino-int8" not in manifest.skipped_forms
    if cpu_runs_bf16():
        assert forms["openvino-bf16"].agreement >= 0.9
    else:
        assert "BF16" in manifest.skipped_forms["openvino-bf16"]
    assert any(line.startswith("openvino-fp32: top-1 agreement 100.00%") for line in lines)
    assert any(line.startswith("openvino-int8: top-1 agreement") for line in lines), lines

    stored = tmp_path / "registry" / "models" / manifest.name / manifest.version / "forms"
    assert (stored / "openvino-int8" / "model.xml").is_file()
    served = load_model(registry, manifest.name, manifest.version, precision="int8")
    assert served.form in ("openvino-int8", "onnxruntime-int8")  # the faster of the two
    auto = load_model(registry, manifest.name, manifest.version, precision="auto")
    assert auto.form in forms


def test_where_the_gate_refuses_int8_the_card_and_the_log_say_why(
    trained: tuple[Path, RunCard], tmp_path: Path
) -> None:
    run, _ = trained
    registry = tmp_path / "registry"
    # A gate no form can pass (agreement above 100%, which the CLI refuses as a value but the
    # function takes): refused plain, refused again after NNCF's accuracy control, whatever
    # this CPU's INT8 does. The CLI prints these same lines (`log=click.echo`).
    lines: list[str] = []
    publish_run(
        run,
        ModelRegistry.open(str(registry), cache_dir=tmp_path / "publish"),
        forms=("int8",),
        min_agreement=1.01,
        log=lines.append,
    )
    output = "\n".join(lines)
    # Each refused form is its heading line, then one indented paragraph per attempt.
    block = output.split("openvino-int8: not built:", 1)[1].split("-int8: not built:")[0]
    refusal = " ".join(block.split())
    assert "post-training: top-1 agreement" in refusal, output
    assert "with accuracy control: top-1 agreement" in refusal, output
    assert "under the gate's 101.00%" in refusal, output

    opened = ModelRegistry.open(str(registry), cache_dir=tmp_path / "cache")
    manifest = opened.manifest("car-damage", "1")
    assert manifest.forms == []
    for form in ("openvino-int8", "onnxruntime-int8"):
        assert "under the gate's 101.00%" in manifest.skipped_forms[form], form
    assert not (registry / "models" / "car-damage" / "1" / "forms").exists()
    served = load_model(opened, "car-damage", "1", precision="int8")
    assert served.form == "torchscript-fp32"


@pytest.mark.parametrize(
    "option", [("--min-agreement", "99"), ("--min-agreement", "-0.1"), ("--max-accuracy-drop", "3")]
)
def test_a_gate_value_that_is_not_a_share_is_a_usage_error(
    trained: tuple[Path, RunCard], tmp_path: Path, option: tuple[str, str]
) -> None:
    from perito_training.cli import publish

    run, _ = trained
    registry = tmp_path / "registry"
    result = CliRunner().invoke(
        publish, [str(run), "--registry", str(registry), "--forms", "int8", *option]
    )
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option[0]}'" in result.output
    assert "0<=x<=1" in result.output
    assert not registry.exists()
