"""Explanations for `Classify` (`ClassifyRequest.explain`): an occlusion heat map of each
image's top-1 class (`perito_core.explain`), whose forward passes run through the answering
model's own dynamic batcher, in its low-priority lane, so that they never queue ahead of a
plain request's images, and within the call's deadline.

Cost: `Occlusion().passes` (50) forward passes per image explained, at most
`ServerSettings.max_explanations_per_request` images per call (docs/trust.md#explanations).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np

from perito.v1 import classify_pb2
from perito_core.errors import DeadlineExceeded
from perito_core.explain import METHOD, Occlusion, overlay_png
from perito_core.models.summary import output_faults
from perito_server.model_pool import ServedModel

OCCLUSION = Occlusion()


async def explain(
    served: ServedModel,
    pixels: Sequence[np.ndarray],
    probabilities: Sequence[np.ndarray],
    *,
    deadline: float | None,
    executor: Executor,
    refuse_faulty: Callable[[dict[int, str]], None],
) -> list[classify_pb2.Explanation]:
    """The explanation of each image's top-1 class, in order.

    Args:
        served: the model version (and form) that answered the images.
        pixels: each image as the model took it, uint8 (H, W, 3).
        probabilities: each image's answer, float32 (classes,).
        deadline: `time.monotonic()` by which they are due, or None.
        executor: where the occluded images and the PNGs are made (off the event loop).
        refuse_faulty: called, before anything is drawn, with the positions of the images
            any of whose forward passes answered no answer (`summary.output_fault`: no heat
            map can be made of them) and why; it raises the refusal (the inference service's
            `_refuse_faulty_outputs`, so they are counted as any such output is).

    Returns:
        One `Explanation` per image: method `occlusion`, the top-1 class, its
        `OCCLUSION.grid` x `OCCLUSION.grid` heat map and the overlay PNG of the model input's
        size.

    Raises:
        DeadlineExceeded: the deadline passed before every forward pass ran.
        QueueFull: the low-priority lane has no room now (with a retry hint).
        ShuttingDown: the server is draining.
        PeritoError: what `refuse_faulty` raises.
    """
    loop = asyncio.get_running_loop()
    classes = [int(np.argmax(p)) for p in probabilities]

    def occluded() -> list[np.ndarray]:
        return [image for one in pixels for image in OCCLUSION.inputs(one)]

    inputs = await loop.run_in_executor(executor, occluded)
    try:
        with served.batcher.admit(len(inputs), low_priority=True) as admission:
            async with asyncio.timeout_at(deadline):  # the loop's clock is time.monotonic()
                scores = await admission.run(inputs, deadline)
    except TimeoutError:
        raise DeadlineExceeded(
            f"the deadline passed before the {len(pixels)} explanations' "
            f"{len(inputs)} forward passes ran (they wait behind plain requests)"
        ) from None
    passes = OCCLUSION.passes
    bad = {}
    for index in range(len(pixels)):
        faults = output_faults(scores[index * passes : (index + 1) * passes])
        if faults:
            bad[index] = next(iter(faults.values()))
    if bad:
        refuse_faulty(bad)
    labels = served.model.manifest.labels

    def draw() -> list[classify_pb2.Explanation]:
        explanations = []
        for index, (image, top) in enumerate(zip(pixels, classes, strict=True)):
            own = np.stack(scores[index * passes : (index + 1) * passes])[:, top]
            heat = OCCLUSION.heat_map(own)
            explanations.append(
                classify_pb2.Explanation(
                    method=METHOD,
                    class_index=top,
                    label=labels[top],
                    grid_height=heat.shape[0],
                    grid_width=heat.shape[1],
                    grid=heat.ravel().tolist(),
                    overlay_png=overlay_png(image, heat),
                )
            )
        return explanations

    return await loop.run_in_executor(executor, draw)
