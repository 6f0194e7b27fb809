"""The experiment options of ``fedshift simulate`` and ``fedshift shift-study``: one option set, two presets.

References: the run configs the two commands built by hand before they shared the
option set (written out here field by field), and the config declarations.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedshift.common.cli import build_parser
from fedshift.common.config import (
    DP_RECIPE,
    AggregationConfig,
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    ShiftConfig,
    TrainConfig,
)
from fedshift.common.settings import all_settings
from fedshift.simulations.experiment import ExperimentSpec
from fedshift.simulations.options import FLAGS, GROUPS, budgets, experiment_spec, federation, reference
from fedshift.simulations.shift_study import StudySpec


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_simulate_without_dp_runs_the_declared_defaults() -> None:
    args = _parse("simulate", "--no-dp")
    fed = federation(args, {"min-nodes": min(2, args.sites)}, args.sites)
    assert fed == FederationConfig()
    spec = experiment_spec(args, fed, Path("out"), ExperimentSpec)
    assert spec == ExperimentSpec(out_dir=Path("out"), federation=FederationConfig())


def test_simulate_is_private_by_default_with_the_dp_recipe_and_a_no_dp_reference() -> None:
    args = _parse("simulate")
    preset = {"min-nodes": min(2, args.sites)}
    fed = federation(args, preset, args.sites)
    # by hand: the declared defaults with DP-SGD at epsilon 8, delta 1e-5, fedavgm and a zero head
    private = FederationConfig(
        privacy=PrivacyConfig(enabled=True, epsilon=8.0, delta=1e-5),
        model=ModelConfig(head_init="zero"),
        train=TrainConfig(learning_rate=3e-3),
        aggregation=AggregationConfig(server_optimizer="fedavgm"),
    )
    assert fed == private
    assert set(DP_RECIPE) == {"server-optimizer", "head-init", "learning-rate"}  # what is spelled out above
    assert reference(args, preset, args.sites) == FederationConfig()  # --no-dp: the non-DP recipe
    assert experiment_spec(args, fed, Path("out"), ExperimentSpec).site_epsilons is None  # one budget


def test_a_value_the_user_sets_beats_the_dp_recipe_in_both_runs() -> None:
    args = _parse("simulate", "--server-optimizer", "fedadam", "--head-init", "random", "--epsilon", "2")
    fed = federation(args, {}, 4)
    assert (fed.aggregation.server_optimizer, fed.model.head_init, fed.privacy.epsilon) == (
        "fedadam",
        "random",
        2,
    )
    ref = reference(args, {}, 4)
    assert (ref.aggregation.server_optimizer, ref.model.head_init, ref.privacy.enabled) == (
        "fedadam",
        "random",
        False,
    )


def test_epsilon_and_no_dp_together_are_refused() -> None:
    from fedshift.common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"either --epsilon or --no-dp.*--epsilon 8"):
        federation(_parse("simulate", "--epsilon", "8", "--no-dp"), {}, 4)


def test_shift_study_is_private_only_with_epsilon() -> None:
    args = _parse("shift-study")
    assert budgets(args) is None and budgets(_parse("shift-study", "--epsilon", "4")) == (4.0,)


def test_shift_study_preset_is_the_study_it_replaced() -> None:
    args = _parse("shift-study")
    args.sites = len(args.prevalences)
    fed = federation(args, {}, args.sites)
    # what shift-study's own option set built before
    before = FederationConfig(
        num_rounds=5,
        model=ModelConfig(image_size=32),
        train=TrainConfig(learning_rate=3e-3),
        shift=ShiftConfig(
            correction=True, min_samples=30, threshold=True, align_weight=0.01, align_clip=1.0, tta=True
        ),
    )
    assert fed.to_run_config() == before.to_run_config()
    assert fed == before
    spec = experiment_spec(args, fed, Path("out"), StudySpec)
    assert (spec.data, spec.prevalences, spec.max_per_site, spec.sites) == (
        "../shared/data/pneumoniamnist.npz",
        (0.05, 0.1, 0.5, 0.9, 0.95),
        600,
        5,
    )


def test_flags_set_their_run_config_keys() -> None:
    argv = ["--lr", "0.002", "--no-local-norm", "--epsilon", "8,4,8,2", "--accountant", "prv"]
    argv += ["--ls-correction", "--align-weight", "0.1", "--prior-method", "bbse", "--ewc-lambda", "5"]
    args = _parse("simulate", *argv)
    fed = federation(args, {}, 4)
    rc = fed.to_run_config()
    assert (rc["learning-rate"], rc["local-norm"], rc["dp"], rc["dp-epsilon"], rc["dp-accountant"]) == (
        0.002,
        False,
        True,
        8.0,
        "prv",
    )
    assert (rc["ls-correction"], rc["align-weight"], rc["ls-prior-method"], rc["ewc-lambda"]) == (
        True,
        0.1,
        "bbse",
        5.0,
    )
    assert experiment_spec(args, fed, Path("o"), ExperimentSpec).site_epsilons == (8.0, 4.0, 8.0, 2.0)


def test_strategy_is_an_alias_of_finetune() -> None:
    assert _parse("simulate", "--strategy", "adapters,full").finetune == ("adapters", "full")
    assert _parse("simulate", "--finetune", "linear-probe").finetune == ("linear-probe",)
    assert _parse("shift-study", "--strategy", "partial").finetune == ("partial",)


def test_every_run_config_flag_comes_from_its_declaration() -> None:
    declared = {s.key: s for s in all_settings(FederationConfig)}
    for command in ("simulate", "shift-study"):
        sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        actions = {a.dest: a for a in sub._actions}
        for key in (k for keys in GROUPS.values() for k in keys):
            action = actions[f"run_config:{key}"]
            assert set(FLAGS.get(key, [f"--{key}"])) <= set(action.option_strings)
            assert declared[key].help.replace("%", "%%") in str(action.help)
            if declared[key].choices is not None:
                assert list(action.choices or ()) == declared[key].names()


@pytest.mark.parametrize("command", ["simulate", "shift-study"])
def test_a_bad_value_is_refused_naming_the_key(command: str) -> None:
    from fedshift.common.errors import ConfigError

    args = _parse(command, "--align-weight", "-1")
    with pytest.raises(ConfigError, match=r"align-weight.*-1"):
        federation(args, {}, 4)


def test_zero_per_run_cap_flag_reads_as_no_cap_like_the_run_config() -> None:
    fed = federation(_parse("simulate", "--epsilon", "8", "--dp-epsilon-per-run", "0"), {}, 4)
    assert (
        fed.privacy.epsilon_per_run
        == FederationConfig.from_run_config({"dp-epsilon-per-run": 0}).privacy.epsilon_per_run
    )
    assert fed.privacy.epsilon_per_run == float("inf")
    capped = federation(_parse("simulate", "--epsilon", "8", "--dp-epsilon-per-run", "2.5"), {}, 4)
    assert capped.privacy.epsilon_per_run == 2.5
