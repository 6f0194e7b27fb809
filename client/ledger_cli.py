"""``fedshift ledger``: what a site has spent of its privacy budget, from its ledger."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fedshift.common.errors import FedshiftError, PrivacyError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ledger",
        help="show a site's privacy ledger",
        description="Verify a site's privacy ledger and egress log against its integrity key and anchor "
        "(the HMAC chain of every entry and line; a rolled-back or deleted ledger), then print every DP "
        "charge (run, round, noise multiplier, sample rate, steps, epsilon after the charge) and the "
        "epsilon of the whole ledger. Reads only; nothing is changed. Exit code 2 when anything does "
        "not verify.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "site_dir",
        metavar="SITE_DIR",
        type=Path,
        help="the site's state directory (holding privacy-ledger.json), or the ledger file itself",
    )
    p.add_argument(
        "--key",
        type=Path,
        help="the site's integrity key (its integrity-key setting; default: <SITE_DIR>.integrity-key)",
    )
    p.add_argument("--json", action="store_true", help="print the ledger as JSON instead of a table")
    p.add_argument(
        "--delta",
        type=float,
        help="report epsilon at this delta (default: the delta of the latest entry)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedshift.client.audit import audit_line, latest_audit
    from fedshift.client.integrity import bind_key
    from fedshift.client.ledger import LEDGER_FILE, format_ledger, open_ledger, verify_site

    delta: float | None = args.delta
    if delta is not None and not (math.isfinite(delta) and 0 < delta < 1):
        raise PrivacyError(f"Expected --delta in (0, 1), but got {delta!r}; pass e.g. --delta 1e-5")
    if args.site_dir.is_file() and args.site_dir.name != LEDGER_FILE:
        raise FedshiftError(
            f"Expected SITE_DIR to be a site's state directory or its {LEDGER_FILE}, but got the file "
            f"{args.site_dir}; pass the directory that holds {LEDGER_FILE}"
        )
    state_dir = args.site_dir if args.site_dir.is_dir() else args.site_dir.parent
    if args.key is not None:
        bind_key(state_dir, args.key)
    ledger = open_ledger(args.site_dir)
    if ledger is None:
        path = args.site_dir / LEDGER_FILE if args.site_dir.is_dir() else args.site_dir
        raise FedshiftError(
            f"no privacy ledger at {path}: this site has not trained with DP yet (expected SITE_DIR "
            f"to be the site's state directory holding {LEDGER_FILE}, or that file itself)"
        )
    verified = verify_site(state_dir)
    audit = latest_audit(state_dir)
    if not args.json:
        print(format_ledger(ledger, delta))
        print(verified)
        print(audit_line(audit))
        return 0
    if delta is None and ledger.entries:
        delta = ledger.entries[-1].delta
    report = {
        "path": str(ledger.path),
        "accountant": ledger.accountant,
        "delta": delta,
        "epsilon": 0.0 if delta is None else ledger.epsilon(delta),
        "entries": [e.to_dict() for e in ledger.entries],
        "integrity": verified,
        "audit": audit,
    }
    print(json.dumps(report, indent=2))
    return 0
