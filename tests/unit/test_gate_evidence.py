"""What the accuracy gate reports beside its decision: the held-out image count, the 95% lower
bound of the agreement, the accuracy change's interval, and a warning when it is weak."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from perito_core.models.engines.base import BuiltForms
from perito_core.models.gate import gate_figures, gate_reason, weak_gate_warning
from perito_core.models.manifest import CompiledForm, FormFile


def _one_hot(classes: np.ndarray, count: int = 3) -> np.ndarray:
    rows: np.ndarray = np.eye(count, dtype=np.float32)[classes]
    return rows


def test_figures_give_the_count_the_bound_and_the_paired_accuracy_change() -> None:
    targets = np.arange(240) % 3
    reference = _one_hot(targets)
    answered = targets.copy()
    answered[:6] = (answered[:6] + 1) % 3  # six images the form now gets wrong
    figures = gate_figures(_one_hot(answered), reference, targets)
    assert figures.images == 240 and figures.agreement == pytest.approx(234 / 240)
    assert 0.94 < figures.agreement_lower < figures.agreement
    assert figures.accuracy == pytest.approx(234 / 240) and figures.reference_accuracy == 1.0
    assert figures.accuracy_change_interval is not None
    low, high = figures.accuracy_change_interval
    assert low < -6 / 240 < high < 0  # a loss the interval does not reach 0 from
    unlabelled = gate_figures(_one_hot(answered), reference)
    assert unlabelled.accuracy is None and unlabelled.accuracy_change_interval is None
    with pytest.raises(ValueError, match="targets"):
        gate_figures(reference, reference, targets[:10])


def test_a_gate_under_200_images_warns_that_it_is_weak() -> None:
    warning = weak_gate_warning(32)
    assert "weak gate: 32 held-out images, under 200" in warning
    assert "above 89.3%" in warning  # what 32 of 32 would show
    assert weak_gate_warning(200) == ""


def test_the_rule_is_on_the_point_estimate() -> None:
    # 198 of 200 agree: 99% passes although its lower bound is about 96.4%.
    assert gate_reason(198 / 200, None, None) is None
    assert "under the gate's 99.00%" in (gate_reason(197 / 200, None, None) or "")


def test_the_cli_line_shows_the_count_the_bound_the_change_and_the_warning() -> None:
    form = CompiledForm(
        name="openvino-int8",
        engine="openvino",
        engine_version="2026.4.1",
        precision="int8",
        files=[FormFile(file="model.xml", sha256="0" * 64, size_bytes=1)],
        agreement=1.0,
        agreement_lower=0.893,
        max_abs_diff=0.01,
        images=32,
        accuracy=0.90625,
        reference_accuracy=0.9375,
        accuracy_change_lower=-0.09,
        accuracy_change_upper=0.02,
        gate_warning=weak_gate_warning(32),
    )
    built = BuiltForms(forms=[(form, Path("."))])
    (line,) = built.summary()
    assert line.startswith("openvino-int8: top-1 agreement 100.00% on 32 images")
    assert "(95% lower bound 89.30%)" in line
    assert "change -3.12 points, 95% interval -9.00 to +2.00" in line
    assert "weak gate: 32 held-out images" in line
    # A manifest written before the bounds were recorded still loads and prints.
    old = CompiledForm.model_validate(
        form.model_dump(
            exclude={
                "agreement_lower",
                "accuracy_change_lower",
                "accuracy_change_upper",
                "gate_warning",
            }
        )
    )
    assert old.agreement_lower is None and "lower bound" not in old.evidence()


def test_models_import_and_models_show_print_the_count_and_the_bound(
    tiny_model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`perito models import --calibration` with calibration/ and held-out/ subfolders gates on
    the held-out ones only; its output, the card and `perito models show` give their count,
    the agreement's 95% lower bound and, under 200 images, the weak-gate warning."""
    pytest.importorskip("openvino", reason="OpenVINO (optional engine, perito[serve]) missing")
    from click.testing import CliRunner

    from perito._cli import _print_forms
    from perito_core.models.gate_images import gate_images
    from perito_core.models.registry import ModelRegistry
    from perito_server.cli import import_model

    images = gate_images(
        held_out_per_photo=2, held_out_scenes=4, calibration_per_photo=1, calibration_scenes=2
    )
    folder = images.write(tmp_path / "gate")
    assert len(images.held_out) == 16 and len(images.calibration) == 14
    (tmp_path / "labels.txt").write_text("minor\nmoderate\nsevere\n")
    result = CliRunner().invoke(
        import_model,
        [
            str(tiny_model_file),
            *("--name", "tiny", "--labels", str(tmp_path / "labels.txt"), "--input-size", "32"),
            *("--forms", "fp32", "--calibration", str(folder)),
            *("--registry", str(tmp_path / "registry")),
        ],
    )
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("openvino-fp32:"))
    assert "top-1 agreement 100.00% on 16 images (95% lower bound 80.64%)" in line, line
    assert "weak gate: 16 held-out images, under 200" in line

    registry = ModelRegistry.open(str(tmp_path / "registry"), cache_dir=tmp_path / "cache")
    forms = {form.name: form for form in registry.manifest("tiny", "1").forms}
    form = forms["openvino-fp32"]
    assert form.images == 16 and form.evaluated_on == "images of gate/held-out"
    assert form.agreement_lower == pytest.approx(0.8064, abs=1e-4)
    assert "weak gate" in form.gate_warning

    _print_forms(registry.manifest("tiny", "1").card().model_dump(mode="json"))
    shown = capsys.readouterr().out
    assert "openvino-fp32: top-1 agreement 100.00% on 16 images (95% lower bound 80.64%)" in shown
    assert "weak gate: 16 held-out images" in shown


def test_models_show_gives_a_refusal_one_wrapped_paragraph_per_attempt(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A refused INT8 form's reason (post-training, then accuracy control) was one line of
    about 1,000 characters."""
    from perito._cli import _print_forms

    attempt = (
        "top-1 agreement with model.pt 87.50% is under the gate's 99.00% (240 images of "
        "calibration/held-out; 210 of 240 agree, 95% lower bound 82.72%; 28 more had to agree "
        "for 99%; 17 layers kept FP32 (conv 1 3x3 3->32 stride 2, conv 2 3x3 depthwise x32, ...)"
    )
    reason = f"post-training: {attempt}; with accuracy control: {attempt}"
    _print_forms({"forms": [], "skipped_forms": {"openvino-int8": reason}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        "compiled forms (gated against model.pt):",
        "  openvino-int8: not built:",
        "    post-training: top-1 agreement with model.pt 87.50% is under the gate's 99.00% (240 "
        "images of",
    ]
    assert any(line.startswith("    with accuracy control: top-1 agreement") for line in lines)
    assert max(len(line) for line in lines) <= 100
    assert not any(line.endswith("held-") for line in lines)  # words stay whole
    assert " ".join(line.strip() for line in lines[2:]).count("conv 2 3x3 depthwise x32") == 2
