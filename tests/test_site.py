"""Where a site's data and state live, in deployment and in simulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedshift.client.site import SiteSettings, load_local_state, save_local_state
from fedshift.common.config import RELEASE_PRIVACY_KEYS, FederationConfig, PrivacyConfig
from fedshift.common.errors import ConfigError, PrivacyError
from fedshift.common.model import ModelConfig, build_model


def test_deployment_node_config(tmp_path: Path) -> None:
    node = {
        "data-path": str(tmp_path / "h1.npz"),
        "state-dir": str(tmp_path / "state"),
        "site-name": "charite",
        "device": "cpu",
        "dp-epsilon": 6.0,
    }
    site = SiteSettings.from_node_config(node, FederationConfig(device="auto"))
    production = PrivacyConfig(enabled=True, epsilon=6.0, secure_rng=True)
    # the noise of its other DP releases is fedshift's default, whatever the run config says
    defaults = FederationConfig().to_run_config()
    releases = tuple((k, defaults[k]) for k in RELEASE_PRIVACY_KEYS)
    assert site == SiteSettings(
        "charite", tmp_path / "h1.npz", tmp_path / "state", "cpu", production, releases=releases
    )


def test_deployment_is_private_by_default(tmp_path: Path) -> None:
    """DP on and the secure RNG on unless the site says otherwise; a missing budget is refused."""
    node = {"data-path": str(tmp_path / "h1.npz")}
    with pytest.raises(PrivacyError, match="dp-epsilon"):
        SiteSettings.from_node_config(node, FederationConfig())
    with pytest.raises(
        PrivacyError, match="Expected node-config 'dp-epsilon' to be a number, but got 'eight'"
    ):
        SiteSettings.from_node_config({**node, "dp-epsilon": "eight"}, FederationConfig())
    with pytest.raises(PrivacyError, match="delta"):
        SiteSettings.from_node_config({**node, "dp-epsilon": 8.0, "dp-delta": 1e-3}, FederationConfig())
    off = SiteSettings.from_node_config({**node, "dp": False}, FederationConfig())
    assert not off.privacy.enabled
    # the federation's run config does not switch a site's DP off
    fed = FederationConfig.from_run_config({"dp": False})
    on = SiteSettings.from_node_config({**node, "dp-epsilon": 3}, fed)
    assert on.privacy.enabled and on.privacy.secure_rng and on.privacy.epsilon == 3.0


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


def test_simulated_site_reads_its_own_site_toml(tmp_path: Path) -> None:
    """A simulated hospital sets its own budget in site.toml, like a deployed one in its node config."""
    fed = FederationConfig(sites_root=str(tmp_path), privacy=PrivacyConfig(enabled=True, epsilon=8.0))
    (tmp_path / "site-1").mkdir()
    (tmp_path / "site-1" / "site.toml").write_text('dp-epsilon = 2.5\ndp-clip-norm = 0.5\ndevice = "cpu"\n')
    own = SiteSettings.from_node_config({"partition-id": 1}, fed)
    assert (own.privacy.epsilon, own.privacy.clip_norm, own.device) == (2.5, 0.5, "cpu")
    other = SiteSettings.from_node_config({"partition-id": 0}, fed)
    assert (other.privacy.epsilon, other.privacy.clip_norm) == (8.0, 1.0)
    (tmp_path / "site-1" / "site.toml").write_text("dp-epsilon = 2.5\ndp-budget = 3\n")
    with pytest.raises(
        ConfigError, match=r"'dp-budget' to be a known key .* but got unknown key 'dp-budget' = 3;"
    ):
        SiteSettings.from_node_config({"partition-id": 1}, fed)
    (tmp_path / "site-1" / "site.toml").write_text("dp-epsilon = \n")
    with pytest.raises(ConfigError, match="valid TOML"):
        SiteSettings.from_node_config({"partition-id": 1}, fed)
    (tmp_path / "site-1" / "site.toml").write_text('dp-epsilon = "lots"\n')
    with pytest.raises(
        PrivacyError, match="Expected node-config 'dp-epsilon' to be a number, but got 'lots'"
    ):
        SiteSettings.from_node_config({"partition-id": 1}, fed)


def test_a_manifest_site_reloads_when_a_listed_image_changes(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from fedshift.client.site import load_site_data
    from fedshift.common.data import Dataset, make_synthetic_cxr
    from fedshift.simulations.manifest_export import export_manifest

    manifest = export_manifest(make_synthetic_cxr(30, seed=2), tmp_path / "export", fmt="png")
    site = SiteSettings("site-a", manifest, tmp_path / "state", "cpu", image_size=28)
    first = load_site_data(site)
    assert load_site_data(site) is first  # read once per process
    changed = tmp_path / "export" / "images" / "train" / "000003.png"
    Image.fromarray(np.full((28, 28), 7, np.uint8)).save(changed)  # same name, new pixels; manifest untouched
    again = load_site_data(site)
    assert again is not first

    def flat(data: Dataset) -> int:  # images that are all 7: the new file's pixels
        return sum(1 for s in data.splits.values() for img in s.images if (img == 7).all())

    assert (flat(first), flat(again)) == (0, 1)
