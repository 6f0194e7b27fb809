"""Assertions shared by several test modules."""

from __future__ import annotations


def one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2, no traceback anywhere in stderr, and exactly one error line naming the problem."""
    assert code == 2
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], err
