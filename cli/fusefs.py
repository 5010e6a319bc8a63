"""`enclave sync`: the enclave's share mounted on a host folder with FUSE.

The original sample's everyday loop: mount a folder that mirrors the enclave's
in-memory share (encrypted/, dataset/, model/, output/), `cp` packages and
data in, run a job, read /output. Every file operation becomes one wire
request on one connection; libfuse's worker threads issue them concurrently.

Kept cheap:
- 1 MiB reads and writes (fuse3 negotiates max_write / max_read / readahead of
  1 MiB; st_blksize tells cp to use 1 MiB buffers).
- readdir is one `share.list` round trip; the listed stats answer the lookups
  of the `ls -l` that follows, and the listing answers "no such file" for the
  lookup that precedes every create, for about a second. The stat libfuse
  wants right after a create is known without asking (see _new_file_attrs).
  Outside /output the create itself waits for the file's first write and
  carries its data when that write is the whole file (under 1 MiB from offset
  0), or is sent at its close: a small file costs one round trip. That write
  returns once the create is sent; its answer is awaited at the file's flush
  (every close), which reports its failure (EBUSY while a job holds the folder,
  ENOSPC...) to the program, and the kernel is told to forget the file it took
  as created. Anything else that touches the new name first (stat after the
  cache expires, listing, rename, read...) sends or awaits the create before it
  goes on. Closes stay synchronous on purpose: a job started after `cp` returns
  must find every file, and an error must reach the program that caused it.
- Writes are pipelined: write() returns once its request is sent, up to
  WRITE_WINDOW of a file in flight; flush (every close) and fsync wait for them
  and report a failure (ENOSPC...), as network file systems do. Whatever must
  see the data (read, stat, truncate, rename...) waits for it first.
- release, access, opendir: not implemented, so libfuse and the kernel answer
  them without a Python call (the server keeps no handles to release).

Coherence: the host is the only writer of the share except the running job,
which writes /output. Kernel attribute and entry caches last 1 s; this
module's own cache lasts 1 s, is updated by every mutation made through the
mount, and never answers "no such file" under /output.

Failure: a server error comes back as its errno; a lost connection makes
every operation fail at once with ENOTCONN ("Transport endpoint is not
connected"), never a hang; a server that stops answering gives ETIMEDOUT.

End: the process exits when the kernel ends the FUSE connection (the last
copy of the mount is gone) or on SIGTERM, which `enclave sync --unmount`
sends after fusermount3: a mount namespace made meanwhile holds a copy of the
mount that our unmount does not reach (see _stopped_by_sigterm).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import errno
import json
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from ..plugins.module_utils import mounts, settings
from ..plugins.module_utils.errors import CallTimeoutError, ConnectionClosedError, EnclaveError, RemoteError
from ..plugins.module_utils.wire_frames import keep_freed_memory

log = logging.getLogger(__name__)

MIB = 1 << 20
ATTR_TIMEOUT = 1.0
"""Seconds the kernel and this module trust attributes and listings they have seen."""
CALL_TIMEOUT = 120.0
"""A request unanswered this long fails with ETIMEDOUT (the server is alive but stuck)."""
READY_TIMEOUT = 60.0
"""How long `mount` waits for the background mount to come up (attestation included)."""
"""How long `unmount` waits for the mount's process to exit."""
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=16777216:glibc.malloc.trim_threshold=268435456"
OUTPUT = "/output"
"""Where the running job writes: never answered from a cached listing."""

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1
WRITE_WINDOW = 4
NOTIFY_WAIT = 1.0
"""Seconds a failed create waits for the kernel to forget the file before the failure is answered."""
"""1 MiB writes of one file in flight at once."""


def _load_mfusepy():
    # mfusepy looks for libfuse 2 first; where both are installed, libfuse 3 is the one that moves 1 MiB.
    if "mfusepy" not in sys.modules and not os.environ.get("FUSE_LIBRARY_PATH"):
        os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy
    except (ImportError, OSError) as err:
        raise EnclaveError(
            f"FUSE is not available ({err}): install libfuse 3 (apt-get install fuse3 libfuse3-3, "
            "or `make deps`) and the mfusepy package"
        ) from err
    if mfusepy.fuse_version_major != 3:
        raise EnclaveError(
            f"mfusepy loaded libfuse {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor} "
            f"({mfusepy._libfuse_path}); `enclave sync` needs libfuse 3 for 1 MiB writes: "
            "install fuse3 and libfuse3-3, or point FUSE_LIBRARY_PATH at libfuse3.so.3"
        )
    return mfusepy


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _name(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


class _Cache:
    """Attributes and directory listings seen recently, for ATTR_TIMEOUT seconds.

    Own mutations update it exactly (a created name joins its directory's
    listing), so a copy into a fresh directory does not ask the server about
    names it knows are absent. /output listings are kept for attributes only:
    the job adds files there behind our back."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._lock = threading.Lock()
        self._attrs: dict[str, tuple[float, dict]] = {}
        self._dirs: dict[str, tuple[float, set[str]]] = {}

    def attrs(self, path: str) -> dict | None:
        hit = self._attrs.get(path)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return None

    def absent(self, path: str) -> bool:
        """True when a fresh listing of path's directory says it does not exist."""
        parent = _parent(path)
        if _under(parent, OUTPUT):
            return False
        hit = self._dirs.get(parent)
        return hit is not None and hit[0] > time.monotonic() and _name(path) not in hit[1]

    def put_attrs(self, path: str, attrs: dict) -> None:
        with self._lock:
            self._attrs[path] = (time.monotonic() + self.ttl, attrs)

    def put_listing(self, path: str, entries: dict[str, dict]) -> None:
        deadline = time.monotonic() + self.ttl
        prefix = path.rstrip("/") + "/"
        with self._lock:
            self._dirs[path] = (deadline, set(entries))
            for name, attrs in entries.items():
                self._attrs[prefix + name] = (deadline, attrs)

    def changed(self, *paths: str) -> None:
        """Contents or metadata of paths changed: forget their attributes."""
        with self._lock:
            for path in paths:
                self._attrs.pop(path, None)

    def added(self, path: str, *, empty_dir: bool = False) -> None:
        with self._lock:
            parent = _parent(path)
            self._attrs.pop(path, None)
            self._attrs.pop(parent, None)
            hit = self._dirs.get(parent)
            if hit is not None:
                hit[1].add(_name(path))
                self._dirs[parent] = (time.monotonic() + self.ttl, hit[1])
            if empty_dir:
                self._dirs[path] = (time.monotonic() + self.ttl, set())

    def removed(self, path: str) -> None:
        with self._lock:
            parent = _parent(path)
            self._attrs.pop(path, None)
            self._attrs.pop(parent, None)
            self._dirs.pop(path, None)
            hit = self._dirs.get(parent)
            if hit is not None:
                hit[1].discard(_name(path))

    def moved(self, old: str, new: str) -> None:
        self.removed(old)
        self.removed(new)
        self.added(new)
        with self._lock:  # whatever lived under a renamed directory now has other names
            for table in (self._attrs, self._dirs):
                for key in [k for k in table if k.startswith(old + "/") or k.startswith(new + "/")]:
                    del table[key]


class _WriteBehind:
    """Writes in flight: write() returns once its request is sent, so several 1 MiB writes of a file
    travel at once (the kernel sends the next only when the last is answered). A write that fails
    later is reported by the next write, flush (close) or fsync of that file, as network file
    systems report asynchronous write errors. Requests that must see the data (reads, stats,
    truncates, renames...) wait for the writes of their path first; overlapping writes never race."""

    def __init__(self, window: int):
        self.window = window
        self._lock = threading.Lock()
        self._pending: dict[str, list[tuple[int, int, Future]]] = {}
        self._failed: dict[str, BaseException] = {}  # what finish() raised in the background
        self._pool = ThreadPoolExecutor(max_workers=4 * window, thread_name_prefix="write-reply")

    def _collect(self, path: str) -> list[tuple[int, int, Future]]:
        """Forget finished writes of path (keeping the first failure) and return those still running."""
        running = []
        for start, end, future in self._pending.get(path, ()):
            if not future.done():
                running.append((start, end, future))
            elif (failure := future.exception()) is not None and path not in self._failed:
                self._failed[path] = failure
        if running:
            self._pending[path] = running
        else:
            self._pending.pop(path, None)
        return running

    def forget(self, *paths: str) -> None:
        """A failure of an earlier file at these paths is no business of the next one."""
        with self._lock:
            for path in paths:
                self._failed.pop(path, None)

    def fail(self, path: str, failure: OSError) -> None:
        """A write to path failed after it returned: the next write, flush or fsync of path reports it."""
        with self._lock:
            self._failed.setdefault(path, failure)

    def raise_failure(self, path: str) -> None:
        with self._lock:
            self._collect(path)
            failure = self._failed.pop(path, None)
        if failure is not None:
            raise failure

    def add(self, path: str, offset: int, size: int, submit, finish) -> None:
        """Send a write (submit() -> call) once nothing in flight overlaps it and the window has room;
        finish(call) waits for its answer in the background. The kernel sends one write per file at a time."""
        end = offset + size
        while True:
            with self._lock:
                running = self._collect(path)
                if path in self._failed:
                    raise self._failed.pop(path)
                blocking = [f for start, stop, f in running if start < end and offset < stop]
                if not blocking and len(running) < self.window:
                    break
                blocking = blocking or [running[0][2]]
            wait(blocking)
        future = self._pool.submit(finish, submit())
        with self._lock:
            self._pending.setdefault(path, []).append((offset, end, future))

    def drain(self, path: str | None = None) -> None:
        """Wait for the writes of path (of every path when None); errors stay for raise_failure()."""
        with self._lock:
            paths = [path] if path else list(self._pending)
            futures = [entry[2] for p in paths for entry in self._pending.get(p, ())]
        if futures:
            wait(futures)

    def shutdown(self) -> None:
        self.drain()
        self._pool.shutdown()


class _Deferred:
    """A file created through the mount whose share.create is not sent yet, or is sent with the file's data
    and not answered yet (see ShareOperations.create and write)."""

    def __init__(self, mode: int, exclusive: bool):
        self.mode = mode
        self.exclusive = exclusive
        self.lock = threading.Lock()  # held while its create is sent or awaited: others wait for it to land
        self.sent = False
        self.call = None  # the create-with-data in flight, answered by whoever needs the file next (flush)
        self.data: bytes | None = None


class ShareOperations:
    """mfusepy operations over the wire connection (built by `operations()`, which subclasses mfusepy's base)."""

    use_ns = True  # times as integer nanoseconds, as the server keeps them
    fuse_error: type[OSError]  # mfusepy's FuseOSError, set by `operations()`

    def __init__(self, connection, mountpoint: str, *, ttl: float = ATTR_TIMEOUT, on_ready=None):
        self.connection = connection
        self.mountpoint = mountpoint
        self.cache = _Cache(ttl)
        self.on_ready = on_ready
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._count_lock = threading.Lock()
        self.stats: collections.Counter = collections.Counter()
        self.write_sizes: collections.Counter = collections.Counter()
        self.read_sizes: collections.Counter = collections.Counter()
        self.negotiated: dict = {}
        self._lost = threading.Event()
        self.writes = _WriteBehind(WRITE_WINDOW)
        self._mode_bits_seen = 0  # permission bits creates have asked for ...
        self._mode_bits_removed = 0  # ... and those of them the server's umask took away
        self._deferred_lock = threading.Lock()
        self._deferred: dict[str, _Deferred] = {}  # new files whose create waits for their first write or close

    # -- plumbing

    def _fail(self, code: int):
        return self.fuse_error(code)

    def _count(self, counter: collections.Counter, key) -> None:
        with self._count_lock:
            counter[key] += 1

    def _call(self, op: str, args: dict):
        return self._result(op, self._submit(op, args))

    def _submit(self, op: str, args: dict):
        self._count(self.stats, op)
        try:
            return self.connection.submit(op, args)
        except Exception as err:  # every failure becomes an errno for the kernel
            raise self._as_errno(op, err) from None

    def _result(self, op: str, call):
        try:
            return call.result(CALL_TIMEOUT)
        except CallTimeoutError:
            call.cancel()
            log.error("%s got no answer from the enclave within %s s: is the enclave server stuck?", op, CALL_TIMEOUT)
            raise self._fail(errno.ETIMEDOUT) from None
        except Exception as err:
            raise self._as_errno(op, err) from None

    def _as_errno(self, op: str, err: Exception) -> OSError:
        if isinstance(err, RemoteError):
            return self._fail(err.errno or errno.EIO)
        if isinstance(err, ConnectionClosedError):
            if not self._lost.is_set():
                self._lost.set()
                log.error(
                    "the connection to the enclave is lost (%s): every operation on the mount now fails with "
                    "ENOTCONN; unmount it (enclave sync -d DIR --unmount) and mount again once the enclave runs",
                    err,
                )
            return self._fail(errno.ENOTCONN)
        log.error("%s failed on the client side: %s", op, err)
        return self._fail(getattr(err, "errno", None) or errno.EIO)

    def _attrs(self, st: dict) -> dict:
        return {
            "st_mode": st["mode"],
            "st_nlink": st["nlink"],
            "st_size": st["size"],
            "st_blocks": st["blocks"],
            "st_blksize": MIB,  # cp and friends size their buffers from this: 1 MiB requests
            "st_uid": self.uid,  # the enclave's owners mean nothing here: the files are the mounting user's
            "st_gid": self.gid,
            "st_atime": st["atime_ns"],
            "st_mtime": st["mtime_ns"],
            "st_ctime": st["ctime_ns"],
        }

    # -- lifecycle

    def init_with_config(self, conn, config):
        if conn is not None:
            # libfuse 3 always allows big writes; it caps them at its 1 MiB buffer (max_pages 256).
            conn.max_write = MIB
            conn.max_readahead = MIB
            conn.max_read = MIB  # must equal the max_read mount option
            self.negotiated = {
                "max_write": conn.max_write,
                "max_read": conn.max_read,
                "max_readahead": conn.max_readahead,
            }
        log.info("kernel connection: %s", self.negotiated)
        if self.on_ready is not None:
            # Requests wait until init has returned and libfuse has accepted it: a stat of the root from
            # another thread then proves the whole path (kernel, libfuse, wire, server) before we say ready.
            threading.Thread(target=self._probe, name="mount-probe", daemon=True).start()

    def _probe(self) -> None:
        raise_readahead(self.mountpoint)
        try:
            os.stat(self.mountpoint)
        except OSError as err:
            self.on_ready(f"the new mount does not answer: {err.strerror}")
        else:
            self.on_ready(None)

    # -- metadata

    def getattr(self, path, fh=None):
        self.writes.drain(path)
        cached = self.cache.attrs(path)
        if cached is not None:
            self._count(self.stats, "cached getattr")
            return cached
        self._materialize(path)
        if self.cache.absent(path):
            self._count(self.stats, "cached ENOENT")
            raise self._fail(errno.ENOENT)
        attrs = self._attrs(self._call("share.stat", {"path": path}))
        self.cache.put_attrs(path, attrs)
        return attrs

    def readdir(self, path, fh):
        self._materialize_all()
        self.writes.drain()
        entries = {e["name"]: self._attrs(e) for e in self._call("share.list", {"path": path})}
        self.cache.put_listing(path, entries)
        return [".", "..", *((name, attrs, 0) for name, attrs in entries.items())]

    def statfs(self, path):
        st = self._call("share.statfs", {})
        return {
            "f_bsize": st["bsize"],
            "f_frsize": st["frsize"],
            "f_blocks": st["blocks"],
            "f_bfree": st["bfree"],
            "f_bavail": st["bavail"],
            "f_files": st["files"],
            "f_ffree": st["ffree"],
            "f_favail": st["ffree"],
            "f_namemax": st["namemax"],
        }

    def chmod(self, path, mode):
        self._materialize(path)
        self.writes.drain(path)
        self._call("share.chmod", {"path": path, "mode": mode & 0o7777})
        self.cache.changed(path)
        return 0

    def chown(self, path, uid, gid):
        # Ownership is not carried into the enclave: accept only what it already is.
        if uid not in (-1, self.uid) or gid not in (-1, self.gid):
            raise self._fail(errno.EPERM)
        return 0

    def utimens(self, path, times=None):
        self._materialize(path)
        self.writes.drain(path)  # a write landing after would move mtime again (cp -p sets times last)
        now = time.time_ns()
        atime, mtime = times if times is not None else (UTIME_NOW, UTIME_NOW)
        if UTIME_OMIT in (atime, mtime):
            current = self._call("share.stat", {"path": path})
            atime = current["atime_ns"] if atime == UTIME_OMIT else atime
            mtime = current["mtime_ns"] if mtime == UTIME_OMIT else mtime
        atime = now if atime == UTIME_NOW else atime
        mtime = now if mtime == UTIME_NOW else mtime
        self._call("share.utimens", {"path": path, "atime_ns": atime, "mtime_ns": mtime})
        self.cache.changed(path)
        return 0

    # -- namespace

    def mkdir(self, path, mode):
        self._added(path, self._call("share.mkdir", {"path": path, "mode": mode & 0o7777}), empty_dir=True)
        return 0

    def rmdir(self, path):
        self._materialize_all()
        self.writes.drain()
        self._call("share.rmdir", {"path": path})
        self.cache.removed(path)
        return 0

    def unlink(self, path):
        self._materialize(path)
        self.writes.drain(path)
        self._call("share.unlink", {"path": path})
        self.writes.forget(path)
        self.cache.removed(path)
        return 0

    def rename(self, old, new, flags=0):
        self._materialize_all()
        self.writes.drain()  # writes in flight name the old path (or one under it)
        if flags & ~RENAME_NOREPLACE:
            raise self._fail(errno.EINVAL)  # RENAME_EXCHANGE / WHITEOUT: the share has no atomic swap
        if flags & RENAME_NOREPLACE:
            try:
                self._call("share.stat", {"path": new})
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise
            else:
                raise self._fail(errno.EEXIST)
        self._call("share.rename", {"old": old, "new": new})
        self.writes.forget(old, new)
        self.cache.moved(old, new)
        return 0

    def symlink(self, target, source):
        raise self._fail(errno.EPERM)  # the share holds only files and directories

    def link(self, target, source):
        raise self._fail(errno.EPERM)

    def mknod(self, path, mode, dev):
        raise self._fail(errno.EPERM)

    def readlink(self, path):
        # A link a job planted in the share would be followed on the host, not in the enclave.
        raise self._fail(errno.EPERM)

    # -- files (stateless on the server: no handles to open or close)

    def create(self, path, mode, flags):
        exclusive = bool(flags & os.O_EXCL)
        self.writes.forget(path)
        self._materialize(path)  # an earlier file of that name still waiting for its create
        if not _under(path, OUTPUT) and not (mode & 0o777 & ~self._mode_bits_seen):
            # Deferred until the file's first write (sent with the data when it is the whole file) or its
            # close: a small file costs one round trip. Safe outside /output, where only this mount creates
            # files, and the kernel holds the directory while it creates (no second create of the name can
            # slip in: the cache now lists it). Whatever else touches the name first sends the create.
            with self._deferred_lock:
                self._deferred[path] = _Deferred(mode & 0o7777, exclusive)
            self._added(path, self._new_file_attrs(path, mode))
            return 0
        try:
            created = self._call("share.create", {"path": path, "mode": mode & 0o7777, "exclusive": True})
        except OSError as err:
            # It appeared since the kernel looked (the job, in /output): open it as O_CREAT without O_EXCL would.
            if err.errno != errno.EEXIST or exclusive:
                raise
            self.open(path, flags)
            self._added(path, None)
            return 0
        if isinstance(created, dict) and "mode" in created:  # a server that answers with the new stat
            self._learn_mode_bits(mode, created["mode"])
        self._added(path, created if isinstance(created, dict) else self._new_file_attrs(path, mode))
        return 0

    def _forget_in_kernel(self, path: str) -> None:
        """Make the kernel ask again for path's attributes (what the mount told it may be wrong)."""

    def _learn_mode_bits(self, asked: int, got: int) -> None:
        wanted = asked & 0o777
        self._mode_bits_seen |= wanted
        self._mode_bits_removed |= wanted & ~got

    def _create_args(self, path: str, entry: _Deferred, data: bytes | None) -> dict:
        args = {"path": path, "mode": entry.mode, "exclusive": True}
        if data is not None:
            args["data"] = data
        return args

    def _send_create(self, path: str, entry: _Deferred, data: bytes | None, call=None) -> bool:
        """Send a deferred create (or await call, the one already sent), with the file's data if given;
        True if the data went with it."""
        try:
            created = self._result("share.create", call or self._submit("share.create", self._create_args(
                path, entry, data)))  # fmt: skip
        except OSError as err:
            # It appeared since (not through this mount): open it as O_CREAT without O_EXCL would.
            if err.errno != errno.EEXIST or entry.exclusive:
                raise
            return False
        if not (isinstance(created, dict) and "mode" in created):
            return False  # an older server: no stat, and the data (if any) was not written
        if data is not None and created.get("size") != len(data):
            return False
        self.cache.put_attrs(path, self._attrs(created))
        return data is not None

    def _take_deferred(self, path: str):
        with self._deferred_lock:
            return self._deferred.get(path)

    def _materialize(self, path: str) -> None:
        """Send path's create if it is deferred, or wait for the create-with-data in flight; whatever needs
        the file on the server calls this first. A failure of a create that carried data belongs to the
        write that returned already: it is kept for the file's flush (close) to report, as a write's is."""
        entry = self._take_deferred(path)
        if entry is None:
            return
        with entry.lock:
            if entry.sent and entry.call is None:
                return  # landed (or failed) while we waited for the lock
            try:
                if entry.call is None:
                    try:
                        self._send_create(path, entry, None)
                    except OSError:
                        self.cache.removed(path)
                        self._forget_in_kernel(path)
                        raise
                    return
                try:
                    if not self._send_create(path, entry, entry.data, entry.call):
                        # EEXIST opened as O_CREAT without O_EXCL would, or an older server: write it now.
                        self._call("share.write", {"path": path, "offset": 0, "data": entry.data})
                except OSError as err:
                    # The kernel took the file as created at open: it must ask again (it may not exist).
                    self.cache.changed(path)
                    self._forget_in_kernel(path)
                    self.writes.fail(path, err)
            finally:
                entry.sent = True  # failed or not: the next operation asks the server as usual
                entry.call = entry.data = None
                with self._deferred_lock:
                    if self._deferred.get(path) is entry:
                        del self._deferred[path]

    def _send_with_data(self, path: str, data: bytes) -> bool:
        """The first write of a new file that is the whole file: its create is sent with the data and
        answered when the file is next needed (its flush at close, at the latest). True if it was sent."""
        entry = self._take_deferred(path)
        if entry is None:
            return False
        with entry.lock:
            if entry.sent:
                return False
            entry.call = self._submit("share.create", self._create_args(path, entry, data))
            entry.data = data
            entry.sent = True
        self.cache.changed(path)  # its size is the server's to tell once the create lands
        return True

    def _materialize_all(self) -> None:
        with self._deferred_lock:
            paths = list(self._deferred)
        for path in paths:
            self._materialize(path)

    def _new_file_attrs(self, path: str, mode: int) -> dict:
        """The stat of a file this mount just created, which libfuse asks for at once.

        Known without asking, once the server's umask is known for the requested permission bits
        (learned from the real stat of earlier creates): saves a round trip per file of a `cp -r`.
        The kernel keeps these until the file's first write or for ATTR_TIMEOUT at most."""
        wanted = mode & 0o777
        if wanted & ~self._mode_bits_seen:
            st = self._call("share.stat", {"path": path})
            self._learn_mode_bits(mode, st["mode"])
            return st
        now = time.time_ns()
        return {"mode": stat.S_IFREG | (wanted & ~self._mode_bits_removed), "size": 0, "nlink": 1, "blocks": 0,
                "atime_ns": now, "mtime_ns": now, "ctime_ns": now}  # fmt: skip

    def _added(self, path: str, st, *, empty_dir: bool = False) -> None:
        self.cache.added(path, empty_dir=empty_dir)
        if isinstance(st, dict) and "mode" in st:  # also a server that answers create/mkdir with the new stat
            self.cache.put_attrs(path, self._attrs(st))

    def open(self, path, flags):
        self._materialize(path)
        self.writes.forget(path)
        if flags & os.O_TRUNC:  # fuse3 passes O_TRUNC to open (atomic_o_trunc) rather than a separate truncate
            self.truncate(path, 0)
        return 0

    def read(self, path, size, offset, fh):
        self._materialize(path)
        self.writes.drain(path)
        self._count(self.read_sizes, size)
        return self._call("share.read", {"path": path, "offset": offset, "size": size})

    def write(self, path, data, offset, fh):
        self._count(self.write_sizes, len(data))
        if offset == 0 and len(data) < MIB and self._send_with_data(path, data):
            return len(data)  # a small new file: its data goes with its create, answered at its flush
        self._materialize(path)
        self.cache.changed(path)
        if len(data) < MIB:  # a small file, or a file's tail: nothing to overlap with, skip the hand-off
            self.writes.drain(path)
            self.writes.raise_failure(path)
            return self._call("share.write", {"path": path, "offset": offset, "data": data})
        self.writes.add(
            path,
            offset,
            len(data),
            lambda: self._submit("share.write", {"path": path, "offset": offset, "data": data}),
            lambda call: self._result("share.write", call),
        )
        return len(data)

    def flush(self, path, fh):
        # close(2) waits here: the file's writes have landed, or close reports why not.
        self._materialize(path)  # created and closed without a write: an empty file
        self.writes.drain(path)
        self.writes.raise_failure(path)
        self.cache.changed(path)
        return 0

    def fsync(self, path, datasync, fh):
        return self.flush(path, fh)

    def truncate(self, path, length, fh=None):
        self._materialize(path)
        self.writes.drain(path)
        self._call("share.truncate", {"path": path, "size": length})
        self.cache.changed(path)
        return 0

    def destroy(self, path):
        with contextlib.suppress(OSError):
            self._materialize_all()
        self.writes.shutdown()

    def report(self) -> dict:
        """What the mount did: requests per op, and the sizes the kernel read and wrote in."""
        return {
            "ops": dict(self.stats),
            "write_sizes": {str(k): v for k, v in sorted(self.write_sizes.items())},
            "read_sizes": {str(k): v for k, v in sorted(self.read_sizes.items())},
            "negotiated": self.negotiated,
        }


def operations(connection, mountpoint, **kwargs):
    """A ShareOperations that is also an mfusepy.Operations (mfusepy is imported only when mounting)."""
    mfusepy = _load_mfusepy()

    class Ops(ShareOperations, mfusepy.Operations):
        fuse_error = mfusepy.FuseOSError
        _fuse = None
        _invalidating: tuple | list = ()  # threads notifying the kernel (a list of its own once mounted)
        _stopping = False  # stop() was called: the session ends at init if it was not up yet
        _device = -1  # the session's /dev/fuse descriptor, while _fuse is set
        _loop_thread: int | None = None  # the thread in libfuse's loop (serve() sets it)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.destroyed = threading.Event()  # libfuse called destroy: the session ran and is over

        def init_with_config(self, conn, config):
            with self._deferred_lock:
                self._invalidating = []
                self._fuse = ctypes.c_void_p(mfusepy._libfuse.fuse_get_context().contents.fuse)
                self._device = _session_fd(mfusepy._libfuse, self._fuse)
                if self._stopping:
                    mfusepy._libfuse.fuse_exit(self._fuse)  # the worker running init ends the loop when it returns
            super().init_with_config(conn, config)

        def stop(self) -> None:
            """End the session from any thread, as the kernel ends it when the last copy of the mount goes:
            libfuse's loop returns, destroy runs (in-flight writes land), and closing /dev/fuse ends the kernel's
            connection. For a copy of the mount that another mount namespace keeps after our unmount."""
            with self._deferred_lock:
                self._stopping = True
                if self._fuse is None:
                    return  # not mounted yet (init ends it) or destroyed already
                poller = select.poll()
                poller.register(self._device, 0)  # /dev/fuse polls POLLERR once the kernel ended the connection
                if poller.poll(0):
                    return  # unmounted for good: the loop is ending on its own
                mounted_here = self.mountpoint in mounts.mount_table()
                mfusepy._libfuse.fuse_exit(self._fuse)
            if mounted_here:
                log.info("ending the session on request: libfuse unmounts %s", self.mountpoint)
            else:
                log.info("%s is unmounted here but the kernel keeps its connection (a copy of the mount in another "
                         "mount namespace, or a lazily detached mount still in use): ending the session ends it, "
                         "and libfuse finds nothing to unmount", self.mountpoint)  # fmt: skip
            # fuse_exit only sets a flag that libfuse's loop checks when its sem_wait returns: a signal
            # interrupts that wait (the workers sleep in read(/dev/fuse), which no request will end now).
            # Again until destroy has started, in case the first came just before the loop went back to sleep.
            while self._loop_thread is not None:
                signal.pthread_kill(self._loop_thread, signal.SIGTERM)
                if self.destroyed.wait(1.0):
                    break

        def _forget_in_kernel(self, path):
            # From a thread of its own: libfuse must not notify the kernel inside a related request. Waited
            # for a moment, so that the program told of the failure finds the file gone; a request of ours
            # holding a page the kernel must drop (a write) lets it finish once answered.
            with self._deferred_lock:  # the failed creates of deferred files are what it is for
                if self._fuse is None:
                    return  # not mounted yet, or being unmounted: the kernel's caches go with the mount
                thread = threading.Thread(target=mfusepy._libfuse.fuse_invalidate_path,
                                          args=(self._fuse, path.encode()), name="invalidate", daemon=True)  # fmt: skip
                self._invalidating = [t for t in self._invalidating if t.is_alive()] + [thread]
                thread.start()
            thread.join(NOTIFY_WAIT)

        def destroy(self, path):
            self.destroyed.set()
            with self._deferred_lock:
                self._fuse = None  # libfuse frees it after destroy: no notification may start from now on
                running, self._invalidating = self._invalidating, ()
            for thread in running:
                thread.join()
            super().destroy(path)

    return Ops(connection, mountpoint, **kwargs)


def _session_fd(libfuse, fuse) -> int:
    """The /dev/fuse descriptor of a mounted struct fuse (open until libfuse destroys the session)."""
    get_session, session_fd = libfuse.fuse_get_session, libfuse.fuse_session_fd
    get_session.restype, get_session.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    session_fd.restype, session_fd.argtypes = ctypes.c_int, [ctypes.c_void_p]
    return session_fd(get_session(fuse))


def _fuse_class():
    mfusepy = _load_mfusepy()

    class FUSE(mfusepy.FUSE):
        def rename_fuse_3(self, old, new, flags):
            # mfusepy drops renameat2's flags: RENAME_NOREPLACE taken as a plain rename would overwrite.
            return self.operations.rename(
                old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags
            )

    return FUSE


FUSE_OPTIONS = {
    "fsname": "enclave",
    "subtype": "enclave",
    "noexec": True,  # /output is written by the enclave's job: nothing there runs on the host by accident
    "max_read": MIB,  # a mount option; max_write and max_readahead are set in init (libfuse 3 has no -o for them)
    "attr_timeout": ATTR_TIMEOUT,
    "entry_timeout": ATTR_TIMEOUT,
    "negative_timeout": 0,
}


def raise_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead 1 MiB, so sequential reads arrive as 1 MiB requests.

    FUSE caps a mount's readahead at the kernel default (128 KiB) whatever max_readahead says;
    only root may raise it (/sys/class/bdi/MAJOR:MINOR/read_ahead_kb). Others keep 128 KiB reads."""
    device = mounts.mount_devices().get(mountpoint)
    if device is None:
        return
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(str(MIB // 1024))
    except OSError as err:
        log.info("reads stay at the kernel's default readahead (could not raise it: %s)", err.strerror)


@contextlib.contextmanager
def _stopped_by_sigterm(ops):
    """While serving, SIGTERM ends the session cleanly (ops.stop()) instead of killing the process mid-write.

    `enclave sync --unmount` sends it once fusermount3 has unmounted the share (mounts.unmount): a mount namespace
    made while the share was mounted (unshare, a container, an enclave started meanwhile) keeps a private copy
    of the mount that our unmount does not reach, and the kernel keeps the FUSE connection, so the loop would
    serve that copy until the namespace ends. Python runs handlers in the main thread only, which sits in
    libfuse: the signal is read from the wakeup fd by a thread of its own. After the session SIGTERM is
    ignored: the one unmount sends as the process ends on its own must not kill it while it writes its report
    (or, in the foreground, turn its exit status into "Terminated"; Python restores handlers, not SIG_IGN, at exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread: SIGTERM keeps its default there
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # set_wakeup_fd's requirement: the signal handler must never block
    ops._loop_thread = threading.get_ident()  # the thread that will sit in libfuse's loop

    def watch() -> None:
        with open(read_end, "rb", buffering=0) as wakeups:
            while chunk := wakeups.read(64):  # until serve closes the other end: no handler writes to a closed pipe
                if signal.SIGTERM in chunk and not ops._stopping:
                    ops.stop()

    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(target=watch, name="sigterm", daemon=True).start()
    try:
        yield
    finally:
        ops._loop_thread = None  # libfuse's loop is over: nothing to interrupt any more
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.set_wakeup_fd(previous)
        os.close(write_end)  # the watcher reads the end of the pipe and returns


def serve(connection, mountpoint, *, on_ready=None) -> dict:
    """Mount the share at mountpoint over connection and serve it in this process until it is unmounted
    (or SIGTERM ends the session: _stopped_by_sigterm).

    on_ready(None) is called once the mount answers, on_ready(reason) if it does not.
    Returns what the mount did (ShareOperations.report())."""
    keep_freed_memory()  # 1 MiB frames without a page fault each (docs/PROTOCOL.md section 9)
    ops = operations(connection, os.fspath(mountpoint), on_ready=on_ready)
    try:
        with _stopped_by_sigterm(ops):
            _fuse_class()(ops, os.fspath(mountpoint), foreground=True, **FUSE_OPTIONS)
    except RuntimeError as err:
        if not ops.destroyed.is_set():
            raise EnclaveError(
                f"libfuse could not mount {mountpoint} (error {err}): see the messages above or in the mount's log; "
                "is /dev/fuse there and is fusermount3 installed?"
            ) from None
        # The mount was up and libfuse has unmounted it: its own SIGINT/SIGHUP handler (Ctrl-C in the foreground)
        # ends the loop with this status, as would a failed read of /dev/fuse.
        log.info("libfuse ended the session with status %s (Ctrl-C, SIGHUP, or an error above)", err)
    return ops.report()


def _check_mountpoint(mountpoint: str) -> None:
    if mounts.is_mounted(mountpoint):
        state = mounts.mount_state(mountpoint)
        owner = f" by process {state['pid']}" if state and mounts.alive(state) else ""
        raise EnclaveError(
            f"{mountpoint} is already a mount point{owner}: unmount it first (enclave sync -d {mountpoint} --unmount)"
        )
    if not os.path.isdir(mountpoint):
        raise EnclaveError(f"{mountpoint} is not a directory: give a folder to mount the share on")
    if os.listdir(mountpoint):
        raise EnclaveError(f"{mountpoint} is not empty: mounting would hide its files; choose an empty or new folder")


# ---------------------------------------------------------------- mount (unmount: mounts.unmount)


def mount(
    endpoint: str,
    mountpoint,
    *,
    foreground: bool = False,
    expect_pcr0: str | None = None,
    allow_debug: bool = False,
) -> None:
    """Mount the enclave share at mountpoint.

    In the background (the default) a mount process is started and this returns
    once the mount works, or raises with the reason it did not (attestation
    included); its pid is in the state file (mounts.mount_state()). In the foreground
    this serves until the share is unmounted (Ctrl-C or unmount() elsewhere)."""
    if expect_pcr0 is not None and not expect_pcr0:  # never "no check" by accident
        raise EnclaveError("expect_pcr0 is empty: give the image's PCR0, or None to mount without attestation")
    mountpoint = mounts.canonical(mountpoint)
    _check_mountpoint(mountpoint)
    if foreground:
        _serve_here(endpoint, mountpoint, expect_pcr0=expect_pcr0, allow_debug=allow_debug, ready_fd=None)
        return
    _load_mfusepy()  # fail here, with the reason, rather than in the background
    paths = mounts.state_paths(mountpoint)
    settings.private_dir(paths["log"].parent)
    read_end, write_end = os.pipe()
    # Module of the package root, so the child imports this same tree however we were imported.
    root = Path(__file__).parents[len(__name__.split(".")) - 1]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        # Keep freed 1 MiB buffers from the first allocation on (docs/PROTOCOL.md section 9).
        GLIBC_TUNABLES=":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLES])),
    )
    argv = [sys.executable, "-m", __name__, "--endpoint", endpoint, "--mountpoint", mountpoint,
            "--ready-fd", str(write_end)]  # fmt: skip
    if expect_pcr0:
        argv += ["--expect-pcr0", expect_pcr0]
    if allow_debug:
        argv.append("--allow-debug")
    with open(paths["log"], "ab") as logfile:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            pass_fds=(write_end,),
            start_new_session=True,  # not killed with the shell that started it, as the sample's client
            env=env,
            cwd="/",
        )
    os.close(write_end)
    try:
        answer = _read_answer(read_end, child)
    finally:
        os.close(read_end)
    if answer != "ready":
        if child.poll() is None:
            child.kill()
        child.wait()
        raise EnclaveError(f"mounting the enclave share at {mountpoint} failed: {answer} (log: {paths['log']})")
    state = {
        "pid": child.pid,
        "start_ticks": mounts.start_ticks(child.pid),
        "mountpoint": mountpoint,
        "endpoint": endpoint,
        "log": str(paths["log"]),
        "stats": str(paths["stats"]),
        "started": time.time(),
    }
    mounts.write_state(paths, state)


def _read_answer(fd: int, child: subprocess.Popen) -> str:
    """The mount process's first line on the ready pipe: "ready" or "error: why"."""
    data = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"the mount process did not report ready within {READY_TIMEOUT:.0f} s"
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            child.wait(timeout=mounts.EXIT_TIMEOUT)
            return f"the mount process exited (status {child.returncode}) before the mount was ready"
        data += chunk
    line = data.split(b"\n", 1)[0].decode(errors="replace")
    return "ready" if line == "ready" else line.removeprefix("error: ")


def _serve_here(endpoint, mountpoint, *, expect_pcr0, allow_debug, ready_fd) -> int:
    """Connect (attesting first when asked), mount and serve in this process; the mount process's body."""
    from ..plugins.module_utils.client import EnclaveClient

    paths = mounts.state_paths(mountpoint)

    answered: list[str] = []

    def answer(text: str) -> None:
        """Tell the parent, once: "ready" or "error: why" (the fd is closed after, its number may be reused)."""
        if ready_fd is None or answered:
            return
        answered.append(text)
        try:
            os.write(ready_fd, (text + "\n").encode())
            os.close(ready_fd)
        except OSError:
            pass

    try:
        client = EnclaveClient(endpoint, expect_pcr0=expect_pcr0, allow_debug=allow_debug)
    except (EnclaveError, OSError) as err:
        answer(f"error: {err}")
        raise

    def ready(problem: str | None) -> None:
        if problem is not None:
            answer(f"error: {problem}")
            return
        if ready_fd is None:  # foreground: we are the mount's process
            mounts.write_state(paths, {"pid": os.getpid(), "start_ticks": mounts.start_ticks(os.getpid()),
                                       "mountpoint": mountpoint, "endpoint": endpoint, "log": None,
                                       "stats": str(paths["stats"]), "started": time.time()})  # fmt: skip
        answer("ready")

    try:
        report = serve(client.connection, mountpoint, on_ready=ready)
        paths["stats"].write_text(json.dumps(report, indent=2) + "\n")
        log.info("unmounted %s; %s", mountpoint, json.dumps(report["ops"]))
    except EnclaveError as err:
        answer(f"error: {err}")
        raise
    finally:
        client.close()
        state = mounts.mount_state(mountpoint)
        if state and state.get("pid") == os.getpid():
            paths["state"].unlink(missing_ok=True)
    return 0


def _daemon_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="enclave-mount", description="The background process of `enclave sync`.")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--expect-pcr0")
    parser.add_argument("--allow-debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s enclave-mount[%(process)d] %(levelname)s %(message)s")
    try:
        return _serve_here(args.endpoint, args.mountpoint, expect_pcr0=args.expect_pcr0,
                           allow_debug=args.allow_debug, ready_fd=args.ready_fd)  # fmt: skip
    except (EnclaveError, OSError) as err:
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    raise SystemExit(_daemon_main())
