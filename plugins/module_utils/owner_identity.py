"""The owner's identity, built into the enclave image: the KMS signing keys whose packages the image runs.

The owner signs each package header with a KMS asymmetric key (ECC_NIST_P384, SIGN_VERIFY, ECDSA_SHA_384;
the private half never leaves KMS). The image carries the public halves in owner_identity.json, so PCR0
measures them, and the enclave checks a package's signature before it asks KMS or the NSM for anything
(docs/PACKAGE_FORMAT.md section 2.1, docs/THREAT_MODEL.md). Several keys may be listed, for rotation.

    {"format": "confidential-ml-nitro/owner-identity/1",
     "signing_keys": [{"key_id": "arn:aws:kms:...:key/...", "public_key": "<base64 DER SubjectPublicKeyInfo>",
                       "fingerprint": "<SHA-256 of that DER, hex>"}, ...]}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
except ImportError as exc:  # the modules report it: module_options.require_libraries
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

from .errors import EnclaveError, KmsError, OwnerIdentityError, PackageError

IDENTITY_FORMAT = "confidential-ml-nitro/owner-identity/1"
IDENTITY_FILE = "owner_identity.json"  # at the collection root inside the image, beside enclave_server/
KEY_SPEC, KEY_USAGE, SIGNING_ALGORITHM = "ECC_NIST_P384", "SIGN_VERIFY", "ECDSA_SHA_384"
MAX_KEYS = 16
MAX_IDENTITY_BYTES = 64 << 10


@dataclass(frozen=True)
class OwnerKey:
    """One signing key of the owner: its KMS ARN and its public key (DER SubjectPublicKeyInfo)."""

    key_id: str
    public_key: bytes

    def __post_init__(self):
        if not isinstance(self.key_id, str) or not self.key_id:
            raise OwnerIdentityError("an owner signing key needs its KMS key ARN")
        try:
            key = serialization.load_der_public_key(self.public_key)
        except (ValueError, TypeError) as exc:
            raise OwnerIdentityError(
                f"the public key of {self.key_id} is not DER SubjectPublicKeyInfo ({exc})"
            ) from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            raise OwnerIdentityError(
                f"the public key of {self.key_id} is not an ECC NIST P-384 key: create the signing key with "
                f"KeySpec {KEY_SPEC} and KeyUsage {KEY_USAGE}"
            )

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the DER public key: what a package header names its signer by."""
        return hashlib.sha256(self.public_key).digest()

    def describe(self) -> str:
        return f"{self.key_id} (public key SHA-256 {self.fingerprint.hex()})"

    def verifies(self, signature: bytes, message: bytes) -> bool:
        key = serialization.load_der_public_key(self.public_key)
        if not isinstance(key, ec.EllipticCurvePublicKey):  # never: __post_init__ took only P-384 keys
            return False
        try:
            key.verify(signature, message, ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_json(self) -> dict:
        return {
            "key_id": self.key_id,
            "public_key": base64.b64encode(self.public_key).decode("ascii"),
            "fingerprint": self.fingerprint.hex(),
        }


@dataclass(frozen=True)
class OwnerIdentity:
    """The signing keys an image accepts packages from (at least one)."""

    keys: tuple[OwnerKey, ...]

    def __post_init__(self):
        if not 1 <= len(self.keys) <= MAX_KEYS:
            raise OwnerIdentityError(f"an owner identity lists 1 to {MAX_KEYS} signing keys, not {len(self.keys)}")
        if len({key.fingerprint for key in self.keys}) != len(self.keys):
            raise OwnerIdentityError("an owner identity lists the same public key twice: list each key once")

    def describe(self) -> str:
        return ", ".join(key.describe() for key in self.keys)

    def dumps(self) -> bytes:
        """Canonical JSON (sorted keys, fixed separators): the same keys give the same bytes, and the same PCR0."""
        data = {"format": IDENTITY_FORMAT, "signing_keys": [key.to_json() for key in self.keys]}
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def loads(cls, data: bytes, *, origin: str = "the owner identity") -> OwnerIdentity:
        def refuse(cause: str) -> OwnerIdentityError:
            return OwnerIdentityError(
                f"{origin} is unusable: {cause}; build the image again with the owner's signing keys"
            )

        if len(data) > MAX_IDENTITY_BYTES:
            raise refuse(f"it is over {MAX_IDENTITY_BYTES} bytes")
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise refuse(f"it is not JSON ({exc})") from None
        if not isinstance(parsed, dict) or parsed.get("format") != IDENTITY_FORMAT:
            raise refuse(f"it is not in the format {IDENTITY_FORMAT}")
        entries = parsed.get("signing_keys")
        if set(parsed) != {"format", "signing_keys"} or not isinstance(entries, list):
            raise refuse("it must hold exactly 'format' and a 'signing_keys' list")
        keys = []
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != {"key_id", "public_key", "fingerprint"}:
                raise refuse(f"signing key entry {entry!r:.200} needs exactly key_id, public_key and fingerprint")
            try:
                public_key = base64.b64decode(entry["public_key"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise refuse(f"the public key of {entry['key_id']!r} is not base64") from None
            key = OwnerKey(entry["key_id"], public_key)
            if entry["fingerprint"] != key.fingerprint.hex():
                raise refuse(f"the fingerprint of {key.key_id} does not match its public key")
            keys.append(key)
        return cls(tuple(keys))

    @classmethod
    def load(cls, path: str | os.PathLike) -> OwnerIdentity:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise OwnerIdentityError(f"cannot read the owner identity {path}: {exc.strerror or exc}") from None
        return cls.loads(data, origin=str(path))

    def check_package(self, header) -> OwnerKey:
        """Refuse a package header this owner did not sign; return the key that signed it.

        Runs on the header alone, before the enclave asks KMS or the NSM for anything: a package the
        owner did not sign never reaches key release. The signature covers header.raw, which is the
        body's associated data, so it binds the wrapped data key and through it the content."""
        where = f"package {header.name!r} {header.version}"
        expected = f"this enclave image runs only packages signed by the owner's key {self.describe()}"
        if header.signature is None:
            raise PackageError(
                f"{where} is not signed (package format {header.format_version}); {expected}. Ask the owner for "
                "a package sealed with their signing key (enclave package seal --signing-key)"
            )
        key = next((k for k in self.keys if k.fingerprint == header.signer_fingerprint), None)
        if key is None:
            raise PackageError(
                f"{where} is signed by {header.signer_key_id} (public key SHA-256 {header.signer_fingerprint.hex()}), "
                f"not by the owner; {expected}. Use the owner's published package, not one sealed elsewhere"
            )
        if not key.verifies(header.signature, header.raw):
            raise PackageError(
                f"{where} claims the owner's key {key.describe()} but its signature does not verify over its "
                f"header: the header was changed after signing or the signature was copied from another package; "
                "obtain a fresh copy from the owner"
            )
        return key


# ---------------------------------------------------------------- KMS


def owner_key_from_kms(kms_client, key_id: str) -> OwnerKey:
    """The public half of a KMS signing key (GetPublicKey), checked to be what packages are signed with."""
    try:
        answer = kms_client.get_public_key(KeyId=key_id)
    except EnclaveError:
        raise
    except Exception as exc:  # botocore's ClientError/BotoCoreError
        raise KmsError(
            f"cannot read the public key of the owner's signing key {key_id!r} (KMS GetPublicKey): {exc}; check "
            "the key id and that these credentials may call kms:GetPublicKey on it"
        ) from exc
    spec, usage = answer.get("KeySpec"), answer.get("KeyUsage")
    if spec != KEY_SPEC or usage != KEY_USAGE or SIGNING_ALGORITHM not in answer.get("SigningAlgorithms", ()):
        raise OwnerIdentityError(
            f"{key_id} is a {spec} key for {usage}; package signing needs KeySpec {KEY_SPEC}, KeyUsage {KEY_USAGE} "
            f"({SIGNING_ALGORITHM}): create such a key (amazon.aws.kms_key key_spec/key_usage)"
        )
    return OwnerKey(answer["KeyId"], answer["PublicKey"])


class KmsSigner:
    """Signs package headers with a KMS key: KMS Sign of the header's SHA-384 (MessageType DIGEST), so a
    header of any size costs one call and the private key never leaves KMS."""

    def __init__(self, kms_client, key_id: str):
        self._kms = kms_client
        self.key = owner_key_from_kms(kms_client, key_id)

    def sign(self, message: bytes) -> bytes:
        try:
            answer = self._kms.sign(
                KeyId=self.key.key_id,
                Message=hashlib.sha384(message).digest(),
                MessageType="DIGEST",
                SigningAlgorithm=SIGNING_ALGORITHM,
            )
        except EnclaveError:
            raise
        except Exception as exc:
            raise KmsError(
                f"cannot sign with the owner's key {self.key.key_id} (KMS Sign): {exc}; check that these "
                "credentials may call kms:Sign on it"
            ) from exc
        signature = answer["Signature"]
        if not self.key.verifies(signature, message):  # never publish a package the enclave would refuse
            raise KmsError(f"KMS Sign with {self.key.key_id} returned a signature its public key does not verify")
        return signature
