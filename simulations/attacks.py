"""Attack scenarios of ``fedshift simulate --attack``: one simulated site's training reply, altered.

``scale:1000@site-2`` multiplies site-2's update (its adapters minus the global
adapters it received) by 1000, ``sign-flip@site-1`` sends the global adapters
minus site-1's update, ``claim-examples:1e9@site-3`` makes site-3 claim 10^9
training examples (its FedAvg weight). Each attack is a Flower client mod
(:func:`attack_mods`) around the simulated ClientApp, inside its egress guard,
so a site's egress log records what the attacked site really sent. Simulation
only: no run-config key turns an attack on, and a deployed site never runs one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedshift.common.errors import ConfigError
from fedshift.common.protocol import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY

# attack -> what it does to the named site's training reply
ATTACKS = {
    "scale": "scale:F@site-k: the site's update (adapters - global adapters) times F",
    "sign-flip": "sign-flip@site-k: the global adapters minus the site's update",
    "claim-examples": "claim-examples:N@site-k: the site claims N training examples (its FedAvg weight)",
}
_EXAMPLES = "scale:1000@site-2, sign-flip@site-1 or claim-examples:1e9@site-3"


@dataclass(frozen=True)
class Attack:
    """One attack on one simulated site's training replies."""

    kind: str  # a key of ATTACKS
    site: str  # the simulated site's name, site-<partition id>
    value: float = 0.0  # scale: the factor; claim-examples: the number claimed; sign-flip: unused

    def __str__(self) -> str:
        value = "" if self.kind == "sign-flip" else f":{self.value:g}"
        return f"{self.kind}{value}@{self.site}"


def parse_attacks(texts: Iterable[str], num_sites: int | None = None) -> tuple[Attack, ...]:
    """``--attack`` values (each one spec, or several comma-separated); ``site-k`` must be < ``num_sites``."""
    attacks = tuple(_parse(part.strip()) for text in texts for part in text.split(",") if part.strip())
    for attack in attacks:
        index = int(attack.site.removeprefix("site-"))
        if num_sites is not None and index >= num_sites:
            raise ConfigError(
                f"Expected --attack to name a simulated site (site-0 to site-{num_sites - 1}), but got "
                f"{attack.site!r} in {str(attack)!r}; pick one of the {num_sites} sites"
            )
    return attacks


def _parse(text: str) -> Attack:
    head, at, site = text.partition("@")
    kind, colon, value = head.partition(":")
    index = site.removeprefix("site-")
    if not at or kind not in ATTACKS or not site.startswith("site-") or not index.isdigit():
        raise ConfigError(
            f"Expected --attack to be KIND[:VALUE]@site-k with KIND one of {', '.join(ATTACKS)}, but got "
            f"{text!r}; e.g. {_EXAMPLES}"
        )
    if kind == "sign-flip":
        if colon:
            raise ConfigError(
                f"Expected sign-flip to take no value, but got {text!r}; write sign-flip@{site}"
            )
        return Attack(kind, f"site-{int(index)}")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    whole = kind != "claim-examples" or (number.is_integer() and number >= 1)
    if not math.isfinite(number) or not whole:
        what = "a whole number >= 1" if kind == "claim-examples" else "a finite number"
        raise ConfigError(
            f"Expected the value of {kind} to be {what}, but got {value!r} in {text!r}; e.g. {_EXAMPLES}"
        )
    return Attack(kind, f"site-{int(index)}", number)


def simulated_site(context: Context) -> str | None:
    """The simulated site a ClientApp runs as (``site-<partition id>``, as SiteSettings names it)."""
    pid = context.node_config.get("partition-id")
    return f"site-{int(pid)}" if isinstance(pid, int) and not isinstance(pid, bool) else None


def attack_reply(attack: Attack, received: Mapping[str, np.ndarray], reply: Message) -> None:
    """Apply ``attack`` to the training ``reply`` of a site that ``received`` the global adapters."""
    if attack.kind == "claim-examples":
        reply.content.metric_records[METRICS_KEY][WEIGHT_KEY] = int(attack.value)
        return
    factor = -1.0 if attack.kind == "sign-flip" else attack.value
    arrays = reply.content.array_records[ARRAYS_KEY]
    for key in list(arrays):
        sent = arrays[key].numpy()
        base = received[key].astype(np.float64)
        arrays[key] = Array((base + factor * (sent.astype(np.float64) - base)).astype(sent.dtype))


def attack_mods(attacks: Sequence[Attack]) -> list[Mod]:
    """One Flower client mod that applies ``attacks`` (in order) to their sites' training replies."""
    if not attacks:
        return []

    def attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        is_train = msg.metadata.message_type == MessageType.TRAIN and ARRAYS_KEY in msg.content.array_records
        received = (
            {k: v.numpy() for k, v in msg.content.array_records[ARRAYS_KEY].items()} if is_train else None
        )
        reply = call_next(msg, context)
        site = simulated_site(context)
        mine = [a for a in attacks if a.site == site]
        if received is None or not mine or reply.has_error():
            return reply
        if ARRAYS_KEY not in reply.content.array_records:  # a refusal (budget spent): nothing to alter
            return reply
        for attack in mine:
            attack_reply(attack, received, reply)
        return reply

    return [attack_mod]
