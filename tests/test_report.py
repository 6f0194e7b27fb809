"""Report helpers: the negative-transfer flag and the EWC line."""

from __future__ import annotations

import math

from fedshift.simulations.report import negative_transfer, negative_transfer_line


def test_flag_is_raised_where_the_local_model_is_better() -> None:
    federated = {
        "site-0": {"auc": 0.91},
        "site-1": {"auc": 0.95},
        "site-2": {"auc": 0.80},
        "site-3": {"auc": 0.7},
    }
    local = {
        "site-0": {"auc": 0.95},
        "site-1": {"auc": 0.95},
        "site-2": {"auc": 0.79},
        "site-3": {"auc": math.nan},
    }
    flags = negative_transfer(federated, local)
    assert [s for s, v in flags.items() if v["flagged"]] == ["site-0"]
    assert flags["site-0"]["gap"] == 0.91 - 0.95
    assert not flags["site-1"]["flagged"]  # equal is not worse
    assert not flags["site-3"]["flagged"]  # no local number, no claim
    assert negative_transfer_line(flags) == (
        "Negative transfer: federated worse than local-only on validation AUC at site-0 (0.910 vs 0.950)"
    )
    # a margin tolerates small gaps
    assert not any(v["flagged"] for v in negative_transfer(federated, local, margin=0.05).values())
    assert negative_transfer_line(negative_transfer(federated, local, margin=0.05)).startswith(
        "Negative transfer: none"
    )


def test_kebab_case_federated_metrics_are_read() -> None:
    flags = negative_transfer({"a": {"auc": 0.6, "balanced-accuracy": 0.5}}, {"a": {"auc": 0.7}})
    assert flags["a"]["flagged"] and flags["a"]["federated_auc"] == 0.6


def test_ewc_line_names_each_fisher_source_and_its_sites() -> None:
    from fedshift.simulations.report import ewc_line

    history = {
        "1": {"site-0": {"ewc-fisher": "dp"}, "site-1": {"ewc-fisher": "public (synthetic images)"}},
        "2": {"site-0": {"ewc-fisher": "dp"}, "site-2": {"mechanism": "dp-sgd"}},
    }
    assert ewc_line(history, 10.0, "global") == (
        "EWC: lambda=10 towards the global anchor; Fisher from dp: site-0; public (synthetic images): site-1"
    )
    assert ewc_line({}, 1.0, "consolidated").endswith("no site (none reported)")
