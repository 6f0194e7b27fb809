"""The site runner: the only process that runs ClientApp code at a hospital.

``fedshift client`` starts its SuperNode with ``--isolation process``, so the
SuperNode starts no ClientApp of its own. This long-lived process (started by
the daemon and restarted by it when it exits) takes each task from the
SuperNode's Runtime API on loopback, as Flower's SuperExec would, checks the
run's app bundle (FAB) and then runs the *installed* ``fedshift.client.app:app``
in this process. The FAB's files are never installed, imported or put on
``sys.path``: a bundle is only a description, and the site approves it when

- it holds nothing but ``pyproject.toml`` (and Flower's ``.info/CONTENT``
  manifest): no code, no data;
- its ``clientapp`` component is exactly :data:`APPROVED_CLIENTAPP`;
- its ``[project]`` is ``fedshift`` at the installed fedshift's version;
- its sha256 is the hash Flower announced for it.

Anything else is refused: a warning line in the site log naming the run, the
bundle's sha256 and the reason, and an error reply (``INVALID_FAB``,
:data:`~fedshift.common.protocol.APP_REFUSED`) to the coordinator; the
ClientApp does not run, no data is read. Each bundle's sha256 and verdict is
logged once per run.

An exception in the ClientApp is logged here with its traceback; the reply
carries only :data:`~fedshift.common.protocol.SITE_ERROR`, no text from the site.

Because the process lives across messages and runs, torch, timm and the
ClientApp's per-process caches (the frozen backbone) stay warm.

A hung message: the ClientApp runs in a worker thread; one that has not
answered after ``--task-timeout`` seconds (default :data:`DEFAULT_TASK_TIMEOUT`)
is answered with the generic SITE_ERROR, its task is ended as failed, and this
process exits with :data:`EXIT_TASK_TIMEOUT` (a hung torch thread cannot be
stopped): the daemon starts a clean runner at once. The late thread's reply is
never sent. The privacy ledger is untouched by this: a charge the ClientApp
made before it hung stays (the ledger may over-report, never under-report), and
the round it was for is not charged again: a repeated round is refused by the
ledger's order check before any charge.

The runner keeps its health in ``<state-dir>/site-runner.json`` (atomic
writes; read by ``fedshift client --status``): pid, start time, idle or busy,
messages served, the last message and the last error.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import sys
import threading
import time
import tomllib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import (  # type: ignore[attr-defined]  # pylint: disable=E0611
    AcquireTaskRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.run import Run, RunNotRunningException
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

import fedshift
from fedshift.client.egress import site_error  # the runner loads fedshift.client.app (and this) anyway
from fedshift.common.io import atomic_write_json
from fedshift.common.protocol import APP_REFUSED, SITE_ERROR
from fedshift.deploy.daemon import EXIT_TASK_TIMEOUT

# run as ``python -m``, this module is __main__; its log lines still carry its package name
logger = logging.getLogger("fedshift.deploy.site_runner" if __name__ == "__main__" else __name__)

APPROVED_CLIENTAPP = "fedshift.client.app:app"
APPROVED_PROJECT = "fedshift"
FAB_CONFIG = "pyproject.toml"
FAB_CONFIG_MAX_BYTES = 64 * 1024  # fedshift's own is under 1 KiB
FAB_FILES = frozenset({FAB_CONFIG, ".info/CONTENT"})  # what `flwr run` packs from deploy/server.py:write_app
# the SuperNode creates these two task types for a message; both are taken (and the agent kind refused)
TASK_TYPES = (TaskType.CLIENT_APP, TaskType.AGENT_APP)
POLL_SECONDS = 0.5
CLAIMS = frozenset({"/flwr.proto.Runtime/AcquireTask"})  # what the SuperNode's secret protects
RUNTIME_TIMEOUT = 120.0  # seconds a task's Runtime API calls retry a lost connection
DEFAULT_TASK_TIMEOUT = 1800.0  # seconds one ClientApp message may run before it is answered with an error
TASK_TIMEOUT_ENV = "FEDSHIFT_TASK_TIMEOUT"  # overrides the default (the --task-timeout flag wins)
HEALTH_FILE = "site-runner.json"  # in the state directory


class TaskTimeoutError(Exception):
    """The ClientApp did not answer a message within the task timeout."""


def call_with_timeout(call: Callable[[], Message], timeout: float) -> Message:
    """``call()`` in a worker thread; its reply, its exception, or :class:`TaskTimeoutError` after
    ``timeout`` seconds (the thread is left behind: the caller ends the process)."""
    outcome: list[Message | BaseException] = []
    done = threading.Event()

    def work() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the caller's thread, which logs it
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=work, name="fedshift-clientapp", daemon=True).start()
    if not done.wait(timeout):
        raise TaskTimeoutError(f"the ClientApp did not answer within {timeout:g} s")
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunnerHealth:
    """What ``<state-dir>/site-runner.json`` says about this runner; each change is written atomically.

    A write that fails (a full disk) is logged and never fails a task.
    """

    path: Path | None  # None: kept in memory only
    task_timeout: float = DEFAULT_TASK_TIMEOUT
    pid: int = field(default_factory=os.getpid)
    started: str = field(default_factory=_now)
    state: str = "starting"  # starting, idle, busy, stopped, timed-out
    messages: int = 0  # messages answered (refusals and errors included)
    errors: int = 0  # of them, answered with an error
    current: dict[str, Any] | None = None  # the message in flight: run, type, since
    last_message: dict[str, Any] | None = None  # run, type, seconds, outcome, finished
    last_error: dict[str, Any] | None = None  # run, type, error, at

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "started": self.started,
            "state": self.state,
            "messages": self.messages,
            "errors": self.errors,
            "current": self.current,
            "last-message": self.last_message,
            "last-error": self.last_error,
            "task-timeout": self.task_timeout,
            "fedshift-version": fedshift.__version__,
            "updated": _now(),
        }

    def set_state(self, state: str) -> None:
        self.state = state
        self.write()

    def busy(self, run_id: int, message_type: str) -> None:
        self.state, self.current = "busy", {"run": run_id, "type": message_type, "since": _now()}
        self.write()

    def done(self, run_id: int, message_type: str, seconds: float, outcome: str, error: str = "") -> None:
        """A message answered: ``outcome`` is ok, error, refused or timed-out."""
        self.messages += 1
        self.current = None
        self.last_message = {
            "run": run_id,
            "type": message_type,
            "seconds": round(seconds, 3),
            "outcome": outcome,
            "finished": _now(),
        }
        if outcome != "ok":
            self.errors += 1
            self.last_error = {"run": run_id, "type": message_type, "error": error or outcome, "at": _now()}
        self.state = "timed-out" if outcome == "timed-out" else "idle"
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        try:
            atomic_write_json(self.path, self.to_dict())
        except OSError as exc:
            logger.warning("Could not write the runner's health file %s: %s", self.path, exc)


def check_app(fab: Fab, run: Run, task_type: str = TaskType.CLIENT_APP) -> str | None:
    """Why this site refuses the run's app bundle; ``None`` when it is the site's own fedshift app."""
    if task_type != TaskType.CLIENT_APP:
        return f"the run asks for a {task_type!r} task; this site runs only the fedshift ClientApp"
    digest = hashlib.sha256(fab.content).hexdigest()
    if fab.hash_str != digest:
        return f"the bundle's content has sha256 {digest}, not the announced {fab.hash_str}"
    try:
        with zipfile.ZipFile(io.BytesIO(fab.content)) as bundle:
            names = bundle.namelist()
            size = bundle.getinfo(FAB_CONFIG).file_size if FAB_CONFIG in names else 0
            config_bytes = b""
            if FAB_CONFIG in names and size <= FAB_CONFIG_MAX_BYTES:
                with bundle.open(FAB_CONFIG) as member:  # bounded even if the declared size lies
                    config_bytes = member.read(FAB_CONFIG_MAX_BYTES + 1)
    except Exception as exc:  # any it cannot read (encrypted, unknown compression, truncated): refused
        return f"the bundle is not a readable zip archive ({type(exc).__name__}: {exc})"
    if max(size, len(config_bytes)) > FAB_CONFIG_MAX_BYTES:  # a zip bomb, or not fedshift's few lines
        return f"its {FAB_CONFIG} unpacks to more than {FAB_CONFIG_MAX_BYTES} bytes; the site reads no more"
    extra = sorted(set(names) - FAB_FILES)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        return f"the bundle carries files besides {FAB_CONFIG}: {shown}; the site runs no code it is sent"
    if len(names) != len(set(names)) or FAB_CONFIG not in names:
        return f"the bundle must hold exactly one {FAB_CONFIG}, but holds {names}"
    try:
        config = tomllib.loads(config_bytes.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return f"its {FAB_CONFIG} is not valid TOML ({exc})"
    project = _table(config, "project")
    clientapp = _table(config, "tool", "flwr", "app", "components").get("clientapp")
    if clientapp != APPROVED_CLIENTAPP:
        return f"its clientapp is {clientapp!r}, not the installed {APPROVED_CLIENTAPP!r}"
    name, version = project.get("name"), project.get("version")
    if name != APPROVED_PROJECT or version != fedshift.__version__:
        return (
            f"it is {name!r} version {version!r}, but this site runs {APPROVED_PROJECT!r} version "
            f"{fedshift.__version__!r}; install the coordinator's fedshift version at both ends"
        )
    return None


def _table(doc: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``doc[k1][k2]...``; an empty table where a level is missing or not a table."""
    for key in keys:
        value = doc.get(key)
        doc = value if isinstance(value, dict) else {}
    return doc


def runtime_client(address: str, token: str | None = None, secret: bytes | None = None) -> RuntimeHttpClient:
    """A Runtime API client on loopback; with a task's token, its lost connections are retried.

    Flower's own retry policy (:func:`make_simple_http_retry_invoker`) signals the
    whole process on an unauthorized token, which would end this long-lived runner;
    here a failed call raises instead and only that task fails.
    """
    interceptors: list[object] = [
        RuntimeVersionHttpInterceptor(component_name="SuperExec" if token is None else "flwr-clientapp")
    ]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if secret is not None:  # the SuperNode accepts task claims signed with the daemon's secret only
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=CLAIMS))
    invoker = RetryInvoker(
        lambda: exponential(max_delay=10),
        (httpx.TransportError,),
        max_tries=None if token is not None else 1,
        max_time=RUNTIME_TIMEOUT,
    )
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # loopback only: the SuperNode serves its Runtime API on 127.0.0.1
        root_certificates=None,
        interceptors=interceptors,  # type: ignore[arg-type]
        retry_invoker=invoker,
    )


@dataclass
class SiteRunner:
    """Takes the SuperNode's tasks one at a time and runs the approved ClientApp on them."""

    runtime_api_address: str
    secret: bytes | None = None  # signs task claims (the daemon's runtime secret)
    app: ClientApp | None = None  # the installed fedshift.client.app:app, imported once (warm)
    verdicts: dict[tuple[int, str], str | None] = field(default_factory=dict)  # (run, sha256) -> refusal
    task_timeout: float = DEFAULT_TASK_TIMEOUT  # seconds one message may run
    health: RunnerHealth = field(default_factory=lambda: RunnerHealth(None))
    timed_out: bool = False  # a message hung: serve() returns, and the process must end

    def load(self) -> ClientApp:
        if self.app is None:
            from fedshift.client.app import app  # the installed code, never the bundle's

            self.app = app
        return self.app

    def handle(self, message: Message, context: Context) -> Message:
        """The approved ClientApp's reply to ``message``; :class:`TaskTimeoutError` past the timeout."""
        app = self.load()
        return call_with_timeout(lambda: app(message=message, context=context), self.task_timeout)

    def serve(self, stop: threading.Event | None = None) -> None:
        """Poll for tasks until ``stop`` is set (forever without one) or a message hangs."""
        self.load()
        self.health.task_timeout = self.task_timeout
        poller = runtime_client(self.runtime_api_address, secret=self.secret)
        logger.info(
            "Site runner up: taking ClientApp tasks from %s; approved app %s (fedshift %s); "
            "task timeout %g s",
            self.runtime_api_address,
            APPROVED_CLIENTAPP,
            fedshift.__version__,
            self.task_timeout,
        )
        self.health.set_state("idle")
        unreachable_since: float | None = None
        try:
            while (stop is None or not stop.is_set()) and not self.timed_out:
                try:
                    res = poller.AcquireTask(AcquireTaskRequest(supported_task_types=list(TASK_TYPES)))
                    unreachable_since = None
                except httpx.TransportError:  # the SuperNode is (re)starting
                    if unreachable_since is None:
                        unreachable_since = time.monotonic()
                    elif time.monotonic() - unreachable_since > 60:
                        logger.warning("SuperNode Runtime API at %s unreachable", self.runtime_api_address)
                        unreachable_since = time.monotonic()
                    time.sleep(1.0)
                    continue
                if res.HasField("task") and res.token:
                    self.run_task(res.token, str(res.task.type))
                else:
                    time.sleep(POLL_SECONDS)
        finally:
            poller.close()
            if not self.timed_out:
                self.health.set_state("stopped")

    def run_task(self, token: str, task_type: str) -> None:
        """One task: pull its message, check the app, run it (or refuse), push the reply."""
        client = runtime_client(self.runtime_api_address, token)
        heartbeat = HeartbeatSender(_heartbeat(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, SITE_ERROR
        run_id, kind, outcome, error = 0, "", "error", ""
        started = time.monotonic()
        try:
            message, context, run, fab = pull_task_input(client)
            run_id, kind = run.run_id, str(message.metadata.message_type)
            self.health.busy(run_id, kind)
            started = time.monotonic()
            refused = self.verdict(run, fab, task_type)
            if refused is not None:
                reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=APP_REFUSED), reply_to=message)
                details, outcome, error = APP_REFUSED, "refused", APP_REFUSED
            else:
                reply = self.handle(message, context)
                status, details, outcome = SubStatus.COMPLETED, "", "ok"
                logger.info("Run %d: %s message done in %.1f s", run_id, kind, time.monotonic() - started)
        except RunNotRunningException:
            logger.info("The run of this task stopped; dropping it")
            error = "the run stopped"
        except TaskTimeoutError as exc:
            self.timed_out = True
            outcome, error = "timed-out", str(exc)
            logger.error(
                "Run %d: the %s message hung: %s; it is answered with a generic error, and this runner "
                "exits (code %d) so that the daemon starts a clean one",
                run_id,
                kind,
                exc,
                EXIT_TASK_TIMEOUT,
            )
            reply = site_error(message) if message is not None else None
        except Exception as exc:  # the site logs everything; the coordinator learns nothing
            logger.exception("The ClientApp failed; the coordinator gets a generic error")
            error = f"{type(exc).__name__}: {exc}"
            if message is not None:
                reply = site_error(message)
        finally:
            try:
                if reply is not None and message is not None:
                    assert context is not None  # pulled with the message
                    push_message(client, reply, context)
                # only a completed task's context is kept (the ClientApp's state between rounds)
                keep = context if status == SubStatus.COMPLETED else None
                push_task_output(client, context=keep, sub_status=status, details=details)
            except (httpx.HTTPError, RunNotRunningException) as exc:
                logger.warning("Could not push the reply to the SuperNode: %s", exc)
            finally:
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
                if message is not None:
                    self.health.done(run_id, kind, time.monotonic() - started, outcome, error)

    def verdict(self, run: Run, fab: Fab, task_type: str) -> str | None:
        """The refusal reason (``None``: approved), decided and logged once per run and bundle."""
        key = (run.run_id, fab.hash_str)
        if key not in self.verdicts:
            refused = check_app(fab, run, task_type)
            sha = hashlib.sha256(fab.content).hexdigest()
            if refused is None:
                logger.info("Run %d: app bundle sha256 %s approved (%s)", run.run_id, sha, APPROVED_CLIENTAPP)
            else:
                logger.warning(
                    "Run %d: REFUSED app bundle sha256 %s: %s; no site code runs for this run, and the "
                    "coordinator gets an error reply",
                    run.run_id,
                    sha,
                    refused,
                )
            self.verdicts[key] = refused
        return self.verdicts[key]


def _heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """A task heartbeat that reports a lost task in the log (Flower's would SIGINT this process)."""
    lost = threading.Event()

    def beat() -> bool:
        if lost.is_set():
            return True
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPError as exc:
            logger.warning("Task heartbeat refused (%s); the SuperNode may have given the task up", exc)
            lost.set()
            return True
        if not res.success:
            logger.warning("The SuperNode no longer knows this task (expired or its run stopped)")
            lost.set()
        return True

    return beat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedshift.deploy.site_runner",
        description="Run the installed fedshift ClientApp on the tasks of a local SuperNode "
        "(started by fedshift client; not meant to be run by hand).",
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    parser.add_argument("--runtime-secret-file", type=Path, help="the secret that signs task claims")
    parser.add_argument(
        "--task-timeout",
        type=float,
        help=f"seconds one message may run before it is answered with an error and the runner restarts "
        f"(default: ${TASK_TIMEOUT_ENV}, else {DEFAULT_TASK_TIMEOUT:g})",
    )
    parser.add_argument(
        "--state-dir", type=Path, help=f"where {HEALTH_FILE} is kept (default: the working directory)"
    )
    args = parser.parse_args(argv)
    timeout = args.task_timeout if args.task_timeout is not None else _env_timeout(parser)
    if not timeout > 0 or timeout == float("inf"):
        parser.error(f"--task-timeout must be a positive number of seconds, but got {timeout:g}")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        force=True,  # importing opacus already called basicConfig (WARNING), which hid the INFO lines
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per Runtime API poll
    logging.captureWarnings(True)
    try:
        secret = args.runtime_secret_file.read_bytes() if args.runtime_secret_file is not None else None
        health = RunnerHealth((args.state_dir or Path.cwd()) / HEALTH_FILE, task_timeout=timeout)
        runner = SiteRunner(args.runtime_api_address, secret, task_timeout=timeout, health=health)
        runner.serve()
    except KeyboardInterrupt:
        return 0
    if runner.timed_out:  # the hung thread cannot be stopped: end the process, not just the main thread
        logging.shutdown()
        os._exit(EXIT_TASK_TIMEOUT)
    return 0


def _env_timeout(parser: argparse.ArgumentParser) -> float:
    value = os.environ.get(TASK_TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TASK_TIMEOUT
    try:
        return float(value)
    except ValueError:
        parser.error(f"${TASK_TIMEOUT_ENV} must be a number of seconds, but is {value!r}; unset it or fix it")


if __name__ == "__main__":
    sys.exit(main())
