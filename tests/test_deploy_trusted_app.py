"""Issue 18, finding 1: a hospital runs only its installed, approved fedshift ClientApp.

The unit tests check the site runner's verdict on app bundles (FABs) built by
Flower's own ``flwr build`` code. The slow test is the attack: a coordinator
submits, through its Control API, a FAB whose ClientApp is its own module that
would write a marker file and send the site's data back; every real
``fedshift client`` daemon refuses it with an error reply, and the marker never
appears.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
import time
import tomllib
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
from fedshift.deploy.site_runner import APPROVED_CLIENTAPP, check_app, runtime_client
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
    assert coord.flwr.run_status(run_id).startswith("finished")
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
