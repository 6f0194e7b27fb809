"""Domain alignment: the per-sample CORAL loss against autograd of the coupled loss, DP moments, AdaBN.

References: autograd of the batch-coupled CORAL + mean discrepancy, scipy's
principal angles, the HSIC form of CKA, pooled statistics and the Gaussian
mechanism's declared noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from fedshift.client.alignment import (
    AlignmentLoss,
    PrototypeLoss,
    clip_rows,
    global_scale,
    moment_sensitivity,
    private_moments,
    projection,
    site_objective,
)
from fedshift.client.dp import SeededSource
from fedshift.client.norm_adaptation import adapted_norm_statistics, norm_moments
from fedshift.common.data import make_synthetic_cxr
from fedshift.common.errors import DataError, PrivacyError
from fedshift.common.model import ModelConfig, build_model, norm_layers
from fedshift.common.shift_config import ShiftConfig
from fedshift.common.shift_statistics import GlobalStatistics
from fedshift.simulations.analysis import linear_cka, principal_subspace, subspace_alignment


def alignment_discrepancy(mean: np.ndarray, second: np.ndarray, target: np.ndarray | None = None) -> float:
    """The alignment loss in closed form (the reference the per-sample loss is checked against):
    ``L = (||C - T||_F² + ||m||²) / k`` for scaled moments ``m = E u``, ``second = E u uᵀ``
    (``T`` defaults to the identity)."""
    k = mean.shape[0]
    t = np.eye(k) if target is None else target
    cov = second - np.outer(mean, mean)
    return float((np.sum((cov - t) ** 2) + np.sum(mean**2)) / k)


D, K = 12, 4


def _setup(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    proj = projection(D, K, seed)
    mu = rng.normal(size=K)
    a = rng.normal(size=(K, K))
    cov = a @ a.T + 0.5 * np.eye(K)
    feats = torch.tensor(rng.normal(size=(64, D)) * 1.5 + 0.7, dtype=torch.float32)
    return proj, mu, cov, feats


def _coupled(feats: torch.Tensor, proj: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> torch.Tensor:
    """Reference: (||Cov(u) - T||² + ||E u||²) / k on the batch, samples coupled, differentiable."""
    s = float(np.trace(cov)) / K
    target = torch.tensor(cov / s, dtype=torch.float32)
    z = (feats @ torch.tensor(proj, dtype=torch.float32) - torch.tensor(mu, dtype=torch.float32)) / math.sqrt(
        s
    )
    m = z.mean(0)
    c = (z - m).T @ (z - m) / len(z)
    return (torch.sum((c - target) ** 2) + torch.sum(m**2)) / K


def test_projection_is_orthonormal_and_public() -> None:
    p = projection(1280, 16, seed=3)
    np.testing.assert_allclose(p.T @ p, np.eye(16), atol=1e-12)
    np.testing.assert_array_equal(p, projection(1280, 16, seed=3))  # every site builds the same one
    assert global_scale(np.diag([4.0, 1.0, 1.0])) == pytest.approx(2.0)


def test_batch_mode_gradient_is_exactly_the_coupled_coral_gradient() -> None:
    proj, mu, cov, feats = _setup()
    f1 = feats.clone().requires_grad_(True)
    loss = AlignmentLoss(proj, mu, cov, weight=1.0)
    terms = loss(f1)
    terms.mean().backward()
    f2 = feats.clone().requires_grad_(True)
    ref = _coupled(f2, proj, mu, cov)
    ref.backward()
    assert f1.grad is not None and f2.grad is not None
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-4, atol=1e-6)
    assert float(terms.detach().mean()) == pytest.approx(
        float(ref.detach()), rel=1e-4
    )  # the mean of the terms is L itself


def test_point_mode_terms_are_per_sample_and_exact_at_the_point() -> None:
    """With a fixed (released) linearisation point, sample i's term depends on sample i alone (DP-SGD needs
    this); at the data's own moments the gradient equals the coupled one."""
    proj, mu, cov, feats = _setup(1)
    g = feats.double().numpy() @ proj
    point = (g.mean(0), g.T @ g / len(g))
    loss = AlignmentLoss(proj, mu, cov, weight=1.0, point=point)
    jac = torch.autograd.functional.jacobian(lambda f: loss(f), feats[:6])  # (6, 6, D)
    off_diagonal = jac.clone()
    for i in range(6):
        off_diagonal[i, i] = 0
    assert float(off_diagonal.abs().max()) == 0.0
    # values too: changing one sample leaves the others' terms alone; the batch mode couples them
    moved = feats.clone()
    moved[5] += 3.0
    torch.testing.assert_close(loss(moved)[:5], loss(feats)[:5])
    batch = AlignmentLoss(proj, mu, cov, weight=1.0)
    assert not torch.allclose(batch(moved)[:5], batch(feats)[:5])  # not for DP-SGD
    f1 = feats.clone().requires_grad_(True)
    loss(f1).mean().backward()
    f2 = feats.clone().requires_grad_(True)
    _coupled(f2, proj, mu, cov).backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-3, atol=1e-5)


def test_descending_the_loss_aligns_a_shifted_site() -> None:
    """An affine map trained on the per-sample loss moves a shifted, scaled site onto the global moments
    (a diagonal target covariance: reachable by a per-direction scale)."""
    rng = np.random.default_rng(2)
    proj = np.eye(K)
    target = rng.normal(size=(4000, K)) @ np.diag([1.0, 2.0, 0.5, 1.0]) + 3.0
    mu, cov = target.mean(0), np.cov(target.T, bias=True)
    site = torch.tensor(rng.normal(size=(512, K)) * 0.3 - 2.0, dtype=torch.float32)
    scale = torch.ones(K, requires_grad=True)
    shift = torch.zeros(K, requires_grad=True)
    loss = AlignmentLoss(proj, mu, cov, weight=1.0)

    def discrepancy() -> float:
        s = global_scale(cov)
        z = ((site * scale + shift).detach().double().numpy() - mu) / math.sqrt(s)
        return alignment_discrepancy(z.mean(0), z.T @ z / len(z), cov / s)

    before = discrepancy()
    opt = torch.optim.Adam([scale, shift], lr=0.05)
    for _ in range(1800):
        opt.zero_grad()
        loss(site * scale + shift).mean().backward()
        opt.step()
    assert before > 10 and discrepancy() < 0.02


def test_moment_release_sensitivity_and_noise() -> None:
    clip, sigma = 2.0, 3.0
    rng = np.random.default_rng(4)
    g = clip_rows(rng.normal(size=(50, K)) * 5, clip)
    y = rng.integers(0, 2, 50)
    assert np.linalg.norm(g, axis=1).max() <= clip
    # one patient's contribution (g in its class's block, and ||g||² / R or g gᵀ / R) has L2 norm
    # sqrt(2) R at the clip bound, never more
    one = g[0]
    with_squares = np.concatenate([one, np.zeros(K), [one @ one / clip, 0.0]])
    with_outer = np.concatenate([one, np.zeros(K), np.outer(one, one).ravel() / clip])
    assert np.linalg.norm(with_squares) == pytest.approx(moment_sensitivity(clip))
    assert np.linalg.norm(with_outer) == pytest.approx(moment_sensitivity(clip))
    source = SeededSource(5)
    truth = np.stack([g[y == c].sum(0) for c in (0, 1)])
    truth_sq = np.array([np.sum(g[y == c] ** 2) for c in (0, 1)])
    std = sigma * math.sqrt(2) * clip
    draws = [private_moments(g, y, 2, clip, sigma, source) for _ in range(2000)]
    sums = np.stack([d.class_sums for d in draws])
    squares = np.stack([d.class_squares for d in draws])
    np.testing.assert_allclose(sums.mean(0), truth, atol=4 * std / math.sqrt(2000))
    np.testing.assert_allclose(sums.std(0), std, rtol=0.06)
    np.testing.assert_allclose(squares.mean(0), truth_sq, atol=4 * std * clip / math.sqrt(2000))
    np.testing.assert_allclose(squares.std(0), std * clip, rtol=0.06)
    assert draws[0].outer is None
    draws = [private_moments(g, y, 2, clip, sigma, source, outer=True) for _ in range(2000)]
    outers = np.stack([d.outer for d in draws])
    np.testing.assert_allclose(np.diagonal(outers, axis1=1, axis2=2).std(0), std * clip, rtol=0.06)
    assert outers[:, 0, 1].std() == pytest.approx(std * clip / math.sqrt(2), rel=0.06)  # symmetrised
    np.testing.assert_allclose(outers, np.transpose(outers, (0, 2, 1)))
    assert draws[0].class_squares is None and draws[0].mechanism == (3.0, 1.0, 1)
    with pytest.raises(PrivacyError, match="noise multiplier > 0"):
        private_moments(g, y, 2, clip, 0.0, source)


def test_prototype_loss_by_hand_and_per_sample() -> None:
    proj = np.eye(K)
    means = np.array([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    loss = PrototypeLoss(proj, means, within_var=1.0, weight=0.5)
    feats = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(loss(feats, labels), torch.tensor([0.5 * 2 / 4, 0.5 * 9 / 4]))
    moved = feats.clone()
    moved[1] += 5.0
    assert float(loss(moved, labels)[0]) == float(loss(feats, labels)[0])  # per sample, as DP-SGD needs


def test_prototype_alignment_keeps_the_label_shift_that_marginal_coral_erases() -> None:
    """Two sites with the same class-conditional features but prevalences 0.1 and 0.9: the class-conditional
    loss has nothing to correct, while marginal CORAL sees a large discrepancy (and would distort them)."""
    rng = np.random.default_rng(8)
    means = np.array([[-1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])

    def site(prevalence: float) -> tuple[torch.Tensor, torch.Tensor]:
        y = (rng.random(4000) < prevalence).astype(int)
        return torch.tensor(means[y] + 0.3 * rng.normal(size=(4000, K)), dtype=torch.float32), torch.tensor(y)

    (fa, ya), (fb, yb) = site(0.1), site(0.9)
    pooled = torch.cat([fa, fb]).double().numpy()
    mu, cov = pooled.mean(0), np.cov(pooled.T, bias=True)
    proto = PrototypeLoss(np.eye(K), means, within_var=0.09, weight=1.0)
    coral = AlignmentLoss(np.eye(K), mu, cov, weight=1.0)
    assert float(proto(fa, ya).mean()) == pytest.approx(float(proto(fb, yb).mean()), rel=0.05)
    assert float(coral(fa).mean()) > 0.5 and float(coral(fb).mean()) > 0.5  # marginals differ by label shift


def test_subspace_alignment_matches_principal_angles() -> None:
    rng = np.random.default_rng(6)
    basis = np.linalg.qr(rng.normal(size=(20, 20)))[0]
    a = rng.normal(size=(300, 3)) * [5, 4, 3] @ basis[:, :3].T + 0.05 * rng.normal(size=(300, 20))
    b = rng.normal(size=(300, 3)) * [5, 4, 3] @ basis[:, 1:4].T + 0.05 * rng.normal(size=(300, 20))
    ua, ub = principal_subspace(a, 3), principal_subspace(b, 3)
    reference = float(np.mean(np.cos(subspace_angles(ua, ub)) ** 2))
    assert subspace_alignment(a, b, k=3) == pytest.approx(reference, rel=1e-10)
    assert reference == pytest.approx(2 / 3, abs=0.02)  # two of three directions shared
    assert subspace_alignment(a, a, k=3) == pytest.approx(1.0)


def test_linear_cka_matches_the_hsic_form() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 6))
    y = x @ rng.normal(size=(6, 4)) + 0.5 * rng.normal(size=(40, 4))
    h = np.eye(40) - 1 / 40
    kx, ky = x @ x.T, y @ y.T
    ref = np.trace(kx @ h @ ky @ h) / math.sqrt(np.trace(kx @ h @ kx @ h) * np.trace(ky @ h @ ky @ h))
    assert linear_cka(x, y) == pytest.approx(ref, rel=1e-10)
    q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0)  # invariant to rotation and scale


def test_adabn_uses_the_local_statistics_inside_and_restores_them() -> None:
    model = build_model(ModelConfig(image_size=32, adapter_stages=1))
    images = make_synthetic_cxr(24, seed=3).split("train").images
    layers = [m for m in model.modules() if isinstance(getattr(m, "running_mean", None), torch.Tensor)]
    before = [m.running_mean.clone() for m in layers]  # type: ignore[union-attr,operator]
    device = torch.device("cpu")
    seen: dict[int, torch.Tensor] = {}
    with adapted_norm_statistics(model, images, device) as count:
        assert count == len(layers) > 10
        handles = [
            m.register_forward_pre_hook(lambda mod, a: seen.__setitem__(id(mod), a[0])) for m in layers
        ]
        from fedshift.common.data import to_tensor

        with torch.no_grad():
            model(to_tensor(images, 32))
        for h in handles:
            h.remove()
        # AdaBN's fixed point: every layer's statistics are those of the inputs it now receives
        for m in layers:
            x = seen[id(m)]
            torch.testing.assert_close(m.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-3, atol=1e-4)  # type: ignore[arg-type]
            torch.testing.assert_close(
                m.running_var, x.var(dim=(0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-5
            )  # type: ignore[arg-type]
    for m, mean in zip(layers, before, strict=True):
        torch.testing.assert_close(m.running_mean, mean)  # type: ignore[arg-type]


def _logits(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    from fedshift.common.data import to_tensor

    with torch.no_grad():
        return model(to_tensor(images, 32))  # type: ignore[no-any-return]


def test_relative_adaptation_is_the_identity_without_a_scanner_change() -> None:
    model = build_model(ModelConfig(image_size=32, adapter_stages=1))
    model.train(False)
    images = make_synthetic_cxr(40, seed=4).split("train").images
    plain = _logits(model, images)
    with adapted_norm_statistics(model, images, torch.device("cpu"), reference=images) as count:
        assert count > 10
        torch.testing.assert_close(_logits(model, images), plain, rtol=1e-3, atol=1e-4)


def test_relative_adaptation_undoes_a_contrast_and_brightness_change() -> None:
    # a "new scanner": the same images at 60% contrast and brighter; the stem is linear, so the
    # first norm layer sees a per-channel affine change, which the relative adaptation maps back
    model = build_model(ModelConfig(image_size=32, adapter_stages=1))
    model.train(False)
    images = make_synthetic_cxr(40, seed=5).split("train").images
    shifted = np.clip(images.astype(np.float64) * 0.6 + 60, 0, 255).astype(images.dtype)
    reference = _logits(model, images)
    drift = (_logits(model, shifted) - reference).abs().mean()
    with adapted_norm_statistics(model, shifted, torch.device("cpu"), reference=images):
        relative = (_logits(model, shifted) - reference).abs().mean()
    with adapted_norm_statistics(model, shifted, torch.device("cpu")):
        adabn = (_logits(model, shifted) - reference).abs().mean()
    assert relative < 0.1 * drift and relative < 0.1 * adabn
    with (
        pytest.raises(DataError, match="Expected reference images"),
        adapted_norm_statistics(model, shifted, torch.device("cpu"), reference=images[:0]),
    ):
        pass


def test_site_objective_leaves_out_what_has_no_global_statistics(caplog: pytest.LogCaptureFixture) -> None:
    from fedshift.client.training import cross_entropy

    assert site_objective(ShiftConfig(), None) is cross_entropy
    objective = site_objective(ShiftConfig(align_weight=1.0), GlobalStatistics("1", 1), site="site-3")
    assert objective is cross_entropy
    assert "site-3: no global feature moments" in caplog.text


def test_adaptation_from_kept_moments_equals_adaptation_from_the_images_on_any_device() -> None:
    model = build_model(ModelConfig(image_size=32, adapter_stages=1))
    images = make_synthetic_cxr(40, seed=5).split("train").images
    shifted = np.clip(images.astype(np.float64) * 0.6 + 60, 0, 255).astype(images.dtype)
    cpu = torch.device("cpu")
    moments = norm_moments(model, images, cpu)
    assert len(moments) == 2 * len(norm_layers(model))
    with adapted_norm_statistics(model, shifted, cpu, reference=images):
        from_images = _logits(model, shifted)
    with adapted_norm_statistics(model, shifted, cpu, reference=moments):
        torch.testing.assert_close(_logits(model, shifted), from_images)
    # the kept moments are on the CPU and the model may be anywhere: the adaptation runs on the device asked
    # for ("meta" stands in for a GPU: torch refuses any tensor left on another device)
    meta = torch.device("meta")
    with adapted_norm_statistics(model, shifted, meta, reference=moments) as count:
        assert count == len(norm_layers(model))
    assert {t.device for t in model.norm_statistics().values()} == {meta}
