"""What leaves a site: a guard on every outgoing message, and the site's egress log.

The guard is a Flower client mod (``fn(msg, ctxt, call_next)``), the outermost
one, so it sees the reply exactly as it leaves. Every item in it must be one of:

* the shared adapter tensors, protected by DP-SGD (or explicitly unprotected
  because the site set ``dp=false``, which the log and the server both show);
* a metric whose key the site allows (``egress-metrics``; aggregate numbers such
  as validation AUC); fedshift's other metrics are withheld (taken out of the
  reply, and the log says so), any other metric key is blocked;
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
``<state-dir>/egress-log.jsonl``: the request (message type, run, round, split,
the server's config), every key sent, its shape, bytes and the mechanism that
protected it.

The guard also answers for the evaluation metrics, which leave without DP:
an evaluate message for a split outside the site's
``eval-splits`` (never ``train``), or for a round outside the run's
``1..num-server-rounds``, is refused before any site code runs (so is any
message whose ``server-round`` is not a whole number); each
(run, round, split) is evaluated once, and a repeat gets the stored answer
(``<state-dir>/evaluations/``) byte for byte, without running the model again.
Training replies carry no statistic of the training data but the DP-protected
adapters and the example count (the FedAvg weight, which the DP accounting's
sampling rate discloses anyway). And an exception anywhere inside the guard is
caught here: logged at the site with its traceback, answered with a Flower
error whose reason is :data:`~fedshift.common.protocol.SITE_ERROR`, never the
exception's text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedshift.client import integrity
from fedshift.client.site import EVAL_SPLITS
from fedshift.common.errors import FedshiftError, RoundRefusedError
from fedshift.common.io import atomic_write_bytes
from fedshift.common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DEFAULT_METRICS,
    FISHER_KEY,
    LABEL_COUNTS_KEY,
    MECHANISM_DP_FISHER,
    MECHANISM_DP_LABEL_COUNTS,
    MECHANISM_DP_MOMENTS,
    MECHANISM_DP_SGD,
    MECHANISM_FIELD,
    MECHANISM_NONE,
    MECHANISM_PUBLIC,
    MECHANISM_UNIT,
    METRICS_KEY,
    MOMENT_OUTER_KEY,
    MOMENT_SQUARE_KEY,
    MOMENT_SUM_KEY,
    PRIVACY_FIELDS,
    PRIVACY_KEY,
    REASON_FIELD,
    SECAGG_C_KEYS_FIELD,
    SECAGG_KEY,
    SECAGG_MASKED_KEY,
    SECAGG_NODES_FIELD,
    SECAGG_S_KEYS_FIELD,
    SECAGG_SEALED_FIELD,
    SECAGG_SETUP_QUERY,
    SECAGG_SHARE_QUERY,
    SECAGG_SHARES_FIELD,
    SECAGG_UNMASK_QUERY,
    SITE_ERROR,
    SITE_KEY,
    SITE_NAME_FIELD,
    SPLIT_KEY,
    STATUS_BLOCKED,
    STATUS_FIELD,
    STATUS_KEY,
    STATUS_ROUND_REFUSED,
    STATUS_SPLIT_NOT_ALLOWED,
    refusal,
    round_of,
    split_of,
)
from fedshift.common.secagg import SEALED_BYTES
from fedshift.common.secagg_primitives import KEY_BYTES
from fedshift.common.shamir import SHARE_BYTES
from fedshift.common.shift_statistics import STATISTICS_KEY

logger = logging.getLogger(__name__)

EGRESS_LOG_FILE = "egress-log.jsonl"
EVALUATIONS_DIR = "evaluations"  # in the state directory: the answer sent to each (run, round, split)

# config records the protocol needs, and the only keys they may carry
BOOKKEEPING_KEYS = {
    SITE_KEY: frozenset({SITE_NAME_FIELD}),
    PRIVACY_KEY: PRIVACY_FIELDS,
    STATUS_KEY: frozenset({STATUS_FIELD, REASON_FIELD}),
}

# statistics released by the Gaussian mechanism in the statistics stage, charged per release
DP_STATISTICS = {
    LABEL_COUNTS_KEY: MECHANISM_DP_LABEL_COUNTS,
    MOMENT_SUM_KEY: MECHANISM_DP_MOMENTS,
    MOMENT_OUTER_KEY: MECHANISM_DP_MOMENTS,
    MOMENT_SQUARE_KEY: MECHANISM_DP_MOMENTS,
}
UNPROTECTED = "none (dp=false at this site)"
# a Fisher a site sends for consolidation: its privacy record's mechanism -> what protected it
FISHER_RELEASES = {
    MECHANISM_DP_FISHER: MECHANISM_DP_FISHER,  # checked against the ledger, like the DP statistics
    MECHANISM_PUBLIC: "public data (synthetic images)",
    MECHANISM_UNIT: "no data (F = 1)",
    MECHANISM_NONE: UNPROTECTED,
}
# secure aggregation's protocol items (a query stage's record): what each one is
SECAGG_ITEMS = {
    SECAGG_C_KEYS_FIELD: "secure aggregation: this round's public key (sealing)",
    SECAGG_S_KEYS_FIELD: "secure aggregation: this round's public key (masks)",
    SECAGG_NODES_FIELD: "secure aggregation: the peers the items below belong to",
    SECAGG_SEALED_FIELD: "secure aggregation: Shamir shares, each sealed to its holder (AES-GCM)",
    SECAGG_SHARES_FIELD: "secure aggregation: revealed shares (a survivor's seed or a dropped site's key)",
}
MASKED = "masked by secure aggregation"  # added to the mechanism of a masked update
# each protocol stage's record: the fields it may carry and the size of each of their byte strings
_REVEALED_BYTES = 1 + SHARE_BYTES  # the kind byte, then the share
SECAGG_STAGES = {
    f"{MessageType.QUERY}.{SECAGG_SETUP_QUERY}": {
        SECAGG_C_KEYS_FIELD: KEY_BYTES,
        SECAGG_S_KEYS_FIELD: KEY_BYTES,
    },
    f"{MessageType.QUERY}.{SECAGG_SHARE_QUERY}": {
        SECAGG_NODES_FIELD: None,
        SECAGG_SEALED_FIELD: SEALED_BYTES,
    },
    f"{MessageType.QUERY}.{SECAGG_UNMASK_QUERY}": {
        SECAGG_NODES_FIELD: None,
        SECAGG_SHARES_FIELD: _REVEALED_BYTES,
    },
}
METRIC = "aggregate-metric (allowed by site config)"
BOOKKEEPING = "protocol bookkeeping"


@dataclass(frozen=True)
class EgressPolicy:
    """What this site lets leave."""

    dp_required: bool  # adapters must come out of DP-SGD
    allowed_metrics: frozenset[str] = DEFAULT_METRICS
    eval_splits: frozenset[str] = frozenset(EVAL_SPLITS)  # the splits an evaluate message may ask for
    num_rounds: int | None = None  # evaluate rounds must lie in 1..num_rounds (None: not checked)


def withhold_metrics(content: RecordDict, policy: EgressPolicy) -> list[str]:
    """Take out of ``content`` the aggregate metrics fedshift sends that the site's egress-metrics leaves
    out (the site narrowed them); their keys. Keys outside :data:`DEFAULT_METRICS` stay, to be blocked."""
    metrics = content.metric_records.get(METRICS_KEY)
    if metrics is None:
        return []
    withheld = sorted(k for k in metrics if k in DEFAULT_METRICS and k not in policy.allowed_metrics)
    for key in withheld:
        del metrics[key]
    return withheld


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
                MECHANISM_FIELD: mechanism,
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
    declared = str(privacy.get(MECHANISM_FIELD, "")) if privacy is not None else ""
    for name, record in content.array_records.items():
        if name == FISHER_KEY:  # the end-of-phase Fisher (EWC consolidation)
            release = FISHER_RELEASES.get(declared)
            if release is not None and not (release == UNPROTECTED and policy.dp_required):
                items.extend(_array_items(record, name, release))
            else:
                blocked.append(f"{name} (a Fisher released by {declared!r} while this site requires DP)")
            continue
        if name not in (ARRAYS_KEY, SECAGG_MASKED_KEY):
            blocked.append(f"{name} (undeclared array record)")
            continue
        masked = f", {MASKED}" if name == SECAGG_MASKED_KEY else ""
        if declared == MECHANISM_DP_SGD:
            items.extend(_array_items(record, name, MECHANISM_DP_SGD + masked))
        elif declared == MECHANISM_NONE and not policy.dp_required:
            items.extend(_array_items(record, name, UNPROTECTED + masked))
        else:
            blocked.append(f"{name} (adapters without DP-SGD while this site requires it)")
    for name, metrics in content.metric_records.items():
        for key, metric in metrics.items():
            if name == METRICS_KEY and key in policy.allowed_metrics:
                items.append(
                    {"record": name, "key": key, "bytes": _value_bytes(metric), MECHANISM_FIELD: METRIC}
                )
            else:
                blocked.append(f"{name}.{key} (metric not in the site's egress-metrics)")
    for name, config in content.config_records.items():
        for key, value in config.items():
            if name == STATISTICS_KEY and key in DP_STATISTICS:  # checked against the ledger by the guard
                size = _value_bytes(value)
                items.append({"record": name, "key": key, "bytes": size, MECHANISM_FIELD: DP_STATISTICS[key]})
            elif name == SECAGG_KEY and key in SECAGG_ITEMS:
                size = _value_bytes(value)
                items.append({"record": name, "key": key, "bytes": size, MECHANISM_FIELD: SECAGG_ITEMS[key]})
            elif key in BOOKKEEPING_KEYS.get(name, frozenset()):
                items.append(
                    {"record": name, "key": key, "bytes": _value_bytes(value), MECHANISM_FIELD: BOOKKEEPING}
                )
            else:
                blocked.append(f"{name}.{key} (not a declared bookkeeping field)")
    return items, blocked


def append_egress_log(state_dir: Path, entry: Mapping[str, Any]) -> None:
    """Append one JSON line, chained by HMAC to the line before (:mod:`fedshift.client.integrity`),
    and fsync it: a crash loses at most the line being written. A log that does not verify (an
    edited, removed or deleted line) is refused with :class:`LedgerError`, and nothing is appended."""
    state_dir.mkdir(parents=True, exist_ok=True)
    integrity.append_chained_line(state_dir / EGRESS_LOG_FILE, integrity.EGRESS_STREAM, entry, "line")


def chain_legacy_egress_log(state_dir: Path) -> None:
    """Chain a log written before fedshift chained it, now (the daemon's start) rather than at its next
    line: from then on a deleted or rolled-back log is refused."""
    integrity.chain_legacy_lines(state_dir / EGRESS_LOG_FILE, integrity.EGRESS_STREAM, "line")


def read_egress_log(state_dir: Path) -> list[dict[str, Any]]:
    """The log's entries as appended (without their MACs), after verifying the chain and the anchor."""
    records, _ = integrity.read_chained_lines(state_dir / EGRESS_LOG_FILE, integrity.EGRESS_STREAM, "line")
    return records


def uncharged_statistics(items: list[dict[str, Any]], state_dir: Path, msg: Message) -> list[str]:
    """The DP statistics among ``items`` whose release the site's ledger has no charge for in the run
    and round of ``msg`` (blocked)."""
    dp = {*DP_STATISTICS.values(), MECHANISM_DP_FISHER}
    released = {(i["record"], i["key"], i[MECHANISM_FIELD]) for i in items if i[MECHANISM_FIELD] in dp}
    if not released:
        return []
    run_id, server_round = str(msg.metadata.run_id), round_of(msg)
    from fedshift.client.ledger import open_ledger

    ledger = open_ledger(state_dir)
    return [
        f"{record}.{key} (no {mechanism!r} charge for run {run_id} round {server_round} in the ledger)"
        for record, key, mechanism in sorted(released)
        if ledger is None or ledger.find(run_id, server_round, mechanism) is None
    ]


SiteResolver = Callable[[Context], tuple[str, Path, EgressPolicy]]
Handler = Callable[[Message, Context], Message]


def _config_value(value: Any) -> Any:
    return value if isinstance(value, bool | int | float | str) else f"<{type(value).__name__}>"


def describe_request(msg: Message) -> dict[str, Any]:
    """What the server asked for, as the egress log records it: type, run, round, split, its config."""
    config = msg.content.config_records.get(CONFIG_KEY)
    values = {k: _config_value(v) for k, v in config.items()} if config is not None else {}
    try:
        server_round: int | None = round_of(msg)
    except RoundRefusedError:  # not a round number: the guard refuses the message; config shows the value
        server_round = None
    request: dict[str, Any] = {
        "type": str(msg.metadata.message_type),
        "run": str(msg.metadata.run_id),
        "round": server_round,
        CONFIG_KEY: values,
    }
    if is_evaluate(msg):
        request[SPLIT_KEY] = split_of(msg)
    return request


def is_evaluate(msg: Message) -> bool:
    return str(msg.metadata.message_type).split(".")[0] == MessageType.EVALUATE


def site_error(msg: Message) -> Message:
    """The reply to a message the site's code failed on: a Flower error with fixed words, no site text."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=SITE_ERROR), reply_to=msg)


def _answer_path(state_dir: Path, run_id: str, server_round: int, split: str) -> Path:
    return state_dir / EVALUATIONS_DIR / f"run-{int(run_id)}" / f"round-{server_round}-{split}.recorddict"


def stored_answer(state_dir: Path, run_id: str, server_round: int, split: str) -> RecordDict | None:
    """The content this site sent for (run, round, split), or ``None`` before it evaluated them."""
    path = _answer_path(state_dir, run_id, server_round, split)
    if not path.is_file():
        return None
    proto = ProtoRecordDict()
    proto.ParseFromString(path.read_bytes())
    return recorddict_from_proto(proto)


def store_answer(state_dir: Path, run_id: str, server_round: int, split: str, content: RecordDict) -> None:
    """Keep what is sent for (run, round, split), atomically, in Flower's own serialisation."""
    data = recorddict_to_proto(content).SerializeToString()
    atomic_write_bytes(_answer_path(state_dir, run_id, server_round, split), data)


def _evaluation_refusal(msg: Message, site: str, policy: EgressPolicy) -> Message | None:
    """A refusal for an evaluate message this site does not answer with numbers, else ``None``."""
    split, server_round = split_of(msg), round_of(msg)
    if split not in policy.eval_splits:
        allowed = ", ".join(sorted(policy.eval_splits)) or "none"
        reason = f"this site evaluates only the splits {allowed} (its eval-splits), not {split!r}"
        logger.warning("%s: refused an evaluation of split %r: %s", site, split, reason)
        return refusal(msg, site, STATUS_SPLIT_NOT_ALLOWED, reason)
    if policy.num_rounds is not None and not 1 <= server_round <= policy.num_rounds:
        reason = f"round {server_round} is not in this run's rounds 1..{policy.num_rounds}"
        logger.warning("%s: refused an evaluation of split %r: %s", site, split, reason)
        return refusal(msg, site, STATUS_ROUND_REFUSED, reason)
    return None


def _answer(
    msg: Message, context: Context, call_next: Handler, site: str, state_dir: Path, policy: EgressPolicy
) -> tuple[Message, dict[str, Any]]:
    """The reply as it leaves, and what the log adds about how it was made."""
    try:
        run_id, server_round = str(msg.metadata.run_id), round_of(msg)
    except RoundRefusedError as exc:  # the server's mistake: refused before any site code runs
        logger.warning("%s: refused a %s message: %s", site, msg.metadata.message_type, exc)
        return refusal(msg, site, STATUS_ROUND_REFUSED, str(exc)), {}
    if not is_evaluate(msg):
        return call_next(msg, context), {}
    refused = _evaluation_refusal(msg, site, policy)
    if refused is not None:
        return refused, {}
    split = split_of(msg)
    stored = stored_answer(state_dir, run_id, server_round, split)
    if stored is not None:
        logger.info(
            "%s: run %s round %d %s was evaluated before: sending the same answer again",
            site,
            run_id,
            server_round,
            split,
        )
        return Message(stored, reply_to=msg), {"repeat": True}
    return call_next(msg, context), {"repeat": False}


def secagg_problems(msg: Message, content: RecordDict) -> list[str]:
    """Secure aggregation's items that do not belong in a reply to ``msg``: a protocol record outside its
    stage, a field of another stage, a key or share of the wrong size, setup keys other than one of each,
    a masked update outside a training reply (blocked)."""
    kind = str(msg.metadata.message_type)
    problems = []
    if SECAGG_MASKED_KEY in content.array_records and kind != MessageType.TRAIN:
        problems.append(f"{SECAGG_MASKED_KEY} (a masked update in a reply to {kind})")
    record = content.config_records.get(SECAGG_KEY)
    if record is None:
        return problems
    fields = SECAGG_STAGES.get(kind)
    if fields is None:
        return [*problems, f"{SECAGG_KEY} (secure aggregation's record in a reply to {kind})"]
    for key, value in record.items():
        size = fields.get(key, -1)
        items = value if isinstance(value, list) else [value]
        if size == -1 or (
            size is not None and any(not isinstance(v, bytes) or len(v) != size for v in items)
        ):
            problems.append(f"{SECAGG_KEY}.{key} (not a {kind} field of {size} bytes each)")
        elif size == KEY_BYTES and len(items) != 1:
            problems.append(f"{SECAGG_KEY}.{key} (expected one key, got {len(items)})")
    return problems


def _checked(
    msg: Message, reply: Message, site: str, state_dir: Path, policy: EgressPolicy
) -> tuple[Message, list[dict[str, Any]], list[str], dict[str, Any]]:
    """What of ``reply`` may leave: the reply, its items, what was blocked, what the log adds."""
    if reply.has_error():
        if reply.error.reason != SITE_ERROR:  # an error reply made inside: its text stays here
            logger.error("%s: an error reply (%s) replaced by a generic error", site, reply.error.reason)
            reply = site_error(msg)
        return reply, [], [], {"error": SITE_ERROR}
    withheld = withhold_metrics(reply.content, policy)
    items, blocked = inspect_reply(reply.content, policy)
    blocked += uncharged_statistics(items, state_dir, msg) + secagg_problems(msg, reply.content)
    if blocked:
        logger.error("%s: egress guard blocked %s; sending a refusal instead", site, blocked)
        reason = f"egress guard blocked {len(blocked)} item(s): {blocked}"
        reply = refusal(msg, site, STATUS_BLOCKED, reason)
        items, _ = inspect_reply(reply.content, policy)
    return reply, items, blocked, {"withheld": withheld} if withheld else {}


def egress_guard(resolve: SiteResolver) -> Callable[[Message, Context, Handler], Message]:
    """The client mod; ``resolve`` gives the site's name, state directory and policy from the context."""

    def mod(msg: Message, context: Context, call_next: Handler) -> Message:
        try:
            site, state_dir, policy = resolve(context)
        except FedshiftError as exc:  # the site's own settings: it has no state directory to log in
            logger.error("The site's settings are not valid; sending a generic error: %s", exc)
            return site_error(msg)
        except Exception:
            logger.exception("The site's settings cannot be read; sending a generic error")
            return site_error(msg)
        request = describe_request(msg)
        where = f"{site}: {request['type']} of run {request['run']} round {request['round']} failed"
        try:
            reply, extra = _answer(msg, context, call_next, site, state_dir, policy)
            reply, items, blocked, checks = _checked(msg, reply, site, state_dir, policy)
            extra = {**extra, **checks}
        except FedshiftError as exc:  # a clear one-line reason (config, ledger, data): no traceback
            logger.error("%s, the server gets a generic error: %s", where, exc)
            reply, items, blocked, extra = site_error(msg), [], [], {"error": SITE_ERROR}
        except Exception:  # a defect: the traceback, here only
            logger.exception("%s; the server gets a generic error", where)
            reply, items, blocked, extra = site_error(msg), [], [], {"error": SITE_ERROR}
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run": request["run"],
            "round": request["round"],
            "stage": request["type"],
            **({SPLIT_KEY: request[SPLIT_KEY]} if SPLIT_KEY in request else {}),
            "request": request,
            SITE_KEY: site,
            "items": items,
            "blocked": blocked,
            "bytes": int(sum(i["bytes"] for i in items)),
            **extra,
        }
        try:
            if extra.get("repeat") is False and not reply.has_error():  # evaluated now: kept before it leaves
                store_answer(state_dir, request["run"], request["round"], request[SPLIT_KEY], reply.content)
            append_egress_log(state_dir, entry)
        except Exception:  # nothing leaves that the log does not record
            logger.exception("%s: the egress log or the stored answer cannot be written; nothing sent", site)
            return site_error(msg)
        return reply

    return mod
