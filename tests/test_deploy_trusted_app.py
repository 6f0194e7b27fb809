"""A hospital runs only its installed, approved fedshift ClientApp.

The unit tests check the site runner's verdict on app bundles (FABs) built by
Flower's own ``flwr build`` code. The slow test is the attack: a coordinator
submits, through its Control API, a FAB whose ClientApp is its own module that
would write a marker file and send the site's data back; every real
``fedshift client`` daemon refuses it with an error reply, and the marker never
appears.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
import textwrap
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # type: ignore[attr-defined]
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

import fedshift
from fedshift.common.protocol import APP_REFUSED
from fedshift.deploy.client import RUNTIME_SECRET, supernode_argv, write_node_config
from fedshift.deploy.flwr_cli import CONNECTION
from fedshift.deploy.server import Coordinator, write_app
from fedshift.deploy.settings import ClientSettings, ServerSettings
from fedshift.deploy.site_runner import (
    APPROVED_CLIENTAPP,
    FAB_CONFIG_MAX_BYTES,
    SiteRunner,
    check_app,
    runtime_client,
)
from fedshift.tests.deploy_support import Federation, flower_processes_under, wait_for

ATTACK_SITES = ("hospital-a", "hospital-b")


def _fab(app_dir: Path) -> Fab:
    content = build_fab_from_disk(app_dir)
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


def _run(fab: Fab) -> Run:
    run = Run.create_empty(7)
    run.fab_hash = fab.hash_str
    return run


@pytest.fixture
def legit_app(tmp_path: Path) -> Path:
    app_dir = tmp_path / "app"
    write_app(app_dir)  # the coordinator's own app folder: only pyproject.toml
    return app_dir


def test_the_coordinators_own_bundle_is_approved(legit_app: Path) -> None:
    fab = _fab(legit_app)
    assert check_app(fab, _run(fab)) is None


def test_a_bundle_that_carries_code_is_refused_even_with_the_approved_clientapp(legit_app: Path) -> None:
    # a shadow fedshift/client/app.py would be imported first by Flower's loader (the bundle is on sys.path)
    shadow = legit_app / "fedshift" / "client" / "app.py"
    shadow.parent.mkdir(parents=True)
    shadow.write_text("app = None\n")
    fab = _fab(legit_app)
    refused = check_app(fab, _run(fab))
    assert refused is not None and "fedshift/client/app.py" in refused


def test_another_clientapp_module_is_refused(legit_app: Path) -> None:
    config = legit_app / "pyproject.toml"
    config.write_text(config.read_text().replace(APPROVED_CLIENTAPP, "fedshift.client.evil:app"))
    fab = _fab(legit_app)
    refused = check_app(fab, _run(fab))
    assert refused is not None and "'fedshift.client.evil:app'" in refused


def test_another_fedshift_version_is_refused(legit_app: Path) -> None:
    config = legit_app / "pyproject.toml"
    config.write_text(config.read_text().replace(f'version = "{fedshift.__version__}"', 'version = "0.0.1"'))
    fab = _fab(legit_app)
    refused = check_app(fab, _run(fab))
    assert refused is not None and "'0.0.1'" in refused and fedshift.__version__ in refused


def test_a_bundle_whose_hash_differs_or_an_agent_task_is_refused(legit_app: Path) -> None:
    fab = _fab(legit_app)
    forged = Fab("0" * 64, fab.content, {})
    assert "not the announced" in str(check_app(forged, _run(forged)))
    assert "flwr-agentapp" in str(check_app(fab, _run(fab), TaskType.AGENT_APP))
    broken = Fab(hashlib.sha256(b"not a zip").hexdigest(), b"not a zip", {})
    assert "zip" in str(check_app(broken, _run(broken)))


def _zip(data: bytes, compression: int = zipfile.ZIP_STORED, corrupt: bool = False, **header: int) -> Fab:
    """A bundle holding one pyproject.toml; ``header`` overwrites its 2-byte header fields
    (``flags``, ``method``) in both the local and the central header, as a forged zip would;
    ``corrupt`` flips the first bytes of its data."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as bundle:
        bundle.writestr("pyproject.toml", data)
    raw = bytearray(buf.getvalue())
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    for field, value in header.items():
        at_local, at_central = {"flags": (6, 8), "method": (8, 10)}[field]
        struct.pack_into("<H", raw, local + at_local, value)
        struct.pack_into("<H", raw, central + at_central, value)
    if corrupt:
        name_len, extra_len = struct.unpack_from("<HH", raw, local + 26)
        start = local + 30 + name_len + extra_len
        raw[start : start + 10] = bytes(b ^ 0xFF for b in raw[start : start + 10])
    content = bytes(raw)
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


def test_a_zip_bomb_config_is_refused_unread(legit_app: Path) -> None:
    """Before, the whole pyproject.toml was unpacked whatever its size (here 64 MiB from 64 KiB sent)."""
    bomb = b"[project]\n" + b" " * (64 * 1024 * 1024)
    fab = _zip(bomb, zipfile.ZIP_DEFLATED)
    assert len(fab.content) < 128 * 1024
    refused = check_app(fab, _run(fab))
    assert refused is not None and f"more than {FAB_CONFIG_MAX_BYTES} bytes" in refused


@pytest.mark.parametrize(
    ("fab", "error"),
    [
        (_zip(b"[project]\n", flags=0x1), "RuntimeError"),  # an encrypted member
        (_zip(b"[project]\n", method=99), "NotImplementedError"),  # an unknown compression method
        (
            _zip(b"[project]\nname = 'x'\n" * 50, zipfile.ZIP_DEFLATED, corrupt=True),
            "error",
        ),  # a corrupt deflate stream
    ],
    ids=["encrypted", "compression", "deflate"],
)
def test_a_bundle_that_cannot_be_read_is_one_cached_refusal(
    fab: Fab, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, these raised out of check_app (RuntimeError, NotImplementedError, zlib.error): a traceback
    for every message of the run instead of one verdict, logged once."""
    runner = SiteRunner(runtime_api_address="127.0.0.1:1")
    with caplog.at_level(logging.WARNING, logger="fedshift.deploy.site_runner"):
        verdicts = [runner.verdict(_run(fab), fab, TaskType.CLIENT_APP) for _ in range(3)]
    assert verdicts[0] is not None and "not a readable zip archive" in verdicts[0] and error in verdicts[0]
    assert verdicts == [verdicts[0]] * 3
    assert [r.getMessage().count("REFUSED app bundle") for r in caplog.records] == [1]


def test_the_supernode_runs_no_clientapp_of_its_own(tmp_path: Path) -> None:
    # before: flower-supernode ran in subprocess isolation and started flwr-clientapp on every bundle
    fed_dir = tmp_path / "site"
    fed_dir.mkdir()
    (fed_dir / "site.toml").write_text(
        '[connection]\nsuperlink = "localhost:9092"\n[site]\ndata-path = "d.npz"\nstate-dir = "state"\n'
    )
    settings = ClientSettings.load(fed_dir / "site.toml", insecure=True)
    settings.state_dir.mkdir()
    argv = supernode_argv(settings, write_node_config(settings), insecure=True)
    assert argv[argv.index("--isolation") + 1] == "process"


# -- the attack, on a real SuperLink with real site daemons

EVIL_PYPROJECT = """\
[project]
name = "fedshift"
version = "{version}"
dependencies = []

[tool.flwr.app]
publisher = "coordinator"

[tool.flwr.app.components]
serverapp = "evil.server:app"
clientapp = "evil.client:app"

[tool.flwr.app.config]
out = ""
marker = ""
"""

# the coordinator's ClientApp: it would leave a marker and send the site's data file back
EVIL_CLIENT = """\
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def steal(msg: Message, context: Context) -> Message:
    Path(str(context.run_config["marker"]) + "-" + str(context.node_id)).write_text("ran")
    data = Path(str(context.node_config["data-path"])).read_bytes()
    return Message(RecordDict({"loot": ConfigRecord({"bytes": data})}), reply_to=msg)
"""

# its ServerApp: send one query to every connected site and write down what came back
EVIL_SERVER = """\
import json
import time
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 120
    while len(list(grid.get_node_ids())) < {n_sites} and time.monotonic() < deadline:
        time.sleep(1)
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    out = {{}}
    for reply in grid.send_and_receive(messages, timeout=120):
        entry = {{"error": None, "records": []}}
        if reply.has_error():
            entry["error"] = [reply.error.code, reply.error.reason]
        else:
            entry["records"] = sorted(reply.content.keys())
        out[str(reply.metadata.src_node_id)] = entry
    Path(str(context.run_config["out"])).write_text(json.dumps({{"nodes": nodes, "replies": out}}))
"""


def write_evil_app(app_dir: Path, n_sites: int) -> None:
    (app_dir / "evil").mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(EVIL_PYPROJECT.format(version=fedshift.__version__))
    (app_dir / "evil" / "__init__.py").write_text("")
    (app_dir / "evil" / "client.py").write_text(EVIL_CLIENT)
    (app_dir / "evil" / "server.py").write_text(EVIL_SERVER.format(n_sites=n_sites))
    # and a shadow of the approved module, which Flower's loader would import from the bundle first
    (app_dir / "fedshift" / "client").mkdir(parents=True)
    (app_dir / "fedshift" / "client" / "app.py").write_text(textwrap.dedent(EVIL_CLIENT))


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[Federation, Coordinator]]:
    fed = Federation(tmp_path, rounds=1, min_nodes=len(ATTACK_SITES), enrolled=ATTACK_SITES)
    coord = Coordinator(ServerSettings.load(tmp_path / "federation.toml"))
    try:
        coord.start()  # the real SuperLink, TLS and node authentication, as fedshift server starts it
        coord.enroll()
        coord.open()  # the public port (Fleet API only), where the hospitals connect
        yield fed, coord
    finally:
        fed.stop_all()
        coord.close()
    assert flower_processes_under(tmp_path) == []


@pytest.mark.slow
def test_every_site_refuses_a_coordinator_bundle_with_its_own_clientapp(
    coordinator: tuple[Federation, Coordinator], tmp_path: Path
) -> None:
    fed, coord = coordinator
    clients = [fed.start_client(site) for site in ATTACK_SITES]
    evil = tmp_path / "evil-app"
    write_evil_app(evil, len(ATTACK_SITES))
    out, marker = tmp_path / "replies.json", tmp_path / "marker"
    started = time.monotonic()
    # the coordinator's operator (or whoever controls it) submits the bundle, as `flwr run` does
    run_config = f"out={json.dumps(str(out))} marker={json.dumps(str(marker))}"
    run_id = int(coord.flwr.call("run", str(evil), CONNECTION, "--run-config", run_config)["run-id"])
    wait_for("the coordinator's app to collect the replies", out.is_file, 300, *clients)
    elapsed = time.monotonic() - started

    answer = json.loads(out.read_text())
    assert len(answer["nodes"]) == len(ATTACK_SITES), f"connected: {answer['nodes']}"
    # every site answered with the refusal, and nothing else: no records, no text of its own
    assert sorted(answer["replies"]) == sorted(str(n) for n in answer["nodes"])
    for reply in answer["replies"].values():
        assert reply == {"error": [ErrorCode.INVALID_FAB, APP_REFUSED], "records": []}
    # the coordinator's code never ran at a site: no marker, no egress, no ledger charge
    assert not list(tmp_path.glob("marker*"))
    sha = hashlib.sha256(build_fab_from_disk(evil)).hexdigest()
    for site in ATTACK_SITES:
        log = fed.client_log(site)
        assert f"REFUSED app bundle sha256 {sha}" in log, log[-3000:]
        assert "carries files besides pyproject.toml" in log
        assert fed.egress(site) == [] and fed.ledger(site) == []
        assert not (fed.state_dir(site) / "site_local.safetensors").exists()
    # the app's last act was writing its answer: its run finishes right after
    wait_for("the run to finish", lambda: coord.flwr.run_status(run_id).startswith("finished"), 60)
    # and no other local process can claim a site's tasks: the SuperNode takes claims signed with the
    # daemon's runtime secret only (an unsigned claim is refused; the site runner's own claims pass)
    runtime_port = int(
        tomllib.loads((tmp_path / "hospital-a.toml").read_text())["connection"]["runtime-port"]
    )
    address = f"127.0.0.1:{runtime_port}"
    secret = (fed.state_dir("hospital-a") / RUNTIME_SECRET).read_bytes()
    claim = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    with pytest.raises(httpx.HTTPStatusError) as refused:
        runtime_client(address).AcquireTask(claim)
    assert refused.value.response.status_code == 401
    assert not runtime_client(address, secret=secret).AcquireTask(claim).HasField("task")
    print(f"attack refused by {len(ATTACK_SITES)} sites in {elapsed:.0f} s")
