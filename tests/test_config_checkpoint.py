"""Run-config parsing and checkpoint integrity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedshift.common.checkpoint import load_checkpoint, save_checkpoint
from fedshift.common.config import FederationConfig
from fedshift.common.errors import CheckpointError, ConfigError
from fedshift.common.model import ModelConfig


def test_run_config_round_trip() -> None:
    cfg = FederationConfig(num_rounds=7, seed=3, model=ModelConfig(image_size=48, adapter_rank=2, seed=3))
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg


def test_pyproject_run_config_is_complete() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(run_config) == set(FederationConfig().to_run_config())
    assert FederationConfig.from_run_config(run_config) == FederationConfig()


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("num-server-rounds", "five", "num-server-rounds"),
        ("learning-rate", "fast", "learning-rate"),
        ("num-server-rounds", 0, "num-server-rounds"),
        ("adapter-rank", -1, "adapter-rank"),
        ("batch-size", True, "batch-size"),
    ],
)
def test_bad_run_config_values(key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        FederationConfig.from_run_config({key: value})


def test_unknown_run_config_key() -> None:
    with pytest.raises(ConfigError, match="num-rounds"):
        FederationConfig.from_run_config({"num-rounds": 3})


def test_checkpoint_round_trip_and_corruption(tmp_path: Path) -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    save_checkpoint(tmp_path, arrays, ModelConfig(), 1)
    save_checkpoint(tmp_path, {k: v * 2 for k, v in arrays.items()}, ModelConfig(adapter_rank=2), 2)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 2 and ckpt.model.adapter_rank == 2
    np.testing.assert_array_equal(ckpt.arrays["a"], arrays["a"] * 2)
    assert len(list(tmp_path.glob("adapters-round-*.safetensors"))) == 1  # older rounds removed

    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    tensor_file = tmp_path / manifest["file"]
    tensor_file.write_bytes(tensor_file.read_bytes()[:-3] + b"xyz")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        load_checkpoint(tmp_path)


def test_flower_recognises_the_app() -> None:
    """Flower's own pyproject validator accepts the app and resolves both components."""
    import tomllib

    from flwr.common.config import validate_config

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(config, check_module=True, project_dir=root)
    assert valid, errors
    assert config["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedshift.server.app:app",
        "clientapp": "fedshift.client.app:app",
    }
