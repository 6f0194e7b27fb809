"""Test-time adaptation of the norm statistics, on a site's own unlabelled images (labels never used).

The norm affines of the adapted stages are trained at each site, but their running *statistics*
stay the frozen pretrained (ImageNet) ones during training. Plain AdaBN (Li et al. 2016) replaces
every layer's statistics by those of the evaluation images; it assumes the model was trained with
statistics of its own training data, but here it moves every activation the adapters and head were
fitted to (it lowered the mean AUC from 0.95 to 0.6 in the shift study). So a site adapts
*relative to a reference*: its own validation images, from the distribution it trained on, or
their moments (:func:`norm_moments`, kept in its bundle). Each layer's input is mapped so that its
per-channel mean and variance on the evaluation images equal those on the reference, and then
normalised with the frozen statistics, as in training. It removes a scanner change between
training and deployment, and is the identity when there is none. Without a reference, only the
first layers are adapted (``first``; see :data:`fedshift.client.inference.STEM_LAYERS`). The
adapted statistics are for local inference only: never sent, never used in training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeAlias

import numpy as np
import torch
from torch import nn

from fedshift.common.data import to_tensor
from fedshift.common.errors import DataError
from fedshift.common.model import FedshiftModel, norm_layers

Moments: TypeAlias = dict[int, tuple[torch.Tensor, torch.Tensor]]  # id(layer) -> (mean, var) of its input
Reference: TypeAlias = np.ndarray | Mapping[str, torch.Tensor] | None  # images, their moments, or none


def _input_statistics(
    model: FedshiftModel,
    layers: list[nn.Module],
    images: np.ndarray,
    device: torch.device,
    batch_size: int,
    adapt: Callable[[nn.Module, torch.Tensor, torch.Tensor], None] | None,
) -> Moments:
    """Per layer, the per-channel mean and (biased) variance of its input over ``images``.

    One pass in forward order; with ``adapt``, each layer's statistics are set from
    the batch's own (``adapt(layer, mean, var)``) before it normalises the batch,
    so deeper layers see adapted inputs. Returns the batch-size-weighted averages.
    """
    sums: dict[int, list[torch.Tensor]] = {}
    counts: dict[int, int] = {}

    def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims).detach()
        var = x.var(dim=dims, unbiased=False).detach()
        if adapt is not None:
            adapt(module, mean, var)
        key, n = id(module), x.shape[0]
        if key in sums:
            sums[key][0] += mean * n
            sums[key][1] += var * n
        else:
            sums[key] = [mean * n, var * n]
        counts[key] = counts.get(key, 0) + n

    handles = [m.register_forward_pre_hook(pre_hook) for m in layers]
    try:
        with torch.no_grad():
            model.to(device)
            model.train(False)
            for begin in range(0, len(images), batch_size):
                x = to_tensor(
                    images[begin : begin + batch_size], model.config.image_size, model.config.in_chans
                )
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    return {k: (v[0] / counts[k], v[1] / counts[k]) for k, v in sums.items()}


def norm_moments(model: FedshiftModel, images: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """Every norm layer's input mean and variance on ``images`` (``<layer>.mean``, ``<layer>.var``), on the
    CPU: the reference of :func:`adapted_norm_statistics`, kept without the images."""
    named = norm_layers(model)
    stats = _input_statistics(model, [m for _, m in named], images, device, 512, None)
    out: dict[str, torch.Tensor] = {}
    for name, m in named:
        if id(m) in stats:
            out[f"{name}.mean"], out[f"{name}.var"] = (t.cpu() for t in stats[id(m)])
    return out


def _reference_moments(
    model: FedshiftModel,
    named: list[tuple[str, nn.Module]],
    reference: Reference,
    device: torch.device,
    batch_size: int,
) -> Moments:
    """The reference's moments per layer (measured with the frozen statistics in place, as in training)."""
    if reference is None:
        return {}
    if isinstance(reference, Mapping):  # measured before (norm_moments)
        return {
            id(m): (reference[f"{n}.mean"].to(device), reference[f"{n}.var"].to(device)) for n, m in named
        }
    if not len(reference):
        raise DataError("Expected reference images for relative norm adaptation, but got none")
    return _input_statistics(model, [m for _, m in named], reference, device, batch_size, None)


def _target(
    module: nn.Module,
    mean: torch.Tensor,
    var: torch.Tensor,
    frozen: tuple[torch.Tensor, torch.Tensor],
    ref: Moments,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics that move this input onto the reference's moments (its own ones without a reference)."""
    if id(module) not in ref:
        return mean, var
    m0, v0 = frozen
    ref_mean, ref_var = ref[id(module)]
    eps = float(getattr(module, "eps", 1e-5))
    ratio = var.clamp_min(1e-12) / ref_var.clamp_min(1e-12)
    return mean - (ref_mean - m0) * ratio.sqrt(), ((v0 + eps) * ratio - eps).clamp_min(0.0)


@contextmanager
def adapted_norm_statistics(
    model: FedshiftModel,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 512,
    *,
    reference: Reference = None,
    first: int | None = None,
) -> Iterator[int]:
    """Inside: every norm layer's statistics (or the ``first`` ones in forward order) adapted to ``images``;
    restored on exit. Yields the number of layers adapted.

    Without ``reference``: plain AdaBN, each layer uses the mean and variance of the inputs it receives
    on ``images``. With ``reference``: a layer whose input has mean ``m_t`` and variance ``v_t`` on
    ``images`` but ``m_r``, ``v_r`` on the reference gets ``mean = m_t - (m_r - m0) * sqrt(v_t / v_r)``
    and ``var + eps = (v0 + eps) * v_t / v_r`` (``m0``, ``v0``: its frozen statistics), i.e. it
    normalises ``(x - m_t) * sqrt(v_r / v_t) + m_r`` with the frozen statistics. Adapted statistics
    are measured in forward order, each layer after the earlier ones are adapted.
    """
    model.to(device)  # before the frozen statistics are kept: they are restored on the model's device
    named = norm_layers(model)[:first]
    layers = [m for _, m in named]
    saved = {id(m): (m.running_mean.clone(), m.running_var.clone()) for m in layers}  # type: ignore[union-attr,operator]
    ref = _reference_moments(model, named, reference, device, batch_size)

    def adapt(module: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> None:
        new_mean, new_var = _target(module, mean, var, saved[id(module)], ref)
        module.running_mean.copy_(new_mean)  # type: ignore[operator,union-attr]
        module.running_var.copy_(new_var)  # type: ignore[operator,union-attr]

    try:
        stats = _input_statistics(model, layers, images, device, batch_size, adapt) if len(images) else {}
        for m in layers:
            if id(m) in stats:
                adapt(m, *stats[id(m)])
        yield len(stats)
    finally:
        for m in layers:
            mean, var = saved[id(m)]
            m.running_mean.copy_(mean)  # type: ignore[operator,union-attr]
            m.running_var.copy_(var)  # type: ignore[operator,union-attr]
