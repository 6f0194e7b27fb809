"""What secure aggregation (SecAgg+) costs per round: bytes each site sends per stage, and seconds.

    python -m fedshift.simulations.benchmarks.secagg_cost [--out secagg_cost.json] [--d 0]

One in-process round of :mod:`fedshift.common.secagg` per setting, on vectors of the real model's
size: d = the number of elements of ``build_model(ModelConfig()).shared_state_dict()`` (``--d`` to
override), for 5, 20 and 50 sites with every other site as neighbour (k = 0) and 50 sites with
SecAgg+'s graph (k = 10), each clean and with one site dropping after it sent its shares (its mask key
is rebuilt and its pairwise masks removed). Bytes are what one site sends in each stage (the payloads:
keys, sealed shares, the masked uint32 vector, revealed shares, 8 bytes per node id), beside the plain
float32 update (4 d bytes), and what the server sends each site over the round. Seconds: a site's own
computation over the round (mean and max over sites) and the server's; no network.

A second table runs one real training round, plain and secure, through the real strategy and real
ClientApps (DP-SGD at epsilon 8, the default model at 32 px, SYNTHETIC sites of ``--site-images``
images) on one process (:mod:`fedshift.simulations.local_grid`: no Ray, no network), for
``--real-sites`` (5,20,50): the round's seconds with and without secure aggregation, and the bytes each
site sent in it (its egress log). It writes JSON.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedshift.common.io import atomic_write_json
from fedshift.common.secagg import SecAggClient, SecAggParams, SecAggServer, quantisation_bound

logger = logging.getLogger(__name__)

ID_BYTES = 8  # a node id on the wire
SETTINGS = ((5, 0), (20, 0), (50, 0), (50, 10))  # (sites, neighbours)
T = TypeVar("T")


def model_size() -> int:
    """d: how many numbers a site's update has (the default model's shared tensors)."""
    import torch

    from fedshift.common.model import ModelConfig, build_model

    torch.set_num_threads(1)
    return int(sum(t.numel() for t in build_model(ModelConfig()).shared_state_dict().values()))


class _Clock:
    """Seconds spent per party."""

    def __init__(self) -> None:
        self.seconds: dict[int | str, float] = {}

    def __call__(self, who: int | str, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[who] = self.seconds.get(who, 0.0) + time.perf_counter() - start
        return out


def _shares_bytes(shares: dict[int, bytes]) -> int:
    return sum(ID_BYTES + len(v) for v in shares.values())


def one_round(n: int, neighbours: int, d: int, drop: int, fraction: float = 0.6) -> dict[str, Any]:
    """One round with ``n`` sites; the last ``drop`` of them stop after sending their shares."""
    params = SecAggParams(round=1, threshold_fraction=fraction, neighbours=neighbours, clip_range=1.0)
    ids = list(range(1, n + 1))
    clients, server, clock = {u: SecAggClient(u, params) for u in ids}, SecAggServer(params), _Clock()
    rng = np.random.default_rng(0)
    xs = {u: rng.normal(0, 0.01, d) for u in ids}
    sent: dict[str, list[int]] = {"setup": [], "share": [], "mask": [], "unmask": []}
    received = dict.fromkeys(ids, 0)
    keys = {u: clock(u, clients[u].setup) for u in ids}
    sent["setup"] = [2 * 32] * n
    per_site = clock("server", server.add_keys, keys)
    shares = {u: clock(u, clients[u].share, per_site[u]) for u in ids}
    sent["share"] = [_shares_bytes(shares[u]) for u in ids]
    routed = clock("server", server.route, shares)
    masked = {}
    for u in ids:
        received[u] += len(per_site[u]) * (ID_BYTES + 64) + _shares_bytes(routed[u]) + ID_BYTES * n
        clock(u, clients[u].receive, routed[u], server.u1)
        if u <= n - drop:
            masked[u] = clock(u, clients[u].mask, xs[u])
    sent["mask"] = [masked[u].nbytes for u in masked]
    u2, dropped = clock("server", server.unmask_request, masked)
    revealed = {u: clock(u, clients[u].unmask, u2, dropped) for u in sorted(u2)}
    sent["unmask"] = [_shares_bytes(revealed[u]) for u in sorted(u2)]
    for u in u2:
        received[u] += ID_BYTES * (len(u2) + len(dropped))
    total = clock("server", server.aggregate, revealed)
    updates = [xs[u].astype(np.float32) for u in sorted(u2)]
    start = time.perf_counter()
    np.sum(updates, axis=0)  # what the server computes without secure aggregation
    plain_sum = time.perf_counter() - start
    reference = np.sum([np.clip(xs[u], -1, 1) for u in sorted(u2)], axis=0)
    site_seconds = [clock.seconds[u] for u in ids]
    return {
        "sites": n,
        "neighbours": neighbours,
        "holders": len(server.graph[1]) + 1,
        "threshold": server.threshold,
        "dropped": len(dropped),
        "d": d,
        "sent_bytes": {stage: float(np.mean(v)) for stage, v in sent.items()},
        "sent_bytes_total": float(sum(np.mean(v) for v in sent.values())),
        "received_bytes": float(np.mean(list(received.values()))),
        "plain_float32_bytes": 4 * d,
        "site_seconds_mean": float(np.mean(site_seconds)),
        "site_seconds_max": float(np.max(site_seconds)),
        "server_seconds": clock.seconds["server"],
        "plain_sum_seconds": plain_sum,
        "max_error": float(np.abs(total - reference).max()),
        "quantisation_bound": quantisation_bound(1.0, n, len(u2)),
    }


def measure(d: int) -> dict[str, Any]:
    rows = [one_round(n, k, d, drop) for n, k in SETTINGS for drop in (0, 1)]
    return {
        "d": d,
        "rows": rows,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }


def _synthetic_sites(root: Path, n: int, images: int) -> None:
    from fedshift.common.data import Dataset, make_synthetic_cxr, save_npz

    for k in range(n):
        pooled = make_synthetic_cxr(images, seed=k).split("train")
        idx = np.arange(images)
        cut = [int(images * 0.6), int(images * 0.8)]
        splits = dict(zip(("train", "val", "test"), np.split(idx, cut), strict=True))
        data = Dataset(
            {s: pooled.subset(i) for s, i in splits.items()}, ("normal", "lesion"), "synthetic", True
        )
        save_npz(root / f"site-{k}" / "data.npz", data)


def real_round(n: int, secure: bool, images: int, root: Path) -> dict[str, Any]:
    """One real training round of ``n`` SYNTHETIC sites, plain or secure: seconds and bytes per site."""
    from fedshift.client.egress import read_egress_log
    from fedshift.common.config import FederationConfig
    from fedshift.common.model import ModelConfig
    from fedshift.simulations.local_grid import one_round as federated_round

    _synthetic_sites(root, n, images)
    fed = FederationConfig(
        run_dir=str(root / "server"), sites_root=str(root), device="cpu", model=ModelConfig(image_size=32)
    )
    extra = {"dp": True, "dp-epsilon": 8.0, "batch-size": 16, "secure-aggregation": secure}
    strategy, seconds = federated_round({**fed.to_run_config(), **extra}, n)
    sent = [sum(e["bytes"] for e in read_egress_log(root / f"site-{k}")) for k in range(n)]
    if len(strategy.history.train.get(1, {})) != n:
        kept = sorted(strategy.history.train.get(1, {}))
        raise RuntimeError(f"Expected all {n} sites in the round, but the server kept {kept}")
    return {"sites": n, "secure": secure, "seconds": seconds, "bytes_per_site": float(np.mean(sent))}


def _print(result: dict[str, Any]) -> None:
    d = result["d"]
    print(f"SecAgg+ cost per round, d = {d} numbers (plain float32 update: {4 * d / 1024:.1f} KiB)")
    header = ["sites", "k", "t", "drop", "setup B", "share B", "mask KiB", "unmask B", "recv KiB", "x plain"]
    header += ["site s", "site max", "server s", "plain s", "err/bound"]
    print(" ".join(f"{h:>9}" for h in header))
    for r in result["rows"]:
        b = r["sent_bytes"]
        cells = [r["sites"], r["neighbours"], r["threshold"], r["dropped"], f"{b['setup']:.0f}"]
        cells += [f"{b['share']:.0f}", f"{b['mask'] / 1024:.1f}", f"{b['unmask']:.0f}"]
        cells += [f"{r['received_bytes'] / 1024:.1f}", f"{r['sent_bytes_total'] / (4 * d):.3f}"]
        cells += [f"{r[k]:.3f}" for k in ("site_seconds_mean", "site_seconds_max", "server_seconds")]
        cells += [f"{r['plain_sum_seconds']:.4f}", f"{r['max_error'] / r['quantisation_bound']:.2f}"]
        print(" ".join(f"{c!s:>9}" for c in cells))
    print(
        "k 0: every other site is a neighbour; B: bytes a site sends per stage (mean over sites); recv: "
        "what the server sends a site; x plain: a site's bytes sent over the plain float32 update's; "
        "plain s: the server's plain float32 sum; err/bound: the sum's largest error over quantisation_bound"
    )
    if result.get("real"):
        print("\nOne real DP training round (real strategy and ClientApps, one process, no network)")
        print(
            " ".join(f"{h:>12}" for h in ("sites", "plain s", "secure s", "ratio", "plain KiB", "secure KiB"))
        )
        for n in sorted({r["sites"] for r in result["real"]}):
            plain, secure = (
                next(r for r in result["real"] if r["sites"] == n and r["secure"] is m) for m in (False, True)
            )
            cells = [
                n,
                f"{plain['seconds']:.1f}",
                f"{secure['seconds']:.1f}",
                f"{secure['seconds'] / plain['seconds']:.2f}",
            ]
            cells += [f"{plain['bytes_per_site'] / 1024:.1f}", f"{secure['bytes_per_site'] / 1024:.1f}"]
            print(" ".join(f"{c!s:>12}" for c in cells))


def _real_rounds(sites: list[int], images: int) -> list[dict[str, Any]]:
    import tempfile

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # Messages outside a node
    rows = []
    if sites:
        with tempfile.TemporaryDirectory() as tmp:  # warm-up: imports, the backbone, Opacus (not measured)
            real_round(2, True, images, Path(tmp))
    for n in sites:
        for secure in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(real_round(n, secure, images, Path(tmp)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("secagg_cost.json"))
    parser.add_argument("--d", type=int, default=0, help="vector length; 0 = the default model's shared size")
    parser.add_argument("--real-sites", default="5,20,50", help="sites of the real rounds; empty = none")
    parser.add_argument("--site-images", type=int, default=40, help="SYNTHETIC images per site (real rounds)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = measure(args.d or model_size())
    result["real"] = _real_rounds([int(n) for n in args.real_sites.split(",") if n], args.site_images)
    _print(result)
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
