"""Checkpoints of the global shared adapters.

Layout of a checkpoint directory::

    checkpoint.json                     # manifest: round, model config, file names, sha256s
    adapters-round-0003.safetensors     # the shared tensors of that round
    server-state-round-0003.safetensors # the server optimizer's moments (only when it has any)

The tensor files of a round are written first, under their own names; the manifest
is then replaced atomically, and older tensor files are removed. A crash at any
moment leaves a manifest that points at complete files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedshift.common.errors import CheckpointError
from fedshift.common.io import atomic_write_bytes, atomic_write_json
from fedshift.common.model import ModelConfig

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
FORMAT = "fedshift-checkpoint/1"
_FILES = ("adapters-round-*.safetensors", "server-state-round-*.safetensors")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    round: int  # federated round after which the adapters were saved
    model: ModelConfig  # how to rebuild the model the adapters belong to
    arrays: dict[str, np.ndarray]  # shared tensors by name
    extra: dict[str, Any]  # free-form metadata (e.g. run id)
    state: dict[str, np.ndarray] = field(default_factory=dict)  # server optimizer moments, dtype as saved


def save_checkpoint(
    directory: str | Path,
    arrays: dict[str, np.ndarray],
    model: ModelConfig,
    server_round: int,
    extra: dict[str, Any] | None = None,
    state: dict[str, np.ndarray] | None = None,
) -> Path:
    """Save ``arrays`` (as float32) and ``state`` (in its own dtype, exactly) as the checkpoint of
    ``server_round``; returns the manifest path. ``state`` is the server's optimizer moments."""
    from safetensors.numpy import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()})
    name = f"adapters-round-{server_round:04d}.safetensors"
    atomic_write_bytes(directory / name, blob)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "round": server_round,
        "model": model.to_dict(),
        "file": name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "extra": extra or {},
    }
    if state:
        state_blob = save({k: np.ascontiguousarray(v) for k, v in state.items()})
        manifest["state_file"] = f"server-state-round-{server_round:04d}.safetensors"
        manifest["state_sha256"] = hashlib.sha256(state_blob).hexdigest()
        atomic_write_bytes(directory / manifest["state_file"], state_blob)
    atomic_write_json(directory / MANIFEST, manifest)
    kept = {name, manifest.get("state_file")}
    for pattern in _FILES:
        for old in directory.glob(pattern):
            if old.name not in kept:
                old.unlink(missing_ok=True)
    logger.debug("Checkpoint of round %d written to %s", server_round, directory)
    return directory / MANIFEST


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Load and verify a checkpoint directory."""
    from safetensors.numpy import load

    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"Expected a checkpoint directory with {MANIFEST}, but {str(directory)!r} has none; "
            "pass the 'checkpoint' folder of a run directory"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        blob = (directory / manifest["file"]).read_bytes()
        state_blob = (directory / manifest["state_file"]).read_bytes() if "state_file" in manifest else None
        model = ModelConfig.from_dict(manifest["model"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"Expected a readable checkpoint in {str(directory)!r}, but it is incomplete or "
            f"corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"Expected checkpoint format {FORMAT!r}, but got {manifest.get('format')!r}")
    if hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
        raise CheckpointError(
            f"Expected {manifest['file']!r} to match the sha256 in {MANIFEST}, but it does not; "
            "the checkpoint is corrupt"
        )
    if state_blob is not None and hashlib.sha256(state_blob).hexdigest() != manifest.get("state_sha256"):
        raise CheckpointError(
            f"Expected {manifest['state_file']!r} to match the sha256 in {MANIFEST}, but it does not; "
            "the checkpoint is corrupt"
        )
    return Checkpoint(
        round=int(manifest["round"]),
        model=model,
        arrays=dict(load(blob)),
        extra=dict(manifest.get("extra", {})),
        state=dict(load(state_blob)) if state_blob is not None else {},
    )
