"""Fine-tuning strategies, discriminative learning rates and progressive unfreezing.

References: parameter counts from a fresh timm backbone (independent of fedshift's
module surgery), the pretrained features for the untouched model, and hand-written
``lr * decay ** depth`` schedules.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
import torch
from torch import nn

from fedshift.client.training import param_groups, train_local
from fedshift.common.backbones import create_backbone
from fedshift.common.config import FederationConfig, TrainConfig
from fedshift.common.data import ImageSet
from fedshift.common.errors import ConfigError
from fedshift.common.finetune import FINETUNE_CHOICES, backbone_regions
from fedshift.common.model import FedshiftModel, ModelConfig, build_model

SIZE = 32


def _fresh() -> nn.Module:
    backbone = create_backbone("efficientnet_lite0", None)
    cast(Any, backbone).reset_classifier(0)
    return backbone


def _count(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _bn_affine(modules: list[nn.Module]) -> int:
    return sum(
        2 * m.num_features for root in modules for m in root.modules() if isinstance(m, nn.BatchNorm2d)
    )


def _numel(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


HEAD = 1280 * 2 + 2  # EfficientNet-Lite0 features -> 2 classes
INPUT_ADAPTER = 3 * 1 + 3  # 1x1 conv, grayscale -> RGB, with bias


@pytest.fixture(scope="module")
def fresh() -> nn.Module:
    return _fresh()


@pytest.mark.parametrize("local_norm", [True, False])
def test_parameter_groups_match_counts_from_a_fresh_backbone(fresh: nn.Module, local_norm: bool) -> None:
    regions = backbone_regions(fresh)
    assert len(regions.stages) == 7 and len(regions.stem) >= 2 and len(regions.tail) >= 2
    everything = [*regions.stem, *regions.stages, *regions.tail]
    last_two = [*regions.stages[-2:], *regions.tail]
    expected_shared = {
        "linear-probe": HEAD,
        "norm-only": _bn_affine(everything) + HEAD,
        "partial": _count(last_two) - (_bn_affine(last_two) if local_norm else 0) + HEAD,
        "full": _count(everything) - (_bn_affine(everything) if local_norm else 0) + HEAD,
    }
    expected_local = {
        "linear-probe": INPUT_ADAPTER,
        "norm-only": INPUT_ADAPTER,
        "partial": INPUT_ADAPTER + (_bn_affine(last_two) if local_norm else 0),
        "full": INPUT_ADAPTER + (_bn_affine(everything) if local_norm else 0),
    }
    for strategy, shared in expected_shared.items():
        model = build_model(ModelConfig(image_size=SIZE, finetune=strategy, local_norm=local_norm))
        assert _numel(model.shared_state_dict()) == shared, strategy
        assert _numel(model.local_state_dict()) == expected_local[strategy], strategy
        trainable = {id(p) for p in model.trainable_parameters()}
        requires = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == requires, strategy
        frozen_adapter = strategy == "linear-probe"
        assert len(trainable) == len(model.shared_state_dict()) + len(model.local_state_dict()) - (
            2 if frozen_adapter else 0
        )
    assert _count(everything) == 3_371_008  # EfficientNet-Lite0 without its classifier (timm)


def test_every_strategy_starts_from_the_pretrained_features() -> None:
    x = torch.rand(3, 1, SIZE, SIZE)
    reference = build_model(ModelConfig(image_size=SIZE, finetune="linear-probe"))
    with torch.no_grad():
        expected = reference.forward_features(x)
        for strategy in FINETUNE_CHOICES:
            got = build_model(ModelConfig(image_size=SIZE, finetune=strategy)).forward_features(x)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


def _data(n: int = 24, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    images = (rng.random((n, SIZE, SIZE)) * 60 + labels[:, None, None] * 120).astype(np.uint8)
    return ImageSet(images=images, labels=labels)


def _changed(model: FedshiftModel, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


@pytest.mark.parametrize("strategy", ["linear-probe", "partial", "norm-only"])
def test_training_moves_exactly_the_strategys_parameters(strategy: str) -> None:
    model = build_model(ModelConfig(image_size=SIZE, finetune=strategy))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_local(model, _data(), TrainConfig(batch_size=8), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {names[id(p)] for p in model.trainable_parameters()}
    assert _changed(model, before) == expected
    if strategy == "partial":  # stages 0-4 untouched, stage 5 and 6 trained
        assert all(
            ".blocks.5." in n
            or ".blocks.6." in n
            or "conv_head" in n
            or "bn2" in n
            or n.startswith(("head.", "input_adapter."))
            for n in expected
        )
        assert any(".blocks.5." in n for n in expected)


def test_discriminative_learning_rates_follow_depth() -> None:
    model = build_model(ModelConfig(image_size=SIZE, finetune="adapters"))
    groups = param_groups(model, TrainConfig(learning_rate=1e-2, lr_decay=0.5))
    by_lr = {float(cast(float, g["lr"])): cast(list[nn.Parameter], g["params"]) for g in groups}
    # head at depth 0, LoRA in the last stage at 1, in the stage before at 2, input adapter at 8
    assert sorted(by_lr) == pytest.approx([1e-2 * 0.5**8, 1e-2 * 0.25, 1e-2 * 0.5, 1e-2])
    head = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in by_lr[1e-2]} == head
    last_stage = {id(p) for p in model.backbone.blocks[6].parameters() if p.requires_grad}
    assert {id(p) for p in by_lr[5e-3]} == last_stage
    # the optimizer really uses them
    optimizer = torch.optim.AdamW(param_groups(model, TrainConfig(lr_decay=0.5)), lr=1.0)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx(
        sorted(1e-3 * 0.5**d for d in (0, 1, 2, 8))
    )


def test_progressive_unfreezing_opens_one_level_per_period() -> None:
    config = TrainConfig(unfreeze_every=2)
    assert [config.trainable_depth(r) for r in range(1, 8)] == [0, 0, 1, 1, 2, 2, 3]
    assert TrainConfig().trainable_depth(5) is None
    model = build_model(ModelConfig(image_size=SIZE, finetune="partial"))
    model.freeze_for_training(config.trainable_depth(1))
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.head.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_local(model, _data(), TrainConfig(batch_size=8), torch.device("cpu"))
    assert _changed(model, before) == {"head.weight", "head.bias"}
    model.freeze_for_training(config.trainable_depth(3))  # + the last stage and the tail
    opened = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".blocks.6." in n for n in opened) and not any(".blocks.5." in n for n in opened)


def test_strategy_keys_round_trip_and_bad_values_are_refused() -> None:
    fed = FederationConfig.from_run_config({"finetune": "partial", "lr-decay": 0.5, "unfreeze-every": 3})
    assert (fed.model.finetune, fed.train.lr_decay, fed.train.unfreeze_every) == ("partial", 0.5, 3)
    assert FederationConfig.from_run_config(fed.to_run_config()) == fed
    for values, needles in [
        ({"finetune": "lora-everything"}, ("finetune", "'lora-everything'", "linear-probe")),
        ({"lr-decay": 1.5}, ("lr-decay", "1.5", "(0, 1]")),
        ({"unfreeze-every": -1}, ("unfreeze-every", "-1", "e.g. 2")),
    ]:
        with pytest.raises(ConfigError) as bad:
            FederationConfig.from_run_config(values)
        message = str(bad.value)
        assert "\n" not in message and all(n in message for n in needles), message


def test_simulate_refuses_an_unknown_strategy_in_one_line(tmp_path, capsys) -> None:
    from fedshift.common.cli import main
    from fedshift.tests.helpers import one_line_error

    code = main(["simulate", "--strategy", "adapters,everything", "--out", str(tmp_path / "run")])
    one_line_error(code, capsys.readouterr().err, "finetune", "'everything'", "linear-probe")
    assert not (tmp_path / "run").exists()
    code = main(["simulate", "--ewc-lambda", "1,10", "--out", str(tmp_path / "run")])
    one_line_error(code, capsys.readouterr().err, "--ewc-lambda", "--continual")
