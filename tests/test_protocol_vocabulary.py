"""The wire vocabulary lives in common/protocol.py only: no protocol string literal anywhere else.

Two checks over every module of the package (client, server, common, deploy, simulations):

* a *distinctive* protocol value (a multi-word name such as ``"budget-exhausted"``, ``"dp-sgd"``,
  ``"server-round"``) never appears as a string literal outside common/protocol.py;
* no record is built or read with a literal key: every key of a ``ConfigRecord``/``MetricRecord``/
  ``RecordDict``/``ArrayRecord`` built from a dict display, and every ``x.config_records[...]``,
  ``x.metric_records.get(...)``, ... is a name, not a string (short protocol words such as
  ``"site"`` or ``"n"`` are ordinary words elsewhere, so they are checked where records are made or read).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "common" / "protocol.py"
PACKAGES = ("client", "server", "common", "deploy", "simulations")
RECORDS = {"ConfigRecord", "MetricRecord", "RecordDict", "ArrayRecord"}
RECORD_ATTRIBUTES = {"config_records", "metric_records", "array_records"}
# the same text in another namespace (not the wire), with the reason
ALLOWED = {
    ("common/ewc_config.py", "ewc-anchor"): "the run-config key ewc-anchor, not the record ANCHOR_KEY",
}


def protocol_values(source: str) -> dict[str, str]:
    """Each string a module-level UPPER_CASE constant of ``source`` holds -> the constant's name."""
    values: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name) and n.id.isupper()]
            for const in ast.walk(node.value) if node.value is not None and names else ():
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    values.setdefault(const.value, names[0])
    return values


def _name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _is_record_access(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in RECORD_ATTRIBUTES


def _is_record_get(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and _is_record_access(node.func.value)
        and bool(node.args)
    )


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def literal_keys(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, key) of every string-literal key a record is built or read with."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _name(node.func) in RECORDS:
            for arg in node.args:
                if isinstance(arg, ast.Dict):
                    yield from ((k.lineno, v) for k in arg.keys if k is not None and (v := _literal(k)))
        elif isinstance(node, ast.Subscript) and _is_record_access(node.value):
            if (key := _literal(node.slice)) is not None:
                yield node.lineno, key
        elif _is_record_get(node) and (key := _literal(cast(ast.Call, node).args[0])):
            yield cast(ast.Call, node).lineno, key


def violations(source: str, path: str, values: dict[str, str]) -> list[str]:
    """Every protocol literal in ``source``: distinctive values anywhere, any value as a record key."""
    tree = ast.parse(source)
    distinctive = {v for v in values if "-" in v.strip("-_") and " " not in v}
    out = [
        f"{path}:{node.lineno}: {node.value!r} (use {values[node.value]} from common/protocol.py)"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in distinctive and (path, node.value) not in ALLOWED
    ]
    out += [
        f"{path}:{line}: record key {key!r} is a literal (use a protocol name)"
        for line, key in literal_keys(tree)
    ]
    return out


def _modules() -> Iterator[Path]:
    for package in PACKAGES:
        yield from (p for p in sorted((ROOT / package).rglob("*.py")) if p != PROTOCOL)


def test_no_protocol_literal_outside_the_protocol_module() -> None:
    values = protocol_values(PROTOCOL.read_text())
    assert {"budget-exhausted", "dp-sgd", "server-round", "num-examples", "site", "n"} <= set(values)
    found = [v for p in _modules() for v in violations(p.read_text(), str(p.relative_to(ROOT)), values)]
    assert found == []


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ('reason = "budget-exhausted"\n', "'budget-exhausted' (use STATUS_BUDGET_EXHAUSTED"),
        ('ConfigRecord({"name": site})\n', "record key 'name' is a literal"),
        ('msg.content.config_records["site"]\n', "record key 'site' is a literal"),
        ('msg.content.metric_records.get("metrics")\n', "record key 'metrics' is a literal"),
    ],
)
def test_the_check_finds_a_planted_literal(source: str, needle: str) -> None:
    values = protocol_values(PROTOCOL.read_text())
    found = violations(source, "planted.py", values)
    assert len(found) == 1 and needle in found[0]
    assert violations("ConfigRecord({SITE_NAME_FIELD: site})\nsite = 'site'\n", "clean.py", values) == []
