"""Real Flower simulations (Ray) on tiny configurations, checked with numbers."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message

from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.cli import main
from fedshift.common.config import DP_RECIPE, FederationConfig, TrainConfig
from fedshift.common.data import load_npz
from fedshift.common.model import ModelConfig, build_model
from fedshift.simulations.engine import run_flower_simulation
from fedshift.simulations.experiment import ExperimentSpec, build_sites, ledger_epsilons
from fedshift.tests.helpers import assert_tight_and_sound

pytestmark = pytest.mark.slow

TINY = ["--synthetic-n", "160", "--rounds", "2", "--local-epochs", "1", "--image-size", "32"]


RAY_TAG = "FEDSHIFT_TEST_RAY_OWNER"  # Ray's processes inherit it: ours are told apart from other jobs' Rays


@pytest.fixture(autouse=True)
def _tag_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RAY_TAG, str(os.getpid()))


def _no_ray_left(seconds: float = 10.0) -> bool:
    """True once none of this test's Ray processes is alive (a SIGKILLed one may take a moment to go)."""
    deadline = time.monotonic() + seconds
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    return _ray_processes() == []


def _ray_processes() -> list[str]:
    """Ray processes still alive that this test process started (found by the tag in their environment)."""
    tag = f"{RAY_TAG}={os.getpid()}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            ours = tag in (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ours and ("raylet" in cmd or "gcs_server" in cmd or "ray::" in cmd):
            found.append(cmd[:80])
    return found


def test_simulate_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default command: private (DP-SGD at epsilon 8, the DP recipe), the no-DP reference beside it."""
    out = tmp_path / "run"
    assert main(["simulate", "--sites", "2", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "site-0" in printed and "SYNTHETIC" in printed and "Mean test AUC" in printed
    assert "Negative transfer:" in printed
    assert "federated with DP (epsilon <= 8)" in printed and "federated without DP" in printed

    config = json.loads((out / "config.json").read_text())
    run, ref = config["run_config"], config["reference_run_config"]
    assert (run["dp"], run["dp-epsilon"], run["dp-delta"]) == (True, 8.0, 1e-5)
    assert {k: run[k] for k in DP_RECIPE} == DP_RECIPE  # the DP-aware recipe
    defaults = FederationConfig().to_run_config()
    assert ref == {**run, **{k: defaults[k] for k in (*DP_RECIPE, "dp", "dp-epsilon")}}  # only those differ
    ledgers = ledger_epsilons(out / "sites", 1e-5)
    assert sorted(ledgers) == ["site-0", "site-1"] and all(0 < e <= 8.0 for e in ledgers.values())
    assert json.loads((out / "no-dp" / "server" / "results.json").read_text())["final_test"]

    report = json.loads((out / "results.json").read_text())
    assert report["synthetic"] is True
    history = report["history"]
    assert sorted(history["train"], key=int) == ["1", "2"]
    assert sorted(history["evaluate"]["2"]) == ["site-0", "site-1"]

    # bytes sent per round == the serialised shared adapters, and <= 5% of the backbone
    model = build_model(ModelConfig(image_size=32))
    adapter_bytes = ArrayRecord(model.shared_state_dict()).count_bytes()
    for per_site in history["train"].values():
        assert {m["bytes-sent"] for m in per_site.values()} == {adapter_bytes}
    assert report["max_bytes_fraction_of_backbone"] <= 0.05

    # every site evaluated on its own test split; local-only baseline present
    for name in ("site-0", "site-1"):
        site_data = load_npz(out / "sites" / name / "data.npz")
        assert report["federated_test"][name]["n"] == len(site_data.split("test"))
        assert 0.0 <= report["federated_test"][name]["auc"] <= 1.0
        assert 0.0 <= report["local_only_test"][name]["auc"] <= 1.0
        # negative transfer: the last round's federated validation AUC against the local-only one
        flag = report["negative_transfer"][name]
        assert flag["federated_auc"] == history["evaluate"]["2"][name]["auc"]
        assert flag["flagged"] == (flag["federated_auc"] < flag["local_auc"])

    # the checkpoint is the final round's, and `fedshift evaluate` on it reproduces the
    # federated test metrics of site-0 through an independent code path
    checkpoint = load_checkpoint(out / "server" / "checkpoint")
    assert checkpoint.round == 2
    # every simulated site holds a verified bundle of the final adapters (the final-model stage)
    from fedshift.client.bundle import load_bundle

    for name in ("site-0", "site-1"):
        bundle = load_bundle(out / "sites" / name)
        for key, value in bundle.model.shared_state_dict().items():
            np.testing.assert_array_equal(value.numpy(), checkpoint.arrays[key])
        assert (bundle.card["site"], bundle.card["rounds"], bundle.card["sites"]) == (name, 2, 2)
    metrics_json = tmp_path / "eval.json"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(out / "server" / "checkpoint"),
            "--data",
            str(out / "sites" / "site-0" / "data.npz"),
            "--split",
            "test",
            "--json",
            str(metrics_json),
        ]
    )
    assert code == 0
    evaluated = json.loads(metrics_json.read_text())
    for key in ("auc", "accuracy", "balanced_accuracy", "ece"):
        expected = report["federated_test"]["site-0"][key.replace("_", "-")]
        assert math.isclose(evaluated[key], expected, rel_tol=1e-6, abs_tol=1e-9), key

    assert (out / "auc_per_round.png").stat().st_size > 5_000
    assert json.loads((out / "config.json").read_text())["run_config"]["num-server-rounds"] == 2
    assert _no_ray_left()


def _poison_site_2(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    """A Flower mod that makes site 2 reply with NaN adapters."""
    reply = call_next(msg, context)
    if context.node_config.get("partition-id") == 2 and msg.metadata.message_type == "train":
        arrays = reply.content["arrays"]
        for key in list(arrays):
            arrays[key] = Array(np.full(arrays[key].shape, np.nan, dtype=np.float32))
    return reply


def test_nan_reply_is_left_out_in_a_real_simulation(tmp_path: Path) -> None:
    fed = FederationConfig(
        num_rounds=2,
        min_nodes=2,
        run_dir=str(tmp_path / "server"),
        sites_root=str(tmp_path / "sites"),
        model=ModelConfig(image_size=32),
        train=TrainConfig(local_epochs=1),
    )
    spec = ExperimentSpec(out_dir=tmp_path, sites=3, synthetic_n=150, federation=fed)
    sites, _ = build_sites(spec)
    from fedshift.common.data import save_npz

    for site in sites:
        (tmp_path / "sites" / site.spec.name).mkdir(parents=True)
        save_npz(tmp_path / "sites" / site.spec.name / "data.npz", site.data)
    run_flower_simulation(fed, 3, client_mods=[_poison_site_2])

    results = json.loads((tmp_path / "server" / "results.json").read_text())
    rejected = results["history"]["rejected"]
    assert [(r["round"], r["site"]) for r in rejected] == [(1, "site-2"), (2, "site-2")]
    assert all("NaN" in r["reason"] for r in rejected)
    for rnd in ("1", "2"):
        assert sorted(results["history"]["train"][rnd]) == ["site-0", "site-1"]
    # the round completed and the global adapters stayed finite
    ckpt = load_checkpoint(tmp_path / "server" / "checkpoint")
    assert ckpt.round == 2
    assert all(np.isfinite(v).all() for v in ckpt.arrays.values())
    assert sorted(results["final_test"]) == ["site-0", "site-1", "site-2"]


def test_dp_simulation_budget_ledger_and_egress(tmp_path: Path) -> None:
    """Real Flower simulation with DP: a site at its budget sits out, the others' ledgers are exact."""
    from fedshift.client.egress import read_egress_log
    from fedshift.client.ledger import PrivacyLedger
    from fedshift.common.config import PrivacyConfig
    from fedshift.common.data import save_npz

    budget = 6.0
    fed = FederationConfig(
        num_rounds=2,
        min_nodes=2,
        run_dir=str(tmp_path / "server"),
        sites_root=str(tmp_path / "sites"),
        model=ModelConfig(image_size=32),
        train=TrainConfig(local_epochs=1, batch_size=20),
        privacy=PrivacyConfig(enabled=True, epsilon=budget, delta=1e-5),
    )
    sites, _ = build_sites(ExperimentSpec(out_dir=tmp_path, sites=3, synthetic_n=240, federation=fed))
    for site in sites:
        (tmp_path / "sites" / site.spec.name).mkdir(parents=True)
        save_npz(tmp_path / "sites" / site.spec.name / "data.npz", site.data)
    # site-0 spent its budget in an earlier run
    spent = PrivacyLedger.at(tmp_path / "sites" / "site-0")
    spent.charge(
        run_id="old", round=1, mechanism="dp-sgd", noise_multiplier=0.6, sample_rate=0.5, steps=60, delta=1e-5
    )
    assert spent.epsilon(1e-5) > budget
    run_flower_simulation(fed, 3)

    results = json.loads((tmp_path / "server" / "results.json").read_text())
    history = results["history"]
    refused = [(r["round"], r["site"], r["status"]) for r in history["refused"]]
    assert refused == [(1, "site-0", "budget-exhausted")]  # asked once, then left out by the server
    for rnd in ("1", "2"):
        assert sorted(history["train"][rnd]) == ["site-1", "site-2"]
    assert load_checkpoint(tmp_path / "server" / "checkpoint").round == 2
    assert len(PrivacyLedger.at(tmp_path / "sites" / "site-0").entries) == 1  # never charged again

    for name in ("site-1", "site-2"):
        ledger = PrivacyLedger.at(tmp_path / "sites" / name)
        assert [e.round for e in ledger.entries] == [1, 2]
        assert_tight_and_sound(ledger)  # rounds run by Ray: PRV, never below dp-accounting's PLD
        assert ledger.epsilon(1e-5) <= budget
        reported = [history["privacy"][r][name]["epsilon"] for r in ("1", "2")]
        assert reported == pytest.approx([e.epsilon for e in ledger.entries], abs=1e-12)
        trained = [e for e in read_egress_log(tmp_path / "sites" / name) if e["stage"] == "train"]
        assert [e["round"] for e in trained] == [1, 2]
        for entry in trained:
            arrays = [i for i in entry["items"] if i["record"] == "arrays"]
            assert {i["mechanism"] for i in arrays} == {"dp-sgd"} and entry["blocked"] == []
        # val each round and test at the end, each (round, split) evaluated once, split logged
        log = read_egress_log(tmp_path / "sites" / name)
        evaluated = [(e["round"], e["split"], e["repeat"]) for e in log if e["stage"] == "evaluate"]
        assert evaluated == [(1, "val", False), (2, "val", False), (2, "test", False)]
    # no statistic of the training data without DP (no training loss) reached the server
    kept = {k for per_site in history["train"].values() for m in per_site.values() for k in m}
    assert kept == {"num-examples", "samples-per-second", "bytes-sent"}
    assert _no_ray_left()
