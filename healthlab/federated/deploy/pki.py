"""Certificates and node keys for an authenticated deployment (``cryptography``).

* **The study's CA** (held by whoever runs the SuperLink): a self-signed P-384 CA
  certificate ``ca.crt`` that every site trusts (``--root-certificates``), and its key
  ``ca.key`` (mode 600), which never leaves the SuperLink's host.
* **The SuperLink's certificate** ``server.crt`` / ``server.key``, signed by the CA,
  with subject alternative names for the host names and addresses the sites dial
  (``localhost`` and ``127.0.0.1`` by default).
* **A site's node key** ``node-key`` (OpenSSH private key, mode 600) and
  ``node-key.pub``: ECDSA P-384, as Flower's SuperNode authentication takes them. The
  public half is registered at the SuperLink (``flwr supernode register``) and bound
  to the site's dataset on chain (its 97-byte uncompressed point).

Every private key is written with ``O_EXCL`` and mode 600 into a folder of mode 700;
a key file another user can read is refused when loaded.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from healthlab.errors import ConfigurationError, InvalidInput

__all__ = [
    "NODE_KEY_BYTES",
    "TLSFiles",
    "make_node_key",
    "make_study_pki",
    "node_public_point",
    "openssh_public_key",
    "write_private",
]

#: Size of a P-384 public key as an uncompressed SEC1 point (0x04 || X || Y).
NODE_KEY_BYTES = 97
_DAYS = 825  # the longest validity browsers accept for a server certificate


@dataclass(frozen=True)
class TLSFiles:
    """Where a SuperLink's TLS material lives (``ca.crt``, ``server.crt/.key``)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: str | os.PathLike[str]) -> TLSFiles:
        """The files of :func:`make_study_pki` in ``directory``."""
        base = Path(directory).expanduser()
        return cls(base / "ca.crt", base / "server.crt", base / "server.key")

    def exist(self) -> bool:
        """Whether all three files are there."""
        files = (self.ca_cert, self.server_cert, self.server_key)
        return all(p.is_file() for p in files)


def _private_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o077:
        directory.chmod(0o700)
    return directory


def write_private(path: Path, data: bytes) -> None:
    """Write a new file readable by its owner only (mode 600, never overwritten)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _read_private(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigurationError(f"no key file at {path}")
    if path.stat().st_mode & 0o077:
        raise ConfigurationError(
            f"{path} is readable by other users; run `chmod 600 {path}`"
        )
    return path.read_bytes()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "HealthLab study"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_study_pki(
    directory: str | os.PathLike[str],
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
) -> TLSFiles:
    """A CA and a SuperLink certificate for ``hosts`` in ``directory`` (kept if there).

    An existing set is reused unchanged (its CA is what the sites already trust); a
    partial set is refused rather than overwritten.
    """
    files = TLSFiles.in_dir(directory)
    if files.exist():
        return files
    base = _private_dir(Path(directory).expanduser())
    present = [p.name for p in (files.ca_cert, files.server_cert, files.server_key)]
    present = [name for name in present if (base / name).exists()]
    if present or (base / "ca.key").exists():
        raise ConfigurationError(
            f"{base} holds part of a study's TLS set ({present or ['ca.key']}); "
            "remove it or point to a complete one"
        )
    if not hosts:
        raise InvalidInput("give at least one host name or address for the SuperLink")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("HealthLab study CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_DAYS))
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    no_password = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    write_private(base / "ca.key", ca_key.private_bytes(pem, pkcs8, no_password))
    write_private(files.server_key, server_key.private_bytes(pem, pkcs8, no_password))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))  # last: marks the set complete
    return files


def make_node_key(path: str | os.PathLike[str]) -> Path:
    """A site's SuperNode key at ``path`` (+ ``.pub``), created once; returns ``path``.

    ECDSA P-384 in OpenSSH format, as ``flower-supernode
    --auth-supernode-private-key`` and ``flwr supernode register`` take it.
    """
    file = Path(path).expanduser()
    public = file.with_name(file.name + ".pub")
    if file.exists():
        key = _load_node_key(file)
    else:
        _private_dir(file.parent)
        key = ec.generate_private_key(ec.SECP384R1())
        write_private(
            file,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if not public.exists() or public.read_bytes().split()[:2] != line.split()[:2]:
        public.write_bytes(line + b" healthlab-site\n")
    return file


def _load_node_key(file: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_ssh_private_key(_read_private(file), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP384R1
    ):
        raise ConfigurationError(f"{file} is not an ECDSA P-384 node key")
    return key


def node_public_point(path: str | os.PathLike[str]) -> bytes:
    """The node key's public half as the 97-byte point bound on chain."""
    key = _load_node_key(Path(path).expanduser())
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def openssh_public_key(point: bytes) -> bytes:
    """An OpenSSH public key line for a 97-byte P-384 point (as read from chain)."""
    if len(point) != NODE_KEY_BYTES or point[:1] != b"\x04":
        raise InvalidInput(
            f"a node key is a {NODE_KEY_BYTES}-byte uncompressed P-384 point"
        )
    try:
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), point)
    except ValueError:
        raise InvalidInput("the node key is not a point on P-384") from None
    return public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
