"""Backbone registry: real pretrained weights, local weight files, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from fedshift.common.backbones import create_backbone, list_backbones, read_state_dict
from fedshift.common.errors import BackboneError


def test_default_backbone_recognises_a_cat() -> None:
    """The bundled ImageNet weights are really loaded: chelsea is an ImageNet cat (281-285)."""
    data = pytest.importorskip("skimage.data")
    model = create_backbone("efficientnet_lite0")
    img = torch.tensor(data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model((img - mean) / std).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"top-1 class {top}"
    assert top == 285 and probs[top] > 0.7  # "Egyptian cat", p ~ 0.79 per DESIGN.md


def test_backbone_is_frozen_and_in_eval_mode() -> None:
    model = create_backbone("efficientnet_lite0")
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_any_timm_model_with_local_weights(tmp_path: Path, suffix: str) -> None:
    reference = timm.create_model("test_efficientnet", pretrained=False)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)  # a wrapped checkpoint is unwrapped
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    model = create_backbone("test_efficientnet", weights=path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_unknown_backbone_suggests_names() -> None:
    with pytest.raises(BackboneError, match=r"efficientnet_lite0.*did you mean"):
        create_backbone("efficientnet_lite")


def test_timm_name_without_weights_is_refused() -> None:
    with pytest.raises(BackboneError, match="never downloads"):
        create_backbone("test_efficientnet")


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    other = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "resnet.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(BackboneError, match="fit the model"):
        create_backbone("test_efficientnet", weights=path)


def test_unreadable_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a tensor file")
    with pytest.raises(BackboneError, match="cannot be read"):
        read_state_dict(path)
    with pytest.raises(BackboneError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")


def test_registry_lists_default() -> None:
    assert "efficientnet_lite0" in list_backbones()
