"""What leaves a site: a guard on every outgoing message, and the site's egress log.

The guard is a Flower client mod (``fn(msg, ctxt, call_next)``), the outermost
one, so it sees the reply exactly as it leaves. Every item in it must be one of:

* the shared adapter tensors, protected by DP-SGD (or explicitly unprotected
  because the site set ``dp=false``, which the log and the server both show);
* a metric whose key the site allows (``egress-metrics``; aggregate numbers such
  as validation AUC);
* bookkeeping the protocol needs: the site's name, its privacy accounting
  (noise multiplier, sample rate, epsilon), a refusal reason;
* a statistic released by a Gaussian mechanism (noisy label counts, feature
  moments: :data:`DP_STATISTICS`), and only when the site's ledger holds the
  charge for that mechanism in this run and round;
* a Fisher diagonal for EWC consolidation (``query.fisher``), released under DP
  (and charged: checked against the ledger), or estimated on public images.

Anything else (a label count, a feature moment, a tensor nobody declared) is
*blocked*: the reply is replaced by a refusal that names the blocked keys, and
the log records it. Each message appends one JSON line to
``<state-dir>/egress-log.jsonl``: every key sent, its shape, bytes and the
mechanism that protected it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedshift.common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FISHER_KEY,
    METRICS_KEY,
    PRIVACY_KEY,
    SITE_KEY,
    STATUS_KEY,
)
from fedshift.common.shift_statistics import STATISTICS_KEY

logger = logging.getLogger(__name__)

EGRESS_LOG_FILE = "egress-log.jsonl"

DEFAULT_METRICS = frozenset(
    {
        # training (aggregate numbers over the site's splits)
        "num-examples",
        "train-loss",
        "val-auc",
        "val-accuracy",
        "samples-per-second",
        # evaluation
        "auc",
        "accuracy",
        "balanced-accuracy",
        "log-loss",
        "ece",
        "n",
    }
)

# label-shift correction and domain alignment (issue 5): the same aggregate evaluation metrics of
# the corrected / adapted predictions (cal = calibrated, ls = prior-corrected, oracle = corrected
# with the split's true prior, tta = test-time-adapted norms), and whether the correction fell back
_VARIANT_METRICS = ("auc", "accuracy", "balanced-accuracy", "log-loss", "ece")
SHIFT_METRICS = frozenset(
    {
        *(f"{v}-{m}" for v in ("cal", "ls", "oracle", "tta", "tta-ls") for m in _VARIANT_METRICS),
        "thr-accuracy",
        "thr-balanced-accuracy",
        "ls-fallback",
    }
)
DEFAULT_METRICS = DEFAULT_METRICS | SHIFT_METRICS

# config records the protocol needs, and the only keys they may carry
BOOKKEEPING_KEYS = {
    SITE_KEY: frozenset({"name"}),
    PRIVACY_KEY: frozenset(
        {
            "mechanism",
            "epsilon",
            "delta",
            "budget-epsilon",
            "noise-multiplier",
            "clip-norm",
            "sample-rate",
            "steps",
            "accountant",
            "secure-rng",
            "ewc-fisher",
        }
    ),
    STATUS_KEY: frozenset({"status", "reason"}),
}

MECHANISM_DP = "dp-sgd"
MECHANISM_DP_FISHER = "dp-fisher"  # the ledger's name for a DP release of the EWC Fisher
# issue 5: statistics released by the Gaussian mechanism in the statistics stage, charged per release
MECHANISM_DP_LABEL_COUNTS = "dp-label-counts"  # the site's training label counts
MECHANISM_DP_MOMENTS = "dp-moments"  # first and second moments of the site's projected features
DP_STATISTICS = {
    "label-counts": MECHANISM_DP_LABEL_COUNTS,
    "moment-sum": MECHANISM_DP_MOMENTS,
    "moment-outer": MECHANISM_DP_MOMENTS,
    "moment-square": MECHANISM_DP_MOMENTS,
}
MECHANISM_NONE = "none (dp=false at this site)"
# a Fisher a site sends for consolidation: its privacy record's mechanism -> what protected it
FISHER_RELEASES = {
    MECHANISM_DP_FISHER: MECHANISM_DP_FISHER,  # checked against the ledger, like the DP statistics
    "public": "public data (synthetic images)",
    "unit": "no data (F = 1)",
    "none": MECHANISM_NONE,
}
METRIC = "aggregate-metric (allowed by site config)"
BOOKKEEPING = "protocol bookkeeping"


@dataclass(frozen=True)
class EgressPolicy:
    """What this site lets leave."""

    dp_required: bool  # adapters must come out of DP-SGD
    allowed_metrics: frozenset[str] = DEFAULT_METRICS


def _array_items(record: ArrayRecord, name: str, mechanism: str) -> list[dict[str, Any]]:
    items = []
    for key, array in record.items():
        arr = array.numpy()
        items.append(
            {
                "record": name,
                "key": key,
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "bytes": int(arr.nbytes),
                "mechanism": mechanism,
            }
        )
    return items


def _value_bytes(value: Any) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, str | bytes):
        return len(value)
    return 8


def inspect_reply(content: RecordDict, policy: EgressPolicy) -> tuple[list[dict[str, Any]], list[str]]:
    """Every item of an outgoing message with its mechanism, and the keys the policy blocks."""
    items: list[dict[str, Any]] = []
    blocked: list[str] = []
    privacy = content.config_records.get(PRIVACY_KEY)
    declared = str(privacy.get("mechanism", "")) if privacy is not None else ""
    for name, record in content.array_records.items():
        if name == FISHER_KEY:  # the end-of-phase Fisher (EWC consolidation)
            release = FISHER_RELEASES.get(declared)
            if release is not None and not (release == MECHANISM_NONE and policy.dp_required):
                items.extend(_array_items(record, name, release))
            else:
                blocked.append(f"{name} (a Fisher released by {declared!r} while this site requires DP)")
            continue
        if name != ARRAYS_KEY:
            blocked.append(f"{name} (undeclared array record)")
            continue
        if declared == MECHANISM_DP:
            items.extend(_array_items(record, name, MECHANISM_DP))
        elif declared == "none" and not policy.dp_required:
            items.extend(_array_items(record, name, MECHANISM_NONE))
        else:
            blocked.append(f"{name} (adapters without DP-SGD while this site requires it)")
    for name, metrics in content.metric_records.items():
        for key, metric in metrics.items():
            if name == METRICS_KEY and key in policy.allowed_metrics:
                items.append({"record": name, "key": key, "bytes": _value_bytes(metric), "mechanism": METRIC})
            else:
                blocked.append(f"{name}.{key} (metric not in the site's egress-metrics)")
    for name, config in content.config_records.items():
        for key, value in config.items():
            if name == STATISTICS_KEY and key in DP_STATISTICS:  # checked against the ledger by the guard
                size = _value_bytes(value)
                items.append({"record": name, "key": key, "bytes": size, "mechanism": DP_STATISTICS[key]})
            elif key in BOOKKEEPING_KEYS.get(name, frozenset()):
                items.append(
                    {"record": name, "key": key, "bytes": _value_bytes(value), "mechanism": BOOKKEEPING}
                )
            else:
                blocked.append(f"{name}.{key} (not a declared bookkeeping field)")
    return items, blocked


def append_egress_log(state_dir: Path, entry: Mapping[str, Any]) -> None:
    """Append one JSON line and fsync it: a crash loses at most the line being written."""
    state_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, sort_keys=True) + "\n"
    fd = os.open(state_dir / EGRESS_LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_egress_log(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / EGRESS_LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def round_of(msg: Message) -> int:
    config = msg.content.config_records.get(CONFIG_KEY)
    value = config.get("server-round", 0) if config is not None else 0
    return int(cast(int, value))


def refusal(msg: Message, site: str, status: str, reason: str) -> Message:
    """A reply that says why this site sends nothing this time."""
    content = RecordDict(
        {
            SITE_KEY: ConfigRecord({"name": site}),
            STATUS_KEY: ConfigRecord({"status": status, "reason": reason}),
        }
    )
    return Message(content, reply_to=msg)


def uncharged_statistics(
    items: list[dict[str, Any]], state_dir: Path, run_id: str, server_round: int
) -> list[str]:
    """The DP statistics among ``items`` whose release the site's ledger has no charge for (blocked)."""
    dp = {*DP_STATISTICS.values(), MECHANISM_DP_FISHER}
    released = {(i["record"], i["key"], i["mechanism"]) for i in items if i["mechanism"] in dp}
    if not released:
        return []
    from fedshift.client.ledger import open_ledger

    ledger = open_ledger(state_dir)
    return [
        f"{record}.{key} (no {mechanism!r} charge for run {run_id} round {server_round} in the ledger)"
        for record, key, mechanism in sorted(released)
        if ledger is None or ledger.find(run_id, server_round, mechanism) is None
    ]


SiteResolver = Callable[[Context], tuple[str, Path, EgressPolicy]]
Handler = Callable[[Message, Context], Message]


def egress_guard(resolve: SiteResolver) -> Callable[[Message, Context, Handler], Message]:
    """The client mod; ``resolve`` gives the site's name, state directory and policy from the context."""

    def mod(msg: Message, context: Context, call_next: Handler) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        site, state_dir, policy = resolve(context)
        items, blocked = inspect_reply(reply.content, policy)
        blocked += uncharged_statistics(items, state_dir, str(msg.metadata.run_id), round_of(msg))
        if blocked:
            logger.error("%s: egress guard blocked %s; sending a refusal instead", site, blocked)
            reply = refusal(msg, site, "blocked", f"egress guard blocked {len(blocked)} item(s): {blocked}")
            items, _ = inspect_reply(reply.content, policy)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run": str(msg.metadata.run_id),
            "round": round_of(msg),
            "stage": str(msg.metadata.message_type),
            "site": site,
            "items": items,
            "blocked": blocked,
            "bytes": int(sum(i["bytes"] for i in items)),
        }
        append_egress_log(state_dir, entry)
        return reply

    return mod
