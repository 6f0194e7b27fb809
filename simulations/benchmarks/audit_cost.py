"""What a privacy audit (``fedshift audit``) costs and how much it can show, against the number of canaries.

    python -m fedshift.simulations.benchmarks.audit_cost --data pneumoniamnist.npz [--out audit_cost.json]

For each m in ``--canaries`` (default 64,128,256,500) and each setting (no DP, and DP-SGD at each
``--epsilon``, default 8), one default audit of the data's training split (``--audit-size`` images,
default 500; mislabelled canaries; the default recipe on the CPU): its seconds, the epsilon lower bound
at 95%, the claimed epsilon and the membership-inference AUC, over ``--seeds`` (default 0). Writes JSON.
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
from pathlib import Path
from typing import Any

from fedshift.common.io import as_jsonable, atomic_write_json

logger = logging.getLogger(__name__)


def _csv(kind: type, value: str) -> list[Any]:
    return [kind(v) for v in value.split(",") if v.strip()]


def measure(
    data: Path, canaries: list[int], epsilons: list[float], seeds: list[int], size: int
) -> list[dict]:
    from fedshift.client.audit import run_audit
    from fedshift.client.site import SiteSettings
    from fedshift.common.config import FederationConfig, PrivacyConfig

    fed = FederationConfig.from_run_config({"device": "cpu"})
    rows = []
    for m in canaries:
        for eps in [0.0, *epsilons]:
            privacy = (
                PrivacyConfig().with_values({"dp": True, "dp-epsilon": eps}, "benchmark") if eps else None
            )
            for seed in seeds:
                with tempfile.TemporaryDirectory() as state:
                    site = SiteSettings(data.stem, data, Path(state), "cpu", privacy or PrivacyConfig())
                    result = run_audit(fed, site, canaries=m, audit_size=size, seed=seed)
                row = {**result.to_dict(), "seed": seed}
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    claimed = "no DP" if row["claimed_epsilon"] is None else f"{row['claimed_epsilon']:.2f}"
    return (
        f"{row['canaries']:>5} {claimed:>8} {row['seed']:>5} {row['epsilon_lower_bound']:>8.3f} "
        f"{row['mia_auc']:>7.3f} {row['seconds']:>8.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="a site's .npz (its train split is audited)")
    parser.add_argument("--canaries", default="64,128,256,500", help="comma-separated m")
    parser.add_argument("--epsilon", default="8", help="comma-separated DP budgets (no DP is always run)")
    parser.add_argument("--seeds", default="0", help="comma-separated audit seeds")
    parser.add_argument("--audit-size", type=int, default=500, help="training images audited (0: all)")
    parser.add_argument("--out", type=Path, default=Path("audit_cost.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"{'m':>5} {'claimed':>8} {'seed':>5} {'bound':>8} {'AUC':>7} {'seconds':>8}")
    rows = measure(
        args.data, _csv(int, args.canaries), _csv(float, args.epsilon), _csv(int, args.seeds), args.audit_size
    )
    atomic_write_json(
        args.out,
        as_jsonable(
            {
                "machine": platform.processor() or platform.machine(),
                "audit_size": args.audit_size,
                "rows": rows,
            }
        ),
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
