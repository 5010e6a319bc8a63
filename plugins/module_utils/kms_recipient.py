"""KMS calls made from inside the enclave, with its attestation document as the Recipient.

The same code runs against AWS KMS (through the vsock-proxy) and against the
local KMS (boto3 with endpoint_url). Each call makes a fresh RSA-2048 key pair,
asks the NSM for an attestation document carrying its public key, and sends that
document as ``Recipient``. KMS answers with ``CiphertextForRecipient``: a BER CMS
EnvelopedData only this key pair can open. ``cryptography``'s PKCS#7 API cannot
read that structure, so asn1crypto parses it and cryptography decrypts it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent.futures import Future

try:
    import cbor2
    from asn1crypto import cms
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, padding, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
except ImportError as exc:  # the modules report it: module_options.require_libraries
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

from .errors import KmsError

KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
_AES_BLOCK = 16


def subject_key_identifier(public_key_der: bytes) -> bytes:
    """How AWS KMS names the recipient in CiphertextForRecipient: the SHA-256 of the key's whole
    SubjectPublicKeyInfo DER (32 bytes; seen in real answers, tests/vectors/aws), not RFC 5280's SHA-1."""
    public_key = serialization.load_der_public_key(public_key_der)
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return digest.finalize()


def _rfc5280_key_identifier(public_key_der: bytes) -> bytes:
    """RFC 5280 4.2.1.2 method 1 (SHA-1 of the key bits): only to explain an envelope that uses it."""
    return x509.SubjectKeyIdentifier.from_public_key(serialization.load_der_public_key(public_key_der)).digest


class KmsCallError(KmsError):
    """A KMS call failed. ``code`` is KMS's error code (e.g. "AccessDeniedException"); ``__cause__`` is
    botocore's original exception, so a caller can still catch or inspect exactly what boto3 raised."""

    def __init__(self, message: str, *, code: str, operation: str):
        super().__init__(message)
        self.code = code
        self.operation = operation


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
        try:
            encrypted_key, iv, ciphertext = _parse_envelope(
                ciphertext_for_recipient, self.key_identifier, _rfc5280_key_identifier(self.public_key_der)
            )
        except KmsError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            # asn1crypto parses lazily: malformed DER/BER surfaces as any of these while reading fields.
            raise KmsError(
                f"KMS's CiphertextForRecipient is not a well-formed CMS EnvelopedData ({err}); "
                "the answer was corrupted or did not come from KMS: retry, and check the KMS endpoint"
            ) from err
        try:
            cek = self._private_key.decrypt(
                encrypted_key, OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
            )
        except ValueError as err:
            raise KmsError(
                "could not decrypt the content key in KMS's CiphertextForRecipient with this enclave's key "
                "(RSAES-OAEP SHA-256 failed): the envelope was tampered with or made for another key; retry the call"
            ) from err
        if len(cek) != 32:
            raise KmsError(
                f"the content key in KMS's CiphertextForRecipient is {len(cek)} bytes, AES-256-CBC needs 32: "
                "the envelope was not made by KMS; check the KMS endpoint"
            )
        decryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).decryptor()
        padded = decryptor.update(ciphertext) + decryptor.finalize()
        unpadder = padding.PKCS7(_AES_BLOCK * 8).unpadder()
        try:
            return unpadder.update(padded) + unpadder.finalize()
        except ValueError as err:
            raise KmsError(
                "KMS's CiphertextForRecipient decrypted to badly padded content: the envelope was tampered with "
                "or corrupted in transit; retry the call"
            ) from err


def _parse_envelope(data: bytes, key_identifier: bytes, sha1_identifier: bytes) -> tuple[bytes, bytes, bytes]:
    """(encrypted content key, IV, encrypted content) of an envelope addressed to key_identifier.

    Only AWS's 32-byte SHA-256 identifier is accepted. The rid is no security check (only our private
    key opens the content key), but accepting RFC 5280's 20-byte SHA-1 form too would let a KMS
    stand-in drift from what AWS sends without any test noticing; sha1_identifier only names that case.
    """

    def refuse(what: str) -> KmsError:
        return KmsError(f"KMS's CiphertextForRecipient {what}; the enclave accepts only what AWS KMS sends: {_SHAPE}")

    info = cms.ContentInfo.load(data, strict=True)
    if info["content_type"].native != "enveloped_data":
        raise refuse(f"has content type {info['content_type'].dotted}, not id-envelopedData")
    enveloped = info["content"]
    if enveloped["version"].native != "v2":
        raise refuse(f"has EnvelopedData version {enveloped['version'].native}, not v2")
    recipients = enveloped["recipient_infos"]
    if len(recipients) != 1 or recipients[0].name != "ktri":
        raise refuse("does not hold exactly one KeyTransRecipientInfo")
    ktri = recipients[0].chosen
    if ktri["version"].native != "v2" or ktri["rid"].name != "subject_key_identifier":
        raise refuse("does not name its recipient by subjectKeyIdentifier (KeyTransRecipientInfo v2)")
    rid = ktri["rid"].chosen.native
    if rid == sha1_identifier:
        raise refuse(
            "names this enclave's key by the 20-byte RFC 5280 SHA-1 identifier; AWS KMS names it by the SHA-256 "
            "of its SubjectPublicKeyInfo (32 bytes)"
        )
    if rid != key_identifier:
        raise KmsError(
            "KMS's CiphertextForRecipient is addressed to another key "
            f"(subjectKeyIdentifier {ktri['rid'].chosen.native.hex()}, this enclave's is {key_identifier.hex()}): "
            "the answer belongs to another request; retry the call"
        )
    key_algorithm = ktri["key_encryption_algorithm"]
    if key_algorithm["algorithm"].native != "rsaes_oaep":
        raise refuse(f"wraps its key with {key_algorithm['algorithm'].dotted}, not RSAES-OAEP")
    oaep = key_algorithm["parameters"]
    mgf = oaep["mask_gen_algorithm"]
    if (
        oaep["hash_algorithm"]["algorithm"].native != "sha256"
        or mgf["algorithm"].native != "mgf1"
        or mgf["parameters"]["algorithm"].native != "sha256"
        or oaep["p_source_algorithm"]["parameters"].native != b""
    ):
        raise refuse("uses RSAES-OAEP parameters other than SHA-256 with MGF1-SHA-256 and an empty label")
    content_info = enveloped["encrypted_content_info"]
    if content_info["content_type"].native != "data":
        raise refuse(f"encrypts content of type {content_info['content_type'].dotted}, not id-data")
    content_algorithm = content_info["content_encryption_algorithm"]
    if content_algorithm["algorithm"].native != "aes256_cbc":
        raise refuse(f"encrypts its content with {content_algorithm['algorithm'].dotted}, not AES-256-CBC")
    iv = content_algorithm["parameters"].native
    if not isinstance(iv, bytes) or len(iv) != _AES_BLOCK:
        raise refuse("does not carry a 16-byte AES-CBC IV")
    ciphertext = content_info["encrypted_content"].native
    if not ciphertext or len(ciphertext) % _AES_BLOCK:
        raise refuse("has no encrypted content, or content that is not whole AES blocks")
    return ktri["encrypted_key"].native, iv, ciphertext


_SHAPE = (
    "EnvelopedData v2, one KeyTransRecipientInfo v2 by subjectKeyIdentifier, RSAES-OAEP SHA-256/MGF1-SHA-256, "
    "AES-256-CBC content; check that the KMS endpoint is AWS KMS or the project's local KMS"
)


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
    kwargs = {"CiphertextBlob": ciphertext_blob}
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
    kwargs = {"KeyId": key_id, "KeySpec": key_spec}
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
