"""`fedvlsm deploy certs`: a development CA, the SuperLink's TLS certificate, one EC key pair per site.

    fedvlsm deploy certs DIR --server-name HOST [--server-name IP ...] [--site NAME ...]

Writes (PEM):

    DIR/ca.crt                 CA certificate: give it to every site and to `flwr` (root-certificates)
    DIR/ca.key                 CA private key: SECRET, stays with whoever signs (offline if possible)
    DIR/server.pem, server.key SuperLink certificate and key (server.key: SECRET, SuperLink host only)
    DIR/sites/NAME.key         a site's authentication key (SECRET, that site only: --auth-key)
    DIR/sites/NAME.pub         its public key: the coordinator registers it (`flwr supernode register`)

The server certificate names every `--server-name` (DNS names or IP
addresses) plus `localhost` and 127.0.0.1 as subject alternative names.
Site keys are NIST P-384 EC keys in OpenSSH format (what Flower's node
authentication reads).
Existing keys are never overwritten: the command refuses and names them.

Development CA only: a consortium in production uses its own PKI; the file
layout above is what the rest of the tooling expects either way.
Only argparse and the CLI's shared argument types at module level (the CLI must build without heavy
imports).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from pathlib import Path

from common.data.cli import path_arg  # the CLI's own argument type: already imported by `fedvlsm`

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CA_DAYS = 3650
SERVER_DAYS = 825


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="deployment helpers (certificates and keys)",
                       description="Deployment helpers for a consortium's SuperLink and hospital sites.")
    dsub = p.add_subparsers(dest="deploy_command", required=True, metavar="DEPLOY_COMMAND")
    c = dsub.add_parser("certs", help="write a development CA, the SuperLink certificate and site key pairs",
                        description=__doc__.split("\n\n")[0] if __doc__ else None,
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("out", type=path_arg, help="output folder (created; existing keys are never overwritten)")
    c.add_argument("--server-name", action="append", default=[], required=True, metavar="HOST",
                   help="DNS name or IP address sites use to reach the SuperLink (repeatable); "
                        "localhost and 127.0.0.1 are always added")
    c.add_argument("--site", action="append", default=[], metavar="NAME",
                   help="a site to make an authentication key pair for (repeatable)")
    c.set_defaults(func=cmd_certs)


def cmd_certs(args: argparse.Namespace) -> int:
    try:
        written = write_certs(Path(args.out), args.server_name, args.site)
    except (FileExistsError, ValueError) as err:
        print(f"fedvlsm deploy certs: {err}", file=sys.stderr)
        return 2
    print(describe(Path(args.out), written))
    return 0


def planned_files(out: Path, sites: list[str]) -> list[Path]:
    files = [out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key"]
    for s in sites:
        files += [out / "sites" / f"{s}.key", out / "sites" / f"{s}.pub"]
    return files


# A DNS name: dot-separated labels of letters, digits and inner hyphens (max 253 characters).
_HOST_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                        r"[A-Za-z0-9])?)*$")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def write_certs(out: Path, server_names: list[str], sites: list[str]) -> list[Path]:
    """Write the CA, server certificate and site key pairs; refuse if any of them exists already."""
    for s in sites:
        if not _SITE_NAME.match(s):
            raise ValueError(f"--site {s!r}: use letters, digits, '.', '_' or '-' (max 64)")
    if len(set(sites)) != len(sites):
        raise ValueError("--site: each site name once")
    for name in server_names:  # before anything is written: a bad name made an unusable certificate
        if not _is_ip(name) and not _HOST_NAME.match(name):
            raise ValueError(f"--server-name {name!r}: a DNS name (e.g. consortium.example.org) or an IP address, "
                             "without port or scheme")
    existing = [p for p in planned_files(out, sites) if p.exists()]
    if existing:
        raise FileExistsError("refusing to overwrite existing key material: "
                              + ", ".join(str(p) for p in existing) + " (move it away or use another folder)")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sites").mkdir(exist_ok=True)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedvlsm development"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedvlsm development CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    names = list(dict.fromkeys([*server_names, "localhost", "127.0.0.1"]))
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    written: list[Path] = []

    def put(path: Path, data: bytes, secret: bool) -> None:
        # O_EXCL: never overwrite, even if something appeared since the check above.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        written.append(path)

    def private_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    put(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    put(out / "ca.key", private_pem(ca_key), secret=True)
    put(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    put(out / "server.key", private_pem(server_key), secret=True)
    for s in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        # OpenSSH encodings: what flower-supernode (load_ssh_private_key) and
        # `flwr supernode register` (load_ssh_public_key) read.
        put(out / "sites" / f"{s}.key", key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.OpenSSH,
                                                          serialization.NoEncryption()), secret=True)
        put(out / "sites" / f"{s}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {s}\n".encode(), secret=False)
    return written


def describe(out: Path, written: list[Path]) -> str:
    """Which file goes where, and which must stay secret."""
    o = out.resolve()
    lines = [f"wrote {len(written)} file(s) under {o}:",
             f"  {o}/ca.crt      public: every site (--root-certificates) and flwr's config.toml (root-certificates)",
             f"  {o}/ca.key      SECRET: signs certificates; keep it off the SuperLink host if you can",
             f"  {o}/server.pem  public: SuperLink --ssl-certfile (with --ssl-ca-certfile ca.crt)",
             f"  {o}/server.key  SECRET: SuperLink host only (--ssl-keyfile)"]
    for p in written:
        if p.parent.name == "sites" and p.suffix == ".key":
            lines.append(f"  {p}  SECRET: site '{p.stem}' only (fedvlsm site start --auth-key)")
        elif p.parent.name == "sites" and p.suffix == ".pub":
            lines.append(f"  {p}  public: the coordinator registers it: flwr supernode register {p} <federation>")
    lines.append("Secret files are written with mode 0600. This is a development CA; use your own PKI in production.")
    return "\n".join(lines)
