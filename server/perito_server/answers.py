"""The one builder of a `perito.v1.Classification`, the answer for one image.

`Classify` (from the probabilities it just computed) and `ListJobResults` (from what a worker
recorded) both answer with it, so the two cannot drift apart.
"""

from __future__ import annotations

from perito.v1 import classify_pb2
from perito_core.models.summary import Classification


def classification_message(
    summary: Classification,
    *,
    image_id: str,
    form: str,
    first_frame_only: bool,
) -> classify_pb2.Classification:
    """One image's answer.

    Args:
        summary: its top-k predictions (best first), margin, normalised entropy in [0, 1] and
            whether its top probability is under the threshold (`summary.summarize`).
        image_id: the caller's id for the image.
        form: the served form that answered (`torchscript-fp32`, `openvino-int8`, ...).
        first_frame_only: the file held several frames and only the first was read.
    """
    return classify_pb2.Classification(
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
    )
