"""KMS's CiphertextForRecipient: the CMS envelope AWS KMS answers an attested call with, built
(by the local KMS, enclave_local/kms.py) and opened (in the enclave, enclave_server/kms_recipient.py)
side by side, so the two cannot drift apart unnoticed (tests/unit/test_recipient_cms.py).

A BER CMS EnvelopedData v2, one KeyTransRecipientInfo v2 naming the key by its subjectKeyIdentifier,
the content key wrapped with RSAES-OAEP SHA-256/MGF1-SHA-256, the content AES-256-CBC.
``cryptography``'s PKCS#7 API cannot read that structure, so asn1crypto parses it and cryptography
decrypts it.
"""

from __future__ import annotations

import os

from asn1crypto import algos, cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..plugins.module_utils.errors import KmsError

KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
_AES_BLOCK = 16
_BER_CHUNK = 1024  # encrypted content is sent in chunks of this size, as a streaming CMS encoder does


def subject_key_identifier(public_key_der: bytes) -> bytes:
    """How AWS KMS names the recipient in CiphertextForRecipient: the SHA-256 of the key's whole
    SubjectPublicKeyInfo DER (32 bytes; seen in real answers, tests/vectors/aws), not RFC 5280's SHA-1."""
    public_key = serialization.load_der_public_key(public_key_der)
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return digest.finalize()


def _rfc5280_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """RFC 5280 4.2.1.2 method 1 (SHA-1 of the key bits): only to explain an envelope that uses it."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


def build_envelope(plaintext: bytes, recipient_public_key_der: bytes, *, ber: bool = True) -> bytes:
    """CiphertextForRecipient: plaintext in a CMS EnvelopedData for the RSA key in recipient_public_key_der.

    EnvelopedData v2, one KeyTransRecipientInfo v2 naming the key by its subjectKeyIdentifier, a fresh
    AES-256 content key wrapped with RSAES-OAEP SHA-256/MGF1-SHA-256, content AES-256-CBC (PKCS#7
    padding, IV in the algorithm parameters). With ber=True the outer structures use indefinite
    lengths and the content is chunked, the BER that AWS KMS sends; ber=False gives plain DER.
    """
    public_key = serialization.load_der_public_key(recipient_public_key_der)
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("the recipient's public key is not an RSA key; RSAES_OAEP_SHA_256 needs one")
    cek, iv = os.urandom(32), os.urandom(16)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    content = encryptor.update(padder.update(plaintext) + padder.finalize()) + encryptor.finalize()
    encrypted_key = public_key.encrypt(
        cek, OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    )

    recipient_infos = cms.RecipientInfos(
        [
            cms.RecipientInfo(
                name="ktri",
                value=cms.KeyTransRecipientInfo(
                    {
                        "version": "v2",
                        "rid": cms.RecipientIdentifier(
                            name="subject_key_identifier", value=subject_key_identifier(recipient_public_key_der)
                        ),
                        "key_encryption_algorithm": {
                            "algorithm": "rsaes_oaep",
                            "parameters": {
                                "hash_algorithm": {"algorithm": "sha256"},
                                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
                            },
                        },
                        "encrypted_key": encrypted_key,
                    }
                ),
            )
        ]
    )
    content_algorithm = algos.EncryptionAlgorithm({"algorithm": "aes256_cbc", "parameters": iv})
    if not ber:
        return cms.ContentInfo(
            {
                "content_type": "enveloped_data",
                "content": cms.EnvelopedData(
                    {
                        "version": "v2",
                        "recipient_infos": recipient_infos,
                        "encrypted_content_info": {
                            "content_type": "data",
                            "content_encryption_algorithm": content_algorithm,
                            "encrypted_content": content,
                        },
                    }
                ),
            }
        ).dump()
    # asn1crypto writes DER only; the indefinite-length wrappers AWS uses are framed here by hand
    # (tag, 0x80, contents, end-of-contents), with every inner element still encoded by asn1crypto.
    chunks = [core.OctetString(content[i : i + _BER_CHUNK]).dump() for i in range(0, len(content), _BER_CHUNK)]
    encrypted_content_info = _indefinite(
        0x30,  # SEQUENCE
        cms.ContentType("data").dump(),
        content_algorithm.dump(),
        _indefinite(0xA0, *chunks),  # [0] IMPLICIT OCTET STRING, constructed
    )
    enveloped = _indefinite(0x30, core.Integer(2).dump(), recipient_infos.dump(), encrypted_content_info)
    return _indefinite(0x30, cms.ContentType("enveloped_data").dump(), _indefinite(0xA0, enveloped))


def _indefinite(tag: int, *contents: bytes) -> bytes:
    return bytes((tag, 0x80)) + b"".join(contents) + b"\x00\x00"


def open_envelope(ciphertext_for_recipient: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """The plaintext of a CiphertextForRecipient made for private_key: check every algorithm it names,
    then decrypt and unpad."""
    public_key_der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        encrypted_key, iv, ciphertext = parse_envelope(
            ciphertext_for_recipient,
            subject_key_identifier(public_key_der),
            _rfc5280_key_identifier(private_key.public_key()),
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
        cek = private_key.decrypt(
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


def parse_envelope(data: bytes, key_identifier: bytes, sha1_identifier: bytes) -> tuple[bytes, bytes, bytes]:
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
