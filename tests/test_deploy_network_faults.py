"""A real federation across Linux network namespaces, with latency, packet loss and a partition.

The coordinator and each hospital run in a namespace of their own on one bridge
(:mod:`fedshift.tests.netns_support`), with TLS, the real daemons and Opacus. The
first rounds run on a clean network (the reference round time); then every
hospital gets 100 ms ± 20 ms of latency and 2 % packet loss each way, and one
hospital is cut off for 60 s while the federation waits for its next round, then
reconnected. ``min-nodes`` is every site: a round that loses the partitioned site
to Flower's heartbeat (offline after about 60 s) goes on with the others, and the
next round waits until it is back, so it must rejoin.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedshift.client.ledger import open_ledger, verify_site
from fedshift.common.checkpoint import MANIFEST, load_checkpoint
from fedshift.common.protocol import MECHANISM_DP_SGD
from fedshift.deploy.processes import Child
from fedshift.tests.deploy_support import SITES, Federation, flower_processes_under, wait_for
from fedshift.tests.netns_support import Network, fault_mechanisms, netns_unavailable

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

ROUNDS = 4
CLEAN_ROUNDS = 2  # rounds 1-2 on a clean network; the faults start once round 2 is aggregated
PARTITIONED = "hospital-c"
PARTITION_ROUND = 3  # cut off as it sends its round-3 update (trained and charged): the update is lost
PARTITION_SECONDS = 60.0
DELAY_MS, JITTER_MS, LOSS_PERCENT = 100, 20, 2


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"network faults need network namespaces: {reason}")
    mechanisms = fault_mechanisms()
    if mechanisms.loss is None:
        pytest.skip("packet loss needs tc netem (kernel sch_netem) or nftables (apt-get install nftables)")
    logger.info("network faults: %s", mechanisms.describe())
    with Network.create(("coordinator", *SITES), tmp_path / "test-logs") as net:
        net.mechanisms = mechanisms
        yield net


class Rounds:
    """When each round's checkpoint appeared (seconds since the coordinator started)."""

    def __init__(self, fed: Federation) -> None:
        self.manifest = fed.run_dir / "checkpoint" / MANIFEST
        self.start = time.monotonic()
        self.done_at: dict[int, float] = {}

    def latest(self) -> int:
        try:
            latest = int(json.loads(self.manifest.read_text())["round"])
        except (OSError, ValueError, KeyError):
            return max(self.done_at, default=0)
        for r in range(1, latest + 1):
            self.done_at.setdefault(r, time.monotonic() - self.start)
        return latest

    def watching(self, condition: Callable[[], bool]) -> Callable[[], bool]:
        """``condition``, noting the rounds done each time it is asked."""
        return lambda: self.latest() >= 0 and condition()

    def seconds(self, r: int) -> float:
        return self.done_at[r] - self.done_at.get(r - 1, 0.0)


def _answered(fed: Federation, site: str) -> list[int]:
    """The rounds whose aggregate holds ``site``'s update, as the coordinator's history says."""
    return sorted(int(r) for r, sites in fed.results()["history"]["train"].items() if site in sites)


def _charged(fed: Federation, site: str) -> list[tuple[str, int]]:
    """(run, round) of every DP-SGD charge in ``site``'s ledger, read and verified by the ledger module."""
    assert verify_site(fed.state_dir(site)).startswith("integrity verified")
    ledger = open_ledger(fed.state_dir(site))
    assert ledger is not None, f"{site} has no privacy ledger"
    return [(e.run_id, e.round) for e in ledger.entries if e.mechanism == MECHANISM_DP_SGD]


def test_rounds_survive_latency_loss_and_a_partition(tmp_path: Path, network: Network) -> None:
    fed = Federation(
        tmp_path,
        rounds=ROUNDS,
        min_nodes=len(SITES),
        public_host=network.address("coordinator"),
        prefixes={"server": network.prefix("coordinator"), **{s: network.prefix(s) for s in SITES}},
    )
    for site in SITES:  # through the site's relay when latency comes from one (no netem)
        fed.write_site_config(site, key=site, superlink=network.connect(site, fed.superlink))
    try:
        server = fed.start_server()
        rounds = Rounds(fed)
        clients = {site: fed.start_client(site) for site in SITES}
        daemons: list[Child] = [server, *clients.values()]
        wait_for("the clean rounds", lambda: rounds.latest() >= CLEAN_ROUNDS, 900, *daemons)

        for site in SITES:
            network.degrade(site, delay_ms=DELAY_MS, jitter_ms=JITTER_MS, loss_percent=LOSS_PERCENT)
        sent = f"{PARTITIONED} to send its round-{PARTITION_ROUND} update"
        updating = rounds.watching(
            lambda: any(
                e["round"] == PARTITION_ROUND and e["stage"] == "train" for e in fed.egress(PARTITIONED)
            )
        )
        wait_for(sent, updating, 900, *daemons)
        network.partition(PARTITIONED)
        partitioned_at = time.monotonic()
        wait_for(
            f"{PARTITION_SECONDS:.0f} s of partition",
            rounds.watching(lambda: time.monotonic() - partitioned_at >= PARTITION_SECONDS),
            PARTITION_SECONDS + 30,
            *daemons,
        )
        cut = network.dropped(PARTITIONED, partition=True)
        network.heal(PARTITIONED)
        finish = rounds.watching(lambda: server.poll() is not None)
        wait_for("the federation to finish", finish, 900, *clients.values())
        assert server.proc.returncode == 0, fed.log(server.name)
        assert all(c.poll() is None for c in clients.values())  # the hospitals' daemons rode it out
        lost = {site: network.dropped(site) for site in SITES}
    finally:
        fed.stop_all()
        network.stop_relays()
    deadline = time.monotonic() + 20
    while flower_processes_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(1)
    assert flower_processes_under(tmp_path) == []

    # every round completed, none lost: all of them trained, evaluated and checkpointed
    results = fed.results()
    assert sorted(int(r) for r in results["history"]["train"]) == list(range(1, ROUNDS + 1))
    assert sorted(int(r) for r in results["history"]["evaluate"]) == list(range(1, ROUNDS + 1))
    assert load_checkpoint(fed.run_dir / "checkpoint").round == ROUNDS
    # the faults were real: loss dropped packets at every hospital, the partition dropped every packet
    assert all(n is not None and n > 0 for n in lost.values()), lost
    assert cut is None or cut > 0, cut

    # every ledger: one charge per round the site trained in, none twice, all in the one run
    runs = {run for site in SITES for run, _ in _charged(fed, site)}
    assert len(runs) == 1, runs
    for site in SITES:
        charged = [r for _, r in _charged(fed, site)]
        assert len(charged) == len(set(charged)), f"{site} was charged twice for a round: {charged}"
        answered = _answered(fed, site)
        if site != PARTITIONED:
            assert charged == answered == list(range(1, ROUNDS + 1)), (site, charged, answered)
    charged = [r for _, r in _charged(fed, PARTITIONED)]
    answered = _answered(fed, PARTITIONED)
    assert answered[: PARTITION_ROUND - 1] == list(range(1, PARTITION_ROUND))
    assert ROUNDS in answered, f"{PARTITIONED} never rejoined after the partition: {answered}"
    assert set(answered) <= set(charged), (answered, charged)  # every update it sent was paid for
    # a round it trained in but whose update came too late (the partition round) is charged, not counted
    assert set(charged) - set(answered) <= {PARTITION_ROUND}, (charged, answered)
    assert charged == sorted(charged)

    times = {r: rounds.seconds(r) for r in range(2, ROUNDS + 1)}
    clean, faulty = times[CLEAN_ROUNDS], times[ROUNDS]
    print(
        f"network faults ({network.mechanisms.describe() if network.mechanisms else '?'}): "
        f"round seconds clean {clean:.0f}, with {DELAY_MS}±{JITTER_MS} ms and {LOSS_PERCENT} % loss "
        f"{faulty:.0f}, with the {PARTITION_SECONDS:.0f} s partition {times[PARTITION_ROUND]:.0f}, "
        f"packets lost {lost}, cut {cut}; {PARTITIONED} answered "
        f"{answered}, charged {charged}"
    )
