"""Where a site's data and local state live, from the node config.

Deployment: the SuperNode's node config names them (``data-path``, ``state-dir``,
``site-name``, ``device``). Simulation: Flower gives each virtual node a
``partition-id``, and site *k* lives in ``<sites-root>/site-k/``.
"""

from __future__ import annotations

import functools
import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedshift.client.integrity import bind_key
from fedshift.common.config import RELEASE_PRIVACY_KEYS, FederationConfig, PrivacyConfig
from fedshift.common.data import MANIFEST_SUFFIXES, Dataset, check_fits, load_dataset
from fedshift.common.errors import ConfigError, PrivacyError
from fedshift.common.io import atomic_write_bytes
from fedshift.common.model import ModelConfig
from fedshift.common.settings import Setting, check_known

logger = logging.getLogger(__name__)

SITE_DATA_FILE = "data.npz"
LOCAL_STATE_FILE = "site_local.safetensors"
SITE_CONFIG_FILE = "site.toml"  # simulation: a site's own settings, the keys of a deployment node config
NODE_CONFIG = "node-config"  # the source errors name

# splits a site evaluates for the server (``eval-splits``): metrics of them leave without DP, so never train
EVAL_SPLITS = ("val", "test")

# the node-config keys of a site's own facts (its privacy keys are PrivacyConfig's and RELEASE_PRIVACY_KEYS)
NODE_SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting(
            "data-path",
            str,
            "",
            "deployment: the site's MedMNIST-layout .npz (train/val/test splits) or .csv/.tsv manifest",
        ),
        Setting(
            "state-dir", str, "", "site-local state (input adapter, ledger, egress log); default: beside data"
        ),
        Setting("site-name", str, "", "display name in reports; default: the data file's name"),
        Setting("integrity-key", str, "", "HMAC key of the ledger and egress log, outside state-dir"),
        Setting("device", str, "auto", "auto, cpu or cuda:N; default: the run config's device"),
        Setting(
            "egress-metrics", str, "", "comma-separated metric keys allowed to leave; default: fedshift's"
        ),
        Setting("eval-splits", str, ",".join(EVAL_SPLITS), "comma-separated splits the server may evaluate"),
    )
}
NODE_LOCATION_KEYS = ("data-path", "state-dir", "site-name", "integrity-key")  # where the site's files live

# node-config keys a site may set for itself (besides where its data and state live)
SITE_KEYS = frozenset(
    {*(k for k in NODE_SETTINGS if k not in NODE_LOCATION_KEYS), *PrivacyConfig.KEYS, *RELEASE_PRIVACY_KEYS}
)

# the run-config keys a deployed site ignores: its privacy is its own (:func:`deployed_privacy`)
SCREENED_KEYS = frozenset({*PrivacyConfig.KEYS, *RELEASE_PRIVACY_KEYS})


def parse_eval_splits(value: Any) -> frozenset[str]:
    """``eval-splits`` (comma-separated, or a list) as a set; ``train`` and unknown splits are refused."""
    if value is None:
        return frozenset(EVAL_SPLITS)
    names = value if isinstance(value, list) else str(value).split(",")
    splits = frozenset(str(n).strip() for n in names if str(n).strip())
    if "train" in splits:
        raise ConfigError(
            f"Expected eval-splits to name only {', '.join(EVAL_SPLITS)}, but got {value!r}; metrics of the "
            "training split would leave without differential privacy: remove train"
        )
    if not splits <= set(EVAL_SPLITS):
        raise ConfigError(
            f"Expected eval-splits to be a comma-separated subset of {', '.join(EVAL_SPLITS)}, but got "
            f'{value!r}; e.g. eval-splits = "val,test"'
        )
    return splits


def read_site_config(path: Path) -> dict[str, Any]:
    """A simulated site's ``site.toml`` (empty when absent); unknown keys and bad TOML are refused."""
    if not path.is_file():
        return {}
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"Expected {path} to be valid TOML, but reading it failed: {exc}; fix the file"
        ) from None
    check_known(values, SITE_KEYS, str(path))
    return values


@dataclass(frozen=True)
class SiteSettings:
    """One hospital's local facts."""

    name: str  # display name in reports
    data_path: Path  # MedMNIST-layout .npz with train/val/test splits, or a .csv/.tsv manifest
    state_dir: Path  # site-local state (input adapter, privacy ledger, egress log)
    device: str  # auto, cpu or cuda:N
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # DP-SGD and the site's budget
    egress_metrics: frozenset[str] | None = None  # metric keys allowed to leave; None = the defaults
    eval_splits: frozenset[str] = frozenset(EVAL_SPLITS)  # splits the server may have evaluated
    # the site's own privacy of its other DP releases (RELEASE_PRIVACY_KEYS), over the run config's
    releases: tuple[tuple[str, Any], ...] = ()
    image_size: int = 64  # the side a manifest's images are decoded to (the run's image-size)

    def federation(self, fed: FederationConfig) -> FederationConfig:
        """``fed`` with this site's own release privacy (Fisher, label counts, moments) applied."""
        return fed.with_release_privacy(dict(self.releases))

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], fed: FederationConfig) -> SiteSettings:
        """Deployment: private by default (DP and the secure RNG on; the budget must be set),
        and the privacy settings are the site's alone (:func:`deployed_privacy`).

        Simulation: every site takes the run config's privacy settings, except what its
        own ``site.toml`` (in its site directory) sets.
        """
        if "partition-id" in node_config and "data-path" not in node_config and fed.sites_root:
            site_dir = Path(fed.sites_root) / f"site-{int(node_config['partition-id'])}"
            node_config = {**read_site_config(site_dir / SITE_CONFIG_FILE), **node_config}
        device = str(node_config.get("device", fed.device))
        allowed = node_config.get("egress-metrics")
        egress = (
            frozenset(k.strip() for k in str(allowed).split(",") if k.strip())
            if allowed is not None
            else None
        )
        splits = parse_eval_splits(node_config.get("eval-splits"))
        if "data-path" in node_config:
            data_path = Path(str(node_config["data-path"]))
            state_dir = Path(str(node_config.get("state-dir", data_path.parent)))
            name = str(node_config.get("site-name", data_path.stem))
            if "integrity-key" in node_config:  # the ledger's and egress log's key, outside state_dir
                bind_key(state_dir, Path(str(node_config["integrity-key"])))
            privacy, releases = deployed_privacy(node_config, fed, name)
            size = fed.model.image_size
            return cls(name, data_path, state_dir, device, privacy, egress, splits, releases, size)
        if "partition-id" in node_config and fed.sites_root:
            name = f"site-{int(node_config['partition-id'])}"
            site_dir = Path(fed.sites_root) / name
            privacy = fed.privacy.with_values(node_config, NODE_CONFIG)
            own = tuple((k, node_config[k]) for k in RELEASE_PRIVACY_KEYS if k in node_config)  # site.toml
            fed.with_release_privacy(dict(own), NODE_CONFIG)  # checked here: bad values are refused at once
            data_path = site_dir / SITE_DATA_FILE
            size = fed.model.image_size
            return cls(name, data_path, site_dir, device, privacy, egress, splits, own, size)
        raise ConfigError(
            "Expected the node config to set 'data-path' (deployment) or the run config to set "
            "'sites-root' (simulation), but neither is set; pass "
            "--node-config \"data-path='/path/site.npz'\""
        )


# a deployed site's privacy defaults: DP on, noise and sampling from the OS CSPRNG, no budget (set it)
DEPLOYMENT_PRIVACY = {"dp": True, "dp-secure-rng": True, "dp-epsilon": float("nan")}


def deployed_privacy(
    node_config: Mapping[str, Any], run: FederationConfig, site: str
) -> tuple[PrivacyConfig, tuple[tuple[str, Any], ...]]:
    """A deployed site's privacy settings: its node config over fedshift's defaults, nothing else.

    Returns its DP-SGD settings (over :data:`DEPLOYMENT_PRIVACY`) and the privacy of its
    other DP releases (:data:`RELEASE_PRIVACY_KEYS`: the Fisher's, the label counts' and
    the moments' noise multipliers and clip norms). The run config is the coordinator's:
    its values of these keys (in ``run``) are ignored here, with a warning naming the ones
    that differ from fedshift's defaults, so the coordinator cannot lower any noise, raise
    a clip norm or switch the accountant. The seeded noise generator is refused: its seed
    (run seed, round, site name) is known to the coordinator, which could regenerate the
    noise and subtract it. The daemon's start check (``fedshift client``) calls this too.
    """
    privacy = PrivacyConfig().with_values({**DEPLOYMENT_PRIVACY, **node_config}, NODE_CONFIG)
    if not privacy.secure_rng:
        raise PrivacyError(
            "Expected dp-secure-rng to be true at a deployed site (a node config with data-path: noise from "
            f"the OS CSPRNG), but got {node_config.get('dp-secure-rng')!r}: a seeded noise generator's seed "
            "is known to the coordinator, which could recompute the noise and remove it; delete the "
            "dp-secure-rng line from the site's config (seeded noise is for simulations only)"
        )
    defaults = FederationConfig().to_run_config()
    releases = tuple((k, node_config.get(k, defaults[k])) for k in RELEASE_PRIVACY_KEYS)
    run.with_release_privacy(
        dict(releases), NODE_CONFIG
    )  # the site's values checked at once, whatever the run
    screened = {k: v for k, v in run.to_run_config().items() if k in SCREENED_KEYS}
    ignored = tuple(sorted((k, v) for k, v in screened.items() if v != defaults[k]))
    if ignored:
        _warn_ignored(site, ignored)
    return privacy, releases


@functools.lru_cache(maxsize=32)
def _warn_ignored(site: str, ignored: tuple[tuple[str, Any], ...]) -> None:
    """Once per process and setting: the run config's privacy values this deployed site ignores."""
    logger.warning(
        "%s: ignoring the run config's %s: a deployed site's privacy settings come only from its own "
        "node config (set them there if the site's governance agrees)",
        site,
        ", ".join(f"{k}={v!r}" for k, v in ignored),
    )


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, version: tuple[int, ...], state_dir: str, image_size: int) -> Dataset:
    return load_dataset(Path(path), image_size=image_size, state_dir=Path(state_dir))


def _version(path: Path) -> tuple[int, ...]:
    """What a change of the site's data changes: the file's stat; for a manifest also every listed file's."""
    if not path.exists():
        return (0,)
    files = [path]
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        from fedshift.common.manifest import read_manifest

        files += [row.file for row in read_manifest(path).rows]
    stats = [f.stat() for f in files]
    return tuple(v for st in stats for v in (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))


def load_site_data(settings: SiteSettings, model: ModelConfig | None = None) -> Dataset:
    """The site's dataset (an ``.npz``, or a manifest: its patient-level split kept and its images decoded
    once under the state dir), read once per process (again when it or a listed file changes).

    With the run's ``model``, data the model cannot take (other channels, more classes) is refused in one
    line: the stages load it before they charge any privacy.
    """
    path = settings.data_path
    dataset = _load_cached(str(path), _version(path), str(settings.state_dir), settings.image_size)
    if model is not None:
        check_fits(dataset, model.in_chans, model.num_classes, f"{settings.name}'s data ({path})")
    return dataset


def load_local_state(state_dir: Path) -> dict[str, torch.Tensor] | None:
    """The site-local tensors saved in ``state_dir``, or ``None`` before the first round."""
    path = state_dir / LOCAL_STATE_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def save_local_state(state_dir: Path, state: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
    atomic_write_bytes(state_dir / LOCAL_STATE_FILE, blob)
