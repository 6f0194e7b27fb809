"""Tables and plots of a simulated federation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from fedshift.common.protocol import FISHER_SOURCE_FIELD

COLUMNS = (("auc", "AUC"), ("accuracy", "acc"), ("balanced_accuracy", "bal.acc"), ("ece", "ECE"))


def _fmt(value: float) -> str:
    return "  n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _metric(m: Mapping[str, float], key: str) -> float:
    # Flower metric keys are kebab-case; local results use snake_case.
    return float(m.get(key, m.get(key.replace("_", "-"), math.nan)))


def mean_metric(per_site: Mapping[str, Mapping[str, float]], key: str) -> float:
    values = [_metric(m, key) for m in per_site.values()]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def render_table(title: str, rows: list[list[str]], mean_row: bool = True) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0 or (mean_row and i == len(rows) - 2):
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def site_table(
    groups: Mapping[str, Mapping[str, Mapping[str, float]] | None],
    bytes_per_round: Mapping[str, float],
    data_label: str,
) -> str:
    """Per-site test metrics of each group (e.g. "fed", "local") side by side, plus bytes per round.

    The first group names the sites; groups that are ``None`` are left out.
    """
    present = {name: g for name, g in groups.items() if g is not None}
    first = next(iter(present.values()))
    head = ["site", "n"] + [f"{name} {c}" for name in present for _, c in COLUMNS] + ["bytes/round"]
    rows = [head]
    for site in sorted(first):
        row = [site, str(int(_metric(first[site], "n")))]
        for group in present.values():
            row += [_fmt(_metric(group.get(site, {}), k)) for k, _ in COLUMNS]
        row.append(f"{int(bytes_per_round.get(site, 0)):,}")
        rows.append(row)
    mean = ["mean", ""] + [_fmt(mean_metric(g, k)) for g in present.values() for k, _ in COLUMNS] + [""]
    rows.append(mean)
    return render_table(f"Per-site test results on {data_label}", rows)


def epsilon_table(epsilons: Mapping[str, Mapping[str, float]], delta: float, budget: str) -> str:
    """Epsilon each site's ledger reported after each round (``site -> round -> epsilon``)."""
    rounds = sorted({int(r) for per_round in epsilons.values() for r in per_round})
    head = ["site"] + [f"r{r}" for r in rounds]
    rows = [head]
    for site in sorted(epsilons):
        per_round = {int(r): v for r, v in epsilons[site].items()}
        rows.append([site] + [f"{per_round[r]:.3f}" if r in per_round else "-" for r in rounds])
    title = f"Privacy spent per site after each round: epsilon at delta={delta:g} (budget {budget})"
    return render_table(title, rows, mean_row=False)


def plot_auc_per_round(
    evaluate_history: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: str | Path,
    title: str,
    final_test: Mapping[str, Mapping[str, float]] | None = None,
    local: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """PNG of each site's validation AUC per round; after the last round, test AUC of the
    federated model (star) and of the local-only baseline (cross)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted(evaluate_history, key=int)
    sites = sorted({s for r in rounds for s in evaluate_history[r]})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for site in sites:
        xs: list[int] = []
        ys: list[float] = []
        for r in rounds:
            if site in evaluate_history[r]:
                xs.append(int(r))
                ys.append(_metric(evaluate_history[r][site], "auc"))
        (line,) = ax.plot(xs, ys, marker="o", label=site)
        end = (xs[-1] if xs else 0) + 0.5
        if final_test and site in final_test:
            ax.plot([end], [_metric(final_test[site], "auc")], marker="*", ms=12, color=line.get_color())
        if local and site in local:
            ax.plot([end + 0.3], [_metric(local[site], "auc")], marker="x", ms=9, color=line.get_color())
    ax.set_xlabel("round")
    ax.set_ylabel("AUC: validation per round; test: ★ federated, × local-only")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bytes_per_round(train_history: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """Mean bytes each site sent per round."""
    sent: dict[str, list[float]] = {}
    for per_site in train_history.values():
        for site, metrics in per_site.items():
            sent.setdefault(site, []).append(float(metrics["bytes-sent"]))
    return {site: sum(v) / len(v) for site, v in sent.items()}


def negative_transfer(
    federated_val: Mapping[str, Mapping[str, float]],
    local_val: Mapping[str, Mapping[str, float]],
    margin: float = 0.0,
) -> dict[str, dict[str, float | bool]]:
    """Per site: the federated and the local-only model's validation AUC, and a flag when
    federation does worse than training alone (by more than ``margin``)."""
    out: dict[str, dict[str, float | bool]] = {}
    for site in sorted(set(federated_val) & set(local_val)):
        fed, loc = _metric(federated_val[site], "auc"), _metric(local_val[site], "auc")
        flagged = not math.isnan(fed) and not math.isnan(loc) and fed < loc - margin
        out[site] = {"federated_auc": fed, "local_auc": loc, "gap": fed - loc, "flagged": flagged}
    return out


def negative_transfer_line(flags: Mapping[str, Mapping[str, float | bool]]) -> str:
    """One line for the report: which sites did worse federated than alone (validation AUC)."""
    worse = [
        f"{site} ({v['federated_auc']:.3f} vs {v['local_auc']:.3f})"
        for site, v in flags.items()
        if v["flagged"]
    ]
    if not worse:
        return "Negative transfer: none (every site's federated validation AUC >= its local-only one)"
    return "Negative transfer: federated worse than local-only on validation AUC at " + ", ".join(worse)


def ewc_line(
    privacy_history: Mapping[str, Mapping[str, Mapping[str, object]]], lam: float, anchor: str
) -> str:
    """One line for the report: EWC's strength and anchor, and where each site's Fisher came from."""
    sources: dict[str, set[str]] = {}
    for per_site in privacy_history.values():
        for site, record in per_site.items():
            if FISHER_SOURCE_FIELD in record:
                sources.setdefault(str(record[FISHER_SOURCE_FIELD]), set()).add(site)
    listed = "; ".join(f"{source}: {', '.join(sorted(sites))}" for source, sites in sorted(sources.items()))
    listed = listed or "no site (none reported)"
    return f"EWC: lambda={lam:g} towards the {anchor} anchor; Fisher from {listed}"
