"""Recipient.unwrap against a real AWS KMS answer and envelopes made by the local KMS's builder."""

import hashlib
import os
import sys
import threading

import pytest
from asn1crypto import algos, cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.confidential_ml.nitro.enclave_server import kms_recipient
from ansible_collections.confidential_ml.nitro.enclave_server.kms_recipient import Recipient
from ansible_collections.confidential_ml.nitro.nitro_api.recipient_cms import build_envelope
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import KmsError
from ansible_collections.confidential_ml.nitro.tests.vectors.shapes import aws_vector, ber_items, ber_shape

# tests/vectors/aws (see its README): a real CiphertextForRecipient and the throwaway key it was made for.
REAL_ENVELOPE = aws_vector("kms-ciphertext-for-recipient.b64")
REAL_KEY = serialization.load_pem_private_key(aws_vector("kms-ciphertext-for-recipient.key.pem"), password=None)
# What the project's CMS code unwraps it to (OAEP and the CBC padding both check out, so it is the data key).
REAL_PLAINTEXT = bytes.fromhex("3be82c440f06cb4d44c4c2ec3bf30d472407d3a9125aa4c1842b98f6bdd26e41")


@pytest.fixture(scope="module")
def recipient():
    return Recipient()


@pytest.fixture(scope="module")
def stranger():
    return Recipient()


def mutated(envelope: bytes, change) -> bytes:
    """The envelope parsed by asn1crypto, changed by change(content_info), re-encoded."""
    info = cms.ContentInfo.load(envelope)
    change(info)
    return info.dump(force=True)


def test_parameter_and_public_key(recipient):
    doc = b"attestation document bytes"
    assert recipient.parameter(doc) == {"AttestationDocument": doc, "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}
    public_key = serialization.load_der_public_key(recipient.public_key_der)
    assert public_key.key_size == 2048
    # AWS names the recipient by the SHA-256 of its SubjectPublicKeyInfo DER (not RFC 5280's SHA-1).
    assert recipient.key_identifier == hashlib.sha256(recipient.public_key_der).digest()
    assert Recipient().public_key_der != recipient.public_key_der  # a new key pair per request


@pytest.mark.parametrize("ber", [True, False], ids=["ber", "der"])
@pytest.mark.parametrize("size", [1, 15, 16, 32, 1023, 1024, 4096])
def test_unwrap_round_trip(recipient, ber, size):
    plaintext = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    envelope = build_envelope(plaintext, recipient.public_key_der, ber=ber)
    assert recipient.unwrap(envelope) == plaintext


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plaintext=st.binary(min_size=1, max_size=4096), ber=st.booleans())
def test_unwrap_any_plaintext(recipient, plaintext, ber):
    assert recipient.unwrap(build_envelope(plaintext, recipient.public_key_der, ber=ber)) == plaintext


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), ber=st.booleans())
@pytest.mark.slow
def test_any_damaged_byte_gives_kms_error_or_bytes(recipient, data, ber):
    """CBC has no integrity (neither has AWS's envelope), so some edits decrypt to other bytes; but no
    edit may escape as anything other than KmsError (an asn1crypto or cryptography exception)."""
    envelope = bytearray(build_envelope(b"p" * 40, recipient.public_key_der, ber=ber))
    position = data.draw(st.integers(0, len(envelope) - 1))
    envelope[position] ^= data.draw(st.integers(1, 255))
    try:
        result = recipient.unwrap(bytes(envelope))
    except KmsError:
        return
    assert isinstance(result, bytes)


def test_ber_envelope_is_indefinite_length_and_chunked(recipient):
    envelope = build_envelope(b"k" * 3000, recipient.public_key_der)
    assert envelope[:2] == b"\x30\x80" and envelope.endswith(b"\x00\x00" * 4)
    content = cms.ContentInfo.load(envelope)["content"]["encrypted_content_info"]["encrypted_content"]
    assert content.method == 1  # constructed: several OCTET STRING chunks, as a streaming encoder sends
    assert len(content.native) == 3008


def test_ber_outer_wrappers_around_primitive_content(recipient):
    """The other shape AWS's SDK accepts: indefinite-length wrappers, content as one primitive [0]."""
    der = build_envelope(b"data key bytes", recipient.public_key_der, ber=False)
    enveloped = cms.ContentInfo.load(der)["content"]
    eci = enveloped["encrypted_content_info"]

    def indefinite(tag: int, *parts: bytes) -> bytes:
        return bytes((tag, 0x80)) + b"".join(parts) + b"\x00\x00"

    ber = indefinite(
        0x30,
        cms.ContentType("enveloped_data").dump(),
        indefinite(
            0xA0,
            indefinite(
                0x30,
                enveloped["version"].dump(),
                enveloped["recipient_infos"].dump(),
                indefinite(
                    0x30,
                    eci["content_type"].dump(),
                    eci["content_encryption_algorithm"].dump(),
                    eci["encrypted_content"].dump(),
                ),
            ),
        ),
    )
    assert ber != der and ber[:2] == b"\x30\x80"
    assert recipient.unwrap(ber) == b"data key bytes"


def test_envelope_for_another_key_is_refused(recipient, stranger):
    envelope = build_envelope(b"secret", stranger.public_key_der)
    with pytest.raises(KmsError, match="addressed to another key"):
        recipient.unwrap(envelope)


def test_envelope_for_another_key_with_our_identifier_is_refused(recipient, stranger):
    """A forged rid naming our key does not help: the content key is wrapped for the other key."""
    envelope = build_envelope(b"secret", stranger.public_key_der, ber=False)

    def forge(info):
        ktri = info["content"]["recipient_infos"][0].chosen
        ktri["rid"] = cms.RecipientIdentifier(name="subject_key_identifier", value=recipient.key_identifier)

    with pytest.raises(KmsError, match="RSAES-OAEP SHA-256 failed"):
        recipient.unwrap(mutated(envelope, forge))


def test_tampered_encrypted_key_is_refused(recipient):
    envelope = build_envelope(b"secret", recipient.public_key_der, ber=False)

    def flip(info):
        ktri = info["content"]["recipient_infos"][0].chosen
        key = bytearray(ktri["encrypted_key"].native)
        key[100] ^= 0x01
        ktri["encrypted_key"] = bytes(key)

    with pytest.raises(KmsError, match="tampered"):
        recipient.unwrap(mutated(envelope, flip))


def test_tampered_padding_is_refused(recipient):
    # 32 bytes of plaintext end in a full block of padding (16 x 0x10). In CBC, flipping the last byte of
    # the previous ciphertext block flips the last plaintext byte: 0x10 ^ 0x10 = 0, an invalid pad length.
    envelope = build_envelope(b"x" * 32, recipient.public_key_der, ber=False)

    def corrupt(info):
        eci = info["content"]["encrypted_content_info"]
        content = bytearray(eci["encrypted_content"].native)
        content[-17] ^= 0x10
        eci["encrypted_content"] = bytes(content)

    with pytest.raises(KmsError, match="padded"):
        recipient.unwrap(mutated(envelope, corrupt))


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x30\x80", b"not a CMS structure at all", b"\x30\x03\x02\x01\x02"],
    ids=["empty", "unterminated", "text", "wrong-structure"],
)
def test_malformed_bytes_are_refused(recipient, garbage):
    with pytest.raises(KmsError, match="CiphertextForRecipient"):
        recipient.unwrap(garbage)


def test_truncated_envelope_is_refused(recipient):
    envelope = build_envelope(b"secret", recipient.public_key_der)
    for cut in (10, len(envelope) // 2, len(envelope) - 3):
        with pytest.raises(KmsError):
            recipient.unwrap(envelope[:cut])


def _set_key_algorithm(name, parameters=None):
    def change(info):
        ktri = info["content"]["recipient_infos"][0].chosen
        ktri["key_encryption_algorithm"] = cms.KeyEncryptionAlgorithm({"algorithm": name, "parameters": parameters})

    return change


def _set_content_algorithm(name):
    def change(info):
        eci = info["content"]["encrypted_content_info"]
        eci["content_encryption_algorithm"] = algos.EncryptionAlgorithm({"algorithm": name, "parameters": b"\0" * 16})

    return change


def _set(path, value):
    def change(info):
        node = info
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value

    return change


def _two_recipients(info):
    infos = info["content"]["recipient_infos"]
    info["content"]["recipient_infos"] = cms.RecipientInfos([infos[0], infos[0]])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(("content_type",), "signed_data"), "not id-envelopedData"),
        (_set(("content", "version"), "v0"), "not v2"),
        (_two_recipients, "exactly one KeyTransRecipientInfo"),
        (_set_key_algorithm("rsaes_pkcs1v15"), "not RSAES-OAEP"),
        (_set_key_algorithm("rsaes_oaep", {"hash_algorithm": {"algorithm": "sha1"}}), "SHA-256 with MGF1-SHA-256"),
        (
            _set_key_algorithm(
                "rsaes_oaep",
                {
                    "hash_algorithm": {"algorithm": "sha256"},
                    "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha1"}},
                },
            ),
            "SHA-256 with MGF1-SHA-256",
        ),
        (_set_content_algorithm("aes128_cbc"), "not AES-256-CBC"),
        (_set(("content", "encrypted_content_info", "content_type"), "signed_data"), "not id-data"),
    ],
    ids=[
        "content-type",
        "enveloped-version",
        "two-recipients",
        "pkcs1v15",
        "oaep-sha1",
        "mgf1-sha1",
        "aes128",
        "inner-content-type",
    ],
)
def test_unexpected_structure_or_algorithm_is_refused(recipient, change, message):
    envelope = build_envelope(b"secret", recipient.public_key_der, ber=False)
    with pytest.raises(KmsError, match=message):
        recipient.unwrap(mutated(envelope, change))


def test_recipient_named_by_issuer_and_serial_is_refused(recipient):
    envelope = build_envelope(b"secret", recipient.public_key_der, ber=False)

    def change(info):
        ktri = info["content"]["recipient_infos"][0].chosen
        ktri["rid"] = cms.RecipientIdentifier(
            name="issuer_and_serial_number",
            value=cms.IssuerAndSerialNumber(
                {"issuer": asn1_x509.Name.build({"common_name": "KMS"}), "serial_number": 1}
            ),
        )

    with pytest.raises(KmsError, match="subjectKeyIdentifier"):
        recipient.unwrap(mutated(envelope, change))


# -- the real AWS KMS answer -------------------------------------------------


@pytest.fixture(scope="module")
def real_recipient():
    return Recipient(REAL_KEY)


def test_real_kms_answer_unwraps(real_recipient):
    assert len(real_recipient.key_identifier) == 32
    assert real_recipient.unwrap(REAL_ENVELOPE) == REAL_PLAINTEXT


def _real_offset(what: str) -> int:
    """Where in the real envelope a field's content starts."""
    items = ber_items(REAL_ENVELOPE)
    contents = {
        "rid": [c for _d, tag, _c, _n, c in items if tag == "CONTEXT 0" and c is not None][0],
        "encrypted_key": [c for _d, tag, _c, n, c in items if tag == "UNIVERSAL 4" and n == 256][0],
        "iv": [c for _d, tag, _c, n, c in items if tag == "UNIVERSAL 4" and n == 16][0],
        "content": [c for _d, tag, _c, n, c in items if tag == "UNIVERSAL 4"][-1],
    }
    return REAL_ENVELOPE.index(contents[what])


@pytest.mark.parametrize(
    ("field", "match"),
    [
        ("rid", "addressed to another key"),
        ("encrypted_key", "RSAES-OAEP SHA-256 failed"),
        ("iv", None),  # CBC: a flipped IV bit flips the same plaintext bit (no integrity, as in AWS's envelope)
        ("content", "padded|tampered"),
    ],
)
def test_real_kms_answer_tampered_is_refused(real_recipient, field, match):
    envelope = bytearray(REAL_ENVELOPE)
    at = _real_offset(field) + (0 if field != "content" else 40)  # content: the last block's previous block
    envelope[at] ^= 0x01 if field != "content" else 0x10
    if match is None:
        assert real_recipient.unwrap(bytes(envelope)) != REAL_PLAINTEXT
        return
    with pytest.raises(KmsError, match=match):
        real_recipient.unwrap(bytes(envelope))


def test_real_kms_answer_for_another_key_is_refused(recipient):
    with pytest.raises(KmsError, match="addressed to another key"):
        recipient.unwrap(REAL_ENVELOPE)


def test_rfc5280_sha1_identifier_is_refused_with_its_reason(recipient):
    """A stand-in that names the key the RFC 5280 way is told apart from an answer for another request."""
    envelope = build_envelope(b"secret", recipient.public_key_der, ber=False)
    sha1 = x509.SubjectKeyIdentifier.from_public_key(serialization.load_der_public_key(recipient.public_key_der))

    def change(info):
        ktri = info["content"]["recipient_infos"][0].chosen
        ktri["rid"] = cms.RecipientIdentifier(name="subject_key_identifier", value=sha1.digest)

    with pytest.raises(KmsError, match="20-byte RFC 5280 SHA-1"):
        recipient.unwrap(mutated(envelope, change))


def test_local_kms_answer_has_the_shape_of_the_real_one():
    """The local KMS's envelope for the same RSA-2048 key and a 32-byte data key is AWS's, TLV by TLV:
    tags, versions, OIDs, algorithm parameters (NULLs included), rid and IV lengths, and which lengths
    are indefinite. Any divergence fails here rather than against AWS."""
    public_der = REAL_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    local = build_envelope(bytes(32), public_der)
    assert ber_shape(local) == ber_shape(REAL_ENVELOPE)
    assert Recipient(REAL_KEY).unwrap(local) == bytes(32)
    # The facts behind the comparison, spelled out:
    real = ber_items(REAL_ENVELOPE)
    assert [length for _d, _t, constructed, length, _c in real if constructed].count(None) == 5
    rid = [(n, c) for _d, tag, _c, n, c in real if tag == "CONTEXT 0" and c is not None][0]
    assert rid == (32, hashlib.sha256(public_der).digest())


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_the_next_key_is_made_at_the_lowest_priority():
    """The key made ahead must not take the CPU from the job that is starting (one vCPU in small enclaves)."""
    made_at = kms_recipient._start(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert made_at == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # the server's own threads keep theirs
