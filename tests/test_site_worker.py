"""The warm site worker: a hung message gets an error reply, the runner restarts, the ledger stays exact.

Unit tests of the site runner's timeout (:func:`call_with_timeout`, its health
file) and of the privacy argument with the real ClientApp and a real ledger: a
message that hangs before or after its charge is answered with the generic
error, and no round is ever charged twice (a retried round is refused by the
ledger's order check). The slow tests are the real thing: a message that hangs
inside the installed ClientApp (its manifest is a FIFO nothing writes to) on a
real SuperNode behind a real TLS coordinator, served by a real site runner
process under the daemon's restart logic; and the cold/warm benchmark at its
smallest size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedshift.common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SITE_ERROR

HANG_SERVERAPP = "fedshift.tests.test_site_worker:hang_server"
RESULTS = ("first.json", "second.json")
# longer than a fresh runner's first message (the backbone, the manifest's decode) on a loaded 2-core machine
TASK_TIMEOUT = 15.0


# -- the coordinator's side of the real test: an installed ServerApp (the bundle holds no code)

hang_server = ServerApp()


@hang_server.main()
def _hang_main(grid: Grid, context: Context) -> None:
    """Send one site an evaluate (it hangs there), write what came back; after ``go``, one more."""
    from fedshift.common.config import FederationConfig
    from fedshift.common.model import build_model

    out = Path(str(context.run_config["run-dir"]))
    fed = FederationConfig.from_run_config(context.run_config)
    arrays = ArrayRecord(build_model(fed.model).shared_state_dict())
    deadline = time.monotonic() + 120
    while not list(grid.get_node_ids()) and time.monotonic() < deadline:
        time.sleep(1)
    node = next(iter(grid.get_node_ids()))
    for server_round, name in enumerate(RESULTS, start=1):
        if server_round > 1:
            while not (out / "go").exists() and time.monotonic() < deadline + 600:
                time.sleep(0.5)
        config = ConfigRecord({"server-round": server_round, "split": "val"})
        msg = Message(
            RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        started = time.monotonic()
        replies = list(grid.send_and_receive([msg], timeout=240))
        entry: dict[str, Any] = {"seconds": time.monotonic() - started, "replies": len(replies)}
        for reply in replies:
            if reply.has_error():
                entry["error"] = [reply.error.code, reply.error.reason]
            else:
                entry["metrics"] = dict(reply.content.metric_records[METRICS_KEY])
        (out / name).write_text(json.dumps(entry))


# -- unit: the timeout


def test_call_with_timeout_returns_raises_or_times_out() -> None:
    from fedshift.deploy.site_runner import TaskTimeoutError, call_with_timeout

    reply = cast(Message, object())
    assert call_with_timeout(lambda: reply, 5.0) is reply

    def fail() -> Message:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        call_with_timeout(fail, 5.0)
    release = threading.Event()

    def hang() -> Message:
        release.wait(30)
        return reply

    started = time.monotonic()
    with pytest.raises(TaskTimeoutError, match=r"within 0\.3 s"):
        call_with_timeout(hang, 0.3)
    assert 0.3 <= time.monotonic() - started < 3.0
    release.set()


def test_the_health_file_counts_messages_and_errors(tmp_path: Path) -> None:
    from fedshift.deploy.site_runner import HEALTH_FILE, RunnerHealth

    health = RunnerHealth(tmp_path / HEALTH_FILE, task_timeout=12.0)
    health.set_state("idle")
    health.busy(7, "train")
    during = json.loads((tmp_path / HEALTH_FILE).read_text())
    assert during["state"] == "busy" and during["current"]["run"] == 7 and during["pid"] == os.getpid()
    health.done(7, "train", 1.23456, "ok")
    health.busy(7, "evaluate")
    health.done(7, "evaluate", 4.0, "timed-out", "the ClientApp did not answer within 12 s")
    saved = json.loads((tmp_path / HEALTH_FILE).read_text())
    assert saved["state"] == "timed-out" and saved["current"] is None
    assert (saved["messages"], saved["errors"], saved["task-timeout"]) == (2, 1, 12.0)
    assert saved["last-message"]["type"] == "evaluate" and saved["last-message"]["outcome"] == "timed-out"
    assert saved["last-error"]["error"] == "the ClientApp did not answer within 12 s"
    assert not list(tmp_path.glob("*.tmp*"))  # replaced atomically, nothing left beside it


def test_a_bad_task_timeout_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedshift.deploy.site_runner import main

    for argv, env in ((["--task-timeout", "0"], None), ([], "soon")):
        if env is not None:
            monkeypatch.setenv("FEDSHIFT_TASK_TIMEOUT", env)
        with pytest.raises(SystemExit) as exited:
            main(["--runtime-api-address", "127.0.0.1:1", *argv])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len([ln for ln in err.splitlines() if "error:" in ln]) == 1
        assert ("positive number of seconds" in err) if env is None else ("'soon'" in err)


# -- unit: a hung training message and the privacy ledger (the real ClientApp, a real ledger)


class _Hang:
    """A client mod that blocks its message, before or after the real handler ran (and charged)."""

    def __init__(self, after: bool) -> None:
        self.after = after
        self.entered = threading.Event()  # the handler is done (after) or was never called (before)
        self.release = threading.Event()

    def __call__(self, msg: Message, context: Context, call_next: Any) -> Message:
        if self.after:
            call_next(msg, context)  # trains and charges; its reply is never handed back
        self.entered.set()
        self.release.wait(120)
        raise RuntimeError("released at the end of the test; never answers")


def _train(server_round: int) -> Message:
    from fedshift.common.model import ModelConfig, build_model

    arrays = ArrayRecord(build_model(ModelConfig(image_size=32)).shared_state_dict())
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("after", [False, True], ids=["hangs-before-its-charge", "hangs-after-its-charge"])
def test_a_hung_training_message_is_charged_at_most_once(tmp_path: Path, after: bool) -> None:
    from fedshift.client.app import make_client_app
    from fedshift.client.ledger import PrivacyLedger
    from fedshift.common.protocol import STATUS_KEY, STATUS_ROUND_REFUSED
    from fedshift.deploy.site_runner import SiteRunner, TaskTimeoutError
    from fedshift.tests.helpers import site_run_config, write_site

    site_dir = write_site(tmp_path)
    config = site_run_config(tmp_path, num_rounds=3, **{"dp": True, "dp-epsilon": 8.0})

    def context() -> Context:
        return Context(
            run_id=1, node_id=0, node_config={"partition-id": 0}, state=RecordDict(), run_config=config
        )

    hang = _Hang(after)
    hung = SiteRunner("127.0.0.1:1", app=make_client_app(mods=[hang]), task_timeout=0.5)
    try:
        with pytest.raises(TaskTimeoutError):
            hung.handle(_train(1), context())  # the runner answers SITE_ERROR and exits here
        # the late thread goes on (in a real runner, os._exit ends it): wait until it charged or hangs
        assert hang.entered.wait(120), "the hung message never reached its hang"
        charged = [e.round for e in PrivacyLedger.at(site_dir).entries]
        assert charged == ([1] if after else [])  # a charge made before the hang stays: never under-reports
        # the restarted runner: the coordinator may send round 1 again (a new run attempt) and then round 2
        fresh = SiteRunner("127.0.0.1:1", app=make_client_app(), task_timeout=120)
        again = fresh.handle(_train(1), context())
        if after:  # charged already: refused before any charge or data access
            assert again.content.config_records[STATUS_KEY]["status"] == STATUS_ROUND_REFUSED
        else:  # never charged: it trains now, once
            assert ARRAYS_KEY in again.content.array_records
        fresh.handle(_train(2), context())
        entries = PrivacyLedger.at(site_dir).entries
        assert [(e.round, e.mechanism) for e in entries] == [(1, "dp-sgd"), (2, "dp-sgd")]
    finally:
        hang.release.set()


# -- real processes: a hung message at a real site


@pytest.fixture
def site_and_coordinator(tmp_path: Path) -> Iterator[dict[str, Any]]:
    from fedshift.deploy.client import daemon_plan
    from fedshift.deploy.daemon import DAEMON_FILE, DaemonState, _Runner
    from fedshift.deploy.flwr_cli import flower_env
    from fedshift.deploy.processes import Child
    from fedshift.deploy.server import Coordinator
    from fedshift.deploy.settings import ClientSettings, ServerSettings
    from fedshift.tests.deploy_support import Federation, flower_processes_under

    site = ("hospital-a",)
    fed = Federation(tmp_path, rounds=1, min_nodes=1, enrolled=site, manifest_sites=site)
    coord = Coordinator(ServerSettings.load(tmp_path / "federation.toml"))
    settings = ClientSettings.load(tmp_path / "hospital-a.toml")
    settings = dataclasses.replace(settings, task_timeout=TASK_TIMEOUT)  # [connection] task-timeout
    data = Path(str(settings.node_config["data-path"]))  # a CSV manifest of DICOM files
    fifo = data.parent / "hanging.csv"  # beside it: the files it lists resolve the same
    os.mkfifo(fifo)  # opening it blocks until a writer comes: the ClientApp hangs reading its manifest
    settings.node_config["data-path"] = str(fifo)
    settings.state_dir.mkdir(parents=True)
    supernode: Child | None = None
    runner: _Runner | None = None
    try:
        coord.start()
        coord.enroll()
        coord.open()
        plan = daemon_plan(settings)  # what fedshift client hands its supervision
        supernode = Child(
            "flower-supernode",
            plan.supernode_argv,
            settings.log_file,
            env=flower_env(),
            cwd=settings.state_dir,
        )
        runner = _Runner(plan, DaemonState(settings.state_dir / DAEMON_FILE))
        yield {
            "coord": coord,
            "settings": settings,
            "runner": runner,
            "supernode": supernode,
            "fifo": fifo,
            "data": data,
        }
    finally:
        if runner is not None:
            runner.stop()
        if supernode is not None:
            supernode.stop()
        fed.stop_all()
        coord.close()
    assert flower_processes_under(tmp_path) == []


def _state(health_file: Path) -> str | None:
    try:
        return str(json.loads(health_file.read_text())["state"])
    except (OSError, ValueError, KeyError):
        return None


def _pump(runner: Any, supernode: Any, done: Any, timeout: float, what: str) -> float:
    """Keep the site runner going (as the daemon's loop does) until ``done()``; the seconds it took."""
    started = time.monotonic()
    while not done():
        assert supernode.poll() is None, f"the SuperNode exited; see {supernode.log_path}"
        assert time.monotonic() - started < timeout, f"timed out after {timeout:.0f} s waiting for {what}"
        runner.check()
        time.sleep(0.5)
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("crash", [False, True], ids=["runner-hangs", "runner-killed-mid-message"])
def test_a_hung_message_gets_an_error_reply_and_a_clean_runner_answers_the_next(
    site_and_coordinator: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture, crash: bool
) -> None:
    """Hung: the runner's timeout answers with SITE_ERROR and it restarts at once (exit 75). Killed
    mid-message (SIGKILL, no reply pushed): Flower's SuperNode answers for it, once the task's heartbeat
    has been missing for its patience (2 x 30 s), with its own CLIENT_APP_CRASHED error; the daemon
    restarts the runner after its pause. Either way the round gets an error reply, not silence."""
    from fedshift.deploy.daemon import DAEMON_FILE, MIN_BACKOFF
    from fedshift.deploy.flwr_cli import CONNECTION
    from fedshift.deploy.server import write_app
    from fedshift.deploy.site_runner import EXIT_TASK_TIMEOUT, HEALTH_FILE
    from fedshift.deploy.site_status import format_site_status, site_status
    from fedshift.tests.deploy_support import kill_tree

    s = site_and_coordinator
    settings, runner, supernode = s["settings"], s["runner"], s["supernode"]
    app, out = tmp_path / "hang-app", tmp_path / "hang-out"
    out.mkdir()
    write_app(app)
    config = app / "pyproject.toml"
    config.write_text(config.read_text().replace("fedshift.server.app:app", HANG_SERVERAPP))
    run_config = f"image-size=32 run-dir={json.dumps(str(out))}"
    s["coord"].flwr.call("run", str(app), CONNECTION, "--run-config", run_config)

    health_file = settings.state_dir / HEALTH_FILE
    if crash:  # as soon as the runner holds the message: a crash, no reply pushed
        _pump(runner, supernode, lambda: _state(health_file) == "busy", 300, "the runner to take the message")
        killed_at = time.monotonic()
        kill_tree(runner.child)
    _pump(runner, supernode, (out / RESULTS[0]).is_file, 300, "the reply to the hung message")
    first = json.loads((out / RESULTS[0]).read_text())
    assert first["replies"] == 1, first
    if crash:  # Flower's words, no text from the site; after the task heartbeat's patience (60 s)
        assert first["error"] == [ErrorCode.CLIENT_APP_CRASHED, "ClientApp stopped responding."]
        assert 50 < time.monotonic() - killed_at < 150, first
    else:  # answered, with the generic error and no text from the site; after the timeout plus Flower's
        # polling, not after Flower gave the task up (no task heartbeat for a minute)
        assert first["error"] == [ErrorCode.CLIENT_APP_RAISED_EXCEPTION, SITE_ERROR]
        assert TASK_TIMEOUT <= first["seconds"] < TASK_TIMEOUT + 40, first

    # the runner exited with its distinctive code and the daemon's loop started a clean one at once
    def restarted() -> bool:
        return runner.state.runner.get("last-exit") is not None and runner.child is not None

    _pump(runner, supernode, restarted, 60, "the runner's restart")
    daemon = json.loads((settings.state_dir / DAEMON_FILE).read_text())
    assert daemon["runner-restarts"] == 1
    log = settings.log_file.read_text()
    if crash:
        assert daemon["runner"]["last-exit"]["code"] == -9
        assert f"exited with code -9; restarting it in {MIN_BACKOFF:.0f} s" in caplog.text
    else:
        assert daemon["runner"]["last-exit"]["code"] == EXIT_TASK_TIMEOUT
        assert f"message hung: the ClientApp did not answer within {TASK_TIMEOUT:g} s" in log
        assert "gave up a hung message" in caplog.text  # the daemon's own line (its log: the test's here)
    assert not list((settings.state_dir).glob("privacy-ledger.json"))  # an evaluation charges nothing

    # the data is readable again: the clean runner answers the next message
    os.unlink(s["fifo"])
    shutil.copy(s["data"], s["fifo"])
    (out / "go").write_text("")
    _pump(runner, supernode, (out / RESULTS[1]).is_file, 300, "the reply to the next message")
    second = json.loads((out / RESULTS[1]).read_text())
    assert "error" not in second and second["metrics"]["num-examples"] > 0, second
    health = json.loads(health_file.read_text())
    assert health["pid"] == runner.child.pid
    assert (health["state"], health["messages"], health["errors"]) == ("idle", 1, 0)
    assert health["last-message"]["type"] == "evaluate" and health["last-message"]["outcome"] == "ok"
    # and --status reads the same: the runner idle and alive, its last message
    status = site_status(settings)
    assert status["runner"]["state"] == "idle" and status["runner"]["pid"] == runner.child.pid
    assert status["connection"]["runner-restarts"] == 1
    text = format_site_status(status)
    assert f"runner: idle (pid {runner.child.pid}" in text and "evaluate: ok in" in text
    what = "killed runner's message" if crash else "hung message"
    print(f"{what} answered in {first['seconds']:.1f} s; the next in {second['seconds']:.1f} s")


@pytest.mark.slow
def test_the_benchmark_measures_cold_and_warm_side_by_side(tmp_path: Path) -> None:
    from fedshift.simulations.benchmarks.site_worker import main

    out = tmp_path / "site_worker.json"
    assert main(["--cold", "1", "--warm", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cold"]["messages"] == 1 and result["warm"]["messages"] == 2
    assert len(result["warm"]["rows"]) == 3  # the warm-up message, then the two measured
    cold, warm = result["cold"]["seconds-per-message"], result["warm"]["seconds-per-message"]
    assert 0 < warm < cold
    assert result["cold"]["import-seconds"] > 0
    assert result["overhead-cold-seconds"] == pytest.approx(cold - warm)
    assert result["same-metrics"] is True  # the same message got the same answer both ways
    assert result["warm-meets-target"] == (warm <= result["target-warm-seconds"])
