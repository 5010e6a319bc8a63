"""The host's client of the enclave server: attest, push, pull, run.

The CLI, the Ansible modules and the FUSE mount all use this one client.
With expect_pcr0 set, the client proves the enclave's identity (a fresh
attestation document with a random nonce, verified against a pinned root)
before it sends anything else.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import re
import secrets
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import attestation, settings, wire_codec
from .endpoints import Endpoint
from .errors import AttestationError, EnclaveError, ProtocolError, RemoteError, WireError
from .wire_client import Call, Connection, _remote_error
from .wire_frames import keep_freed_memory

if TYPE_CHECKING:
    from tqdm import tqdm

# What the client needs (cbor2, cryptography) and could not import, or None; the modules report it.
IMPORT_ERROR = attestation.IMPORT_ERROR or wire_codec.IMPORT_ERROR

CHUNK = 1 << 20
IN_FLIGHT = 8  # concurrent chunk requests per transfer: keeps the pipe full without a big buffer
# Files up to SMALL_FILE travel whole, many to a share.batch request of at most BATCH_OPS operations (the
# server takes 1024) and about BATCH_BYTES of data, BATCHES_IN_FLIGHT requests at a time. 64, not 256: the
# enclave starts on a batch only once it has all of it, so smaller ones overlap its work with the host's
# (1,000 x 4 KiB, interleaved: push 59 against 186 ms, pull 193 against 331, best of 15 under load).
SMALL_FILE = 1 << 20
BATCH_OPS = 64
BATCH_BYTES = 1 << 20
BATCHES_IN_FLIGHT = 4
PROGRESS_DELAY = 1.0  # seconds before a progress bar appears: work that ends sooner shows none
PUSH_TEMP = re.compile(r"\.push-[0-9a-f]{16}\.part")  # a bigger file's name until it is whole


def default_trusted_roots() -> list:
    """AWS's Nitro root, plus the local backend's root when a local CA exists on this host."""
    return _default_roots()[0]()


def _default_roots() -> tuple[Callable[[], list], attestation.VerifiedChains | None]:
    """default_trusted_roots, loaded only when called, and the user's verified-chain cache for exactly those
    roots: its entries are keyed by the PEM text they are loaded from, read once here."""
    local_root = settings.state_home() / "ca" / "root.pem"
    try:
        sources = {str(local_root): local_root.read_bytes()}
    except FileNotFoundError:
        sources = {}
    except OSError:  # load_trusted_roots says what is wrong with it
        return partial(attestation.load_trusted_roots, [str(local_root)]), None
    roots_id = b"\0".join([attestation.AWS_NITRO_ROOT_PEM, *sources.values()])
    cache = attestation.VerifiedChains(settings.state_home() / "verified-chains", roots_id)
    return partial(attestation.roots_from_pem, sources), cache


_PCR0 = re.compile(r"[0-9a-f]{96}")


def release_pcr0(path) -> str:
    """The PCR0 of the image in a release manifest (release.json, as the owner's pipeline publishes it)."""
    try:
        release = json.loads(Path(path).read_text())
        pcr0 = release["image"]["measurements"]["pcr0"]
    except (OSError, ValueError) as err:
        raise EnclaveError(f"cannot read the release manifest {path}: {err}") from err
    except (KeyError, TypeError):
        raise EnclaveError(
            f"{path} is not a release manifest: it has no image.measurements.pcr0 "
            "(give the release.json the owner's pipeline published)"
        ) from None
    return _check_pcr0(pcr0, f"the PCR0 in {path}")


def _check_pcr0(value, what: str) -> str:
    if not isinstance(value, str) or not _PCR0.fullmatch(value.strip().lower()):
        shown = "empty" if value in ("", None) else f"{value!r:.40} is not 96 hex digits"
        raise EnclaveError(f"{what} is {shown}: give the image's PCR0 (SHA-384, 96 hex digits)")
    return value.strip().lower()


def expected_pcr0(
    expect_pcr0: str | Sequence[str] | None = None,
    release=None,
    no_attestation: bool = False,
    *,
    names: tuple[str, str, str] = ("--expect-pcr0", "--release", "--no-attestation"),
) -> list[str] | None:
    """The PCR0 values an enclave must attest before anything is sent to it, by the rule every front end
    (CLI, modules, FUSE mount) follows: the values given, else the release manifest's image, and None (no
    attestation) only when the user said so. names: how the caller spells the three options in messages."""
    expect_name, release_name, opt_out_name = names
    expect_label, release_label = expect_name.rstrip(":"), release_name.rstrip(":")
    given = [expect_pcr0] if isinstance(expect_pcr0, str) else list(expect_pcr0 or ())
    if expect_pcr0 is not None and not given:
        raise EnclaveError(f"{expect_label} lists no PCR0: give the image's PCR0 (96 hex digits)")
    values = [_check_pcr0(v, expect_label) for v in given]
    if release is not None and release != "":
        if values:
            raise EnclaveError(f"give {expect_label} or {release_label}, not both: the release names the PCR0 itself")
        values = [release_pcr0(release)]
    elif release == "":
        raise EnclaveError(f"{release_label} is empty: give the path of the owner's release.json")
    if no_attestation:
        if values:
            raise EnclaveError(f"{opt_out_name} contradicts {expect_label}/{release_label}: give one or the other")
        return None
    if not values:
        raise EnclaveError(
            "refusing to send anything to an enclave that has not proven its image: give its PCR0 "
            f"({expect_name} HEX, which the owner's pipeline prints and writes to release.json), or the owner's "
            f"release manifest ({release_name} release.json), or {opt_out_name} to send without attestation"
        )
    return values


def _safe_parts(rel: str) -> list[str]:
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise EnclaveError(f"the enclave listed an unsafe path {rel!r}; refusing to write it on the host")
    return parts


def local_manifest(root: Path, *, hashed: bool = True) -> dict[str, dict]:
    """Files and directories under root (symlinks and special files skipped, never followed).

    hashed=False leaves out the SHA-256 of files: push and pull hash only files whose size matches the
    other side's."""
    out: dict[str, dict] = {}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = f"{prefix}{entry.name}"
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    out[rel] = {"path": rel, "type": "dir", "mode": st.st_mode & 0o777}
                    walk(Path(entry.path), rel + "/")
                elif stat.S_ISREG(st.st_mode):
                    out[rel] = {"path": rel, "type": "file", "mode": st.st_mode & 0o777, "size": st.st_size}
                    if hashed:
                        out[rel]["sha256"] = _sha256(Path(entry.path))

    walk(root, "")
    return out


def _sha256(path: Path, meter=None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        want = min(os.fstat(f.fileno()).st_size + 1, CHUNK)  # a small file in one read, without a 1 MiB buffer
        while block := f.read(want):
            digest.update(block)
            want = CHUNK
            if meter is not None:
                meter.update(len(block))
    return digest.hexdigest()


def _differs(src: dict, dst: dict | None) -> bool:
    return dst is None or dst["type"] != src["type"] or (src["type"] == "file" and src["sha256"] != dst["sha256"])


def _streaming(changed: list[dict]) -> None:
    """Before a transfer: if it streams a bigger file in chunks, keep freed MiB buffers (docs/PROTOCOL.md section
    9). Only then: a few batches of small files gain nothing from it, and looking libc up (ctypes.util runs
    ldconfig) cost a push of small files ~10 ms."""
    if any(e.get("size", 0) > SMALL_FILE for e in changed):
        keep_freed_memory()


def _push_temporary(entry: dict) -> bool:
    """Whether a manifest entry is a push's temporary file (a bigger file's name until it is whole)."""
    return entry["type"] == "file" and PUSH_TEMP.fullmatch(entry["path"].rsplit("/", 1)[-1]) is not None


def _same_size_files(ours: dict[str, dict], theirs: dict[str, dict]) -> list[str]:
    """Paths that are a file of the same size on both sides: only these can be unchanged, only these are hashed."""
    return [
        path for path, entry in ours.items()
        if entry["type"] == "file" and (other := theirs.get(path)) is not None and other["type"] == "file"
        and other["size"] == entry["size"]
    ]  # fmt: skip


def _changed(src: dict[str, dict], dst: dict[str, dict], same: set[str]) -> list[dict]:
    """Entries of src to copy: a directory dst lacks (or holds as a file), a file not known to be the same."""
    return [e for path, e in src.items() if path not in same and (e["type"] == "file" or _differs(e, dst.get(path)))]


def _groups(entries: list[dict], ops_per_entry: int, max_bytes: int):
    """entries in runs that fit one share.batch: BATCH_OPS operations and about max_bytes of data and paths."""
    group: list[dict] = []
    size = 0
    for entry in entries:
        weight = entry.get("size", 0) + ops_per_entry * (len(entry["remote"].encode()) + 64)  # data, paths, keys
        if group and ((len(group) + 1) * ops_per_entry > BATCH_OPS or size + weight > max_bytes):
            yield group
            group, size = [], 0
        group.append(entry)
        size += weight
    if group:
        yield group


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


class _NoMeter:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Meter:
    """A progress bar on stderr that costs nothing until the work has taken PROGRESS_DELAY seconds: only then is
    tqdm imported (~25 ms, as much as pushing a thousand small files) and its bar shown, with what is done."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.started = time.monotonic()
        self.shown: tqdm | None = None

    def update(self, n: int) -> None:
        if self.shown is not None:
            self.shown.update(n)
            return
        self.done += n
        if time.monotonic() - self.started >= PROGRESS_DELAY:
            from tqdm import tqdm  # only where progress is shown: the Ansible modules never need it

            self.shown = tqdm(total=self.total, initial=self.done, desc=self.what, unit="B", unit_scale=True,
                              unit_divisor=1024, file=sys.stderr, leave=False)  # fmt: skip

    def close(self) -> None:
        if self.shown is not None:
            self.shown.close()


def _meter(what: str, total: int, enabled: bool):
    """A progress bar on stderr for work that takes more than PROGRESS_DELAY seconds, if enabled."""
    return _Meter(what, total) if enabled and total > 0 else _NoMeter()


def _drain(pending: deque) -> None:
    """Wait out the calls still in flight after an error (their own errors are the same one, or moot)."""
    while pending:
        call = pending.popleft()[1]
        with contextlib.suppress(Exception):
            call.result()


class EnclaveClient:
    def __init__(
        self,
        endpoint: Endpoint | str,
        *,
        expect_pcr0: str | Sequence[str] | None = None,
        trusted_roots: Sequence | None = None,
        allow_debug: bool = False,
        timeout: float | None = 10,
    ):
        if expect_pcr0 is not None and not expect_pcr0:  # never "no check" by accident
            raise EnclaveError("expect_pcr0 is empty: give the image's PCR0, or None to skip attestation")
        self.endpoint = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
        self.connection = Connection.open(self.endpoint, timeout=timeout)
        self.trusted_roots = trusted_roots
        self.allow_debug = allow_debug
        self.attested: attestation.AttestationDocument | None = None
        if expect_pcr0:
            try:
                self.attested = self.attest(expect_pcr0=expect_pcr0)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> EnclaveClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, op: str, args: dict | None = None, **kw):
        return self.connection.call(op, args, **kw)

    def stat(self, path: str) -> dict | None:
        """What the share holds at path (mode, size, mtime, as share.stat answers), or None when nothing is there."""
        try:
            return self.call("share.stat", {"path": path})
        except RemoteError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    # -- attestation

    def attest(self, *, nonce: bytes | None = None, expect_pcr0=None) -> attestation.AttestationDocument:
        """A fresh document from the enclave, verified: signature, chain, nonce, age and PCR0 if given."""
        nonce = nonce if nonce is not None else os.urandom(32)
        document = self.call("attest", {"nonce": nonce})["document"]
        roots: Sequence | Callable[[], list]
        cache: attestation.VerifiedChains | None
        if self.trusted_roots is not None:  # not one conditional expression, whose two types mypy 1.11 joins to object
            roots, cache = self.trusted_roots, None
        else:
            roots, cache = _default_roots()
        try:
            return attestation.verify_document(
                document,
                trusted_roots=roots,
                chain_cache=cache,
                expected_pcrs={0: expect_pcr0} if expect_pcr0 else None,
                nonce=nonce,
                allow_debug=self.allow_debug,
            )
        except AttestationError as err:
            raise AttestationError(
                f"the enclave at {self.endpoint} failed attestation, nothing was sent: {err}"
            ) from err

    # -- transfers
    #
    # Push and pull compare the two sides by size first, and hash (both sides at once) only the files whose
    # size matches. Small files travel many to a share.batch request; a bigger file goes to a temporary name
    # beside its target and is renamed over it once whole, so an error or a dropped connection never leaves
    # a partial file under the target's name. A server without share.batch (an older image) gets the old
    # per-file requests, comparing by the SHA-256 in its manifest.

    def _batching(self) -> bool:
        return "share.batch" in self.connection.ops

    @property
    def _chunk(self) -> int:
        """Bytes of file data one request or reply carries: CHUNK, or half the server's frame limit if that is
        less (its replies are bounded by it too)."""
        return min(CHUNK, self.connection.max_frame // 2)

    def _batch(self, ops: list[dict]) -> Call:
        return self.connection.submit("share.batch", {"ops": ops})

    @staticmethod
    def _results(call: Call, count: int) -> list[dict]:
        """A batch's results: one map per operation, or the server broke the protocol."""
        results = call.result()
        if not isinstance(results, list) or len(results) != count or not all(isinstance(r, dict) for r in results):
            raise ProtocolError(f"the enclave answered a batch of {count} operations with something else")
        return results

    def _remote_manifest(self, remote_root: str, batching: bool) -> list[dict]:
        return self.call("share.manifest", {"path": remote_root, "hash": not batching})

    def _same_files(self, local_dir: Path, ours: dict, remote_root: str, theirs: dict, meter) -> set[str]:
        """Paths whose local and remote files have the same size and SHA-256: the enclave hashes its side
        (share.sha256 in batches, unless its manifest carried the digests) while this host hashes its own."""
        candidates = _same_size_files(ours, theirs)
        asked = [p for p in candidates if "sha256" not in theirs[p]]
        calls = [
            (group, self._batch([{"op": "sha256", "path": f"{remote_root}/{p}"} for p in group]))
            for group in (asked[i : i + BATCH_OPS] for i in range(0, len(asked), BATCH_OPS))
        ]
        local = {p: _sha256(local_dir.joinpath(*_safe_parts(p)), meter) for p in candidates}
        remote = {p: theirs[p]["sha256"] for p in candidates if "sha256" in theirs[p]}
        for group, call in calls:
            for path, result in zip(group, self._results(call, len(group)), strict=True):
                remote[path] = result.get("ok")  # an error (the file went away): not the same
        return {p for p in candidates if local[p] == remote.get(p)}

    def _failure(self, verb: str, remote: str, error, size: int | None = None, source=None) -> EnclaveError:
        """The error of one file's transfer, in the user's words; a full share says how full and what to do."""
        err = error if isinstance(error, RemoteError) else _remote_error(error, "share.batch")
        if err.errno == errno.ENOSPC:
            try:
                fs = self.call("share.statfs")
                free, total = fs["bavail"] * fs["frsize"], fs["blocks"] * fs["frsize"]
                room = f" (the share has {_size(free)} free of {_size(total)})"
            except (WireError, KeyError, TypeError):
                room = ""
            needed = f" ({_size(size)})" if size is not None else ""
            return EnclaveError(
                f"the enclave's share is full: {source or remote}{needed} does not fit in {remote}{room}; nothing "
                "partial was left there. Make room with `enclave share rm` (`enclave share ls` shows what is there) "
                "or give the enclave more memory, then push again: files already pushed are skipped"
            )
        return RemoteError(err.errno, f"cannot {verb} {remote}: {err.strerror}", name=err.name, op=err.op)

    def _settle(self, pending: deque, verb: str, keep: int = 0) -> None:
        """Wait for batches in flight until at most keep remain; on a file's error wait for all of them, then
        raise the first error."""
        failure = None
        while len(pending) > (0 if failure else keep):
            entries, call = pending.popleft()
            for entry, result in zip(entries, self._results(call, len(entries)), strict=True):
                if "error" in result and failure is None:
                    failure = self._failure(
                        verb, entry["remote"], result["error"], entry.get("size"), entry.get("source")
                    )
        if failure is not None:
            raise failure

    def push(self, local_dir, remote_dir: str, *, dry_run: bool = False, progress: bool = False) -> dict:
        """Copy what differs from local_dir into the share's remote_dir (size, then SHA-256); nothing is deleted.

        Folders go first, then files, each file whole or not at all. A push that fails partway (a full share, a
        dropped connection) leaves the folders it made and the files it finished: the user's tree, partly
        copied, which the next push completes without sending them again. A bigger file's temporary that a
        dropped connection could not remove is removed by the next push of that folder (pull never copies one).
        progress: show bars on stderr for hashing and sending that take more than a second."""
        started = time.monotonic()
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise EnclaveError(f"{local_dir} is not a directory: push copies a directory's contents")
        remote_root = "/" + remote_dir.strip("/")
        batching = self._batching()
        try:
            theirs = {e["path"]: e for e in self._remote_manifest(remote_root, batching)}
        except RemoteError as err:
            if err.errno != errno.ENOENT:
                raise
            theirs = None  # a folder that does not exist yet: created below, as mkdir -p would
            top = self._top_level()
            if remote_root.split("/")[1] not in top:
                raise EnclaveError(
                    f"{remote_root} is not in one of the share's folders ({_shown(top)}): push into one of "
                    f"them, e.g. `enclave push {local_dir} /{top[0] if top else 'dataset'}`"
                ) from None
        ours = local_manifest(local_dir, hashed=not batching)
        if batching:
            hashing = sum(ours[p]["size"] for p in _same_size_files(ours, theirs or {}))
            meter = _meter("hashing", hashing, progress)
            try:
                same = self._same_files(local_dir, ours, remote_root, theirs or {}, meter)
            finally:
                meter.close()
            changed = _changed(ours, theirs or {}, same)
        else:
            changed = [e for e in ours.values() if _differs(e, (theirs or {}).get(e["path"]))]
        sent = sum(e.get("size", 0) for e in changed)
        if not dry_run:
            _streaming(changed)
            if theirs is None:
                self._makedirs(remote_root)
            meter = _meter("push", sent, progress)
            try:
                if batching:
                    self._send(local_dir, remote_root, changed, theirs or {}, meter)
                else:
                    for entry in changed:
                        remote = f"{remote_root}/{entry['path']}"
                        if entry["type"] == "dir":
                            self.call("share.mkdir", {"path": remote, "mode": entry["mode"] | 0o700})
                        else:
                            self._upload(local_dir / entry["path"], remote, entry["mode"])
            finally:
                meter.close()
        return {
            "changed": [e["path"] for e in changed],
            "unchanged": len(ours) - len(changed),
            "bytes": sent,
            "seconds": round(time.monotonic() - started, 3),
        }

    def _send(self, local_dir: Path, remote_root: str, changed: list[dict], theirs: dict, meter) -> None:
        limit = min(SMALL_FILE, self._chunk)
        base = os.path.join(local_dir, "")
        dirs = [{**e, "remote": f"{remote_root}/{e['path']}"} for e in changed if e["type"] == "dir"]
        small = [{**e, "remote": f"{remote_root}/{e['path']}", "source": base + e["path"]} for e in changed
                 if e["type"] == "file" and e["size"] <= limit]  # fmt: skip
        pending: deque = deque()
        # Temporary files an interrupted push left behind (a dropped connection cannot remove its own).
        stale = [{"remote": f"{remote_root}/{p}"} for p, e in theirs.items() if _push_temporary(e)]
        for group in _groups(stale, 1, 0):  # best effort: one already gone is fine
            self._results(self._batch([{"op": "unlink", "path": e["remote"]} for e in group]), len(group))
        try:
            for group in _groups(dirs, 1, 0):  # in order, parents first: one batch at a time
                ops = [{"op": "mkdir", "path": e["remote"], "mode": e["mode"] | 0o700} for e in group]
                pending.append((group, self._batch(ops)))
                self._settle(pending, "create the folder")
            for group in _groups(small, 1, min(BATCH_BYTES, self._chunk)):
                ops = []
                for entry in group:
                    data = _read_small(entry["source"], entry["size"], limit)
                    if len(data) > limit:
                        raise EnclaveError(f"{entry['source']} grew while it was being pushed; push again")
                    entry["size"] = len(data)
                    ops.append({"op": "put", "path": entry["remote"], "mode": entry["mode"], "data": data})
                pending.append((group, self._batch(ops)))
                meter.update(sum(e["size"] for e in group))
                self._settle(pending, "push", keep=BATCHES_IN_FLIGHT - 1)
            self._settle(pending, "push")
        except BaseException:
            _drain(pending)
            raise
        for entry in changed:
            if entry["type"] == "file" and entry["size"] > min(SMALL_FILE, self._chunk):
                self._upload_whole(local_dir / entry["path"], f"{remote_root}/{entry['path']}", entry, meter)

    def _upload_whole(self, src: Path, remote: str, entry: dict, meter) -> None:
        """A big file: written under a temporary name beside remote, renamed over it once complete."""
        temp = f"{remote.rsplit('/', 1)[0]}/.push-{secrets.token_hex(8)}.part"
        pending: deque = deque()
        try:
            self.call("share.create", {"path": temp, "mode": entry["mode"], "exclusive": True})
            offset = 0
            chunk = self._chunk
            with open(src, "rb", buffering=0) as f:
                while block := f.read(chunk):
                    pending.append(self.connection.submit("share.write", {"path": temp, "offset": offset,
                                                                          "data": block}))  # fmt: skip
                    offset += len(block)
                    meter.update(len(block))
                    if len(pending) >= IN_FLIGHT:
                        pending.popleft().result()
            while pending:
                pending.popleft().result()
            self.call("share.rename", {"old": temp, "new": remote})
        except RemoteError as err:
            self._discard(temp, pending)
            raise self._failure("push", remote, err, entry["size"], src) from None
        except BaseException:
            self._discard(temp, pending)
            raise

    def _discard(self, temp: str, pending: deque) -> None:
        """Remove a failed upload's temporary file (if the connection still stands: else the next push does)."""
        for call in pending:
            with contextlib.suppress(Exception):
                call.result()
        with contextlib.suppress(Exception):
            self.call("share.unlink", {"path": temp})

    def _top_level(self) -> list[str]:
        """The share's top-level folders (/dataset, /encrypted, /model, /output), as the enclave lists them."""
        return sorted(e["name"] for e in self.call("share.list", {"path": "/"}) if stat.S_ISDIR(e["mode"]))

    def _what_is_there(self, path: str) -> str:
        """What the nearest existing folder above path holds, for an error about a path that is not there."""
        parts = path.strip("/").split("/")
        for depth in range(len(parts) - 1, 0, -1):
            folder = "/" + "/".join(parts[:depth])
            try:
                entries = self.call("share.list", {"path": folder})
            except RemoteError:
                continue
            names = sorted(e["name"] + ("/" if stat.S_ISDIR(e["mode"]) else "") for e in entries)
            return f"{folder} holds {_shown(names, folder + '/')}" if names else f"{folder} is empty"
        return f"the share's folders are {_shown(self._top_level())}"

    def _makedirs(self, remote: str) -> None:
        """Create remote and the folders above it that are missing (the top-level folder exists)."""
        parts = remote.strip("/").split("/")
        for depth in range(2, len(parts) + 1):
            try:
                self.call("share.mkdir", {"path": "/" + "/".join(parts[:depth]), "mode": 0o755})
            except RemoteError as err:
                if err.errno != errno.EEXIST:
                    raise

    def _upload(self, src: Path, remote: str, mode: int) -> None:
        """One file in place, for a server without share.batch (an older image)."""
        pending: deque = deque()
        with open(src, "rb", buffering=0) as f:
            first = f.read(self._chunk)
            # A small file goes whole with its create: one round trip. A server that does not know create's
            # data (an older image answers None, or a stat without it) gets it as a write after all.
            created = self.call("share.create", {"path": remote, "mode": mode, "data": first})
            if isinstance(created, dict) and created.get("size") == len(first):
                offset = len(first)
            else:
                offset = 0
                f.seek(0)
            while block := f.read(self._chunk):
                pending.append(self.connection.submit("share.write", {"path": remote, "offset": offset, "data": block}))
                offset += len(block)
                if len(pending) >= IN_FLIGHT:
                    pending.popleft().result()
        while pending:
            pending.popleft().result()

    def pull(self, remote_dir: str, local_dir, *, dry_run: bool = False, progress: bool = False) -> dict:
        """Copy what differs from the share's remote_dir into local_dir (size, then SHA-256); nothing is deleted.

        Each file is written under a temporary name and renamed over its target once its bytes match the
        enclave's SHA-256 of it."""
        started = time.monotonic()
        local_dir = Path(local_dir)
        remote_root = "/" + remote_dir.strip("/")
        batching = self._batching()
        try:
            listed = self._remote_manifest(remote_root, batching)
        except RemoteError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            raise EnclaveError(
                f"{remote_root} is not a folder in the enclave's share ({self._what_is_there(remote_root)}): "
                "pull a folder that is there, e.g. `enclave pull /output DIR`"
            ) from None
        for entry in listed:
            _safe_parts(entry["path"])
        # A push's temporary file (one a dropped connection left, until the next push removes it) is half a
        # file, not the enclave's data: never copied to the host.
        theirs = {e["path"]: e for e in listed if not _push_temporary(e)}
        ours = local_manifest(local_dir, hashed=False) if local_dir.is_dir() else {}
        hashing = sum(ours[p]["size"] for p in _same_size_files(ours, theirs))
        meter = _meter("hashing", hashing, progress)
        try:
            same = self._same_files(local_dir, ours, remote_root, theirs, meter)
        finally:
            meter.close()
        changed = _changed(theirs, ours, same)
        received = sum(e.get("size", 0) for e in changed)
        if not dry_run:
            _streaming(changed)
            local_dir.mkdir(parents=True, exist_ok=True)
            meter = _meter("pull", received, progress)
            try:
                self._receive(local_dir, remote_root, changed, batching, meter)
            finally:
                meter.close()
        return {
            "changed": [e["path"] for e in changed],
            "unchanged": len(theirs) - len(changed),
            "bytes": received,
            "seconds": round(time.monotonic() - started, 3),
        }

    def _receive(self, local_dir: Path, remote_root: str, changed: list[dict], batching: bool, meter) -> None:
        small, big = [], []
        checked: set[str] = set()
        for entry in changed:
            target = _refuse_links(str(local_dir), _safe_parts(entry["path"]), checked)
            if entry["type"] == "dir":
                try:
                    os.mkdir(target)
                except FileExistsError:
                    if not os.path.isdir(target):
                        raise EnclaveError(
                            f"{target} is a file here but a folder in the enclave: move it away and pull again"
                        ) from None
            elif batching and entry["size"] <= min(SMALL_FILE, self._chunk):
                small.append({**entry, "remote": f"{remote_root}/{entry['path']}", "target": target})
            else:
                big.append((entry, target))
        pending: deque[tuple[list[dict], Call]] = deque()
        try:
            for group in _groups(small, 2, min(BATCH_BYTES, self._chunk)):
                ops = []
                for entry in group:  # asks one byte more than listed: a file that grew is caught
                    ops.append({"op": "read", "path": entry["remote"], "offset": 0, "size": entry["size"] + 1})
                    ops.append({"op": "sha256", "path": entry["remote"]})
                pending.append((group, self._batch(ops)))
                if len(pending) >= BATCHES_IN_FLIGHT:
                    self._write_pulled(*pending.popleft(), meter)
            while pending:
                self._write_pulled(*pending.popleft(), meter)
        except BaseException:
            _drain(pending)
            raise
        for entry, target in big:
            self._download(f"{remote_root}/{entry['path']}", Path(target), entry, batching, meter)

    def _write_pulled(self, group: list[dict], call: Call, meter) -> None:
        results = self._results(call, 2 * len(group))
        for index, entry in enumerate(group):
            read, digest = results[2 * index], results[2 * index + 1]
            for result in (read, digest):
                if "error" in result:
                    raise self._failure("pull", entry["remote"], result["error"])
            data = read["ok"]
            if not isinstance(data, bytes) or not isinstance(digest["ok"], str):
                raise ProtocolError(f"the enclave answered a read of {entry['remote']} with something else")
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != digest["ok"]:
                raise EnclaveError(f"{entry['remote']} changed while it was being pulled; pull again")
            _write_whole(entry["target"], entry["mode"], data)
            meter.update(len(data))

    def _download(self, remote: str, target: Path, entry: dict, batching: bool, meter) -> None:
        # A short random name beside the target (O_EXCL, mode 0600): the target's own name may already
        # take the 255 bytes a name can have.
        fd, tmp_name = tempfile.mkstemp(prefix=".pull-", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        digest = _BackgroundHash()
        # The enclave hashes its file while this host reads it: any change meanwhile makes the two differ.
        expected = self.connection.submit("share.sha256", {"path": remote}) if batching else None
        try:
            with os.fdopen(fd, "wb") as f:
                pending: deque = deque()
                chunk = self._chunk
                for offset in range(0, entry["size"], chunk):
                    pending.append(
                        self.connection.submit("share.read", {"path": remote, "offset": offset, "size": chunk})
                    )
                    if len(pending) >= IN_FLIGHT:
                        _write_block(f, digest, pending.popleft().result(), meter)
                while pending:
                    _write_block(f, digest, pending.popleft().result(), meter)
            if digest.hexdigest() != (expected.result() if expected is not None else entry["sha256"]):
                raise EnclaveError(f"{remote} changed while it was being pulled; pull again")
            os.chmod(tmp, entry["mode"] & 0o755 | 0o600)
            os.replace(tmp, target)
        except BaseException:
            digest.stop()
            tmp.unlink(missing_ok=True)
            raise

    # -- jobs

    def run(
        self,
        package: str,
        script: str,
        args: str | Sequence[str] = (),
        *,
        kms: dict,
        on_output: Callable[[str, bytes], None] | None = None,
        timeout: float | None = None,
        clear_output: bool = False,
    ) -> dict:
        """Run script from package in the enclave; stdout/stderr reach on_output live; returns the job summary.

        The enclave refuses to start over files left in /output unless clear_output (then it removes them)."""
        request: dict[str, Any] = {
            "package": package if package.startswith("/") else f"/encrypted/{package}",
            "script": script,
            "args": args if isinstance(args, str) else list(args),
            "kms": kms,
        }
        if timeout:
            request["timeout"] = timeout
        if clear_output:
            request["clear_output"] = True

        def on_event(event):
            if on_output and isinstance(event, dict) and event.get("type") in ("stdout", "stderr"):
                on_output(event["type"], event["data"])

        try:
            return self.connection.stream("job.run", request, on_event=on_event)
        except RemoteError as err:
            if err.errno != errno.ENOENT or self._exists(request["package"]):
                raise
            raise EnclaveError(
                f"there is no package {request['package']} in the enclave's share: "
                f"{self._what_is_there(request['package'])}; name one of those, or copy the owner's package "
                "there first (`enclave push DIR /encrypted`, DIR holding the .pkg file)"
            ) from None

    def _exists(self, path: str) -> bool:
        return self.stat(path) is not None


def _shown(names: Sequence[str], prefix: str = "/", limit: int = 20) -> str:
    """'/dataset, /model' (at most limit names, then how many more)."""
    shown = ", ".join(prefix + n for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _size(n: int) -> str:
    """'614.0 MiB (643825664 bytes)': exact, for an error about space."""
    return f"{n / (1 << 20):.1f} MiB ({n} bytes)" if n >= 1 << 20 else f"{n} bytes"


class _BackgroundHash:
    """The SHA-256 of blocks given in order, computed on a thread of its own while the caller receives and
    writes the next ones (hashlib releases the GIL for big updates): a big pull's hash is no longer a third
    step after its receive and its write. At most IN_FLIGHT blocks wait for it."""

    def __init__(self):
        self._digest = hashlib.sha256()
        self._blocks: queue.Queue = queue.Queue(IN_FLIGHT)
        self._thread = threading.Thread(target=self._run, name="pull-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._blocks.get()) is not None:
            self._digest.update(block)

    def update(self, block: bytes) -> None:
        self._blocks.put(block)

    def hexdigest(self) -> str:
        self.stop()
        return self._digest.hexdigest()

    def stop(self) -> None:
        """End the thread once it has hashed what it was given (idempotent)."""
        if self._thread.is_alive():
            self._blocks.put(None)
            self._thread.join()


def _write_block(f, digest, block: bytes, meter) -> None:
    digest.update(block)  # first: the hash runs while the block is written
    f.write(block)
    meter.update(len(block))


def _read_small(path: str, size: int, limit: int) -> bytes:
    """The file at path, listed with size bytes, in one read of size + 1 (no buffered file object, no buffer of
    limit bytes per file); if it grew, up to limit + 1 bytes, so that the caller sees it is now too big."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, size + 1)
        if len(data) > size:
            data += os.read(fd, limit + 1 - len(data))
        return data
    finally:
        os.close(fd)


def _write_whole(target: str, mode: int, data: bytes) -> None:
    """target holds data, or (on any error) stays as it was: written beside it, then renamed over it."""
    temp = os.path.join(os.path.dirname(target), f".pull-{secrets.token_hex(8)}.part")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode & 0o755 | 0o600)
        os.close(fd)
        fd = -1
        os.replace(temp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _refuse_links(root: str, parts: list[str], checked: set[str]) -> str:
    """root/parts, refused if a symlink is anywhere between root and it on the host. checked: folders already
    found not to be links (a pull checks each once)."""
    current = root
    for index, part in enumerate(parts):
        current = os.path.join(current, part)
        if current not in checked:
            if os.path.islink(current):
                raise EnclaveError(
                    f"{current} is a symbolic link: refusing to write through it; remove it and pull again"
                )
            if index < len(parts) - 1:
                checked.add(current)
    return current


# botocore's shared config and credentials files: (the variable that moves one, its default path).
_AWS_FILES = (("AWS_CONFIG_FILE", "~/.aws/config"), ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))


def _credentials_from_environment(region: str | None, profile: str | None) -> tuple | None:
    """(region, access key, secret key, token) as botocore would find them, read without boto3; None when
    botocore could find them elsewhere.

    Importing boto3 and resolving credentials costs ~150 ms, most of a job's start from the command line.
    When no profile is named (argument, AWS_PROFILE or AWS_DEFAULT_PROFILE), AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY are both set, they do not expire (no AWS_CREDENTIAL_EXPIRATION), and neither the
    shared config nor the credentials file exists (botocore parses both even then, and fails on a broken one
    or a profile they lack), botocore's chain stops at its first provider, the environment, and the region
    is the argument, else AWS_DEFAULT_REGION. Anything else goes to boto3, errors included
    (tests/unit/plugins/module_utils/test_client_credentials.py holds the two to the same answers)."""
    environ = os.environ
    if profile is not None or "AWS_PROFILE" in environ or "AWS_DEFAULT_PROFILE" in environ:
        return None
    access_key, secret_key = environ.get("AWS_ACCESS_KEY_ID", ""), environ.get("AWS_SECRET_ACCESS_KEY", "")
    if not access_key or not secret_key or "AWS_CREDENTIAL_EXPIRATION" in environ:
        return None
    for variable, default in _AWS_FILES:
        if os.path.isfile(os.path.expanduser(os.path.expandvars(environ.get(variable, default)))):
            return None
    region = region if region is not None else environ.get("AWS_DEFAULT_REGION")
    # botocore's order: AWS_SECURITY_TOKEN (the older name) before AWS_SESSION_TOKEN; empty counts as unset.
    return region, access_key, secret_key, environ.get("AWS_SECURITY_TOKEN") or environ.get("AWS_SESSION_TOKEN")


def _credentials_from_boto3(region: str | None, profile: str | None) -> tuple:
    import boto3

    with settings.aws_errors():  # partial credentials or an unknown profile: one line saying what to set
        session = boto3.session.Session(profile_name=profile, region_name=region)
        credentials = session.get_credentials()
    if credentials is None:
        raise EnclaveError("no AWS credentials on this host for KMS: configure a profile or the instance role")
    frozen = credentials.get_frozen_credentials()
    return session.region_name, frozen.access_key, frozen.secret_key, frozen.token


def host_kms_settings(region: str | None = None, profile: str | None = None, *, need_region: bool = True) -> dict:
    """Region and credentials from the host's boto3 configuration (on nitro: the instance role via IMDSv2).

    need_region=False checks the credentials alone (a pre-flight run before the region is decided)."""
    found = _credentials_from_environment(region, profile) or _credentials_from_boto3(region, profile)
    region, access_key, secret_key, token = found
    if not region and need_region:
        raise EnclaveError("no AWS region configured: pass --region or set AWS_DEFAULT_REGION")
    out = {"region": region, "aws_access_key_id": access_key, "aws_secret_access_key": secret_key}
    if token:
        out["aws_session_token"] = token
    return out
