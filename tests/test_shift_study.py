"""``fedshift shift-study``: the study's claims on real PneumoniaMNIST, and its command line.

The slow test runs a small study (two real Flower simulations on Ray, the real
ClientApp with its statistics stage, real images) and checks the numbers: the
label-shift correction lowers the mean per-site log loss and raises accuracy at
the sites whose prevalence is far from the global prior; alignment does not
lower the mean AUC; and nothing specific to a site left it except accounted
statistics and allowed aggregate metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedshift.client.egress import BOOKKEEPING, METRIC
from fedshift.client.ledger import open_ledger
from fedshift.common.cli import main
from fedshift.common.config import FederationConfig, TrainConfig
from fedshift.common.model import ModelConfig
from fedshift.common.shift_config import ShiftConfig
from fedshift.simulations.shift_study import TABLE_VARIANTS, StudySpec, run_study
from fedshift.tests.helpers import one_line_error

AUC_TOLERANCE = 0.01  # "does not lower": the mean AUC of (c) is at least (a)'s minus this (test sets of 30)


@pytest.mark.slow
def test_small_study_meets_the_claims(pneumonia_path: Path, tmp_path: Path) -> None:
    fed = FederationConfig(
        num_rounds=3,
        device="cpu",
        model=ModelConfig(image_size=32),
        train=TrainConfig(learning_rate=3e-3),
        shift=ShiftConfig(
            correction=True,
            bootstrap=30,
            min_samples=20,
            align_weight=0.01,
            align_dim=16,
            align_clip=1.0,
            tta=True,
        ),
    )
    spec = StudySpec(
        out_dir=tmp_path / "study",
        data=str(pneumonia_path),
        prevalences=(0.05, 0.5, 0.95),
        max_per_site=150,
        federation=fed,
    )
    report = run_study(spec)
    claims = report["claims"]
    mean = report["mean"]
    # label-shift correction: lower mean per-site log loss, higher accuracy at the far sites
    assert mean["b"]["log-loss"] < mean["a"]["log-loss"]
    assert claims["far_sites"] == ["site-0", "site-2"]  # prevalences 0.05 and 0.95 vs a global prior near 0.5
    assert report["far_sites_mean_accuracy"]["b"] > report["far_sites_mean_accuracy"]["a"]
    for site in claims["far_sites"]:  # and at no far site does it cost more than one test image
        n_test = next(s["n"]["test"] for s in report["sites"] if s["site"] == site)
        assert (
            report["per_site"]["b"][site]["accuracy"]
            >= report["per_site"]["a"][site]["accuracy"] - 1 / n_test
        )
    # the correction is a monotone map of each site's scores: AUC unchanged (binary), a check of the plumbing
    assert mean["b"]["auc"] == pytest.approx(mean["a"]["auc"], abs=1e-9)
    # the oracle (true prior) is at least as good as the estimate on log loss, up to estimation noise
    assert mean["oracle"]["log-loss"] <= mean["b"]["log-loss"] + 0.02
    # alignment does not lower the mean AUC
    assert mean["c"]["auc"] >= mean["a"]["auc"] - AUC_TOLERANCE
    # the global prior came from DP counts and is close to the sites' pooled prevalence
    sites = report["sites"]
    pooled = sum(s["prevalence"] * s["n_total"] for s in sites) / sum(s["n_total"] for s in sites)
    assert report["global_train_prior"] == pytest.approx(pooled, abs=0.03)
    # egress: only DP statistics charged to the ledger, adapters (no DP-SGD here, said so), allowed metrics
    for run, audit in report["egress"].items():
        assert audit["uncharged"] == [] and audit["unexpected"] == [] and audit["blocked"] == []
        assert audit["mechanisms"]["dp-label-counts"] == 3  # one release per site per run
        assert set(audit["mechanisms"]) <= {
            "dp-label-counts",
            "dp-moments",
            "none (dp=false at this site)",
            METRIC,
            BOOKKEEPING,
        }
        assert ("dp-moments" in audit["mechanisms"]) == (run == "aligned+loss")
        for site in ("site-0", "site-1", "site-2"):
            ledger = open_ledger(spec.out_dir / run / "sites" / site)
            assert ledger is not None
            # label counts once; moments before round 1 and refreshed before rounds 2 and 3
            moments = [(r, "dp-moments") for r in (0, 2, 3)] if run == "aligned+loss" else []
            assert [(e.round, e.mechanism) for e in ledger.entries] == [(0, "dp-label-counts"), *moments]
    # the outputs: printed table, JSON and plot
    assert all(f" {v} " in report["table"] for v in TABLE_VARIANTS)
    saved = json.loads((spec.out_dir / "shift_study.json").read_text())
    assert saved["claims"]["label_shift_lowers_mean_log_loss"] is True
    assert (spec.out_dir / "shift_study.png").stat().st_size > 10_000
    scores = report["alignment_score"]["aligned"]
    assert all(0 <= s <= 1 and not math.isnan(s) for s in scores.values())


def test_cli_refuses_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["shift-study", "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o")])
    one_line_error(code, capsys.readouterr().err, "Expected --data to be a MedMNIST-layout .npz", "nope.npz")


def test_seed_summary_reports_every_seed_and_the_paired_auc_difference() -> None:
    from fedshift.simulations.shift_study import format_seed_summary, summarize_seeds

    def report(auc_a: float, auc_c: float, acc_b: float) -> dict[str, object]:
        mean = {v: {"log-loss": 0.1, "auc": auc_a} for v in ("a", "b", "c", "d", "a+tta", "c+tta")}
        mean["c"]["auc"] = auc_c
        per_site = {v: {"site-0": {"accuracy": acc_b if v == "b" else 0.9}} for v in ("a", "b")}
        return {"claims": {"far_sites": ["site-0"]}, "mean": mean, "per_site": per_site}

    summary = summarize_seeds({2: report(0.90, 0.93, 0.95), 0: report(0.95, 0.94, 0.97)})
    assert summary["seeds"] == [0, 2]
    assert summary["mean_auc"]["c"] == [0.94, 0.93]
    assert summary["far_accuracy"]["site-0"] == {"a": [0.9, 0.9], "b": [0.97, 0.95]}
    diff = np.array([0.94 - 0.95, 0.93 - 0.90])
    assert summary["auc_difference_c_minus_a"]["mean"] == pytest.approx(diff.mean())
    se = summary["auc_difference_c_minus_a"]["standard_error"]
    assert se == pytest.approx(diff.std(ddof=1) / math.sqrt(2))
    assert "mean AUC (c) - (a): +0.0100" in format_seed_summary(summary)
