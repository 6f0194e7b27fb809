"""The per-site cap on the weight a hospital may claim: [hospitals] -> enrolled.json -> SiteNames."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedshift.common.cli import main
from fedshift.common.errors import ConfigError
from fedshift.deploy.certs import node_public_key
from fedshift.deploy.server import Coordinator
from fedshift.deploy.settings import ServerSettings
from fedshift.server.enrollment import SiteNames, load_enrollment, load_weight_caps
from fedshift.tests.helpers import one_line_error


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--hosts", "localhost", "--sites", "hospital-a,hospital-b"]) == 0
    return out


def _federation(tmp_path: Path, certs: Path, hospital_b: str) -> Path:
    """federation.toml with hospital-a in the string form and ``hospital-b = <hospital_b>``."""
    path = tmp_path / "federation.toml"
    path.write_text(
        f"""[server]
state-dir = "coordinator"
ca-cert = "{certs / "ca.crt"}"
server-cert = "{certs / "server.crt"}"
server-key = "{certs / "server.key"}"

[hospitals]
hospital-a = "{certs / "nodes" / "hospital-a.pub"}"
hospital-b = {hospital_b}

[federation]
num-server-rounds = 3
"""
    )
    return path


class _FakeFlwr:
    """The SuperLink's node table as the coordinator's Flower CLI calls see it."""

    def __init__(self) -> None:
        self.keys: dict[int, bytes] = {}

    def register(self, key: Path, name: str) -> str:
        node = 100 + len(self.keys)
        self.keys[node] = node_public_key(key)
        return str(node)

    def unregister(self, node_id: int) -> None:
        del self.keys[node_id]

    def registered_keys(self) -> dict[int, bytes]:
        return dict(self.keys)


def test_the_table_form_carries_its_cap_to_the_server_app(tmp_path: Path, certs: Path) -> None:
    key_b = certs / "nodes" / "hospital-b.pub"
    settings = ServerSettings.load(
        _federation(tmp_path, certs, f'{{ key = "{key_b}", max-num-examples = 500 }}')
    )
    assert settings.hospitals == {"hospital-a": certs / "nodes" / "hospital-a.pub", "hospital-b": key_b}
    assert settings.weight_caps == {"hospital-b": 500}  # the string form has none

    coordinator = Coordinator(settings)
    coordinator.flwr = _FakeFlwr()  # type: ignore[assignment]
    (tmp_path / "coordinator").mkdir()
    enrolled = coordinator.enroll()
    saved = json.loads(coordinator.paths.enrolled.read_text())
    assert saved == enrolled
    assert saved["hospital-b"]["max-num-examples"] == "500" and "max-num-examples" not in saved["hospital-a"]

    names = SiteNames.from_file(coordinator.paths.enrolled)
    node_b = int(saved["hospital-b"]["node-id"])
    assert names.enrolled is not None and names.enrolled[node_b] == "hospital-b"
    assert names.max_num_examples("hospital-b") == 500
    assert names.max_num_examples("hospital-a") is None
    assert names.max_num_examples("stranger") is None
    assert SiteNames().max_num_examples("hospital-b") is None  # a simulation: no enrollment, no caps


def test_a_table_without_a_cap_is_the_string_form(tmp_path: Path, certs: Path) -> None:
    key_b = certs / "nodes" / "hospital-b.pub"
    settings = ServerSettings.load(_federation(tmp_path, certs, f'{{ key = "{key_b}" }}'))
    assert settings.hospitals["hospital-b"] == key_b and settings.weight_caps == {}


@pytest.mark.parametrize(
    ("entry", "needles"),
    [
        ('{ key = "KEY", max-num-examples = 0 }', ("max-num-examples", "got 0", "[hospitals.hospital-b]")),
        ('{ key = "KEY", max-num-examples = 2.5 }', ("max-num-examples", "got 2.5")),
        ('{ key = "KEY", max-num-examples = "500" }', ("max-num-examples", "got '500'")),
        ('{ key = "KEY", max-num-examples = true }', ("max-num-examples", "got True")),
        ('{ key = "KEY", max-examples = 5 }', ("'max-examples'", "spelling")),
        ("{ max-num-examples = 5 }", ("[hospitals.hospital-b] key", "missing")),
        ('{ key = "nowhere.pub" }', ("[hospitals.hospital-b] key", "does not exist")),
        ("500", ("[hospitals] hospital-b", "non-empty string")),
    ],
)
def test_a_bad_entry_is_one_line_naming_it(
    tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str], entry: str, needles: tuple[str, ...]
) -> None:
    path = _federation(tmp_path, certs, entry.replace("KEY", str(certs / "nodes" / "hospital-b.pub")))
    with pytest.raises(ConfigError):
        ServerSettings.load(path)
    one_line_error(main(["server", "--config", str(path), "--check"]), capsys.readouterr().err, *needles)


@pytest.mark.parametrize("cap", [0, -3, "lots", 2.5, True])
def test_an_unusable_cap_in_enrolled_json_is_refused(tmp_path: Path, cap: object) -> None:
    path = tmp_path / "enrolled.json"
    path.write_text(json.dumps({"a": {"node-id": "5"}, "b": {"node-id": "6", "max-num-examples": cap}}))
    assert load_enrollment(path) == {5: "a", 6: "b"}
    with pytest.raises(ConfigError, match="max-num-examples >= 1") as err:
        load_weight_caps(path)
    assert "'b'" in str(err.value) and repr(cap) in str(err.value) and "fedshift server" in str(err.value)
    path.write_text(json.dumps({"a": {"node-id": "5"}, "b": {"node-id": "6", "max-num-examples": 40}}))
    assert load_weight_caps(path) == {"b": 40}
