"""Keys made where they belong, an encrypted CA key, enrollment of every node.

- ``fedshift keygen`` makes a hospital's key pair at the hospital; only the ``.pub`` travels.
- ``fedshift certs --ca-passphrase-file`` writes the CA key encrypted and needs the passphrase to sign.
- ``Coordinator.enroll`` reconciles every node the SuperLink holds, not only the ones it registered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedshift.common.cli import main
from fedshift.deploy.flwr_cli import ALREADY_ENROLLED_NOTE
from fedshift.tests.deploy_support import fedshift, free_port, toml
from fedshift.tests.helpers import one_line_error


def test_keygen_writes_a_private_key_for_the_site_and_a_public_key_to_send(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert main(["keygen", "--site", "hospital-a", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    private_path, public_path = out / "hospital-a.key", out / "hospital-a.pub"
    private = load_ssh_private_key(private_path.read_bytes(), None)
    public = load_ssh_public_key(public_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert public.curve.name == "secp384r1"  # a NIST curve, as Flower's node authentication requires
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["hospital-a.key", "hospital-a.pub"]
    # the fingerprint is ssh-keygen -lf's: sha256 of the key blob, base64 without padding
    kind, body, comment = public_path.read_text().split()
    assert (kind, comment) == ("ecdsa-sha2-nistp384", "hospital-a")
    expected = base64.b64encode(hashlib.sha256(base64.b64decode(body)).digest()).decode().rstrip("=")
    assert f"fingerprint SHA256:{expected}" in printed
    assert "send only this file" in printed and str(public_path) in printed

    # never overwritten without --force; a bad site name is refused before anything is written
    before = private_path.read_bytes()
    code = main(["keygen", "--site", "hospital-a", "--out", str(out)])
    one_line_error(code, capsys.readouterr().err, "hospital-a.key", "--force")
    assert private_path.read_bytes() == before
    code = main(["keygen", "--site", "hospital a", "--out", str(out)])
    one_line_error(code, capsys.readouterr().err, "'hospital a'", "hospital-a")
    assert main(["keygen", "--site", "hospital-a", "--out", str(out), "--force"]) == 0
    assert private_path.read_bytes() != before


def test_the_ca_key_is_written_encrypted_and_needs_its_passphrase_to_sign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs, secret, wrong = tmp_path / "certs", tmp_path / "ca-pass", tmp_path / "wrong-pass"
    secret.write_text("correct horse battery staple\n")
    wrong.write_text("not it\n")
    assert main(["certs", "--out", str(certs), "--ca-passphrase-file", str(secret)]) == 0
    key_pem = (certs / "ca.key").read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):  # unusable without the passphrase
        serialization.load_pem_private_key(key_pem, password=None)
    key = serialization.load_pem_private_key(key_pem, password=b"correct horse battery staple")
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == ca.public_key().public_numbers()  # type: ignore[union-attr]
    assert stat.S_IMODE((certs / "ca.key").stat().st_mode) == 0o600

    # signing a server certificate: without the passphrase, or with a wrong one, nothing is written
    capsys.readouterr()
    code = main(["certs", "--out", str(certs), "--hosts", "fl.example.org"])
    one_line_error(code, capsys.readouterr().err, "encrypted CA key", "--ca-passphrase-file")
    code = main(
        ["certs", "--out", str(certs), "--hosts", "fl.example.org", "--ca-passphrase-file", str(wrong)]
    )
    one_line_error(code, capsys.readouterr().err, "does not decrypt")
    assert not (certs / "server.crt").exists() and not (certs / "server.key").exists()
    (tmp_path / "empty").write_text("")
    code = main(
        ["certs", "--out", str(certs), "--hosts", "h", "--ca-passphrase-file", str(tmp_path / "empty")]
    )
    one_line_error(code, capsys.readouterr().err, "empty")
    code = main(
        ["certs", "--out", str(certs), "--hosts", "fl.example.org", "--ca-passphrase-file", str(secret)]
    )
    assert code == 0
    server = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    assert (certs / "ca.key").read_bytes() == key_pem  # the CA key itself is never rewritten


def test_an_unencrypted_ca_key_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--out", str(tmp_path / "certs")]) == 0
    err = capsys.readouterr().err
    assert "written unencrypted" in err and "--ca-passphrase-file" in err and "offline" in err
    assert (tmp_path / "certs" / "ca.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.slow
def test_keygen_keys_enroll_and_every_other_registered_node_is_unregistered(tmp_path: Path) -> None:
    """A real SuperLink: keygen's .pub files are accepted; a node someone else registered is removed."""
    from fedshift.deploy.server import Coordinator
    from fedshift.deploy.settings import ServerSettings

    assert fedshift("certs", "--out", "certs", "--hosts", "localhost", cwd=tmp_path).returncode == 0
    for site in ("hospital-a", "hospital-b", "stranger"):  # each made at "its own" machine
        made = fedshift("keygen", "--site", site, "--out", f"{site}-keys", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
    server = {
        "address": f"127.0.0.1:{free_port()}",
        "state-dir": "coordinator",
        "ca-cert": "certs/ca.crt",
        "server-cert": "certs/server.crt",
        "server-key": "certs/server.key",
    }
    hospitals = {site: f"{site}-keys/{site}.pub" for site in ("hospital-a", "hospital-b")}
    path = tmp_path / "federation.toml"
    path.write_text(toml({"server": server, "hospitals": hospitals, "federation": {"num-server-rounds": 1}}))
    coordinator = Coordinator(ServerSettings.load(path))
    enrolled_json = tmp_path / "coordinator" / "enrolled.json"
    try:
        coordinator.start()
        # registered behind fedshift's back (e.g. through an open Control API), under a hospital's name
        stranger = int(coordinator.flwr.register(tmp_path / "stranger-keys" / "stranger.pub", "hospital-a"))
        first = coordinator.enroll()
        status = {int(n["node-id"]): n["status"] for n in coordinator.flwr.nodes()}
        assert status.get(stranger) in (None, "unregistered")
        ids = {site: int(entry["node-id"]) for site, entry in first.items()}
        assert sorted(ids) == ["hospital-a", "hospital-b"]
        assert {status[i] for i in ids.values()} == {"registered"}
        assert sorted(n for n, s in status.items() if s != "unregistered") == sorted(ids.values())

        # started again, even without its own record: the SuperLink's node ids, nothing registered again
        enrolled_json.unlink()
        second = coordinator.enroll()
        assert {site: int(entry["node-id"]) for site, entry in second.items()} == ids
        assert json.loads(enrolled_json.read_text()) == second
        status_again = {int(n["node-id"]): n["status"] for n in coordinator.flwr.nodes()}
        assert sorted(n for n, s in status_again.items() if s != "unregistered") == sorted(ids.values())
        # a key the SuperLink holds (enrolled, or revoked for good) is never registered a second time
        for held in ("hospital-a-keys/hospital-a.pub", "stranger-keys/stranger.pub"):
            assert coordinator.flwr.register(tmp_path / held, "again") == ALREADY_ENROLLED_NOTE
        assert len(coordinator.flwr.nodes()) == len(status_again)
    finally:
        coordinator.close()
