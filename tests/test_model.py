"""Adapters and the model's parameter groups."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
import torch
from torch import nn

from fedshift.common.adapters import FrozenNormAct, InputAdapter, LoRAConv1x1, LoRALinear
from fedshift.common.errors import ConfigError
from fedshift.common.model import ModelConfig, build_model, size_report


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(image_size=32))


def test_lora_conv_equals_closed_form() -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(6, 5, kernel_size=1, bias=False)
    lora = LoRAConv1x1(base, rank=2, alpha=4.0)
    nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(3, 6, 4, 4)
    w = base.weight[:, :, 0, 0] + 2.0 * lora.lora_up.weight[:, :, 0, 0] @ lora.lora_down.weight[:, :, 0, 0]
    expected = torch.einsum("oc,nchw->nohw", w, x)
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_linear_starts_as_identity_update() -> None:
    base = nn.Linear(7, 3)
    lora = LoRALinear(base, rank=2, alpha=2.0)
    x = torch.randn(4, 7)
    torch.testing.assert_close(lora(x), base(x))


def test_frozen_norm_equals_batchnorm_in_eval_mode() -> None:
    """timm's BatchNormAct2d (with its activation) and a plain BatchNorm2d, split into stats + affine."""
    from timm.layers import BatchNormAct2d

    torch.manual_seed(1)
    for bn in (BatchNormAct2d(7, act_layer=nn.ReLU6), nn.BatchNorm2d(7)):
        with torch.no_grad():
            cast(torch.Tensor, bn.running_mean).normal_()
            cast(torch.Tensor, bn.running_var).uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
        bn.eval()
        x = torch.randn(4, 7, 3, 3)
        frozen = FrozenNormAct(bn)
        torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)
        assert [n for n, _ in frozen.named_parameters()] == ["affine.weight", "affine.bias"]
        assert not list(frozen.affine.buffers())  # Opacus: a trainable layer must hold no buffers


def test_input_adapter_equals_copy_and_normalise() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    adapter = InputAdapter(mean, std)
    x = torch.rand(2, 1, 5, 5)
    expected = (x.repeat(1, 3, 1, 1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(adapter(x), expected)
    with pytest.raises(ConfigError, match="channels"):
        InputAdapter(mean, std, in_chans=2)


def test_fresh_model_computes_the_pretrained_features(model) -> None:
    """LoRA starts at zero: adapted backbone == pretrained backbone on the same input."""
    from fedshift.common.backbones import create_backbone

    plain = create_backbone("efficientnet_lite0")
    plain.reset_classifier(0)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = plain((x.repeat(1, 3, 1, 1) - 0.5) / 0.5)
        torch.testing.assert_close(model.forward_features(x), expected, rtol=1e-4, atol=1e-4)


def test_parameter_groups(model) -> None:
    shared = model.shared_state_dict()
    assert shared and all(".lora_" in k or k.startswith("head.") for k in shared)
    local = model.local_state_dict()
    assert {"input_adapter.conv.weight", "input_adapter.conv.bias"} <= set(local)
    norms = [k for k in local if k.startswith("local_norms.")]
    # FedBN-style: weight and bias of every norm layer in the two adapted stages (5 blocks x 3 BN)
    assert len(norms) == 2 * 15 and all(
        k.startswith("local_norms.blocks__5") or k.startswith("local_norms.blocks__6") for k in norms
    )
    assert not set(local) & set(shared)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for p in model.trainable_parameters()}
    assert trainable == expected
    n_shared = sum(v.numel() for v in shared.values())
    n_local = sum(v.numel() for v in local.values())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == n_shared + n_local
    no_norm = build_model(ModelConfig(image_size=32, local_norm=False))
    assert set(no_norm.local_state_dict()) == {"input_adapter.conv.weight", "input_adapter.conv.bias"}


def test_shared_round_trip_and_errors(model) -> None:
    state = {
        k: np.random.default_rng(0).normal(size=v.shape).astype(np.float32)
        for k, v in model.shared_state_dict().items()
    }
    model.load_shared_state_dict(state)
    for k, v in model.shared_state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k])
    key = next(iter(state))
    with pytest.raises(ConfigError, match="missing"):
        model.load_shared_state_dict({k: v for k, v in state.items() if k != key})
    with pytest.raises(ConfigError, match="shape"):
        model.load_shared_state_dict({**state, key: np.zeros((1, 1), np.float32)})


def test_backward_reaches_only_trainable_parameters(model) -> None:
    model.train(True)
    loss = model(torch.rand(4, 1, 32, 32)).logsumexp(1).sum()
    loss.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.backbone.parameters() if not p.requires_grad)
    assert not model.backbone.training  # frozen BN statistics stay frozen


def test_adapters_are_a_small_fraction_of_the_backbone(model) -> None:
    size = size_report(model)
    assert size["shared_bytes"] == 4 * size["shared_params"]
    assert size["shared_bytes"] <= 0.05 * size["backbone_bytes"]
    assert size["backbone_params"] > 3_000_000


def test_placement_and_rank_are_configurable() -> None:
    head_only = build_model(ModelConfig(adapter_rank=0))
    assert set(head_only.shared_state_dict()) == {"head.weight", "head.bias"}
    deeper = build_model(ModelConfig(adapter_stages=3, adapter_rank=8))
    assert len(deeper.adapted_layers) > len(build_model(ModelConfig()).adapted_layers)
    assert deeper.shared_state_dict()[f"backbone.{deeper.adapted_layers[0]}.lora_down.weight"].shape[0] == 8
    with pytest.raises(ConfigError, match="adapter-stages"):
        build_model(ModelConfig(adapter_stages=99))


def test_a_zero_head_starts_every_prediction_at_one_half_and_keeps_the_rest() -> None:
    random_head = build_model(ModelConfig(image_size=32))
    zero = build_model(ModelConfig(image_size=32, head_init="zero"))
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        probs = torch.softmax(zero(x), dim=1)
        assert torch.equal(probs, torch.full_like(probs, 0.5))
        # the same backbone, adapters and input adapter: only the head differs
        assert torch.allclose(zero.forward_features(x), random_head.forward_features(x))
    assert random_head.head.weight.abs().sum() > 0
    assert ModelConfig.from_dict(ModelConfig(head_init="zero").to_dict()).head_init == "zero"
    with pytest.raises(ConfigError, match="head-init"):
        ModelConfig(head_init="ones")
