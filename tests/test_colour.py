"""Colour modalities: RGB data, the 3->3 input adapter, colour scanner profiles and a colour federation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from skimage.color import hed2rgb, rgb2hed

from fedshift.client.dp import PrivateTraining
from fedshift.client.explain import OVERLAY_ALPHA, _heat, display_level, overlay, write_explanations
from fedshift.client.export import build_program
from fedshift.client.inference import predict_logits
from fedshift.client.norm_adaptation import adapted_norm_statistics
from fedshift.common.config import FederationConfig
from fedshift.common.data import (
    CLASS_NAMES_BINARY,
    Dataset,
    ImageSet,
    load_npz,
    make_synthetic_cxr,
    save_npz,
    to_tensor,
)
from fedshift.common.errors import ConfigError, DataError
from fedshift.common.model import ModelConfig, build_model, norm_layers
from fedshift.common.stain import stain_jitter
from fedshift.common.synthetic_colour import SYNTHETIC_COLOUR_SOURCE, make_synthetic_colour
from fedshift.simulations.experiment import ExperimentSpec, build_sites, with_channels
from fedshift.simulations.shift import COLOUR_PROFILES, DEFAULT_PROFILES, ScannerProfile, format_site_table
from tests.test_dp import _dp_step, _params, _reference_per_sample

RNG = np.random.default_rng


def _colour_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return make_synthetic_colour(n, size=size, seed=seed).split("train").images


# ----------------------------------------------------------------------------- data


def test_to_tensor_colour_layout_is_a_transpose_and_resizes_each_channel_alone() -> None:
    images = RNG(0).integers(0, 256, size=(3, 20, 20, 3), dtype=np.uint8)
    x = to_tensor(images, 20).numpy()
    np.testing.assert_array_equal(x, images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    resized = to_tensor(images, 16, channels=3)
    for c in range(3):
        torch.testing.assert_close(resized[:, c : c + 1], to_tensor(images[..., c], 16), rtol=0, atol=0)
    assert tuple(to_tensor(images[:0], 16).shape) == (0, 3, 16, 16)


def test_colour_npz_round_trip(tmp_path: Path) -> None:
    data = make_synthetic_colour(12, size=10, seed=4)
    assert data.channels == 3 and data.synthetic and data.source == SYNTHETIC_COLOUR_SOURCE
    save_npz(tmp_path / "c.npz", data)
    back = load_npz(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.split("train").images, data.split("train").images)
    np.testing.assert_array_equal(back.split("train").labels, data.split("train").labels)
    assert back.channels == 3 and back.synthetic


def test_mixed_channels_refused() -> None:
    grey = ImageSet(images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0, 1]))
    colour = ImageSet(images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match="mix grey and colour") as info:
        Dataset(
            splits={"train": grey, "test": colour},
            class_names=CLASS_NAMES_BINARY,
            source="x",
            synthetic=False,
        )
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"image-channels = 3\).* grey images.*set image-channels = 1"):
        to_tensor(grey.images, 8, channels=3)
    with pytest.raises(DataError, match=r"\(N, H, W\) grey or \(N, H, W, 3\) RGB"):
        ImageSet(images=np.zeros((4, 8, 8, 2), np.uint8), labels=np.array([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="image-channels"):
        FederationConfig.from_run_config({"image-channels": 2})
    assert FederationConfig.from_run_config({"image-channels": 3}).model.in_chans == 3


def test_synthetic_colour_is_deterministic_with_exact_positives() -> None:
    a, b = make_synthetic_colour(101, 0.3, size=28, seed=7), make_synthetic_colour(101, 0.3, size=28, seed=7)
    np.testing.assert_array_equal(a.split("train").images, b.split("train").images)
    assert int(a.split("train").labels.sum()) == round(101 * 0.3)
    other = make_synthetic_colour(101, 0.3, size=28, seed=8).split("train").images
    assert not np.array_equal(other, a.split("train").images)
    # H&E-like: the stroma is pink (red and blue above green), nuclei darken the patch
    train = make_synthetic_colour(400, size=28, seed=1).split("train")
    mean = train.images.reshape(-1, 3).mean(axis=0)
    assert mean[0] > mean[1] and mean[2] > mean[1]
    dark = (train.images.astype(int).sum(axis=3) < 250).mean(axis=(1, 2))
    assert dark[train.labels == 1].mean() > 1.3 * dark[train.labels == 0].mean()


# ----------------------------------------------------------------------------- model


def test_three_channel_adapter_starts_as_the_backbone_normalisation() -> None:
    model = build_model(ModelConfig(image_size=32, in_chans=3))
    cfg = model.backbone.pretrained_cfg  # timm's own record of the pretraining normalisation
    mean = np.asarray(cfg["mean"], np.float64)[:, None, None]
    std = np.asarray(cfg["std"], np.float64)[:, None, None]
    x = to_tensor(RNG(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8), 32)
    with torch.no_grad():
        got = model.input_adapter(x).double().numpy()
    np.testing.assert_allclose(got, (x.double().numpy() - mean) / std, rtol=0, atol=1e-5)
    weight = model.input_adapter.conv.weight.detach()[:, :, 0, 0].double().numpy()
    np.testing.assert_allclose(weight, np.diag(1.0 / std[:, 0, 0]), rtol=1e-6, atol=0)
    # site-local: the shared tensors do not depend on the input's channels
    grey = build_model(ModelConfig(image_size=32))
    assert {k: v.shape for k, v in grey.shared_state_dict().items()} == {
        k: v.shape for k, v in model.shared_state_dict().items()
    }


def test_dp_per_sample_gradients_on_colour_input() -> None:
    model = build_model(ModelConfig(image_size=32, seed=3, in_chans=3))
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train(True)
    reference_model = build_model(ModelConfig(image_size=32, seed=3, in_chans=3))
    reference_model.load_state_dict(model.state_dict())
    reference_model.train(True)
    x = to_tensor(_colour_images(6, 32), 32)
    y = torch.as_tensor([0, 1, 0, 1, 1, 0])
    reference = _reference_per_sample(reference_model, x, y)
    private = PrivateTraining(noise_multiplier=0.0, clip_norm=1e6, sample_rate=0.1, steps=1)
    _dp_step(model, private, x, y, 60)
    adapter = model.input_adapter.conv.weight
    for j, p in enumerate(_params(model)):
        expected = torch.stack([reference[i][j] for i in range(len(x))])
        grad_sample = getattr(p, "grad_sample", None)
        assert isinstance(grad_sample, torch.Tensor)
        torch.testing.assert_close(grad_sample, expected, rtol=1e-4, atol=1e-5)
        if p is adapter:
            assert tuple(grad_sample.shape) == (6, 3, 3, 1, 1)
    private.detach()


def test_norm_adaptation_on_colour_images_uses_their_statistics() -> None:
    model = build_model(ModelConfig(image_size=32, in_chans=3))
    images = _colour_images(16, 32, seed=2)
    _, first = norm_layers(model)[0]
    seen: list[torch.Tensor] = []
    handle = first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(to_tensor(images, 32))
    handle.remove()
    inputs = seen[0].double()
    with adapted_norm_statistics(model, images, torch.device("cpu"), first=1) as adapted:
        assert adapted == 1
        torch.testing.assert_close(
            first.running_mean.double(), inputs.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5
        )
        var = inputs.var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(first.running_var.double(), var, rtol=1e-3, atol=1e-5)


def test_export_takes_colour_input_in_both_layouts() -> None:
    model = build_model(ModelConfig(image_size=32, in_chans=3))
    images = _colour_images(4, 40, seed=3)
    program = build_program(model)
    expected = torch.softmax(torch.as_tensor(predict_logits(model, images, torch.device("cpu"))), dim=1)
    nhwc = program(torch.from_numpy(images)).detach()
    nchw = program(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).detach()
    torch.testing.assert_close(nhwc, expected.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(nchw, nhwc, rtol=0, atol=1e-6)
    with pytest.raises(torch.jit.Error, match="colour images"):
        program(torch.zeros(2, 32, 32))
    grey = make_synthetic_cxr(2, size=32).split("train").images
    with pytest.raises(DataError, match="image-channels = 3"):
        predict_logits(model, grey, torch.device("cpu"))


def test_grad_cam_overlays_colour_images_in_colour(tmp_path: Path) -> None:
    image = RNG(4).integers(0, 256, size=(9, 9, 3), dtype=np.uint8)
    cam = np.zeros((9, 9))
    cam[4, 4], cam[4, 5] = 1.0, 0.8
    level = display_level(cam)
    alpha = OVERLAY_ALPHA * level[..., None]
    expected = np.rint(np.clip((image / 255.0) * (1 - alpha) + _heat(level) * alpha, 0, 1) * 255)
    np.testing.assert_array_equal(overlay(image, cam), expected.astype(np.uint8))
    np.testing.assert_array_equal(overlay(image, np.zeros((9, 9)))[:, :], image)  # no heat: the image itself
    model = build_model(ModelConfig(image_size=32, in_chans=3))
    paths = write_explanations(model, _colour_images(2, 32), tmp_path / "cams", 2)
    assert len(paths) == 2 and all(Path(p).stat().st_size > 100 for p in paths)


# ----------------------------------------------------------------------------- simulator


def test_stain_jitter_matches_scikit_image_and_is_identity_at_one() -> None:
    rng = RNG(5)
    stains = np.concatenate([rng.uniform(0, 0.25, (6, 7, 2)), np.zeros((6, 7, 1))], axis=2)
    rgb = hed2rgb(stains)  # non-negative concentrations: scikit-image's clip at 0 does nothing
    scale, shift = (1.3, 0.7), (0.02, -0.01)
    hed = rgb2hed(rgb)
    hed[..., 0] = hed[..., 0] * scale[0] + shift[0]
    hed[..., 1] = hed[..., 1] * scale[1] + shift[1]
    np.testing.assert_allclose(stain_jitter(rgb, scale, shift), hed2rgb(hed), rtol=0, atol=1e-10)
    any_rgb = rng.uniform(1e-3, 1.0, (5, 5, 3))
    np.testing.assert_allclose(stain_jitter(any_rgb), any_rgb, rtol=0, atol=1e-12)
    images = _colour_images(3, 12)
    same = ScannerProfile("unit", stain_scale=(1.0, 1.0), channel_gain=(1.0, 1.0, 1.0))
    np.testing.assert_array_equal(same.apply(images, RNG(0)), images)
    jittered = ScannerProfile("j", stain_scale=scale, stain_shift=shift).apply(images, RNG(0))
    expected = np.rint(stain_jitter(images / 255.0, scale, shift) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(jittered, expected)


def test_channel_gamma_and_gain_closed_form() -> None:
    images = RNG(6).integers(0, 256, size=(2, 6, 6, 3), dtype=np.uint8)
    gamma, gain = (0.8, 1.0, 1.3), (1.1, 1.0, 0.9)
    profile = ScannerProfile("cam", channel_gamma=gamma, channel_gain=gain)
    x = images / 255.0
    expected = np.stack([np.clip(x[..., c] ** gamma[c] * gain[c], 0, 1) for c in range(3)], axis=-1)
    np.testing.assert_array_equal(profile.apply(images, RNG(0)), np.rint(expected * 255).astype(np.uint8))
    assert profile.describe() == "cam (gamma RGB 0.8/1/1.3, gain RGB 1.1/1/0.9)"
    assert ScannerProfile("stain-a", stain_scale=(1.2, 0.8)).describe() == "stain-a (H x1.2, E x0.8)"
    with pytest.raises(ConfigError, match="grey images"):
        profile.apply(images[..., 0], RNG(0))
    with pytest.raises(ConfigError, match="channel_gain"):
        ScannerProfile("bad", channel_gain=(1.0, 0.0, 1.0))


def _grey_closed_form(profile: ScannerProfile, images: np.ndarray, seed: int) -> np.ndarray:
    """The grey pipeline as it was: resolution, blur, gamma, contrast, offset, noise, clip, round."""
    x = images.astype(np.float64) / 255.0
    if profile.resolution < 1:
        h = images.shape[1]
        t = torch.from_numpy(x).unsqueeze(1)
        low = round(h * profile.resolution)
        t = F.interpolate(t, size=(low, low), mode="bilinear", antialias=True, align_corners=False)
        x = F.interpolate(t, size=(h, h), mode="bilinear", align_corners=False).squeeze(1).numpy()
    if profile.blur_sigma > 0:
        x = gaussian_filter(x, sigma=(0.0, profile.blur_sigma, profile.blur_sigma))
    x = np.clip(x, 0, 1) ** profile.gamma if profile.gamma != 1 else x
    x = (x - 0.5) * profile.contrast + 0.5 if profile.contrast != 1 else x
    x = x + profile.offset
    if profile.noise_std > 0:
        x = x + RNG(seed).normal(0.0, profile.noise_std, size=x.shape)
    return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)


def test_grey_profiles_are_unchanged() -> None:
    images = make_synthetic_cxr(6, size=28, seed=9).split("train").images
    for profile in DEFAULT_PROFILES:
        assert not profile.colour
        np.testing.assert_array_equal(profile.apply(images, RNG(3)), _grey_closed_form(profile, images, 3))


def test_colour_sites_get_colour_profiles_and_the_model_three_channels(tmp_path: Path) -> None:
    spec = ExperimentSpec(out_dir=tmp_path, sites=3, synthetic_n=240, synthetic_colour=True)
    sites, label = build_sites(spec)
    assert label == "synthetic-he (SYNTHETIC)"
    assert [s.spec.profile for s in sites] == list(COLOUR_PROFILES[:3])
    assert all(s.data.channels == 3 for s in sites)
    table = format_site_table(sites)
    assert "stain-a (H x1.2, E x0.8)" in table and "SYNTHETIC" in table
    assert with_channels(spec.federation, sites).model.in_chans == 3
    grey, _ = build_sites(ExperimentSpec(out_dir=tmp_path, sites=2, synthetic_n=120))
    assert [s.spec.profile for s in grey] == list(DEFAULT_PROFILES[:2])
    assert with_channels(spec.federation, grey).model.in_chans == 1
    with pytest.raises(ConfigError, match="--synthetic-colour"):
        build_sites(ExperimentSpec(out_dir=tmp_path, data="x.npz", synthetic_colour=True))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_colour_federation_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedshift.common.cli import main

    out = tmp_path / "run"
    args = ["simulate", "--synthetic-colour", "--sites", "3", "--synthetic-n", "900", "--rounds", "2"]
    args += ["--image-size", "32", "--no-baseline", "--no-dp", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and "Mean test AUC" in printed
    report = json.loads((out / "results.json").read_text())
    assert report["data"] == "synthetic-he (SYNTHETIC)"
    assert [s["profile_label"] for s in report["sites"]] == [p.describe() for p in COLOUR_PROFILES[:3]]
    aucs = [report["federated_test"][f"site-{k}"]["auc"] for k in range(3)]
    assert float(np.mean(aucs)) > 0.7, aucs  # 0.834 and 0.887 at seeds 0 and 1 (60 test images a site)
    bundle = Path(report["bundles"]["site-1"])
    data = bundle.parent / "data.npz"
    config = json.loads((out / "config.json").read_text())
    assert config["run_config"]["image-channels"] == 3  # set from the data
    from fedshift.client.bundle import load_bundle

    loaded = load_bundle(bundle)
    assert loaded.model_config.in_chans == 3
    predictions = tmp_path / "p.csv"
    code = main(
        [
            "predict",
            "--model",
            str(bundle),
            "--images",
            str(data),
            "--split",
            "test",
            "--out",
            str(predictions),
        ]
    )
    assert code == 0
    test = load_npz(data).split("test")
    rows = predictions.read_text().strip().splitlines()
    assert len(rows) - 1 == len(test)
    assert main(["evaluate", "--checkpoint", str(out / "server" / "checkpoint"), "--data", str(data)]) == 0
    program_path = tmp_path / "m.pt"
    assert main(["export", "--model", str(bundle), "--out", str(program_path), "--prior", "none"]) == 0
    program = torch.jit.load(str(program_path))
    expected = torch.softmax(
        torch.as_tensor(predict_logits(loaded.model, test.images, torch.device("cpu"))), 1
    )
    torch.testing.assert_close(program(torch.from_numpy(test.images)), expected.double(), rtol=0, atol=1e-5)


@pytest.mark.usefixtures("task_identity")
def test_a_site_with_grey_data_refuses_a_colour_run_before_any_privacy_is_charged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    from fedshift.client.app import make_client_app
    from fedshift.client.ledger import PrivacyLedger
    from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY
    from fedshift.tests.helpers import call_client_app, site_run_config, write_site

    site_dir = write_site(tmp_path)
    config = site_run_config(tmp_path, **{"image-channels": 3, "dp": True, "dp-epsilon": 8.0})
    arrays = ArrayRecord(build_model(ModelConfig(image_size=32, in_chans=3)).shared_state_dict())
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"server-round": 1})})
    msg = Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
    reply = call_client_app(make_client_app(), msg, config)
    assert reply.has_error() and not reply.has_content()
    # the site's own log says why (the server gets a generic error)
    message = next(r.getMessage() for r in caplog.records if "image-channels" in r.getMessage())
    assert "\n" not in message and "site-0's data" in message
    assert "image-channels = 3" in message and "set image-channels = 1" in message
    assert PrivacyLedger.at(site_dir).entries == ()


def test_a_public_fisher_of_a_colour_model_is_taken_on_public_colour_images() -> None:
    from fedshift.client.ewc import FISHER_PUBLIC, shared_parameters, site_fisher
    from fedshift.client.fisher import fisher_diagonal
    from fedshift.common.config import EWCConfig
    from fedshift.common.data import to_tensor

    model = build_model(ModelConfig(image_size=32, in_chans=3))
    config = EWCConfig(fisher_source="public", fisher_samples=8)
    fisher, label, _ = site_fisher(config, model, np.zeros((0, 32, 32, 3), np.uint8), private=False, seed=5)
    images = make_synthetic_colour(8, seed=5).split("train").images  # the public images, independently drawn
    params = shared_parameters(model)
    expected = fisher_diagonal(
        model,
        params,
        to_tensor(images, 32, 3),
        labels=config.fisher_labels,
        generator=torch.Generator().manual_seed(5),
    )
    assert label == FISHER_PUBLIC and sorted(fisher) == sorted(expected)
    for key, value in fisher.items():
        torch.testing.assert_close(value, expected[key])
