"""``fedshift audit``: canaries, the attacker's scores, the result kept at the site, and the CLI."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedshift.client.audit import (
    AUDITS_DIR,
    AuditResult,
    TrainingHook,
    audit_line,
    canary_gradients,
    latest_audit,
    make_canaries,
    projection_scores,
    run_audit,
    with_canaries,
)
from fedshift.client.dp import PrivateTraining, _SourcedDPOptimizer
from fedshift.client.site import SiteSettings
from fedshift.common.cli import main
from fedshift.common.config import FederationConfig, PrivacyConfig
from fedshift.common.data import ImageSet, to_tensor
from fedshift.common.errors import ConfigError
from fedshift.common.model import ModelConfig, build_model
from fedshift.tests.helpers import one_line_error, write_site


def _images(n: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 2, n).astype(np.int64))


def test_mislabelled_canaries_are_relabelled_copies_and_half_go_in() -> None:
    train = _images(400)
    before = train.images.copy()
    birds = make_canaries(train, 200, "mislabelled", 2, np.random.default_rng(0))
    assert np.array_equal(train.images, before)  # the site's data untouched
    # each canary is one of the site's images, with the other class's label
    index = {img.tobytes(): i for i, img in enumerate(train.images)}
    sources = [index[img.tobytes()] for img in birds.images]
    assert len(set(sources)) == 200
    assert np.all(birds.labels == 1 - train.labels[sources])
    assert 80 <= birds.included.sum() <= 120  # Binomial(200, 1/2): 4.2 standard deviations
    data = with_canaries(train, birds)
    assert len(data) == 400 + birds.included.sum()
    assert np.array_equal(data.images[400:], birds.images[birds.included])
    noise = make_canaries(train, 50, "noise", 2, np.random.default_rng(1))
    assert noise.images.shape == (50, 28, 28) and set(noise.labels) <= {0, 1}


@pytest.mark.parametrize(
    ("m", "kind", "needle"), [(5, "mislabelled", "20"), (500, "mislabelled", "400"), (50, "x", "kind")]
)
def test_bad_canary_settings_are_refused(m: int, kind: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        make_canaries(_images(400), m, kind, 2, np.random.default_rng(0))


def test_canary_gradients_match_autograd_one_sample_at_a_time() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=32))
    images, labels = _images(5).images, np.array([0, 1, 1, 0, 1])
    shared = model._shared_params()
    names = sorted(model.shared_state_dict())
    grads = canary_gradients(model, images, labels, torch.device("cpu"), names, batch_size=3)
    assert grads.shape == (5, sum(shared[n].numel() for n in names))
    model.train(True)
    for i in range(5):
        model.zero_grad(set_to_none=True)
        x = to_tensor(images[i : i + 1], 32, 1)
        torch.nn.functional.cross_entropy(model(x), torch.tensor([labels[i]])).backward()
        reference = torch.cat([shared[n].grad.flatten().double() for n in names])  # type: ignore[union-attr]
        torch.testing.assert_close(grads[i], reference, rtol=1e-3, atol=1e-5)  # float32 sums


def test_projection_scores_find_the_included_rows_despite_a_shared_direction() -> None:
    rng = np.random.default_rng(0)
    m, d = 300, 2000
    shared = rng.normal(size=d) * 5  # a direction every canary's gradient has, more or less (the data's)
    unique = rng.normal(size=(m, d))
    grads = torch.tensor(rng.normal(1.0, 0.5, size=(m, 1)) * shared + unique)
    included = rng.random(m) < 0.5
    # an update that descends the included canaries' own losses, plus the data's drift and noise
    update = -0.01 * unique[included].sum(axis=0) - 0.5 * shared + rng.normal(size=d) * 0.05
    scores = projection_scores(grads, torch.tensor(update))
    assert roc_auc_score(included, scores) > 0.95
    raw = -(grads.numpy() @ update)  # without removing the shared direction the signal drowns
    assert roc_auc_score(included, raw) < 0.7


def test_projection_scores_remove_the_top_singular_directions() -> None:
    """The Gram-matrix shortcut equals the scores written with numpy's full SVD."""
    rng = np.random.default_rng(1)
    grads = rng.normal(size=(60, 500)) + rng.normal(size=500) * 3
    update = rng.normal(size=500)
    centred = grads - grads.mean(axis=0)
    top = np.linalg.svd(centred, full_matrices=False)[2][:6]  # PRINCIPAL_FRACTION of 60 canaries
    residual = centred - centred @ top.T @ top
    reference = -(residual @ (update - top.T @ (top @ update))) / np.linalg.norm(residual, axis=1)
    np.testing.assert_allclose(
        projection_scores(torch.tensor(grads), torch.tensor(update)), reference, atol=1e-9
    )


def test_the_planned_size_fixes_the_expected_batch_whatever_went_in() -> None:
    model = build_model(ModelConfig(image_size=32))
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    plan = PrivateTraining(1.0, 1.0, sample_rate=0.1, steps=1, num_examples=300)
    _, dp_optimizer = plan.attach(model, optimizer, 357)  # 57 canaries went in
    try:
        assert dp_optimizer.expected_batch_size == 30  # type: ignore[attr-defined]
    finally:
        plan.detach()
    unplanned = PrivateTraining(1.0, 1.0, sample_rate=0.1, steps=1)
    _, dp_optimizer = unplanned.attach(build_model(ModelConfig(image_size=32)), optimizer, 357)
    try:
        assert dp_optimizer.expected_batch_size == 36  # type: ignore[attr-defined]
    finally:
        unplanned.detach()


def _result(tmp_path: Path, **values: object) -> dict[str, object]:
    row = {
        "created": "2026-12-02T01:00:00+00:00",
        "epsilon_lower_bound": 0.4,
        "confidence": 0.95,
        "canaries": 256,
        "claimed_epsilon": 1.0,
        "delta": 1e-5,
        "mia_auc": 0.55,
    }
    row.update(values)
    folder = tmp_path / AUDITS_DIR
    folder.mkdir(exist_ok=True)
    (folder / f"audit-{row['created']}.json").write_text(json.dumps(row))
    return row


def test_the_latest_audit_is_read_back_and_a_bound_above_the_claim_is_flagged(tmp_path: Path) -> None:
    assert latest_audit(tmp_path) is None
    assert audit_line(None) == "privacy audit: none yet (fedshift audit)"
    _result(tmp_path, created="2026-12-01T00:00:00", epsilon_lower_bound=0.1)
    _result(tmp_path, created="2026-12-02T00:00:00", epsilon_lower_bound=1.7)
    (tmp_path / AUDITS_DIR / "audit-2026-12-03T00.json").write_text("{broken")
    _result(tmp_path, created="2026-12-04T00:00:00", mia_auc="high")  # a value of the wrong type
    latest = latest_audit(tmp_path)
    assert latest is not None and latest["epsilon_lower_bound"] == 1.7
    line = audit_line(latest)
    assert "epsilon lower bound 1.700" in line and "claimed epsilon 1.000" in line
    assert "ABOVE THE CLAIM" in line
    assert "ABOVE" not in audit_line(dict(latest, epsilon_lower_bound=0.9))
    assert "no DP" in audit_line(dict(latest, claimed_epsilon=None))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_cli_audits_a_site_keeps_the_result_there_and_charges_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = write_site(tmp_path, n=150)
    data = site / "data.npz"
    digest = _digest(data)
    state = tmp_path / "state"
    out = tmp_path / "audit.json"
    args = ["audit", "--data", str(data), "--state-dir", str(state), "--canaries", "40", "--image-size", "32"]
    assert main([*args, "--batch-size", "20", "--dp-epsilon", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = sorted((state / AUDITS_DIR).glob("audit-*.json"))
    assert len(saved) == 1 and f"saved {saved[0]}" in printed
    result = json.loads(saved[0].read_text())
    assert result == json.loads(out.read_text())
    assert result["canaries"] == 40 and result["private"] and result["train_size"] == 120
    assert 1.9 <= result["claimed_epsilon"] <= 2.0  # the plan fits the round into the budget
    assert 0 <= result["epsilon_lower_bound"] <= result["claimed_epsilon"]
    assert f"{result['claimed_epsilon']:.3f}" in printed and f"{result['mia_auc']:.3f}" in printed
    assert 0 <= result["mia_auc"] <= 1
    # nothing charged, nothing logged for egress, the site's data untouched
    assert sorted(p.name for p in state.iterdir()) == [AUDITS_DIR]
    assert _digest(data) == digest
    # a ledger shows the latest audit beside its total
    from fedshift.client.ledger import PrivacyLedger

    PrivacyLedger.at(state).charge(
        run_id="1", round=1, mechanism="dp-sgd", noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5
    )
    assert main(["ledger", str(state)]) == 0
    assert audit_line(latest_audit(state)) in capsys.readouterr().out
    assert main(["ledger", str(state), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["audit"]
    assert shown["epsilon_lower_bound"] == result["epsilon_lower_bound"]
    assert not math.isnan(shown["mia_auc"])


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--canaries", "5"], ["20", "--canaries"]),
        (["--canaries", "100"], ["60", "--canaries"]),
        (["--dp-epsilon", "-1"], ["dp-epsilon"]),
    ],
)
def test_cli_bad_values_get_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needles: list[str]
) -> None:
    site = write_site(tmp_path)
    code = main(["audit", "--data", str(site / "data.npz"), "--state-dir", str(tmp_path / "s"), *extra])
    one_line_error(code, capsys.readouterr().err, *needles)
    assert not (tmp_path / "s" / AUDITS_DIR).exists()


def test_cli_refuses_dp_flags_for_a_hospital_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["audit", "--config", str(tmp_path / "site.toml"), "--dp-epsilon", "50"])
    one_line_error(code, capsys.readouterr().err, "--dp-epsilon", "site TOML")


# ------------------------------------------------------------------ the audit on real data (slow)

SEEDS = (0, 1, 2)


class _UnclippedOptimizer(_SourcedDPOptimizer):
    """A broken DP-SGD: per-sample gradients summed without clipping (the noise is still sigma * C)."""

    def clip_and_accumulate(self) -> None:
        for p in self.params:
            grad = self._get_flat_grad_sample(p).to(p.dtype).sum(dim=0)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad


class _Unclipped(PrivateTraining):
    optimizer_class = _UnclippedOptimizer


FAULTS: dict[str, TrainingHook] = {
    # the noise multiplier used is a tenth of the one planned and accounted
    "tenth-of-the-noise": lambda p: dataclasses.replace(p, noise_multiplier=p.noise_multiplier / 10),
    "clipping-off": lambda p: _Unclipped(
        p.noise_multiplier, p.clip_norm, p.sample_rate, p.steps, p.secure_rng, p.seed, p.num_examples
    ),
}


@functools.cache
def _audit(path: Path, epsilon: float, seed: int, fault: str = "") -> AuditResult:
    """The default audit (500 of the real training images, 256 mislabelled canaries) of one site."""
    privacy = (
        PrivacyConfig().with_values({"dp": True, "dp-epsilon": epsilon}, "test")
        if epsilon
        else PrivacyConfig()
    )
    site = SiteSettings("pneumonia", path, Path(tempfile.mkdtemp(prefix="audit-")), "cpu", privacy)
    fed = FederationConfig.from_run_config({"device": "cpu"})
    result = run_audit(fed, site, seed=seed, training_hook=FAULTS[fault] if fault else None)
    print(f"audit eps={epsilon} fault={fault or '-'} seed={seed}: {result.to_dict()}")
    return result


@pytest.mark.slow
def test_without_dp_the_audit_finds_the_canaries(pneumonia_path: Path) -> None:
    """Power: without DP the attacker tells included canaries from excluded ones (measured at landing:
    bounds 0.50, 0.50, 0.20, AUCs 0.68, 0.68, 0.64 over seeds 0-2)."""
    results = [_audit(pneumonia_path, 0.0, seed) for seed in SEEDS]
    assert all(not r.private and math.isinf(r.claimed_epsilon) for r in results)
    bounds = [r.bound.epsilon for r in results]
    assert all(r.mia_auc > 0.6 for r in results), [r.mia_auc for r in results]
    assert sum(b > 0 for b in bounds) >= 2 and np.mean(bounds) >= 0.15, bounds


def _auc_ceiling(eps: float) -> float:
    """The area under the eps-DP trade-off curve TPR <= min(e^eps FPR, 1 - e^-eps (1 - FPR))."""
    x = 1 / (1 + math.exp(eps))  # where the two lines meet
    return math.exp(eps) * x**2 / 2 + (1 - x) - math.exp(-eps) * (1 - x) ** 2 / 2


def test_the_auc_ceiling_is_the_trade_off_curves_area() -> None:
    fpr = np.linspace(0, 1, 200_001)
    for eps in (0.0, 1.0, 4.0):
        tpr = np.minimum(np.exp(eps) * fpr, 1 - np.exp(-eps) * (1 - fpr))
        assert _auc_ceiling(eps) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-6)
    assert _auc_ceiling(0.0) == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [1.0, 4.0, 8.0])
def test_with_dp_the_bound_never_exceeds_the_claim(pneumonia_path: Path, epsilon: float) -> None:
    """Soundness: the claim is the accounting of the round audited, and no seed's bound exceeds it."""
    results = [_audit(pneumonia_path, epsilon, seed) for seed in SEEDS]
    for r in results:
        assert r.private and epsilon * 0.99 <= r.claimed_epsilon <= epsilon
        assert r.bound.epsilon <= r.claimed_epsilon, r.to_dict()
    aucs = [r.mia_auc for r in results]
    # no membership test of an eps-DP round has an AUC above the eps-DP trade-off curve's area (plus
    # the AUC's sampling sd at m = 256, 0.036); at eps = 1 the attack stays near chance (measured at
    # landing: 0.530, 0.568, 0.572; the ceiling there is 0.731)
    assert max(aucs) <= _auc_ceiling(epsilon) + 0.036, aucs
    if epsilon <= 1:
        assert np.mean(aucs) <= 0.6, aucs


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_the_audit_catches_a_broken_dp_path(pneumonia_path: Path, fault: str) -> None:
    """Each fault, at a claimed epsilon of 1, raises the attacker's AUC in every seed above the correct
    implementation's; clipping off also lifts the bound clearly (measured: 0.38, 0.20, 0.71 against 0)."""
    broken = [_audit(pneumonia_path, 1.0, seed, fault) for seed in SEEDS]
    correct = [_audit(pneumonia_path, 1.0, seed) for seed in SEEDS]
    assert all(b.claimed_epsilon == c.claimed_epsilon for b, c in zip(broken, correct, strict=True))
    gaps = [b.mia_auc - c.mia_auc for b, c in zip(broken, correct, strict=True)]
    assert min(gaps) > 0 and np.mean(gaps) >= 0.03, gaps
    bounds = [r.bound.epsilon for r in broken]
    assert all(r.bound.epsilon == 0 for r in correct)  # what the fault's bound is set against
    if fault == "clipping-off":
        assert np.mean(bounds) >= 0.15 and sum(b > 0 for b in bounds) >= 2, bounds


@pytest.mark.slow
def test_a_hospital_audits_with_its_own_site_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedshift.tests.deploy_support import write_site_toml

    for name in ("ca.crt", "a.key"):  # the daemon's TLS files: the audit connects to nothing
        (tmp_path / name).write_text("unused\n")
    config = write_site_toml(
        tmp_path, ca_cert=tmp_path / "ca.crt", private_key=tmp_path / "a.key", superlink="fl.example.org:9092"
    )
    args = ["audit", "--config", str(config), "--canaries", "20", "--image-size", "32", "--batch-size", "16"]
    assert main(args) == 0
    (saved,) = (tmp_path / "state" / AUDITS_DIR).glob("audit-*.json")
    result = json.loads(saved.read_text())
    # the site's own privacy: DP on at its budget (dp-epsilon = 8 in its site.toml), noise from the OS CSPRNG
    assert result["site"] == "hospital-a" and result["private"]
    assert 7.9 <= result["claimed_epsilon"] <= 8.0
    assert "claimed epsilon" in capsys.readouterr().out
