"""Secure aggregation in a real deployment on loopback (TLS SuperLink, 3 SuperNodes), against the same run
without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.protocol import (
    SECAGG_MASKED_KEY,
    SECAGG_SETUP_QUERY,
    SECAGG_SHARE_QUERY,
    SECAGG_UNMASK_QUERY,
)
from fedshift.tests.deploy_support import SITES, Federation, flower_processes_under, wait_for

pytestmark = pytest.mark.slow


def _run(root: Path, secure: bool, **site: object) -> Federation:
    root.mkdir()
    fed = Federation(root, rounds=1, min_nodes=3, run_config={"secure-aggregation": secure}, site_values=site)
    try:
        server = fed.start_server()
        clients = [fed.start_client(name) for name in SITES]
        wait_for("the federation to finish", lambda: server.poll() is not None, 600, *clients)
        assert server.proc.returncode == 0, fed.log(server.name)
    finally:
        fed.stop_all()
    assert flower_processes_under(root) == []
    return fed


def test_deployed_secure_aggregation_with_dp_sgd_at_every_site(tmp_path: Path) -> None:
    secure = _run(tmp_path / "secure", True)
    results = secure.results()
    assert sorted(results["history"]["train"]["1"]) == list(SITES)
    assert {p["mechanism"] for p in results["history"]["privacy"]["1"].values()} == {"dp-sgd"}
    assert results["history"]["refused"] == [] and results["history"]["rejected"] == []
    assert sorted(results["final_test"]) == list(SITES)
    for site in SITES:
        log = secure.egress(site)
        assert [e["stage"] for e in log][:4] == [
            f"query.{SECAGG_SETUP_QUERY}",
            f"query.{SECAGG_SHARE_QUERY}",
            "train",
            f"query.{SECAGG_UNMASK_QUERY}",
        ]
        assert all(e["blocked"] == [] for e in log)
        trained = next(e for e in log if e["stage"] == "train")
        masked = [i for i in trained["items"] if "shape" in i]
        assert [(i["record"], i["dtype"], i["mechanism"]) for i in masked] == [
            (SECAGG_MASKED_KEY, "uint32", "dp-sgd, masked by secure aggregation")
        ]
        # one DP-SGD charge for the one round, as without secure aggregation
        assert [(e["round"], e["mechanism"]) for e in secure.ledger(site)] == [(1, "dp-sgd")]


def test_deployed_secure_aggregation_matches_the_plain_run(tmp_path: Path) -> None:
    """Deployed sites draw DP noise from the OS CSPRNG, so two runs are compared without DP (dp = false at
    every site: training is then seeded and the runs differ only by secure aggregation)."""
    plain, secure = _run(tmp_path / "plain", False, dp=False), _run(tmp_path / "secure", True, dp=False)
    a = load_checkpoint(plain.run_dir / "checkpoint").arrays
    b = load_checkpoint(secure.run_dir / "checkpoint").arrays
    gap = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    assert 0 < gap < 1e-6  # one round: the masks cancelled, quantisation (and float32) is all that differs
    for site in SITES:
        auc, secure_auc = (
            plain.results()["final_test"][site]["auc"],
            secure.results()["final_test"][site]["auc"],
        )
        assert secure_auc == pytest.approx(auc, abs=0.005)
