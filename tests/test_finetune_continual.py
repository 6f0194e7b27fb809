"""``fedshift simulate --finetune a,b`` and ``--continual`` end to end on Flower's simulation engine.

References: trainable-parameter counts and bytes from a freshly built model, and
the phase-A sites' AUC re-computed by ``fedshift evaluate`` (another code path)
from the checkpoint and site state the continual run left on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ArrayRecord

from fedshift.common.cli import main
from fedshift.common.model import ModelConfig, build_model
from fedshift.simulations.finetune_compare import finetune_row, finetune_table

SMALL = [
    "--sites",
    "2",
    "--rounds",
    "1",
    "--synthetic-n",
    "300",
    "--image-size",
    "32",
    "--no-baseline",
    "--no-dp",
]


def test_finetune_row_reads_auc_bytes_and_throughput_from_the_server_results() -> None:
    server = {
        "final_test": {"site-0": {"auc": 0.8, "accuracy": 0.7}, "site-1": {"auc": 0.6, "accuracy": 0.5}},
        "size": {"shared_params": 100},
        "history": {
            "train": {
                "1": {
                    "site-0": {"bytes-sent": 400, "samples-per-second": 10.0},
                    "site-1": {"bytes-sent": 400},
                },
                "2": {"site-0": {"bytes-sent": 400, "samples-per-second": 30.0}},
            }
        },
    }
    row = finetune_row("adapters", server, trainable=123, seconds=5.0)
    assert row["mean_test_auc"] == pytest.approx(0.7)
    assert row["mean_test_accuracy"] == pytest.approx(0.6)
    assert row["bytes_per_round"] == 400
    assert row["samples_per_second"] == pytest.approx(20.0)  # median of 10 and 30
    table = finetune_table([row], "x")
    assert "0.700" in table and "123" in table and "400" in table


@pytest.mark.slow
def test_finetune_comparison_runs_every_choice_on_the_same_sites(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *SMALL, "--finetune", "linear-probe,norm-only", "--out", str(out)]) == 0
    report = json.loads((out / "strategies.json").read_text())
    rows = {r["strategy"]: r for r in report["strategies"]}
    assert set(rows) == {"linear-probe", "norm-only"}
    for name, row in rows.items():
        model = build_model(ModelConfig(image_size=32, finetune=name))
        assert row["trainable_params"] == sum(p.numel() for p in model.trainable_parameters())
        # what Flower counts for the shared tensors: 4 bytes per parameter plus per-tensor framing
        sent = ArrayRecord(model.shared_state_dict()).count_bytes()
        assert row["bytes_per_round"] == sent
        assert 4 * sum(v.numel() for v in model.shared_state_dict().values()) <= sent
        assert 0.0 <= row["mean_test_auc"] <= 1.0 and row["samples_per_second"] > 0
        sites = json.loads((out / name / "server" / "results.json").read_text())["final_test"]
        assert set(sites) == {"site-0", "site-1"}
    assert rows["linear-probe"]["trainable_params"] == 1280 * 2 + 2
    printed = capsys.readouterr().out
    assert "linear-probe" in printed and "norm-only" in printed


@pytest.mark.slow
def test_continual_scenario_measures_forgetting_against_an_independent_evaluation(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    args = ["simulate", *SMALL, "--continual", "--ewc-lambda", "10", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "continual.json").read_text())
    consolidated = json.loads((out / "phase-a" / "server" / "checkpoint" / "consolidated.json").read_text())
    assert consolidated["sites"] == ["site-0"]
    assert set(summary["runs"]) == {"no EWC", "EWC lambda=10"}
    for run in summary["runs"].values():
        assert run["forgetting"] == pytest.approx(summary["phase_a_auc_before"] - run["phase_a_auc_after"])
        assert set(run["phase_b_test"]) == {"site-0"}
    # the phase-A site's AUC before phase B, recomputed by `fedshift evaluate` from what is on disk
    site = out / "phase-a" / "sites" / "site-0"
    result = tmp_path / "eval.json"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(out / "phase-a" / "server" / "checkpoint"),
            "--data",
            str(site / "data.npz"),
            "--split",
            "test",
            "--json",
            str(result),
        ]
    )
    assert code == 0
    assert json.loads(result.read_text())["auc"] == pytest.approx(summary["phase_a_before"]["site-0"]["auc"])
    # phase B started from phase A's adapters and pulled towards them: its training replies say so
    ewc_run = Path(summary["runs"]["EWC lambda=10"]["run_dir"])
    history = json.loads((ewc_run / "server" / "results.json").read_text())["history"]["privacy"]
    assert {r["ewc-fisher"] for per_site in history.values() for r in per_site.values()} == {
        "consolidated (sent by the server)"
    }
    assert "forgetting" in capsys.readouterr().out


def test_finetune_benchmark_writes_consistent_rows(tmp_path: Path, capsys) -> None:
    from fedshift.simulations.benchmarks.finetune import main as bench

    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--steps", "2", "--batch-size", "4", "--image-size", "32"]
    assert bench([*args, "--finetunes", "linear-probe,adapters", "--out", str(out)]) == 0
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["rows"]}
    for name, row in rows.items():
        model = build_model(ModelConfig(image_size=32, finetune=name))
        assert row["trainable_params"] == sum(p.numel() for p in model.trainable_parameters())
        assert row["shared_bytes"] == 4 * sum(v.numel() for v in model.shared_state_dict().values())
        assert row["dp_over_no_dp"] == pytest.approx(
            row["dp_samples_per_second"] / row["no-dp_samples_per_second"]
        )
        assert row["no-dp_samples_per_second"] > 0 and row["dp_samples_per_second"] > 0
    assert "linear-probe" in capsys.readouterr().out
