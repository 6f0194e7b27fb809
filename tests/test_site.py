"""Where a site's data and state live, in deployment and in simulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedshift.client.site import SiteSettings, load_local_state, save_local_state
from fedshift.common.config import FederationConfig
from fedshift.common.errors import ConfigError
from fedshift.common.model import ModelConfig, build_model


def test_deployment_node_config(tmp_path: Path) -> None:
    node = {
        "data-path": str(tmp_path / "h1.npz"),
        "state-dir": str(tmp_path / "state"),
        "site-name": "charite",
        "device": "cpu",
    }
    site = SiteSettings.from_node_config(node, FederationConfig(device="auto"))
    assert site == SiteSettings("charite", tmp_path / "h1.npz", tmp_path / "state", "cpu")


def test_simulation_partition(tmp_path: Path) -> None:
    site = SiteSettings.from_node_config(
        {"partition-id": 3, "num-partitions": 4}, FederationConfig(sites_root=str(tmp_path))
    )
    assert site == SiteSettings("site-3", tmp_path / "site-3" / "data.npz", tmp_path / "site-3", "auto")


def test_no_data_location() -> None:
    with pytest.raises(ConfigError, match="data-path"):
        SiteSettings.from_node_config({"partition-id": 0}, FederationConfig())


def test_local_state_round_trip(tmp_path: Path) -> None:
    assert load_local_state(tmp_path) is None
    model = build_model(ModelConfig(image_size=32))
    with torch.no_grad():
        for p in model.input_adapter.parameters():
            p.add_(0.25)
    save_local_state(tmp_path, model.local_state_dict())
    fresh = build_model(ModelConfig(image_size=32))
    state = load_local_state(tmp_path)
    assert state is not None
    fresh.load_local_state_dict(state)
    for key, value in model.local_state_dict().items():
        torch.testing.assert_close(fresh.local_state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="another model configuration"):
        build_model(ModelConfig(image_size=32, local_norm=False)).load_local_state_dict(state)
