"""The attestation verifier, against documents from the simulated NSM and one real AWS document."""

from __future__ import annotations

import base64
import os
import stat
import time
import zlib
from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.confidential_ml.nitro.enclave_local import nsm_sim
from ansible_collections.confidential_ml.nitro.enclave_local.nsm_sim import LocalCA, SimulatedNsm, cose_sign1
from ansible_collections.confidential_ml.nitro.plugins.module_utils.attestation import (
    AttestationDocument,
    aws_nitro_root,
    load_trusted_roots,
    parse_document,
    verify_document,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import AttestationError
from ansible_collections.confidential_ml.nitro.tests.vectors.shapes import aws_vector, cbor_item

PCR0 = bytes.fromhex("a1" * 48)
PCR1 = bytes.fromhex("b2" * 48)
PCR2 = bytes.fromhex("c3" * 48)
PCR8 = bytes.fromhex("d4" * 48)

# A document from a real Nitro Enclave (us-east-1, 2024-09-07), published as
# test data by blocky/nitrite (testdata/nitro_attestation.b64); zlib + base64
# here because its public_key, user_data and nonce are 1024 bytes of 0x01 each.
REAL_AWS_DOCUMENT = zlib.decompress(
    base64.b64decode(
        """
eNrtlglQE2kWx5NOCPctKCKgg4MumPB1LhIHQREB5RAFNPGKSacD0SQgSTg8SqKAMjM6oAOeKJBRRkcF8UDEi0Fh8QABYWUG5RBk
BkbWFZzVBWU74KosOLup2tmaKnlV3V3vq+/19/V7v//rL9E7G8/6JItrp3tMLI0UKiUoTyyMmyYmAz6VijIQhohKF1KpsBudjMoQ
ALNhBEEFdCqLzQY0kUgoDkflClGI3xwaiy5WiKWYx5dG2eJw+LTbXYu4wigkWp6P44AOZ5+bCTmr+4gLLEK9npY/glWf3crbM7Wh
JymWs2+a6Fn9UrOc9ccWPPo6sy5o4+Gf1uA5gDA3f8mdxKSbcakP7tN8pXE+Bk+cs/mhO4OcrjRRxzuJBUvrHX9K4Hmu5vqcuZ9f
dhzigLrGy50G6oMJrplhlTWdskDFL7/w9F7PvqG33YldoU/yEqWRsgTq1qDWhGVgalHhCgIH4LQ0IgfMi5JuENj7TFZTW3yPPMjH
5c//+yzf2scOawk1pLTF95rWLIhbU12Ch4rC4vdnVqz11tF+FZL2Ibrah+hpH6KvfYiB9iGG2ocYaR9irH2IifYhptqHrEXQaIVY
JEb4CpQLbQZboA3Yhc8iQHgIMtMoyysl1VMzU9SI0oABSc852a9yFpFAAKqdsCHQJxHCiCRLKCwEtgTmGkfPyGApXx4hloUrImWw
GTDRDOoa6YagfIVCgsKmwFgzYmBEmiPlr8emGGFvxQYMjQhzlobAbOCm8QhGYJTGQFHKyShfriDDFH6snCITK6IjNc1Cwo9B5cB+
vDGVDrAXwHSaG4257K3rhrnsZUC1+/fYsAdwH9ow47/sZMM/AsQAM5LuYFIhPEnHRUXEfUIQ4IiTXIv+Yr9q4fnyVFEuGnlsdkf6
gE2XYXf5+b82dB52THj0WjC9eO+cmpjcle66nOmSRukGhHLob+Yn0Mk2+SUH6CIfXlfvgq2+x+r0y3WyLQRzHZZmF3/z6nr8Hl/m
mU3RSaVqO2ALjLCd21ni8QNECOCAocYzJRIJEOna+5UmROAACsG4I3XWL2/Wx5VZ7ZilutGP+E2qrS9YVSUlMs6wy6sq8/KVd9vu
CNsf586X1LC3Msv6IRBy+osfq222vjpSfbEkNyn0XkvQZG5PcSkrlNWysbTwUdF1Sv7e7+wmQo2G2eMOZ9/MiUD4AqVMKEETuZAV
xqE52ILPGGLRHPcSVkbYpua12PncPtvW8WLJMBjnDy/tf6iZLbAZqpnF6BhhFQNUFkyjsgADw4g+5NIH3f/lUh+ofT8U2nVUr6Qn
Iqp1/w+pV3xY1F1yWYr/wK/RDSne/sGL2unfnP71x0fXLnEmUgtPx+iaPLSo3+/ZOcVW1LG4alP1A31epGVU73i9uQ2NZvgpbVUI
frq+yHtbRbwgEQTe8OxVe4HZwPRt7XUAAXsAO82ACdGaOC7103PGDTq+HRmlGf+Izqzad6zJP2NQFnammvkYIPjkYYCIcUCEAaLe
7JqWXXF5VccFwUbrvTVhhJ0OhLkvlyPHBF/OYiekz8u2v3SV8lnY/VPd686W1p/swUJyeg5Y6xRETT/ywD9LfA4vQ8/2PfyqmWS3
JsRm88EfnjfMvcTvd+ki3Irs3uEI9TT9yoVKMS6uYte8f3FxP4b4Yo7niZUnXzuX7XkF+/2OXAz2EzrWXqgMxpv2QqXDjEEXCLVa
ignoQ0uRUYTKQgQCPh8FLMCmC3+7yX0AGbTXpNElI1iS93rJs19OVpxR5Kbjd2XuZUutcxKcK0/z8otv7GvZEb4471yVmvGMEyWf
FyZzOhquCswKIF78cbPRV7Wz/dkvQkgrAguLKvJk1yhHBcWeio1bYj2lbXnrL2WqVXVAVQMs3kKjB0jYA6sAcNCMORInAOuE0cl5
B9ZU2Qq40juxZZt3sUWiC2v8QOFjuxFgSTS+AxEFCOBn8bJWJi+PUCiiZrq6YtkgD88GGYmWUOQ0Cn8ww5psIZFSV2zQlS+gs5kA
QchuQiaNTKcKhGQ2yhaRGWwaDcs2003EolOwiSP7HOBYc05sywokILz0e7dSzT5f1zdjWs3PphNaY557TGme3fRN30CQrFXHvfr1
t39+SKBTMYprDgXbzLzwqqk95k9VurELUdB03ia9OwnX2GoTYFNQFr/tAGxCWu1z6mrdfNjJz1bGJUwAWwjjMIoPvKU4Lyh99YuA
vomSlb5wKD17GMX/H7Te/T8xpGHaG8BhGmAOukCVAruDmUOvpjFZfBafyaYJhVRstohJ0RRA8psL/Ns2R3zFsG984+gZQUvnjPwp
f0gGBcrK7WaLz966FNzq/v2XjuK1ATsfN+eVvDJa1Pos2XLRwzhHcgS1adGnlXscbi9UmaRMKox87KAz38TLzqlDt+tI70Ha+Vtm
nQV1+WZhV1d2XtxU5tAu961xrsB9u/HJJsb2KrWqE6g6RpEBfpgMRuX8nQwcT+2xVqqKrMJV+52UuFPiK1w5eYQMVAlDOogHsUCZ
Jc9alxz5RgcYtuS3eSaPVIVGEe/VYYQ26GyELxK6CclMJhMm04V0lMxHNDcag8riIwATi2iENsJxQAiBCPcZqSGw10LngtgpX4Q9
/ZZnfd1y0tdx+x/vIu+tu8u0CU90sbpS0O/jv8LWctapIyIITB0wUjfktB8K3VdbWtRWdrImCS+obddPKl9oVZKyieFwW+/hjraX
+Fy5ocs0dYlsOhe6jsni2rsGb4W7K65OMxMtm5xkRbL/1J5nKjnq3z38JPoHAvOdiDDdvDuEst64f7xT8weU9EWqJFTu8bo7MoO4
at+GaHfC4ZTmzr7d9yjtu8wfCC+nWnDYiI50c5J8QeyS/gAl/CTmpyAPbofSFyLsjjqXmFH3sm1ium1368Pbm5eFTfA8uCuYtfWk
h330lUstEzy2z7RVi4BwFB3hhusAIr4nm+93BECXadZJG8yskmbuZQYqt98ZGCa7UXU1yjnl0eSyPN7JZI/ISkHWxjIpufnQvpTc
77burM11XRBgfKp+Qn5JoME667rMgm2psXi9+VjIgIsJkfy53bSKwP7zEaYxdQqln+nu2NLj6rxXzF4k6uv40znJT5IVvFu9T2d7
OP5ctyZKKZCIEd5aNJ5LxOHHbMzG7KM1sVKORvOEfAV/rBmM2Zh91IbKImUIOtYIxmzMPmrjrF62ZV2hR+iFwvKY877Nnje5xjZ2
PVJZcGON8U583PHaq35p1717+7bZFvGKT3Q971gl82It1hXNnBI3w1yxym05/YHJpPXTJ65ptHgZXhRcrVOU2QxKSAX3KOlpfea7
HfuN/wmBFg2U
"""
    )
)
REAL_AWS_TIME = datetime(2024, 9, 7, 14, 37, 39, 545000, tzinfo=UTC)
REAL_AWS_PCR0 = "e72a46ca80a260fb044a125442f0c7e331813bcbaf9724d9f3857758992766f2d65710a27aa94ae3949dd54e7c9fe86a"
# tests/vectors/aws/nsm-attestation-2024.b64 (see its README): a definite-length payload map (0xA9).
REAL_2024_DOCUMENT = aws_vector("nsm-attestation-2024.b64")
REAL_2024_TIME = datetime(2024, 7, 16, 19, 53, 7, 239000, tzinfo=UTC)
NSM_KEYS = ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key", "user_data", "nonce"]


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return LocalCA.load_or_create(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    return LocalCA.load_or_create(tmp_path_factory.mktemp("other-state"))


@pytest.fixture(scope="module")
def nsm(ca):
    return SimulatedNsm(ca, {0: PCR0, 1: PCR1, 2: PCR2, 8: PCR8}, module_id="i-0123456789abcdef0-enc0123456789abcdef")


@pytest.fixture(scope="module")
def roots(ca):
    return [ca.root_certificate]


def build(ca, *, leaf=None, protected=None, cabundle=None, timestamp=None, **overrides):
    """A document signed by a fresh (or the given) leaf of ``ca``, with any payload field overridden."""
    key, cert = leaf or ca.issue_leaf("i-test-enc")
    payload = {
        "module_id": "i-test-enc",
        "digest": "SHA384",
        "timestamp": timestamp if timestamp is not None else int(datetime.now(UTC).timestamp() * 1000),
        "pcrs": {i: (PCR0 if i == 0 else bytes(48)) for i in range(16)},
        "certificate": cert.public_bytes(serialization.Encoding.DER),
        "cabundle": ca.cabundle if cabundle is None else cabundle,
        "public_key": None,
        "user_data": None,
        "nonce": None,
    }
    payload.update(overrides)
    payload = {k: v for k, v in payload.items() if v is not _DROP}
    return cose_sign1(cbor2.dumps(payload), key, protected=protected)


_DROP = object()


def parts(document):
    protected, unprotected, payload, signature = cbor2.loads(document)
    return protected, payload, signature


def flip(document, offset, bit=0):
    data = bytearray(document)
    data[offset] ^= 1 << bit
    return bytes(data)


def fails(document, match, **kwargs):
    kwargs.setdefault("max_age_s", None)
    with pytest.raises(AttestationError, match=match):
        verify_document(document, **kwargs)


# -- the good path -----------------------------------------------------------


def test_simulated_document_verifies_and_yields_its_claims(nsm, roots):
    public_key = b"-----BEGIN PUBLIC KEY----- enclave key"
    document = nsm.attest(user_data=b"job-42", nonce=b"n" * 32, public_key=public_key)

    doc = verify_document(document, trusted_roots=roots, expected_pcrs={0: PCR0.hex(), 8: PCR8}, nonce=b"n" * 32)

    assert doc.module_id == "i-0123456789abcdef0-enc0123456789abcdef"
    assert doc.digest == "SHA384"
    assert (doc.pcrs[0], doc.pcrs[1], doc.pcrs[2], doc.pcrs[8]) == (PCR0, PCR1, PCR2, PCR8)
    assert sorted(doc.pcrs) == list(range(16))
    assert all(doc.pcrs[i] == bytes(48) for i in (3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15))
    assert (doc.user_data, doc.nonce, doc.public_key) == (b"job-42", b"n" * 32, public_key)
    assert abs(doc.time - datetime.now(UTC)) < timedelta(minutes=5)
    assert doc.pcr_hex(0) == PCR0.hex()


def test_document_shape_is_exactly_nitro(nsm):
    document = nsm.attest()
    outer = cbor2.loads(document)
    assert isinstance(outer, list) and len(outer) == 4  # untagged COSE_Sign1
    protected, unprotected, payload, signature = outer
    assert cbor2.loads(protected) == {1: -35}
    assert unprotected == {}
    assert len(signature) == 96
    claims = cbor2.loads(payload)
    assert list(claims) == [
        "module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key", "user_data", "nonce",
    ]  # fmt: skip
    assert claims["public_key"] is claims["user_data"] is claims["nonce"] is None
    leaf = x509.load_der_x509_certificate(claims["certificate"])
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(hours=3)
    bundle = [x509.load_der_x509_certificate(der) for der in claims["cabundle"]]
    assert bundle[0].subject == bundle[0].issuer  # root first, self-signed
    assert leaf.issuer == bundle[-1].subject  # last intermediate issued the leaf


def test_parse_document_reads_claims_without_trust(nsm):
    doc = parse_document(nsm.attest(nonce=b"abc"))
    assert isinstance(doc, AttestationDocument)
    assert doc.nonce == b"abc" and doc.pcrs[1] == PCR1
    view = doc.to_json()
    assert view["pcrs"]["0"] == PCR0.hex() and view["nonce"] == b"abc".hex() and view["user_data"] is None
    assert view["debug_mode"] is False
    assert view["root"]["subject"] == "CN=local.nitro-enclaves,OU=local,O=confidential_ml.nitro,C=US"
    assert (
        view["certificate"]["sha256"]
        == x509.load_der_x509_certificate(doc.certificate).fingerprint(hashes.SHA256()).hex()
    )


def test_expected_pcrs_accept_any_case_raw_bytes_and_alternatives(nsm, roots):
    document = nsm.attest()
    for expected in (PCR0.hex().upper(), PCR0, ["00" * 48, PCR0.hex()]):
        verify_document(document, trusted_roots=roots, expected_pcrs={0: expected, 1: PCR1})
    # Keys as YAML/JSON deliver them:
    verify_document(document, trusted_roots=roots, expected_pcrs={"0": PCR0.hex(), "2": PCR2.hex()})
    fails(document, "PCR index 'PCR0'", trusted_roots=roots, expected_pcrs={"PCR0": PCR0.hex()})
    fails(document, "PCR index 32", trusted_roots=roots, expected_pcrs={32: PCR0.hex()})


def test_tag_18_wrapped_document_is_accepted(nsm, roots):
    document = nsm.attest(nonce=b"x")
    tagged = cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(document)))
    assert verify_document(tagged, trusted_roots=roots, nonce=b"x").pcrs[0] == PCR0
    fails(cbor2.dumps(cbor2.CBORTag(98, cbor2.loads(document))), "tag 98", trusted_roots=roots)


def test_real_aws_document_verifies_against_the_aws_root_at_its_time():
    doc = verify_document(
        REAL_AWS_DOCUMENT,
        trusted_roots=load_trusted_roots(),
        expected_pcrs={0: REAL_AWS_PCR0},
        now=REAL_AWS_TIME + timedelta(seconds=30),
    )
    assert doc.module_id == "i-0a22e5c5f24d22174-enc0191cceb4289903f"
    assert doc.time == REAL_AWS_TIME
    assert len(doc.cabundle) == 4 and doc.nonce == b"\x01" * 1024


def test_real_aws_document_fails_against_the_local_root_and_when_altered(roots):
    fails(REAL_AWS_DOCUMENT, "not a trusted root", trusted_roots=roots)
    _protected, payload, _signature = parts(REAL_AWS_DOCUMENT)
    at = REAL_AWS_DOCUMENT.index(payload) + payload.index(bytes.fromhex(REAL_AWS_PCR0))
    fails(flip(REAL_AWS_DOCUMENT, at), "signature does not verify", trusted_roots=[aws_nitro_root()])
    # Three hours later its leaf has expired, but validity is judged at the document's own time:
    verify_document(REAL_AWS_DOCUMENT, trusted_roots=[aws_nitro_root()], max_age_s=None)


def test_real_2024_document_verifies_at_its_own_time():
    _protected, payload, _signature = parts(REAL_2024_DOCUMENT)
    assert payload[0] == 0xA9  # a definite-length map of 9 claims
    doc = verify_document(
        REAL_2024_DOCUMENT, trusted_roots=load_trusted_roots(), now=REAL_2024_TIME + timedelta(seconds=30)
    )
    assert doc.module_id == "i-059e862454f4a8d8f-enc0190a2f1964172e6"
    assert doc.time == REAL_2024_TIME
    assert len(doc.cabundle) == 4 and sorted(doc.pcrs) == list(range(16))
    assert doc.public_key and doc.user_data and doc.nonce is None
    fails(REAL_2024_DOCUMENT, "stale|ago", trusted_roots=[aws_nitro_root()], max_age_s=300)


def test_real_2024_document_tampered_is_refused(roots):
    fails(REAL_2024_DOCUMENT, "not a trusted root", trusted_roots=roots)
    _protected, payload, signature = parts(REAL_2024_DOCUMENT)
    pcr1 = parse_document(REAL_2024_DOCUMENT).pcrs[1]
    in_payload = REAL_2024_DOCUMENT.index(payload) + payload.index(pcr1)
    in_user_data = REAL_2024_DOCUMENT.index(payload) + payload.index(parse_document(REAL_2024_DOCUMENT).user_data)
    in_signature = REAL_2024_DOCUMENT.index(signature) + 50
    for at in (in_payload, in_user_data, in_signature):
        fails(flip(REAL_2024_DOCUMENT, at), "signature does not verify", trusted_roots=[aws_nitro_root()])


# -- every RFC 8949 encoding of the NSM's maps, arrays and strings ------------


def reencode(value, *, maps=True, arrays=True, strings=True) -> bytes:
    """value in CBOR with indefinite-length maps / arrays / byte strings (chunked) where asked."""

    def again(v):
        return reencode(v, maps=maps, arrays=arrays, strings=strings)

    if isinstance(value, dict) and maps:
        return b"\xbf" + b"".join(again(k) + again(v) for k, v in value.items()) + b"\xff"
    if isinstance(value, (list, tuple)) and arrays:
        return b"\x9f" + b"".join(again(v) for v in value) + b"\xff"
    if isinstance(value, dict):
        return _head(5, len(value)) + b"".join(again(k) + again(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return _head(4, len(value)) + b"".join(again(v) for v in value)
    if isinstance(value, bytes) and strings:
        return b"\x5f" + b"".join(cbor2.dumps(value[i : i + 37]) for i in range(0, len(value), 37)) + b"\xff"
    return cbor2.dumps(value)


def _head(major: int, length: int) -> bytes:
    """A definite-length head (lengths below 256 suffice here)."""
    return bytes(((major << 5) | length,)) if length < 24 else bytes(((major << 5) | 24, length))


def test_real_payload_reencoded_with_indefinite_lengths_parses_to_the_same_claims():
    """Parsing is separate from the signature: the re-encoded payload no longer matches AWS's signature."""
    protected, payload, signature = parts(REAL_2024_DOCUMENT)
    claims = cbor2.loads(payload)
    original = parse_document(REAL_2024_DOCUMENT)
    for options in ({"arrays": False, "strings": False}, {}, {"maps": False}):
        encoded = reencode(claims, **options)
        assert encoded != payload and cbor_item(encoded).major == "map"
        document = cbor2.dumps([protected, {}, encoded, signature])
        assert parse_document(document) == original
        fails(document, "signature does not verify", trusted_roots=[aws_nitro_root()])


@pytest.fixture(scope="module")
def signed_claims(ca):
    """(claims, sign(payload bytes) -> document) with a leaf of the local CA."""
    key, cert = ca.issue_leaf("i-test-enc")
    claims = {
        "module_id": "i-test-enc",
        "digest": "SHA384",
        "timestamp": int(datetime.now(UTC).timestamp() * 1000),
        "pcrs": {i: (PCR0 if i == 0 else bytes(48)) for i in range(16)},
        "certificate": cert.public_bytes(serialization.Encoding.DER),
        "cabundle": ca.cabundle,
        "public_key": b"k" * 100,
        "user_data": b"u" * 40,
        "nonce": None,
    }
    return claims, lambda payload: cose_sign1(payload, key)


@pytest.mark.parametrize(
    "options",
    [
        {"arrays": False, "strings": False},  # today's NSM: only the top map is indefinite
        {"strings": False},
        {"maps": False, "arrays": False},  # only the byte strings chunked
        {},  # every map, array and byte string indefinite
    ],
    ids=["top-map", "maps-and-arrays", "chunked-strings", "everything"],
)
def test_indefinite_length_documents_verify(signed_claims, roots, options):
    claims, sign = signed_claims
    document = sign(reencode(claims, **options))
    doc = verify_document(document, trusted_roots=roots, max_age_s=None)
    assert doc == parse_document(sign(cbor2.dumps(claims)))
    assert (doc.pcrs[0], doc.public_key, doc.user_data) == (PCR0, b"k" * 100, b"u" * 40)


def test_indefinite_cose_envelope_verifies(signed_claims, roots):
    """The COSE_Sign1 array and its payload byte string may be indefinite too: the signature covers the
    payload's bytes, not how the envelope framed them."""
    claims, sign = signed_claims
    protected, _unprotected, payload, signature = cbor2.loads(sign(cbor2.dumps(claims)))
    document = b"\x9f" + reencode(protected) + b"\xa0" + reencode(payload) + reencode(signature) + b"\xff"
    assert verify_document(document, trusted_roots=roots, max_age_s=None).pcrs[0] == PCR0


def _top(claims, *entries: bytes) -> bytes:
    return b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in claims.items()) + b"".join(entries)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda c: _top(c, cbor2.dumps("digest"), cbor2.dumps("SHA384"), b"\xff"), "Duplicate map key"),
        (lambda c: _top(c, cbor2.dumps("extra"), b"\xff"), "missing value"),
        (_top, "premature end|not valid CBOR"),  # no break: the map never ends
        (lambda c: _top(c, b"\xff\x00"), "after its CBOR value"),
        (lambda c: _top({**c, "user_data": None}, cbor2.dumps("user_data"), b"\x5f\x41a\x61b\xff", b"\xff"), "."),
        (lambda c: _top(dict(c, certificate=None), b"\xff")[:-1] + b"\xff", "certificate"),
        (lambda c: reencode(dict(c, pcrs=list(c["pcrs"].values()))), "pcrs"),
        (lambda c: reencode(dict(c, cabundle={0: c["cabundle"][0]})), "cabundle"),
        (lambda c: b"\xbf" + b"\xff", "lacks"),
    ],
    ids=[
        "duplicate-key",
        "key-without-value",
        "no-break",
        "bytes-after-break",
        "text-chunk-in-byte-string",
        "null-certificate",
        "pcrs-as-array",
        "cabundle-as-map",
        "empty-map",
    ],
)
def test_malformed_indefinite_payloads_are_refused_even_when_signed(signed_claims, roots, damage, match):
    claims, sign = signed_claims
    document = sign(damage(claims))
    with pytest.raises(AttestationError, match=match):
        parse_document(document)
    fails(document, match, trusted_roots=roots)


def test_simulated_document_has_the_shape_of_the_real_one(nsm):
    """Field by field, the simulated NSM writes what the real NSM writes (tests/vectors/aws): any divergence
    of major type, key order, fixed length or framing fails here before it fails on real hardware."""
    real = cbor_item(REAL_2024_DOCUMENT)
    simulated = cbor_item(nsm.attest(public_key=b"p" * 120, user_data=b"u" * 32))
    for sign1 in (real, simulated):
        assert (sign1.major, sign1.indefinite, [i.major for i in sign1.items]) == (
            "array", False, ["bytes", "map", "bytes", "bytes"],
        )  # fmt: skip
        assert [i.indefinite for i in sign1.items] == [False] * 4
        assert sign1.items[1].items == [] and len(sign1.items[3].value) == 96
    assert simulated.items[0].value == real.items[0].value == cbor2.dumps({1: -35})
    real_claims, sim_claims = cbor_item(real.items[2].value), cbor_item(simulated.items[2].value)
    assert not real_claims.indefinite  # 2024: 0xA9
    assert sim_claims.indefinite and simulated.items[2].value[:1] == b"\xbf"  # today's NSM: 0xBF ... 0xFF
    assert [k.value.decode() for k, _v in real_claims.pairs()] == NSM_KEYS
    assert [k.value.decode() for k, _v in sim_claims.pairs()] == NSM_KEYS
    assert all(k.major == "text" and not k.indefinite for k, _v in sim_claims.pairs())
    for key in NSM_KEYS:
        want, got = real_claims.entry(key), sim_claims.entry(key)
        assert (got.major, got.indefinite) == (want.major, want.indefinite), key
    assert sim_claims.entry("digest").value == real_claims.entry("digest").value == b"SHA384"
    assert sim_claims.entry("nonce").value == real_claims.entry("nonce").value == 22  # null
    for claims in (real_claims, sim_claims):
        pcrs = claims.entry("pcrs")
        assert [(k.major, k.value) for k, _v in pcrs.pairs()] == [("uint", i) for i in range(16)]
        assert all((v.major, v.indefinite, len(v.value)) == ("bytes", False, 48) for _k, v in pcrs.pairs())
        assert all((c.major, c.indefinite) == ("bytes", False) for c in claims.entry("cabundle").items)


# -- trust -------------------------------------------------------------------


def test_simulated_document_fails_against_the_aws_root_only(nsm):
    fails(nsm.attest(), "not a trusted root", trusted_roots=[aws_nitro_root()])


def test_no_trusted_roots_is_refused(nsm):
    fails(nsm.attest(), "no trusted roots", trusted_roots=[])


def test_leaf_from_another_ca_with_the_same_names_fails(ca, other_ca, roots):
    assert other_ca.root_certificate.subject == ca.root_certificate.subject
    assert other_ca.intermediate_certificate.subject == ca.intermediate_certificate.subject
    foreign_leaf = other_ca.issue_leaf("i-test-enc")
    fails(build(ca, leaf=foreign_leaf), "does not chain", trusted_roots=roots)
    # ...nor does the other CA's complete chain, whose root is not pinned.
    fails(build(other_ca, leaf=foreign_leaf), "not a trusted root", trusted_roots=roots)


def test_cabundle_root_must_be_the_chain_root(ca, other_ca):
    # Both roots trusted, but the bundle names one and the leaf chains to the other.
    both = [ca.root_certificate, other_ca.root_certificate]
    leaf = other_ca.issue_leaf("i-test-enc")
    mixed = [ca.cabundle[0], other_ca.cabundle[1]]
    fails(build(other_ca, leaf=leaf, cabundle=mixed), "not at the document's own root", trusted_roots=both)


def test_leaf_expired_at_document_time_fails_but_verifies_within_its_validity(ca, roots):
    start = datetime.now(UTC) - timedelta(hours=2)
    leaf = ca.issue_leaf("i-test-enc", not_before=start, lifetime=timedelta(hours=1))
    fails(build(ca, leaf=leaf), "does not chain", trusted_roots=roots)
    within = int((start + timedelta(minutes=30)).timestamp() * 1000)
    verify_document(build(ca, leaf=leaf, timestamp=within), trusted_roots=roots, max_age_s=None)


def test_leaf_not_yet_valid_at_document_time_fails(ca, roots):
    leaf = ca.issue_leaf("i-test-enc", not_before=datetime.now(UTC) + timedelta(hours=1))
    fails(build(ca, leaf=leaf), "does not chain", trusted_roots=roots)


def test_leaf_that_is_a_ca_fails(ca, roots):
    # A CA certificate cannot sign documents, even one issued by the pinned chain.
    key, cert = ca.issue_leaf("i-test-enc")
    ca_leaf = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca._intermediate_key, hashes.SHA384())
    )
    fails(build(ca, leaf=(key, ca_leaf)), "does not chain", trusted_roots=roots)


# -- integrity ---------------------------------------------------------------


def test_flipped_bit_in_payload_fails(nsm, roots):
    document = nsm.attest()
    _protected, payload, _signature = parts(document)
    at = document.index(payload) + payload.index(PCR0)
    fails(flip(document, at), "signature does not verify", trusted_roots=roots)


def test_flipped_bit_in_signature_fails(nsm, roots):
    document = nsm.attest()
    _protected, _payload, signature = parts(document)
    fails(flip(document, document.index(signature) + 50), "signature does not verify", trusted_roots=roots)


def test_flipped_bit_in_protected_header_fails(ca, roots):
    document = build(ca, protected={1: -35, 4: b"key-id"})
    verify_document(document, trusted_roots=roots, max_age_s=None)
    fails(flip(document, document.index(b"key-id")), "signature does not verify", trusted_roots=roots)
    # The algorithm itself is in the protected header: a flipped alg is refused outright.
    fails(flip(document, document.index(bytes.fromhex("a2013822")) + 3), "COSE algorithm", trusted_roots=roots)


@pytest.mark.parametrize("protected", [{1: -7}, {1: -36}, {}, {1: "ES384"}, {1: True}])
def test_wrong_algorithm_fails(ca, roots, protected):
    fails(build(ca, protected=protected), "expected -35", trusted_roots=roots)


def test_signature_of_wrong_length_fails(ca, roots):
    protected, unprotected, payload, signature = cbor2.loads(build(ca))
    short = cbor2.dumps([protected, unprotected, payload, signature[:64]])
    fails(short, "64 bytes", trusted_roots=roots)


# -- freshness, nonce, PCRs, debug --------------------------------------------


def test_stale_document_fails(nsm, roots):
    document = nsm.attest()
    made = parse_document(document).time
    verify_document(document, trusted_roots=roots, now=made + timedelta(seconds=299))
    with pytest.raises(AttestationError, match="over the 300 s limit"):
        verify_document(document, trusted_roots=roots, now=made + timedelta(seconds=301))
    with pytest.raises(AttestationError, match="over the 10 s limit"):
        verify_document(document, trusted_roots=roots, max_age_s=10, now=made + timedelta(seconds=11))


def test_document_from_the_future_fails(nsm, roots):
    document = nsm.attest()
    with pytest.raises(AttestationError, match="in the future"):
        verify_document(document, trusted_roots=roots, now=parse_document(document).time - timedelta(minutes=5))


def test_wrong_or_missing_nonce_fails(nsm, roots):
    fails(nsm.attest(nonce=b"one"), "expected 74776f", trusted_roots=roots, nonce=b"two")
    fails(nsm.attest(), "carries no nonce", trusted_roots=roots, nonce=b"two")


def test_wrong_pcr0_names_both_values(nsm, roots):
    wrong = "ee" * 48
    with pytest.raises(AttestationError) as info:
        verify_document(nsm.attest(), trusted_roots=roots, expected_pcrs={0: wrong})
    message = str(info.value)
    assert PCR0.hex() in message and wrong in message and "different image" in message


def test_wrong_pcr1_and_missing_pcr_fail(ca, nsm, roots):
    fails(nsm.attest(), "PCR1 is .* different kernel", trusted_roots=roots, expected_pcrs={0: PCR0, 1: PCR2})
    fails(build(ca, pcrs={0: PCR0}), "no PCR8", trusted_roots=roots, expected_pcrs={8: PCR8})


@pytest.mark.parametrize(
    "expected,match",
    [("zz" * 48, "not a SHA-384"), ("ab" * 47, "not a SHA-384"), (b"short", "not a SHA-384"), (42, "not a SHA-384"),
     ([], "no expected value")],
)  # fmt: skip
def test_malformed_expected_pcr_is_refused(nsm, roots, expected, match):
    fails(nsm.attest(), f"PCR0.*{match}|{match}.*PCR0", trusted_roots=roots, expected_pcrs={0: expected})


def test_debug_mode_refused_unless_allowed(ca, roots):
    debug = SimulatedNsm(ca, {0: PCR0, 1: PCR1, 2: PCR2}, debug=True)
    document = debug.attest()
    fails(document, "debug mode", trusted_roots=roots)
    doc = verify_document(document, trusted_roots=roots, allow_debug=True)
    assert all(value == bytes(48) for value in doc.pcrs.values())
    assert doc.to_json()["debug_mode"] is True


# -- malformed input ---------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("timestamp", "1700000000000", "timestamp"),
        ("timestamp", True, "timestamp"),
        ("timestamp", 2**64, "timestamp"),
        ("digest", "SHA256", "digest"),
        ("module_id", "", "module_id"),
        ("pcrs", {0: b"\x01" * 47}, "PCR0 is not 48 bytes"),
        ("pcrs", {32: PCR0, 0: PCR0}, "PCR index 32"),
        ("pcrs", {1: PCR1}, "no PCR0"),
        ("pcrs", [PCR0], "pcrs"),
        ("certificate", b"not a certificate", "not a valid X.509"),
        ("certificate", _DROP, "lacks certificate"),
        ("cabundle", [], "cabundle"),
        ("cabundle", ["text"], r"cabundle\[0\]"),
        ("nonce", "text", "nonce"),
        ("user_data", 7, "user_data"),
    ],
)
def test_malformed_claims_fail_even_when_signed(ca, roots, field, value, match):
    document = build(ca, **{field: value})
    with pytest.raises(AttestationError, match=match):
        parse_document(document)
    fails(document, match, trusted_roots=roots)


@pytest.mark.parametrize(
    "document",
    [
        b"",
        b"\x00",
        b"\xff\xff\xff",
        cbor2.dumps([b"", {}, b"", b""]),
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps({"a": 1}),
        cbor2.dumps([b"\xa1\x01", {}, b"payload", b"sig"]),
        cbor2.dumps([cbor2.dumps([1]), {}, b"payload", b"sig"]),
        cbor2.dumps([cbor2.dumps({1: -35}), [], b"payload", b"sig"]),
        cbor2.dumps([cbor2.dumps({1: -35}), {}, None, b"sig"]),
        "a string",
        None,
    ],
)
def test_garbage_gives_attestation_error(roots, document):
    fails(document, ".", trusted_roots=roots)


def test_truncated_and_padded_documents_fail(nsm, roots):
    document = nsm.attest()
    for length in (1, 2, 10, len(document) // 2, len(document) - 1):
        fails(document[:length], ".", trusted_roots=roots)
    fails(document + b"\x00", "after its CBOR value", trusted_roots=roots)


@pytest.fixture(scope="module")
def fuzz_document(ca):
    return build(ca, nonce=b"n", user_data=b"u")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_fuzz_random_bytes_only_raise_attestation_error(roots, data):
    with pytest.raises(AttestationError):
        verify_document(data, trusted_roots=roots, max_age_s=None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]), st.integers(0, 10**6), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_fuzz_mutated_documents_only_raise_attestation_error(fuzz_document, roots, edits, cut):
    data = bytearray(fuzz_document)
    for op, position, value in edits:
        at = position % len(data)
        if op == "flip":
            data[at] ^= 1 << (value % 8)
        elif op == "set":
            data[at] = value
        elif op == "insert":
            data.insert(at, value)
        elif len(data) > 1:
            del data[at]
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    try:
        doc = verify_document(bytes(data), trusted_roots=roots, max_age_s=None)
    except AttestationError:
        return
    # The rare surviving mutation can only be one the signature does not cover
    # (e.g. the unprotected header); the signed claims must be intact.
    assert doc == parse_document(fuzz_document)


# -- roots -------------------------------------------------------------------


def test_shipped_aws_root_has_the_published_fingerprint():
    root = aws_nitro_root()
    assert root.fingerprint(hashes.SHA256()).hex().upper() == (
        "641A0321A3E244EFE456463195D606317ED7CDCC3C1756E09893F3C68F79BB5B"
    )
    assert root.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"


def test_load_trusted_roots(ca, tmp_path):
    local = tmp_path / "local-root.pem"
    local.write_bytes(ca.root_pem)
    assert load_trusted_roots([str(local)], include_aws=False) == [ca.root_certificate]
    both = load_trusted_roots([str(local), str(local)])
    assert both == [aws_nitro_root(), ca.root_certificate]

    key, leaf = ca.issue_leaf("i-test-enc")
    not_ca = tmp_path / "leaf.pem"
    not_ca.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(AttestationError, match="not a CA certificate"):
        load_trusted_roots([str(not_ca)])
    with pytest.raises(AttestationError, match="cannot read a trusted root"):
        load_trusted_roots([str(tmp_path / "missing.pem")])
    (tmp_path / "empty.pem").write_text("no certificate here")
    with pytest.raises(AttestationError, match="cannot read a trusted root"):
        load_trusted_roots([str(tmp_path / "empty.pem")])


# -- the local CA and the simulator ------------------------------------------


def test_local_ca_persists_with_private_permissions(tmp_path):
    first = LocalCA.load_or_create(tmp_path)
    second = LocalCA.load_or_create(tmp_path)
    assert first.root_certificate == second.root_certificate
    assert first.intermediate_certificate == second.intermediate_certificate
    ca_dir = tmp_path / "ca"
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    files = sorted(p.name for p in ca_dir.iterdir())
    assert files == [".lock", "intermediate.key", "intermediate.pem", "root.key", "root.pem"]
    for path in ca_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert x509.load_pem_x509_certificate((ca_dir / "root.pem").read_bytes()) == first.root_certificate
    # A document from the reloaded CA verifies against the first load's root.
    document = SimulatedNsm(second, {0: PCR0}).attest()
    verify_document(document, trusted_roots=[first.root_certificate])


def test_local_ca_with_mismatched_key_is_refused(tmp_path, other_ca):
    LocalCA.load_or_create(tmp_path)
    key = other_ca._root_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ca" / "root.key").write_bytes(key)
    with pytest.raises(AttestationError, match="does not match"):
        LocalCA.load_or_create(tmp_path)


def test_local_ca_renews_an_intermediate_from_another_root(tmp_path, other_ca):
    first = LocalCA.load_or_create(tmp_path)
    # Simulate an intermediate left over from an older root: it must be replaced.
    inter = other_ca.intermediate_certificate.public_bytes(serialization.Encoding.PEM)
    inter_key = other_ca._intermediate_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ca" / "intermediate.key").write_bytes(inter_key)
    (tmp_path / "ca" / "intermediate.pem").write_bytes(inter)
    renewed = LocalCA.load_or_create(tmp_path)
    assert renewed.root_certificate == first.root_certificate
    assert renewed.intermediate_certificate != other_ca.intermediate_certificate
    verify_document(SimulatedNsm(renewed, {0: PCR0}).attest(), trusted_roots=[first.root_certificate])


@pytest.mark.parametrize("pcrs", [{0: b"\x00" * 47}, {16: PCR0}, {0: PCR0.hex()}, {True: PCR0}])
def test_simulator_refuses_bad_launch_pcrs(ca, pcrs):
    with pytest.raises(AttestationError):
        SimulatedNsm(ca, pcrs)


def test_simulator_leaf_is_valid_at_a_timestamp_just_before_a_second(ca, monkeypatch):
    # The leaf is issued after the timestamp is taken; the clock may have crossed into the next second.
    late_in_a_second = (time.time_ns() // 1_000_000_000 - 30) * 1_000_000_000 + 999_000_000
    monkeypatch.setattr(nsm_sim.time, "time_ns", lambda: late_in_a_second)
    document = SimulatedNsm(ca, {0: PCR0}).attest()
    assert verify_document(document, trusted_roots=[ca.root_certificate]).timestamp == late_in_a_second // 1_000_000


def test_simulator_limits_inputs_to_1024_bytes(nsm):
    nsm.attest(user_data=os.urandom(1024), nonce=os.urandom(1024), public_key=os.urandom(1024))
    with pytest.raises(AttestationError, match="at most 1024"):
        nsm.attest(nonce=os.urandom(1025))


def test_simulator_describe_pcr_and_random(nsm):
    assert nsm.describe_pcr(0) == (True, PCR0)
    assert nsm.describe_pcr(3) == (True, bytes(48))
    assert nsm.describe_pcr(16) == (False, bytes(48))
    assert len(nsm.get_random(100)) == 100 and nsm.get_random(32) != nsm.get_random(32)
