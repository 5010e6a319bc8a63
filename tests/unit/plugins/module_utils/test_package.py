"""The package format: round trip, tamper detection, hostile archives, sealing rules and the test vector.

KMS is moto's (boto3 calls, real KMS JSON shapes); hostile packages are real tar streams encrypted with
write_package() under a known key, so every refusal is reached through the authenticated body.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import cbor2
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from moto import mock_aws

from ansible_collections.confidential_ml.nitro.plugins.module_utils import package_format, package_open, package_seal
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import KmsError, PackageError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.owner_identity import OwnerIdentity, OwnerKey
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_format import (
    ManifestEntry,
    PackageHeader,
    encode_manifest,
    manifest_digest,
    read_header,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_open import open_package
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_seal import (
    build_manifest,
    seal,
    write_package,
)

VECTORS = Path(__file__).resolve().parents[3] / "vectors"
SEGMENT = 1 << 20
TINK_HEADER = 1 + 32 + 7
KEY = bytes(range(32))  # data key of the hostile packages built here
OWNER_ARN = "arn:aws:kms:us-east-1:111122223333:key/owner-signing"
HOST_ARN = "arn:aws:kms:us-east-1:444455556666:key/host-signing"


class Signer:
    """A P-384 key held here, signing as KMS Sign does (ECDSA_SHA_384, DER); the KMS path is tested against
    the local KMS in tests/integration (moto's Sign hashes a DIGEST message again)."""

    def __init__(self, key_id: str, private=None):
        self.private = private or ec.generate_private_key(ec.SECP384R1())
        spki = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key = OwnerKey(key_id, spki)
        self.calls = 0

    def sign(self, message: bytes) -> bytes:
        self.calls += 1
        return self.private.sign(message, ec.ECDSA(hashes.SHA384()))


OWNER = Signer(OWNER_ARN)


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def kms():
    with mock_aws():
        client = boto3.client("kms", region_name="us-east-1")
        key_id = client.create_key(Description="package tests")["KeyMetadata"]["KeyId"]
        yield client, key_id


def kms_unwrap(client):
    def unwrap(header: PackageHeader) -> bytes:
        response = client.decrypt(
            CiphertextBlob=header.wrapped_key, EncryptionContext=header.encryption_context, KeyId=header.key_id
        )
        return response["Plaintext"]

    return unwrap


def make_tree(root: Path, big_bytes: int = 3 * SEGMENT + 12345) -> Path:
    """Nested dirs, empty files and dirs, a multi-segment binary, unicode and long names, an executable."""
    root.mkdir()
    (root / "models").mkdir()
    (root / "models" / "weights.bin").write_bytes(os.urandom(big_bytes))
    (root / "src" / "pkg" / "deep" / "er").mkdir(parents=True)
    (root / "src" / "pkg" / "__init__.py").write_bytes(b"")
    script = root / "src" / "pkg" / "ml_algorithm.py"
    script.write_text("import sys\nprint('hello', sys.argv)\n")
    script.chmod(0o755)
    (root / "src" / "pkg" / "deep" / "er" / "leaf.txt").write_text("leaf\n")
    (root / "output").mkdir()  # empty directory
    (root / "empty.txt").write_bytes(b"")
    (root / "donn\u00e9es").mkdir()
    (root / "donn\u00e9es" / "r\u00e9sum\u00e9 \u6f22\u5b57.txt").write_text("unicode \u2713\n")
    (root / ("long-" + "n" * 120 + ".txt")).write_text("a name past ustar's 100 bytes\n")
    (root / "private.cfg").write_text("mode 0600 in the source\n")
    (root / "private.cfg").chmod(0o600)
    return root


def snapshot(root: Path) -> dict:
    """Everything open_package() promises about a tree: paths, kinds, exact modes, contents."""
    result = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if stat.S_ISDIR(st.st_mode):
            result[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            assert stat.S_ISREG(st.st_mode), f"{rel} is neither a file nor a directory"
            result[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
    return result


def source_snapshot(root: Path) -> dict:
    """What the source tree should look like once opened: modes normalised like git's."""
    result = {}
    for rel, value in snapshot(root).items():
        if value[0] == "dir":
            result[rel] = ("dir", 0o755)
        else:
            result[rel] = ("file", 0o755 if value[1] & 0o111 else 0o644, value[2])
    return result


@pytest.fixture(scope="module")
def sealed(kms, tmp_path_factory):
    """One real package (moto KMS), sealed once and copied by each tamper test."""
    client, key_id = kms
    work = tmp_path_factory.mktemp("sealed")
    src = make_tree(work / "src")
    header = seal(
        src, work / "app.pkg", kms_client=client, key_id=key_id, name="digits-classifier", version="1.0", signer=OWNER
    )
    return {"src": src, "path": work / "app.pkg", "header": header, "bytes": (work / "app.pkg").read_bytes()}


def assert_refused(path, target: Path, unwrap, *phrases, max_total_bytes=None, name=None, version=None):
    """open_package() raises PackageError naming the package and the cause, and leaves target as it was."""
    before = sorted(os.listdir(target)) if target.exists() else None
    kwargs = {} if max_total_bytes is None else {"max_total_bytes": max_total_bytes}
    with pytest.raises(PackageError) as raised:
        open_package(path, target, unwrap_key=unwrap, **kwargs)
    message = str(raised.value)
    assert str(path) in message
    if name is not None:
        assert f"'{name}' {version}" in message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    if before is None:
        assert not target.exists(), f"{target} was left behind"
    else:
        assert sorted(os.listdir(target)) == before
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no stray temporaries
    return message


def tampered(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "app.pkg"
    path.write_bytes(data)
    return path


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def file_entry(path: str, content: bytes, mode: int = 0o644) -> ManifestEntry:
    return ManifestEntry(path, "file", mode, len(content), hashlib.sha256(content).hexdigest())


def dir_entry(path: str) -> ManifestEntry:
    return ManifestEntry(path, "dir", 0o755, 0, "")


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, mode: int = 0o644, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, size, mode
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def build_tar(members, manifest: bytes | None, tail: bytes = b"") -> bytes:
    """A real tar stream: the manifest member first (unless None), then (TarInfo, data-or-None) pairs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if manifest is not None:
            tar.addfile(member(package_format.MANIFEST_NAME, size=len(manifest)), io.BytesIO(manifest))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue() + tail


def hostile_package(tmp_path: Path, entries, members, *, manifest=None, digest=None, tail=b"") -> Path:
    manifest = encode_manifest(entries) if manifest is None else manifest
    body = build_tar(members, manifest, tail) if members is not None else tail
    path = tmp_path / "hostile.pkg"
    write_package(
        path,
        name="hostile",
        version="6.6.6",
        key_id="arn:aws:kms:us-east-1:111122223333:key/hostile",
        encryption_context={"confidential_ml:package": "hostile"},
        wrapped_key=b"known key",
        manifest_digest=digest or hashlib.sha256(manifest).digest(),
        data_key=KEY,
        body_chunks=[body[i : i + 4096] for i in range(0, len(body), 4096)],
    )
    return path


def known_key(header):
    return KEY


def decrypt_per_spec(path: Path, data_key: bytes) -> tuple[bytes, bytes]:
    """Decrypt a package following docs/PACKAGE_FORMAT.md alone (cryptography, not Tink): (header raw, tar)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89CMLPKG\n"
    (length,) = struct.unpack(">I", data[8:12])
    raw, body = data[: 12 + length], data[12 + length :]
    if cbor2.loads(raw[12:])["format_version"] == 2:  # section 1: a signature block follows the header
        (signature_length,) = struct.unpack(">H", body[:2])
        body = body[2 + signature_length :]
    assert body[0] == TINK_HEADER
    salt, nonce_prefix = body[1:33], body[33:40]
    derived = AESGCM(HKDF(hashes.SHA256(), 32, salt, raw).derive(data_key))
    segments = [body[TINK_HEADER:SEGMENT]] + [body[i : i + SEGMENT] for i in range(SEGMENT, len(body), SEGMENT)]
    plaintext = bytearray()
    for index, segment in enumerate(segments):
        last = b"\x01" if index == len(segments) - 1 else b"\x00"
        plaintext += derived.decrypt(nonce_prefix + index.to_bytes(4, "big") + last, segment, None)
    return raw, bytes(plaintext)


# --------------------------------------------------------------------------- round trip


def test_round_trip_gives_the_identical_tree(sealed, kms, tmp_path):
    target = tmp_path / "opened"
    entries = open_package(sealed["path"], target, unwrap_key=kms_unwrap(kms[0]))
    assert snapshot(target) == source_snapshot(sealed["src"])
    assert entries == build_manifest(sealed["src"]) == build_manifest(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700  # created by open: private
    assert (target / "models" / "weights.bin").read_bytes() == (sealed["src"] / "models" / "weights.bin").read_bytes()
    assert len(sealed["bytes"]) > 3 * SEGMENT  # the tamper tests below need several full segments


def test_open_into_an_existing_empty_directory(sealed, kms, tmp_path):
    target = tmp_path / "mnt"
    target.mkdir(mode=0o750)
    open_package(sealed["path"], target, unwrap_key=kms_unwrap(kms[0]))
    assert snapshot(target) == source_snapshot(sealed["src"])
    assert stat.S_IMODE(target.stat().st_mode) == 0o750  # an existing target keeps its own mode


@pytest.mark.parametrize("occupant", ["file", "link"])
def test_open_refuses_a_target_that_is_not_an_empty_directory(sealed, kms, tmp_path, occupant):
    if occupant == "file":
        target = tmp_path / "busy"
        target.mkdir()
        (target / "mine.txt").write_text("keep me")
    else:
        (tmp_path / "elsewhere").mkdir()
        target = tmp_path / "busy"
        target.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PackageError, match="not an empty directory"):
        open_package(sealed["path"], target, unwrap_key=kms_unwrap(kms[0]))
    if occupant == "file":
        assert os.listdir(target) == ["mine.txt"]
    else:
        assert os.listdir(tmp_path / "elsewhere") == []


def test_header_is_readable_without_the_key_and_records_what_kms_returned(sealed, kms):
    client, key_id = kms
    header = read_header(sealed["path"])
    assert header == sealed["header"]
    assert header.format_version == package_format.FORMAT_VERSION
    assert (header.name, header.version) == ("digits-classifier", "1.0")
    assert header.key_id == client.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
    assert header.encryption_context == {
        "confidential_ml:package": "digits-classifier",
        "confidential_ml:version": "1.0",
    }
    assert header.manifest_digest == manifest_digest(build_manifest(sealed["src"]))
    assert sealed["bytes"].startswith(header.raw)
    as_json = json.loads(json.dumps(header.to_json()))
    assert bytes.fromhex(as_json["manifest_digest"]) == header.manifest_digest
    assert base64.b64decode(as_json["wrapped_key"]) == header.wrapped_key


def test_caller_encryption_context_is_merged_and_bound_by_kms(kms, tmp_path):
    client, key_id = kms
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    header = seal(
        src, tmp_path / "a.pkg", kms_client=client, key_id=key_id, name="n", version="2",
        encryption_context={"tenant": "acme"},
    )  # fmt: skip
    assert header.encryption_context == {
        "confidential_ml:package": "n",
        "confidential_ml:version": "2",
        "tenant": "acme",
    }
    with pytest.raises(client.exceptions.InvalidCiphertextException):
        client.decrypt(CiphertextBlob=header.wrapped_key, EncryptionContext={"tenant": "acme"})
    open_package(tmp_path / "a.pkg", tmp_path / "out", unwrap_key=kms_unwrap(client))
    assert (tmp_path / "out" / "a.txt").read_text() == "a"


def test_caller_cannot_override_the_package_context(kms, tmp_path):
    client, key_id = kms
    (tmp_path / "src").mkdir()
    with pytest.raises(PackageError, match="confidential_ml:package"):
        seal(
            tmp_path / "src", tmp_path / "a.pkg", kms_client=client, key_id=key_id, name="n", version="1",
            encryption_context={"confidential_ml:package": "other"},
        )  # fmt: skip
    assert not (tmp_path / "a.pkg").exists()


def test_kms_failure_is_a_kms_error_and_writes_nothing(kms, tmp_path):
    client, _key_id = kms
    (tmp_path / "src").mkdir()
    with pytest.raises(KmsError, match="GenerateDataKey") as raised:
        seal(tmp_path / "src", tmp_path / "a.pkg", kms_client=client, key_id="alias/missing", name="n", version="1")
    assert "alias/missing" in str(raised.value)
    assert os.listdir(tmp_path) == ["src"]


def test_progress_bar_goes_to_stderr(kms, tmp_path, capsys):
    client, key_id = kms
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(300_000))
    seal(src, tmp_path / "a.pkg", kms_client=client, key_id=key_id, name="n", version="1", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "sealing" in captured.err and "100%" in captured.err


# --------------------------------------------------------------------------- manifest determinism


def test_manifest_digest_depends_on_content_and_exec_bit_only(tmp_path):
    src = make_tree(tmp_path / "src", big_bytes=1000)
    digest = manifest_digest(build_manifest(src))
    assert manifest_digest(build_manifest(src)) == digest
    os.utime(src / "empty.txt", (1, 1))
    (src / "private.cfg").chmod(0o640)
    assert manifest_digest(build_manifest(src)) == digest  # timestamps and non-exec permission bits do not count
    (src / "empty.txt").chmod(0o700)
    assert manifest_digest(build_manifest(src)) != digest
    (src / "empty.txt").chmod(0o644)
    assert manifest_digest(build_manifest(src)) == digest
    (src / "empty.txt").write_bytes(b"x")
    assert manifest_digest(build_manifest(src)) != digest


def test_manifest_order_is_depth_first_by_name(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "z").write_text("")
    (src / "a-b").write_text("")  # '-' sorts before '/': a plain string sort would put it before a/z
    (src / "B").write_text("")
    assert [e.path for e in build_manifest(src)] == ["B", "a", "a/z", "a-b"]


def test_same_tree_sealed_twice_has_same_manifest_digest_but_fresh_ciphertext(sealed, kms, tmp_path):
    client, key_id = kms
    again = seal(sealed["src"], tmp_path / "again.pkg", kms_client=client, key_id=key_id, name="digits-classifier",
                 version="1.0")  # fmt: skip
    assert again.manifest_digest == sealed["header"].manifest_digest
    assert again.wrapped_key != sealed["header"].wrapped_key
    assert (tmp_path / "again.pkg").read_bytes()[len(again.raw) :] != sealed["bytes"][len(sealed["header"].raw) :]


def test_tar_stream_follows_the_profile(kms, tmp_path):
    """Decrypted by the spec alone: manifest first, then entries in order, no times, owners or extra records."""
    src = make_tree(tmp_path / "src", big_bytes=SEGMENT + 7)
    data_key = os.urandom(32)

    class FixedKms:
        def generate_data_key(self, KeyId, KeySpec, EncryptionContext):  # noqa: N803
            return {"KeyId": "arn:aws:kms:us-east-1:111122223333:key/x", "CiphertextBlob": b"w", "Plaintext": data_key}

    header = seal(src, tmp_path / "p.pkg", kms_client=FixedKms(), key_id="x", name="n", version="1")
    raw, plaintext = decrypt_per_spec(tmp_path / "p.pkg", data_key)
    assert raw == header.raw
    with tarfile.open(fileobj=io.BytesIO(plaintext), mode="r:") as tar:
        members = tar.getmembers()
        manifest = tar.extractfile(members[0]).read()
    assert members[0].name == package_format.MANIFEST_NAME
    assert hashlib.sha256(manifest).digest() == header.manifest_digest
    entries = build_manifest(src)
    assert [m.name for m in members[1:]] == [e.path for e in entries]
    for m, e in zip(members[1:], entries, strict=True):
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert set(m.pax_headers) <= {"path"}
        assert (m.mode, m.size) == (e.mode, e.size)
    assert any(m.pax_headers for m in members)  # the unicode and long names needed PAX records
    assert plaintext.endswith(b"\0" * 1024)


# --------------------------------------------------------------------------- tampering


@pytest.mark.slow
def test_every_header_byte_is_authenticated(sealed, kms, tmp_path):
    target = tmp_path / "out"
    unwrap = kms_unwrap(kms[0])
    for offset in range(len(sealed["header"].raw)):
        path = tampered(tmp_path, flip(sealed["bytes"], offset))
        assert_refused(path, target, unwrap)


@pytest.mark.parametrize(
    ("where", "offset"),
    [
        ("tink header length byte", lambda h, n: h),
        ("tink salt", lambda h, n: h + 5),
        ("tink nonce prefix", lambda h, n: h + TINK_HEADER - 1),
        ("first segment", lambda h, n: h + TINK_HEADER + 600),
        ("second segment", lambda h, n: h + SEGMENT + 77),
        ("last segment", lambda h, n: n - 100),
        ("tag of the last segment", lambda h, n: n - 1),
        ("tag of the first segment", lambda h, n: h + SEGMENT - 1),
    ],
)
def test_a_flipped_body_byte_fails_authentication(sealed, kms, tmp_path, where, offset):
    data = sealed["bytes"]
    at = offset(sealed["header"].body_offset, len(data))
    path = tampered(tmp_path, flip(data, at))
    message = assert_refused(
        path, tmp_path / "out", kms_unwrap(kms[0]), "failed authentication", "obtain a fresh copy from the owner",
        name="digits-classifier", version="1.0",
    )  # fmt: skip
    if where.startswith(("first", "second", "last")):
        segment = (at - sealed["header"].body_offset) // SEGMENT
        assert f"encrypted segment {segment} " in message


@pytest.mark.parametrize(
    ("where", "keep"),
    [
        ("inside the magic", lambda h, n: 5),
        ("inside the header", lambda h, n: h - 1),
        ("right after the header", lambda h, n: h),
        ("inside the tink header", lambda h, n: h + 20),
        ("inside the first segment", lambda h, n: h + 1000),
        ("on the first segment boundary", lambda h, n: h + SEGMENT),
        ("on the second segment boundary", lambda h, n: h + 2 * SEGMENT),
        ("one byte short", lambda h, n: n - 1),
    ],
)
def test_truncation_is_detected(sealed, kms, tmp_path, where, keep):
    data = sealed["bytes"]
    path = tampered(tmp_path, data[: keep(sealed["header"].body_offset, len(data))])
    assert_refused(path, tmp_path / "out", kms_unwrap(kms[0]), "obtain a fresh copy from the owner")


def test_appended_bytes_are_detected(sealed, kms, tmp_path):
    path = tampered(tmp_path, sealed["bytes"] + b"\0" * 16)
    assert_refused(path, tmp_path / "out", kms_unwrap(kms[0]), "failed authentication")


def test_swapped_and_dropped_segments_are_detected(sealed, kms, tmp_path):
    data, h = sealed["bytes"], sealed["header"].body_offset
    one, two = data[h + SEGMENT : h + 2 * SEGMENT], data[h + 2 * SEGMENT : h + 3 * SEGMENT]
    swapped = data[: h + SEGMENT] + two + one + data[h + 3 * SEGMENT :]
    dropped = data[: h + SEGMENT] + data[h + 2 * SEGMENT :]
    replayed = data[: h + 2 * SEGMENT] + one + data[h + 2 * SEGMENT :]  # segment 1 again where 2 belongs
    for body, segment in ((swapped, 1), (dropped, 1), (replayed, 2)):
        path = tampered(tmp_path, body)
        phrase = f"failed authentication in encrypted segment {segment} "
        assert_refused(path, tmp_path / "out", kms_unwrap(kms[0]), phrase)


def test_header_transplanted_from_another_package_fails(sealed, kms, tmp_path):
    """Same name, version and KMS key: the other header unwraps fine, but its key and bytes are not this body's."""
    client, key_id = kms
    src = tmp_path / "other"
    src.mkdir()
    (src / "x.txt").write_text("another package")
    other = seal(src, tmp_path / "other.pkg", kms_client=client, key_id=key_id, name="digits-classifier", version="1.0")
    body = sealed["bytes"][sealed["header"].body_offset :]
    path = tampered(tmp_path, other.raw + body)
    assert_refused(path, tmp_path / "out", kms_unwrap(client), "failed authentication in encrypted segment 0 ")


def test_header_with_the_right_key_but_edited_fields_fails(sealed, kms, tmp_path):
    """Re-encode a well-formed header with another version: the key unwraps, the associated data differs."""
    h = sealed["header"]
    edited = package_format._make_header(
        name=h.name, version="1.1", key_id=h.key_id, encryption_context=h.encryption_context,
        wrapped_key=h.wrapped_key, manifest_digest=h.manifest_digest,
    )  # fmt: skip
    path = tampered(tmp_path, edited.raw + sealed["bytes"][h.body_offset :])
    assert_refused(path, tmp_path / "out", kms_unwrap(kms[0]), "failed authentication in encrypted segment 0 ")


def test_wrong_key_fails(sealed, tmp_path):
    assert_refused(sealed["path"], tmp_path / "out", lambda header: os.urandom(32), "failed authentication")
    assert_refused(sealed["path"], tmp_path / "out", lambda header: b"short", "must be 32 bytes")


def test_an_unwrap_failure_names_the_package(sealed, tmp_path):
    def unwrap(header):
        raise RuntimeError("KMS said no")

    assert_refused(sealed["path"], tmp_path / "out", unwrap, "could not unwrap its data key (KMS said no)",
                   name="digits-classifier", version="1.0")  # fmt: skip


def test_failure_after_files_were_written_removes_them(sealed, kms, tmp_path):
    """The last segment is read after every file: all of them were written, and all must be gone."""
    data = sealed["bytes"]
    path = tampered(tmp_path, flip(data, len(data) - 1))
    target = tmp_path / "mnt"
    target.mkdir()
    assert_refused(path, target, kms_unwrap(kms[0]), "failed authentication")
    assert os.listdir(target) == []


# --------------------------------------------------------------------------- hostile archives


OK = b"a harmless file written before the hostile member\n"


def hostile_cases():
    """(id, entries, members, expected phrase): each valid but for one thing, after a harmless file."""
    first = "+written-first.txt"  # '+' sorts before every other name used here, as the manifest order requires
    ok_entry, ok_member = file_entry(first, OK), (member(first, size=len(OK)), OK)
    evil = b"pwned\n"

    def case(name, entries, members, phrase):
        return pytest.param([ok_entry, *entries], [ok_member, *members], phrase, id=name)

    return [
        case("absolute path", [file_entry("/tmp/evil", evil)], [(member("/tmp/evil", size=6), evil)], "absolute"),
        case("absolute member", [file_entry("tmp-evil", evil)], [(member("/tmp-evil", size=6), evil)],
             "where its manifest lists 'tmp-evil'"),
        case("dot-dot", [file_entry("../evil", evil)], [(member("../evil", size=6), evil)], "'..'"),
        case("nested dot-dot", [dir_entry("a"), file_entry("a/../../evil", evil)],
             [(member("a", tarfile.DIRTYPE, mode=0o755), None), (member("a/../../evil", size=6), evil)], "'..'"),
        case("symlink out", [file_entry("link", b"")],
             [(member("link", tarfile.SYMTYPE, linkname="/etc/passwd"), None)], "symbolic link"),
        case("hard link out", [file_entry("hl", b"")],
             [(member("hl", tarfile.LNKTYPE, linkname="../../etc/shadow"), None)], "hard link"),
        case("character device", [file_entry("null", b"")],
             [(member("null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)], "character device"),
        case("block device", [file_entry("sda", b"")],
             [(member("sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None)], "block device"),
        case("fifo", [file_entry("pipe", b"")], [(member("pipe", tarfile.FIFOTYPE), None)], "fifo"),
        case("gnu sparse member", [file_entry("sparse", b"")], [(member("sparse", tarfile.GNUTYPE_SPARSE), None)],
             "sparse"),
        case("pax sparse member", [file_entry("sparse", evil)],
             [(member("sparse", size=6, pax_headers={"GNU.sparse.size": "1099511627776",
                                                     "GNU.sparse.map": "0,6"}), evil)], "sparse"),
        case("member bigger than manifest", [file_entry("big", evil)], [(member("big", size=1 << 40), None)],
             "claims 1099511627776 bytes; its manifest says 6"),
        case("member not in manifest", [], [(member("extra.txt", size=6), evil)], "which its manifest does not list"),
        case("member out of place", [file_entry("b.txt", evil)], [(member("c.txt", size=6), evil)],
             "holds 'c.txt' where its manifest lists 'b.txt'"),
        case("manifest entry missing", [file_entry("missing.txt", evil)], [], "ends before 'missing.txt'"),
        case("content differs from manifest", [file_entry("x.txt", b"honest")], [(member("x.txt", size=6), evil)],
             "content of 'x.txt' does not match"),
        case("setuid mode", [file_entry("suid", evil, mode=0o4755)], [(member("suid", size=6, mode=0o4755), evil)],
             "only 0o644 and 0o755"),
        case("member mode differs", [file_entry("m", evil)], [(member("m", size=6, mode=0o755), evil)],
             "mode 0o755; its manifest says file with mode 0o644"),
        case("dir posing as file", [file_entry("d", b"")], [(member("d", tarfile.DIRTYPE, mode=0o644), None)],
             "is a dir"),
        case("duplicate entry", [file_entry("x", evil), file_entry("x", evil)],
             [(member("x", size=6), evil), (member("x", size=6), evil)], "duplicated or out of order"),
        case("file under a file", [file_entry("f", evil), file_entry("f/g", evil)],
             [(member("f", size=6), evil), (member("f/g", size=6), evil)], "not inside a directory"),
        case("manifest name reused", [file_entry(package_format.MANIFEST_NAME, evil)],
             [(member(package_format.MANIFEST_NAME, size=6), evil)], "reserved"),
        case("extra pax record", [file_entry("p", evil)], [(member("p", size=6, pax_headers={"uid": "0"}), evil)],
             "PAX records"),
        case("linkpath pax record", [file_entry("p", evil)],
             [(member("p", size=6, pax_headers={"linkpath": "/etc/passwd"}), evil)], "PAX records"),
    ]  # fmt: skip


@pytest.mark.parametrize("target_exists", [True, False], ids=["empty-target", "missing-target"])
@pytest.mark.parametrize(("entries", "members", "phrase"), hostile_cases())
def test_hostile_archive_is_refused_and_leaves_nothing(tmp_path, entries, members, phrase, target_exists):
    path = hostile_package(tmp_path, entries, members)
    target = tmp_path / "out"
    if target_exists:
        target.mkdir()
    message = assert_refused(path, target, known_key, phrase, name="hostile", version="6.6.6")
    assert "re-seal" in message
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_total_size_over_the_limit_is_refused_before_writing(tmp_path):
    entries = [file_entry("a.bin", b"x" * 600), file_entry("b.bin", b"y" * 600)]
    members = [(member("a.bin", size=600), b"x" * 600), (member("b.bin", size=600), b"y" * 600)]
    path = hostile_package(tmp_path, entries, members)
    target = tmp_path / "out"
    target.mkdir()
    assert_refused(path, target, known_key, "1200 bytes, more than max_total_bytes=1000", max_total_bytes=1000)
    open_package(path, target, unwrap_key=known_key, max_total_bytes=1200)
    assert (target / "b.bin").read_bytes() == b"y" * 600


def test_manifest_claiming_a_huge_total_is_refused_by_the_default_limit(tmp_path):
    entries = [ManifestEntry("huge.bin", "file", 0o644, 1 << 50, "0" * 64)]
    path = hostile_package(tmp_path, entries, [(member("huge.bin", size=1 << 50), None)])
    assert_refused(path, tmp_path / "out", known_key, "more than max_total_bytes")


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"digest": hashlib.sha256(b"another manifest").digest()}, "does not match the digest in its header"),
        ({"manifest": cbor2.dumps([{"type": "dir", "path": "d", "mode": 0o755, "size": 0, "sha256": ""}])},
         "not canonically encoded"),
        ({"manifest": cbor2.dumps({"not": "a list"}, canonical=True)}, "not a CBOR array"),
        ({"manifest": b"\xff\x00garbage"}, "not valid CBOR"),
        ({"manifest": cbor2.dumps([{"path": "x"}], canonical=True)}, "does not have exactly the keys"),
        ({"manifest": cbor2.dumps([{"path": "x", "type": "link", "mode": 0o644, "size": 0, "sha256": ""}],
                                  canonical=True)}, "only 'file' and 'dir'"),
    ],
)  # fmt: skip
def test_bad_manifest_is_refused(tmp_path, kwargs, phrase):
    path = hostile_package(tmp_path, [], [], **kwargs)
    assert_refused(path, tmp_path / "out", known_key, phrase)


def test_first_member_must_be_the_manifest(tmp_path):
    manifest = encode_manifest([file_entry("a", b"a")])
    body = build_tar([(member("a", size=1), b"a"),
                      (member(package_format.MANIFEST_NAME, size=len(manifest)), manifest)], manifest=None)  # fmt: skip
    path = hostile_package(tmp_path, [], None, manifest=manifest, tail=body)
    assert_refused(path, tmp_path / "out", known_key, "first member is 'a', not the manifest")


@pytest.mark.parametrize("records", [{"comment": "hidden"}, {"path": "a"}])
def test_global_pax_header_is_refused(tmp_path, records):
    entries = [file_entry("a", b"a")]
    manifest = encode_manifest(entries)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers=records) as tar:
        tar.addfile(member(package_format.MANIFEST_NAME, size=len(manifest)), io.BytesIO(manifest))
        tar.addfile(member("a", size=1), io.BytesIO(b"a"))
    path = hostile_package(tmp_path, entries, None, manifest=manifest, tail=buffer.getvalue())
    assert_refused(path, tmp_path / "out", known_key, "global pax header")


@pytest.mark.parametrize("where", ["after the last record", "inside the end padding", "in the second zero block"])
def test_data_after_the_archive_is_refused(tmp_path, where):
    entries, members = [file_entry("a", b"a")], [(member("a", size=1), b"a")]
    tar = bytearray(build_tar(members, encode_manifest(entries)))
    if where == "after the last record":
        tar += b"smuggled"
    elif where == "inside the end padding":
        tar[-100:-92] = b"smuggled"
    else:  # the archive so far: manifest header+data, 'a' header+data, then the two zero blocks
        end_of_members = 512 + 512 * -(-len(encode_manifest(entries)) // 512) + 512 + 512
        tar[end_of_members + 512 : end_of_members + 520] = b"smuggled"
    path = hostile_package(tmp_path, entries, None, manifest=encode_manifest(entries), tail=bytes(tar))
    assert_refused(path, tmp_path / "out", known_key, "data after the end of its tar archive")


def test_segments_holding_only_end_padding_are_authenticated_too(tmp_path):
    """tarfile never needs the bytes after its end-of-archive block; open must still verify them to the end."""
    entries, members = [file_entry("a", b"a")], [(member("a", size=1), b"a")]
    padding = b"\0" * 1_040_000  # tar padding up to the limit: the last segment holds nothing else
    path = hostile_package(tmp_path, entries, members, tail=padding)
    data = path.read_bytes()
    header_size = len(read_header(path).raw)
    assert len(data) > header_size + SEGMENT  # two segments, the second all padding
    open_package(path, tmp_path / "intact", unwrap_key=known_key)
    # A flip fails the segment it is in; a cut on a boundary fails the segment before it, now wrongly last.
    for body, segment in ((flip(data, len(data) - 20), 1), (data[: header_size + SEGMENT], 0)):
        path.write_bytes(body)
        assert_refused(path, tmp_path / "out", known_key, f"failed authentication in encrypted segment {segment} ")


def test_bytes_appended_after_a_full_final_segment_are_detected(tmp_path):
    """A plaintext that exactly fills its segments ends with a full segment sealed as the last one; Tink's Python
    binding ignores what follows it (see test_open_decrypts_what_tink_writes_and_refuses_what_tink_refuses)."""
    entries, members = [file_entry("a", b"a")], [(member("a", size=1), b"a")]
    tar = build_tar(members, encode_manifest(entries))
    path = hostile_package(tmp_path, entries, members, tail=b"\0" * (FIRST_PLAINTEXT - len(tar)))
    data = path.read_bytes()
    assert len(data) == read_header(path).body_offset + SEGMENT
    open_package(path, tmp_path / "intact", unwrap_key=known_key)
    path.write_bytes(data + b"\0" * 16)
    assert_refused(path, tmp_path / "out", known_key, "failed authentication in encrypted segment 0 ")


@pytest.mark.parametrize("where", [0, 300_000, 3 * SEGMENT - 1])
def test_a_large_file_differing_from_its_manifest_is_refused(tmp_path, where):
    """Files of IO_BYTES or more are hashed on a second thread while they are written: a difference anywhere
    in them still refuses the package, after the last piece, and removes everything written."""
    content = os.urandom(3 * SEGMENT)
    entries = [file_entry("+first.txt", OK), file_entry("model.bin", content)]
    altered = flip(content, where)
    members = [(member("+first.txt", size=len(OK)), OK), (member("model.bin", size=len(content)), altered)]
    path = hostile_package(tmp_path, entries, members)
    assert_refused(path, tmp_path / "out", known_key, "content of 'model.bin' does not match its manifest entry")


def test_a_body_ending_inside_a_member_is_refused(tmp_path):
    """The plaintext is authentic (sealed so, under the key) but stops in the middle of a file's content."""
    content = os.urandom(400_000)
    entries, members = [file_entry("cut.bin", content)], [(member("cut.bin", size=len(content)), content)]
    tar = build_tar(members, encode_manifest(entries))
    path = hostile_package(tmp_path, entries, None, manifest=encode_manifest(entries), tail=tar[:300_000])
    assert_refused(path, tmp_path / "out", known_key, "not a valid tar stream", "unexpected end of data")


def test_a_failing_write_fails_the_open_and_removes_everything(tmp_path):
    """The target fills up (here RLIMIT_FSIZE in a child process: EFBIG, as ENOSPC would be) while the file
    being written is hashed on the second thread: the error reaches the caller and nothing is left."""
    content = os.urandom(3 * SEGMENT)
    entries = [file_entry("+first.txt", OK), file_entry("model.bin", content)]
    members = [(member("+first.txt", size=len(OK)), OK), (member("model.bin", size=len(content)), content)]
    path = hostile_package(tmp_path, entries, members)
    target = tmp_path / "out"
    child = f"""
import resource, signal, sys
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import PackageError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_open import open_package
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({SEGMENT}, resource.RLIM_INFINITY))
try:
    open_package({str(path)!r}, {str(target)!r}, unwrap_key=lambda header: bytes.fromhex({KEY.hex()!r}))
except PackageError as exc:
    print(exc)
    sys.exit(3)
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=False)
    assert result.returncode == 3, result.stderr
    assert "could not be opened into" in result.stdout and "File too large" in result.stdout
    assert not target.exists()
    open_package(path, target, unwrap_key=known_key)  # the package itself is fine
    assert (target / "model.bin").read_bytes() == content


def test_body_that_is_not_a_tar_stream_is_refused(tmp_path):
    path = hostile_package(tmp_path, [], None, tail=os.urandom(5000))
    assert_refused(path, tmp_path / "out", known_key, "not a valid tar stream")


def test_empty_package_round_trips(tmp_path):
    path = hostile_package(tmp_path, [], [])
    assert open_package(path, tmp_path / "out", unwrap_key=known_key) == []
    assert os.listdir(tmp_path / "out") == []


# --------------------------------------------------------------------------- sealing rules


def seal_with_moto(kms, src: Path, out: Path) -> PackageHeader:
    client, key_id = kms
    return seal(src, out, kms_client=client, key_id=key_id, name="n", version="1")


def assert_seal_refused(kms, src: Path, out: Path, phrase: str) -> None:
    with pytest.raises(PackageError, match=phrase):
        seal_with_moto(kms, src, out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda src: (src / "link").symlink_to(src / "a.txt"), "'link' is a symbolic link"),
        (lambda src: (src / "dirlink").symlink_to("/etc"), "'dirlink' is a symbolic link"),
        (lambda src: os.mkfifo(src / "pipe"), "'pipe' is a fifo"),
        (lambda src: (src / package_format.MANIFEST_NAME).write_text("x"), "reserved"),
        (lambda src: os.mkdir(os.path.join(os.fsencode(src), b"bad\xffname")), "not valid UTF-8"),
    ],
    ids=["symlink", "symlink to dir", "fifo", "reserved name", "non-utf8 name"],
)
def test_seal_refuses_what_a_package_cannot_hold(kms, tmp_path, make, phrase):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    make(src)
    assert_seal_refused(kms, src, tmp_path / "a.pkg", phrase)


def test_seal_refuses_a_missing_source(kms, tmp_path):
    assert_seal_refused(kms, tmp_path / "nope", tmp_path / "a.pkg", "not a directory")


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (lambda f: f.write_bytes(f.read_bytes() + b"more"), "now longer"),
        (lambda f: f.write_bytes(f.read_bytes()[:-1]), "now shorter"),
        (lambda f: f.write_bytes(bytes(len(f.read_bytes()))), "content differs"),
        (lambda f: (f.unlink(), f.symlink_to("/etc/hostname")), "changed while it was being sealed"),
        (lambda f: f.unlink(), "changed while it was being sealed"),
    ],
    ids=["grown", "shrunk", "rewritten", "replaced by a link", "removed"],
)
def test_seal_fails_cleanly_if_a_file_changes_between_the_passes(kms, tmp_path, monkeypatch, change, phrase):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first")
    victim = src / "b.bin"
    victim.write_bytes(os.urandom(400_000))
    first_pass = package_seal._build_manifest

    def first_pass_then_change(root, meter):
        entries = first_pass(root, meter)
        change(victim)
        return entries

    monkeypatch.setattr(package_seal, "_build_manifest", first_pass_then_change)
    assert_seal_refused(kms, src, tmp_path / "a.pkg", phrase)


def test_seal_replaces_out_path_atomically(kms, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("v1")
    out = tmp_path / "a.pkg"
    out.write_bytes(b"previous package")
    seal_with_moto(kms, src, out)
    assert read_header(out).name == "n"
    assert sorted(os.listdir(tmp_path)) == ["a.pkg", "src"]


def test_read_header_refuses_other_files_clearly(tmp_path):
    path = tmp_path / "x.pkg"
    path.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(PackageError, match="does not start with the package magic"):
        read_header(path)
    body = cbor2.dumps({"format_version": 1, "name": "n"}, canonical=True)
    path.write_bytes(package_format.MAGIC + struct.pack(">I", len(body)) + body)
    with pytest.raises(PackageError, match="has fields \\['format_version', 'name'\\], expected"):
        read_header(path)
    with pytest.raises(PackageError, match="cannot read package"):
        read_header(tmp_path / "missing.pkg")


def test_read_header_names_a_newer_format(tmp_path):
    # Format 2 (signed) exists now: 3 is the first one this release cannot read.
    body = cbor2.dumps({"format_version": 3, "a field v2 does not know": b""}, canonical=True)
    path = tmp_path / "new.pkg"
    path.write_bytes(package_format.MAGIC + struct.pack(">I", len(body)) + body)
    with pytest.raises(PackageError, match="uses package format 3; this confidential_ml.nitro reads formats 1, 2"):
        read_header(path)


# --------------------------------------------------------------------------- test vector


@pytest.fixture(scope="module", params=["v2-tiny", "v1-tiny"])
def vector(request):
    """The signed format-2 vector, and the unsigned format-1 one that unbound images still open."""
    expected = json.loads((VECTORS / f"{request.param}.json").read_text())
    return VECTORS / f"{request.param}.cmlpkg", expected


def vector_signer(expected) -> Signer | None:
    """The vector's signing key (published on purpose, like its data key), or None for format 1."""
    if "signing_key_d_hex" not in expected:
        return None
    private = ec.derive_private_key(int(expected["signing_key_d_hex"], 16), ec.SECP384R1())
    return Signer(expected["header"]["signer"]["key_id"], private)


def test_vector_file_is_the_published_one(vector):
    path, expected = vector
    data = path.read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (expected["file_size"], expected["file_sha256"])


def test_vector_header_decodes_to_the_expected_fields(vector):
    path, expected = vector
    header = read_header(path)
    assert header.to_json() == expected["header"]
    assert header.raw.hex() == expected["header_raw_hex"]


def test_vector_header_encoding_is_reproduced(vector, tmp_path):
    """Writing a package with the same fields gives the same header bytes: the encoding has not drifted."""
    path, expected = vector
    h = expected["header"]
    written = write_package(
        tmp_path / "again.pkg", name=h["name"], version=h["version"], key_id=h["key_id"],
        encryption_context=h["encryption_context"], wrapped_key=base64.b64decode(h["wrapped_key"]),
        manifest_digest=bytes.fromhex(h["manifest_digest"]), data_key=bytes.fromhex(expected["data_key_hex"]),
        body_chunks=[], signer=vector_signer(expected),
    )  # fmt: skip
    assert written.raw.hex() == expected["header_raw_hex"]


def test_vector_signature_verifies_by_the_spec_alone(vector):
    """Section 1 and 2.1: the signature block after the header is DER ECDSA P-384/SHA-384 over the header bytes,
    by the public key the header names by its SHA-256."""
    path, expected = vector
    if expected["header"]["format_version"] == 1:
        assert "signer" not in expected["header"]
        return
    data = path.read_bytes()
    (length,) = struct.unpack(">I", data[8:12])
    raw = data[: 12 + length]
    (signature_length,) = struct.unpack(">H", data[12 + length : 14 + length])
    signature = data[14 + length : 14 + length + signature_length]
    public_der = base64.b64decode(expected["signing_public_key"])
    assert hashlib.sha256(public_der).hexdigest() == expected["header"]["signer"]["fingerprint"]
    assert cbor2.loads(raw[12:])["signer_fingerprint"].hex() == expected["header"]["signer"]["fingerprint"]
    serialization.load_der_public_key(public_der).verify(signature, raw, ec.ECDSA(hashes.SHA384()))
    identity = OwnerIdentity((OwnerKey(expected["header"]["signer"]["key_id"], public_der),))
    assert identity.check_package(read_header(path)).key_id == expected["header"]["signer"]["key_id"]


def test_vector_opens_to_the_expected_tree(vector, tmp_path):
    path, expected = vector
    data_key = bytes.fromhex(expected["data_key_hex"])
    entries = open_package(path, tmp_path / "out", unwrap_key=lambda header: data_key)
    assert [entry.__dict__ for entry in entries] == expected["manifest"]
    for rel, content in expected["tree"].items():
        target = tmp_path / "out" / rel
        if content is None:
            assert target.is_dir()
        else:
            assert target.read_bytes() == content.encode()
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")) == sorted(
        expected["tree"]
    )


def test_vector_manifest_digest_is_reproduced_from_the_tree(vector, tmp_path):
    path, expected = vector
    root = tmp_path / "tree"
    root.mkdir()
    for entry in expected["manifest"]:
        target = root / entry["path"]
        if entry["type"] == "dir":
            target.mkdir()
        else:
            target.write_bytes(expected["tree"][entry["path"]].encode())
        target.chmod(entry["mode"])
    assert manifest_digest(build_manifest(root)).hex() == expected["header"]["manifest_digest"]


def test_vector_decrypts_by_the_spec_alone(vector):
    """An independent reading of docs/PACKAGE_FORMAT.md (cryptography's HKDF and AES-GCM, no Tink)."""
    path, expected = vector
    raw, plaintext = decrypt_per_spec(path, bytes.fromhex(expected["data_key_hex"]))
    assert raw.hex() == expected["header_raw_hex"]
    with tarfile.open(fileobj=io.BytesIO(plaintext), mode="r:") as tar:
        names = tar.getnames()
        manifest = tar.extractfile(package_format.MANIFEST_NAME).read()
    assert names == [package_format.MANIFEST_NAME, *(entry["path"] for entry in expected["manifest"])]
    assert hashlib.sha256(manifest).hexdigest() == expected["header"]["manifest_digest"]
    assert cbor2.loads(manifest) == expected["manifest"]


def test_multi_segment_package_decrypts_by_the_spec_alone(tmp_path):
    """The segment layout (first segment shortened by Tink's header, last-segment flag) on 3+ segments."""
    content = os.urandom(2 * SEGMENT + 999)
    entries, members = [file_entry("big", content)], [(member("big", size=len(content)), content)]
    path = hostile_package(tmp_path, entries, members)
    _raw, plaintext = decrypt_per_spec(path, KEY)
    with tarfile.open(fileobj=io.BytesIO(plaintext), mode="r:") as tar:
        assert tar.extractfile("big").read() == content


FIRST_PLAINTEXT = SEGMENT - TINK_HEADER - 16  # plaintext room of segment 0, then of every later segment:
LATER_PLAINTEXT = SEGMENT - 16
AGREEMENT_SIZES = [0, 1, FIRST_PLAINTEXT - 1, FIRST_PLAINTEXT, FIRST_PLAINTEXT + 1,
                   FIRST_PLAINTEXT + LATER_PLAINTEXT, FIRST_PLAINTEXT + LATER_PLAINTEXT + 4321]  # fmt: skip


def tink_decrypt(ciphertext: bytes, associated_data: bytes) -> bytes | None:
    """What Tink's own decrypting stream returns for a ciphertext, or None if it refuses it."""
    stream = package_seal._streaming_aead(KEY).new_decrypting_stream(io.BytesIO(ciphertext), associated_data)
    try:
        return stream.read()
    except package_seal.tink.TinkError:
        return None


def own_decrypt(ciphertext: bytes, associated_data: bytes) -> bytes | None:
    """What open_package's decryption (cryptography's AES-GCM on Tink's segment format) returns, or None."""
    try:
        return b"".join(package_open._decrypt_segments(io.BytesIO(ciphertext), KEY, associated_data))
    except package_open._SegmentFailed:
        return None


@pytest.mark.parametrize("size", AGREEMENT_SIZES)
def test_open_decrypts_what_tink_writes_and_refuses_what_tink_refuses(size):
    """open_package does not use Tink to decrypt: hold its decryption to Tink's, on every segment-boundary case
    and on the damage that must fail (cuts on and inside segments, appended bytes, flipped bytes, dropped,
    repeated and reordered segments). It is stricter than Tink's binding in one case, pinned here."""
    plaintext, ad = os.urandom(size), b"header bytes, the associated data"
    buffer = io.BytesIO()
    buffer.close = lambda: None  # Tink closes its destination when the stream ends
    with package_seal._streaming_aead(KEY).new_encrypting_stream(buffer, ad) as stream:
        stream.write(plaintext)
    ciphertext = buffer.getvalue()
    assert tink_decrypt(ciphertext, ad) == plaintext == own_decrypt(ciphertext, ad)
    segments = [ciphertext[:SEGMENT]] + [ciphertext[i : i + SEGMENT] for i in range(SEGMENT, len(ciphertext), SEGMENT)]
    damaged = {
        "other associated data": (ciphertext, ad + b"!"),
        "appended byte": (ciphertext + b"\0", ad),
        "one byte short": (ciphertext[:-1], ad),
        "cut inside the Tink header": (ciphertext[: TINK_HEADER - 1], ad),
        "only the Tink header": (ciphertext[:TINK_HEADER], ad),
        "Tink header length byte": (b"\x29" + ciphertext[1:], ad),
        "last tag": (flip(ciphertext, len(ciphertext) - 1), ad),
        "first ciphertext byte": (flip(ciphertext, TINK_HEADER), ad) if size else (ciphertext[:-1], ad),
        "nonce prefix": (flip(ciphertext, TINK_HEADER - 1), ad),
    }
    if len(segments) > 1:
        damaged |= {
            "cut on a segment boundary": (b"".join(segments[:-1]), ad),
            "last segment repeated": (ciphertext + segments[-1], ad),
            "segment 0 repeated": (segments[0] + ciphertext[TINK_HEADER:SEGMENT] + b"".join(segments[1:]), ad),
        }
    if len(segments) > 2:
        damaged["segments 1 and 2 swapped"] = (segments[0] + segments[2] + segments[1], ad)
    for what, (data, associated_data) in damaged.items():
        assert own_decrypt(data, associated_data) is None, what
        if what in ("appended byte", "last segment repeated") and len(ciphertext) % SEGMENT == 0:
            # Tink's Python binding (1.16 here) stops after a full final segment and ignores whatever follows:
            # the plaintext it returns is still whole and authentic. Open refuses the package instead.
            assert tink_decrypt(data, associated_data) in (None, plaintext), what
        else:
            assert tink_decrypt(data, associated_data) is None, what


def test_a_segment_from_another_package_under_the_same_key_and_header_fails(tmp_path):
    """The claim open relies on instead of trusting the sealer's tooling: a segment verifies only in its own
    package, at its own index. Even two packages with the same data key, byte-identical headers and the same
    plaintext share no segment: each draws its own salt (so its own segment key) and nonce prefix."""
    content = os.urandom(2 * SEGMENT)
    entries, members = [file_entry("model.bin", content)], [(member("model.bin", size=len(content)), content)]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, two = hostile_package(tmp_path / "one", entries, members), hostile_package(tmp_path / "two", entries, members)
    a, b = one.read_bytes(), two.read_bytes()
    h = read_header(one).body_offset
    assert read_header(two).raw == read_header(one).raw and a[h:] != b[h:]
    open_package(two, tmp_path / "intact", unwrap_key=known_key)  # each opens on its own
    spliced = {
        1: a[: h + SEGMENT] + b[h + SEGMENT : h + 2 * SEGMENT] + a[h + 2 * SEGMENT :],  # segment 1 of the other
        2: a[: h + 2 * SEGMENT] + b[h + 2 * SEGMENT :],  # the other's last segment (the same plaintext)
        0: a[:h] + b[h : h + TINK_HEADER] + a[h + TINK_HEADER :],  # the other's salt and nonce prefix
    }
    for segment, data in spliced.items():
        path = tampered(tmp_path, data)
        assert_refused(path, tmp_path / "out", known_key, f"failed authentication in encrypted segment {segment} ")


# --------------------------------------------------------------------------- the owner's signature (format 2)


def counting_unwrap(client):
    """An unwrap that counts its calls: a refused package must not reach KMS."""
    unwrap = kms_unwrap(client)

    def counted(header):
        counted.calls += 1
        return unwrap(header)

    counted.calls = 0
    return counted


def resign_as(header: PackageHeader, signature: bytes) -> bytes:
    return header.raw + struct.pack(">H", len(signature)) + signature


def test_signed_header_names_its_signer_and_carries_the_signature(sealed):
    header = read_header(sealed["path"])
    assert (header.format_version, header.signer_key_id) == (2, OWNER_ARN)
    assert header.signer_fingerprint == OWNER.key.fingerprint == hashlib.sha256(OWNER.key.public_key).digest()
    assert OWNER.key.verifies(header.signature, header.raw)
    assert header.to_json()["signer"] == {
        "key_id": OWNER_ARN,
        "fingerprint": OWNER.key.fingerprint.hex(),
        "signature": base64.b64encode(header.signature).decode(),
    }
    assert (
        sealed["bytes"][len(header.raw) : header.body_offset] == resign_as(header, header.signature)[len(header.raw) :]
    )


def test_the_owners_package_passes_the_owner_check_and_opens(sealed, kms, tmp_path):
    identity = OwnerIdentity((Signer(HOST_ARN).key, OWNER.key))  # rotation: any listed key may sign
    opened = []
    open_package(
        sealed["path"], tmp_path / "out", unwrap_key=kms_unwrap(kms[0]), check_header=lambda h: opened.append(
            identity.check_package(h))
    )  # fmt: skip
    assert opened == [OWNER.key]
    assert snapshot(tmp_path / "out") == source_snapshot(sealed["src"])


def test_unsigned_package_is_refused_by_a_bound_image_before_kms(kms, tmp_path):
    """Format 1 (the host's own package, sealed under the host's own KMS key and signed by nobody)."""
    client, key_id = kms
    src = tmp_path / "src"
    src.mkdir()
    (src / "run.py").write_text("print('the host's own code')\n")
    path = tmp_path / "unsigned.pkg"
    seal(src, path, kms_client=client, key_id=key_id, name="evil", version="1")
    refused_before_kms(
        path, tmp_path, client, "package 'evil' 1 is not signed (package format 1)", OWNER_ARN,
        OWNER.key.fingerprint.hex(), "--signing-key",
    )  # fmt: skip


def refused_before_kms(path, tmp_path, client, *phrases) -> str:
    unwrap = counting_unwrap(client)
    identity = OwnerIdentity((OWNER.key,))
    with pytest.raises(PackageError) as raised:
        open_package(path, tmp_path / "out", unwrap_key=unwrap, check_header=identity.check_package)
    assert unwrap.calls == 0
    assert not (tmp_path / "out").exists()
    for phrase in phrases:
        assert phrase in str(raised.value), f"{phrase!r} not in {raised.value}"
    return str(raised.value)


def test_package_signed_by_another_key_is_refused_naming_both_keys(kms, tmp_path):
    client, key_id = kms
    src = tmp_path / "src"
    src.mkdir()
    (src / "run.py").write_text("print('the host signed this')\n")
    host = Signer(HOST_ARN)
    path = tmp_path / "host.pkg"
    seal(src, path, kms_client=client, key_id=key_id, name="evil", version="1", signer=host)
    refused_before_kms(
        path, tmp_path, client, f"signed by {HOST_ARN} (public key SHA-256 {host.key.fingerprint.hex()})",
        f"owner's key {OWNER_ARN} (public key SHA-256 {OWNER.key.fingerprint.hex()})",
    )  # fmt: skip


def test_host_key_claiming_the_owners_fingerprint_fails_verification(kms, tmp_path):
    """The header's signer fields are claims: a host key that names the owner's key is checked against it."""
    client, key_id = kms
    src = tmp_path / "src"
    src.mkdir()
    (src / "run.py").write_text("print('forged')\n")
    host = Signer(HOST_ARN)
    host.key = OWNER.key  # the header claims the owner; the signature is the host's
    path = tmp_path / "forged.pkg"
    seal(src, path, kms_client=client, key_id=key_id, name="evil", version="1", signer=host)
    refused_before_kms(path, tmp_path, client, "its signature does not verify over its header")


def test_owner_signature_transplanted_onto_a_modified_header_is_refused(sealed, kms, tmp_path):
    """The host keeps the owner's signature and edits the header (here: points it at its own data key)."""
    client, key_id = kms
    h = sealed["header"]
    host_key = client.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=h.encryption_context)
    edited = package_format._make_header(
        name=h.name, version=h.version, key_id=h.key_id, encryption_context=h.encryption_context,
        wrapped_key=host_key["CiphertextBlob"], manifest_digest=h.manifest_digest,
    )  # fmt: skip
    # The edited header as format 2 with the owner's signer fields, followed by the owner's signature.
    fields = cbor2.loads(edited.raw[12:]) | {
        "format_version": 2, "signer_key_id": h.signer_key_id, "signer_fingerprint": h.signer_fingerprint,
    }  # fmt: skip
    body = cbor2.dumps(fields, canonical=True)
    raw = package_format.MAGIC + struct.pack(">I", len(body)) + body
    path = tampered(
        tmp_path, raw + struct.pack(">H", len(h.signature)) + h.signature + sealed["bytes"][h.body_offset :]
    )
    assert read_header(path).signer_fingerprint == OWNER.key.fingerprint
    refused_before_kms(path, tmp_path, client, "its signature does not verify over its header", OWNER_ARN)


def test_every_signature_byte_is_checked(sealed, kms, tmp_path):
    h = sealed["header"]
    for offset in range(len(h.raw) + 2, h.body_offset):
        path = tampered(tmp_path, flip(sealed["bytes"], offset))
        try:
            header = read_header(path)
        except PackageError:
            continue  # a DER length byte changed: still refused
        with pytest.raises(PackageError):
            OwnerIdentity((OWNER.key,)).check_package(header)


@pytest.mark.parametrize(
    ("block", "phrase"),
    [
        (b"", "ends before its signature"),
        (b"\x00", "ends before its signature"),
        (b"\x00\x00", "signature claims 0 bytes"),
        (b"\x02\x01" + b"x" * 513, "signature claims 513 bytes"),
        (b"\x00\x67" + b"x" * 10, "ends inside its 103-byte signature"),
    ],
)
def test_read_header_refuses_a_broken_signature_block(sealed, tmp_path, block, phrase):
    path = tampered(tmp_path, sealed["header"].raw + block)
    with pytest.raises(PackageError, match=phrase):
        read_header(path)


def test_owner_identity_round_trips_and_refuses_bad_files(tmp_path):
    identity = OwnerIdentity((OWNER.key, Signer(HOST_ARN).key))
    assert OwnerIdentity.loads(identity.dumps()) == identity
    assert identity.dumps() == OwnerIdentity.loads(identity.dumps()).dumps()  # canonical: same keys, same PCR0
    data = json.loads(identity.dumps())
    data["signing_keys"][0]["fingerprint"] = "00" * 32
    with pytest.raises(Exception, match="does not match its public key"):
        OwnerIdentity.loads(json.dumps(data).encode())
    rsa_like = base64.b64encode(b"not a key").decode()
    data = json.loads(identity.dumps())
    data["signing_keys"][0]["public_key"] = rsa_like
    with pytest.raises(Exception, match="not DER SubjectPublicKeyInfo"):
        OwnerIdentity.loads(json.dumps(data).encode())
    p256 = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(Exception, match="not an ECC NIST P-384 key"):
        OwnerKey("arn:x", p256)
    with pytest.raises(Exception, match="1 to 16 signing keys"):
        OwnerIdentity(())
    with pytest.raises(Exception, match="same public key twice"):
        OwnerIdentity((OWNER.key, OWNER.key))


@pytest.mark.parametrize("version", [True, 1.0, 2.0, "2"])
def test_format_version_must_be_an_integer(tmp_path, version):
    """True == 1 and 2.0 == 2 in Python: a header must still say 1 or 2 as a CBOR integer."""
    fields = {
        "format_version": version, "name": "n", "version": "1", "key_id": "k", "encryption_context": {},
        "wrapped_key": b"w", "manifest_digest": bytes(32),
    }  # fmt: skip
    body = cbor2.dumps(fields, canonical=True)
    path = tmp_path / "odd.pkg"
    path.write_bytes(package_format.MAGIC + struct.pack(">I", len(body)) + body)
    with pytest.raises(PackageError, match="uses package format"):
        read_header(path)
