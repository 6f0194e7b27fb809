"""Grad-CAM: the maps against an independent autograd computation, the overlays, the PNG files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fedshift.client.explain import (
    OVERLAY_ALPHA,
    OVERLAY_SUFFIX,
    POOLED,
    display_level,
    grad_cam,
    overlay,
    resolve_stage,
    target_layer,
    write_explanations,
)
from fedshift.common.adapters import backbone_stages
from fedshift.common.data import make_synthetic_cxr, to_tensor
from fedshift.common.errors import ConfigError
from fedshift.common.model import FedshiftModel, ModelConfig, build_model
from fedshift.tests.helpers import perturbed_model


@pytest.fixture(scope="module")
def model() -> FedshiftModel:
    return perturbed_model(64, seed=4, noise_seed=1)  # type: ignore[no-any-return]


def _independent_cam(
    model: FedshiftModel, images: np.ndarray, classes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM by hand on the last stage: its output replaced by a leaf, then ``torch.autograd.grad`` on
    it of the logit of ``classes`` (default: the predicted ones)."""
    leaf: list[torch.Tensor] = []

    def swap(_m: torch.nn.Module, _i: object, output: torch.Tensor) -> torch.Tensor:
        leaf.append(output.detach().requires_grad_(True))
        return leaf[-1]

    handle = backbone_stages(model.backbone)[-1].register_forward_hook(swap)
    try:
        logits = model(to_tensor(images, model.config.image_size))
    finally:
        handle.remove()
    predicted = logits.argmax(1) if classes is None else torch.as_tensor(classes)
    (grad,) = torch.autograd.grad(logits[torch.arange(len(images)), predicted].sum(), leaf[0])
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * leaf[0]).sum(1, keepdim=True))
    up = F.interpolate(cam, size=images.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    return up.detach().numpy(), predicted.numpy()


def _class_activation_map(model: FedshiftModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CAM (Zhou et al. 2016) in closed form: the head's weights of the predicted class on the feature map
    the global pool averages (EfficientNet's ``bn2`` output), over its area; no gradient involved."""
    features: list[torch.Tensor] = []
    handle = model.backbone.bn2.register_forward_hook(lambda _m, _i, out: features.append(out.detach()))
    try:
        with torch.no_grad():
            logits = model(to_tensor(images, model.config.image_size))
    finally:
        handle.remove()
    predicted = logits.argmax(1)
    a = features[0]
    weights = model.head.weight.detach()[predicted]  # (n, channels)
    cam = torch.relu(torch.einsum("nk,nkhw->nhw", weights, a)) / (a.shape[2] * a.shape[3])
    up = F.interpolate(cam[:, None], size=images.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    return up.numpy(), predicted.numpy()


def test_grad_cam_equals_an_independent_computation(model: FedshiftModel) -> None:
    images = make_synthetic_cxr(6, size=28, seed=2).split("train").images
    cams, predicted = grad_cam(model, images, stage=-1, batch_size=4)  # two batches
    reference, ref_predicted = _independent_cam(model, images)
    assert cams.shape == (6, 28, 28)
    np.testing.assert_array_equal(predicted, ref_predicted)
    np.testing.assert_allclose(cams, reference, rtol=1e-5, atol=1e-7 * float(reference.max()))
    assert float(cams.min()) >= 0.0 and float(cams.max()) > 0.0
    assert all(p.grad is None for p in model.parameters())  # nothing left behind in the model
    assert target_layer(model, -1) is backbone_stages(model.backbone)[-1]
    with pytest.raises(ConfigError, match="stage index"):
        target_layer(model, 99)
    # a given class: the other one's map, which differs from the predicted one's
    other = 1 - predicted
    cams_other, explained = grad_cam(model, images, stage=-1, classes=other)
    expected, _ = _independent_cam(model, images, classes=other)
    np.testing.assert_array_equal(explained, other)
    np.testing.assert_allclose(cams_other, expected, rtol=1e-5, atol=1e-7 * float(expected.max()))
    assert not np.allclose(cams_other, cams)


def test_the_pooled_map_is_the_class_activation_map(model: FedshiftModel) -> None:
    images = make_synthetic_cxr(6, size=28, seed=5).split("train").images
    cams, predicted = grad_cam(model, images, stage=POOLED, batch_size=4)  # the feature map the head pools
    reference, ref_predicted = _class_activation_map(model, images)
    np.testing.assert_array_equal(predicted, ref_predicted)
    np.testing.assert_allclose(cams, reference, rtol=1e-4, atol=1e-6 * float(reference.max()))
    assert float(reference.max()) > 0.0


def test_the_default_stage_is_the_deepest_map_of_at_least_7x7(
    model: FedshiftModel, caplog: pytest.LogCaptureFixture
) -> None:
    def sides(m: FedshiftModel) -> list[int]:
        shapes: list[int] = []
        hooks = [
            s.register_forward_hook(lambda _m, _i, o: shapes.append(o.shape[-1]))
            for s in backbone_stages(m.backbone)
        ]
        with torch.no_grad():
            m(torch.zeros(1, 1, m.config.image_size, m.config.image_size))
        for h in hooks:
            h.remove()
        return shapes

    assert sides(model) == [32, 16, 8, 4, 4, 2, 2]  # 64 px: the last stages (and the pooled map) are 2x2
    with caplog.at_level(logging.WARNING, logger="fedshift.client.explain"):
        assert resolve_stage(model) == -5  # the 8x8 stage
    assert "explaining stage -5 (8x8)" in caplog.text
    images = make_synthetic_cxr(3, size=28, seed=6).split("train").images
    np.testing.assert_array_equal(grad_cam(model, images)[0], grad_cam(model, images, stage=-5)[0])
    large = build_model(ModelConfig(image_size=224, seed=4))
    assert sides(large)[-1] == 7 and resolve_stage(large) == POOLED  # 224 px: the 7x7 map the head pools
    assert resolve_stage(model, 2) == -5 and resolve_stage(model, POOLED) == POOLED
    for bad in ("last", 99, True):
        with pytest.raises(ConfigError, match="Expected a stage index"):
            resolve_stage(model, bad)


def test_overlay_closed_form() -> None:
    image = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    grey = np.repeat(image[..., None], 3, axis=2)
    np.testing.assert_array_equal(overlay(image, np.zeros((3, 4))), grey)  # no map: the image itself
    cam = np.zeros((3, 4))
    cam[1, 2], cam[2, 3], cam[0, 1] = 8.0, 6.0, 4.0  # the peak, three quarters of it, half of it

    def blend(value: int, colour: list[float], alpha: float) -> np.ndarray:
        return np.rint((value / 255.0 * (1 - alpha) + np.array(colour) * alpha) * 255.0)

    peak = blend(image[1, 2], [1.0, 0.0, 0.0], OVERLAY_ALPHA)  # full alpha of pure red
    np.testing.assert_array_equal(overlay(image, cam)[1, 2], peak)
    mid = blend(image[2, 3], [0.5, 1.0, 0.0], OVERLAY_ALPHA * 0.5)  # level 0.5: halfway green -> yellow
    np.testing.assert_array_equal(overlay(image, cam)[2, 3], mid)
    np.testing.assert_array_equal(overlay(image, cam)[0, 1], grey[0, 1])  # at half the peak: no heat
    np.testing.assert_array_equal(overlay(image, cam)[0, 0], grey[0, 0])
    np.testing.assert_allclose(display_level(cam)[[1, 2, 0], [2, 3, 1]], [1.0, 0.5, 0.0])


def test_write_explanations_writes_the_first_k_overlays(
    model: FedshiftModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = make_synthetic_cxr(5, size=32, seed=3).split("train").images
    ids = ["lesion/scan 0.png", "normal/scan-1.png", "lesion_scan_0.png", "../up.png", "x"]
    out = tmp_path / "explain"
    with caplog.at_level(logging.WARNING, logger="fedshift.client.explain"):
        paths = write_explanations(model, images, out, 4, ids=ids)
    assert "only 2x2 for this 64 px model; explaining stage -5 (8x8) instead" in caplog.text
    names = ["lesion_scan_0.png", "normal_scan-1.png", "lesion_scan_0.png-2", "_up.png"]  # a clash gets -<i>
    assert [p.name for p in paths] == [f"{n}{OVERLAY_SUFFIX}" for n in names]
    assert sorted(tmp_path.iterdir()) == [out]  # no temporary sibling left
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    cams, _ = grad_cam(model, images[:4])
    for path, image, cam in zip(paths, images[:4], cams, strict=True):
        decoded = np.asarray(Image.open(path))
        assert decoded.shape == (32, 32, 3)
        np.testing.assert_array_equal(decoded, overlay(image, cam))
    # again into the same folder: replaced whole, the earlier overlays gone
    again = write_explanations(model, images, out, 50)  # k beyond N: every image, named by index
    assert (
        sorted(p.name for p in out.iterdir())
        == [f"{i:05d}{OVERLAY_SUFFIX}" for i in range(5)]
        == [p.name for p in again]
    )
    # the classes asked for, not the predicted ones
    other = 1 - grad_cam(model, images)[1]
    (path,) = write_explanations(model, images, tmp_path / "other", 1, classes=other)
    np.testing.assert_array_equal(
        np.asarray(Image.open(path)), overlay(images[0], grad_cam(model, images[:1], classes=other[:1])[0][0])
    )


@pytest.mark.parametrize("k", [0, -1, True, 2.5])
def test_write_explanations_refuses_a_bad_k(model: FedshiftModel, tmp_path: Path, k: object) -> None:
    images = make_synthetic_cxr(2, size=32, seed=3).split("train").images
    with pytest.raises(ConfigError, match="positive integer"):
        write_explanations(model, images, tmp_path / "out", k)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="one id per image"):
        write_explanations(model, images, tmp_path / "out", 1, ids=["a"])
    with pytest.raises(ConfigError, match="one class per image"):
        write_explanations(model, images, tmp_path / "out", 1, classes=np.zeros(3, dtype=np.int64))
    assert not any(tmp_path.iterdir())


def test_write_explanations_refuses_a_file_or_a_folder_of_other_files(
    model: FedshiftModel, tmp_path: Path
) -> None:
    images = make_synthetic_cxr(2, size=32, seed=3).split("train").images
    a_file = tmp_path / "report.txt"
    a_file.write_text("keep me")
    with pytest.raises(ConfigError, match="but it is a file"):
        write_explanations(model, images, a_file, 1)
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "patient.png").write_bytes(b"keep me too")
    with pytest.raises(ConfigError, match=r"holds 'patient\.png'; pass a new folder"):
        write_explanations(model, images, folder, 1)
    assert a_file.read_text() == "keep me" and [p.name for p in folder.iterdir()] == ["patient.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt", "scans"]


def test_synthetic_lesions_are_where_the_renderer_put_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedshift.common import synthetic_cxr

    seen: list[dict[str, np.ndarray]] = []
    render = synthetic_cxr._render_cxr

    def recording(p: dict[str, np.ndarray], side: int) -> np.ndarray:
        seen.append({k: p[k][:, 0, 0] for k in ("les_x", "les_y", "les_sigma", "les_amp")})
        return render(p, side)

    monkeypatch.setattr(synthetic_cxr, "_render_cxr", recording)
    _, labels = synthetic_cxr.render_synthetic_cxr(40, 0.5, 48, seed=7)
    lesions = synthetic_cxr.synthetic_lesions(40, 0.5, seed=7)
    for ours, theirs in zip(
        (lesions.x, lesions.y, lesions.sigma, lesions.amplitude), seen[0].values(), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs.astype(np.float64))
    assert np.array_equal(lesions.amplitude > 0, labels == 1)
    # the disk: pixels whose centres lie within 2 sigma; its area tends to pi (2 sigma)^2 / 4 of the image
    disks = lesions.disks(400)
    inside = (np.abs(lesions.x) < 1 - 2 * lesions.sigma) & (np.abs(lesions.y) < 1 - 2 * lesions.sigma)
    area = np.pi * (2 * lesions.sigma) ** 2 / 4
    np.testing.assert_allclose(disks.mean(axis=(1, 2))[inside], area[inside], rtol=0.02)
    j = int(np.flatnonzero(labels == 1)[0])
    row = int((lesions.y[j] + 1) / 2 * 48)
    col = int((lesions.x[j] + 1) / 2 * 48)
    assert lesions.disks(48)[j, row, col] and not lesions.disks(48, radius=0.01)[j, 0, 0]


def test_the_localisation_scores_in_closed_form() -> None:
    from fedshift.simulations.benchmarks.gradcam import localisation

    disks = np.zeros((3, 10, 10), dtype=bool)
    disks[:, 2:4, 5:9] = True  # 8 of 100 pixels
    on_disk = disks[0] * 3.0  # all the mass inside
    uniform = np.ones((10, 10))  # mass in proportion to the area; a flat map's peak is its first pixel
    ramp = np.zeros((10, 10))
    ramp[2:4, 5:9], ramp[7, 0] = 1.0, 4.0  # peak outside; the disk holds 8 of 12 raw, nothing shown
    scores = localisation(np.stack([on_disk, uniform, ramp]), disks)
    np.testing.assert_allclose(scores["raw"], [1.0, 0.08, 8 / 12])
    np.testing.assert_allclose(scores["minmax"], [1.0, 0.0, 8 * 0.25 / (8 * 0.25 + 1)])
    np.testing.assert_allclose(scores["shown"], [1.0, 0.08, 0.0])  # shown: from half the peak up
    np.testing.assert_array_equal(scores["pointing"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(scores["chance"], [0.08] * 3)


@pytest.mark.slow
def test_grad_cam_falls_on_the_lesion() -> None:
    """SYNTHETIC lesions, seed 0, as simulations/benchmarks/gradcam.py trains (224 px, adapters, 150 images,
    4 epochs): on the correctly classified lesion images, against the disk of 2 sigma around each lesion.

    Measured: 26 images, accuracy 0.96; the overlay as shown holds 0.591 of its mass in the disk, the raw
    map 0.328, the disk covers 0.0625 of the image; the map peaks inside the disk on 0.615 of the images.
    Over seeds 0-2 (the benchmark): shown 0.620, raw 0.330, pointing 0.624, chance 0.066.
    """
    from fedshift.simulations.benchmarks.gradcam import localisation, trained_model

    model, data = trained_model(seed=0, size=224, n=200, epochs=4)
    assert resolve_stage(model) == POOLED  # the default at 224 px: the 7x7 map the head pools
    cams, predicted = grad_cam(model, data["images"])
    assert float((predicted == data["labels"]).mean()) >= 0.9
    chosen = (data["labels"] == 1) & (predicted == 1)
    assert int(chosen.sum()) >= 20
    scores = {k: float(v.mean()) for k, v in localisation(cams[chosen], data["disks"][chosen]).items()}
    assert scores["shown"] >= 0.5  # most of what the overlay shows lies on the lesion
    assert scores["raw"] >= 0.25 and scores["raw"] >= 4 * scores["chance"]
    assert scores["pointing"] >= 0.45 and scores["pointing"] >= 5 * scores["chance"]
    assert 0.05 <= scores["chance"] <= 0.08
