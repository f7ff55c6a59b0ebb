"""A throwaway PKI for TLS and mTLS tests, made with the openssl command line.

One CA signs a server certificate (control.internal, localhost, 127.0.0.1) and a client certificate
(operator); a second, unrelated CA signs a "stranger" client certificate the first CA does not trust.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}")
    return cert, key


def _issue(directory: Path, name: str, ca: Path, ca_key: Path, extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "pem", "ext"))
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Writes the CAs, certificates and keys into `directory` (which must exist)."""
    ca, ca_key = _ca(directory, "test-ca")
    other_ca, other_ca_key = _ca(directory, "other-ca")
    server_cert, server_key = _issue(
        directory, "control.internal", ca, ca_key,
        "subjectAltName=DNS:control.internal,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    client_cert, client_key = _issue(directory, "operator", ca, ca_key, "extendedKeyUsage=clientAuth\n")
    stranger_cert, stranger_key = _issue(directory, "stranger", other_ca, other_ca_key, "extendedKeyUsage=clientAuth\n")
    return Pki(ca, server_cert, server_key, client_cert, client_key, stranger_cert, stranger_key)
