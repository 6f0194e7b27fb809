"""Validation of client replies before anything is averaged.

A reply is used only if it carries exactly the expected adapter tensors (keys and
the shapes and dtypes of the *decoded* data, all finite), a whole, positive, capped
example count, and one finite number per metric; else it is left out with a reason.
:func:`aggregation_view` hands Flower the metric keys all accepted replies share.
"""

from __future__ import annotations

import copy
import math
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedshift.common.config import FederationConfig
from fedshift.common.protocol import (
    ARRAYS_KEY,
    METRICS_KEY,
    SECAGG_MASKED_FIELD,
    SECAGG_MASKED_KEY,
    WEIGHT_KEY,
)

# the default cap on a reply's FedAvg weight (run config max-num-examples, 1e6): above the largest
# public chest X-ray collections (MIMIC-CXR ~377k, CheXpert ~224k images), so no real site reaches
# it, yet a site that lies can no longer claim 1e300 examples and become the whole average
MAX_NUM_EXAMPLES: int = FederationConfig.max_num_examples


@dataclass(frozen=True)
class ArraySpec:
    """What one shared tensor must look like."""

    shape: tuple[int, ...]  # exact shape
    dtype: str  # numpy dtype name, e.g. "float32"


def expected_specs(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    """The spec of every tensor in the global adapters the server sent."""
    return {k: ArraySpec(tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}


def decode(key: str, array: Array) -> tuple[np.ndarray | None, str | None]:
    """``(data, None)`` when ``array``'s bytes decode to what its fields declare, else ``(None, why)``."""
    try:
        data = array.numpy()
    except (TypeError, ValueError, OSError, EOFError) as err:  # not a pickle-free .npy buffer
        return None, f"{key!r} does not decode as an array ({type(err).__name__})"
    if not isinstance(data, np.ndarray):  # e.g. an .npz archive
        return None, f"{key!r} does not decode as one array (got {type(data).__name__})"
    if tuple(data.shape) != tuple(array.shape):
        return None, f"{key!r} declares shape {tuple(array.shape)} but its data has shape {data.shape}"
    if str(data.dtype) != str(array.dtype):
        return None, f"{key!r} declares dtype {array.dtype} but its data has dtype {data.dtype}"
    return data, None


def array_problem(key: str, array: Array, spec: ArraySpec) -> str | None:
    """Why ``array`` is not a finite tensor of ``spec``'s shape and dtype, or ``None``."""
    data, problem = decode(key, array)
    if data is None:
        return problem
    if tuple(data.shape) != spec.shape:
        return f"{key!r} has shape {data.shape}, expected {spec.shape}"
    if str(data.dtype) != spec.dtype:
        return f"{key!r} has dtype {data.dtype}, expected {spec.dtype}"
    if not np.isfinite(data).all():
        return f"{key!r} contains NaN or infinite values"
    return None


def weight_problem(weight: object, maximum: int = MAX_NUM_EXAMPLES) -> str | None:
    """Why ``weight`` is not a usable FedAvg weight (a whole number in [1, ``maximum``]), or ``None``."""
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        whole = False
    elif isinstance(weight, float):
        whole = math.isfinite(weight) and weight.is_integer()
    else:
        whole = True
    if not (whole and 1 <= weight <= maximum):  # type: ignore[operator]
        return (
            f"expected {WEIGHT_KEY!r} to be a positive whole number <= {maximum} "
            f"(run config max-num-examples), got {weight!r}"
        )
    return None


def metrics_problem(record: MetricRecord) -> str | None:
    """Why a metric of ``record`` is not one number (an int or a float, not infinite), or ``None``.

    NaN passes: it is what an honest site reports for a metric that is undefined on its
    split (the AUC of a one-class split), and averaging it ends no run.
    """
    for key, value in record.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or math.isinf(value):  # type: ignore[arg-type]
            return (
                f"expected metric {key!r} to be one number (not infinite), got {reprlib.repr(value)} "
                "(lists and infinities cannot be averaged)"
            )
    return None


def reply_problem(
    msg: Message,
    expected: Mapping[str, ArraySpec],
    *,
    with_arrays: bool = True,
    max_weight: int = MAX_NUM_EXAMPLES,
    masked_length: int | None = None,
) -> str | None:
    """Why ``msg`` must not be aggregated, or ``None`` when it is fine.

    With ``masked_length`` (secure aggregation) the reply carries one masked vector of that
    length in the field (uint32) instead of the adapter tensors.
    """
    if msg.has_error():
        return f"the site reported an error: {msg.error.reason}"
    content = msg.content
    if len(content.metric_records) != 1 or METRICS_KEY not in content.metric_records:
        return f"expected one MetricRecord {METRICS_KEY!r}, got {sorted(content.metric_records)}"
    record = content.metric_records[METRICS_KEY]
    problem = weight_problem(record.get(WEIGHT_KEY), max_weight) or metrics_problem(record)
    if problem is not None or not with_arrays:
        return problem
    if masked_length is not None:
        return masked_problem(content, masked_length)
    if len(content.array_records) != 1 or ARRAYS_KEY not in content.array_records:
        return f"expected one ArrayRecord {ARRAYS_KEY!r}, got {sorted(content.array_records)}"
    return arrays_problem(content.array_records[ARRAYS_KEY], expected)


def masked_problem(content: RecordDict, length: int) -> str | None:
    """Why ``content`` does not hold exactly one masked update of ``length`` field elements, or ``None``."""
    if len(content.array_records) != 1 or SECAGG_MASKED_KEY not in content.array_records:
        return f"expected one ArrayRecord {SECAGG_MASKED_KEY!r}, got {sorted(content.array_records)}"
    record = content.array_records[SECAGG_MASKED_KEY]
    if list(record) != [SECAGG_MASKED_FIELD]:
        return f"expected the masked update {SECAGG_MASKED_FIELD!r} alone, got {sorted(record)[:3]}"
    spec = ArraySpec((length,), "uint32")
    data, problem = decode(SECAGG_MASKED_FIELD, record[SECAGG_MASKED_FIELD])
    if data is None:
        return problem
    if tuple(data.shape) != spec.shape or str(data.dtype) != spec.dtype:
        return f"the masked update is {data.dtype}{list(data.shape)}, expected {spec.dtype}[{length}]"
    return None


def arrays_problem(arrays: ArrayRecord, expected: Mapping[str, ArraySpec]) -> str | None:
    """Why ``arrays`` are not exactly the ``expected`` tensors, decoded and finite, or ``None``."""
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"wrong keys: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, spec in expected.items():
        problem = array_problem(key, arrays[key], spec)
        if problem is not None:
            return problem
    return None


def metric_keys(msg: Message) -> frozenset[str]:
    """The keys of a (checked) reply's MetricRecord."""
    return frozenset(msg.content.metric_records[METRICS_KEY].keys())


def shared_metric_keys(replies: Iterable[Message]) -> frozenset[str]:
    """The metric keys every one of the (checked) ``replies`` carries; always holds the weight."""
    shared: frozenset[str] | None = None
    for msg in replies:
        keys = metric_keys(msg)
        shared = keys if shared is None else shared & keys
    return shared if shared is not None else frozenset({WEIGHT_KEY})


def aggregation_view(
    accepted: list[tuple[str, Message]], *, with_arrays: bool
) -> tuple[list[Message], dict[str, list[str]]]:
    """Copies of checked ``(site, reply)`` pairs for Flower's aggregation, and each site's keys left out.

    Each copy holds the reply's ArrayRecord (``with_arrays``) and a copy of its
    MetricRecord restricted to the keys all replies share (the weight among
    them), so Flower's ``validate_message_reply_consistency`` always passes and
    no reply is left out over its metric keys. The replies themselves are not
    changed (the history records what each site sent).
    """
    shared = shared_metric_keys(msg for _, msg in accepted)
    copies: list[Message] = []
    left_out: dict[str, list[str]] = {}
    for name, msg in accepted:
        record = msg.content.metric_records[METRICS_KEY]
        content = RecordDict({METRICS_KEY: MetricRecord({k: record[k] for k in record if k in shared})})
        if with_arrays:
            arrays = msg.content.array_records[ARRAYS_KEY]  # a new record: Flower's FedTrimmedAvg empties it
            content[ARRAYS_KEY] = ArrayRecord({k: arrays[k] for k in arrays})
        view = copy.copy(msg)  # the reply's metadata; its own content stays as it came
        view.content = content
        copies.append(view)
        extra = sorted(set(record) - shared)
        if extra:
            left_out[name] = extra
    return copies, left_out
