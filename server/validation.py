"""Validation of client replies before anything is averaged.

A reply is accepted only if it carries exactly the expected adapter tensors
(keys, shapes, dtypes), all finite, and a whole, positive, capped example
count. Shapes and dtypes are those of the *decoded* data: an ``Array``'s
``shape``/``dtype`` fields are the sender's declaration, and only the bytes are
what gets averaged. A reply that fails is reported with a reason and left out;
it is never averaged in.

Flower's FedAvg also needs every reply of a round to carry the same metric keys
(else it raises ``InconsistentMessageReplies`` and the run ends):
:func:`metric_key_reference` picks the key set the round's replies are held to.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedshift.common.config import FederationConfig
from fedshift.common.protocol import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY

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


def reply_problem(
    msg: Message,
    expected: Mapping[str, ArraySpec],
    *,
    with_arrays: bool = True,
    max_weight: int = MAX_NUM_EXAMPLES,
) -> str | None:
    """Why ``msg`` must not be aggregated, or ``None`` when it is fine."""
    if msg.has_error():
        return f"the site reported an error: {msg.error.reason}"
    content = msg.content
    if len(content.metric_records) != 1 or METRICS_KEY not in content.metric_records:
        return f"expected one MetricRecord {METRICS_KEY!r}, got {sorted(content.metric_records)}"
    problem = weight_problem(content.metric_records[METRICS_KEY].get(WEIGHT_KEY), max_weight)
    if problem is not None or not with_arrays:
        return problem
    if len(content.array_records) != 1 or ARRAYS_KEY not in content.array_records:
        return f"expected one ArrayRecord {ARRAYS_KEY!r}, got {sorted(content.array_records)}"
    return arrays_problem(content.array_records[ARRAYS_KEY], expected)


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


def metric_key_reference(
    key_sets: Iterable[frozenset[str]], earlier: frozenset[str] | None = None
) -> frozenset[str] | None:
    """The metric key set a round's replies are held to: the one most of them carry.

    Honest sites run the same fedshift code on the same run config, so they
    send the same keys. On a tie, the set an earlier round settled on wins, else
    the smallest (an added key is the likelier deviation). ``None`` for no replies.
    """
    counts = Counter(key_sets)
    if not counts:
        return None
    most = max(counts.values())
    tied = [keys for keys, n in counts.items() if n == most]
    if earlier in tied:
        return earlier
    return min(tied, key=lambda keys: (len(keys), sorted(keys)))


def metric_keys_problem(keys: frozenset[str], reference: frozenset[str]) -> str | None:
    """Why a reply's metric keys differ from the round's ``reference`` set, or ``None``."""
    if keys == reference:
        return None
    extra, missing = sorted(keys - reference), sorted(reference - keys)
    return (
        f"expected the metric keys the other sites send, but got extra {extra[:5]} and missing "
        f"{missing[:5]} (metrics of a round must match for aggregation)"
    )


def hold_to_reference(
    accepted: list[tuple[str, Message]], earlier: frozenset[str] | None = None
) -> tuple[list[tuple[str, Message]], list[tuple[str, Message, str]], frozenset[str] | None]:
    """Split checked ``(site, reply)`` pairs into those with the round's metric keys and the rest.

    Returns the kept pairs, ``(site, reply, why)`` for the others, and the
    reference key set (see :func:`metric_key_reference`).
    """
    reference = metric_key_reference((metric_keys(msg) for _, msg in accepted), earlier)
    kept: list[tuple[str, Message]] = []
    dropped: list[tuple[str, Message, str]] = []
    for name, msg in accepted:
        problem = metric_keys_problem(metric_keys(msg), reference) if reference is not None else None
        if problem is None:
            kept.append((name, msg))
        else:
            dropped.append((name, msg, problem))
    return kept, dropped, reference
