"""The server's side of secure aggregation (SecAgg+, :mod:`fedshift.common.secagg`), one round at a time.

:class:`SecureRound` runs the protocol's query stages around Flower's training round:
:meth:`~SecureRound.prepare` (keys, then sealed shares, before the training messages leave) and
:meth:`~SecureRound.average` (the unmasking, after the masked updates came back). The server
routes what it cannot read and learns only the sum of the survivors' weighted updates; a round
with fewer live sites than the threshold is refused, never unmasked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedshift.common.aggregation_config import AggregationConfig, secagg_params
from fedshift.common.protocol import (
    CONFIG_KEY,
    METRICS_KEY,
    SECAGG_C_KEYS_FIELD,
    SECAGG_DROPPED_FIELD,
    SECAGG_KEY,
    SECAGG_MASKED_FIELD,
    SECAGG_MASKED_KEY,
    SECAGG_NODES_FIELD,
    SECAGG_S_KEYS_FIELD,
    SECAGG_SEALED_FIELD,
    SECAGG_SETUP_QUERY,
    SECAGG_SHARE_QUERY,
    SECAGG_SHARES_FIELD,
    SECAGG_SURVIVORS_FIELD,
    SECAGG_U1_FIELD,
    SECAGG_UNMASK_QUERY,
    SECAGG_WEIGHT_SCALE_FIELD,
    SERVER_ROUND_KEY,
    STATUS_KEY,
    WEIGHT_KEY,
    secagg_bytes,
    secagg_node_field,
    secagg_nodes,
)
from fedshift.common.secagg import PublicKeys, SecAggError, SecAggServer
from fedshift.server.enrollment import SiteNames
from fedshift.server.validation import weight_problem

logger = logging.getLogger(__name__)


T = TypeVar("T")
_NODE_IDS = 2**64  # Flower's node ids are unsigned 64-bit


def _public_keys(record: ConfigRecord) -> PublicKeys:
    """A setup reply's record: one sealing key and one mask key (:class:`PublicKeys` checks their size)."""
    c, s = secagg_bytes(record, SECAGG_C_KEYS_FIELD), secagg_bytes(record, SECAGG_S_KEYS_FIELD)
    if len(c) != 1 or len(s) != 1:
        raise ValueError(f"expected one key of each kind, got {len(c)} and {len(s)}")
    return PublicKeys(c=c[0], s=s[0])


def _per_node(field: str) -> Callable[[ConfigRecord], dict[int, bytes]]:
    """The parser of a record that gives one byte string of ``field`` per node id."""

    def parse(record: ConfigRecord) -> dict[int, bytes]:
        nodes = secagg_nodes(record, SECAGG_NODES_FIELD)
        if any(not 0 <= n < _NODE_IDS for n in nodes) or len(set(nodes)) != len(nodes):
            raise ValueError("node ids outside 0..2**64-1 or repeated")
        return dict(zip(nodes, secagg_bytes(record, field), strict=True))

    return parse


class SecureRound:
    """One round's SecAgg+ between the server and the sites it sampled."""

    def __init__(
        self,
        grid: Grid,
        cfg: AggregationConfig,
        timeout: float,
        names: SiteNames,
        server_round: int,
        max_weight: Callable[[str], int],
    ) -> None:
        self.grid, self.names, self.round, self.timeout = grid, names, server_round, timeout
        self.server = SecAggServer(secagg_params(cfg, server_round))
        self.max_weight = max_weight  # site name -> the largest num-examples it may claim
        self.weights: dict[int, int] = {}  # node -> num-examples it claimed at setup
        self.scale = 1.0  # the round's total weight: each site sends weight / scale times its update

    def _ask(
        self, contents: Mapping[int, RecordDict], stage: str, parse: Callable[[ConfigRecord], T]
    ) -> dict[int, T]:
        """Send each node its content for ``stage``; every usable reply's protocol record, parsed.

        A reply that is not usable (an error, a refusal, a record ``parse`` refuses) leaves out its
        site, logged; the round goes on without it.
        """
        messages = [
            Message(content, dst_node_id=node, message_type=f"{MessageType.QUERY}.{stage}")
            for node, content in contents.items()
        ]
        usable: dict[int, T] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            name, problem = self.names.resolve(reply)
            if problem is None and reply.has_error():
                problem = f"the site reported an error: {reply.error.reason}"
            elif problem is None and node not in contents:
                problem = "a reply from a site this stage did not ask"
            elif problem is None and node in usable:
                problem = "a second reply from the same site"
            elif problem is None and SECAGG_KEY not in reply.content.config_records:
                status = reply.content.config_records.get(STATUS_KEY)
                problem = (
                    f"the site sent no protocol record ({dict(status) if status is not None else 'nothing'})"
                )
            if problem is None and stage == SECAGG_SETUP_QUERY:
                problem = self._note_weight(node, name, reply)
            if problem is None:
                try:
                    usable[node] = parse(reply.content.config_records[SECAGG_KEY])
                except (SecAggError, ValueError, TypeError, IndexError, OverflowError) as exc:
                    problem = f"its protocol record is malformed ({exc})"
            if problem is not None:
                logger.warning("Round %d %s: left out %s: %s", self.round, stage, name, problem)
        return usable

    def _note_weight(self, node: int, name: str, reply: Message) -> str | None:
        metrics = reply.content.metric_records.get(METRICS_KEY)
        weight = metrics.get(WEIGHT_KEY) if metrics is not None else None
        problem = weight_problem(weight, self.max_weight(name))
        if problem is None:
            self.weights[node] = int(weight)  # type: ignore[arg-type]
        return problem

    def _content(self, record: Mapping[str, object]) -> RecordDict:
        return RecordDict(
            {
                CONFIG_KEY: ConfigRecord({SERVER_ROUND_KEY: self.round}),
                SECAGG_KEY: ConfigRecord(dict(record)),  # type: ignore[arg-type]
            }
        )

    def prepare(self, messages: list[Message]) -> list[Message]:
        """The training messages of the sites whose shares went round, each with the shares sealed to it.

        Raises :class:`SecAggError` when too few sites are left to go on.
        """
        nodes = [m.metadata.dst_node_id for m in messages]
        keys = self._ask({n: self._content({}) for n in nodes}, SECAGG_SETUP_QUERY, _public_keys)
        wanted = self.server.add_keys(keys)  # node -> the peers' keys it needs
        share_contents = {}
        for node, peers in wanted.items():
            order = sorted(peers)
            share_contents[node] = self._content(
                {
                    SECAGG_NODES_FIELD: secagg_node_field(order),
                    SECAGG_C_KEYS_FIELD: [peers[p].c for p in order],
                    SECAGG_S_KEYS_FIELD: [peers[p].s for p in order],
                }
            )
        sealed = self._ask(share_contents, SECAGG_SHARE_QUERY, _per_node(SECAGG_SEALED_FIELD))
        routed = self.server.route(sealed)  # recipient -> {sender: sealed share}
        u1 = sorted(self.server.u1)
        self.scale = float(sum(self.weights[n] for n in u1))
        kept = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.server.u1:
                continue
            senders = sorted(routed.get(node, {}))
            content = RecordDict(dict(msg.content.items()))  # Flower's messages share one content
            content[SECAGG_KEY] = ConfigRecord(
                {
                    SECAGG_NODES_FIELD: secagg_node_field(senders),
                    SECAGG_SEALED_FIELD: [routed[node][s] for s in senders],
                    SECAGG_U1_FIELD: secagg_node_field(u1),
                    SECAGG_WEIGHT_SCALE_FIELD: self.scale,
                }
            )
            msg = Message(content, dst_node_id=node, message_type=msg.metadata.message_type)
            kept.append(msg)
        logger.info(
            "Round %d: secure aggregation set up with %d of %d sites", self.round, len(kept), len(nodes)
        )
        return kept

    def weight_of(self, node: int) -> int | None:
        """The num-examples ``node`` claimed at setup (its training reply must claim the same)."""
        return self.weights.get(node)

    def average(self, replies: Mapping[int, Message]) -> np.ndarray:
        """The weighted mean update of the sites whose masked updates arrived (``replies``: node -> reply).

        Raises :class:`SecAggError` when fewer sites than the threshold are left to unmask it.
        """
        masked = {
            n: m.content.array_records[SECAGG_MASKED_KEY][SECAGG_MASKED_FIELD].numpy()
            for n, m in replies.items()
        }
        survivors, dropped = self.server.unmask_request(masked)
        record = {
            SECAGG_SURVIVORS_FIELD: secagg_node_field(sorted(survivors)),
            SECAGG_DROPPED_FIELD: secagg_node_field(sorted(dropped)),
        }
        contents = {n: self._content(record) for n in sorted(survivors)}
        revealed = self._ask(contents, SECAGG_UNMASK_QUERY, _per_node(SECAGG_SHARES_FIELD))
        total = self.server.aggregate(revealed)
        weight = sum(self.weights[n] for n in survivors) / self.scale
        logger.info(
            "Round %d: secure aggregation unmasked the sum of %d sites (%d dropped after sharing)",
            self.round,
            len(survivors),
            len(dropped),
        )
        return np.asarray(total / weight)


__all__ = ["SecAggError", "SecureRound"]
