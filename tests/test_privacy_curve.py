"""The privacy-utility curve benchmark: its --epsilons, its aggregation over seeds, its JSON and plot,
and (slow) one tiny real run through ``fedshift simulate``'s runner."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedshift.common.config import DP_RECIPE, FederationConfig
from fedshift.common.errors import ConfigError
from fedshift.simulations.benchmarks.privacy_curve import (
    CURVE_FILE,
    PLOT_FILE,
    SeedResult,
    curve_report,
    format_table,
    main,
    parse_epsilons,
    summarise,
    write_curve,
)
from fedshift.tests.helpers import one_line_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(auc: float, sites: dict[str, float], spent: dict[str, float] | None = None) -> SeedResult:
    return SeedResult(mean_auc=auc, site_auc=sites, ledger_epsilon=spent or {}, run_dir="r")


# ------------------------------------------------------------------ --epsilons


def test_epsilons_are_sorted_and_accept_inf() -> None:
    assert parse_epsilons("8,1,inf,2, 4") == (1.0, 2.0, 4.0, 8.0, math.inf)
    assert parse_epsilons("inf") == (math.inf,)
    assert parse_epsilons("0.5") == (0.5,)


@pytest.mark.parametrize("text", ["8,8", "inf,Infinity", "1,1.0"])
def test_duplicate_epsilons_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="each budget once"):
        parse_epsilons(text)


@pytest.mark.parametrize("text", ["0", "-1,8", "eight", "nan", "1,,2", "-inf"])
def test_bad_epsilons_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"Expected --epsilons to be .* budgets > 0 or inf"):
        parse_epsilons(text)


@pytest.mark.parametrize("text", ["", " "])
def test_an_empty_list_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="at least one budget"):
        parse_epsilons(text)


@pytest.mark.parametrize(("text", "needle"), [("0,inf", "'0'"), ("8,x", "'x'"), ("", "at least one")])
def test_the_command_refuses_bad_epsilons_in_one_line(
    text: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--epsilons", text, "--out", str(tmp_path / "r")])
    one_line_error(code, capsys.readouterr().err, "--epsilons", needle)
    assert not (tmp_path / "r").exists()  # refused before anything ran


@pytest.mark.parametrize("flags", [["--epsilon", "8"], ["--no-dp"]])
def test_the_command_refuses_simulates_epsilon_and_no_dp(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([*flags, "--out", str(tmp_path / "r")])
    one_line_error(code, capsys.readouterr().err, "--epsilons", flags[0])


# ------------------------------------------------------------------ aggregation over seeds


def test_summarise_matches_numpy() -> None:
    aucs = {0: 0.91, 1: 0.87, 2: 0.95}
    spent = {0: {"site-0": 7.9, "site-1": 7.5}, 1: {"site-0": 7.99, "site-1": 7.2}, 2: {"site-0": 6.0}}
    per_seed = {s: _result(a, {"site-0": a}, spent[s]) for s, a in aucs.items()}
    summary = summarise(per_seed)
    values = np.array([0.91, 0.87, 0.95])
    assert summary["mean_auc"] == pytest.approx(np.mean(values), abs=1e-15)
    assert summary["sd_auc"] == pytest.approx(np.std(values, ddof=1), abs=1e-15)
    assert summary["ledger_epsilon_max"] == 7.99
    assert list(summary["per_seed"]) == ["0", "1", "2"]
    assert summary["per_seed"]["1"]["mean_auc"] == 0.87
    assert summary["per_seed"]["2"]["ledger_epsilon"] == {"site-0": 6.0}


def test_one_seed_has_no_sd_and_no_dp_has_no_ledger() -> None:
    summary = summarise({3: _result(0.8, {"site-0": 0.8})})
    assert summary["mean_auc"] == 0.8
    assert math.isnan(summary["sd_auc"])
    assert summary["ledger_epsilon_max"] is None


def _hand_made() -> dict:
    sites = {"site-0": 0.9, "site-1": 0.8}
    points = {
        1.0: {
            0: _result(0.70, sites, {"site-0": 0.99, "site-1": 0.98}),
            1: _result(0.74, sites, {"site-0": 1.0}),
        },
        8.0: {0: _result(0.85, sites, {"site-0": 7.9}), 1: _result(0.83, sites, {"site-1": 7.5})},
        math.inf: {0: _result(0.90, sites), 1: _result(0.88, sites)},
    }
    local = {0: _result(0.86, sites), 1: _result(0.84, sites)}
    return curve_report(
        points,
        points[math.inf],
        local,
        data="SYNTHETIC",
        synthetic=True,
        sites=["site-0", "site-1"],
        seeds=[0, 1],
        delta=1e-5,
        accountant="rdp",
    )


def test_the_report_holds_every_point_and_its_statistics() -> None:
    report = _hand_made()
    assert list(report["curve"]) == ["1", "8", "inf"]
    assert report["epsilons"] == [1.0, 8.0, None]
    assert report["curve"]["1"]["mean_auc"] == pytest.approx(np.mean([0.70, 0.74]))
    assert report["curve"]["8"]["sd_auc"] == pytest.approx(np.std([0.85, 0.83], ddof=1))
    assert report["curve"]["inf"]["dp"] is False and report["curve"]["inf"]["epsilon"] is None
    assert report["curve"]["inf"]["mean_auc"] == report["no_dp"]["mean_auc"]
    assert report["local_only"]["mean_auc"] == pytest.approx(0.85)
    table = format_table(report)
    assert "inf (no DP)" in table and "local-only" in table and "7.900" in table


# ------------------------------------------------------------------ JSON and PNG


def test_the_writer_writes_json_equal_to_its_input_and_a_png(tmp_path: Path) -> None:
    report = _hand_made()
    json_path, png_path = write_curve(report, tmp_path / "out")
    assert json_path == tmp_path / "out" / CURVE_FILE and png_path == tmp_path / "out" / PLOT_FILE
    assert png_path.read_bytes()[:8] == PNG_MAGIC and png_path.stat().st_size > 1000
    written = json.loads(json_path.read_text())  # strict JSON: sd of one seed would be null, never NaN
    for key in ("1", "8", "inf"):
        point, source = written["curve"][key], report["curve"][key]
        for number in ("mean_auc", "sd_auc", "ledger_epsilon_max", "epsilon"):
            assert point[number] == source[number]
        for seed, per_seed in source["per_seed"].items():
            assert point["per_seed"][seed] == per_seed
    for key in ("no_dp", "local_only"):
        assert written[key]["mean_auc"] == report[key]["mean_auc"]
        assert written[key]["sd_auc"] == report[key]["sd_auc"]
    assert written["epsilons"] == [1.0, 8.0, None]


def test_the_writer_plots_without_finite_budgets_or_sd(tmp_path: Path) -> None:
    sites = {"site-0": 0.9}
    only = {math.inf: {0: _result(0.9, sites)}}
    report = curve_report(
        only,
        only[math.inf],
        {0: _result(0.8, sites)},
        data="d",
        sites=["site-0"],
        seeds=[0],
        delta=1e-5,
        accountant="rdp",
    )
    json_path, png_path = write_curve(report, tmp_path)
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    assert json.loads(json_path.read_text())["curve"]["inf"]["sd_auc"] is None


# ------------------------------------------------------------------ one tiny real run (slow)

TINY = ["--sites", "2", "--synthetic-n", "160", "--rounds", "2", "--local-epochs", "1", "--image-size", "32"]


@pytest.mark.slow
def test_a_tiny_curve_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "curve"
    args = [*TINY, "--device", "cpu", "--epsilons", "8,inf", "--seeds", "0", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "inf (no DP)" in printed and "local-only" in printed

    report = json.loads((out / CURVE_FILE).read_text())
    assert (out / PLOT_FILE).read_bytes()[:8] == PNG_MAGIC
    assert list(report["curve"]) == ["8", "inf"] and report["sites"] == ["site-0", "site-1"]

    dp = report["curve"]["8"]["per_seed"]["0"]
    assert sorted(dp["ledger_epsilon"]) == ["site-0", "site-1"]
    for spent in dp["ledger_epsilon"].values():
        assert 0 < spent <= 8.0
    assert report["curve"]["8"]["ledger_epsilon_max"] == max(dp["ledger_epsilon"].values())
    dp_run = json.loads((out / "seed-0" / "epsilon-8" / "results.json").read_text())
    assert dp_run["privacy"]["dp"] is True and dp_run["privacy"]["epsilon_budget"] == 8.0
    assert dp_run["federated_no_dp_test"] is None and dp_run["local_only_test"] is None  # nothing twice
    assert dp["mean_auc"] == dp_run["mean_test_auc"]["federated"]

    # the inf point is the no-DP run's numbers, read back from that run's own results.json
    no_dp_run = json.loads((out / "seed-0" / "no-dp" / "results.json").read_text())
    assert no_dp_run["privacy"]["dp"] is False
    inf = report["curve"]["inf"]["per_seed"]["0"]
    assert inf["mean_auc"] == no_dp_run["mean_test_auc"]["federated"] == report["no_dp"]["mean_auc"]
    assert inf["site_auc"] == {s: m["auc"] for s, m in no_dp_run["federated_test"].items()}
    assert inf["ledger_epsilon"] == {}
    local = report["local_only"]["per_seed"]["0"]
    assert local["mean_auc"] == no_dp_run["mean_test_auc"]["local_only"]
    assert local["site_auc"] == {s: m["auc"] for s, m in no_dp_run["local_only_test"].items()}
    assert dp_run["sites"] == no_dp_run["sites"]  # the same sites at every budget
    # the DP point runs the DP recipe, the no-DP point simulate's --no-dp run (the declared defaults)
    dp_config = json.loads((out / "seed-0" / "epsilon-8" / "config.json").read_text())["run_config"]
    no_dp_config = json.loads((out / "seed-0" / "no-dp" / "config.json").read_text())["run_config"]
    defaults = FederationConfig().to_run_config()
    assert {k: dp_config[k] for k in DP_RECIPE} == DP_RECIPE
    assert {k: no_dp_config[k] for k in DP_RECIPE} == {k: defaults[k] for k in DP_RECIPE}
