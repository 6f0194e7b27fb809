"""Grad-CAM: the maps against an independent autograd computation, the overlays, the PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fedshift.client.explain import OVERLAY_ALPHA, grad_cam, overlay, target_layer, write_explanations
from fedshift.common.adapters import backbone_stages
from fedshift.common.data import make_synthetic_cxr, to_tensor
from fedshift.common.errors import ConfigError
from fedshift.common.model import FedshiftModel, ModelConfig, build_model


@pytest.fixture(scope="module")
def model() -> FedshiftModel:
    m = build_model(ModelConfig(image_size=64, seed=4))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in m.trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return m


def _independent_cam(model: FedshiftModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM by hand: the last stage's output replaced by a leaf, ``torch.autograd.grad`` on it."""
    leaf: list[torch.Tensor] = []

    def swap(_m: torch.nn.Module, _i: object, output: torch.Tensor) -> torch.Tensor:
        leaf.append(output.detach().requires_grad_(True))
        return leaf[-1]

    handle = backbone_stages(model.backbone)[-1].register_forward_hook(swap)
    try:
        logits = model(to_tensor(images, 64))
    finally:
        handle.remove()
    predicted = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits[torch.arange(len(images)), predicted].sum(), leaf[0])
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * leaf[0]).sum(1, keepdim=True))
    up = F.interpolate(cam, size=images.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    return up.detach().numpy(), predicted.numpy()


def test_grad_cam_equals_an_independent_computation(model: FedshiftModel) -> None:
    images = make_synthetic_cxr(6, size=28, seed=2).split("train").images
    cams, predicted = grad_cam(model, images, batch_size=4)  # two batches
    reference, ref_predicted = _independent_cam(model, images)
    assert cams.shape == (6, 28, 28)
    np.testing.assert_array_equal(predicted, ref_predicted)
    np.testing.assert_allclose(cams, reference, rtol=1e-5, atol=1e-7 * float(reference.max()))
    assert float(cams.min()) >= 0.0 and float(cams.max()) > 0.0
    assert all(p.grad is None for p in model.parameters())  # nothing left behind in the model
    assert target_layer(model) is backbone_stages(model.backbone)[-1]
    with pytest.raises(ConfigError, match="stage index"):
        target_layer(model, 99)


def test_overlay_closed_form() -> None:
    image = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    grey = np.repeat(image[..., None], 3, axis=2)
    np.testing.assert_array_equal(overlay(image, np.zeros((3, 4))), grey)  # no map: the image itself
    cam = np.zeros((3, 4))
    cam[1, 2] = 5.0  # the peak gets the full alpha of pure red
    expected = np.rint(
        image[1, 2] / 255.0 * (1 - OVERLAY_ALPHA) * 255.0 + np.array([1, 0, 0]) * OVERLAY_ALPHA * 255
    )
    np.testing.assert_array_equal(overlay(image, cam)[1, 2], expected.astype(np.uint8))
    np.testing.assert_array_equal(overlay(image, cam)[0, 0], grey[0, 0])


def test_write_explanations_writes_the_first_k_overlays(model: FedshiftModel, tmp_path: Path) -> None:
    images = make_synthetic_cxr(5, size=32, seed=3).split("train").images
    ids = [f"scan-{i}.png" for i in range(5)]
    paths = write_explanations(model, images, tmp_path / "explain", 3, ids=ids)
    assert [p.name for p in paths] == [f"scan-{i}.png-gradcam.png" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "explain").iterdir()) == [p.name for p in paths]
    cams, _ = grad_cam(model, images[:3])
    for path, image, cam in zip(paths, images[:3], cams, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), overlay(image, cam))
    assert len(write_explanations(model, images, tmp_path / "all", 50)) == 5  # k beyond N: every image
    assert (tmp_path / "all" / "00004-gradcam.png").is_file()


@pytest.mark.parametrize("k", [0, -1, True, 2.5])
def test_write_explanations_refuses_a_bad_k(model: FedshiftModel, tmp_path: Path, k: object) -> None:
    images = make_synthetic_cxr(2, size=32, seed=3).split("train").images
    with pytest.raises(ConfigError, match="positive integer"):
        write_explanations(model, images, tmp_path, k)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="one id per image"):
        write_explanations(model, images, tmp_path, 1, ids=["a"])
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_grad_cam_mass_falls_on_the_lesion(monkeypatch: pytest.MonkeyPatch) -> None:
    """SYNTHETIC lesions: mass of the last stage's map inside the 2-sigma disk around each lesion.

    Measured (seed 0, 224 px, adapters, 150 training images, 4 epochs): 0.249 of the mass in a disk covering
    0.062 of the image (4x chance), on the 26 correctly classified lesion images. Not yet "most": see the
    next-session notes; the threshold sits below the measurement with margin.
    """
    from fedshift.client.training import train_local
    from fedshift.common import synthetic_cxr
    from fedshift.common.data import ImageSet
    from fedshift.common.train_config import TrainConfig

    size, n, seen = 224, 200, []
    render = synthetic_cxr._render_cxr

    def recording(p: dict[str, np.ndarray], side: int) -> np.ndarray:
        seen.append({k: p[k][:, 0, 0] for k in ("les_x", "les_y", "les_sigma")})
        return render(p, side)

    monkeypatch.setattr(synthetic_cxr, "_render_cxr", recording)
    images, labels = synthetic_cxr.render_synthetic_cxr(n, 0.5, size, seed=0)
    lesions = {k: np.concatenate([s[k] for s in seen]) for k in seen[0]}
    model = build_model(ModelConfig(image_size=size, seed=0))
    train = slice(0, 150)
    config = TrainConfig(local_epochs=4, learning_rate=3e-3)
    train_local(model, ImageSet(images=images[train], labels=labels[train]), config, torch.device("cpu"))
    cams, predicted = grad_cam(model, images[150:])
    axis = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    fractions, areas = [], []
    for i in np.flatnonzero((labels[150:] == 1) & (predicted == 1)):
        j = 150 + i
        disk = np.hypot(yy - lesions["les_y"][j], xx - lesions["les_x"][j]) <= 2 * lesions["les_sigma"][j]
        fractions.append(cams[i][disk].sum() / cams[i].sum())
        areas.append(disk.mean())
    assert len(fractions) >= 15
    assert float(np.mean(fractions)) >= 0.15
    assert float(np.mean(fractions)) >= 2.5 * float(np.mean(areas))
