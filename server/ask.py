"""Ask every connected site one thing: one message per site, and only the replies that pass a check.

The final evaluation, the statistics stage and the Fisher consolidation all ask
through :func:`ask_sites`; the round loop's replies are Flower's, screened by
:class:`~fedshift.server.strategy.AdapterFedAvg`. A reply is kept when its node
is a site of this federation (:class:`~fedshift.server.enrollment.SiteNames`),
it is that site's first reply, and the stage's ``check`` finds nothing wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedshift.server.enrollment import SiteNames

logger = logging.getLogger(__name__)

Check = Callable[[Message], "str | None"]  # why a reply must not be used, or None


def send_to_all(grid: Grid, content: RecordDict, message_type: str, timeout: float) -> list[Message]:
    """Send ``content`` to every connected node and wait up to ``timeout`` s for the replies."""
    messages = [Message(content, dst_node_id=node, message_type=message_type) for node in grid.get_node_ids()]
    return list(grid.send_and_receive(messages, timeout=timeout))


def ask_sites(
    grid: Grid,
    content: RecordDict,
    message_type: str,
    *,
    names: SiteNames,
    timeout: float,
    check: Check,
    left_out: str,
) -> list[tuple[str, Message]]:
    """Every site's usable reply to ``content``, with the site's name, in the order they came.

    A reply that is not used is logged as ``"<left_out> <site>: <why>"``.
    """
    accepted: list[tuple[str, Message]] = []
    for msg in send_to_all(grid, content, message_type, timeout):
        name, problem = names.resolve(msg)
        if problem is None and any(n == name for n, _ in accepted):
            problem = "a second reply from the same site"
        if problem is None:
            problem = check(msg)
        if problem is not None:
            logger.warning("%s %s: %s", left_out, name, problem)
            continue
        accepted.append((name, msg))
    return accepted
