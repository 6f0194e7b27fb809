"""Secure aggregation in a real Flower simulation (Ray): one federation with and without it; dropouts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message

from fedshift.client.egress import read_egress_log
from fedshift.common.aggregation_config import AggregationConfig
from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.config import FederationConfig, PrivacyConfig, TrainConfig
from fedshift.common.data import save_npz
from fedshift.common.model import ModelConfig
from fedshift.common.protocol import (
    SECAGG_MASKED_KEY,
    SECAGG_SETUP_QUERY,
    SECAGG_SHARE_QUERY,
    SECAGG_UNMASK_QUERY,
)
from fedshift.simulations.engine import run_flower_simulation
from fedshift.simulations.experiment import ExperimentSpec, build_sites

pytestmark = pytest.mark.slow


def _federation(root: Path, secure: bool) -> FederationConfig:
    return FederationConfig(
        num_rounds=2,
        min_nodes=2,
        run_dir=str(root / "server"),
        sites_root=str(root / "sites"),
        model=ModelConfig(image_size=32),
        train=TrainConfig(local_epochs=1, batch_size=20),
        privacy=PrivacyConfig(enabled=True, epsilon=8.0, delta=1e-5),
        aggregation=AggregationConfig(secure=secure),
    )


def _sites(root: Path, fed: FederationConfig) -> None:
    sites, _ = build_sites(ExperimentSpec(out_dir=root, sites=3, synthetic_n=240, federation=fed))
    for site in sites:
        (root / "sites" / site.spec.name).mkdir(parents=True)
        save_npz(root / "sites" / site.spec.name / "data.npz", site.data)


def _run(root: Path, secure: bool, mods: tuple = ()) -> dict:  # type: ignore[type-arg]
    fed = _federation(root, secure)
    _sites(root, fed)
    run_flower_simulation(fed, 3, client_mods=list(mods))
    return json.loads((root / "server" / "results.json").read_text())  # type: ignore[no-any-return]


def test_secure_aggregation_matches_plain_fedavg(tmp_path: Path) -> None:
    """Same seed, DP on: the secure run's adapters and AUCs match the plain run's (quantisation aside)."""
    plain = _run(tmp_path / "plain", secure=False)
    secure = _run(tmp_path / "secure", secure=True)
    a = load_checkpoint(tmp_path / "plain" / "server" / "checkpoint").arrays
    b = load_checkpoint(tmp_path / "secure" / "server" / "checkpoint").arrays
    assert sorted(a) == sorted(b)
    gap = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    assert 0 < gap < 1e-4  # the masks cancelled: quantisation (~1e-9 per round) and float32 drift only
    for name in ("site-0", "site-1", "site-2"):
        assert secure["final_test"][name]["auc"] == pytest.approx(plain["final_test"][name]["auc"], abs=0.005)
    for rnd in ("1", "2"):
        assert sorted(secure["history"]["train"][rnd]) == ["site-0", "site-1", "site-2"]
    # each site's egress log records every protocol stage, and its update left only masked
    for name in ("site-0", "site-1", "site-2"):
        log = read_egress_log(tmp_path / "secure" / "sites" / name)
        stages = [(e["round"], e["stage"]) for e in log if e["stage"] != "evaluate"]
        per_round = [f"query.{SECAGG_SETUP_QUERY}", f"query.{SECAGG_SHARE_QUERY}", "train"]
        per_round.append(f"query.{SECAGG_UNMASK_QUERY}")
        assert [s for r, s in stages if r in (1, 2)][:8] == per_round * 2
        for entry in log:
            if entry["stage"] == "train":
                records = {i["record"] for i in entry["items"] if "shape" in i}
                assert records == {SECAGG_MASKED_KEY}
                assert {i["mechanism"] for i in entry["items"] if "shape" in i} == {
                    "dp-sgd, masked by secure aggregation"
                }


def _drop(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    """site-2 goes silent at round 1's unmasking (after its masked update), site-1 at round 2's training
    (after its shares went round)."""
    kind, rnd = str(msg.metadata.message_type), msg.content.config_records["config"].get("server-round")
    site = context.node_config.get("partition-id")
    if (site == 2 and rnd == 1 and kind.endswith(SECAGG_UNMASK_QUERY)) or (
        site == 1 and rnd == 2 and kind == "train"
    ):
        raise ConnectionError("the site went offline")
    return call_next(msg, context)


def test_dropouts_after_masking_and_before_are_recovered(tmp_path: Path) -> None:
    results = _run(tmp_path / "drop", secure=True, mods=(_drop,))
    history = results["history"]
    assert sorted(history["train"]["1"]) == ["site-0", "site-1", "site-2"]  # site-2's update still counted
    assert sorted(history["train"]["2"]) == ["site-0", "site-2"]
    assert [r["round"] for r in history["refused"]] == []  # both rounds unmasked
    ckpt = load_checkpoint(tmp_path / "drop" / "server" / "checkpoint")
    assert ckpt.round == 2 and all(np.isfinite(v).all() for v in ckpt.arrays.values())
    # the same dropouts without secure aggregation: the same adapters within quantisation
    plain = tmp_path / "plain"
    fed = replace(_federation(plain, False))
    _sites(plain, fed)

    def drop_plain(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
        rnd = msg.content.config_records["config"].get("server-round")
        if (
            context.node_config.get("partition-id") == 1
            and rnd == 2
            and str(msg.metadata.message_type) == "train"
        ):
            raise ConnectionError("the site went offline")
        return call_next(msg, context)

    run_flower_simulation(fed, 3, client_mods=[drop_plain])
    reference = load_checkpoint(plain / "server" / "checkpoint").arrays
    gap = max(float(np.abs(reference[k].astype(np.float64) - ckpt.arrays[k]).max()) for k in reference)
    assert gap < 1e-4
