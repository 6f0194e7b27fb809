"""FedAvg over the shared adapters, with reply validation, checkpoints and a history.

Only ``aggregate_*`` are overridden: the round loop stays Flower's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedshift.common.checkpoint import save_checkpoint
from fedshift.common.model import ModelConfig
from fedshift.common.protocol import ARRAYS_KEY, METRICS_KEY, PRIVACY_KEY, SITE_KEY, STATUS_KEY, WEIGHT_KEY
from fedshift.server.validation import ArraySpec, reply_problem

logger = logging.getLogger(__name__)


def site_name(msg: Message) -> str:
    """The display name a site put in its reply, else its node id."""
    record = msg.content.config_records.get(SITE_KEY) if not msg.has_error() else None
    name = record.get("name") if record is not None else None
    return str(name) if name else f"node-{msg.metadata.src_node_id}"


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
    return str(record.get("status", "refused")), str(record.get("reason", ""))


def _privacy_of(msg: Message) -> dict[str, Any]:
    record = msg.content.config_records.get(PRIVACY_KEY)
    return {k: v for k, v in record.items()} if record is not None else {"mechanism": "undeclared"}


def _metrics_of(msg: Message) -> dict[str, float]:
    record = msg.content.metric_records[METRICS_KEY]
    return {k: float(v) for k, v in record.items() if not isinstance(v, list)}


class AdapterFedAvg(FedAvg):
    """FedAvg that validates every reply, checkpoints every round and keeps a history.

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
    ) -> None:
        super().__init__(
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes,
            min_available_nodes=min_nodes,
            weighted_by_key=WEIGHT_KEY,
            arrayrecord_key=ARRAYS_KEY,
        )
        self.expected = expected
        self.checkpoint_dir = Path(checkpoint_dir)
        self.model_config = model_config
        self.num_rounds = num_rounds
        self.history = history if history is not None else RunHistory()
        self.round_offset = first_round - 1
        self.exhausted: dict[int, str] = {}  # node id -> site name, left out of later training rounds
        self.train_records = dict(train_records or {})  # sent with every training message (EWC anchor)
        self._warned_no_dp: set[str] = set()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling, minus the sites whose privacy budget is spent."""
        server_round += self.round_offset
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
        return keep

    def _accept(self, server_round: int, replies: Iterable[Message], stage: str) -> list[Message]:
        good = []
        for msg in replies:
            status = _status_of(msg)
            if status is not None:
                kind, reason = status
                node = msg.metadata.src_node_id
                logger.warning(
                    "Round %d %s: %s sent no update (%s): %s",
                    server_round,
                    stage,
                    site_name(msg),
                    kind,
                    reason,
                )
                self.history.refused.append(
                    {
                        "round": server_round,
                        "stage": stage,
                        "node": node,
                        "site": site_name(msg),
                        "status": kind,
                        "reason": reason,
                    }
                )
                if kind == "budget-exhausted":
                    self.exhausted[node] = site_name(msg)
                continue
            problem = reply_problem(msg, self.expected, with_arrays=stage == "train")
            if problem is None:
                good.append(msg)
                continue
            node = msg.metadata.src_node_id
            logger.warning(
                "Round %d %s: left out the reply of %s: %s",
                server_round,
                stage,
                site_name(msg),
                problem,
            )
            self.history.rejected.append(
                {
                    "round": server_round,
                    "stage": stage,
                    "node": node,
                    "site": site_name(msg),
                    "reason": problem,
                }
            )
        return good

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        good = self._accept(server_round, replies, "train")
        per_site = {}
        privacy = {}
        for msg in good:
            name = site_name(msg)
            site_metrics = _metrics_of(msg)
            site_metrics["bytes-sent"] = float(msg.content.array_records[ARRAYS_KEY].count_bytes())
            per_site[name] = site_metrics
            privacy[name] = _privacy_of(msg)
            if privacy[name].get("mechanism") != "dp-sgd" and name not in self._warned_no_dp:
                self._warned_no_dp.add(name)
                logger.warning("%s sends adapters WITHOUT differential privacy (%s)", name, privacy[name])
        self.history.train[server_round] = per_site
        self.history.privacy[server_round] = privacy
        arrays, metrics = super().aggregate_train(server_round, good)
        if arrays is not None:
            save_checkpoint(
                self.checkpoint_dir,
                {k: v.numpy() for k, v in arrays.items()},
                self.model_config,
                server_round,
                extra={"sites": sorted(per_site), "history": self.history.to_dict()},
            )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        good = self._accept(server_round, replies, "evaluate")
        per_site = {site_name(m): _metrics_of(m) for m in good}
        self.history.evaluate[server_round] = per_site
        aucs = " | ".join(f"{name} {m.get('auc', math.nan):.3f}" for name, m in sorted(per_site.items()))
        logger.info("Round %d/%d validation AUC: %s", server_round, self.num_rounds, aucs)
        return super().aggregate_evaluate(server_round, good)
