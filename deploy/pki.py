"""Certificates and keys for a FedDLR deployment, with `cryptography` (a Flower dependency,
so nothing else is needed at the coordinator or at a hospital).

    python deploy/pki.py ca DIR --host coordinator.example.org [--host 10.0.0.5 …]
        DIR/ca.crt, DIR/ca.key          the consortium's certificate authority (10 years)
        DIR/superlink.crt, .key         the SuperLink's TLS certificate, signed by the CA,
                                        valid for every --host (DNS names and IP addresses)
                                        and for localhost/127.0.0.1, which the SuperLink's
                                        own ServerApp process connects to
    python deploy/pki.py supernode-key DIR NAME
        DIR/NAME.key                    the SuperNode's private key (ECDSA P-384, OpenSSH
                                        format, mode 0600): stays at the hospital
        DIR/NAME.pub                    its public key: the coordinator registers it with
                                        `flwr supernode register`

Existing files are never overwritten (pass --force to replace them). Private keys are
written with mode 0600. Hospitals receive only `ca.crt`; `ca.key` stays with whoever
runs the certificate authority.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LOOPBACK = ("localhost", "127.0.0.1")
SERVER_DAYS = 825


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/pki.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("ca", help="certificate authority and SuperLink certificate")
    ca.add_argument("dir", type=Path)
    ca.add_argument("--host", action="append", required=True,
                    help="DNS name or IP address SuperNodes use to reach the SuperLink")
    ca.add_argument("--force", action="store_true")
    key = sub.add_parser("supernode-key", help="a SuperNode's authentication key pair")
    key.add_argument("dir", type=Path)
    key.add_argument("name")
    key.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "ca":
            written = make_ca(args.dir, args.host, force=args.force)
        else:
            written = make_supernode_key(args.dir, args.name, force=args.force)
    except FileExistsError as err:
        print(f"pki: {err} exists; pass --force to replace it", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def make_ca(out: Path, hosts: list[str], *, force: bool = False) -> list[Path]:
    """Write ca.crt/ca.key and superlink.crt/superlink.key (SANs: `hosts`)."""
    paths = [out / n for n in ("ca.crt", "ca.key", "superlink.crt", "superlink.key")]
    _check_new(paths, force)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedDLR consortium"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "FedDLR consortium CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOOPBACK]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(paths[0], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths[1], _pem_key(ca_key), private=True)
    _write(paths[2], cert.public_bytes(serialization.Encoding.PEM))
    _write(paths[3], _pem_key(key), private=True)
    return paths


def make_supernode_key(out: Path, name: str, *, force: bool = False) -> list[Path]:
    """Write NAME.key (OpenSSH private) and NAME.pub (OpenSSH public), ECDSA P-384."""
    if not name or "/" in name or name.startswith("."):
        raise SystemExit(f"pki: bad key name {name!r}")
    paths = [out / f"{name}.key", out / f"{name}.pub"]
    _check_new(paths, force)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(paths[0], private, private=True)
    _write(paths[1], public + f" {name}\n".encode())
    return paths


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _check_new(paths: list[Path], force: bool) -> None:
    for path in paths:
        if path.exists() and not force:
            raise FileExistsError(str(path))


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


if __name__ == "__main__":
    raise SystemExit(main())
