"""A site model bundle: the federation's final model at one site, with the site's corrections and its card.

:func:`final_model_reply` (the final-model stage, ``query.final_model``) writes it into
``<state-dir>/model/``: the shared tensors the server sent and the site's own local ones,
the model config, the backbone's identity (name, sha256 of its weights file), the site's
calibration and label-shift state, a model card (``card.json``, ``card.md``) and
``manifest.json`` with every file's sha256. The files go into a temporary sibling folder,
are fsynced, and the folder is renamed over the old bundle: a reader sees the old bundle or
the new one. :func:`load_bundle` checks every file and the backbone before building the model.
Nothing in the bundle leaves the site: the reply is the site's name only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message, RecordDict

from fedshift.client.correction import CORRECTION_FILE, RUN_FIELD, SiteCorrection
from fedshift.client.egress import stored_answer
from fedshift.client.ledger import open_ledger
from fedshift.client.norm_adaptation import norm_moments
from fedshift.client.site import SiteSettings, load_site_data
from fedshift.common.backbones import weights_file
from fedshift.common.calibration import Calibration
from fedshift.common.config import FederationConfig
from fedshift.common.errors import BundleError, FedshiftError
from fedshift.common.io import atomic_write_folder, set_aside
from fedshift.common.model import FedshiftModel, ModelConfig, build_model
from fedshift.common.prior_estimation import PriorEstimate
from fedshift.common.protocol import (
    CONFIG_KEY,
    METRICS_KEY,
    NUM_SITES_KEY,
    SITE_KEY,
    SPLIT_TEST,
    SPLIT_VAL,
    round_of,
    site_record,
)

logger = logging.getLogger(__name__)

BUNDLE_DIR = "model"  # in the site's state directory
MANIFEST_FILE = "manifest.json"
SHARED_FILE = "shared.safetensors"
LOCAL_FILE = "local.safetensors"
CONFIG_FILE = "model-config.json"
BACKBONE_FILE = "backbone.json"
CARD_JSON = "card.json"
CARD_MD = "card.md"
NORM_FILE = "norm-statistics.safetensors"  # optional: norm statistics adapted to the site's own images
REFERENCE_FILE = "reference-moments.safetensors"  # optional: its norm layers' input moments on its val images
REQUIRED_FILES = (SHARED_FILE, LOCAL_FILE, CONFIG_FILE, BACKBONE_FILE, CARD_JSON, CARD_MD)
FORMAT = 1
_OLD = set_aside(BUNDLE_DIR).name  # the previous bundle while the new one is renamed into place
REWRITE = (
    "the bundle is corrupt or incomplete: run the federation (its final-model stage) again to rewrite it"
)


@dataclass(frozen=True, eq=False)
class SiteBundle:
    """A verified bundle: the site's model (shared and local tensors loaded), its corrections and card."""

    path: Path
    model: FedshiftModel
    model_config: ModelConfig
    correction: SiteCorrection | None  # None: label-shift correction off in the run, or never fitted
    card: dict[str, Any]
    backbone: dict[str, str]
    label_shift: dict[str, Any] | None = None  # the bundle's label-shift.json as the site wrote it
    reference: dict[str, torch.Tensor] | None = None  # norm-layer input moments on the site's own images

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The model's classes in output order, as the site's data named them (None: an older bundle)."""
        names = self.card.get("class_names")
        return tuple(str(n) for n in names) if names else None


def bundle_path(state_dir: str | Path) -> Path:
    """Where a site's bundle lives: ``<state-dir>/model``."""
    return Path(state_dir) / BUNDLE_DIR


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backbone_identity(config: ModelConfig) -> dict[str, str]:
    """The backbone's name, weights file name and the sha256 of the weights installed here."""
    path = weights_file(config.backbone, config.weights)
    if not path.is_file():
        raise BundleError(
            f"Expected the weights of backbone {config.backbone!r} at {str(path)!r}, but there is no such "
            "file; install the backbone's weights (or pass the --weights file the federation trained with)"
        )
    stat = path.stat()
    return {
        "name": config.backbone,
        "weights": path.name,
        "sha256": _file_sha256(str(path), stat.st_size, stat.st_mtime_ns),
    }


# ----------------------------------------------------------------------------- writing


def _tensor_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def bundle_files(
    model: FedshiftModel,
    card: Mapping[str, Any],
    correction: Mapping[str, Any] | None,
    norm_statistics: Mapping[str, torch.Tensor] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, bytes]:
    """The bundle's files (but the manifest) as bytes: tensors, config, backbone, corrections, card; the
    norm statistics a site adapted to its own images, and the reference moments of its own images
    (test-time adaptation moves new images onto them), if it has them."""
    files = {
        SHARED_FILE: _tensor_bytes(model.shared_state_dict()),
        LOCAL_FILE: _tensor_bytes(model.local_state_dict()),
        CONFIG_FILE: _json_bytes(model.config.to_dict()),
        BACKBONE_FILE: _json_bytes(card["backbone"]),
        CARD_JSON: _json_bytes(card),
        CARD_MD: card_markdown(card).encode(),
    }
    if correction is not None:
        files[CORRECTION_FILE] = _json_bytes(correction)
    if norm_statistics is not None:
        files[NORM_FILE] = _tensor_bytes(norm_statistics)
    if reference is not None:
        files[REFERENCE_FILE] = _tensor_bytes(reference)
    return files


def write_bundle(state_dir: str | Path, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` and their manifest as ``<state-dir>/model``, atomically; the bundle's path."""
    target = bundle_path(state_dir)
    manifest = {"format": FORMAT, "files": {name: sha256_of(data) for name, data in sorted(files.items())}}
    atomic_write_folder(target, {**files, MANIFEST_FILE: _json_bytes(manifest)})
    return target


# ----------------------------------------------------------------------------- the card


def _stored_metrics(state_dir: Path, run_id: str, server_round: int, split: str) -> dict[str, float] | None:
    content = stored_answer(state_dir, run_id, server_round, split)
    if content is None or METRICS_KEY not in content.metric_records:
        return None
    return {k: float(v) for k, v in content.metric_records[METRICS_KEY].items()}  # type: ignore[arg-type]


def _privacy_card(site: SiteSettings) -> dict[str, Any]:
    """The site's epsilon spent (lifetime, from its ledger) at its delta, and its budget."""
    delta = float(site.privacy.delta)
    ledger = open_ledger(site.state_dir)
    if ledger is not None and ledger.entries:
        epsilon: float | None = float(ledger.epsilon(delta))
    else:
        epsilon = 0.0 if site.privacy.enabled else None
    budget = float(site.privacy.epsilon)
    return {
        "dp": bool(site.privacy.enabled),
        "epsilon": epsilon,
        "delta": delta,
        "budget_epsilon": budget if math.isfinite(budget) else None,
    }


def site_card(
    fed: FederationConfig,
    site: SiteSettings,
    run_id: str,
    num_sites: int,
    label_shift: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The model card: run, rounds, sites, the site's privacy spent, finetune, its metrics in the run."""
    validation: dict[str, float] = {}
    for server_round in range(fed.num_rounds, 0, -1):  # the last round the site evaluated
        found = _stored_metrics(site.state_dir, run_id, server_round, SPLIT_VAL)
        if found is not None:
            validation = {**found, "round": float(server_round)}
            break
    try:
        version = metadata.version("fedshift")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "run_id": run_id,
        "site": site.name,
        "rounds": fed.num_rounds,
        "sites": num_sites,
        "finetune": fed.model.finetune,
        "class_names": list(class_names) if class_names is not None else None,
        "backbone": backbone_identity(fed.model),
        "privacy": _privacy_card(site),
        "validation": validation,
        "test": _stored_metrics(site.state_dir, run_id, fed.num_rounds, SPLIT_TEST) or {},
        "label_shift": dict(label_shift),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fedshift_version": version,
    }


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def card_markdown(card: Mapping[str, Any]) -> str:
    """``card.json`` for people."""
    privacy, backbone = card["privacy"], card["backbone"]
    spent = (
        f"epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:g}"
        if privacy["epsilon"] is not None
        else "no differential privacy (dp=false)"
    )
    lines = [
        f"# Model card: {card['site']}",
        "",
        f"- Federation run {card['run_id']}: {card['rounds']} rounds, {card['sites']} sites",
        f"- Fine-tuning: {card['finetune']}",
        f"- Classes (output order): {', '.join(card.get('class_names') or ['not recorded'])}",
        f"- Backbone: {backbone['name']} ({backbone['weights']}, sha256 {backbone['sha256'][:16]}...)",
        f"- Privacy spent at this site: {spent}",
        f"- Label-shift correction: {card['label_shift']['status']}",
        f"- Written {card['created']} by fedshift {card['fedshift_version']}",
    ]
    for title, key in (("Validation", "validation"), ("Test", "test")):
        if card[key]:
            lines += ["", f"## {title} metrics (at this site)", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(card[key].items())]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the stage


def _label_shift_state(
    fed: FederationConfig, site: SiteSettings, run_id: str
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The site's correction fitted in this run (``label-shift.json``) and the card's note on it."""
    if not fed.shift.correction:
        return None, {"status": "off", "split": None}
    path = site.state_dir / CORRECTION_FILE
    if not path.is_file():
        return None, {"status": "not-fitted", "split": None}
    data = json.loads(path.read_text())
    if str(data.get(RUN_FIELD, "")) != run_id:  # an earlier run's: not this model's calibration
        logger.warning("%s: %s is from run %s, not this run: left out", site.name, path, data.get(RUN_FIELD))
        return None, {"status": "not-fitted", "split": None}
    return data, {"status": "on", "split": data.get("split")}


def final_model_reply(
    msg: Message, fed: FederationConfig, site: SiteSettings, model: FedshiftModel
) -> Message:
    """Write the site's bundle for the final global adapters in ``msg``; reply with the site's name only."""
    config = msg.content.config_records.get(CONFIG_KEY)
    num_sites = int(config.get(NUM_SITES_KEY, 0)) if config is not None else 0  # type: ignore[arg-type]
    run_id = str(msg.metadata.run_id)
    correction, note = _label_shift_state(fed, site, run_id)
    data = load_site_data(site, fed.model)
    card = site_card(fed, site, run_id, num_sites, note, data.class_names)
    reference = None
    if SPLIT_VAL in data.splits and len(data.split(SPLIT_VAL)):  # the federation's TTA reference, kept here
        reference = norm_moments(model, data.split(SPLIT_VAL).images, torch.device("cpu"))
    path = write_bundle(site.state_dir, bundle_files(model, card, correction, reference=reference))
    logger.info("%s: round %d's final model written to %s", site.name, round_of(msg), path)
    return Message(RecordDict({SITE_KEY: site_record(site.name)}), reply_to=msg)


# ----------------------------------------------------------------------------- reading


def _bundle_dir(path: str | Path) -> Path:
    given = Path(path)
    for candidate in (given, bundle_path(given), given.parent / _OLD, given / _OLD):
        if (candidate / MANIFEST_FILE).is_file():
            return candidate
    raise BundleError(
        f"Expected a site model bundle at {str(given)!r} (a folder with {MANIFEST_FILE}, or a site's state "
        f"directory with {BUNDLE_DIR}/), but there is none; run the federation to its end (the final-model "
        "stage writes it) and pass --model <state-dir>/model"
    )


def _read_json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"Expected {str(folder / name)!r} to be valid JSON, but reading it failed "
            f"({type(exc).__name__}); {REWRITE}"
        ) from None


def _check_files(folder: Path, files: Mapping[str, str]) -> None:
    rewrite = REWRITE
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(
                f"Expected {MANIFEST_FILE} in {str(folder)!r} to list {name!r}, but it does not; {rewrite}"
            )
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise BundleError(f"Expected the bundle file {str(path)!r}, but it is missing; {rewrite}")
        if sha256_of(path.read_bytes()) != expected:
            raise BundleError(
                f"Expected {str(path)!r} to match its sha256 in {MANIFEST_FILE}, but it does not; {rewrite}"
            )


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """The manifest of the bundle at ``path``, after checking every file and the installed backbone."""
    folder = _bundle_dir(path)
    manifest = _read_json(folder, MANIFEST_FILE)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT:
        raise BundleError(
            f"Expected {str(folder / MANIFEST_FILE)!r} to be a format-{FORMAT} manifest with a 'files' "
            f"table, but it is not; {REWRITE}"
        )
    _check_files(folder, files)
    config = ModelConfig.from_dict(_read_json(folder, CONFIG_FILE))
    recorded = _read_json(folder, BACKBONE_FILE)
    sha = recorded.get("sha256") if isinstance(recorded, dict) else None
    installed = backbone_identity(config)
    if sha != installed["sha256"]:
        raise BundleError(
            f"Expected the installed weights of backbone {config.backbone!r} ({installed['weights']}) to "
            f"have the sha256 in {str(folder / BACKBONE_FILE)!r} ({str(sha)[:16]}...), "
            f"but they have {installed['sha256'][:16]}...; install the weights the federation trained with"
        )
    return {**manifest, "path": str(folder)}


def _floats(values: Any) -> np.ndarray:
    return np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def correction_from_json(data: Mapping[str, Any]) -> SiteCorrection:
    """The :class:`SiteCorrection` that :meth:`SiteCorrection.to_json` wrote."""
    cal = data["calibration"]
    calibration = Calibration(str(cal["kind"]), _floats(cal["weights"]), _floats(cal["bias"]), math.nan)
    interval = data.get("interval")
    estimate = PriorEstimate(
        prior=_floats(data["prior"]),
        source_prior=_floats(data["source_prior"]),
        method=str(data["method"]),
        n=int(data["n_unlabeled"]),
        iterations=0,
        converged=True,
        interval=(_floats(interval[0]), _floats(interval[1])) if interval is not None else None,
        fallback=bool(data["fallback"]),
        reason=str(data["reason"]),
        estimate=_floats(data["estimate"]) if data.get("estimate") is not None else None,
    )
    threshold = data.get("threshold")
    return SiteCorrection(
        calibration, str(cal.get("note", "")), estimate, float(threshold) if threshold is not None else None
    )


def load_bundle(path: str | Path) -> SiteBundle:
    """The verified bundle at ``path`` (the bundle folder or the site's state directory), model on the CPU."""
    from safetensors.torch import load

    manifest = verify_bundle(path)
    folder = Path(manifest["path"])
    config = ModelConfig.from_dict(_read_json(folder, CONFIG_FILE))
    model = build_model(config)
    try:
        model.load_shared_state_dict(dict(load((folder / SHARED_FILE).read_bytes())))
        model.load_local_state_dict(dict(load((folder / LOCAL_FILE).read_bytes())))
        if NORM_FILE in manifest["files"]:
            model.load_norm_statistics(dict(load((folder / NORM_FILE).read_bytes())))
        reference = (
            dict(load((folder / REFERENCE_FILE).read_bytes()))
            if REFERENCE_FILE in manifest["files"]
            else None
        )
    except FedshiftError:
        raise
    except Exception as exc:
        raise BundleError(
            f"Expected the tensors in {str(folder)!r} to fit the model in {CONFIG_FILE}, but loading them "
            f"failed ({type(exc).__name__}); {REWRITE}"
        ) from None
    model.train(False)
    label_shift = _read_json(folder, CORRECTION_FILE) if CORRECTION_FILE in manifest["files"] else None
    correction = correction_from_json(label_shift) if label_shift is not None else None
    card, backbone = _read_json(folder, CARD_JSON), _read_json(folder, BACKBONE_FILE)
    return SiteBundle(folder, model, config, correction, card, backbone, label_shift, reference)
