"""Validation of client replies before anything is averaged.

A reply is accepted only if it carries exactly the expected adapter tensors
(keys, shapes, dtypes), all finite, and a positive example count. A reply that
fails is reported with a reason and left out; it is never averaged in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from fedshift.common.protocol import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY


@dataclass(frozen=True)
class ArraySpec:
    """What one shared tensor must look like."""

    shape: tuple[int, ...]  # exact shape
    dtype: str  # numpy dtype name, e.g. "float32"


def expected_specs(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    """The spec of every tensor in the global adapters the server sent."""
    return {k: ArraySpec(tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}


def reply_problem(msg: Message, expected: Mapping[str, ArraySpec], *, with_arrays: bool = True) -> str | None:
    """Why ``msg`` must not be aggregated, or ``None`` when it is fine."""
    if msg.has_error():
        return f"the site reported an error: {msg.error.reason}"
    content = msg.content
    if len(content.metric_records) != 1 or METRICS_KEY not in content.metric_records:
        return f"expected one MetricRecord {METRICS_KEY!r}, got {sorted(content.metric_records)}"
    weight = content.metric_records[METRICS_KEY].get(WEIGHT_KEY)
    if isinstance(weight, list) or weight is None or not weight > 0:
        return f"expected a positive {WEIGHT_KEY!r}, got {weight!r}"
    if not with_arrays:
        return None
    if len(content.array_records) != 1 or ARRAYS_KEY not in content.array_records:
        return f"expected one ArrayRecord {ARRAYS_KEY!r}, got {sorted(content.array_records)}"
    arrays = content.array_records[ARRAYS_KEY]
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"wrong keys: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, spec in expected.items():
        array = arrays[key]
        if tuple(array.shape) != spec.shape:
            return f"{key!r} has shape {tuple(array.shape)}, expected {spec.shape}"
        if str(array.dtype) != spec.dtype:
            return f"{key!r} has dtype {array.dtype}, expected {spec.dtype}"
        if not np.isfinite(array.numpy()).all():
            return f"{key!r} contains NaN or infinite values"
    return None
