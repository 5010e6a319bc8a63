"""CiphertextForRecipient built by the local KMS's side and opened by the enclave's side of
nitro_api/recipient_cms.py: what one writes, the other reads, and nothing else."""

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.confidential_ml.nitro.nitro_api.recipient_cms import (
    build_envelope,
    open_envelope,
    parse_envelope,
    subject_key_identifier,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import KmsError

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def der(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plaintext=st.binary(max_size=4000), ber=st.booleans())
def test_what_the_builder_writes_the_opener_reads(plaintext, ber):
    envelope = build_envelope(plaintext, der(KEY), ber=ber)
    assert open_envelope(envelope, KEY) == plaintext


def test_the_envelope_names_its_recipient_by_the_sha256_identifier():
    envelope = build_envelope(b"data key", der(KEY), ber=False)
    identifier = subject_key_identifier(der(KEY))
    assert len(identifier) == 32
    encrypted_key, iv, ciphertext = parse_envelope(envelope, identifier, b"\0" * 20)
    assert len(encrypted_key) == 256 and len(iv) == 16 and len(ciphertext) % 16 == 0


@pytest.mark.parametrize("ber", [True, False])
def test_an_envelope_for_another_key_does_not_open(ber):
    with pytest.raises(KmsError, match="addressed to another key"):
        open_envelope(build_envelope(b"secret", der(OTHER), ber=ber), KEY)


def test_the_builder_refuses_a_key_rsaes_oaep_cannot_use():
    ec_der = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not an RSA key"):
        build_envelope(b"secret", ec_der)
