"""The client's verified-chain cache (attestation.VerifiedChains): what it may skip and what it never may.

A hit skips only loading and verifying the certificate chain, for the very bytes verified before against the
same roots and within their validity; every document's own signature, nonce, PCRs and age are still checked.
Each test here tries what the host (which serves the documents) or anything else writing the cache could do.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ansible_collections.confidential_ml.nitro.enclave_local.nsm_sim import LocalCA, SimulatedNsm, cose_sign1
from ansible_collections.confidential_ml.nitro.plugins.module_utils import client
from ansible_collections.confidential_ml.nitro.plugins.module_utils.attestation import (
    VerifiedChains,
    parse_document,
    verify_document,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import AttestationError

PCR0 = bytes.fromhex("a1" * 48)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return LocalCA.load_or_create(tmp_path_factory.mktemp("state"))


@pytest.fixture
def nsm(ca):
    return SimulatedNsm(ca, {0: PCR0, 1: bytes(48), 2: bytes(48)}, module_id="i-test-enc")


class Roots:
    """The trusted roots as verify_document's loader, counting how often a full verification needed them."""

    def __init__(self, ca):
        self.ca, self.loads = ca, 0

    def __call__(self):
        self.loads += 1
        return [self.ca.root_certificate]


@pytest.fixture
def roots(ca):
    return Roots(ca)


@pytest.fixture
def cache(tmp_path):
    return VerifiedChains(tmp_path / "chains", roots_id=b"the local root")


def verify(document, roots, cache, **kwargs):
    kwargs.setdefault("max_age_s", None)
    return verify_document(document, trusted_roots=roots, chain_cache=cache, **kwargs)


def entries(cache) -> list:
    return sorted(p for p in cache.directory.iterdir() if len(p.name) == 64)


def forged(document, key=None, **changes) -> bytes:
    """The document's genuine chain (certificate and cabundle) with changed claims, signed by key (another)."""
    claims = cbor2.loads(cbor2.loads(document)[2])
    claims.update(changes)
    return cose_sign1(cbor2.dumps(claims), key or ec.generate_private_key(ec.SECP384R1()))


def test_a_verified_chain_is_remembered_and_the_next_document_skips_it(nsm, roots, cache):
    first = verify(nsm.attest(nonce=b"one"), roots, cache, nonce=b"one", expected_pcrs={0: PCR0.hex()})
    assert roots.loads == 1 and len(entries(cache)) == 1
    second = verify(nsm.attest(nonce=b"two"), roots, cache, nonce=b"two", expected_pcrs={0: PCR0.hex()})
    assert roots.loads == 1, "the second document's chain (the same bytes) was verified again"
    assert second.certificate == first.certificate and second.nonce == b"two"
    assert oct(cache.directory.stat().st_mode & 0o777) == "0o700"
    assert {oct(p.stat().st_mode & 0o777) for p in cache.directory.iterdir()} == {"0o600"}


def test_a_hit_still_checks_the_documents_signature_nonce_pcrs_and_age(nsm, roots, cache):
    genuine = nsm.attest(nonce=b"n")
    verify(genuine, roots, cache, nonce=b"n")
    # The host replays the genuine chain around claims of its own, signed with its own key.
    with pytest.raises(AttestationError, match="does not verify"):
        verify(forged(genuine, nonce=b"m"), roots, cache, nonce=b"m")
    altered = bytearray(genuine)
    altered[-1] ^= 1  # the signature's last byte
    with pytest.raises(AttestationError, match="does not verify"):
        verify(bytes(altered), roots, cache, nonce=b"n")
    with pytest.raises(AttestationError, match="expected 6d"):
        verify(genuine, roots, cache, nonce=b"m")
    with pytest.raises(AttestationError, match="PCR0 is"):
        verify(genuine, roots, cache, nonce=b"n", expected_pcrs={0: "ee" * 48})
    made = parse_document(genuine).time
    with pytest.raises(AttestationError, match="over the 300 s limit"):
        verify(genuine, roots, cache, max_age_s=300, now=made + timedelta(seconds=301))
    assert roots.loads == 1  # each of those was refused on a hit, not on a second full verification


def test_a_tampered_entry_is_not_trusted(ca, nsm, roots, cache):
    """Whoever edits an entry (the leaf's key to one of theirs, a longer validity) without the secret gets a
    full verification, which refuses a document signed with any key but the leaf's."""
    genuine = nsm.attest()
    verify(genuine, roots, cache)
    (entry,) = entries(cache)
    data = bytearray(entry.read_bytes())
    attacker = ec.generate_private_key(ec.SECP384R1())
    point = attacker.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    data[16:113] = point  # the remembered key, its MAC left as it was
    entry.write_bytes(bytes(data))
    with pytest.raises(AttestationError, match="does not verify"):
        verify(forged(genuine, attacker), roots, cache)
    assert roots.loads == 2  # the chain itself is genuine: verified in full, it was remembered again
    verify(genuine, roots, cache)
    assert roots.loads == 2
    for offset in (0, 8, 15, 40, len(data) - 1):  # not_before, not_after, the key, the MAC
        altered = bytearray(entry.read_bytes())
        altered[offset] ^= 0x80
        entry.write_bytes(bytes(altered))
        verify(genuine, roots, cache)
        assert roots.loads == 3 + (0, 8, 15, 40, len(data) - 1).index(offset)
    entry.write_bytes(entry.read_bytes()[:-1])  # truncated
    verify(genuine, roots, cache)
    assert roots.loads == 8


def test_an_entry_outside_its_chains_validity_is_not_trusted(ca, roots, cache):
    """A document dated after the leaf's notAfter (or before its notBefore) is refused as the full check
    refuses it, though the same chain verified before."""
    start = datetime.now(UTC) - timedelta(minutes=30)
    leaf = ca.issue_leaf("i-test-enc", not_before=start, lifetime=timedelta(hours=1))
    verify(signed_by(ca, leaf, datetime.now(UTC)), roots, cache)
    assert roots.loads == 1 and len(entries(cache)) == 1
    for when in (start + timedelta(hours=1, seconds=1), start - timedelta(seconds=1)):
        with pytest.raises(AttestationError, match="does not chain"):
            verify(signed_by(ca, leaf, when), roots, cache)
    assert roots.loads == 3


def signed_by(ca, leaf, when: datetime) -> bytes:
    """A document signed by leaf (key, certificate) of ca, made at when."""
    key, cert = leaf
    claims = {
        "module_id": "i-test-enc",
        "digest": "SHA384",
        "timestamp": int(when.timestamp() * 1000),
        "pcrs": {i: PCR0 if i == 0 else bytes(48) for i in range(16)},
        "certificate": cert.public_bytes(serialization.Encoding.DER),
        "cabundle": ca.cabundle,
        "public_key": None,
        "user_data": None,
        "nonce": None,
    }
    return cose_sign1(cbor2.dumps(claims), key)


def test_an_expired_entry_is_dropped_when_another_is_written(ca, nsm, roots, cache):
    verify(nsm.attest(), roots, cache)
    (entry,) = entries(cache)
    stale = cache.directory / ("0" * 64)
    stale.write_bytes(bytes(8) + (1000).to_bytes(8, "big") + bytes(129))  # expired in 1970
    os.chmod(stale, 0o600)
    other = SimulatedNsm(LocalCA.load_or_create(cache.directory.parent / "other"), {0: PCR0}, module_id="x")
    verify(other.attest(), lambda: [other.ca.root_certificate], cache)
    assert stale not in entries(cache) and entry in entries(cache) and len(entries(cache)) == 2


def test_other_roots_a_shared_directory_or_a_failed_chain_never_hit(ca, nsm, roots, cache, tmp_path):
    document = nsm.attest()
    verify(document, roots, cache)
    verify(document, roots, VerifiedChains(cache.directory, roots_id=b"other roots"))
    assert roots.loads == 2, "an entry made under other roots was trusted"
    os.chmod(cache.directory, 0o770)  # others could put entries (and read the secret) there
    verify(document, roots, cache)
    assert roots.loads == 3
    os.chmod(cache.directory, 0o700)
    for entry in entries(cache):
        os.chmod(entry, 0o644)
    verify(document, roots, cache)
    assert roots.loads == 4
    stranger = LocalCA.load_or_create(tmp_path / "stranger")
    fresh = VerifiedChains(tmp_path / "fresh", roots_id=b"the local root")
    with pytest.raises(AttestationError, match="not a trusted root"):
        verify(SimulatedNsm(stranger, {0: PCR0}, module_id="x").attest(), roots, fresh)
    assert not fresh.directory.exists() or not entries(fresh)


def test_a_cache_that_cannot_be_written_costs_only_a_full_verification(nsm, roots, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    cache = VerifiedChains(tmp_path / "file" / "chains", roots_id=b"r")
    document = nsm.attest()
    verify(document, roots, cache)
    verify(document, roots, cache)
    assert roots.loads == 2


def test_the_clients_cache_is_keyed_by_the_roots_it_would_load(ca, nsm, tmp_path, monkeypatch):
    """A chain remembered under the local root of the time is not trusted once the user pins another one."""
    monkeypatch.setenv("ENCLAVE_HOME", str(tmp_path / "home"))
    pinned = tmp_path / "home" / "ca" / "root.pem"
    pinned.parent.mkdir(parents=True)
    pinned.write_bytes(ca.root_certificate.public_bytes(serialization.Encoding.PEM))
    document = nsm.attest()
    roots, cache = client._default_roots()
    verify(document, roots, cache)
    assert cache.lookup((parse_document(document).certificate, *ca.cabundle), parse_document(document).timestamp)
    other = LocalCA.load_or_create(tmp_path / "other")
    pinned.write_bytes(other.root_certificate.public_bytes(serialization.Encoding.PEM))
    roots, cache = client._default_roots()
    with pytest.raises(AttestationError, match="not a trusted root"):
        verify(document, roots, cache)
