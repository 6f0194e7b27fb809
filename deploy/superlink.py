"""Flower's SuperLink as the coordinator runs it: ``flower-superlink`` with a longer SQLite busy timeout.

``fedshift server`` starts ``python -m fedshift.deploy.superlink`` with ``flower-superlink``'s own
arguments. The only change is how long a SuperLink request waits for SQLite's write lock before
it fails with ``database is locked``. Flower sets this to 5 s (``busy_timeout`` in
``flwr.supercore.constant.SQLITE_PRAGMAS``); this launcher sets :data:`BUSY_TIMEOUT_MS`.

Why: the SuperLink keeps its state and the messages' objects in one SQLite file. Every request
from every SuperNode writes to it, from the SuperLink's thread pool. With many hospitals
uploading at once on a busy coordinator, a writer can wait for the lock for more than 5 s. The
request then fails. Flower's SuperNode does not retry a failed reply upload (``PushObject``
answered ``500`` or ``stored=False``): it logs ``Failed to send message`` and drops the
reply. The ServerApp then waits its whole ``reply-timeout`` (3600 s by default) for a reply that
will never come.

Measured (``python -m fedshift.simulations.benchmarks.scale --supernodes 20``, 2 cores): with
Flower's 5 s, 3 of the 20 first-round replies were lost this way; with 20 s, none in two runs of
5 rounds (0 SuperLink errors). A longer wait costs nothing when the lock is free. sqlite3
releases the GIL while it waits, so other requests go on.

If this Flower has no such setting (a later release changed it), the launcher logs a warning and
runs the SuperLink unchanged.
"""

from __future__ import annotations

import sys
from logging import INFO, WARNING

# ms a SuperLink request waits for SQLite's write lock (Flower: 5000). It stays under the 30 s in which
# a SuperNode's HTTP client gives a request up: a retried upload whose first try had succeeded late
# is answered ``stored=False``, and the SuperNode drops the reply just the same.
BUSY_TIMEOUT_MS = 20_000
PRAGMA = "busy_timeout"


def lengthen_busy_timeout(ms: int = BUSY_TIMEOUT_MS) -> bool:
    """Make the SuperLink's SQLite connections wait ``ms`` for a lock; ``False`` when Flower has no such
    setting (nothing is changed then)."""
    try:
        from flwr.supercore import sql_mixin
    except ImportError:
        return False
    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not isinstance(pragmas, tuple) or not any(
        isinstance(p, tuple) and len(p) == 2 and p[0] == PRAGMA for p in pragmas
    ):
        return False
    lengthened = tuple((k, str(ms)) if k == PRAGMA else (k, v) for k, v in pragmas)
    setattr(sql_mixin, "SQLITE_PRAGMAS", lengthened)  # noqa: B010 (Flower types it as its own 7 pairs)
    return True


def main() -> int:
    from flwr.common.logger import log  # the SuperLink's own log, in its format

    if lengthen_busy_timeout():
        log(INFO, "fedshift: SQLite busy timeout %d ms (Flower's default: 5000 ms)", BUSY_TIMEOUT_MS)
    else:
        log(
            WARNING,
            "This Flower has no SQLite busy_timeout setting in flwr.supercore.sql_mixin; the SuperLink "
            "runs with Flower's own (a request may fail with 'database is locked' under load)",
        )
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
