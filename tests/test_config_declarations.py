"""Every run-config key, from its declaration: one strictness and one error shape for all of them.

The keys are enumerated from the declarations (``all_settings(FederationConfig)``), so a new key is
covered here without editing this file.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import replace
from typing import Any

import pytest

from fedshift.common.config import (
    RUN_CONFIG_MAXIMUM,
    FederationConfig,
    TrainConfig,
    add_arguments,
    run_config_from_arguments,
    run_config_keys,
)
from fedshift.common.errors import FedshiftError
from fedshift.common.settings import Setting, all_settings, setting_of

SETTINGS = all_settings(FederationConfig)
KEYS = [s.key for s in SETTINGS]
SHAPE = re.compile(
    r"^Expected run-config '(?P<key>[a-z0-9-]+)' to be (?P<what>.+), but got (?P<got>.+); (?P<fix>.+)$"
)


def _error(values: dict[str, Any]) -> str:
    with pytest.raises(FedshiftError) as info:
        FederationConfig.from_run_config(values)
    return str(info.value)


def _assert_shape(message: str, key: str, value: Any) -> re.Match[str]:
    assert "\n" not in message
    match = SHAPE.match(message)
    assert match is not None, message
    assert match["key"] == key and repr(value) in match["got"], message
    return match


def _wrong_type(s: Setting) -> Any:
    """A wrong type: text for numbers and booleans (even text that reads as one), else a number."""
    if s.kind is str:
        return 3
    return "true" if s.kind is bool else str(s.default if math.isfinite(s.default) else 8.0)


def _out_of_range(s: Setting) -> list[Any]:
    """Values just outside the declared range (empty when the key has none)."""
    out: list[Any] = []
    step = 1 if s.kind is int else 0.5
    if s.minimum is not None:
        out.append(s.kind(s.minimum - step))
    if s.above is not None:  # the bound itself, or below it where the bound is the "not set" stand-in
        out.append(s.kind(s.above if s.above != s.unset else s.above - step))
    if s.maximum is not None:
        out.append(s.kind(s.maximum + step))
    if s.choices is not None:
        out.append("no-such-choice")
    return out


def test_the_declared_keys_are_the_run_config() -> None:
    """One declaration per key, in to_run_config order (the pyproject and the FAB are written from it)."""
    assert KEYS == list(FederationConfig().to_run_config()) == run_config_keys()
    assert len(set(KEYS)) == len(KEYS)
    assert all(s.help for s in SETTINGS)
    assert {s.key: s.maximum for s in SETTINGS if s.cap} == RUN_CONFIG_MAXIMUM


@pytest.mark.parametrize("key", KEYS)
def test_a_wrong_type_is_refused_in_one_line(key: str) -> None:
    s = setting_of(FederationConfig, key)
    value = _wrong_type(s)
    _assert_shape(_error({key: value}), key, value)


@pytest.mark.parametrize("key", KEYS)
def test_an_out_of_range_value_is_refused_in_one_line(key: str) -> None:
    s = setting_of(FederationConfig, key)
    for value in _out_of_range(s):
        match = _assert_shape(_error({key: value}), key, value)
        if s.cap and value > s.maximum:
            assert match["what"] == f"at most {s.maximum:g}" and "lower it" in match["fix"]


@pytest.mark.parametrize("key", KEYS)
def test_an_unknown_key_is_refused_in_one_line(key: str) -> None:
    typo = key + "s"
    message = _error({typo: 1})
    match = _assert_shape(message, typo, 1)
    assert match["what"].startswith("a known key") and key in match["what"] and "spelling" in match["fix"]


@pytest.mark.parametrize("key", [s.key for s in SETTINGS if s.kind in (int, float)])
def test_numbers_accept_ints_for_floats_and_integral_floats_for_ints(key: str) -> None:
    s = setting_of(FederationConfig, key)
    default = FederationConfig().to_run_config()[key]
    other = float(default) if s.kind is int else default
    if s.kind is float and math.isfinite(default) and float(default).is_integer():
        other = int(default)
    parsed = FederationConfig.from_run_config({key: other}).to_run_config()[key]
    assert parsed == default and type(parsed) is type(default)


def test_the_flags_come_from_the_declarations() -> None:
    """Every key is a flag with its help; the overrides returned are exactly what was given."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, flags={"learning-rate": ["--lr", "--learning-rate"]})
    text = parser.format_help()
    for key in KEYS:
        assert f"run-config {key}" in " ".join(text.split()).replace("- ", "-")
    assert run_config_from_arguments(parser.parse_args([])) == {}
    args = parser.parse_args(
        ["--lr", "0.01", "--no-local-norm", "--dp-accountant", "prv", "--ls-bootstrap", "20"]
    )
    given = run_config_from_arguments(args)
    assert given == {"learning-rate": 0.01, "local-norm": False, "dp-accountant": "prv", "ls-bootstrap": 20}
    fed = FederationConfig.from_run_config(given)
    assert (fed.train.learning_rate, fed.model.local_norm, fed.privacy.accountant) == (0.01, False, "prv")
    with pytest.raises(SystemExit):
        parser.parse_args(["--finetune", "everything"])  # choices from the fine-tuning registry


def test_a_cli_default_is_returned_and_shown() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(
        parser,
        keys=["num-server-rounds"],
        flags={"num-server-rounds": ["--rounds"]},
        defaults={"num-server-rounds": 5},
    )
    assert run_config_from_arguments(parser.parse_args([])) == {"num-server-rounds": 5}
    assert run_config_from_arguments(parser.parse_args(["--rounds", "3"])) == {"num-server-rounds": 3}
    assert "(default: 5)" in parser.format_help()


def test_the_caps_bound_a_run_config_not_what_code_builds() -> None:
    """A site refuses local-epochs 30 from a run config; the local-only baseline builds rounds x epochs."""
    with pytest.raises(
        FedshiftError, match=r"Expected run-config 'local-epochs' to be .* but got 30; lower it"
    ):
        FederationConfig.from_run_config({"local-epochs": 30})
    with pytest.raises(FedshiftError, match=r"'batch-size' .* but got 2048; lower it"):
        FederationConfig.from_run_config({"batch-size": 2048})
    built = replace(TrainConfig(), local_epochs=30, batch_size=2048)  # the baseline's and a benchmark's own
    assert (built.local_epochs, built.batch_size) == (30, 2048)
    with pytest.raises(FedshiftError, match="'lr-decay'"):  # a range that is not a cap still holds
        TrainConfig(lr_decay=2.0)
