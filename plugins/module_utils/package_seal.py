"""The owner's side of the package: seal() turns a directory into a package.

It streams in 256 KiB pieces, so memory stays flat whatever the package size, and
encrypts with Tink (the enclave decrypts Tink's format with cryptography's AES-GCM,
package_open). The format itself is in package_format.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

try:
    import tink
    from tink import secret_key_access, streaming_aead
    from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2
    from tqdm import tqdm
except ImportError as exc:  # the modules report it: module_options.require_libraries
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None
    streaming_aead.register()

from .errors import EnclaveError, KmsError, PackageError
from .package_format import (
    _SIGNATURE_PREFIX,
    CONTEXT_PACKAGE,
    CONTEXT_VERSION,
    DIR_MODE,
    FORMAT_VERSION,
    IO_BYTES,
    MANIFEST_NAME,
    SEGMENT_BYTES,
    ManifestEntry,
    PackageHeader,
    _check_data_key,
    _check_path,
    _describe,
    _make_header,
    encode_manifest,
    manifest_digest,
    read_header,
)
from .package_format import IMPORT_ERROR as FORMAT_IMPORT_ERROR

# What seal needs (its own libraries and the format's cbor2) and could not import, or None.
IMPORT_ERROR = IMPORT_ERROR or FORMAT_IMPORT_ERROR

# --------------------------------------------------------------------------- manifest


def build_manifest(src_dir) -> list[ManifestEntry]:
    """The manifest of a directory: depth-first, siblings by name, content hashed; refuses links and specials."""
    return _build_manifest(Path(src_dir), _no_progress())


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


# --------------------------------------------------------------------------- idempotence


@dataclass(frozen=True)
class SealCheck:
    """Whether dest must be sealed (again), and the two headers that decided it (as PackageHeader.to_json())."""

    needed: bool
    before: dict | None  # dest's header; None when there is no package there (or force set over another file)
    wanted: dict  # what a seal now would write, but the wrapped key and the signature (new at every seal)


def names_key(key_id: str, key_arn: str) -> bool | None:
    """Whether key_id (a key id or key ARN) is the key key_arn; None when only KMS can tell (an alias)."""
    if key_id == key_arn:
        return True
    if key_id.startswith("alias/") or ":alias/" in key_id:
        return None
    return not key_id.startswith("arn:") and key_arn.endswith(f":key/{key_id}")


def current_header(dest, *, force: bool = False) -> PackageHeader | None:
    """The header of the package at dest; None when there is none, or (with force) when dest is another file."""
    if not os.path.lexists(dest):
        return None
    if os.path.isdir(dest):
        raise PackageError(f"{dest} is a directory; give the path of the package file to write")
    try:
        return read_header(dest)
    except PackageError as err:
        if force:
            return None
        raise PackageError(
            f"{dest} exists and is not a package ({err}); remove it, choose another destination, or force a "
            "seal over it (force=true, or --force)"
        ) from err
    except OSError as err:
        raise PackageError(f"cannot read {dest}: {err}; check its permissions") from err


def needs_seal(
    src_dir,
    dest,
    *,
    key_id: str,
    name: str,
    version: str,
    encryption_context: dict | None = None,
    signer=None,
    kms: Callable[[], object] | None = None,
    force: bool = False,
) -> SealCheck:
    """Whether seal(src_dir, dest, ...) would write anything but a new data key: needed unless dest already is
    a package of src_dir as it is now (manifest digest), with the same name, version, encryption context, key,
    format and signing key. force: always needed.

    kms makes a KMS client, called only when key_id is an alias (DescribeKey tells which key it names now):
    with a key id or ARN this calls KMS not at all (without kms, an alias always needs a seal)."""
    wanted = {
        "format_version": FORMAT_VERSION if signer else 1,
        "name": name,
        "version": version,
        "key_id": key_id,
        "encryption_context": package_context(name, version, encryption_context),
        "manifest_digest": _digest_of(src_dir),
    }
    if signer is not None:
        wanted["signer"] = {"key_id": signer.key.key_id, "fingerprint": signer.key.fingerprint.hex()}
    header = current_header(dest, force=force)
    before = None if header is None else header.to_json()
    return SealCheck(not _up_to_date(before, wanted, kms) or force, before, wanted)


def _digest_of(src_dir) -> str:
    try:
        return manifest_digest(build_manifest(src_dir)).hex()
    except OSError as exc:
        raise PackageError(f"cannot read {src_dir}: {exc}; check that it is a readable directory") from exc


def _up_to_date(before: dict | None, wanted: dict, kms) -> bool:
    if before is None:
        return False
    if (before.get("signer") or {}).get("fingerprint") != (wanted.get("signer") or {}).get("fingerprint"):
        return False
    for field in ("format_version", "name", "version", "encryption_context", "manifest_digest"):
        if before[field] != wanted[field]:
            return False
    same_key = names_key(wanted["key_id"], before["key_id"])
    if same_key is None:  # an alias: ask KMS which key it names now
        if kms is None:
            return False
        try:
            same_key = kms().describe_key(KeyId=wanted["key_id"])["KeyMetadata"]["Arn"] == before["key_id"]
        except EnclaveError:
            raise
        except Exception as exc:  # botocore's ClientError/BotoCoreError, or a stand-in's own error
            raise KmsError(
                f"KMS DescribeKey on {wanted['key_id']} failed: {exc}; check the key id, the region, the KMS "
                "endpoint and that these credentials may use the key"
            ) from exc
    return same_key


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
    # open() hands copybufsize to TarFile(), whose stub has it; typeshed's open() leaves it out (call-arg: the
    # typeshed of mypy 1.11, the floor; call-overload: later ones)
    with tarfile.open(  # type: ignore[call-overload, call-arg]
        fileobj=body, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", bufsize=IO_BYTES, copybufsize=IO_BYTES
    ) as tar:
        tar.addfile(_tar_info(MANIFEST_NAME, tarfile.REGTYPE, 0o644, len(manifest)), io.BytesIO(manifest))
        for entry in entries:
            if entry.type == "dir":
                tar.addfile(_tar_info(entry.path, tarfile.DIRTYPE, entry.mode, 0))
            else:
                _add_file(tar, root, entry, meter)
            # tarfile remembers every member; a package may hold very many (typeshed leaves TarFile.members out)
            tar.members.clear()  # type: ignore[attr-defined]


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
            # addfile only reads from it; mypy 1.11's typeshed (the floor) asks for a whole IO[bytes]
            tar.addfile(_tar_info(entry.path, tarfile.REGTYPE, entry.mode, entry.size), reader)  # type: ignore[arg-type]
        except OSError as exc:
            if reader.at_eof and reader.count < entry.size:  # tarfile's "unexpected end of data"
                raise changed(f"it is now shorter than {entry.size} bytes") from exc
            raise
        if source.read(1):
            raise changed(f"it is now longer than {entry.size} bytes")
    if reader.hexdigest() != entry.sha256:
        raise changed("its content differs from the first pass")
