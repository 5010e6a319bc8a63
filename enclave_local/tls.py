"""The local cloud's TLS: a local CA, and the certificate the local KMS serves as kms.<region>.amazonaws.com.

In the enclave, boto3 calls KMS at its own https://kms.<region>.amazonaws.com, checking the
certificate chain and the hostname, on both backends (enclave_server/kms_forwarder.py). On
Nitro, KMS presents a certificate from a public root that the image's certifi bundle holds.
Here the local KMS presents one issued by this CA, for every KMS hostname boto3 builds (and
localhost, for an enclave run without isolation), and trusting this CA is the one thing a
local enclave gets that the EIF does not: the local runtime points AWS_CA_BUNDLE at it in the
local enclave's environment only, and the bundle holds this CA alone, so a local enclave
trusts no public root either.

It is its own CA, not the local attestation CA (nsm_sim.LocalCA): that root vouches for
enclaves to KMS, this one for KMS to enclaves, and neither role should carry the other.
Files, under state_home()/tls/ (directory 0700, keys 0600): ca.pem, ca.key, and the leaf
kms.pem, kms.key, issued afresh whenever the local cloud starts.
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..nitro_api.kms_route import kms_hostnames
from ..plugins.module_utils import settings
from ..plugins.module_utils.errors import TlsError

TLS_DIR = "tls"
CA_DAYS = 3650
LEAF_DAYS = 30


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "confidential-ml-nitro local cloud"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])  # fmt: skip


class LocalTlsCA:
    """The CA that signs the local KMS's TLS certificate."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate):
        self.directory = directory
        self._key = key
        self.certificate = certificate

    @property
    def bundle_path(self) -> Path:
        """The CA bundle a local enclave's AWS_CA_BUNDLE names (a copy of it inside the enclave)."""
        return self.directory / "ca.pem"

    @classmethod
    def load_or_create(cls, home: str | os.PathLike) -> LocalTlsCA:
        directory = settings.private_dir(Path(home) / TLS_DIR)
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        with settings.locked(directory / ".lock"):
            if cert_path.exists():
                try:
                    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
                    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                except (OSError, ValueError) as err:
                    raise TlsError(
                        f"the local TLS CA in {directory} is unreadable ({err}): delete {directory}"
                    ) from None
                if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
                    raise TlsError(f"{key_path} does not match {cert_path}: delete {directory} for a new local TLS CA")
                return cls(directory, key, certificate)
            key = ec.generate_private_key(ec.SECP384R1())
            now = datetime.datetime.now(datetime.UTC)
            name = _name("local KMS TLS root")
            certificate = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA384())
            )
            _write_private(key_path, _key_pem(key))  # the certificate last: it marks the pair complete
            _write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
            return cls(directory, key, certificate)

    def issue_server(self, names: list[str]) -> tuple[Path, Path]:
        """A server certificate for names, written as kms.pem and kms.key; their paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA384())
        )
        cert_path, key_path = self.directory / "kms.pem", self.directory / "kms.key"
        _write_private(key_path, _key_pem(key))
        _write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path


def kms_server_context(home: str | os.PathLike) -> tuple[ssl.SSLContext, Path]:
    """The local KMS's TLS server context (a fresh leaf for every KMS hostname and localhost),
    and the CA bundle that verifies it."""
    ca = LocalTlsCA.load_or_create(home)
    cert_path, key_path = ca.issue_server([*kms_hostnames(), "localhost"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return context, ca.bundle_path
