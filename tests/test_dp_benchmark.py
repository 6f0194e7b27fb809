"""The stock Opacus baseline of the DP benchmark, checked with numbers.

References: GroupNorm against ``F.group_norm`` with Opacus's group count;
Opacus's per-sample gradients against one-sample autograd (micro-batches);
the stock input map against fedshift's ``InputAdapter`` at initialisation;
the stock sample rate and epsilon against fedshift's.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Any, cast

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedshift.client.dp import sample_rate
from fedshift.common.adapters import InputAdapter
from fedshift.common.backbones import backbone_norm, create_backbone
from fedshift.common.privacy import epsilon
from fedshift.simulations.benchmarks.stock_opacus import (
    GrayToRGB,
    GroupNormAct,
    build_stock_model,
    replace_batchnorms,
)

BatchNorm = nn.modules.batchnorm._BatchNorm


# timm models are typed as nn.Module, but their blocks are reached by attribute and index
@pytest.fixture(scope="module")
def original() -> Any:
    return create_backbone("efficientnet_lite0", None)


@pytest.fixture(scope="module")
def stock() -> Any:
    return build_stock_model(seed=0)


def _act_types(model: nn.Module) -> Counter[str]:
    return Counter(type(m).__name__ for m in model.modules() if isinstance(m, nn.ReLU6 | nn.ReLU | nn.SiLU))


def test_every_batchnorm_is_replaced_and_opacus_validates(original: Any, stock: Any) -> None:
    fused = [m for m in original.modules() if isinstance(m, BatchNorm)]
    assert len(fused) == 49 and all(hasattr(m, "act") for m in fused)  # timm's BatchNormAct2d
    # the trap: Opacus's validator matches exact types and does not see the fused BatchNormAct2d
    assert ModuleValidator.validate(copy.deepcopy(original).train(), strict=False) == []
    assert not any(isinstance(m, BatchNorm) for m in stock.modules())
    assert sum(isinstance(m, GroupNormAct) for m in stock.modules()) == 49
    ModuleValidator.validate(stock, strict=True)  # raises on any unsupported layer
    assert all(p.requires_grad for p in stock.parameters())
    head = stock[1].get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == 2
    assert stock(torch.rand(2, 1, 32, 32)).shape == (2, 2)


def test_activations_survive_the_replacement(original: Any, stock: Any) -> None:
    assert _act_types(stock) == _act_types(original)
    assert _act_types(original)["ReLU6"] == 33
    bns = [m for m in original.modules() if isinstance(m, BatchNorm)]
    gns = [m for m in stock[1].modules() if isinstance(m, GroupNormAct)]
    for bn, gn in zip(bns, gns, strict=True):
        assert type(gn.act) is type(bn.act) and type(gn.drop) is type(bn.drop)
        assert not getattr(gn.act, "inplace", False)  # in-place on a hooked output breaks Opacus


def test_group_norm_act_matches_group_norm_with_pretrained_affine(original: Any) -> None:
    model: Any = copy.deepcopy(original)
    bn = copy.deepcopy(model.blocks[1][0].bn1)  # 96 channels, ReLU6
    assert replace_batchnorms(model) == 49
    gn = model.blocks[1][0].bn1
    assert isinstance(gn, GroupNormAct) and gn.norm.num_groups == math.gcd(32, 96) == 32
    x = torch.randn(3, 96, 5, 5) * 3 + 1
    expected = F.relu6(F.group_norm(x, 32, bn.weight, bn.bias, bn.eps))
    torch.testing.assert_close(gn(x), expected, rtol=0, atol=1e-5)
    fresh: Any = copy.deepcopy(original)
    replace_batchnorms(fresh, keep_affine=False)  # Opacus's own fix: scale 1, shift 0
    assert torch.equal(fresh.blocks[1][0].bn1.norm.weight, torch.ones(96))
    assert fresh.blocks[1][1].bn1.norm.num_groups == math.gcd(32, 144) == 16


def test_stock_input_map_equals_fedshift_input_adapter_at_start(original: Any) -> None:
    mean, std = backbone_norm(original)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(GrayToRGB(mean, std)(x), InputAdapter(mean, std)(x), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the input needs no grad here
def test_per_sample_gradients_match_micro_batches(stock: Any) -> None:
    """Opacus on conv_stem (timm's Conv2dSame: functorch) + the first GroupNormAct (Opacus's sampler)."""
    torch.manual_seed(0)
    path: Any = copy.deepcopy(nn.Sequential(stock[0], stock[1].conv_stem, stock[1].bn1)).double().train()
    with torch.no_grad():  # move the norm off its pretrained affine so both of its grads are generic
        path[2].norm.weight.add_(0.1 * torch.randn_like(path[2].norm.weight))
    reference = copy.deepcopy(path)
    x = torch.rand(3, 1, 32, 32, dtype=torch.float64)
    weights = torch.randn(32, 16, 16, dtype=torch.float64)  # a fixed linear read-out of the output

    gsm = GradSampleModule(path, batch_first=True, loss_reduction="sum", strict=True)
    (gsm(x) * weights).sum().backward()
    params = [p for p in path.parameters() if p.requires_grad]
    assert len(params) == 3  # conv weight, norm weight, norm bias
    for i in range(len(x)):
        loss = (reference(x[i : i + 1]) * weights).sum()
        expected = torch.autograd.grad(loss, [p for p in reference.parameters() if p.requires_grad])
        for p, g in zip(params, expected, strict=True):
            grad_sample = cast(Any, p).grad_sample  # set by Opacus
            assert grad_sample is not None and grad_sample.shape == (3, *p.shape)
            torch.testing.assert_close(grad_sample[i], g, rtol=0, atol=1e-5)
            assert g.abs().max() > 1e-3  # not a vacuous comparison of zeros
    gsm._close()


def test_stock_and_fedshift_privacy_match_when_n_is_a_multiple_of_b() -> None:
    n, b, sigma, steps = 4704, 32, 1.0, 20
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=b)
    q = DPDataLoader.from_data_loader(loader).sample_rate
    assert q == sample_rate(n, b) == 1 / 147
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon([(sigma, q, steps)], 1e-5, "rdp") == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)


def test_fedshift_dp_mode_runs_the_dp_recipe_at_the_benchmarks_size_and_seed() -> None:
    from fedshift.common.config import DP_RECIPE, FederationConfig
    from fedshift.common.model import ModelConfig
    from fedshift.simulations.benchmarks.dp_throughput import _recipe

    recipe = _recipe(ModelConfig(image_size=48, seed=7))
    assert (recipe.model.image_size, recipe.model.seed, recipe.seed) == (48, 7, 7)
    assert recipe.model.head_init == DP_RECIPE["head-init"] == "zero"
    assert recipe.train.learning_rate == DP_RECIPE["learning-rate"] != FederationConfig().train.learning_rate
