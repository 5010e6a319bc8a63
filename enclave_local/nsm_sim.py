"""A simulated Nitro Secure Module for the local backend.

It issues attestation documents in the exact Nitro format (untagged
COSE_Sign1, ES384, raw r||s signature, the same payload map with the same
keys in the same order, written as an indefinite-length map as today's NSM
writes it; tests compare it with a real document) under a local
P-384 CA shaped like AWS's: a self-signed root, one intermediate persisted
under the state directory, and a short-lived leaf per module. The verifier in
plugins/module_utils/attestation.py checks these documents with the same code
that checks AWS's, pinned to the local root instead of the AWS Nitro root G1.

The simulator is held by the local runtime, never by the enclave process:
the enclave reaches it through the NSM wire protocol (``handle``), just as a
real enclave reaches /dev/nsm.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from ansible_collections.confidential_ml.nitro.nitro_api.nsm_messages import (
    MAX_ATTESTATION_INPUT,
    PCR_COUNT,
    attestation_request,
    check_pcr_index,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils import settings
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import AttestationError, EnclaveError

COSE_ALG_ES384 = -35
PCR_LENGTH = 48
ATTESTED_PCRS = 16  # Nitro documents carry PCRs 0-15
ROOT_LIFETIME = timedelta(days=365 * 30)
INTERMEDIATE_LIFETIME = timedelta(days=365)
INTERMEDIATE_RENEW_BEFORE = timedelta(days=30)
LEAF_LIFETIME = timedelta(hours=3)  # as AWS's leaves
CA_BACKDATE = timedelta(days=1)  # tolerate clocks that lag the CA's host
LEAF_RENEW_BEFORE = timedelta(minutes=10)
RANDOM_CHUNK = 256

# Fixed names, so two local CAs look alike and only their keys tell them apart.
ROOT_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "confidential_ml.nitro"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "local"),
        x509.NameAttribute(NameOID.COMMON_NAME, "local.nitro-enclaves"),
    ]
)
INTERMEDIATE_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "confidential_ml.nitro"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "local"),
        x509.NameAttribute(NameOID.COMMON_NAME, "instance.local.nitro-enclaves"),
    ]
)


def cose_sign1(payload: bytes, key: ec.EllipticCurvePrivateKey, *, protected: Mapping[int, Any] | None = None) -> bytes:
    """Encode an untagged COSE_Sign1 as the NSM does.

    Written with cbor2 + cryptography rather than a COSE library: the framing
    is four CBOR items, and the NSM's exact shape (empty unprotected map, raw
    96-byte r||s) is easier to see here than to coax out of a general library.
    """
    header = cbor2.dumps(dict(protected) if protected is not None else {1: COSE_ALG_ES384})
    to_sign = cbor2.dumps(["Signature1", header, b"", payload])
    r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    size = (key.curve.key_size + 7) // 8
    return cbor2.dumps([header, {}, payload, r.to_bytes(size, "big") + s.to_bytes(size, "big")])


def nsm_payload(claims: Mapping[str, Any]) -> bytes:
    """The payload as today's NSM writes it: an indefinite-length map (0xBF ... 0xFF) of the claims in
    the order given, each value in its shortest definite form (pcrs a definite map in index order,
    cabundle a definite array), as in the real documents of tests/vectors/aws."""
    return b"\xbf" + b"".join(cbor2.dumps(key) + cbor2.dumps(value) for key, value in claims.items()) + b"\xff"


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _issue_root(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(ROOT_NAME)
        .issuer_name(ROOT_NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_ca_usage(), critical=True)
        .sign(key, hashes.SHA384())
    )


def _issue_intermediate(
    key: ec.EllipticCurvePrivateKey, root_key: ec.EllipticCurvePrivateKey, root: x509.Certificate
) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(INTERMEDIATE_NAME)
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(min(now + INTERMEDIATE_LIFETIME, root.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_ca_usage(), critical=True)
        .sign(root_key, hashes.SHA384())
    )


def _write_private(path: Path, data: bytes) -> None:
    # Write then rename, so a crash never leaves half a file behind.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _save_pair(ca_dir: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # The certificate is written last: its presence marks the pair complete.
    _write_private(ca_dir / f"{name}.key", key_pem)
    _write_private(ca_dir / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))


def _load_pair(ca_dir: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    cert_path, key_path = ca_dir / f"{name}.pem", ca_dir / f"{name}.key"
    if not cert_path.exists():
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise AttestationError(
            f"the local CA in {ca_dir} is unreadable ({name}: {exc}): delete {ca_dir} to create a new CA "
            "(then re-seal packages and key policies bound to the old local root)"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise AttestationError(
            f"{key_path} does not match {cert_path}: the local CA in {ca_dir} is inconsistent; delete {ca_dir}"
        )
    return key, cert


class LocalCA:
    """The local root and intermediate that stand in for AWS's Nitro PKI."""

    def __init__(
        self,
        root_key: ec.EllipticCurvePrivateKey,
        root: x509.Certificate,
        intermediate_key: ec.EllipticCurvePrivateKey,
        intermediate: x509.Certificate,
    ):
        self._root_key = root_key
        self._root = root
        self._intermediate_key = intermediate_key
        self._intermediate = intermediate

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str]) -> LocalCA:
        """Load the CA under ``state_dir/ca/``, creating it (or renewing the intermediate) when needed."""
        ca_dir = Path(state_dir) / "ca"
        settings.private_dir(ca_dir)
        with settings.locked(ca_dir / ".lock"):  # concurrent first runs must agree on one root
            root_pair = _load_pair(ca_dir, "root")
            if root_pair is None:
                root_key = _new_key()
                root_pair = root_key, _issue_root(root_key)
                _save_pair(ca_dir, "root", *root_pair)
            root_key, root = root_pair
            inter_pair = _load_pair(ca_dir, "intermediate")
            if inter_pair is None or not _intermediate_usable(inter_pair[1], root):
                inter_key = _new_key()
                inter_pair = inter_key, _issue_intermediate(inter_key, root_key, root)
                _save_pair(ca_dir, "intermediate", *inter_pair)
        return cls(root_key, root, *inter_pair)

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._root

    @property
    def root_pem(self) -> bytes:
        return self._root.public_bytes(serialization.Encoding.PEM)

    @property
    def intermediate_certificate(self) -> x509.Certificate:
        return self._intermediate

    @property
    def cabundle(self) -> list[bytes]:
        """DER certificates from the root to the last intermediate, as in a Nitro document."""
        return [c.public_bytes(serialization.Encoding.DER) for c in (self._root, self._intermediate)]

    def issue_leaf(
        self, module_id: str, *, not_before: datetime | None = None, lifetime: timedelta = LEAF_LIFETIME
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A fresh signing key and certificate for one module; no SAN, like AWS's leaves."""
        key = _new_key()
        start = (not_before or _now()).replace(microsecond=0)
        common_name = f"{module_id}.local"[:64]  # X.509 caps CN at 64 characters
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "confidential_ml.nitro"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "local"),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self._intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=True,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=False,
            )
            .sign(self._intermediate_key, hashes.SHA384())
        )
        return key, cert


def _intermediate_usable(intermediate: x509.Certificate, root: x509.Certificate) -> bool:
    if intermediate.issuer != root.subject:
        return False
    try:
        intermediate.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):  # issued by an older root
        return False
    return intermediate.not_valid_after_utc - _now() > INTERMEDIATE_RENEW_BEFORE


def random_module_id() -> str:
    """An id shaped like AWS's: i-<17 hex>-enc<16 hex>."""
    return f"i-{secrets.token_hex(9)[:17]}-enc{secrets.token_hex(8)}"


class SimulatedNsm:
    """Same duck type as NsmDevice: attest, describe_pcr, get_random (plus the wire protocol in handle)."""

    def __init__(
        self,
        ca: LocalCA,
        pcrs: Mapping[int, bytes],
        *,
        module_id: str | None = None,
        debug: bool = False,
    ):
        self.ca = ca
        self.module_id = module_id or random_module_id()
        self.debug = debug
        self._pcrs = [bytes(PCR_LENGTH)] * PCR_COUNT
        for index, value in pcrs.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < ATTESTED_PCRS:
                raise AttestationError(f"PCR index {index!r} cannot be set at launch: use 0 to {ATTESTED_PCRS - 1}")
            if not isinstance(value, bytes) or len(value) != PCR_LENGTH:
                raise AttestationError(
                    f"PCR{index} must be {PCR_LENGTH} raw bytes (a SHA-384 digest), got {value!r:.60}"
                )
            if not debug:  # debug-mode enclaves attest all-zero PCRs
                self._pcrs[index] = value
        self._lock = threading.Lock()
        self._leaf: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None

    def _signing_leaf(self, now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        with self._lock:
            if self._leaf is None or self._leaf[1].not_valid_after_utc - now < LEAF_RENEW_BEFORE:
                # Valid from the document's own time: a leaf dated by the clock after the timestamp was
                # taken could start a second later than the document it signs.
                self._leaf = self.ca.issue_leaf(self.module_id, not_before=now)
            return self._leaf

    def attest(
        self, *, user_data: bytes | None = None, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        fields = attestation_request(user_data=user_data, nonce=nonce, public_key=public_key)["Attestation"]
        timestamp_ms = time.time_ns() // 1_000_000
        key, cert = self._signing_leaf(datetime.fromtimestamp(timestamp_ms / 1000, UTC))
        payload = {
            "module_id": self.module_id,
            "digest": "SHA384",
            "timestamp": timestamp_ms,
            "pcrs": {index: self._pcrs[index] for index in range(ATTESTED_PCRS)},
            "certificate": cert.public_bytes(serialization.Encoding.DER),
            "cabundle": self.ca.cabundle,
            "public_key": fields["public_key"],
            "user_data": fields["user_data"],
            "nonce": fields["nonce"],
        }
        return cose_sign1(nsm_payload(payload), key)

    def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        index = check_pcr_index(index)
        # PCRs 0-15 are locked at launch; 16-31 stay extendable, as on Nitro.
        return index < ATTESTED_PCRS, self._pcrs[index]

    def get_random(self, length: int = 32) -> bytes:
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise EnclaveError(f"random length must be a non-negative int, not {length!r}")
        return os.urandom(length)

    def handle(self, request: bytes) -> bytes:
        """Answer one raw NSM request (CBOR) with a raw NSM response (CBOR), as /dev/nsm does."""
        return cbor2.dumps(self._answer(request))

    def _answer(self, raw: bytes) -> Any:
        try:
            request = cbor2.loads(raw)
        except Exception:  # cbor2 raises several types on hostile input
            return {"Error": "InvalidArgument"}
        if request == "GetRandom":
            return {"GetRandom": {"random": os.urandom(RANDOM_CHUNK)}}
        if not isinstance(request, Mapping) or len(request) != 1:
            return {"Error": "InvalidOperation"}
        ((operation, body),) = request.items()
        if operation == "DescribePCR" and isinstance(body, Mapping):
            index = body.get("index")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < PCR_COUNT:
                return {"Error": "InvalidIndex"}
            lock, data = self.describe_pcr(index)
            return {"DescribePCR": {"lock": lock, "data": data}}
        if operation == "Attestation" and isinstance(body, Mapping):
            values = {name: body.get(name) for name in ("user_data", "nonce", "public_key")}
            if any(v is not None and not isinstance(v, bytes) for v in values.values()):
                return {"Error": "InvalidArgument"}
            if any(v is not None and len(v) > MAX_ATTESTATION_INPUT for v in values.values()):
                return {"Error": "InputTooLarge"}
            return {"Attestation": {"document": self.attest(**values)}}
        return {"Error": "InvalidOperation"}
