"""The encrypted package: one file that only the holder of its KMS data key can open.

seal() turns a directory into a package; open_package() turns a package back into a
private directory, refusing anything that was modified, truncated, reordered or that
holds more than plain files and directories. The byte layout, the tar profile and
the reasons each attack is detected are in docs/PACKAGE_FORMAT.md; keep the two in step.

    file   = MAGIC || u32be(len(cbor)) || cbor(header fields)    <- the "header", also the body's associated data
             || u16be(len(sig)) || sig                             <- format 2: the owner's ECDSA P-384 signature
             || Tink AES256_GCM_HKDF_1MB streaming ciphertext of a tar stream
    tar    = .package-manifest.cbor, then every manifest entry in manifest order

Both directions stream (seal in 256 KiB pieces, open a 1 MiB segment at a time): memory stays flat whatever
the package size. Seal encrypts with Tink; open decrypts Tink's format with cryptography's AES-GCM.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import io
import os
import shutil
import stat
import struct
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

try:
    import cbor2
    import tink
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from tink import secret_key_access, streaming_aead
    from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2
    from tqdm import tqdm
except ImportError as exc:  # the modules report it: module_options.require_libraries
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None
    streaming_aead.register()

from .errors import EnclaveError, KmsError, PackageError

MAGIC = b"\x89CMLPKG\n"  # high bit and newline catch 7-bit or text-mode transfers, like PNG's signature
FORMAT_VERSION = 2  # 2: the header names its signer and is followed by the owner's signature; 1: unsigned
READABLE_FORMATS = (1, 2)
MANIFEST_NAME = ".package-manifest.cbor"
DATA_KEY_BYTES = 32
SEGMENT_BYTES = 1 << 20  # Tink ciphertext segment size
TINK_HEADER_BYTES = 1 + 32 + 7  # Tink's streaming header: its own length, HKDF salt, nonce prefix
TAG_BYTES = 16  # AES-GCM tag at the end of every segment
# Seal reads and writes 256 KiB at a time: 1 MiB buffers allocated per piece cost ~60x more page faults (glibc
# hands buffers that large back to the kernel on free). Open reads ciphertext into two reused segment buffers
# and writes views of each decrypted segment; it hashes files of at least IO_BYTES on a second thread.
IO_BYTES = 256 << 10
_HASH_AHEAD = 2  # pieces a file's hashing may lag behind its writing: memory stays flat
MAX_HEADER_BYTES = 64 << 10
MAX_SIGNATURE_BYTES = 512  # a DER ECDSA P-384 signature is at most 104 bytes
MAX_MANIFEST_BYTES = 64 << 20
MAX_TAIL_BYTES = 1 << 20  # zero padding tar may leave after its end-of-archive marker
DEFAULT_MAX_TOTAL_BYTES = 16 << 30

FILE_MODES = (0o644, 0o755)  # like git: only the executable bit survives sealing
DIR_MODE = 0o755
CONTEXT_PACKAGE = "confidential_ml:package"
CONTEXT_VERSION = "confidential_ml:version"

_HEADER_PREFIX = struct.Struct(">8sI")
_SIGNATURE_PREFIX = struct.Struct(">H")
_HEADER_KEYS = frozenset(
    {"format_version", "name", "version", "key_id", "encryption_context", "wrapped_key", "manifest_digest"}
)
_SIGNED_HEADER_KEYS = _HEADER_KEYS | {"signer_key_id", "signer_fingerprint"}
_ENTRY_KEYS = frozenset({"path", "type", "mode", "size", "sha256"})
_ALLOWED_PAX_KEYS = frozenset({"path", "size"})  # what tarfile's PAX writer emits for long/unicode names, >8 GiB files
_REFUSED_MEMBER_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
_OPEN_ADVICE = "obtain a fresh copy from the owner"
_RESEAL_ADVICE = "do not use it; ask the owner to re-seal the directory with confidential_ml.nitro"


@dataclass(frozen=True)
class ManifestEntry:
    """One file or directory of a package; paths are relative, '/'-separated."""

    path: str
    type: str  # "dir" or "file"
    mode: int  # files 0o644 or 0o755, dirs 0o755
    size: int  # 0 for dirs
    sha256: str  # lowercase hex of the content, "" for dirs


@dataclass(frozen=True)
class PackageHeader:
    """The authenticated, unencrypted part of a package; readable without the key."""

    format_version: int
    name: str
    version: str
    key_id: str
    encryption_context: dict[str, str]
    wrapped_key: bytes
    manifest_digest: bytes
    raw: bytes  # the exact header bytes (magic, length, CBOR): the body's associated data and the signed message
    signer_key_id: str | None = None  # format 2: the owner's KMS signing key (ARN), as the signer claims it
    signer_fingerprint: bytes | None = None  # format 2: SHA-256 of the signer's DER public key
    signature: bytes | None = None  # format 2: DER ECDSA P-384 / SHA-384 over raw

    @property
    def body_offset(self) -> int:
        """Where the Tink header starts: after the header and, in format 2, the signature block."""
        return len(self.raw) + (0 if self.signature is None else _SIGNATURE_PREFIX.size + len(self.signature))

    def to_json(self) -> dict:
        data = {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "key_id": self.key_id,
            "encryption_context": dict(self.encryption_context),
            "wrapped_key": base64.b64encode(self.wrapped_key).decode("ascii"),
            "manifest_digest": self.manifest_digest.hex(),
        }
        if self.signature is not None:
            data["signer"] = {
                "key_id": self.signer_key_id,
                "fingerprint": self.signer_fingerprint.hex(),
                "signature": base64.b64encode(self.signature).decode("ascii"),
            }
        return data


# --------------------------------------------------------------------------- manifest


def build_manifest(src_dir) -> list[ManifestEntry]:
    """The manifest of a directory: depth-first, siblings by name, content hashed; refuses links and specials."""
    return _build_manifest(Path(src_dir), _no_progress())


def encode_manifest(entries: Iterable[ManifestEntry]) -> bytes:
    """The canonical CBOR bytes of a manifest, exactly as they travel in the package."""
    return cbor2.dumps(
        [{"path": e.path, "type": e.type, "mode": e.mode, "size": e.size, "sha256": e.sha256} for e in entries],
        canonical=True,
    )


def manifest_digest(entries: Iterable[ManifestEntry]) -> bytes:
    """SHA-256 of the encoded manifest: equal trees give equal digests (how sealing stays idempotent)."""
    return hashlib.sha256(encode_manifest(entries)).digest()


def decode_manifest(data: bytes) -> list[ManifestEntry]:
    """Parse and check manifest bytes; raises ValueError naming the first problem."""
    try:
        items = cbor2.loads(data, allow_duplicate_keys=False, allow_indefinite=False)
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise ValueError(f"the manifest is not valid CBOR ({exc})") from None
    if not isinstance(items, list):
        raise ValueError("the manifest is not a CBOR array")
    entries, dirs, previous = [], set(), ()
    for item in items:
        if not isinstance(item, dict) or set(item) != _ENTRY_KEYS:
            raise ValueError(f"manifest entry {item!r:.200} does not have exactly the keys {sorted(_ENTRY_KEYS)}")
        entry = ManifestEntry(**item)
        _check_entry(entry)
        parts = tuple(entry.path.split("/"))
        if parts <= previous:
            raise ValueError(f"manifest entry {entry.path!r} is duplicated or out of order")
        if len(parts) > 1 and "/".join(parts[:-1]) not in dirs:
            raise ValueError(f"manifest entry {entry.path!r} is not inside a directory listed before it")
        if entry.type == "dir":
            dirs.add(entry.path)
        entries.append(entry)
        previous = parts
    if encode_manifest(entries) != data:
        raise ValueError("the manifest is not canonically encoded")
    return entries


def _check_entry(entry: ManifestEntry) -> None:
    _check_path(entry.path)
    if entry.path == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME!r} is reserved for the manifest itself")
    ints = all(isinstance(value, int) and not isinstance(value, bool) for value in (entry.size, entry.mode))
    if not ints or not isinstance(entry.sha256, str):
        raise ValueError(f"manifest entry {entry.path!r} has fields of the wrong type")
    if entry.type == "dir":
        if entry.mode != DIR_MODE or entry.size != 0 or entry.sha256 != "":
            raise ValueError(f"directory entry {entry.path!r} must have mode 0o755, size 0 and no sha256")
    elif entry.type == "file":
        if entry.mode not in FILE_MODES:
            raise ValueError(f"file entry {entry.path!r} has mode {oct(entry.mode)}; only 0o644 and 0o755 are allowed")
        if entry.size < 0:
            raise ValueError(f"file entry {entry.path!r} has a negative size")
        if len(entry.sha256) != 64 or entry.sha256.strip("0123456789abcdef"):
            raise ValueError(f"file entry {entry.path!r} has a sha256 that is not 64 lowercase hex digits")
    else:
        raise ValueError(f"manifest entry {entry.path!r} has type {entry.type!r}; only 'file' and 'dir' are allowed")


def _check_path(path) -> None:
    """Relative, '/'-separated, no '.', '..' or empty parts, valid UTF-8, within Linux name limits."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"path {path!r} is empty or not text")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"path {path!r} is not valid UTF-8") from None
    if len(encoded) > 4095 or "\0" in path:
        raise ValueError(f"path {path!r} is longer than 4095 bytes or holds a NUL byte")
    for part in path.split("/"):
        if part in ("", ".", "..") or len(part.encode("utf-8")) > 255:
            raise ValueError(f"path {path!r} is absolute, has an empty, '.' or '..' part, or a part over 255 bytes")


def _build_manifest(root: Path, meter: tqdm) -> list[ManifestEntry]:
    if not root.is_dir():
        raise PackageError(f"cannot seal {root}: it is not a directory; pass the directory that holds the package")
    try:
        return _walk(root, meter)
    except OSError as exc:
        raise PackageError(f"cannot read {root}: {exc}; make the whole directory readable and try again") from exc


def _walk(root: Path, meter: tqdm) -> list[ManifestEntry]:
    entries: list[ManifestEntry] = []
    # Pre-order walk with an explicit stack (deep trees need no recursion): a directory's subtree comes right
    # after it, siblings in name order, which is exactly the manifest's canonical order.
    pending = [iter(_sorted_children(root, ""))]
    while pending:
        path = next(pending[-1], None)
        if path is None:
            pending.pop()
            continue
        if path == MANIFEST_NAME:
            raise PackageError(f"cannot seal {root}: {MANIFEST_NAME!r} is reserved for the manifest; rename it")
        try:
            _check_path(path)
        except ValueError as exc:
            raise PackageError(f"cannot seal {root}: {exc}; rename it") from None
        mode = os.lstat(root / path).st_mode
        if stat.S_ISDIR(mode):
            entries.append(ManifestEntry(path, "dir", DIR_MODE, 0, ""))
            pending.append(iter(_sorted_children(root, path)))
        elif stat.S_ISREG(mode):
            with _open_source(root, path) as source:
                reader = _HashingReader(source, meter)
                while reader.read(IO_BYTES):
                    pass
            entries.append(ManifestEntry(path, "file", _file_mode(mode), reader.count, reader.hexdigest()))
        else:
            raise PackageError(
                f"cannot seal {root}: {path!r} is {_kind(mode)}; packages hold only regular files and directories "
                "(links are refused, not followed), so replace it with a copy of what it points to, or remove it"
            )
    return entries


def _sorted_children(root: Path, rel: str) -> list[str]:
    names = sorted(os.listdir(root / rel if rel else root))
    return [f"{rel}/{name}" if rel else name for name in names]


def _file_mode(st_mode: int) -> int:
    return 0o755 if st_mode & 0o111 else 0o644


def _kind(st_mode: int) -> str:
    kinds = {
        stat.S_ISLNK: "a symbolic link",
        stat.S_ISFIFO: "a fifo",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((kind for test, kind in kinds.items() if test(st_mode)), "not a regular file or directory")


def _open_source(root: Path, path: str) -> BinaryIO:
    """Open a source file without following a link that replaced it since it was listed."""
    fd = os.open(root / path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    source = os.fdopen(fd, "rb")  # buffered: a short read means end of file
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        source.close()
        raise OSError(f"{path!r} is no longer a regular file")
    return source


class _HashingReader:
    """Wraps a binary stream: hashes and counts what passes through, and drives a progress meter."""

    def __init__(self, stream, meter: tqdm):
        self._stream = stream
        self._meter = meter
        self._sha = hashlib.sha256()
        self.count = 0
        self.at_eof = False

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.at_eof = len(data) < size or size < 0
        self._sha.update(data)
        self.count += len(data)
        self._meter.update(len(data))
        return data

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _no_progress() -> tqdm:
    return tqdm(disable=True)


# --------------------------------------------------------------------------- header


def _make_header(
    *,
    name: str,
    version: str,
    key_id: str,
    encryption_context: dict[str, str],
    wrapped_key: bytes,
    manifest_digest: bytes,
    signer=None,
) -> PackageHeader:
    fields = {
        "format_version": 1 if signer is None else FORMAT_VERSION,
        "name": name,
        "version": version,
        "key_id": key_id,
        "encryption_context": dict(encryption_context),
        "wrapped_key": bytes(wrapped_key),
        "manifest_digest": bytes(manifest_digest),
    }
    if signer is not None:
        fields.update(signer_key_id=signer.key.key_id, signer_fingerprint=signer.key.fingerprint)
    try:
        _check_header_fields(fields)
    except ValueError as exc:
        raise PackageError(f"cannot write package {name!r} {version}: {exc}; fix the arguments") from None
    body = cbor2.dumps(fields, canonical=True)
    if len(body) > MAX_HEADER_BYTES:
        raise PackageError(
            f"cannot write package {name!r} {version}: its header would be {len(body)} bytes, over the "
            f"{MAX_HEADER_BYTES}-byte limit; shorten the encryption context"
        )
    header = PackageHeader(**fields, raw=_HEADER_PREFIX.pack(MAGIC, len(body)) + body)
    if signer is None:
        return header
    signature = bytes(signer.sign(header.raw))
    if not 1 <= len(signature) <= MAX_SIGNATURE_BYTES:
        raise PackageError(f"cannot write package {name!r} {version}: the signer returned {len(signature)} bytes")
    return replace(header, signature=signature)


def _check_header_fields(fields: dict) -> None:
    for key in ("name", "version", "key_id"):
        if not isinstance(fields[key], str) or not fields[key]:
            raise ValueError(f"{key} must be non-empty text")
    context = fields["encryption_context"]
    if not isinstance(context, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in context.items()):
        raise ValueError("encryption_context must map text to text")
    if not isinstance(fields["wrapped_key"], bytes) or not fields["wrapped_key"]:
        raise ValueError("wrapped_key must be non-empty bytes")
    if not isinstance(fields["manifest_digest"], bytes) or len(fields["manifest_digest"]) != 32:
        raise ValueError("manifest_digest must be 32 bytes (SHA-256)")
    if "signer_key_id" in fields and (not isinstance(fields["signer_key_id"], str) or not fields["signer_key_id"]):
        raise ValueError("signer_key_id must be non-empty text")
    if "signer_fingerprint" in fields and (
        not isinstance(fields["signer_fingerprint"], bytes) or len(fields["signer_fingerprint"]) != 32
    ):
        raise ValueError("signer_fingerprint must be 32 bytes (SHA-256)")


def read_header(path) -> PackageHeader:
    """Read and check a package's header; needs no key. Raises PackageError if it is not a well-formed package."""
    try:
        with open(path, "rb") as stream:
            return _read_header(stream, path)
    except OSError as exc:
        raise PackageError(f"cannot read package {path}: {exc}; check the path and its permissions") from exc


def _read_header(stream: BinaryIO, path) -> PackageHeader:
    def refuse(cause: str) -> PackageError:
        return PackageError(f"{path} is not a readable package: {cause}; {_OPEN_ADVICE}")

    prefix = stream.read(_HEADER_PREFIX.size)
    if len(prefix) < _HEADER_PREFIX.size or prefix[:8] != MAGIC:
        raise refuse("it does not start with the package magic (wrong file, or truncated)")
    _magic, length = _HEADER_PREFIX.unpack(prefix)
    if length > MAX_HEADER_BYTES:
        raise refuse(f"its header claims {length} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    body = stream.read(length)
    if len(body) != length:
        raise refuse(f"it ends inside its {length}-byte header (truncated)")
    try:
        fields = cbor2.loads(body, allow_duplicate_keys=False, allow_indefinite=False)
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise refuse(f"its header is not valid CBOR ({exc})") from None
    if not isinstance(fields, dict):
        raise refuse(f"its header is a CBOR {type(fields).__name__}, not a map")
    version = fields.get("format_version", FORMAT_VERSION)
    if (
        not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_FORMATS
    ):  # before the fields: a newer format may differ
        raise PackageError(
            f"{path} uses package format {version!r}; this confidential_ml.nitro reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}: install the release that sealed it"
        )
    expected = _HEADER_KEYS if version == 1 else _SIGNED_HEADER_KEYS
    if set(fields) != expected:
        raise refuse(f"its header has fields {sorted(map(str, fields))}, expected {sorted(expected)}")
    try:
        _check_header_fields(fields)
    except ValueError as exc:
        raise refuse(f"its header is malformed ({exc})") from None
    if cbor2.dumps(fields, canonical=True) != body:
        raise refuse("its header is not canonically encoded")
    if version == 1:
        return PackageHeader(**fields, raw=prefix + body)
    length_bytes = stream.read(_SIGNATURE_PREFIX.size)
    if len(length_bytes) != _SIGNATURE_PREFIX.size:
        raise refuse("it ends before its signature (truncated)")
    (length,) = _SIGNATURE_PREFIX.unpack(length_bytes)
    if not 1 <= length <= MAX_SIGNATURE_BYTES:
        raise refuse(f"its signature claims {length} bytes, not 1 to {MAX_SIGNATURE_BYTES}")
    signature = stream.read(length)
    if len(signature) != length:
        raise refuse(f"it ends inside its {length}-byte signature (truncated)")
    return PackageHeader(**fields, raw=prefix + body, signature=signature)


def _describe(header: PackageHeader, path) -> str:
    return f"package {header.name!r} {header.version} ({path})"


# --------------------------------------------------------------------------- body encryption


def _streaming_aead(data_key: bytes) -> streaming_aead.StreamingAead:
    """Tink AES256_GCM_HKDF_1MB with the KMS data key as key material (a one-key RAW keyset)."""
    key = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(
        version=0,
        key_value=data_key,
        params=aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
            derived_key_size=32, hkdf_hash_type=common_pb2.SHA256, ciphertext_segment_size=SEGMENT_BYTES
        ),
    )
    keyset = tink_pb2.Keyset(
        primary_key_id=1,
        key=[
            tink_pb2.Keyset.Key(
                key_data=tink_pb2.KeyData(
                    type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                    value=key.SerializeToString(),
                    key_material_type=tink_pb2.KeyData.SYMMETRIC,
                ),
                status=tink_pb2.ENABLED,
                key_id=1,
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    handle = tink.proto_keyset_format.parse(keyset.SerializeToString(), secret_key_access.TOKEN)
    return handle.primitive(streaming_aead.StreamingAead)


class _SegmentFailed(Exception):
    """Segment `segment` of the body (segment 0 begins with Tink's header) did not authenticate."""

    def __init__(self, segment: int):
        super().__init__(f"segment {segment} did not authenticate")
        self.segment = segment


def _decrypt_segments(package: BinaryIO, data_key: bytes, associated_data: bytes) -> Iterator[bytes]:
    """Tink's AES-GCM-HKDF streaming decryption (docs/PACKAGE_FORMAT.md section 3), one verified segment at a time.

    It accepts every ciphertext Tink writes and refuses every one Tink refuses (tests hold it to Tink and to the
    vectors), with cryptography's AES-GCM: faster than Tink's Python binding, and it releases the GIL, which
    Tink's binding holds while it decrypts, so hashing on another thread overlaps it. Nothing is yielded before
    its tag verifies. A segment is the last one only if the file ends right after it (the next one is read
    ahead), so a cut on a segment boundary fails like any other truncation, and bytes after a full final
    segment make it fail too (Tink's binding ignores them).
    """
    tink_header = _read_into(package, bytearray(TINK_HEADER_BYTES))
    if len(tink_header) != TINK_HEADER_BYTES or tink_header[0] != TINK_HEADER_BYTES:
        raise _SegmentFailed(0)
    salt, nonce_prefix = bytes(tink_header[1:33]), bytes(tink_header[33:])
    aead = AESGCM(HKDF(hashes.SHA256(), DATA_KEY_BYTES, salt, associated_data).derive(data_key))
    # Two ciphertext buffers, reused: the segment being decrypted and the one read ahead.
    buffer, spare = bytearray(SEGMENT_BYTES), bytearray(SEGMENT_BYTES)
    full = SEGMENT_BYTES - TINK_HEADER_BYTES  # segment 0 shares its room with Tink's header
    segment, index = _read_into(package, memoryview(buffer)[:full]), 0
    while True:
        following = _read_into(package, spare) if len(segment) == full else b""
        last = not following
        if len(segment) < TAG_BYTES or index >= 1 << 32:
            raise _SegmentFailed(index)
        try:
            plaintext = aead.decrypt(nonce_prefix + struct.pack(">IB", index, last), segment, None)
        except InvalidTag:
            raise _SegmentFailed(index) from None
        yield plaintext
        if last:
            return
        segment, index, full = following, index + 1, SEGMENT_BYTES
        buffer, spare = spare, buffer


def _read_into(stream: BinaryIO, buffer) -> memoryview:
    """Fill buffer from stream; the part filled, shorter only at the end of the file."""
    view, filled = memoryview(buffer), 0
    while filled < len(view) and (count := stream.readinto(view[filled:])):
        filled += count
    return view[:filled]


class _Plaintext:
    """The decrypted body, read forward only: tarfile reads member headers through read/tell/seek, and pieces()
    hands member content over as views of the verified segments, with no copy.

    The next segment is read and decrypted on the worker thread while this one writes the current one (file
    reads and AES-GCM release the GIL); the worker also hashes large files, in order with the segments."""

    def __init__(self, segments: Iterator[bytes], worker: ThreadPoolExecutor):
        self._segments = segments
        self._worker = worker
        self._next = worker.submit(next, segments, b"")
        self._rest = memoryview(b"")
        self._position = 0

    def _segment(self) -> bytes:
        segment = self._next.result()  # re-raises the worker's _SegmentFailed here
        if segment:
            self._next = self._worker.submit(next, self._segments, b"")
        return segment

    def pieces(self, size: int) -> Iterator[memoryview]:
        """The next size bytes (fewer at the end of the body), in pieces no longer than a segment."""
        while size > 0:
            if not self._rest:
                self._rest = memoryview(self._segment())
                if not self._rest:
                    return
            piece = self._rest[:size]
            self._rest = self._rest[len(piece) :]
            self._position += len(piece)
            size -= len(piece)
            yield piece

    def read(self, size: int = -1) -> bytes:
        return b"".join(self.pieces(sys.maxsize if size < 0 else size))

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or position < self._position:  # tarfile only skips forward in a valid archive
            raise tarfile.ReadError(f"the archive asks to go back to byte {position} of its stream")
        for _piece in self.pieces(position - self._position):
            pass
        return self._position


def _check_data_key(data_key, where: str) -> bytes:
    if not isinstance(data_key, bytes | bytearray) or len(data_key) != DATA_KEY_BYTES:
        raise PackageError(
            f"{where}: the data key must be {DATA_KEY_BYTES} bytes (KMS KeySpec AES_256), got "
            f"{len(data_key) if isinstance(data_key, bytes | bytearray) else type(data_key).__name__}; "
            "check the key-unwrapping step"
        )
    return bytes(data_key)


@contextlib.contextmanager
def _package_writer(out_path, header: PackageHeader, data_key: bytes) -> Iterator[BinaryIO]:
    """Yield a stream whose plaintext becomes the body; the package appears at out_path only if all went well."""
    out = Path(out_path)
    data_key = _check_data_key(data_key, f"cannot write {_describe(header, out)}")
    fd, partial = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as package:
            package.write(header.raw)
            if header.signature is not None:
                package.write(_SIGNATURE_PREFIX.pack(len(header.signature)) + header.signature)
            package.flush()
            # Tink closes its destination when the body ends; give it a duplicate so this one can still fsync.
            destination = os.fdopen(os.dup(package.fileno()), "wb")
            with _streaming_aead(data_key).new_encrypting_stream(destination, header.raw) as body:
                yield body
            os.fchmod(package.fileno(), 0o644)  # ciphertext: readable by whoever stores or ships it
            os.fsync(package.fileno())
        os.replace(partial, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise


def write_package(
    out_path,
    *,
    name: str,
    version: str,
    key_id: str,
    encryption_context: dict[str, str],
    wrapped_key: bytes,
    manifest_digest: bytes,
    data_key: bytes,
    body_chunks: Iterable[bytes],
    signer=None,
) -> PackageHeader:
    """Write a package whose body is the given plaintext (normally a tar stream) under a known data key.

    The lower layer of seal(); tests use it to build hostile packages that open_package() must refuse.
    With a signer (owner_identity.KmsSigner, or anything with .key and .sign(bytes)) it writes format 2.
    """
    header = _make_header(
        name=name,
        version=version,
        key_id=key_id,
        encryption_context=encryption_context,
        wrapped_key=wrapped_key,
        manifest_digest=manifest_digest,
        signer=signer,
    )
    with _package_writer(out_path, header, data_key) as body:
        for chunk in body_chunks:
            body.write(chunk)
    return header


# --------------------------------------------------------------------------- seal


def seal(
    src_dir,
    out_path,
    *,
    kms_client,
    key_id: str,
    name: str,
    version: str,
    encryption_context: dict | None = None,
    progress: bool = False,
    signer=None,
) -> PackageHeader:
    """Seal src_dir into the package out_path under a fresh KMS data key; returns the header written.

    Two passes: the first hashes every file into the manifest (whose digest goes into the header), the second
    streams the tar through the encryption and fails if any file no longer matches the first pass.
    signer (owner_identity.KmsSigner: the owner's KMS signing key) signs the header: format 2, what an image
    bound to its owner requires. Without one the package is format 1, unsigned, which only unbound images run.
    """
    root = Path(src_dir)
    context = package_context(name, version, encryption_context)
    try:
        with _progress("hashing", None, progress) as meter:
            entries = _build_manifest(root, meter)
        manifest = encode_manifest(entries)
        response = _generate_data_key(kms_client, key_id, context, f"package {name!r} {version}")
        header = _make_header(
            name=name,
            version=version,
            key_id=response["KeyId"],
            encryption_context=context,
            wrapped_key=response["CiphertextBlob"],
            manifest_digest=hashlib.sha256(manifest).digest(),
            signer=signer,
        )
        total = sum(entry.size for entry in entries)
        with (
            _progress("sealing", total, progress) as meter,
            _package_writer(out_path, header, response["Plaintext"]) as body,
        ):
            _write_tar(body, root, entries, manifest, meter)
    except OSError as exc:
        raise PackageError(
            f"cannot seal {root} into {out_path}: {exc}; check that the directory is readable, the output "
            "directory writable, and that it has room"
        ) from exc
    return header


def _generate_data_key(kms_client, key_id: str, context: dict[str, str], what: str) -> dict:
    try:
        return kms_client.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=context)
    except EnclaveError:
        raise
    except Exception as exc:  # botocore's ClientError/BotoCoreError, or a stand-in's own error
        raise KmsError(
            f"cannot seal {what}: KMS GenerateDataKey with key {key_id!r} failed: {exc}; check the key id, "
            "that the key is enabled, and that these credentials may use it"
        ) from exc


def package_context(name: str, version: str, extra: dict | None) -> dict[str, str]:
    """The KMS encryption context a package is sealed under: extra plus the package's name and version.

    Raises PackageError when extra is not text to text or sets those two keys to anything else."""
    context = {CONTEXT_PACKAGE: name, CONTEXT_VERSION: version}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise PackageError(
                f"cannot seal package {name!r} {version}: encryption context entry {key!r}: {value!r} is not "
                "text to text, as KMS requires; quote it"
            )
        if context.get(key, value) != value:
            raise PackageError(
                f"cannot seal package {name!r} {version}: encryption context key {key!r} is set from the package "
                f"name and version ({context[key]!r}), not {value!r}; drop it from encryption_context"
            )
        context[key] = value
    return context


def _progress(what: str, total: int | None, enabled: bool) -> tqdm:
    return tqdm(
        total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=not enabled
    )


def _tar_info(path: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    """A member header with nothing host-specific in it: no timestamps, owners or names."""
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.size = kind, mode, size
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def _write_tar(body: BinaryIO, root: Path, entries: list[ManifestEntry], manifest: bytes, meter: tqdm) -> None:
    with tarfile.open(
        fileobj=body, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", bufsize=IO_BYTES, copybufsize=IO_BYTES
    ) as tar:
        tar.addfile(_tar_info(MANIFEST_NAME, tarfile.REGTYPE, 0o644, len(manifest)), io.BytesIO(manifest))
        for entry in entries:
            if entry.type == "dir":
                tar.addfile(_tar_info(entry.path, tarfile.DIRTYPE, entry.mode, 0))
            else:
                _add_file(tar, root, entry, meter)
            tar.members.clear()  # tarfile remembers every member; a package may hold very many


def _add_file(tar: tarfile.TarFile, root: Path, entry: ManifestEntry, meter: tqdm) -> None:
    def changed(cause: str) -> PackageError:
        return PackageError(
            f"cannot seal {root}: {entry.path!r} changed while it was being sealed ({cause}); "
            "seal again once nothing writes to the directory"
        )

    try:
        source = _open_source(root, entry.path)
    except OSError as exc:  # removed, or replaced by a link, since the first pass
        raise changed(str(exc)) from exc
    with source:
        reader = _HashingReader(source, meter)
        try:
            tar.addfile(_tar_info(entry.path, tarfile.REGTYPE, entry.mode, entry.size), reader)
        except OSError as exc:
            if reader.at_eof and reader.count < entry.size:  # tarfile's "unexpected end of data"
                raise changed(f"it is now shorter than {entry.size} bytes") from exc
            raise
        if source.read(1):
            raise changed(f"it is now longer than {entry.size} bytes")
    if reader.hexdigest() != entry.sha256:
        raise changed("its content differs from the first pass")


# --------------------------------------------------------------------------- open


class _Refused(Exception):
    """The authenticated body holds something the format forbids; open_package() adds the package's name."""


def open_package(
    path,
    target_dir,
    *,
    unwrap_key: Callable[[PackageHeader], bytes],
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    check_header: Callable[[PackageHeader], object] | None = None,
) -> list[ManifestEntry]:
    """Authenticate, decrypt and extract a package into target_dir (missing, or an empty directory).

    path may also be a binary file open at its start (the enclave's job runner holds one descriptor).
    check_header(header) runs first and raises to refuse the package (in the enclave: the owner's signature,
    OwnerIdentity.check_package), so nothing is asked of KMS for a package it refuses; it sees the very
    header that is unwrapped and used as the body's associated data, not a second read of the file.
    unwrap_key(header) returns the 32-byte data key (in the enclave: KMS Decrypt with an attestation document).
    On any failure everything written is removed, target_dir is left as it was, and PackageError says why.
    The header and the body are read through one open file, so what is decrypted is what the header named
    even if the path is replaced meanwhile.
    """
    if hasattr(path, "read"):
        return _open_stream(
            path, getattr(path, "name", "package"), target_dir, unwrap_key, max_total_bytes, check_header
        )
    try:
        package = open(path, "rb")  # noqa: SIM115 - closed below, after the body
    except OSError as exc:
        raise PackageError(f"cannot read package {path}: {exc}; check the path and its permissions") from exc
    with package:
        return _open_stream(package, path, target_dir, unwrap_key, max_total_bytes, check_header)


def _open_stream(
    package: BinaryIO, path, target_dir, unwrap_key, max_total_bytes: int, check_header
) -> list[ManifestEntry]:
    try:
        header = _read_header(package, path)
    except OSError as exc:
        raise PackageError(f"cannot read package {path}: {exc}; check the path and its permissions") from exc
    where = _describe(header, path)
    if check_header is not None:
        check_header(header)
    data_key = _check_data_key(_unwrap(unwrap_key, header, where), where)
    target = Path(target_dir)
    created_target = _prepare_target(target, where)
    written: list[str] = []  # top-level names this call created inside target
    try:
        package.seek(header.body_offset)  # past the signature block, if any
        return _open_body(package, target, header, where, data_key, max_total_bytes, written)
    except BaseException as exc:
        _remove_written(target, written, created_target, exc)
        if isinstance(exc, OSError):
            raise PackageError(
                f"{where} could not be opened into {target}: {exc}; check that it is writable and has room"
            ) from exc
        raise


def _open_body(
    package: BinaryIO,
    target: Path,
    header: PackageHeader,
    where: str,
    data_key: bytes,
    max_total_bytes: int,
    written: list[str],
) -> list[ManifestEntry]:
    try:
        # One worker thread decrypts the segment ahead and hashes large files; leaving this block waits for it.
        with ThreadPoolExecutor(1, thread_name_prefix="package-open") as worker:
            plaintext = _Plaintext(_decrypt_segments(package, data_key, header.raw), worker)
            return _extract(plaintext, target, header, max_total_bytes, written, worker)
    except _SegmentFailed as exc:
        cause = _authentication_failure(header, exc.segment, os.fstat(package.fileno()).st_size)
        raise PackageError(f"{where} {cause}") from None
    except _Refused as exc:
        raise PackageError(f"{where} was refused: {exc}; {_RESEAL_ADVICE}") from None
    except tarfile.TarError as exc:
        raise PackageError(
            f"{where} was refused: its body is not a valid tar stream ({exc}); {_RESEAL_ADVICE}"
        ) from exc


def _unwrap(unwrap_key: Callable[[PackageHeader], bytes], header: PackageHeader, where: str) -> bytes:
    try:
        return unwrap_key(header)
    except EnclaveError as exc:  # already says what happened (attestation, key policy, KMS)
        exc.add_note(f"while unwrapping the data key of {where}")
        raise
    except Exception as exc:
        raise PackageError(
            f"{where}: could not unwrap its data key ({exc}); check that this package was sealed for this "
            "enclave's KMS key, or obtain a fresh copy from the owner"
        ) from exc


def _authentication_failure(header: PackageHeader, segment: int, file_size: int) -> str:
    start = header.body_offset + segment * SEGMENT_BYTES
    end = min(start + SEGMENT_BYTES, file_size) - 1
    return (
        f"failed authentication in encrypted segment {segment} (file bytes {start}..{end}): it was modified or "
        f"truncated, its header belongs to another package, or the data key is wrong; {_OPEN_ADVICE}"
    )


def _prepare_target(target: Path, where: str) -> bool:
    """Make sure target is missing (then create it, 0700, and return True) or an empty real directory."""
    try:
        target.mkdir(mode=0o700)
        return True
    except FileExistsError:
        pass
    except OSError as exc:
        raise PackageError(
            f"{where}: cannot create {target} ({exc}); open into a directory whose parent exists and is writable"
        ) from exc
    if not stat.S_ISDIR(target.lstat().st_mode) or any(target.iterdir()):
        raise PackageError(f"{where}: {target} is not an empty directory; open into a missing or empty one")
    return False


def _remove_written(target: Path, written: list[str], created_target: bool, cause: BaseException) -> None:
    try:
        if created_target:
            shutil.rmtree(target)
            return
        for name in written:
            path = target / name
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(path.lstat().st_mode):
                    shutil.rmtree(path)
                else:
                    path.unlink()
    except OSError as exc:
        cause.add_note(f"could not remove what was already extracted into {target} ({exc}); remove it by hand")


def _extract(
    plaintext: _Plaintext,
    target: Path,
    header: PackageHeader,
    max_total_bytes: int,
    written: list[str],
    hasher: ThreadPoolExecutor,
) -> list[ManifestEntry]:
    # tarfile parses the member headers; member content is read past it, straight from the plaintext.
    with tarfile.TarFile(fileobj=plaintext, mode="r") as tar:
        entries = _read_manifest(tar, header, max_total_bytes)
        for entry in entries:
            member = tar.next()
            if member is None:
                raise _Refused(f"the archive ends before {entry.path!r}, which its manifest lists")
            _check_member(tar, member, entry)
            if "/" not in entry.path:
                written.append(entry.path)  # before creating it: a half-written file must go too
            if entry.type == "dir":
                (target / entry.path).mkdir(mode=0o700)
                os.chmod(target / entry.path, entry.mode)  # exact mode, whatever the umask
            else:
                _write_file(plaintext, member, target / entry.path, entry, hasher)
            tar.members.clear()  # tarfile remembers every member; a package may hold very many
        extra = tar.next()
        if extra is not None:
            raise _Refused(f"it holds {extra.name!r}, which its manifest does not list")
        _drain_tail(plaintext)
    return entries


def _read_manifest(tar: tarfile.TarFile, header: PackageHeader, max_total_bytes: int) -> list[ManifestEntry]:
    member = tar.next()
    if member is not None:
        _check_no_global_header(tar, member)
    if member is None or member.name != MANIFEST_NAME or member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise _Refused(f"its first member is {member.name if member else None!r}, not the manifest {MANIFEST_NAME!r}")
    if member.size > MAX_MANIFEST_BYTES:
        raise _Refused(f"its manifest claims {member.size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    data = tar.fileobj.read(member.size)  # the _Plaintext: content is read past tarfile
    if len(data) != member.size:
        raise tarfile.ReadError("unexpected end of data in the manifest")
    if hashlib.sha256(data).digest() != header.manifest_digest:
        raise _Refused("its manifest does not match the digest in its header")
    try:
        entries = decode_manifest(data)
    except ValueError as exc:
        raise _Refused(str(exc)) from None
    total = sum(entry.size for entry in entries)
    if total > max_total_bytes:
        raise _Refused(
            f"it would extract {total} bytes, more than max_total_bytes={max_total_bytes}; raise the limit only "
            "if you expected a package this large"
        )
    return entries


def _check_member(tar: tarfile.TarFile, member: tarfile.TarInfo, entry: ManifestEntry) -> None:
    _check_no_global_header(tar, member)
    kind = _REFUSED_MEMBER_KINDS.get(member.type)
    if kind is None and member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
        kind = f"a tar member of type {member.type!r}"
    if kind is None and member.sparse is not None:
        kind = "a sparse file"
    if kind is not None:
        raise _Refused(f"member {member.name!r} is {kind}; packages hold only regular files and directories")
    if member.name != entry.path:
        raise _Refused(f"it holds {member.name!r} where its manifest lists {entry.path!r}")
    if set(member.pax_headers) - _ALLOWED_PAX_KEYS:
        raise _Refused(
            f"member {member.name!r} carries PAX records {sorted(member.pax_headers)}; only "
            f"{sorted(_ALLOWED_PAX_KEYS)} are allowed"
        )
    member_type = "dir" if member.type == tarfile.DIRTYPE else "file"
    if member_type != entry.type or member.mode != entry.mode:
        raise _Refused(
            f"member {member.name!r} is a {member_type} with mode {oct(member.mode)}; its manifest says "
            f"{entry.type} with mode {oct(entry.mode)}"
        )
    if member.size != entry.size:
        raise _Refused(f"member {member.name!r} claims {member.size} bytes; its manifest says {entry.size}")


def _check_no_global_header(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    if tar.pax_headers:  # a global pax header applies to every member after it, renames included
        raise _Refused(f"it carries a global pax header before {member.name!r}")


def _write_file(
    plaintext: _Plaintext, member: tarfile.TarInfo, path: Path, entry: ManifestEntry, hasher: ThreadPoolExecutor
) -> None:
    # O_EXCL|O_NOFOLLOW: never write through something that already exists, least of all a link.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    sha, count, pending = hashlib.sha256(), 0, collections.deque()
    with os.fdopen(fd, "wb") as out:
        for piece in plaintext.pieces(member.size):
            # hashlib releases the GIL on large updates: a second thread hashes a piece while this one writes it.
            # Pieces reach it in order (one thread); a small file is hashed here, where it costs less than a handoff.
            if member.size < IO_BYTES:
                sha.update(piece)
            else:
                pending.append(hasher.submit(sha.update, piece))
            out.write(piece)
            count += len(piece)
            if len(pending) > _HASH_AHEAD:
                pending.popleft().result()
        os.fchmod(fd, entry.mode)
        for update in pending:
            update.result()
    if count != member.size:
        raise tarfile.ReadError(f"unexpected end of data in {member.name!r}")
    if sha.hexdigest() != entry.sha256:
        raise _Refused(f"the content of {entry.path!r} does not match its manifest entry")


def _drain_tail(stream) -> None:
    # The final segment is authenticated only when it is read: read to the end, which must be tar padding.
    tail = 0
    while chunk := stream.read(IO_BYTES):
        tail += len(chunk)
        if chunk.count(0) != len(chunk) or tail > MAX_TAIL_BYTES:
            raise _Refused("it holds data after the end of its tar archive")
