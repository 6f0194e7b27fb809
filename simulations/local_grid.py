"""A Flower Grid on one process: every message goes to its node's in-process ClientApp.

For benchmarks and tests of one round's messages without Ray or a SuperLink. Each node keeps its
own Flower :class:`~flwr.app.Context` between messages, as a SuperNode does (secure aggregation
keeps a round's secrets there). Node ids are unsigned 64-bit, as Flower draws them; node ``k``
is simulated site ``k`` (its ``partition-id``). The real engines are :mod:`fedshift.simulations.engine`
(Ray) and :mod:`fedshift.deploy` (SuperLink and SuperNodes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedshift.client.app import make_client_app
from fedshift.common.config import FederationConfig
from fedshift.common.model import build_model
from fedshift.common.protocol import SERVER_ROUND_KEY
from fedshift.server.strategy import AdapterFedAvg
from fedshift.server.validation import expected_specs

FIRST_NODE = 2**63 + 5  # above the signed 64-bit range: ids must travel as Flower's uint64


def online(node: int, msg: Message) -> bool:
    """No node drops any message (the default of :class:`LocalGrid`'s ``drop``)."""
    return False


class LocalGrid:
    """Delivers each message to its node's ClientApp in this process; ``drop(node, message)`` True: the
    node is offline for that message (no reply)."""

    def __init__(
        self, run_config: dict[str, Any], nodes: int, drop: Callable[[int, Message], bool] = online
    ) -> None:
        self.app = make_client_app()
        self.drop = drop
        self.contexts = {
            FIRST_NODE + k: Context(
                run_id=1,
                node_id=FIRST_NODE + k,
                node_config={"partition-id": k},
                state=RecordDict(),
                run_config=run_config,
            )
            for k in range(nodes)
        }
        self.run = type("Run", (), {"run_id": 1})()

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if not self.drop(node, msg):
                replies.append(self.app(msg, self.contexts[node]))  # a reply comes from its message's node
        return replies


def one_round(
    run_config: dict[str, Any],
    nodes: int,
    drop: Callable[[int, Message], bool] = online,
    grid_class: type[LocalGrid] | None = None,
) -> tuple[AdapterFedAvg, float]:
    """Training round 1 of the sites under the run config's ``sites-root`` through the real strategy
    (its checkpoint in ``run-dir``); the strategy after it and the round's wall-clock seconds."""
    fed = FederationConfig.from_run_config(run_config)
    grid = (grid_class or LocalGrid)(run_config, nodes, drop)
    arrays = ArrayRecord(build_model(fed.model).shared_state_dict())
    strategy = AdapterFedAvg(
        expected=expected_specs(arrays),
        checkpoint_dir=Path(fed.run_dir),
        model_config=fed.model,
        num_rounds=fed.num_rounds,
        min_nodes=fed.min_nodes,
        aggregation=fed.aggregation,
        reply_timeout=fed.reply_timeout,
    )
    started = time.perf_counter()
    config = ConfigRecord({SERVER_ROUND_KEY: 1})
    messages = list(strategy.configure_train(1, arrays, config, grid))  # type: ignore[arg-type]
    strategy.aggregate_train(1, grid.send_and_receive(messages))
    return strategy, time.perf_counter() - started
