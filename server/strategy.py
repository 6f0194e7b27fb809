"""FedAvg over the shared adapters, with reply validation, a server optimizer, checkpoints and a history.

Only ``configure_*`` and ``aggregate_*`` are overridden: the round loop stays Flower's.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedshift.common.aggregation_config import AggregationConfig
from fedshift.common.checkpoint import save_checkpoint
from fedshift.common.model import ModelConfig
from fedshift.common.protocol import (
    ARRAYS_KEY,
    MECHANISM_DP_SGD,
    MECHANISM_FIELD,
    METRICS_KEY,
    PRIVACY_KEY,
    REASON_FIELD,
    SECAGG_MASKED_KEY,
    STATUS_BUDGET_EXHAUSTED,
    STATUS_FIELD,
    STATUS_KEY,
    STATUS_REFUSED,
    UNDECLARED,
    WEIGHT_KEY,
)
from fedshift.common.update_vector import unflatten, vector_length
from fedshift.server.enrollment import SiteNames
from fedshift.server.robust import bound_update, rule_strategy
from fedshift.server.secure_aggregation import SecAggError, SecureRound
from fedshift.server.server_optimizer import META_KEY, ServerOptimizerState, ServerParams, server_step
from fedshift.server.validation import (
    MAX_NUM_EXAMPLES,
    ArraySpec,
    aggregation_view,
    arrays_problem,
    reply_problem,
)

logger = logging.getLogger(__name__)
# a refusal kind of the coordinator's own: the site did not answer, and the SuperLink's error reply stood in
NO_REPLY = "no-reply"

TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE  # a history entry's stage: the message type


@dataclass
class RunHistory:
    """Per-round, per-site facts the server saw (JSON-able)."""

    train: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)  # sites that sent no update, and why
    privacy: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)  # round -> site -> accounting

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": {str(r): v for r, v in self.train.items()},
            "evaluate": {str(r): v for r, v in self.evaluate.items()},
            "rejected": self.rejected,
            "refused": self.refused,
            "privacy": {str(r): v for r, v in self.privacy.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], up_to_round: int) -> RunHistory:
        """The history :meth:`to_dict` wrote, without anything after ``up_to_round`` (for a resumed run)."""

        def rounds(key: str) -> dict[int, Any]:
            return {int(r): v for r, v in d.get(key, {}).items() if int(r) <= up_to_round}

        return cls(
            train=rounds("train"),
            evaluate=rounds("evaluate"),
            rejected=[e for e in d.get("rejected", []) if int(e["round"]) <= up_to_round],
            refused=[e for e in d.get("refused", []) if int(e["round"]) <= up_to_round],
            privacy=rounds("privacy"),
        )


def _status_of(msg: Message) -> tuple[str, str] | None:
    """``(status, reason)`` when a site says why it sends no update, else ``None``."""
    if msg.has_error() or STATUS_KEY not in msg.content.config_records:
        return None
    record = msg.content.config_records[STATUS_KEY]
    return str(record.get(STATUS_FIELD, STATUS_REFUSED)), str(record.get(REASON_FIELD, ""))


def _privacy_of(msg: Message) -> dict[str, Any]:
    record = msg.content.config_records.get(PRIVACY_KEY)
    return {k: v for k, v in record.items()} if record is not None else {MECHANISM_FIELD: UNDECLARED}


def _claim_problem(secure: SecureRound, msg: Message) -> str | None:
    """Why a masked reply's weight is not the one its site claimed at setup, or ``None``."""
    claimed = secure.weight_of(msg.metadata.src_node_id)
    weight = msg.content.metric_records[METRICS_KEY].get(WEIGHT_KEY)
    if claimed is None:
        return "a masked update from a site that did not set up secure aggregation this round"
    if weight != claimed:
        return f"claims {WEIGHT_KEY} {weight!r}, but claimed {claimed} at secure aggregation's setup"
    return None


def metrics_of(msg: Message) -> dict[str, float]:
    """A checked reply's metrics as floats (lists, which a check refuses, left out)."""
    record = msg.content.metric_records[METRICS_KEY]
    return {k: float(v) for k, v in record.items() if not isinstance(v, list)}


class AdapterFedAvg(FedAvg):
    """FedAvg that validates every reply, checkpoints every round and keeps a history.

    The aggregation rule's result on the accepted replies is then stepped by the
    server optimizer (server-optimizer: fedavg takes it as is), and the
    optimizer's state is saved with the round's adapters; ``server_state``
    continues a resumed federation's.

    A resumed federation (``first_round`` > 1) numbers its rounds on from the
    checkpoint: Flower's loop counts 1, 2, ... and every ``configure_*`` /
    ``aggregate_*`` adds ``first_round - 1``, so sites, checkpoints, history and
    privacy ledgers see the federation's round numbers.
    """

    def __init__(
        self,
        *,
        expected: dict[str, ArraySpec],
        checkpoint_dir: str | Path,
        model_config: ModelConfig,
        num_rounds: int,
        min_nodes: int = 2,
        first_round: int = 1,
        history: RunHistory | None = None,
        train_records: Mapping[str, ArrayRecord] | None = None,
        names: SiteNames | None = None,
        max_num_examples: int = MAX_NUM_EXAMPLES,
        aggregation: AggregationConfig | None = None,
        reply_timeout: float = 3600.0,
        server_state: ServerOptimizerState | None = None,
    ) -> None:
        flower = {
            "min_train_nodes": min_nodes,
            "min_evaluate_nodes": min_nodes,
            "min_available_nodes": min_nodes,
            "weighted_by_key": WEIGHT_KEY,
            "arrayrecord_key": ARRAYS_KEY,
        }
        super().__init__(**flower)  # type: ignore[arg-type]
        self.aggregation = aggregation if aggregation is not None else AggregationConfig()
        self.rule = rule_strategy(self.aggregation, **flower)  # the arithmetic: mean, median, trimmed mean
        self.server_params = ServerParams.from_config(self.aggregation)  # then the step: server-optimizer
        self.server_state = (
            server_state if server_state is not None else ServerOptimizerState(self.server_params.name)
        )
        self.reply_timeout = reply_timeout
        self._global: dict[str, Any] = {}  # the round's global adapters (numpy), the updates' reference
        self._secure: SecureRound | None = None  # the round's secure aggregation (secure-aggregation)
        self.expected = expected
        self.checkpoint_dir = Path(checkpoint_dir)
        self.model_config = model_config
        self.num_rounds = num_rounds
        self.history = history if history is not None else RunHistory()
        self.round_offset = first_round - 1
        self.exhausted: dict[int, str] = {}  # node id -> site name, left out of later training rounds
        self.train_records = dict(train_records or {})  # sent with every training message (EWC anchor)
        self._warned_no_dp: set[str] = set()
        self.names = names if names is not None else SiteNames()  # node id -> site (enrolled or first claim)
        self.max_num_examples = max_num_examples  # cap on a reply's FedAvg weight (max-num-examples)
        self._sent: list[Message] = []  # this stage's messages to the sites, as Flower sent them

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling, minus the sites whose privacy budget is spent."""
        server_round += self.round_offset
        self._global = {k: v.numpy() for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        keep = [m for m in messages if m.metadata.dst_node_id not in self.exhausted]
        for msg in keep:
            for name, record in self.train_records.items():
                msg.content.array_records[name] = record
        if len(keep) < len(messages):
            left_out = sorted(
                self.exhausted[m.metadata.dst_node_id]
                for m in messages
                if m.metadata.dst_node_id in self.exhausted
            )
            logger.info("Round %d: left out %s (privacy budget spent)", server_round, left_out)
        if self.aggregation.secure and keep:
            keep = self._secure_setup(server_round, grid, keep)
        self._sent = keep  # Flower gives each its message id when it sends it (see _flower_error)
        return keep

    def max_weight(self, name: str) -> int:
        """The largest num-examples ``name`` may claim: max-num-examples, or its enrolled cap when lower."""
        own = self.names.max_num_examples(name)
        return min(self.max_num_examples, own) if own is not None else self.max_num_examples

    def _secure_setup(self, server_round: int, grid: Grid, messages: list[Message]) -> list[Message]:
        """Secure aggregation's stages before training; no training message when the round is refused."""
        self._secure = SecureRound(
            grid, self.aggregation, self.reply_timeout, self.names, server_round, self.max_weight
        )
        try:
            return self._secure.prepare(messages)
        except SecAggError as exc:
            self._secure_refused(server_round, str(exc))
            return []

    def _secure_refused(self, server_round: int, reason: str) -> None:
        logger.error("Round %d: secure aggregation refused, nothing aggregated: %s", server_round, reason)
        self.history.refused.append(
            {"round": server_round, "stage": "secure-aggregation", "site": None, REASON_FIELD: reason}
        )
        self._secure = None

    def _accept(self, server_round: int, replies: Iterable[Message], stage: str) -> list[tuple[str, Message]]:
        """The replies to aggregate, each with its site's name; every other reply is logged and recorded.

        A reply is left out when its node is not a site of this federation (or
        claims another site's name) or when it fails :func:`reply_problem`; never
        over its metric keys (see :meth:`_for_flower`).
        """
        checked: list[tuple[str, Message]] = []
        accepted: set[str] = set()  # the names in checked (a set: one look-up per reply, not a scan)
        secure = self._secure if stage == TRAIN else None  # masked updates this round
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}  # once per stage
        for msg in replies:
            lost = self._flower_error(msg, sent_to)
            if lost is not None:  # no reply came from the site: Flower answered for it
                node, name, reason = lost
                self._refused(server_round, stage, msg, name, NO_REPLY, reason, node=node)
                continue
            name, problem = self.names.resolve(msg)
            if problem is None and name in accepted:
                problem = f"a second reply from {name} in this round"
            status = _status_of(msg) if problem is None else None
            if status is not None:
                self._refused(server_round, stage, msg, name, *status)
                continue
            if problem is None:
                problem = reply_problem(
                    msg,
                    self.expected,
                    with_arrays=stage == TRAIN,
                    max_weight=self.max_weight(name),
                    masked_length=vector_length(self._global) if secure is not None else None,
                )
            if problem is None and secure is not None:
                problem = _claim_problem(secure, msg)
            if problem is None:
                checked.append((name, msg))
                accepted.add(name)
            else:
                self._reject(server_round, stage, msg, name, problem)
        return checked

    def _flower_error(self, msg: Message, sent_to: Mapping[str, int]) -> tuple[int, str, str] | None:
        """``(node, site, reason)`` when ``msg`` is the SuperLink's own error reply for a site that did not
        answer (offline, its upload expired, its ClientApp crashed), named by the message it answers
        (``sent_to``: this stage's message ids -> the node each was sent to).

        Such a reply comes from the SuperLink's node id, not the site's, so it would otherwise read as an
        unenrolled sender."""
        if not msg.has_error() or msg.metadata.src_node_id != SUPERLINK_NODE_ID:
            return None
        node = sent_to.get(msg.metadata.reply_to_message_id)
        if node is None:
            return None  # not a reply to this stage's messages: left to resolve()
        return node, self.names.name_of(node), f"{msg.error.reason} (Flower error {msg.error.code})"

    def _for_flower(self, server_round: int, stage: str, good: list[tuple[str, Message]]) -> list[Message]:
        """The accepted replies as Flower's FedAvg averages them: every reply's arrays, the shared metrics.

        A metric that not every accepted reply carries is left out of the
        aggregate (and logged), so Flower never sees differing key sets.
        """
        copies, left_out = aggregation_view(good, with_arrays=stage == TRAIN)
        if left_out:
            logger.warning(
                "Round %d %s: metrics not in every reply, left out of the aggregate metrics: %s",
                server_round,
                stage,
                ", ".join(f"{name} {keys}" for name, keys in sorted(left_out.items())),
            )
        return copies

    def _refused(
        self,
        server_round: int,
        stage: str,
        msg: Message,
        name: str,
        kind: str,
        reason: str,
        node: int | None = None,  # the site's node (default: the reply's sender)
    ) -> None:
        node = msg.metadata.src_node_id if node is None else node
        logger.warning("Round %d %s: %s sent no update (%s): %s", server_round, stage, name, kind, reason)
        self.history.refused.append(
            {
                "round": server_round,
                "stage": stage,
                "node": node,
                "site": name,
                STATUS_FIELD: kind,
                REASON_FIELD: reason,
            }
        )
        if kind == STATUS_BUDGET_EXHAUSTED:
            self.exhausted[node] = name

    def _reject(self, server_round: int, stage: str, msg: Message, name: str, problem: str) -> None:
        node = msg.metadata.src_node_id
        logger.warning("Round %d %s: left out the reply of %s: %s", server_round, stage, name, problem)
        self.history.rejected.append(
            {"round": server_round, "stage": stage, "node": node, "site": name, REASON_FIELD: problem}
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        good = self._accept(server_round, replies, TRAIN)
        privacy = {}  # every accepted reply's: its site spent the budget even if the bound rejects it
        for name, msg in good:
            privacy[name] = _privacy_of(msg)
            if privacy[name].get(MECHANISM_FIELD) != MECHANISM_DP_SGD and name not in self._warned_no_dp:
                self._warned_no_dp.add(name)
                logger.warning("%s sends adapters WITHOUT differential privacy (%s)", name, privacy[name])
        secure, self._secure = self._secure, None
        kept = good if secure is not None else self._bounded(server_round, good)
        per_site = {}  # the sites whose updates are aggregated
        for name, msg in kept:
            site_metrics = metrics_of(msg)
            sent = msg.content.array_records.get(ARRAYS_KEY) or msg.content.array_records[SECAGG_MASKED_KEY]
            site_metrics["bytes-sent"] = float(sent.count_bytes())
            per_site[name] = site_metrics
        self.history.train[server_round] = per_site
        self.history.privacy[server_round] = privacy
        if secure is not None:
            arrays, metrics = self._secure_aggregate(server_round, secure, good)
        else:
            self._warn_no_trim(server_round, len(kept))
            arrays, metrics = self.rule.aggregate_train(
                server_round, self._for_flower(server_round, TRAIN, kept)
            )
        if arrays is None:
            return None, metrics
        problem = arrays_problem(arrays, self.expected)  # checked before the step and anything written
        state = self.server_state
        if problem is None:
            stepped, state = self._server_step(arrays)
            if stepped is not arrays:  # a step that overflowed is refused too (fedavg: the aggregate as is)
                problem = arrays_problem(stepped, self.expected)
            arrays = stepped
        if problem is not None:
            logger.error(
                "Round %d: the aggregate is unusable (%s); no checkpoint written, the previous adapters stay",
                server_round,
                problem,
            )
            return None, metrics
        save_checkpoint(
            self.checkpoint_dir,
            {k: v.numpy() for k, v in arrays.items()},
            self.model_config,
            server_round,
            extra={
                "sites": sorted(per_site),
                "history": self.history.to_dict(),
                META_KEY: state.to_meta(self.server_params),
            },
            state=state.to_arrays(),
        )
        self.server_state = state  # only once the round is written: a refused round keeps the old state
        return arrays, metrics

    def _server_step(self, aggregate: ArrayRecord) -> tuple[ArrayRecord, ServerOptimizerState]:
        """The new global adapters from the round's (checked) aggregate, and the optimizer's next state."""
        if self.server_params.name == "fedavg":  # the aggregate as is
            return aggregate, self.server_state
        new, state = server_step(
            self.server_params, self.server_state, self._global, {k: v.numpy() for k, v in aggregate.items()}
        )
        return ArrayRecord({k: Array(v) for k, v in new.items()}), state

    def _warn_no_trim(self, server_round: int, count: int) -> None:
        cut = int(self.aggregation.trim_fraction * count)  # Flower's FedTrimmedAvg cuts int(beta * n) per end
        if self.aggregation.rule == "trimmed-mean" and cut == 0:
            logger.warning(
                "Round %d: trimmed-mean with trim-fraction %g cuts nothing from %d updates (a plain "
                "unweighted mean); raise trim-fraction to at least %g",
                server_round,
                self.aggregation.trim_fraction,
                count,
                1 / max(count, 1),
            )

    def _bounded(self, server_round: int, good: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
        """The replies within update-norm-bound: clipped to it, or the rest rejected (update-norm-action)."""
        cfg = self.aggregation
        if cfg.norm_bound == 0:
            return good
        kept = []
        for name, msg in good:
            update = {k: v.numpy() for k, v in msg.content.array_records[ARRAYS_KEY].items()}
            arrays, problem = bound_update(update, self._global, cfg.norm_bound, cfg.norm_action)
            if arrays is None:
                self._reject(server_round, TRAIN, msg, name, str(problem))
                continue
            if any(arrays[k] is not update[k] for k in update):
                logger.warning("Round %d: the update of %s clipped to update-norm-bound", server_round, name)
                view = copy.copy(msg)  # the reply itself stays as it came (the history's)
                view.content = RecordDict(
                    {
                        METRICS_KEY: msg.content.metric_records[METRICS_KEY],
                        ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    }
                )
                msg = view
            kept.append((name, msg))
        return kept

    def _secure_aggregate(
        self, server_round: int, secure: SecureRound, good: list[tuple[str, Message]]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The global adapters plus the unmasked weighted mean update, and the replies' metrics."""
        copies, _ = aggregation_view(good, with_arrays=False)
        metrics = self.train_metrics_aggr_fn([m.content for m in copies], WEIGHT_KEY) if copies else None
        try:
            mean = secure.average({msg.metadata.src_node_id: msg for _, msg in good})
        except SecAggError as exc:
            self._secure_refused(server_round, str(exc))
            return None, metrics
        arrays = unflatten(mean, self._global)
        return ArrayRecord({k: Array(v) for k, v in arrays.items()}), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = list(super().configure_evaluate(server_round + self.round_offset, arrays, config, grid))
        return self._sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        good = self._accept(server_round, replies, EVALUATE)
        per_site = {name: metrics_of(m) for name, m in good}
        self.history.evaluate[server_round] = per_site
        aucs = " | ".join(f"{name} {m.get('auc', math.nan):.3f}" for name, m in sorted(per_site.items()))
        logger.info("Round %d/%d validation AUC: %s", server_round, self.num_rounds, aucs)
        return super().aggregate_evaluate(server_round, self._for_flower(server_round, EVALUATE, good))
