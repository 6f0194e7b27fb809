"""``fedshift certs``, ``keygen``, ``server``, ``client`` and ``status``: the deployment commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from fedshift.common.errors import ConfigError
from fedshift.deploy.certs import DEFAULT_DAYS
from fedshift.deploy.daemon import file_logging

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ["localhost", "127.0.0.1"]  # the SuperLink's own helpers connect over loopback


def register(sub: Any) -> None:
    _register_certs(sub)
    _register_keygen(sub)
    _register_server(sub)
    _register_client(sub)
    _register_status(sub)


def _register_certs(sub: Any) -> None:
    p = sub.add_parser(
        "certs",
        help="create the federation's CA and the coordinator's TLS certificate (and demo hospital keys)",
        description="Create (in --out) a CA (ca.crt, ca.key), a TLS certificate for the coordinator "
        "(server.crt, server.key; its SANs are --hosts plus localhost and 127.0.0.1) and, for demos and "
        "tests only, SuperNode key pairs (--sites: nodes/<site>.key, nodes/<site>.pub); in a real "
        "federation each hospital makes its own with fedshift keygen and sends only the .pub. Private "
        "keys are written 0600; --ca-passphrase-file encrypts a new CA key (and decrypts an existing "
        "one). An existing CA is reused; existing certificates and keys are never replaced unless "
        "--force is given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="certificate directory (created if missing)")
    p.add_argument(
        "--hosts",
        help="comma-separated DNS names and IP addresses the hospitals use to reach the coordinator; "
        "writes server.crt/server.key",
    )
    p.add_argument(
        "--sites",
        help="demos and tests: comma-separated hospital names; writes nodes/<site>.key and .pub here "
        "(real hospitals run fedshift keygen)",
    )
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity of new certificates in days")
    p.add_argument("--force", action="store_true", help="replace existing server certificate and site keys")
    p.add_argument(
        "--ca-passphrase-file",
        type=Path,
        help="file holding the CA key's passphrase: a new ca.key is written encrypted with it, an "
        "encrypted one is decrypted with it to sign",
    )
    p.set_defaults(func=_run_certs)


def _register_keygen(sub: Any) -> None:
    p = sub.add_parser(
        "keygen",
        help="make this hospital's SuperNode key pair, here at the hospital",
        description="Write <out>/<site>.key (the private key, 0600: it never leaves this machine) and "
        "<out>/<site>.pub (EC P-384, OpenSSH format, as Flower's node authentication expects). Send only "
        "the .pub to the coordinator's admin, who lists it in [hospitals]; read them the printed "
        "fingerprint to check the file they received (ssh-keygen -lf <site>.pub prints the same). "
        "Existing keys are never replaced unless --force is given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--site", required=True, help="this hospital's site name, e.g. hospital-a")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for <site>.key and <site>.pub")
    p.add_argument("--force", action="store_true", help="replace an existing key pair (re-enroll it then)")
    p.set_defaults(func=_run_keygen)


def _register_server(sub: Any) -> None:
    p = sub.add_parser(
        "server",
        help="run the coordinator: SuperLink with TLS and node authentication, and the federation",
        description="Start Flower's SuperLink with TLS, SuperNode authentication and a database file "
        "(in [server] state-dir), enroll the public keys in [hospitals], and run the fedshift federation "
        "configured in [federation] (run-config keys). Waits until the federation finishes (exit 0, "
        "results in <state-dir>/run/results.json) and stops every process it started, also on SIGTERM. "
        "Started again after a crash or a stop, it resumes from the last completed round's checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config", type=Path, required=True, help="federation TOML ([server], [hospitals], [federation])"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="run WITHOUT TLS and WITHOUT node authentication; refused unless [server] address is loopback",
    )
    p.add_argument("--check", action="store_true", help="only check the config and certificates, then exit")
    p.set_defaults(func=_run_server)


def _register_client(sub: Any) -> None:
    p = sub.add_parser(
        "client",
        help="run a hospital's daemon: a Flower SuperNode next to the site's data",
        description="Check the site config ([connection]: coordinator address, CA certificate, this "
        "site's private key; [site]: data-path, state-dir, site-name, device, dp-epsilon and the other "
        "dp-* keys, egress-metrics), then run a Flower SuperNode and, next to it, the site runner: "
        "the only process that runs ClientApp code here, the installed fedshift ClientApp (with DP), "
        "for runs whose app bundle is the coordinator's plain fedshift bundle of this fedshift version; "
        "any other bundle is refused with an error reply. Logs to [connection] log-file "
        "(default <state-dir>/logs/fedshift-client.log), "
        "reconnects when the coordinator restarts, restarts the SuperNode if it exits, and stops on "
        "SIGTERM. Exit code 2: a config mistake; 3: the coordinator has not enrolled this site's key.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, required=True, help="site TOML ([connection], [site])")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="connect WITHOUT TLS and without node authentication (a TLS coordinator refuses it; warns)",
    )
    p.add_argument("--check", action="store_true", help="only check the site config and data, then exit")
    p.add_argument(
        "--status",
        action="store_true",
        help="only show this site's state, read from its state directory while the daemon runs (or not): "
        "ledger total and budget, last round, connection, the site runner's health; then exit",
    )
    p.add_argument("--json", action="store_true", help="with --status: print it as JSON")
    p.set_defaults(func=_run_client)


def _register_status(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="show the coordinator's federation: run state, round, every site online or offline, epsilon",
        description="Read what the coordinator already keeps (runs.jsonl, the SuperLink's run and node "
        "state, enrolled.json, the last checkpoint's history) and show the run's state, the current "
        "round, every enrolled site (online or offline, last seen, last round it answered, the last "
        "epsilon it reported, its refusals) and the last checkpoint. Never writes and never stops "
        "anything; works while the federation runs. A site is offline once its last heartbeat is more "
        "than one heartbeat interval (30 s) old. With the coordinator stopped it says so and shows what "
        "the state files say (the SuperLink's database read-only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config", type=Path, required=True, help="federation TOML ([server], [hospitals], [federation])"
    )
    p.add_argument("--json", action="store_true", help="print it as JSON (the text shows the same values)")
    p.add_argument(
        "--insecure", action="store_true", help="the federation runs with fedshift server --insecure"
    )
    p.set_defaults(func=_run_status)


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _run_certs(args: argparse.Namespace) -> int:
    from fedshift.deploy.certs import make_certs, read_passphrase

    hosts = _csv(args.hosts)
    if hosts:
        hosts += [h for h in LOCAL_HOSTS if h not in hosts]
    passphrase = read_passphrase(args.ca_passphrase_file) if args.ca_passphrase_file else None
    report = make_certs(
        args.out,
        hosts=hosts or None,
        sites=_csv(args.sites),
        days=args.days,
        force=args.force,
        ca_passphrase=passphrase,
    )
    for path in report.created:
        print(f"created {path}")
    for path in report.reused:
        print(f"kept    {path}")
    return 0


def _run_keygen(args: argparse.Namespace) -> int:
    from fedshift.deploy.certs import make_node_key, ssh_fingerprint

    report = make_node_key(args.out, args.site, force=args.force)
    private, public = report.created
    print(f"created {private} (private: stays at this hospital)")
    print(f"created {public} (send only this file to the coordinator)")
    print(f"fingerprint {ssh_fingerprint(public)}")
    return 0


def _run_server(args: argparse.Namespace) -> int:
    from fedshift.deploy.processes import StopRequested, stop_on_signals
    from fedshift.deploy.proxy import nginx_executable
    from fedshift.deploy.server import RunFailedError, serve
    from fedshift.deploy.settings import ServerSettings

    settings = ServerSettings.load(args.config, insecure=args.insecure)
    nginx_executable()  # the public port's proxy: missing is a set-up mistake, found before anything starts
    if args.check:
        print(f"{args.config}: OK ({len(settings.hospitals)} hospital(s), run dir {settings.run_dir})")
        return 0
    file_logging(settings.state_dir / "logs" / "fedshift-server.log")
    try:
        with stop_on_signals():
            results = serve(settings, insecure=args.insecure)
    except StopRequested as stop:
        logger.info("Stopped on %s; start again with the same command to resume", stop)
        return 0
    except RunFailedError as exc:
        print(f"fedshift server: federation failed: {exc}", file=sys.stderr)
        return 1
    print(f"federation finished: {results}")
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from fedshift.deploy.settings import ServerSettings
    from fedshift.deploy.status import federation_status, format_status

    status = federation_status(ServerSettings.load(args.config, insecure=args.insecure))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _run_client(args: argparse.Namespace) -> int:
    from fedshift.deploy.client import check_site, run_daemon
    from fedshift.deploy.settings import ClientSettings

    settings = ClientSettings.load(args.config, insecure=args.insecure)
    if args.json and not args.status:
        raise ConfigError("Expected --json only together with --status, but got it alone; add --status")
    if args.status:
        if args.check:
            raise ConfigError("Expected one of --status and --check, but got both; drop one")
        from fedshift.deploy.site_status import format_site_status, site_status

        status = site_status(settings)
        print(json.dumps(status, indent=2) if args.json else format_site_status(status))
        return 0
    found = check_site(settings)
    summary = (
        f"{settings.site_name}: data {settings.data_path} {found.splits}, budget epsilon {found.epsilon:g} "
        f"({found.spent:.3g} spent), state in {settings.state_dir}"
    )
    if args.check:
        print(f"{args.config}: OK; {summary}")
        for line in found.data:
            print(f"  {line}")
        return 0
    file_logging(settings.log_file)
    logger.info("Starting: %s; connecting to %s", summary, settings.superlink)
    run_daemon(settings, insecure=args.insecure)  # becomes fedshift.deploy.daemon (exec): no return
    return 1
