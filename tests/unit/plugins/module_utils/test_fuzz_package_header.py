"""Fuzz target: the package header parser, the first thing a hostile package reaches.

Whatever bytes follow the magic, read_header either returns a header or raises
PackageError: never another exception, never a hang (the run is bounded).
"""

import struct

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import PackageError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_format import MAGIC, read_header

VALID_FIELDS = {
    "format_version": 1,
    "name": "app",
    "version": "1.0",
    "key_id": "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000",
    "encryption_context": {"confidential_ml:package": "app", "confidential_ml:version": "1.0"},
    "wrapped_key": b"\x01" * 40,
    "manifest_digest": b"\x02" * 32,
}
VALID = cbor2.dumps(VALID_FIELDS, canonical=True)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def parse(tmp_path, data: bytes):
    path = tmp_path / "fuzz.pkg"
    path.write_bytes(data)
    try:
        return read_header(path)
    except PackageError:
        return None


def test_the_valid_header_parses(tmp_path):
    header = parse(tmp_path, MAGIC + struct.pack(">I", len(VALID)) + VALID)
    assert header is not None and header.name == "app" and header.manifest_digest == b"\x02" * 32


@FUZZ
@given(body=st.binary(max_size=512), claimed=st.integers(min_value=0, max_value=2**32 - 1))
def test_random_bytes_after_the_magic(tmp_path, body, claimed):
    parse(tmp_path, MAGIC + struct.pack(">I", claimed) + body)


@FUZZ
@given(data=st.data())
def test_mutations_of_a_valid_header(tmp_path, data):
    body = bytearray(VALID)
    for _i in range(data.draw(st.integers(min_value=1, max_value=8))):
        position = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
        body[position] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(body)))
    parse(tmp_path, MAGIC + struct.pack(">I", len(body)) + bytes(body[:cut]))


@FUZZ
@given(
    fields=st.dictionaries(
        st.sampled_from(sorted(VALID_FIELDS)) | st.text(max_size=8),
        st.none()
        | st.booleans()
        | st.integers()
        | st.text(max_size=16)
        | st.binary(max_size=48)
        | st.dictionaries(st.text(max_size=4), st.text(max_size=4) | st.integers(), max_size=3),
        max_size=9,
    )
)
def test_well_formed_cbor_with_wrong_fields(tmp_path, fields):
    body = cbor2.dumps(fields, canonical=True)
    header = parse(tmp_path, MAGIC + struct.pack(">I", len(body)) + body)
    assert header is None or set(fields) == set(VALID_FIELDS)


SIGNED_FIELDS = VALID_FIELDS | {
    "format_version": 2,
    "signer_key_id": "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000002",
    "signer_fingerprint": b"\x03" * 32,
}
SIGNED = cbor2.dumps(SIGNED_FIELDS, canonical=True)


@FUZZ
@given(block=st.binary(max_size=600))
def test_random_signature_blocks_after_a_signed_header(tmp_path, block):
    """Format 2: whatever follows the header as its signature block, read_header refuses it or returns it
    byte for byte, bounded by its length prefix."""
    header = parse(tmp_path, MAGIC + struct.pack(">I", len(SIGNED)) + SIGNED + block)
    if header is not None:
        length = struct.unpack(">H", block[:2])[0]
        assert header.signature == block[2 : 2 + length] and 1 <= length <= 512
        assert header.signer_fingerprint == b"\x03" * 32
