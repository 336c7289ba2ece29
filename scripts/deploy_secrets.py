"""Generate what a deployment needs and nobody may share: run once, keep out of git.

Writes into `deploy/secrets/` (or `--out`), skipping every file that already exists (a second
run never replaces a key or a token in use):

    server/tls/ca.pem, server.pem, server.key    a CA of its own and a server certificate
                                                 for `server`, `perito-server`,
                                                 `perito-server.perito.svc`, `localhost`,
                                                 127.0.0.1 (clients trust ca.pem)
    server/tenants.yaml                          one tenant, `admin`, its token as a digest
    admin.token                                  that token, mode 0600 (shown nowhere else)
    minio.env, s3.env                            random MinIO root credentials, and the same
                                                 as PERITO_S3_* for server and workers
    k8s.yaml                                     the same as Kubernetes Secrets: perito-tls,
                                                 perito-tenants, perito-s3 (apply it first)

`make deploy-secrets` runs this; `make compose-up` runs it before `docker compose up`.
`server/` is all the server container mounts (compose mounts the folder, so a tenants file
replaced by `perito tenants add NAME --tenants-file deploy/secrets/server/tenants.yaml ...` is
seen within a second).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DNS_NAMES = ("server", "perito-server", "perito-server.perito.svc", "localhost")


def _write(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Write `path` unless it exists; returns whether it was written."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)
    return True


def _tls(folder: Path) -> None:
    """A CA and a server certificate signed by it (ECDSA P-256, two years)."""
    if (folder / "server.pem").exists():
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "perito deployment CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=730))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in DNS_NAMES]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "perito-server")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write(folder / "ca.pem", ca.public_bytes(pem))
    _write(folder / "server.pem", certificate.public_bytes(pem))
    # Readable by the containers' user (10001) through a bind mount; on Kubernetes the
    # Secret volume's mode applies instead.
    _write(
        folder / "server.key",
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o644,
    )


def _secret(name: str, data: dict[str, bytes], kind: str = "Opaque") -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "perito"},
        "type": kind,
        "data": {key: base64.b64encode(value).decode() for key, value in data.items()},
    }


def generate(out: Path) -> list[str]:
    """Everything above, into `out`; returns the names of the files written now."""
    before = {p for p in out.rglob("*")} if out.exists() else set()
    _tls(out / "server" / "tls")
    tenants = out / "server" / "tenants.yaml"
    if not tenants.exists():
        sys.path.insert(0, str(ROOT / "core"))
        from perito_core.access.tenancy import add_tenant

        token = add_tenant(
            tenants,
            "admin",
            roles=["admin"],
            models=["*"],
            read=["s3://inspections/"],
            write=["s3://results/admin/"],
        )
        os.chmod(tenants, 0o644)  # digests only; the server's user reads it
        _write(out / "admin.token", token.encode() + b"\n", 0o600)
    user, password = "perito-" + secrets.token_hex(4), secrets.token_urlsafe(32)
    minio = f"MINIO_ROOT_USER={user}\nMINIO_ROOT_PASSWORD={password}\n"
    if _write(out / "minio.env", minio.encode(), 0o600):
        s3 = f"PERITO_S3_ACCESS_KEY_ID={user}\nPERITO_S3_SECRET_ACCESS_KEY={password}\n"
        (out / "s3.env").unlink(missing_ok=True)
        _write(out / "s3.env", s3.encode(), 0o600)  # read by compose on the host
    env = dict(
        line.split("=", 1) for line in (out / "s3.env").read_text().splitlines() if "=" in line
    )
    manifests = [
        _secret(
            "perito-tls",
            {
                "tls.crt": (out / "server" / "tls" / "server.pem").read_bytes(),
                "tls.key": (out / "server" / "tls" / "server.key").read_bytes(),
                "ca.crt": (out / "server" / "tls" / "ca.pem").read_bytes(),
            },
            "kubernetes.io/tls",
        ),
        _secret("perito-tenants", {"tenants.yaml": tenants.read_bytes()}),
        _secret("perito-s3", {key: value.encode() for key, value in env.items()}),
    ]
    (out / "k8s.yaml").write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    os.chmod(out / "k8s.yaml", 0o600)
    return sorted(str(p.relative_to(out)) for p in set(out.rglob("*")) - before if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "deploy" / "secrets")
    out: Path = parser.parse_args().out
    written = generate(out)
    for name in written:
        print(f"wrote {out / name}")
    if "admin.token" in written:
        print(f"the admin tenant's token is in {out / 'admin.token'} (mode 0600)")
    if not written:
        print(f"{out}: everything exists already; nothing replaced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
