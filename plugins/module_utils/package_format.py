"""The encrypted package's format: constants, the header and the manifest (docs/PACKAGE_FORMAT.md).

    file   = MAGIC || u32be(len(cbor)) || cbor(header fields)    <- the "header", also the body's associated data
             || u16be(len(sig)) || sig                             <- format 2: the owner's ECDSA P-384 signature
             || Tink AES256_GCM_HKDF_1MB streaming ciphertext of a tar stream
    tar    = .package-manifest.cbor, then every manifest entry in manifest order

Both sides share it: the owner's seal (package_seal) and the enclave's open (package_open).
The byte layout, the tar profile and the reasons each attack is detected are in
docs/PACKAGE_FORMAT.md; keep the two in step.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

try:
    import cbor2
except ImportError as exc:  # the modules report it: module_options.require_libraries
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

from .errors import PackageError

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
            fingerprint = self.signer_fingerprint  # format 2 carries it beside the signature
            data["signer"] = {
                "key_id": self.signer_key_id,
                "fingerprint": None if fingerprint is None else fingerprint.hex(),
                "signature": base64.b64encode(self.signature).decode("ascii"),
            }
        return data


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
    entries: list[ManifestEntry] = []
    dirs: set[str] = set()
    previous: tuple[str, ...] = ()
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
    fields: dict[str, Any] = {
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


def _check_data_key(data_key, where: str) -> bytes:
    if not isinstance(data_key, bytes | bytearray) or len(data_key) != DATA_KEY_BYTES:
        raise PackageError(
            f"{where}: the data key must be {DATA_KEY_BYTES} bytes (KMS KeySpec AES_256), got "
            f"{len(data_key) if isinstance(data_key, bytes | bytearray) else type(data_key).__name__}; "
            "check the key-unwrapping step"
        )
    return bytes(data_key)
