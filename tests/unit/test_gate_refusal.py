"""What a refused form's reason says: by how much it missed the gate (images agreed, the 95%
lower bound, how many more had to agree) and why (disagreements that were near-ties in
model.pt, the layers kept FP32, the speed-up it would have given)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from perito_core.models.gate import refusal_detail
from tests.helpers import logged


def _answers(top: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """Probabilities (N, 3) whose top-1 class is `top` and whose top-1 minus top-2 is `margin`."""
    rows = np.zeros((len(top), 3), dtype=np.float32)
    for i, (klass, gap) in enumerate(zip(top, margin, strict=True)):
        second = 0.5 - gap / 2
        rows[i, klass] = second + gap
        rows[i, (klass + 1) % 3] = second
    return rows


def test_a_refusal_counts_the_shortfall_and_the_near_ties() -> None:
    top = np.arange(240) % 3
    margins = np.full(240, 0.6)
    margins[:5] = 0.01  # five near-ties in model.pt ...
    margins[5:8] = 0.3  # ... and three clear answers
    reference = _answers(top, margins)
    flipped = top.copy()
    flipped[:8] = (flipped[:8] + 1) % 3  # the form disagrees on all eight
    detail = refusal_detail(
        _answers(flipped, np.full(240, 0.02)),
        reference,
        0.99,
        fp32_layers=["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc"],
        speedup=2.04,
    )
    assert "232 of 240 agree, 95% lower bound 93.56%" in detail
    assert "6 more had to agree for 99%" in detail  # 238 of 240 pass
    assert "5 of the 8 disagreements were near-ties in model.pt" in detail
    assert "the largest margin flipped 0.300" in detail
    assert "5 layers kept FP32 (conv1, layer1.0.conv1, layer1.0.conv2, layer2.0.conv1, ...)" in (
        detail
    )
    assert "it would have run at 2.04x the FP32 form's images/s" in detail
    assert "no faster" not in detail
    flipped_answers = _answers(flipped, np.full(240, 0.02))
    slower = refusal_detail(flipped_answers, reference, 0.99, speedup=0.93)  # as in the demo
    assert "0.93x the FP32 form's images/s (no faster than FP32: `auto` would not" in slower


def test_a_form_at_the_target_owes_no_images_and_a_perfect_one_names_no_disagreement() -> None:
    top = np.arange(200) % 3
    reference = _answers(top, np.full(200, 0.5))
    flipped = top.copy()
    flipped[:2] = (flipped[:2] + 1) % 3
    at_target = refusal_detail(_answers(flipped, np.full(200, 0.5)), reference, 0.99)
    assert "198 of 200 agree" in at_target and "more had to agree" not in at_target
    assert "0 of the 2 disagreements were near-ties" in at_target
    labelled = refusal_detail(
        _answers(flipped, np.full(200, 0.5)), reference, 0.99, accuracy_change_interval=(-0.03, 0.0)
    )
    assert "accuracy change 95% interval -3.00 to +0.00 points" in labelled
    perfect = refusal_detail(reference, reference, 0.99)
    assert "disagreements" not in perfect and "FP32" not in perfect
    with pytest.raises(ValueError, match="against"):
        refusal_detail(reference[:10], reference, 0.99)


def test_an_imported_models_refused_form_says_by_how_much_it_missed(
    tiny_model_file: Path, tmp_path: Path
) -> None:
    """What `perito models import --forms` prints (the build's summary lines) and the card
    keeps (`skipped_forms`) of a refused form: its agreement, its bound, the target it missed
    and by how many images, and the speed-up it would have given."""
    pytest.importorskip("openvino", reason="OpenVINO (optional engine, perito[serve]) missing")
    from perito_core.models.gate import build_forms_from_folder
    from perito_core.models.gate_images import gate_images
    from perito_core.models.manifest import InputContract

    folder = gate_images(
        held_out_per_photo=2, held_out_scenes=4, calibration_per_photo=1, calibration_scenes=2
    ).write(tmp_path / "gate")
    contract = InputContract(height=32, width=32, resize_size=37)
    with logged("perito_core.models.gate", logging.WARNING) as warnings:
        built = build_forms_from_folder(
            tiny_model_file,
            contract,
            tmp_path / "forms",
            folder,
            precisions=("fp32", "int8"),
            # A gate no form can pass (agreement is at most 100%; the CLI takes no such
            # value): every form is refused.
            min_agreement=1.01,
        )
    # As the build goes, each refusal is logged in one short line; its figures once, below.
    refusals = [w for w in warnings if w.startswith("openvino-int8 refused: ")]
    assert refusals and all("lower bound" not in w and "agree" in w for w in refusals), warnings
    # Why, one wrapped paragraph per attempt under "openvino-int8: not built:", read back
    # as the one reason the card keeps.
    out = "\n".join(built.summary()).splitlines()  # as the CLI echoes them
    paragraphs: list[list[str]] = []
    for text in out[out.index("openvino-int8: not built:") + 1 :]:
        if not text.startswith("  "):
            break
        if not text.startswith("    "):  # a paragraph's first line: two spaces in
            paragraphs.append([])
        paragraphs[-1].append(text.strip())
    line = "not built: " + "; ".join(" ".join(lines) for lines in paragraphs)
    assert "is under the gate's 101.00%" in line, line
    start = out.index("openvino-int8: not built:") + 1
    assert all(len(text) <= 100 for text in out[start : start + sum(map(len, paragraphs))])
    assert re.search(r"\b(\d+) of 16 agree, 95% lower bound \d+\.\d\d%", line), line
    agreed = int(re.search(r"\b(\d+) of 16 agree", line).group(1))  # type: ignore[union-attr]
    assert f"{17 - agreed} more had to agree for 101%" in line
    assert re.search(r"it would have run at \d+\.\d\dx the FP32 form.s images/s", line), line
    assert not built.forms
    assert line.removeprefix("not built: ") == built.skipped["openvino-int8"]
