"""The ``fedshift`` command line: a thin dispatcher over per-package subcommands.

Each subcommand lives beside the code it drives (``fedshift.simulations.cli``,
``fedshift.client.evaluate``) and registers itself here by module path, so that
``fedshift --help`` stays fast and ``common`` imports nothing above it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from fedshift.common.errors import FedshiftError

# subcommand -> module with ``register(subparsers)``
COMMANDS = {
    "simulate": "fedshift.simulations.cli",
    "evaluate": "fedshift.client.evaluate",
    "export": "fedshift.client.export",
    "predict": "fedshift.client.predict",
    "ledger": "fedshift.client.ledger_cli",
    "audit": "fedshift.client.audit_cli",
    "shift-study": "fedshift.simulations.shift_study_cli",
    "export-manifest": "fedshift.simulations.manifest_export",
    "certs": "fedshift.deploy.cli",
    "keygen": "fedshift.deploy.cli",
    "server": "fedshift.deploy.cli",
    "client": "fedshift.deploy.cli",
    "status": "fedshift.deploy.cli",
}


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (test captures swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[_StderrHandler()],
        force=True,
    )
    for noisy in ("flwr", "ray", "matplotlib", "PIL", "timm", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedshift",
        description="Federated fine-tuning of pretrained imaging backbones across hospitals.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user mistakes end in one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except FedshiftError as exc:
        print(f"fedshift {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedshift {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
