"""The one experiment runner of ``simulate`` and ``shift-study``: shifted sites, a Flower run, a report.

:func:`build_sites` turns one dataset into shifted hospital sites and :func:`federate`
writes them to disk and federates them on Flower's simulation engine; every experiment
(the plain simulation, the fine-tuning comparison, the continual scenario, the shift
study) goes through these two. :func:`run_experiment` is ``fedshift simulate``'s
default experiment: the federation, its no-DP reference, a local-only baseline and
the report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedshift.client.bundle import bundle_path
from fedshift.client.ledger import open_ledger
from fedshift.client.site import SITE_CONFIG_FILE, SITE_DATA_FILE, load_local_state
from fedshift.common.checkpoint import load_checkpoint
from fedshift.common.config import FederationConfig
from fedshift.common.data import load_dataset, save_npz
from fedshift.common.errors import ConfigError
from fedshift.common.io import as_jsonable, atomic_write_json
from fedshift.common.model import FedshiftModel, build_model
from fedshift.common.synthetic_colour import make_synthetic_colour
from fedshift.server.app import RESULTS_FILE
from fedshift.simulations.attacks import Attack, attack_mods
from fedshift.simulations.baseline import local_only
from fedshift.simulations.engine import run_flower_simulation
from fedshift.simulations.report import (
    bytes_per_round,
    epsilon_table,
    ewc_line,
    mean_metric,
    negative_transfer,
    negative_transfer_line,
    plot_auc_per_round,
    site_table,
)
from fedshift.simulations.shift import (
    ScannerProfile,
    SimulatedSite,
    default_profiles,
    format_site_table,
    plan_sites,
    simulate_sites,
    site_summary,
)
from fedshift.simulations.unseen import join_unseen, split_unseen, unseen_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentSpec:
    """One simulated multi-site experiment."""

    out_dir: Path  # run directory (created)
    data: str | None = None  # .npz or image folder; None = built-in SYNTHETIC chest X-rays
    sites: int = 4  # number of simulated hospitals
    prevalences: tuple[float, ...] | None = None  # explicit per-site prevalence of class 1
    dirichlet_alpha: float | None = None  # or: prevalences drawn from Dirichlet(alpha)
    quantity_skew: float = 0.0  # 0 = equal site sizes; larger = more unequal
    max_per_site: int | None = None  # cap on images per site
    synthetic_n: int = 2000  # images generated when no --data is given
    synthetic_colour: bool = False  # without --data: SYNTHETIC H&E-like colour patches, not chest X-rays
    baseline: bool = True  # also train every site alone
    # with DP on: also run this federation, for reference (the same options without DP, so the non-DP
    # recipe: fedshift.simulations.options.reference); None = no reference
    dp_reference: FederationConfig | None = None
    site_epsilons: tuple[float, ...] | None = None  # one privacy budget per site (its site.toml)
    unseen_sites: int | None = None  # hospitals that never train and join at the end; None: 1 on real data
    attacks: tuple[Attack, ...] = ()  # simulated sites that alter their training replies (--attack)
    federation: FederationConfig = field(default_factory=FederationConfig)


def build_sites(
    spec: ExperimentSpec,
    *,
    prevalences: Sequence[float] | None = None,
    profiles: Sequence[ScannerProfile] | None = None,
    unseen: int | None = 0,
) -> tuple[list[SimulatedSite], str]:
    """Load the source data and turn it into shifted sites; returns the sites and a data label.

    ``prevalences`` and ``profiles`` override the spec's label shift and the default scanners (the
    colour ones for RGB data). ``unseen`` more sites (None: 1 on real data, 0 on SYNTHETIC) come last,
    named ``unseen-k``.
    """
    if spec.synthetic_colour and spec.data is not None:
        raise ConfigError(
            f"Expected either --data or --synthetic-colour, but got both (--data {spec.data}); drop one"
        )
    if spec.synthetic_colour:
        dataset = make_synthetic_colour(spec.synthetic_n, 0.5, size=28, seed=spec.federation.seed)
    else:
        dataset = load_dataset(
            spec.data,
            synthetic_n=spec.synthetic_n,
            seed=spec.federation.seed,
            image_size=spec.federation.model.image_size,
        )
    trained, unseen_profiles = default_profiles(dataset.channels)
    pool = dataset.pooled()
    specs = plan_sites(
        spec.sites,
        prevalences=prevalences if prevalences is not None else spec.prevalences,
        dirichlet_alpha=spec.dirichlet_alpha if prevalences is None else None,
        profiles=profiles if profiles is not None else trained,
        unseen_profiles=unseen_profiles,
        quantity_skew=spec.quantity_skew,
        pool_counts=list(pool.class_counts(dataset.num_classes)),
        max_per_site=spec.max_per_site,
        seed=spec.federation.seed,
        unseen=(0 if dataset.synthetic else 1) if unseen is None else unseen,
    )
    sites = simulate_sites(
        pool,
        specs,
        class_names=dataset.class_names,
        source=dataset.source,
        synthetic=dataset.synthetic,
        seed=spec.federation.seed,
    )
    return sites, dataset.label


def with_channels(fed: FederationConfig, sites: Sequence[SimulatedSite]) -> FederationConfig:
    """``fed`` with its ``image-channels`` set to the sites' images' channels (1 grey, 3 colour)."""
    channels = sites[0].data.channels if sites else fed.model.in_chans
    return replace(fed, model=replace(fed.model, in_chans=channels))


def federate(
    fed: FederationConfig,
    sites: Sequence[SimulatedSite],
    root: Path,
    site_epsilons: tuple[float, ...] | None = None,
    *,
    every_site: bool = False,
    attacks: Sequence[Attack] = (),
) -> tuple[dict[str, Any], float]:
    """Write the sites under ``root/sites``, run the Flower simulation; the server's results, seconds.

    ``site_epsilons`` gives each site its own budget, in its ``site.toml`` (as a
    hospital would set it in its own configuration). Rounds wait for at most
    ``fed.min_nodes`` sites, or for every site with ``every_site``. ``attacks``
    alter their sites' training replies (:mod:`fedshift.simulations.attacks`).
    """
    if site_epsilons is not None and len(site_epsilons) != len(sites):
        raise ConfigError(f"Expected one budget per site ({len(sites)}), but got {len(site_epsilons)}")
    for k, site in enumerate(sites):
        site_dir = root / "sites" / site.spec.name
        site_dir.mkdir(parents=True, exist_ok=True)
        save_npz(site_dir / SITE_DATA_FILE, site.data)
        if site_epsilons is not None:
            (site_dir / SITE_CONFIG_FILE).write_text(f"dp-epsilon = {float(site_epsilons[k])!r}\n")
    fed = replace(
        with_channels(fed, sites),
        run_dir=str(root / "server"),
        sites_root=str(root / "sites"),
        min_nodes=len(sites) if every_site else min(fed.min_nodes, len(sites)),
    )
    t0 = time.time()
    if attacks:
        logger.warning("Attacks in this simulation: %s", ", ".join(map(str, attacks)))
    run_flower_simulation(fed, len(sites), attack_mods(attacks))
    seconds = time.time() - t0
    results_path = Path(fed.run_dir) / RESULTS_FILE
    if not results_path.is_file():
        raise RuntimeError(f"The Flower simulation ended without writing {results_path}")
    return json.loads(results_path.read_text()), seconds


def site_models(checkpoint_dir: Path, names: Sequence[str], sites_root: Path) -> Iterator[FedshiftModel]:
    """The model each site holds after a run: the checkpoint's shared tensors, the site's local ones."""
    checkpoint = load_checkpoint(checkpoint_dir)
    for name in names:
        model = build_model(checkpoint.model)
        model.load_shared_state_dict(checkpoint.arrays)
        local = load_local_state(sites_root / name)
        if local is not None:
            model.load_local_state_dict(local)
        yield model


def ledger_epsilons(sites_root: Path, delta: float, names: Sequence[str] | None = None) -> dict[str, float]:
    """The epsilon each site's own ledger reports now (all runs), at ``delta``.

    ``names`` are the sites, in order (default: every site directory, sorted).
    """
    if names is None:
        names = sorted(p.name for p in sites_root.iterdir() if p.is_dir())
    ledgers = {name: open_ledger(sites_root / name) for name in names}
    return {name: ledger.epsilon(delta) for name, ledger in ledgers.items() if ledger is not None}


@dataclass
class _Runs:
    """What one ``simulate`` experiment measured: the federation, its no-DP reference, the baseline."""

    server: dict[str, Any]
    seconds: float
    reference: dict[str, Any] | None = None
    reference_seconds: float = 0.0
    local: dict[str, dict[str, float]] | None = None
    flags: dict[str, dict[str, float | bool]] | None = None
    baseline_seconds: float = 0.0
    unseen: dict[str, dict[str, Any]] = field(default_factory=dict)  # the hospitals outside the federation


def run_experiment(spec: ExperimentSpec) -> dict[str, Any]:
    """Run everything; writes config, results JSON, checkpoint and plot into ``spec.out_dir``.

    With DP on, ``spec.dp_reference`` (the same options without DP) also runs
    (``<out>/no-dp``) unless it is ``None``, so the cost of privacy is printed beside it.
    """
    started = time.time()
    out = spec.out_dir
    everyone, data_label = build_sites(spec, unseen=spec.unseen_sites)
    logger.info("Simulated sites:\n%s", format_site_table(everyone))
    sites, unseen = split_unseen(everyone)
    spec = replace(spec, federation=with_channels(spec.federation, everyone))
    fed = spec.federation
    atomic_write_json(
        out / "config.json",
        as_jsonable(
            {
                "data": spec.data or data_label,
                "sites": [site_summary(s) for s in sites],
                "unseen_sites": [site_summary(s) for s in unseen],
                "run_config": fed.to_run_config(),
                # the no-DP reference's (<out>/no-dp), when it runs: the same options, the non-DP recipe
                "reference_run_config": spec.dp_reference.to_run_config() if spec.dp_reference else None,
                "quantity_skew": spec.quantity_skew,
                "dirichlet_alpha": spec.dirichlet_alpha,
            }
        ),
    )
    runs = _federations(spec, sites)
    runs.unseen = join_unseen(fed, unseen, out, runs.server)
    _baseline(spec, sites, runs)
    report = _report(spec, sites, data_label, runs, started)
    atomic_write_json(out / "results.json", as_jsonable(report))
    plot_auc_per_round(
        runs.server["history"]["evaluate"],
        out / "auc_per_round.png",
        title=f"Per-site AUC per round — {data_label}",
        final_test=runs.server["final_test"],
        local=runs.local,
    )
    _add_text(report, spec, data_label, runs)
    return report


def _federations(spec: ExperimentSpec, sites: list[SimulatedSite]) -> _Runs:
    fed, privacy = spec.federation, spec.federation.privacy
    budgets = spec.site_epsilons if privacy.enabled else None
    runs = _Runs(*federate(fed, sites, spec.out_dir, budgets, attacks=spec.attacks))
    if privacy.enabled and spec.dp_reference is not None:
        logger.info("The same options without DP, for reference (%s)", spec.out_dir / "no-dp")
        if spec.dp_reference.privacy.enabled:
            raise ValueError("Expected the DP reference to run without DP")
        runs.reference, runs.reference_seconds = federate(
            spec.dp_reference, sites, spec.out_dir / "no-dp", attacks=spec.attacks
        )
    return runs


def _baseline(spec: ExperimentSpec, sites: list[SimulatedSite], runs: _Runs) -> None:
    """Every site trained alone, and the sites where federation did worse (negative transfer)."""
    t0 = time.time()
    if spec.baseline:
        baseline = {s.spec.name: local_only(spec.federation, s.spec.name, s.data) for s in sites}
        runs.local = {name: result["test"] for name, result in baseline.items()}
        history = runs.server["history"]["evaluate"]
        last = max(history, key=int, default=None)
        federated_val = history[last] if last is not None else {}
        local_val = {name: result["val"] for name, result in baseline.items() if "val" in result}
        runs.flags = negative_transfer(federated_val, local_val)
    runs.baseline_seconds = time.time() - t0


def _privacy_report(
    spec: ExperimentSpec, sites: list[SimulatedSite], server: dict[str, Any]
) -> dict[str, Any]:
    privacy = spec.federation.privacy
    budgets = spec.site_epsilons if privacy.enabled else None
    return {
        "dp": privacy.enabled,
        "epsilon_budget": privacy.epsilon if privacy.enabled else None,
        "site_epsilon_budgets": (
            dict(zip([s.spec.name for s in sites], budgets, strict=True)) if budgets else None
        ),
        "delta": privacy.delta,
        "accountant": privacy.accountant,
        "epsilon_per_round": _epsilons(server["history"]),
        "ledger_epsilon": ledger_epsilons(spec.out_dir / "sites", privacy.delta) if privacy.enabled else {},
        "refused": server["history"].get("refused", []),
    }


def _report(
    spec: ExperimentSpec, sites: list[SimulatedSite], data_label: str, runs: _Runs, started: float
) -> dict[str, Any]:
    server, reference, local = runs.server, runs.reference, runs.local
    sent = bytes_per_round(server["history"]["train"])
    size = server["size"]
    return {
        "data": data_label,
        "synthetic": sites[0].data.synthetic,
        "sites": [site_summary(s) for s in sites],
        "privacy": _privacy_report(spec, sites, server),
        "attacks": [str(a) for a in spec.attacks],
        "federated_test": server["final_test"],
        "federated_no_dp_test": reference["final_test"] if reference else None,
        "local_only_test": local,
        "unseen_sites": runs.unseen,
        "bundles": {  # every site's model bundle: the trained sites' (final-model stage), the unseen ones'
            name: str(bundle_path(spec.out_dir / "sites" / name))
            for name in [s.spec.name for s in sites if s.spec.name in server.get("bundles", [])]
            + [*runs.unseen]
        },
        "negative_transfer": runs.flags,
        "mean_test_auc": {
            "federated": mean_metric(server["final_test"], "auc"),
            "federated_no_dp": mean_metric(reference["final_test"], "auc") if reference else None,
            "local_only": mean_metric(local, "auc") if local else None,
        },
        "bytes_per_round": sent,
        "size": size,
        "max_bytes_fraction_of_backbone": max(sent.values(), default=0) / size["backbone_bytes"],
        "history": server["history"],
        "seconds": {
            "federated": runs.seconds,
            "federated_no_dp": runs.reference_seconds,
            "local_only": runs.baseline_seconds,
            "total": time.time() - started,
        },
    }


def _add_text(report: dict[str, Any], spec: ExperimentSpec, data_label: str, runs: _Runs) -> None:
    """The printed tables and lines of the report (not written to ``results.json``)."""
    fed, privacy = spec.federation, spec.federation.privacy
    groups = {
        "dp" if privacy.enabled else "fed": runs.server["final_test"],
        "no-dp": runs.reference["final_test"] if runs.reference else None,
        "local": runs.local,
    }
    label = data_label
    if spec.attacks:
        label += f"; ATTACKED: {', '.join(map(str, spec.attacks))}"
    if privacy.enabled:
        label += (
            f"; dp = federated with DP-SGD (epsilon <= {_budgets(spec, privacy.epsilon)} per site), "
            "no-dp = the same without DP"
        )
    report["table"] = site_table(groups, report["bytes_per_round"], label)
    if fed.ewc.enabled:
        report["ewc_line"] = ewc_line(runs.server["history"].get("privacy", {}), fed.ewc.lam, fed.ewc.anchor)
    if runs.flags is not None:
        report["negative_transfer_line"] = negative_transfer_line(runs.flags)
    if runs.unseen:
        report["unseen_table"] = unseen_table(runs.unseen)
    if privacy.enabled:
        epsilons = report["privacy"]["epsilon_per_round"]
        report["epsilon_table"] = epsilon_table(epsilons, privacy.delta, _budgets(spec, privacy.epsilon))


def _epsilons(history: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``site -> round -> epsilon`` the sites reported after each round."""
    out: dict[str, dict[str, float]] = {}
    for rnd, per_site in history.get("privacy", {}).items():
        for site, record in per_site.items():
            if record.get("epsilon") is not None:
                out.setdefault(site, {})[str(int(rnd))] = float(record["epsilon"])
    return out


def _budgets(spec: ExperimentSpec, default: float) -> str:
    if spec.site_epsilons:
        return ",".join(f"{e:g}" for e in spec.site_epsilons)
    return f"{default:g}"
