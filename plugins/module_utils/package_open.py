"""The enclave's side of the package: open_package() turns a package back into a private directory.

It refuses anything that was modified, truncated, reordered or that holds more than
plain files and directories, and decrypts Tink's streaming format with cryptography's
AES-GCM one 1 MiB segment at a time: memory stays flat whatever the package size. The
format itself is in package_format; the owner's seal (package_seal), with Tink and tqdm,
is not imported here.
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as exc:  # the modules report it: module_options.require_libraries
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

from .errors import EnclaveError, PackageError
from .package_format import (
    _ALLOWED_PAX_KEYS,
    _HASH_AHEAD,
    _OPEN_ADVICE,
    _REFUSED_MEMBER_KINDS,
    _RESEAL_ADVICE,
    DATA_KEY_BYTES,
    DEFAULT_MAX_TOTAL_BYTES,
    IO_BYTES,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_TAIL_BYTES,
    SEGMENT_BYTES,
    TAG_BYTES,
    TINK_HEADER_BYTES,
    ManifestEntry,
    PackageHeader,
    _check_data_key,
    _describe,
    _read_header,
    decode_manifest,
)
from .package_format import IMPORT_ERROR as FORMAT_IMPORT_ERROR

# What open needs (its own libraries and the format's cbor2) and could not import, or None.
IMPORT_ERROR = IMPORT_ERROR or FORMAT_IMPORT_ERROR


class _SegmentFailed(Exception):
    """Segment `segment` of the body (segment 0 begins with Tink's header) did not authenticate."""

    def __init__(self, segment: int):
        super().__init__(f"segment {segment} did not authenticate")
        self.segment = segment


def _decrypt_segments(package: io.BufferedReader, data_key: bytes, associated_data: bytes) -> Iterator[bytes]:
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
    segment: memoryview | bytes  # what _read_into filled, or following's b"" (nothing follows a short segment)
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


def _read_into(stream: io.BufferedReader, buffer) -> memoryview:
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
    package: io.BufferedReader, path, target_dir, unwrap_key, max_total_bytes: int, check_header
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
    package: io.BufferedReader,
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
    # typeshed's fileobj protocol asks for write and close too; reading a fileobj it was given, tarfile calls neither
    with tarfile.TarFile(fileobj=plaintext, mode="r") as tar:  # type: ignore[arg-type]
        entries = _read_manifest(tar, plaintext, header, max_total_bytes)
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
            # tarfile remembers every member; a package may hold very many (typeshed leaves TarFile.members out)
            tar.members.clear()  # type: ignore[attr-defined]
        extra = tar.next()
        if extra is not None:
            raise _Refused(f"it holds {extra.name!r}, which its manifest does not list")
        _drain_tail(plaintext)
    return entries


def _read_manifest(
    tar: tarfile.TarFile, plaintext: _Plaintext, header: PackageHeader, max_total_bytes: int
) -> list[ManifestEntry]:
    member = tar.next()
    if member is not None:
        _check_no_global_header(tar, member)
    if member is None or member.name != MANIFEST_NAME or member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise _Refused(f"its first member is {member.name if member else None!r}, not the manifest {MANIFEST_NAME!r}")
    if member.size > MAX_MANIFEST_BYTES:
        raise _Refused(f"its manifest claims {member.size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    data = plaintext.read(member.size)  # tar's fileobj: content is read past tarfile
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
    sha, count = hashlib.sha256(), 0
    pending: collections.deque[Future[None]] = collections.deque()  # hashes of large pieces, in order
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
