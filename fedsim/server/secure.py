"""Credentials for a secured deployment: a local CA, the SuperLink's TLS certificate, and one
authentication key pair per SuperNode (``fedsim certs DIR``; see ``docs/reliability.md``).

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (10 years), used only to sign the
  SuperLink's certificate; give ``ca.crt`` to every SuperNode and ``flwr`` user
  (``--root-certificates``, ``root-certificates`` in ``config.toml``); keep ``ca.key`` offline;
* ``server.pem`` / ``server.key``: the SuperLink's certificate (1 year), valid for the given host
  names and IP addresses (subject alternative names: a client checks the address it dials);
* ``node<k>`` / ``node<k>.pub``: SuperNode ``k``'s ECDSA P-384 key pair in OpenSSH format (what
  ``ssh-keygen -t ecdsa -b 384`` makes): the public key is registered with
  ``flwr supernode register node<k>.pub``, the private key stays on the node
  (``flower-supernode --auth-supernode-private-key node<k>``).

Private keys are written with mode 0600, certificates and public keys with the umask.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsim.rundir import atomic_write_bytes


@dataclass(frozen=True)
class Credentials:
    """Paths of what :func:`make_credentials` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]

    def node_public_key(self, k: int) -> Path:
        return self.node_keys[k].with_suffix(".pub")


def _write_private(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o600)


def make_credentials(out: str | Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), nodes: int = 3) -> Credentials:
    """Write a CA, a SuperLink certificate for ``hosts`` and ``nodes`` SuperNode key pairs into ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if nodes < 0 or not hosts:
        raise ValueError("make_credentials needs at least one host and nodes >= 0")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    pem = serialization.Encoding.PEM

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim local CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(root / "ca.key", key_pem(ca_key))
    atomic_write_bytes(root / "ca.crt", ca.public_bytes(pem))
    _write_private(root / "server.key", key_pem(server_key))
    atomic_write_bytes(root / "server.pem", server.public_bytes(pem))
    node_keys = []
    for k in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        path = root / f"node{k}"
        _write_private(path, key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        atomic_write_bytes(path.with_suffix(".pub"), pub + f" fedsim-node{k}\n".encode())
        node_keys.append(path)
    return Credentials(root / "ca.crt", root / "server.pem", root / "server.key", tuple(node_keys))
