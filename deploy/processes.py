"""Child processes of the deployment daemons: started in their own process group, stopped whole.

Flower's SuperLink and SuperNode start helpers of their own (``flower-superexec``,
which starts ``flwr-serverapp`` / ``flwr-clientapp``), and the SuperLink's
SuperExec runs in a *new session*, outside the SuperLink's process group. So a
:class:`Child` stops the whole tree: it collects every descendant (from
``/proc``), sends SIGTERM to each process group, waits, then SIGKILLs whatever
is left. Nothing a daemon started outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from fedshift.common.proctree import alive, descendants, signal_tree

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL


class Child:
    """One long-lived child process (and its whole tree), logging into a file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self._log.write(f"\n===== fedshift: starting {name}: {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stopped as a whole, spared our terminal's ^C
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        self._known: set[int] = set()
        logger.info("Started %s (pid %d), log %s", name, self.proc.pid, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        """The exit code, or ``None`` while running; also remembers the current descendants."""
        code = self.proc.poll()
        if code is None:
            self._known.update(descendants(self.proc.pid))
        return code

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM the whole tree, wait up to ``timeout``, then SIGKILL what is left; the exit code."""
        tree = [self.proc.pid, *descendants(self.proc.pid), *self._known]
        if self.proc.poll() is None:
            logger.info("Stopping %s (pid %d)", self.name, self.proc.pid)
        signal_tree(tree, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.proc.poll()
            tree = [p for p in {*tree, *descendants(self.proc.pid)} if alive(p)]
            if not tree:
                break
            time.sleep(0.2)
        else:
            logger.warning("%s did not stop within %.0f s; killing %s", self.name, timeout, sorted(tree))
            signal_tree(tree, signal.SIGKILL)
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._log.close()
        return code


def wait_for_port(host: str, port: int, timeout: float, child: Child | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections; ``TimeoutError`` (or ``RuntimeError`` when
    ``child`` exits first) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}; see {child.log_path}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.3)
    raise TimeoutError(f"Nothing listens on {host}:{port} after {timeout:.0f} s")


class StopRequested(Exception):  # noqa: N818 (a request, not an error)
    """Raised in the main thread when the daemon is asked to stop (SIGTERM, SIGINT, SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGINT/SIGHUP into :class:`StopRequested` (so ``finally`` blocks stop the children)."""

    requested: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        if requested:  # a second signal must not interrupt the clean-up the first one started
            logger.warning("Still stopping (got %s again)", signal.Signals(signum).name)
            return
        requested.append(signum)
        raise StopRequested(signum)

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
