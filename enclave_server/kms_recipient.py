"""KMS calls made from inside the enclave, with its attestation document as the Recipient.

The same code runs against AWS KMS (through the vsock-proxy) and against the
local KMS (boto3 with endpoint_url). Each call makes a fresh RSA-2048 key pair,
asks the NSM for an attestation document carrying its public key, and sends that
document as ``Recipient``. KMS answers with ``CiphertextForRecipient``: a BER CMS
EnvelopedData only this key pair can open (nitro_api/recipient_cms.py opens it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent.futures import Future

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..nitro_api.recipient_cms import KEY_ENCRYPTION_ALGORITHM, open_envelope, subject_key_identifier
from ..plugins.module_utils.errors import KmsCallError, KmsError


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class _KeyAhead:
    """Generates the next single-use RSA key in the background.

    An RSA-2048 key takes 40-90 ms to generate here, the largest part of a job's start;
    keeping one ready takes it off the job's path. Each key still serves one request only."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ready: Future | None = None

    def prepare(self) -> None:
        """Start generating a key now (the enclave server calls this when it starts)."""
        with self._lock:
            if self._ready is None:
                self._ready = _start(_new_key)

    def take(self) -> rsa.RSAPrivateKey:
        with self._lock:
            ready, self._ready = self._ready, _start(_new_key)
        return ready.result() if ready is not None else _new_key()


def _yield_the_cpu() -> None:
    """Run the calling thread at the lowest priority (nice 19; Linux gives each thread its own). The next key
    is made while a job starts and runs, on what may be the enclave's only CPU: at nice 0 it took half of
    that CPU from the job's key release, package open and interpreter start."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _start(fn) -> Future:
    future: Future = Future()

    def work():
        try:
            _yield_the_cpu()
            future.set_result(fn())
        except BaseException as err:  # handed to whoever takes the key
            future.set_exception(err)

    threading.Thread(target=work, name="rsa-key-ahead", daemon=True).start()
    return future


_keys = _KeyAhead()
prepare = _keys.prepare


class Recipient:
    """An ephemeral RSA-2048 key pair that receives one KMS answer (or one job's answers)."""

    def __init__(self, private_key: rsa.RSAPrivateKey | None = None):
        self._private_key = private_key if private_key is not None else _new_key()
        self.public_key_der: bytes = self._private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key_identifier: bytes = subject_key_identifier(self.public_key_der)

    def parameter(self, attestation_document: bytes) -> dict:
        """The ``Recipient`` argument of Decrypt / GenerateDataKey / GenerateRandom."""
        return {"AttestationDocument": attestation_document, "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM}

    def unwrap(self, ciphertext_for_recipient: bytes) -> bytes:
        """Open KMS's CiphertextForRecipient: check every algorithm it names, then decrypt and unpad."""
        return open_envelope(ciphertext_for_recipient, self._private_key)


# ---------------------------------------------------------------- calls


def _image_measurement(attestation_document: bytes) -> str:
    """PCR0 of our own document, for error messages only (the document is ours; nothing is trusted from it)."""
    try:
        sign1 = cbor2.loads(attestation_document)
        if isinstance(sign1, cbor2.CBORTag):
            sign1 = sign1.value
        return cbor2.loads(sign1[2])["pcrs"][0].hex()
    except Exception:  # noqa: BLE001 - a message helper must never hide the real error
        return "(unreadable)"


def _advice(code: str, operation: str, key_id: str | None, pcr0: str) -> str:
    key = f"key {key_id}" if key_id else "the key"
    return {
        "AccessDeniedException": (
            f"KMS refused {operation} on {key} to this enclave: its PCR0 {pcr0} is not allowed by {key}'s policy "
            "(kms:RecipientAttestation:ImageSha384), or the host's principal is not in it; ask the key owner to "
            "allow this image's measurement and this host's role"
        ),
        "NotFoundException": f"KMS does not know {key}: check the key id or alias, the region and the KMS endpoint",
        "InvalidCiphertextException": (
            "KMS could not decrypt the wrapped key: it was corrupted, made under another key, or the encryption "
            "context differs from the one it was sealed with; re-seal the package or pass the right context"
        ),
        "IncorrectKeyException": (f"the wrapped key was not made under {key}: pass the key the package names, or none"),
        "DisabledException": f"{key} is disabled: ask the key owner to enable it",
        "KMSInvalidStateException": f"{key} cannot be used in its current state (pending deletion?): ask its owner",
        "ValidationException": (
            "KMS rejected the request as invalid; if it names the attestation document, KMS does not trust the "
            "document's signer (on the local backend, start the local KMS trusting the simulated NSM's root CA)"
        ),
    }.get(code, f"KMS {operation} failed; fix what KMS reports and retry")


def _call(kms_client, operation: str, recipient: Recipient, document: bytes, key_id: str | None, **kwargs) -> dict:
    from botocore.exceptions import BotoCoreError, ClientError

    method = {"Decrypt": "decrypt", "GenerateDataKey": "generate_data_key", "GenerateRandom": "generate_random"}
    try:
        response = getattr(kms_client, method[operation])(Recipient=recipient.parameter(document), **kwargs)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "Unknown")
        said = err.response.get("Error", {}).get("Message", "")
        advice = _advice(code, operation, key_id, _image_measurement(document))
        raise KmsCallError(f"{advice} (KMS said {code}: {said})", code=code, operation=operation) from err
    except BotoCoreError as err:
        raise KmsCallError(
            f"KMS {operation} did not complete: {err}; check the KMS endpoint (vsock-proxy on the host, or the "
            "local KMS) and the region",
            code=type(err).__name__,
            operation=operation,
        ) from err
    if response.get("Plaintext"):
        # KMS released the secret without encrypting it to our attested key: someone in the path ignored the
        # Recipient. Whatever it is, it is not the KMS the key policy protects; do not use the answer.
        raise KmsError(
            f"KMS answered {operation} with Plaintext instead of CiphertextForRecipient: the endpoint ignored the "
            "attestation (not AWS KMS or the project's local KMS?); check the KMS endpoint"
        )
    wrapped = response.get("CiphertextForRecipient")
    if not wrapped:
        raise KmsError(
            f"KMS answered {operation} without CiphertextForRecipient: the endpoint does not support attested "
            "requests; check the KMS endpoint"
        )
    return {**response, "Plaintext": recipient.unwrap(wrapped)}


def _attested(nsm) -> tuple[Recipient, bytes]:
    recipient = Recipient(_keys.take())
    return recipient, nsm.attest(public_key=recipient.public_key_der)


def decrypt(
    kms_client, nsm, ciphertext_blob: bytes, *, encryption_context: dict | None = None, key_id: str | None = None
) -> bytes:
    """KMS Decrypt, released only to this attested enclave."""
    recipient, document = _attested(nsm)
    kwargs: dict[str, object] = {"CiphertextBlob": ciphertext_blob}
    if encryption_context:
        kwargs["EncryptionContext"] = encryption_context
    if key_id:
        kwargs["KeyId"] = key_id
    return _call(kms_client, "Decrypt", recipient, document, key_id, **kwargs)["Plaintext"]


def generate_data_key(
    kms_client, nsm, key_id: str, *, encryption_context: dict | None = None, key_spec: str = "AES_256"
) -> tuple[bytes, bytes]:
    """KMS GenerateDataKey: (plaintext key, seen only by this enclave; the key wrapped under key_id)."""
    recipient, document = _attested(nsm)
    kwargs: dict[str, object] = {"KeyId": key_id, "KeySpec": key_spec}
    if encryption_context:
        kwargs["EncryptionContext"] = encryption_context
    response = _call(kms_client, "GenerateDataKey", recipient, document, key_id, **kwargs)
    expected = {"AES_256": 32, "AES_128": 16}.get(key_spec)
    if expected is not None and len(response["Plaintext"]) != expected:
        raise KmsError(
            f"KMS returned a {len(response['Plaintext'])}-byte data key for {key_spec}: check the KMS endpoint"
        )
    return response["Plaintext"], response["CiphertextBlob"]


def generate_random(kms_client, nsm, length: int) -> bytes:
    """KMS GenerateRandom, encrypted to this enclave (random bytes nobody on the host has seen)."""
    recipient, document = _attested(nsm)
    plaintext = _call(kms_client, "GenerateRandom", recipient, document, None, NumberOfBytes=length)["Plaintext"]
    if len(plaintext) != length:
        raise KmsError(f"KMS returned {len(plaintext)} random bytes, {length} were asked for: check the KMS endpoint")
    return plaintext
