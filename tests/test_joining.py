"""A hospital outside the federation: its plan, the final-model content it gets, and the bundle it builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from fedshift.client.bundle import CORRECTION_FILE, NORM_FILE, load_bundle, verify_bundle
from fedshift.client.inference import PRIOR_NONE, STEM_LAYERS, estimate_target_prior, predict_logits, softmax
from fedshift.client.joining import JOINED_SPLIT, final_model, join_site, training_prior
from fedshift.client.predict import predict_bundle
from fedshift.client.site import SiteSettings
from fedshift.common.config import FederationConfig, PrivacyConfig
from fedshift.common.data import make_synthetic_cxr
from fedshift.common.errors import ConfigError, DataError
from fedshift.common.model import ModelConfig, build_model
from fedshift.common.shift_statistics import GLOBAL_KEY, GlobalStatistics
from fedshift.server.app import final_model_content
from fedshift.simulations.shift import DEFAULT_PROFILES, UNSEEN_PROFILES, plan_sites
from fedshift.simulations.unseen import AS_RECEIVED, SITE_SIDE, unseen_table

CPU = torch.device("cpu")
FED = FederationConfig(device="cpu", num_rounds=3, model=ModelConfig(image_size=32))


def test_unseen_sites_are_planned_after_the_trained_ones_with_their_prevalences_and_scanners() -> None:
    alone = plan_sites(4, pool_counts=[1000, 1000], seed=3)
    both = plan_sites(4, pool_counts=[1000, 1000], seed=3, unseen=2)
    assert [s.name for s in both] == ["site-0", "site-1", "site-2", "site-3", "unseen-0", "unseen-1"]
    assert [s.prevalence for s in both[:4]] == [s.prevalence for s in alone]  # 0.2 ... 0.8
    assert [s.profile for s in both[:4]] == [s.profile for s in alone]
    assert [s.prevalence for s in both[4:]] == [0.3, 0.7]
    assert [s.profile for s in both[4:]] == list(UNSEEN_PROFILES[:2])
    assert not {p.name for p in UNSEEN_PROFILES} & {p.name for p in DEFAULT_PROFILES}
    # one pool: every site, unseen ones too, gets an equal share (the trained sites 500 -> 333 images)
    assert {s.n for s in alone} == {500} and {s.n for s in both} == {333}
    for c in (0, 1):
        drawn = sum(round(s.n * s.prevalence) if c else s.n - round(s.n * s.prevalence) for s in both)
        assert drawn <= 1000
    with pytest.raises(ConfigError, match=r"^Expected --unseen-sites to be an integer >= 0, but got -1"):
        plan_sites(4, pool_counts=[1000, 1000], unseen=-1)


def _content(prior: list[float] | None) -> tuple[ArrayRecord, RecordDict]:
    torch.manual_seed(0)
    model = build_model(FED.model)
    with torch.no_grad():  # adapters that are not the initial ones
        for p in model.shared_state_dict().values():
            p.add_(0.01 * torch.randn_like(p))
    arrays = ArrayRecord(model.shared_state_dict())
    stats = GlobalStatistics(run="7", sites=3, train_prior=np.asarray(prior)) if prior is not None else None
    return arrays, final_model_content(arrays, FED.num_rounds, 3, stats)


def _site(root: Path) -> SiteSettings:
    return SiteSettings(
        "unseen-0", root / "data.npz", root, "cpu", privacy=PrivacyConfig(enabled=True, epsilon=8.0)
    )


def test_the_final_model_content_carries_the_training_prior_only_when_there_is_one() -> None:
    _, content = _content([0.6, 0.4])
    np.testing.assert_array_equal(training_prior(content), [0.6, 0.4])
    assert GlobalStatistics.from_record(content[GLOBAL_KEY]).class_means is None
    _, plain = _content(None)
    assert training_prior(plain) is None and GLOBAL_KEY not in plain


def test_a_joining_site_adapts_to_its_own_images_and_estimates_its_prior(tmp_path: Path) -> None:
    arrays, content = _content([0.6, 0.4])
    own = make_synthetic_cxr(120, seed=4, size=32).split("train").images
    joined = join_site(content, FED, _site(tmp_path), own, CPU, run_id="7", class_names=("normal", "lesion"))
    verify_bundle(joined.path)
    bundle = load_bundle(tmp_path)
    assert NORM_FILE in verify_bundle(joined.path)["files"]
    # the shared tensors are the content's; the local ones are the model's own, as built
    for key, value in arrays.to_torch_state_dict().items():
        assert torch.equal(bundle.model.shared_state_dict()[key], value)
    fresh = build_model(FED.model)
    for key, value in fresh.local_state_dict().items():
        assert torch.equal(bundle.model.local_state_dict()[key], value)
    # AdaBN, checked independently on the stem's norm layer: its statistics are the mean and biased
    # variance of its input over the site's own images
    received = final_model(content, FED)
    name, first = next((n, m) for n, m in received.named_modules() if hasattr(m, "running_mean"))
    seen: list[torch.Tensor] = []
    handle = first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    predict_logits(received, own, CPU)
    handle.remove()
    x = torch.cat(seen)
    stats = bundle.model.norm_statistics()
    torch.testing.assert_close(stats[f"{name}.running_mean"], x.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        stats[f"{name}.running_var"], x.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5
    )
    assert not torch.equal(stats[f"{name}.running_mean"], received.norm_statistics()[f"{name}.running_mean"])
    # its prior: the run's estimator on the adapted model's probabilities, from the federation's prior
    logits = predict_logits(bundle.model, own, CPU)
    expected = estimate_target_prior(softmax(logits), np.array([0.6, 0.4]), FED.shift, seed=FED.seed)
    assert bundle.correction is not None and bundle.correction.threshold is None
    np.testing.assert_allclose(bundle.correction.estimate.prior, expected.prior, rtol=1e-9)
    assert bundle.correction.calibration.kind == "identity"
    state = json.loads((bundle.path / CORRECTION_FILE).read_text())
    assert state["split"] == JOINED_SPLIT and state["n_unlabeled"] == len(own) == joined.images
    # the card: a site that never trained spent no privacy
    card = bundle.card
    assert card["joined"] == {"unlabelled_images": 120, "norm_layers_adapted": joined.layers}
    assert joined.layers == STEM_LAYERS == 1  # the stem's only: every deeper layer keeps its statistics
    frozen = received.norm_statistics()
    assert [k for k in stats if not torch.equal(stats[k], frozen[k])] == [
        f"{name}.running_mean",
        f"{name}.running_var",
    ]
    assert card["privacy"]["epsilon"] == 0.0 and card["validation"] == {} and card["test"] == {}
    assert bundle.class_names == ("normal", "lesion") and (card["rounds"], card["sites"]) == (3, 3)
    # predicting with the bundle: no prior change = the adapted model's softmax
    test = make_synthetic_cxr(60, seed=5, size=32).split("train").images
    result = predict_bundle(bundle, test, CPU, prior=PRIOR_NONE)
    np.testing.assert_allclose(result.corrected, softmax(predict_logits(bundle.model, test, CPU)), atol=1e-12)


def test_without_a_training_prior_a_joining_site_adapts_but_does_not_correct(tmp_path: Path) -> None:
    _, content = _content(None)
    own = make_synthetic_cxr(60, seed=4, size=32).split("train").images
    join_site(content, FED, _site(tmp_path), own, CPU, run_id="7")
    bundle = load_bundle(tmp_path)
    assert bundle.correction is None and not (tmp_path / CORRECTION_FILE).exists()
    assert bundle.card["label_shift"] == {"status": "off", "split": None}
    with pytest.raises(
        DataError, match=r"^Expected unlabelled images at joining site unseen-0, but got none"
    ):
        join_site(content, FED, _site(tmp_path / "b"), own[:0], CPU, run_id="7")
    assert not (tmp_path / "b").exists()


def test_the_unseen_table_shows_both_columns_of_each_metric() -> None:
    row = {
        "profile": "portable (res=0.6)",
        "prevalence": 0.3,
        AS_RECEIVED: {"auc": 0.81, "accuracy": 0.7, "log_loss": 0.9},
        SITE_SIDE: {"auc": 0.83, "accuracy": 0.76, "log_loss": 0.55},
        "applied": ["prior (estimated here)"],
    }
    lines = unseen_table({"unseen-0": row}).splitlines()
    assert "prior (estimated here)" in lines[0]
    assert lines[1].split()[:5] == ["site", "scanner", "prev", "AUC", "recv"]
    cells = lines[-1].split()
    assert cells[0] == "unseen-0" and cells[-6:] == ["0.810", "0.830", "0.700", "0.760", "0.900", "0.550"]
