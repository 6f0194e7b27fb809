"""Certificates and keys of a federation: a CA, the coordinator's TLS certificate, one key per hospital.

Layout of a certificate directory (``fedshift certs --out DIR``)::

    ca.crt                  # the federation's CA certificate: every hospital gets a copy
    ca.key                  # the CA's private key (0600; --ca-passphrase-file encrypts it): keep it offline
    server.crt, server.key  # the SuperLink's TLS certificate (SANs: the given hosts/IPs) and key
    nodes/<site>.key        # demos and tests only: a SuperNode key made at the coordinator (0600)
    nodes/<site>.pub        # its public key, enrolled at the coordinator (OpenSSH format)

In a real federation each hospital makes its own key pair, at the hospital
(``fedshift keygen``: :func:`make_node_key`), and sends only the ``.pub`` file;
the private key never leaves the site.

Flower's SuperNode authentication expects EC keys on a NIST curve in OpenSSH
format (``flower-supernode --auth-supernode-private-key``, ``flwr supernode
register``). TLS keys are EC P-384 too. Private keys are written owner-only
(0600). Nothing is ever overwritten unless ``force`` is set; an existing CA is
reused to sign new certificates (so hospitals can be added later).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedshift.common.errors import ConfigError

logger = logging.getLogger(__name__)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
NODES_DIR = "nodes"
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DEFAULT_DAYS = 825  # the longest validity common TLS clients accept for a leaf certificate

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def node_key_path(directory: Path, site: str) -> Path:
    """Where ``fedshift certs`` puts a hospital's private SuperNode key."""
    return directory / NODES_DIR / f"{site}.key"


def node_public_key_path(directory: Path, site: str) -> Path:
    """Where ``fedshift certs`` puts a hospital's public SuperNode key (to enroll)."""
    return directory / NODES_DIR / f"{site}.pub"


def _ssh_public_fields(path: Path) -> tuple[str, bytes]:
    """The key type and the decoded body of an OpenSSH public key file (``type base64 [comment]``)."""
    try:
        fields = path.read_text().split()
        return fields[0], base64.b64decode(fields[1], validate=True)
    except (OSError, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"Expected {path} to be an OpenSSH public key ('ecdsa-sha2-nistp384 AAAA... site'), but reading "
            f"it failed ({type(exc).__name__}); ask the hospital for the .pub file of fedshift keygen"
        ) from None


def node_public_key(path: Path) -> bytes:
    """A SuperNode's public key (OpenSSH file) as DER SubjectPublicKeyInfo, checked as Flower checks it."""
    kind, _ = _ssh_public_fields(path)
    try:
        key = load_ssh_public_key(path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"Expected {path} to be an OpenSSH public key, but it is not ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _NIST_CURVES:
        raise ConfigError(
            f"Expected {path} to be an EC public key on a NIST curve (Flower's node authentication), but "
            f"got {kind}; make the key pair with fedshift keygen"
        )
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_fingerprint(path: Path) -> str:
    """sha256 (hex) of an OpenSSH public key's type and body (the comment does not count)."""
    fields = path.read_text().split()
    return hashlib.sha256(" ".join(fields[:2]).encode()).hexdigest()


def ssh_fingerprint(path: Path) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf`` prints it: read it aloud to check a ``.pub`` received by mail."""
    _, blob = _ssh_public_fields(path)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass
class CertsReport:
    """What one ``make_certs`` call did."""

    created: list[Path] = field(default_factory=list)
    reused: list[Path] = field(default_factory=list)


def check_site_name(site: str) -> str:
    if not _SITE_NAME.match(site):
        raise ConfigError(
            f"Expected a site name of letters, digits, '.', '_' or '-' (at most 63), but got {site!r}; "
            "use e.g. hospital-a"
        )
    return site


def parse_hosts(hosts: list[str]) -> list[x509.GeneralName]:
    """Subject alternative names: IP addresses as IPs, everything else as DNS names."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.*-]{0,252})$", host):
                raise ConfigError(
                    f"Expected --hosts to list DNS names or IP addresses, but got {host!r}; "
                    "e.g. --hosts coordinator.example.org,10.0.0.5,localhost"
                ) from None
            names.append(x509.DNSName(host))
    if not names:
        raise ConfigError(
            "Expected at least one host name or IP in --hosts, but got none; "
            "e.g. --hosts coordinator.example.org,10.0.0.5"
        )
    return names


def _write(path: Path, data: bytes, mode: int, force: bool, report: CertsReport) -> None:
    """Write ``data`` with ``mode`` from the first byte (no window with wider permissions)."""
    if path.exists() and not force:
        raise ConfigError(f"Expected {path} not to exist, but it does; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    report.created.append(path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def read_passphrase(path: Path) -> bytes:
    """The CA passphrase from a file (one trailing newline dropped); never from the command line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"Expected --ca-passphrase-file {path} to be a readable file, but reading it failed ({exc}); "
            "write the passphrase into a file only you can read (chmod 600)"
        ) from None
    passphrase = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    if not passphrase:
        raise ConfigError(f"Expected a passphrase in --ca-passphrase-file {path}, but the file is empty")
    return passphrase


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedshift federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _load_ca(
    directory: Path, passphrase: bytes | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    unreadable = (
        f"Expected a readable CA in {directory} ({CA_CERT} and {CA_KEY}), but reading it failed ({{}}); "
        "restore both files, or remove both to create a new CA (then every certificate and enrollment "
        "must be renewed)"
    )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key_bytes = key_path.read_bytes()
    except (OSError, ValueError) as exc:
        raise ConfigError(unreadable.format(exc)) from None
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except TypeError:  # the key is encrypted
        if passphrase is None:
            raise ConfigError(
                f"Expected the passphrase of the encrypted CA key {key_path}, but none was given; pass "
                "--ca-passphrase-file FILE (a file holding the passphrase)"
            ) from None
        try:
            key = serialization.load_pem_private_key(key_bytes, password=passphrase)
        except ValueError:
            raise ConfigError(
                f"Expected the passphrase of the encrypted CA key {key_path}, but the one in "
                "--ca-passphrase-file does not decrypt it; check the file (one line: the passphrase)"
            ) from None
    except ValueError as exc:
        raise ConfigError(unreadable.format(exc)) from None
    else:
        if passphrase is not None:
            logger.warning(
                "%s is not encrypted, so the passphrase is not used; to encrypt it: openssl pkcs8 -topk8 "
                "-v2 aes-256-cbc -in ca.key -out ca.key.enc, then replace ca.key with ca.key.enc",
                key_path,
            )
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"Expected {key_path} to be an EC private key, but got {type(key).__name__}")
    return cert, key


def _make_ca(
    directory: Path, days: int, passphrase: bytes | None, report: CertsReport
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedshift federation CA"))
        .issuer_name(_name("fedshift federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    if passphrase is None:
        logger.warning(
            "%s is written unencrypted: pass --ca-passphrase-file to encrypt it; keep it offline either way",
            directory / CA_KEY,
        )
    _write(directory / CA_KEY, _pem_key(key, passphrase), PRIVATE_MODE, False, report)
    _write(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, False, report)
    return cert, key


def _make_server_cert(
    directory: Path,
    hosts: list[str],
    days: int,
    force: bool,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    report: CertsReport,
) -> None:
    sans = parse_hosts(hosts)
    for target in (directory / SERVER_CERT, directory / SERVER_KEY):
        if target.exists() and not force:
            raise ConfigError(f"Expected {target} not to exist, but it does; pass --force to replace it")
    ca_cert, ca_key = ca
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    common = next((h.strip() for h in hosts if h.strip()), "fedshift-coordinator")
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(directory / SERVER_KEY, _pem_key(key), PRIVATE_MODE, force, report)
    _write(directory / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, force, report)


def make_node_key(directory: Path, site: str, *, force: bool = False) -> CertsReport:
    """A hospital's SuperNode key pair, made at the hospital: ``<directory>/<site>.key`` (0600) and ``.pub``.

    ``fedshift keygen``. Only the ``.pub`` goes to the coordinator (``[hospitals]``).
    """
    report = CertsReport()
    check_site_name(site)
    _make_node_key(directory / f"{site}.key", directory / f"{site}.pub", site, force, report)
    logger.info("Key pair of %s in %s: send only %s.pub", site, directory, site)
    return report


def _make_node_key(private: Path, public: Path, site: str, force: bool, report: CertsReport) -> None:
    for target in (private, public):
        if target.exists() and not force:
            raise ConfigError(f"Expected {target} not to exist, but it does; pass --force to replace it")
    key = _new_key()
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_bytes = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(private, private_bytes, PRIVATE_MODE, force, report)
    _write(public, public_bytes + f" {site}\n".encode(), PUBLIC_MODE, force, report)


def make_certs(
    directory: Path,
    *,
    hosts: list[str] | None = None,
    sites: list[str] | None = None,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    ca_passphrase: bytes | None = None,
) -> CertsReport:
    """Create the CA (if missing), a server certificate for ``hosts`` and one key pair per site.

    An existing CA is reused (``ca_passphrase`` decrypts its key); a new CA's
    key is encrypted with ``ca_passphrase`` when given. An existing server
    certificate or node key is refused (:class:`ConfigError`) unless
    ``force``. Everything is checked before the first file is written. Node
    keys made here are for demos and tests: hospitals make their own
    (:func:`make_node_key`).
    """
    if days < 1:
        raise ConfigError(f"Expected --days >= 1, but got {days}")
    sites = [check_site_name(s.strip()) for s in (sites or []) if s.strip()]
    if len(set(sites)) != len(sites):
        raise ConfigError(f"Expected distinct site names in --sites, but got {sites}")
    if hosts:
        parse_hosts(hosts)
    if not hosts and not sites and (directory / CA_CERT).exists():
        raise ConfigError(
            f"Expected --hosts or --sites (the CA in {directory} exists already), but got neither; "
            "e.g. --sites hospital-d to enroll one more hospital"
        )
    targets = ([directory / SERVER_CERT, directory / SERVER_KEY] if hosts else []) + [
        p for s in sites for p in (node_key_path(directory, s), node_public_key_path(directory, s))
    ]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"Expected {existing[0]} not to exist, but it does ({len(existing)} file(s) would be "
            "replaced); pass --force to replace them"
        )
    report = CertsReport()
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
        ca = _load_ca(directory, ca_passphrase)
        report.reused += [directory / CA_CERT, directory / CA_KEY]
    else:
        ca = _make_ca(directory, days, ca_passphrase, report)
    if hosts:
        _make_server_cert(directory, hosts, days, force, ca, report)
    for site in sites:
        private, public = node_key_path(directory, site), node_public_key_path(directory, site)
        _make_node_key(private, public, site, force, report)
    logger.info("Certificates in %s: created %d file(s)", directory, len(report.created))
    return report
