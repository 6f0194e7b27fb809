"""Certificates, config checks and help of the deployment commands (no processes started)."""

from __future__ import annotations

import ipaddress
import logging
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedshift.common.cli import main
from fedshift.common.data import load_dataset, load_npz
from fedshift.deploy.server import resume_point
from fedshift.simulations.manifest_export import export_manifest
from fedshift.tests.deploy_support import toml, write_site_toml
from fedshift.tests.helpers import one_line_error


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    code = main(["certs", "--out", str(out), "--hosts", "fl.example.org,10.1.2.3", "--sites", "hospital-a"])
    assert code == 0
    return out


def test_certs_make_a_ca_a_server_certificate_and_openssh_node_keys(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    }
    private = load_ssh_private_key((certs / "nodes" / "hospital-a.key").read_bytes(), None)
    public = load_ssh_public_key((certs / "nodes" / "hospital-a.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert public.curve.name == "secp384r1"
    for key in ("ca.key", "server.key", "nodes/hospital-a.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600
    assert stat.S_IMODE((certs / "nodes" / "hospital-a.pub").stat().st_mode) == 0o644


def test_certs_never_overwrite_without_force(certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (certs / "nodes" / "hospital-a.key").read_bytes()
    code = main(["certs", "--out", str(certs), "--sites", "hospital-a"])
    one_line_error(code, capsys.readouterr().err, "hospital-a.key", "--force")
    assert (certs / "nodes" / "hospital-a.key").read_bytes() == before
    # a new hospital is added with the same CA; --force replaces a key
    ca = (certs / "ca.crt").read_bytes()
    assert main(["certs", "--out", str(certs), "--sites", "hospital-b"]) == 0
    assert main(["certs", "--out", str(certs), "--sites", "hospital-a", "--force"]) == 0
    assert (certs / "ca.crt").read_bytes() == ca
    assert (certs / "nodes" / "hospital-a.key").read_bytes() != before


def _site_toml(root: Path, certs: Path, **site: object) -> Path:
    return write_site_toml(
        root,
        ca_cert=certs / "ca.crt",
        private_key=certs / "nodes" / "hospital-a.key",
        superlink="fl.example.org:9092",
        **site,
    )


def test_a_good_site_config_passes_the_check(
    tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _site_toml(tmp_path, certs)
    assert main(["client", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "'train': 60" in out and "epsilon 8" in out
    assert (tmp_path / "state").is_dir()
    # the first start made the site's integrity key and its anchor, beside (not in) the state directory
    key = tmp_path / "state.integrity-key"
    assert key.stat().st_mode & 0o777 == 0o600 and (tmp_path / "state.integrity-key.anchor").is_file()
    made = key.read_bytes()
    assert main(["client", "--config", str(path), "--check"]) == 0  # and the next start keeps them
    assert key.read_bytes() == made


def test_a_manifest_site_is_checked_file_by_file_and_split_per_patient(
    tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _site_toml(tmp_path, certs, **{"data-path": "export/manifest.csv"})
    export_manifest(load_npz(tmp_path / "a.npz"), tmp_path / "export", images_per_patient=3, with_split=False)
    assert main(["client", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    # 90 images of 30 patients, split 60/20/20 by patient: 18, 6 and 6 patients of 3 images
    assert "'train': 54, 'val': 18, 'test': 18" in out and "90 grey-scale images readable (90 decoded" in out
    assert "train: 54 images of 18 patients" in out and "test: 18 images of 6 patients" in out
    assert not (tmp_path / "state" / "data-split.json").exists()  # the check saves no split: training does
    assert main(["client", "--config", str(path), "--check"]) == 0
    assert "(0 decoded, 90 from the cache)" in capsys.readouterr().out  # decoded once, for the site's runs
    load_dataset(tmp_path / "export" / "manifest.csv", image_size=32, state_dir=tmp_path / "state")  # a run
    assert main(["client", "--config", str(path), "--check"]) == 0  # a restart checks at the last run's size
    assert "(0 decoded, 90 from the cache)" in capsys.readouterr().out

    (tmp_path / "export" / "images" / "val" / "000004.dcm").unlink()
    one_line_error(
        main(["client", "--config", str(path), "--check"]),
        capsys.readouterr().err,
        "data-path",
        "images/val/000004.dcm",
        "row 65",
    )


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"ca-cert": "missing.crt"}, ("ca-cert", "missing.crt", "fedshift certs")),
        ({"data-path": "nowhere.npz"}, ("data-path", "nowhere.npz", "fix the path")),
        ({"dp-epsilon": "eight"}, ("dp-epsilon", "number", "without quotes")),
        ({"dp-epsilonn": 8.0}, ("dp-epsilonn", "unknown key", "spelling")),
        ({"dp-epsilon": None}, ("dp-epsilon", "set dp-epsilon")),
        ({"eval-splits": ["val", "train"]}, ("eval-splits", "remove train")),  # its metrics would leave
    ],
)
def test_bad_site_configs_fail_in_one_line_naming_the_key(
    tmp_path: Path,
    certs: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, object],
    needles: tuple[str, ...],
) -> None:
    connection_keys = {"ca-cert"}
    site = {k: v for k, v in change.items() if k not in connection_keys and v is not None}
    path = _site_toml(tmp_path, certs, **site)
    text = path.read_text()
    if "ca-cert" in change:
        text = text.replace(str(certs / "ca.crt"), str(tmp_path / str(change["ca-cert"])))
    if change.get("dp-epsilon", 0) is None:
        text = text.replace("dp-epsilon = 8.0\n", "")
    path.write_text(text)
    one_line_error(main(["client", "--config", str(path), "--check"]), capsys.readouterr().err, *needles)


@pytest.mark.parametrize("value", ["0", "-5", '"30"', "true", "inf", "nan"])
def test_a_bad_task_timeout_fails_in_one_line(
    tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    path = _site_toml(tmp_path, certs)
    path.write_text(path.read_text().replace("[connection]\n", f"[connection]\ntask-timeout = {value}\n"))
    one_line_error(
        main(["client", "--config", str(path), "--check"]),
        capsys.readouterr().err,
        "[connection] task-timeout",
        "number of seconds > 0",
        "task-timeout = 1800",
    )


def test_the_task_timeout_is_read_with_its_default(tmp_path: Path, certs: Path) -> None:
    from fedshift.deploy.settings import ClientSettings

    path = _site_toml(tmp_path, certs)
    assert ClientSettings.load(path).task_timeout == 1800.0
    path.write_text(path.read_text().replace("[connection]\n", "[connection]\ntask-timeout = 90\n"))
    assert ClientSettings.load(path).task_timeout == 90.0


def test_status_flags_of_the_client_are_checked(
    tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _site_toml(tmp_path, certs)
    one_line_error(
        main(["client", "--config", str(path), "--json"]), capsys.readouterr().err, "--json", "--status"
    )
    one_line_error(
        main(["client", "--config", str(path), "--status", "--check"]),
        capsys.readouterr().err,
        "--status",
        "--check",
    )
    assert not (tmp_path / "state").exists()  # refused before anything was read or made


def test_unreadable_data_and_malformed_toml(
    tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _site_toml(tmp_path, certs)
    data = tmp_path / "a.npz"
    data.write_bytes(b"not an npz archive")
    one_line_error(
        main(["client", "--config", str(path), "--check"]), capsys.readouterr().err, "data-path", "npz"
    )
    path.write_text('[connection]\nsuperlink = "fl.example.org:9092\n')
    one_line_error(
        main(["client", "--config", str(path), "--check"]), capsys.readouterr().err, "valid TOML", "quotes"
    )


def _federation_toml(root: Path, certs: Path, **server: object) -> Path:
    values = {
        "address": "0.0.0.0:9092",
        "state-dir": "coordinator",
        "ca-cert": str(certs / "ca.crt"),
        "server-cert": str(certs / "server.crt"),
        "server-key": str(certs / "server.key"),
        **server,
    }
    hospitals = {"hospital-a": str(certs / "nodes" / "hospital-a.pub")}
    path = root / "federation.toml"
    path.write_text(toml({"server": values, "hospitals": hospitals, "federation": {"num-server-rounds": 3}}))
    return path


def test_server_config_checks(tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _federation_toml(tmp_path, certs)
    assert main(["server", "--config", str(path), "--check"]) == 0
    assert "1 hospital(s)" in capsys.readouterr().out
    (certs / "server.key").unlink()
    one_line_error(
        main(["server", "--config", str(path), "--check"]),
        capsys.readouterr().err,
        "server-key",
        "fedshift certs",
    )
    path = _federation_toml(tmp_path, certs, **{"server-key": str(certs / "ca.key"), "adress": "x"})
    one_line_error(main(["server", "--config", str(path)]), capsys.readouterr().err, "'adress'", "spelling")
    path.write_text(
        path.read_text().replace('adress = "x"', "").replace("num-server-rounds = 3", "rounds = 3")
    )
    one_line_error(main(["server", "--config", str(path)]), capsys.readouterr().err, "rounds", "kebab-case")


def test_the_coordinators_run_config_takes_the_dp_recipe_unless_federation_sets_a_key(
    tmp_path: Path, certs: Path
) -> None:
    """Hospitals run DP-SGD unless their own site.toml says dp = false: the run config is the DP recipe's."""
    import tomllib

    from fedshift.common.config import DP_RECIPE
    from fedshift.deploy.server import write_run_config
    from fedshift.deploy.settings import ServerSettings

    path = _federation_toml(tmp_path, certs)
    settings = ServerSettings.load(path)
    assert (DP_RECIPE["server-optimizer"], DP_RECIPE["head-init"]) == ("fedavgm", "zero")
    assert {k: settings.run_config[k] for k in DP_RECIPE} == DP_RECIPE
    write_run_config(tmp_path / "run-config.toml", settings, None, None)
    written = tomllib.loads((tmp_path / "run-config.toml").read_text())
    assert {k: written[k] for k in DP_RECIPE} == DP_RECIPE and written["num-server-rounds"] == 3
    path.write_text(
        path.read_text().replace("num-server-rounds = 3", 'num-server-rounds = 3\nhead-init = "random"')
    )
    chosen = ServerSettings.load(path).run_config
    assert (chosen["server-optimizer"], chosen["head-init"]) == ("fedavgm", "random")


def test_a_finished_federation_is_not_started_again(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="move that folder away"):
        resume_point(tmp_path)
    assert resume_point(tmp_path / "fresh") is None


@pytest.mark.parametrize("command", ["server", "client", "certs", "keygen", "status"])
def test_help_documents_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options = {
        "server": ["--config", "--insecure", "--check"],
        "client": ["--config", "--insecure", "--check", "--status", "--json"],
        "status": ["--config", "--json", "--insecure"],
        "certs": ["--out", "--hosts", "--sites", "--days", "--force", "--ca-passphrase-file"],
        "keygen": ["--site", "--out", "--force"],
    }[command]
    for option in options:
        assert option in out


class _FakeFlwr:
    """A SuperLink's node table, and what the coordinator asks Flower's CLI to do with it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.next_id = 100
        self.keys: dict[int, bytes] = {}  # registered (not unregistered) node id -> key

    def register(self, key: Path, name: str) -> str:
        from fedshift.deploy.certs import node_public_key

        self.calls.append(("register", name))
        self.next_id += 1
        self.keys[self.next_id] = node_public_key(key)
        return str(self.next_id)

    def unregister(self, node_id: int) -> None:
        self.calls.append(("unregister", node_id))
        del self.keys[node_id]

    def registered_keys(self) -> dict[int, bytes]:
        return dict(self.keys)


def test_enrollment_follows_the_hospitals_table(tmp_path: Path, certs: Path) -> None:
    from fedshift.deploy.certs import make_certs
    from fedshift.deploy.server import Coordinator
    from fedshift.deploy.settings import ServerSettings

    make_certs(certs, sites=["hospital-b"])
    path = _federation_toml(tmp_path, certs)
    line_b = f'hospital-b = "{certs / "nodes" / "hospital-b.pub"}"\n'
    text = path.read_text().replace("[federation]", f"{line_b}\n[federation]")  # into [hospitals]
    path.write_text(text)
    coordinator = Coordinator(ServerSettings.load(path))
    fake = _FakeFlwr()
    coordinator.flwr = fake  # type: ignore[assignment]
    (tmp_path / "coordinator").mkdir()
    first = coordinator.enroll()
    assert sorted(first) == ["hospital-a", "hospital-b"]
    assert fake.calls == [("register", "hospital-a"), ("register", "hospital-b")]

    # a restart with the same table: the keys the SuperLink holds keep their node ids, nothing is called
    fake.calls.clear()
    restarted = Coordinator(ServerSettings.load(path))
    restarted.flwr = fake  # type: ignore[assignment]
    assert restarted.enroll() == first
    assert fake.calls == []

    # hospital-b leaves the federation, hospital-a gets a new key, and a key nobody enrolled was
    # registered behind fedshift's back: all three nodes are unregistered
    make_certs(certs, sites=["hospital-a", "stranger"], force=True)
    stranger = int(fake.register(certs / "nodes" / "stranger.pub", "hospital-c"))
    path.write_text(text.replace(line_b, ""))
    fake.calls.clear()
    coordinator = Coordinator(ServerSettings.load(path))
    coordinator.flwr = fake  # type: ignore[assignment]
    second = coordinator.enroll()
    assert sorted(second) == ["hospital-a"]
    revoked = sorted([*(int(first[s]["node-id"]) for s in ("hospital-a", "hospital-b")), stranger])
    assert sorted(c[1] for c in fake.calls if c[0] == "unregister") == revoked  # type: ignore[type-var]
    assert ("register", "hospital-a") in fake.calls
    assert sorted(fake.keys) == [int(second["hospital-a"]["node-id"])]


def test_an_unreadable_registered_key_is_a_foreign_node_not_a_traceback(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, ``registered_keys`` parsed each key outside any catch: one malformed key in the
    SuperLink's database ended ``fedshift server`` with a ValueError traceback."""
    from cryptography.hazmat.primitives import serialization
    from flwr.proto.control_pb2 import ListNodesResponse  # type: ignore[attr-defined]
    from flwr.proto.node_pb2 import NodeInfo  # type: ignore[attr-defined]
    from flwr.supercore.control import ControlHttpClient

    from fedshift.deploy.flwr_cli import UNREADABLE_KEY, Flwr, write_connection
    from fedshift.deploy.server import Coordinator
    from fedshift.deploy.settings import ServerSettings

    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    garbled = b"-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"
    nodes = [
        NodeInfo(node_id=1, status="online", public_key=pem),
        NodeInfo(node_id=2, status="registered", public_key=garbled),
        NodeInfo(node_id=3, status="unregistered", public_key=b"revoked long ago"),
    ]

    class _Client:
        def ListNodes(self, request: object) -> ListNodesResponse:  # noqa: N802 (Flower's name)
            return ListNodesResponse(nodes_info=nodes)

        def close(self) -> None:
            pass

    monkeypatch.setattr(ControlHttpClient, "from_server_address", lambda *args, **kwargs: _Client())
    write_connection(tmp_path / "flwr", "127.0.0.1:9093", None)
    with caplog.at_level(logging.WARNING, logger="fedshift.deploy.flwr_cli"):
        keys = Flwr(tmp_path / "flwr").registered_keys()
    assert keys == {1: der, 2: UNREADABLE_KEY}
    assert "Node 2's registered public key cannot be read (ValueError" in caplog.text

    # enrollment unregisters it like any key not in [hospitals]
    coordinator = Coordinator(ServerSettings.load(_federation_toml(tmp_path, certs)))
    fake = _FakeFlwr()
    fake.keys[2] = keys[2]
    coordinator.flwr = fake  # type: ignore[assignment]
    (tmp_path / "coordinator").mkdir()
    enrolled = coordinator.enroll()
    assert sorted(enrolled) == ["hospital-a"] and ("unregister", 2) in fake.calls and 2 not in fake.keys
