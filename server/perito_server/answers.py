"""The one builder of a `perito.v1.Classification`, the answer for one image.

`Classify` (from the probabilities it just computed) and `ListJobResults` (from what a worker
recorded) both answer with it, so the two cannot drift apart.
"""

from __future__ import annotations

from perito.v1 import classify_pb2
from perito_core.models.provenance import CardFigures
from perito_core.models.summary import Classification
from perito_core.quality import Quality


def classification_message(
    summary: Classification,
    *,
    image_id: str,
    form: str,
    first_frame_only: bool,
    provenance: classify_pb2.Provenance | None = None,
    quality: classify_pb2.Quality | None = None,
    explanation: classify_pb2.Explanation | None = None,
    figures: CardFigures | None = None,
) -> classify_pb2.Classification:
    """One image's answer.

    Args:
        summary: its top-k predictions (best first), margin, normalised entropy in [0, 1] and
            whether its top probability is under the threshold (`summary.summarize`).
        image_id: the caller's id for the image.
        form: the served form that answered (`torchscript-fp32`, `openvino-int8`, ...).
        first_frame_only: the file held several frames and only the first was read.
        provenance: what produced the answer (docs/trust.md#provenance); None leaves it out.
        quality: the photo's quality measures and issues; None leaves them out.
        explanation: the top-1 class's heat map; None leaves it out.
        figures: the version's model-card figures: each prediction gets its class's
            `card_precision` and `card_recall`, and the answer `expected_accuracy` at its
            top-1 probability, where the card has them (docs/trust.md#figures); None leaves
            them out.
    """
    message = classify_pb2.Classification(
        image_id=image_id,
        predictions=[
            classify_pb2.Prediction(
                label=p.label, class_index=p.class_index, probability=p.probability
            )
            for p in summary.predictions
        ],
        margin=summary.margin,
        normalized_entropy=summary.normalized_entropy,
        uncertain=summary.uncertain,
        first_frame_only=first_frame_only,
        form=form,
        provenance=provenance,
        quality=quality,
        explanation=explanation,
    )
    if figures is not None:
        for prediction in message.predictions:
            scores = figures.class_figures(prediction.label)
            if scores is not None:
                prediction.card_precision, prediction.card_recall = scores
        if summary.predictions:
            accuracy = figures.expected_accuracy(summary.predictions[0].probability)
            if accuracy is not None:
                message.expected_accuracy = accuracy
    return message


def quality_message(quality: Quality | None) -> classify_pb2.Quality | None:
    """A photo's quality measures and issues (`perito_core.quality`) as `perito.v1.Quality`;
    None for None (an image sent as pixels, or recorded before the gate)."""
    if quality is None:
        return None
    m = quality.measures
    return classify_pb2.Quality(
        sharpness=m.sharpness,
        dark_fraction=m.dark_fraction,
        bright_fraction=m.bright_fraction,
        brightness=m.brightness,
        contrast=m.contrast,
        width=m.width,
        height=m.height,
        resolution=m.resolution,
        issues=quality.issues,
    )
