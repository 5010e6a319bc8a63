"""Parse and verify Nitro attestation documents.

A document is a COSE_Sign1 (untagged, or under tag 18):

    [protected: bstr({1: -35}), unprotected: {}, payload: bstr, signature: 96 bytes r||s]

signed with ES384 over ["Signature1", protected, b"", payload]. The payload map
(definite-length in older documents, indefinite-length from today's NSM)
holds module_id, digest ("SHA384"), timestamp (ms), pcrs {index: 48 bytes},
certificate (the signing leaf, DER), cabundle [root, ..., last intermediate],
and the optional public_key, user_data and nonce.

Trust comes only from verify_document: the leaf must chain through the
cabundle to a pinned root (AWS Nitro root G1 on `nitro`, the local root on
`local`) at the document's own timestamp, and must have signed the payload.
parse_document checks structure only.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

# cryptography's X.509 modules are imported where a certificate is parsed, not here: they cost a fresh
# process ~45 ms of CPU, which a client skips when its verified-chain cache knows the chain (VerifiedChains).
try:
    import cbor2
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
except ImportError as exc:  # the modules report it: module_options.require_libraries
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

from .errors import AttestationError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.x509 import verification

COSE_SIGN1_TAG = 18
COSE_HEADER_ALG = 1
COSE_ALG_ES384 = -35
PCR_LENGTH = 48
PCR_COUNT = 32
ES384_SIGNATURE_LENGTH = 96
# The NSM answers through a 0x3000-byte buffer; anything far larger is not a document.
MAX_DOCUMENT_SIZE = 64 * 1024
# datetime cannot represent later instants; a larger timestamp is malformed.
MAX_TIMESTAMP_MS = 253402300799999
CLOCK_SKEW = timedelta(seconds=60)

# The AWS Nitro Enclaves root G1, as AWS publishes it. Kept in the source rather than a data
# file because Ansible ships only the .py files of module_utils to a managed node.
AWS_NITRO_ROOT_PEM = b"""\
-----BEGIN CERTIFICATE-----
MIICETCCAZagAwIBAgIRAPkxdWgbkK/hHUbMtOTn+FYwCgYIKoZIzj0EAwMwSTEL
MAkGA1UEBhMCVVMxDzANBgNVBAoMBkFtYXpvbjEMMAoGA1UECwwDQVdTMRswGQYD
VQQDDBJhd3Mubml0cm8tZW5jbGF2ZXMwHhcNMTkxMDI4MTMyODA1WhcNNDkxMDI4
MTQyODA1WjBJMQswCQYDVQQGEwJVUzEPMA0GA1UECgwGQW1hem9uMQwwCgYDVQQL
DANBV1MxGzAZBgNVBAMMEmF3cy5uaXRyby1lbmNsYXZlczB2MBAGByqGSM49AgEG
BSuBBAAiA2IABPwCVOumCMHzaHDimtqQvkY4MpJzbolL//Zy2YlES1BR5TSksfbb
48C8WBoyt7F2Bw7eEtaaP+ohG2bnUs990d0JX28TcPQXCEPZ3BABIeTPYwEoCWZE
h8l5YoQwTcU/9KNCMEAwDwYDVR0TAQH/BAUwAwEB/zAdBgNVHQ4EFgQUkCW1DdkF
R+eWw5b6cp3PmanfS5YwDgYDVR0PAQH/BAQDAgGGMAoGCCqGSM49BAMDA2kAMGYC
MQCjfy+Rocm9Xue4YnwWmNJVA44fA0P5W2OpYow9OYCVRaEevL8uO1XYru5xtMPW
rfMCMQCi85sWBbJwKKXdS6BptQFuZbT73o/gBh1qUxl/nNr12UO8Yfwr6wPLb+6N
IwLz3/Y=
-----END CERTIFICATE-----
"""
# Published by AWS: https://docs.aws.amazon.com/enclaves/latest/user/verify-root.html
AWS_NITRO_ROOT_SHA256 = "641A0321A3E244EFE456463195D606317ED7CDCC3C1756E09893F3C68F79BB5B"

_REQUIRED_CLAIMS = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
_OPTIONAL_CLAIMS = ("public_key", "user_data", "nonce")


@dataclass(frozen=True)
class AttestationDocument:
    """The claims of an attestation document. Trust them only after verify_document."""

    module_id: str
    digest: str
    timestamp: int
    pcrs: dict[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp / 1000, UTC)

    @property
    def debug_mode(self) -> bool:
        """Nitro enclaves started with --debug-mode attest all-zero PCRs."""
        return not any(self.pcrs.get(0, b""))

    def pcr_hex(self, index: int) -> str:
        try:
            return self.pcrs[index].hex()
        except KeyError:
            raise AttestationError(
                f"the document has no PCR{index} (it has {sorted(self.pcrs)}): check the PCR index"
            ) from None

    def to_json(self) -> dict[str, Any]:
        from cryptography import x509

        leaf = x509.load_der_x509_certificate(self.certificate)
        root = x509.load_der_x509_certificate(self.cabundle[0])
        return {
            "module_id": self.module_id,
            "digest": self.digest,
            "timestamp": self.timestamp,
            "time": self.time.isoformat(),
            "debug_mode": self.debug_mode,
            "pcrs": {str(index): value.hex() for index, value in sorted(self.pcrs.items())},
            "public_key": _hex_or_none(self.public_key),
            "user_data": _hex_or_none(self.user_data),
            "nonce": _hex_or_none(self.nonce),
            "certificate": {
                "subject": leaf.subject.rfc4514_string(),
                "issuer": leaf.issuer.rfc4514_string(),
                "serial_number": format(leaf.serial_number, "x"),
                "not_valid_before": leaf.not_valid_before_utc.isoformat(),
                "not_valid_after": leaf.not_valid_after_utc.isoformat(),
                "sha256": leaf.fingerprint(hashes.SHA256()).hex(),
            },
            "root": {"subject": root.subject.rfc4514_string(), "sha256": root.fingerprint(hashes.SHA256()).hex()},
        }


def _hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


@dataclass(frozen=True)
class _Sign1:
    protected: bytes
    header: Mapping[Any, Any]
    payload: bytes
    signature: bytes


def _decode_cbor(data: bytes, what: str) -> Any:
    # Every RFC 8949 encoding of the same value is accepted: definite or indefinite-length maps, arrays
    # and strings (today's NSM writes the payload as an indefinite-length map, older ones a definite
    # one). What the value means is checked field by field afterwards; duplicate keys, nesting beyond
    # the document's own depth and trailing bytes are refused here.
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream, allow_duplicate_keys=False, allow_indefinite=True, max_depth=8).decode()
    # Hostile input makes cbor2 raise many types (CBORDecodeError, OverflowError,
    # ValueError...); callers must only ever see AttestationError.
    except Exception as exc:
        raise AttestationError(f"{what} is not valid CBOR ({exc}): the document is corrupt or truncated") from exc
    if stream.tell() != len(data):
        raise AttestationError(
            f"{what} has {len(data) - stream.tell()} bytes after its CBOR value: the document is corrupt"
        )
    return value


def _split(document: bytes) -> _Sign1:
    if not isinstance(document, bytes | bytearray | memoryview):
        raise AttestationError(
            f"an attestation document is bytes, not {type(document).__name__}: pass the raw document"
        )
    document = bytes(document)
    if not document:
        raise AttestationError("the attestation document is empty: the enclave returned no document")
    if len(document) > MAX_DOCUMENT_SIZE:
        raise AttestationError(
            f"the attestation document is {len(document)} bytes, over {MAX_DOCUMENT_SIZE}: it is not an NSM document"
        )
    outer = _decode_cbor(document, "the attestation document")
    if isinstance(outer, cbor2.CBORTag):
        if outer.tag != COSE_SIGN1_TAG:
            raise AttestationError(
                f"the attestation document carries CBOR tag {outer.tag}; a COSE_Sign1 is untagged or tag 18"
            )
        outer = outer.value
    # cbor2 6 decodes the contents of tags as tuples: accept both.
    if not isinstance(outer, list | tuple) or len(outer) != 4:
        raise AttestationError(
            "the attestation document is not a COSE_Sign1 (a 4-element array): it is not an NSM document"
        )
    protected, unprotected, payload, signature = outer
    if not isinstance(protected, bytes):
        raise AttestationError("the COSE protected header is not a byte string: the document is malformed")
    header = _decode_cbor(protected, "the COSE protected header") if protected else {}
    if not isinstance(header, Mapping):
        raise AttestationError("the COSE protected header is not a map: the document is malformed")
    if not isinstance(unprotected, Mapping):
        raise AttestationError("the COSE unprotected header is not a map: the document is malformed")
    if not isinstance(payload, bytes):
        raise AttestationError("the COSE payload is not a byte string: the document is malformed or detached")
    if not isinstance(signature, bytes):
        raise AttestationError("the COSE signature is not a byte string: the document is malformed")
    return _Sign1(protected, header, payload, signature)


def _certificate_bytes(der: Any, what: str) -> bytes:
    if not isinstance(der, bytes) or not der:
        raise AttestationError(f"{what} is not a non-empty byte string (DER certificate): the document is malformed")
    return der


def _load_certificate(der: Any, what: str) -> x509.Certificate:
    from cryptography import x509

    _certificate_bytes(der, what)
    try:
        cert = x509.load_der_x509_certificate(der)
        # Names and validity decode lazily; touch them now so later use cannot fail.
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        _validity = cert.not_valid_before_utc, cert.not_valid_after_utc
    # Warning: under -W error, cryptography's warnings about malformed fields are raised.
    except (ValueError, TypeError, x509.InvalidVersion, Warning) as exc:
        raise AttestationError(
            f"{what} is not a valid X.509 DER certificate ({exc}): the document is malformed"
        ) from exc
    return cert


def _optional_bytes(claims: Mapping[str, Any], name: str) -> bytes | None:
    value = claims.get(name)
    if value is not None and not isinstance(value, bytes):
        raise AttestationError(f"the document's {name} is {type(value).__name__}, expected bytes or null")
    return value


def _claims(payload: bytes) -> AttestationDocument:
    claims = _decode_cbor(payload, "the attestation payload")
    if not isinstance(claims, Mapping):
        raise AttestationError("the attestation payload is not a map: the document is malformed")
    missing = [name for name in _REQUIRED_CLAIMS if name not in claims]
    if missing:
        raise AttestationError(f"the attestation payload lacks {', '.join(missing)}: it is not an NSM document")
    # Unknown claims are ignored (they are signed, and AWS may add fields later).
    module_id, digest, timestamp = claims["module_id"], claims["digest"], claims["timestamp"]
    if not isinstance(module_id, str) or not module_id:
        raise AttestationError("the document's module_id is not a non-empty string: the document is malformed")
    if digest != "SHA384":
        raise AttestationError(f"the document's digest is {digest!r:.40}; Nitro documents use 'SHA384'")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 < timestamp <= MAX_TIMESTAMP_MS:
        raise AttestationError(f"the document's timestamp {timestamp!r:.40} is not a time in milliseconds")
    pcrs = claims["pcrs"]
    if not isinstance(pcrs, Mapping) or not 0 < len(pcrs) <= PCR_COUNT:
        raise AttestationError(f"the document's pcrs is not a map of 1 to {PCR_COUNT} PCRs: the document is malformed")
    for index, value in pcrs.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < PCR_COUNT:
            raise AttestationError(f"the document has a PCR index {index!r:.40}: indices run from 0 to {PCR_COUNT - 1}")
        if not isinstance(value, bytes) or len(value) != PCR_LENGTH:
            raise AttestationError(f"the document's PCR{index} is not {PCR_LENGTH} bytes (a SHA-384 digest)")
    if 0 not in pcrs:
        raise AttestationError("the document has no PCR0 (the enclave image measurement): it is not an NSM document")
    # Whether the certificates parse is _load_certificates' part: verify_document skips it for a chain its
    # cache knows (the same bytes parsed and verified before).
    _certificate_bytes(claims["certificate"], "the document's certificate")
    cabundle = claims["cabundle"]
    if not isinstance(cabundle, list | tuple) or not cabundle:
        raise AttestationError("the document's cabundle is not a non-empty array: the document is malformed")
    for position, der in enumerate(cabundle):
        _certificate_bytes(der, f"cabundle[{position}]")
    return AttestationDocument(
        module_id=module_id,
        digest=digest,
        timestamp=timestamp,
        pcrs=dict(pcrs),
        certificate=claims["certificate"],
        cabundle=tuple(cabundle),
        public_key=_optional_bytes(claims, "public_key"),
        user_data=_optional_bytes(claims, "user_data"),
        nonce=_optional_bytes(claims, "nonce"),
    )


def _load_certificates(doc: AttestationDocument) -> None:
    _load_certificate(doc.certificate, "the document's certificate")
    for position, der in enumerate(doc.cabundle):
        _load_certificate(der, f"cabundle[{position}]")


def parse_document(document: bytes) -> AttestationDocument:
    """Decode a document's claims, checking every field's type. No signature or trust check."""
    doc = _claims(_split(document).payload)
    _load_certificates(doc)
    return doc


def _leaf_policy() -> verification.ExtensionPolicy:
    from cryptography import x509
    from cryptography.x509 import verification

    # Nitro leaves carry neither SAN nor AKI; everything else keeps the WebPKI
    # end-entity rules (a CA leaf, a wrong EKU or unknown critical extensions fail).
    policy = verification.ExtensionPolicy.webpki_defaults_ee()
    policy = policy.may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
    return policy.may_be_present(x509.AuthorityKeyIdentifier, verification.Criticality.AGNOSTIC, None)


def _describe(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string()} (SHA-256 {cert.fingerprint(hashes.SHA256()).hex()})"


def _verify_chain(doc: AttestationDocument, roots: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The chain from the document's leaf to a trusted root, verified at the document's time."""
    # Certificates compare (and hash) by their DER bytes: cryptography's serialization module, which
    # public_bytes would need, costs a CLI ~5 ms to import.
    from cryptography import x509
    from cryptography.x509 import verification

    trusted = list(dict.fromkeys(roots))
    bundle_root = x509.load_der_x509_certificate(doc.cabundle[0])
    if bundle_root not in trusted:
        raise AttestationError(
            f"the document's root certificate {_describe(bundle_root)} is not a trusted root "
            f"({'; '.join(_describe(r) for r in roots)}): the document was not issued by the pinned "
            "NSM (AWS Nitro, or this host's local CA); pin the root of the backend that produced it"
        )
    leaf = x509.load_der_x509_certificate(doc.certificate)
    intermediates = [x509.load_der_x509_certificate(der) for der in doc.cabundle[1:]]
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(trusted))
        .time(doc.time)
        .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=_leaf_policy())
        .build_client_verifier()
    )
    try:
        chain = verifier.verify(leaf, intermediates).chain
    except (verification.VerificationError, ValueError, TypeError) as exc:
        raise AttestationError(
            f"the signing certificate {leaf.subject.rfc4514_string()} does not chain to the trusted root at the "
            f"document's time {doc.time.isoformat()}: {exc}. The document is forged or its certificates had "
            "expired; ask the enclave for a fresh document"
        ) from exc
    if chain[-1] != bundle_root:
        raise AttestationError(
            f"the chain ends at {_describe(chain[-1])}, not at the document's own root {_describe(bundle_root)}: "
            "the cabundle is inconsistent"
        )
    return chain


def _leaf_key(leaf: x509.Certificate) -> ec.EllipticCurvePublicKey:
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AttestationError(f"the signing certificate's public key is unusable ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationError("the signing certificate does not hold a P-384 key, which ES384 requires")
    return key


def _verify_signature(signed: _Sign1, key: ec.EllipticCurvePublicKey) -> None:
    if len(signed.signature) != ES384_SIGNATURE_LENGTH:
        raise AttestationError(
            f"the signature is {len(signed.signature)} bytes; ES384 signatures are {ES384_SIGNATURE_LENGTH} (r||s)"
        )
    half = ES384_SIGNATURE_LENGTH // 2
    r = int.from_bytes(signed.signature[:half], "big")
    s = int.from_bytes(signed.signature[half:], "big")
    to_be_signed = cbor2.dumps(["Signature1", signed.protected, b"", signed.payload])
    try:
        key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError(
            "the document's signature does not verify with its signing certificate: the document was altered"
        ) from None


def _normalise_pcr(index: int, value: Any) -> bytes:
    if isinstance(value, bytes) and len(value) == PCR_LENGTH:
        return value.hex().encode()
    if isinstance(value, str):
        try:
            digest = bytes.fromhex(value)
        except ValueError:
            digest = b""
        if len(digest) == PCR_LENGTH:
            return digest.hex().encode()  # canonical lowercase, whatever the input's case
    raise AttestationError(
        f"expected PCR{index} {value!r:.120} is not a SHA-384 digest (96 hex digits or 48 bytes): "
        "copy it from the Measurements that nitro-cli build-enclave printed"
    )


_PCR_MISMATCH = {
    0: "the enclave runs a different image than the owner's release",
    1: "the enclave boots a different kernel than the owner's release",
    2: "the enclave runs different application code than the owner's release",
    8: "the enclave image was signed with a different certificate than the owner's",
}


def _pcr_index(key: Any) -> int:
    # YAML and JSON hand over "0" where Python callers write 0.
    if isinstance(key, str) and key.isdecimal():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < PCR_COUNT:
        raise AttestationError(f"expected PCR index {key!r:.40} is not an integer from 0 to {PCR_COUNT - 1}")
    return key


def _check_pcrs(doc: AttestationDocument, expected: Mapping[Any, Any]) -> None:
    for key, wanted in expected.items():
        index = _pcr_index(key)
        candidates = list(wanted) if isinstance(wanted, Iterable) and not isinstance(wanted, str | bytes) else [wanted]
        allowed = [_normalise_pcr(index, value) for value in candidates]
        if not allowed:
            raise AttestationError(f"no expected value given for PCR{index}: give at least one")
        if index not in doc.pcrs:
            raise AttestationError(f"the document has no PCR{index}, but PCR{index} is expected: check the index")
        actual = doc.pcr_hex(index).encode()
        matched = False
        for value in allowed:  # no early exit: compare against every allowed value
            matched |= hmac.compare_digest(actual, value)
        if not matched:
            reason = _PCR_MISMATCH.get(index, "the enclave's measurements differ from the expected ones")
            raise AttestationError(
                f"PCR{index} is {actual.decode()}, expected one of {', '.join(v.decode() for v in allowed)}: {reason}"
            )


def verify_document(
    document: bytes,
    *,
    trusted_roots: Sequence[x509.Certificate] | Callable[[], Sequence[x509.Certificate]],
    expected_pcrs: Mapping[int, str | bytes | Iterable[str | bytes]] | None = None,
    nonce: bytes | None = None,
    max_age_s: float | None = 300,
    allow_debug: bool = False,
    now: datetime | None = None,
    chain_cache: VerifiedChains | None = None,
) -> AttestationDocument:
    """Verify a document end to end and return its claims; raise AttestationError on any doubt.

    expected_pcrs maps a PCR index to one value or several allowed values
    (hex, any case, or 48 raw bytes). max_age_s=None skips the freshness check;
    certificates are always checked at the document's own timestamp. trusted_roots may be a function that
    returns them, called only when the chain must be verified: chain_cache (whose roots_id must identify
    those same roots) may know it already.
    """
    signed = _split(document)
    doc = _claims(signed.payload)
    alg = signed.header.get(COSE_HEADER_ALG)
    if isinstance(alg, bool) or alg != COSE_ALG_ES384:
        raise AttestationError(
            f"the COSE algorithm is {alg!r:.40}, expected {COSE_ALG_ES384} (ES384): it is not an NSM document"
        )
    chain_der = (doc.certificate, *doc.cabundle)
    key = chain_cache.lookup(chain_der, doc.timestamp) if chain_cache else None
    if key is None:
        _load_certificates(doc)
        roots = list(trusted_roots() if callable(trusted_roots) else trusted_roots)
        if not roots:
            raise AttestationError(
                "no trusted roots to verify against: pass aws_nitro_root() on Nitro or the local CA's root on local"
            )
        chain = _verify_chain(doc, roots)
        key = _leaf_key(chain[0])
        if chain_cache:
            chain_cache.remember(chain_der, chain, key)
    _verify_signature(signed, key)
    if doc.debug_mode and not allow_debug:
        raise AttestationError(
            "PCR0 is all zeros: the enclave runs in debug mode, where the host can read its memory and console. "
            "Run it without --debug-mode (allow_debug=True is for development only)"
        )
    if expected_pcrs:
        _check_pcrs(doc, expected_pcrs)
    if nonce is not None and (doc.nonce is None or not hmac.compare_digest(doc.nonce, bytes(nonce))):
        got = "no nonce" if doc.nonce is None else f"nonce {doc.nonce.hex()}"
        raise AttestationError(
            f"the document carries {got}, expected {bytes(nonce).hex()}: it was made for another request (a replay?)"
        )
    if max_age_s is not None:
        current = now or datetime.now(UTC)
        if current.tzinfo is None:
            current = current.replace(tzinfo=UTC)
        age = (current - doc.time).total_seconds()
        if age > max_age_s:
            raise AttestationError(
                f"the document was made at {doc.time.isoformat()}, {age:.0f} s ago, over the {max_age_s:g} s limit: "
                "ask the enclave for a fresh document (or check this host's clock)"
            )
        if -age > CLOCK_SKEW.total_seconds():
            raise AttestationError(
                f"the document's time {doc.time.isoformat()} is {-age:.0f} s in the future: "
                "this host's clock or the enclave's is wrong; fix the clock (NTP) and retry"
            )
    return doc


class VerifiedChains:
    """A client's record of the certificate chains it has verified, so that its next process need not load
    X.509 at all (~45 ms of CPU) to check a document from the same NSM leaf (AWS renews it every ~3 hours).

    An entry is named by the SHA-256 of roots_id (what identifies the pinned roots, e.g. their PEM text) and
    the DER of the document's certificate and cabundle, in order; it holds the span in which every
    certificate of that chain is valid and the leaf's P-384 key, under an HMAC keyed by a secret beside the
    entries. A document whose chain has an entry carries the same bytes verified before against the same
    roots, so only the span is checked, at the document's own time, as the full check would; its COSE
    signature (with the remembered key), nonce, PCRs, age and debug mode are checked as always. The
    directory must be the user's own, mode 0700 (their state, where the local root and KMS credentials are
    kept too). Any doubt (no entry, an altered or truncated one, a span the time is outside, a directory or
    secret others could write, an unreadable file) means a full verification; the cache never fails one."""

    VERSION = b"confidential-ml-nitro verified chain 1\0"  # in every name: a changed check starts afresh
    _SPAN, _POINT, _MAC = 16, 97, 32  # not_before and not_after in ms, the uncompressed P-384 point, HMAC-SHA256

    def __init__(self, directory: os.PathLike | str, roots_id: bytes):
        self.directory = Path(directory)
        self.roots_id = bytes(roots_id)

    def _name(self, chain_der: Sequence[bytes]) -> str:
        digest = hashlib.sha256(self.VERSION + hashlib.sha256(self.roots_id).digest())
        for der in chain_der:
            digest.update(len(der).to_bytes(4, "big") + der)
        return digest.hexdigest()

    @staticmethod
    def _private(path: Path, fd: int | None = None) -> bool:
        """Whether path (or the open fd) is ours and nobody else may read, write or enter it."""
        st = os.fstat(fd) if fd is not None else os.lstat(path)
        return st.st_uid == os.geteuid() and not st.st_mode & 0o077

    def _read(self, name: str, size: int | None = None) -> bytes | None:
        try:
            fd = os.open(self.directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            data = os.read(fd, 4096)
            return data if self._private(self.directory / name, fd) and size in (None, len(data)) else None
        except OSError:
            return None
        finally:
            os.close(fd)

    @staticmethod
    def _mac(secret: bytes, name: str, body: bytes) -> bytes:
        return hmac.new(secret, name.encode() + body, "sha256").digest()

    def lookup(self, chain_der: Sequence[bytes], at_ms: int) -> ec.EllipticCurvePublicKey | None:
        """The leaf's key if this chain was verified before and every certificate is valid at at_ms, else None."""
        try:
            if not self._private(self.directory):
                return None
        except OSError:
            return None
        name = self._name(chain_der)
        secret, entry = self._read("secret", 32), self._read(name, self._SPAN + self._POINT + self._MAC)
        if secret is None or entry is None:
            return None
        body, mac = entry[: -self._MAC], entry[-self._MAC :]
        if not hmac.compare_digest(mac, self._mac(secret, name, body)):
            return None
        not_before, not_after = int.from_bytes(body[:8], "big"), int.from_bytes(body[8:16], "big")
        if not not_before <= at_ms < not_after:
            return None
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), body[self._SPAN :])
        except ValueError:
            return None

    def remember(self, chain_der: Sequence[bytes], chain: Sequence[x509.Certificate], key) -> None:
        """Record a chain verify_document has just verified (chain: as the verifier built it, leaf first)."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        not_before = max(cert.not_valid_before_utc for cert in chain).timestamp()
        not_after = min(cert.not_valid_after_utc for cert in chain).timestamp()
        body = int(not_before * 1000).to_bytes(8, "big") + int(not_after * 1000).to_bytes(8, "big")
        body += key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        name = self._name(chain_der)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self._private(self.directory):
                return
            secret = self._read("secret", 32) or self._new_secret()
            if secret is not None:
                self._write(name, body + self._mac(secret, name, body))
                self._forget_expired()
        except OSError:
            pass  # a cache that cannot be written costs the next process a full verification, nothing more

    def _write(self, name: str, data: bytes, *, replace: bool = True) -> None:
        temp = self.directory / f".{name}.{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if replace:
                os.replace(temp, self.directory / name)
            else:
                os.link(temp, self.directory / name)  # FileExistsError: another process made it first
        finally:
            temp.unlink(missing_ok=True)

    def _new_secret(self) -> bytes | None:
        with contextlib.suppress(FileExistsError):
            self._write("secret", os.urandom(32), replace=False)
        return self._read("secret", 32)

    def _forget_expired(self) -> None:
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        for entry in self.directory.iterdir():
            if len(entry.name) == 64:
                data = self._read(entry.name)
                if data is None or len(data) < self._SPAN or int.from_bytes(data[8:16], "big") <= now_ms:
                    entry.unlink(missing_ok=True)


@lru_cache(maxsize=1)
def aws_nitro_root() -> x509.Certificate:
    """The AWS Nitro Enclaves root G1 shipped with the project, checked against its published fingerprint."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(AWS_NITRO_ROOT_PEM)
    except ValueError as exc:
        raise AttestationError(f"cannot load the shipped AWS Nitro root ({exc}): reinstall the collection") from exc
    fingerprint = cert.fingerprint(hashes.SHA256()).hex().upper()
    if fingerprint != AWS_NITRO_ROOT_SHA256:
        raise AttestationError(
            f"the shipped AWS Nitro root has SHA-256 {fingerprint}, not AWS's {AWS_NITRO_ROOT_SHA256}: "
            "attestation.py was altered; reinstall the collection"
        )
    return cert


def load_trusted_roots(pem_paths: Sequence[str] = (), *, include_aws: bool = True) -> list[x509.Certificate]:
    """The AWS Nitro root (unless include_aws=False) plus every CA certificate in the given PEM files."""
    sources = {}
    for path in pem_paths:
        try:
            sources[str(path)] = Path(path).read_bytes()
        except OSError as exc:
            raise AttestationError(
                f"cannot read a trusted root from {path} ({exc}): give a PEM file holding the root certificate"
            ) from exc
    return roots_from_pem(sources, include_aws=include_aws)


def roots_from_pem(sources: Mapping[str, bytes], *, include_aws: bool = True) -> list[x509.Certificate]:
    """load_trusted_roots of PEM text already read: {where it came from: its bytes}."""
    from cryptography import x509

    roots = [aws_nitro_root()] if include_aws else []
    for path, data in sources.items():
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise AttestationError(
                f"cannot read a trusted root from {path} ({exc}): give a PEM file holding the root certificate"
            ) from exc
        for cert in certs:
            try:
                is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except (x509.ExtensionNotFound, ValueError):
                is_ca = False
            if not is_ca:
                raise AttestationError(
                    f"{path} holds {cert.subject.rfc4514_string()}, which is not a CA certificate: "
                    "give the root certificate of the NSM's chain"
                )
            roots.append(cert)
    return list(dict.fromkeys(roots))  # the first of equal certificates (equal DER) kept
