"""Which site sent a reply: the node id Flower authenticated, never the name the reply claims.

In deployment the coordinator's enrollment (run config ``enrollment``: the
``enrolled.json`` that ``fedshift server`` writes, ``{site: {"node-id": "<id>", ...}}``)
maps every enrolled node id to its site; a reply from any other node is refused,
and a name a reply puts in its ``site`` record is ignored. A site's entry may
also carry ``"max-num-examples"`` (its ``[hospitals]`` cap on the weight it claims). In a simulation there
is no enrollment: the first node id to claim a name binds it for the rest of the
run, and another node claiming a taken name is refused (it would overwrite the
first site's row in the history).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flwr.app import Message

from fedshift.common.errors import ConfigError
from fedshift.common.protocol import SITE_KEY, SITE_NAME_FIELD

logger = logging.getLogger(__name__)

_FIX = "re-run `fedshift server` to enroll the hospitals again, or unset run config enrollment"


def load_enrollment(path: str | Path) -> dict[int, str]:
    """Node id -> site name from an ``enrolled.json``; :class:`ConfigError` when it cannot be used."""
    path = Path(path)
    data = _read(path)
    sites: dict[int, str] = {}
    for site, entry in data.items():
        node = entry.get("node-id") if isinstance(entry, dict) else None
        text = str(node) if isinstance(node, int | str) and not isinstance(node, bool) else ""
        if not text.isdigit():
            raise ConfigError(
                f"Expected site {site!r} in {str(path)!r} to have a numeric node-id, but got {node!r}; {_FIX}"
            )
        if int(text) in sites:
            raise ConfigError(
                f"Expected one site per node id in {str(path)!r}, but {sites[int(text)]!r} and {site!r} "
                f"share node {text}; {_FIX}"
            )
        sites[int(text)] = str(site)
    return sites


def load_weight_caps(path: str | Path) -> dict[str, int]:
    """Site -> its ``max-num-examples`` from an ``enrolled.json``, for the sites that have one."""
    path = Path(path)
    caps: dict[str, int] = {}
    for site, entry in _read(path).items():
        cap = entry.get("max-num-examples") if isinstance(entry, dict) else None
        if cap is None:
            continue
        text = str(cap) if isinstance(cap, int | str) and not isinstance(cap, bool) else ""
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(
                f"Expected site {site!r} in {str(path)!r} to have a whole max-num-examples >= 1, but got "
                f"{cap!r}; {_FIX}"
            )
        caps[str(site)] = int(text)
    return caps


def _read(path: Path) -> dict[str, object]:
    """The JSON object of an ``enrolled.json``; :class:`ConfigError` when it is none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"Expected run config enrollment to name a readable JSON file, but {str(path)!r} is not "
            f"({type(err).__name__}); {_FIX}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"Expected {str(path)!r} to hold {{site: {{'node-id': ...}}}}, but it does not; {_FIX}"
        )
    return data


def claimed_name(msg: Message) -> str | None:
    """The name a reply puts in its ``site`` record (the sender's word only), if any."""
    if msg.has_error():
        return None
    record = msg.content.config_records.get(SITE_KEY)
    name = record.get(SITE_NAME_FIELD) if record is not None else None
    return str(name) if isinstance(name, str) and name else None


class SiteNames:
    """Node id -> site name for one federation: enrolled, or bound by the first claim."""

    def __init__(
        self,
        enrolled: Mapping[int, str] | None = None,
        source: str = "",
        weight_caps: Mapping[str, int] | None = None,
    ) -> None:
        self.enrolled = dict(enrolled) if enrolled is not None else None
        self.weight_caps = dict(weight_caps or {})  # site -> its [hospitals] max-num-examples
        self.source = source  # where the enrollment came from (for messages)
        self._bound: dict[int, str] = dict(self.enrolled or {})  # node id -> name
        self._owner: dict[str, int] = {name: node for node, name in self._bound.items()}
        self._warned: set[tuple[int, str]] = set()

    @classmethod
    def from_file(cls, path: str | Path | None) -> SiteNames:
        """The enrollment of ``path``; claim-binding names when ``path`` is empty."""
        if not path:
            return cls()
        return cls(load_enrollment(path), source=str(path), weight_caps=load_weight_caps(path))

    def max_num_examples(self, name: str) -> int | None:
        """The cap on the weight site ``name`` may claim (its ``[hospitals]`` max-num-examples), if any."""
        return self.weight_caps.get(name)

    def name_of(self, node: int) -> str:
        """The site name of ``node`` (for logs and history), ``node-<id>`` when it has none."""
        return self._bound.get(node, f"node-{node}")

    def resolve(self, msg: Message) -> tuple[str, str | None]:
        """``(site name, None)`` for the sender of ``msg``, or ``(display name, why it is refused)``."""
        node = msg.metadata.src_node_id
        claim = claimed_name(msg)
        if self.enrolled is not None:
            if node not in self.enrolled:
                return f"node-{node}", f"node {node} is not enrolled (claims {claim!r}; see {self.source})"
            self._note_claim(node, claim)
            return self.enrolled[node], None
        if node in self._bound:
            self._note_claim(node, claim)
            return self._bound[node], None
        name = claim or f"node-{node}"
        owner = self._owner.get(name)
        if owner is not None:
            return f"node-{node}", f"node {node} claims the name {name!r}, which node {owner} holds"
        self._bound[node], self._owner[name] = name, node
        return name, None

    def _note_claim(self, node: int, claim: str | None) -> None:
        name = self._bound[node]
        if claim is not None and claim != name and (node, claim) not in self._warned:
            self._warned.add((node, claim))
            logger.warning("Node %d (%s) claims to be %r; it is kept as %s", node, name, claim, name)


def wait_for_enrolled(
    online: Callable[[], Iterable[int]],
    names: SiteNames,
    seconds: float,
    *,
    poll: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Wait up to ``seconds`` for every enrolled site to be online; the enrolled sites still missing.

    Flower starts a round as soon as ``min-nodes`` sites are online, so a site that
    connects a moment later would miss the first round (and only join in its
    evaluation). Before the first message the coordinator therefore waits for the
    whole enrollment (run config ``enrolled-wait``), then goes on with whoever is
    there; ``min-nodes`` stays the floor. Without an enrollment (simulation) it returns at once.
    """
    if not names.enrolled:
        return []
    deadline = clock() + seconds
    while True:
        missing = sorted(names.enrolled[n] for n in set(names.enrolled) - set(online()))
        if not missing or clock() >= deadline:
            break
        logger.info("Waiting for enrolled sites to come online: %s", ", ".join(missing))
        sleep(min(poll, max(0.0, deadline - clock())))
    if missing:
        logger.warning(
            "Starting without %s: not online after %.0f s (run config enrolled-wait); "
            "they join when they connect",
            ", ".join(missing),
            seconds,
        )
    return missing
