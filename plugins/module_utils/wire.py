"""The wire protocol between the host and the enclave server (docs/PROTOCOL.md).

Frames are a 4-byte big-endian length and one CBOR map holding plain data only
(no CBOR tags but bignums: nothing on the wire can name a type to build, which
is what made the original sample's pickle framing executable). One connection
carries many concurrent requests, matched to their replies by id; a request may
stream events before its reply and may be cancelled.

The server and every client import this module; nothing else frames bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import decimal
import errno
import fractions
import io
import ipaddress
import itertools
import logging
import queue
import re
import select
import selectors
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

try:
    import cbor2
except ImportError as exc:  # the modules report it: module_options.require_libraries
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

from .endpoints import Endpoint
from .errors import EnclaveError

log = logging.getLogger(__name__)

PROTOCOL = "confidential-ml-nitro"
VERSIONS = (1,)
MAX_FRAME = 4 * 1024 * 1024
"""Default frame limit: a 1 MiB data chunk plus its envelope fits with room to spare."""
MIN_FRAME = 64 * 1024
"""The smallest limit a peer may announce, and the limit on the hello frame."""
MAX_ID = 2**63 - 1
INLINE_MAX_BYTES = 64 * 1024
"""An inline op carrying or asking for more bytes than this runs on the pool all the same."""
MAX_BUFFERED = 128 * 1024 * 1024
"""Default bound on the bytes a server holds for in-flight frames, all connections together
(docs/PROTOCOL.md section 7): each admitted request reserves its own frame plus the largest reply
it may get, until that reply is sent. One connection may hold at most half of it."""
MAX_DEPTH = 64
HEADER = struct.Struct(">I")


class WireError(EnclaveError):
    """The wire protocol failed: bad frames, closed connections, timeouts."""


class ProtocolError(WireError):
    """The peer broke the protocol (malformed or oversized frame, bad handshake)."""


class FrameTooLarge(WireError):
    """A message would exceed the peer's frame limit; nothing was sent."""

    errno = errno.EMSGSIZE

    def __init__(self, message: str, size: int, limit: int):
        super().__init__(message)
        self.size = size
        self.limit = limit


class ConnectionClosed(WireError, ConnectionError):
    """The connection is gone; every pending and later call on it fails with this."""


class CallTimeout(WireError, TimeoutError):
    """No reply within the caller's timeout."""


class RemoteError(EnclaveError, OSError):
    """The server answered a request with an error: .errno, .strerror (its message), .name, .op."""

    def __init__(self, code: int, message: str, *, name: str | None = None, op: str | None = None):
        super().__init__(code, message)
        self.name = name or errno.errorcode.get(code, "EIO")
        self.op = op

    def __str__(self):
        return f"{self.op}: {self.strerror} ({self.name})"


# --- memory -------------------------------------------------------------------------------

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_MMAP_THRESHOLD = 16 << 20
KEEP_TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed MiB buffers in the process (docs/PROTOCOL.md section 9).

    By default glibc serves each 1 MiB frame with its own mmap and hands it back to
    the kernel when freed (and trims the heap), so every new frame page-faults its
    memory in again: that costs more than copying the bytes and halves bulk
    throughput. Raising M_MMAP_THRESHOLD to 16 MiB keeps frames on the heap, and
    M_TRIM_THRESHOLD to 256 MiB keeps the freed heap for the next frame. The same
    as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=16777216:glibc.malloc.trim_threshold=268435456,
    for processes whose environment we do not choose (the enclave server). Called at
    start-up by the enclave server and the FUSE mount process. False where it is not
    glibc (nothing changes then)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))


# --- frames ---------------------------------------------------------------------------------


def _refuse(encoder, value):
    raise TypeError(
        f"{type(value).__name__} cannot go on the wire: send plain data "
        "(maps, lists, str, bytes, int, float, bool, None)"
    )


def _encode_memoryview(encoder, value):
    # Left to cbor2, a memoryview becomes an array of ints.
    encoder.encode_bytes(value.tobytes())


# Types cbor2 would otherwise send as CBOR tags, which the decoder refuses: failing
# here keeps a handler's mistake to its own request instead of killing the connection.
_ENCODERS = {
    t: _refuse
    for t in (
        datetime.datetime,
        datetime.date,
        decimal.Decimal,
        fractions.Fraction,
        uuid.UUID,
        re.Pattern,
        set,
        frozenset,
        complex,
        ipaddress.IPv4Address,
        ipaddress.IPv6Address,
        ipaddress.IPv4Network,
        ipaddress.IPv6Network,
        ipaddress.IPv4Interface,
        ipaddress.IPv6Interface,
    )
}
_ENCODERS[memoryview] = _encode_memoryview
if IMPORT_ERROR is None:  # cbor2's own tag type; without cbor2 nothing is encoded at all
    _ENCODERS[cbor2.CBORTag] = _refuse


def _refuse_tag(decoder, *_args):
    raise cbor2.CBORDecodeError("CBOR tags are not allowed on this wire")


class _NoTags(dict):
    """Every semantic tag maps to a refusal, except bignums (2, 3), left to cbor2.

    A dict (empty, answering through __missing__), not a Mapping: cbor2 checks a Mapping
    argument with an isinstance that costs more than decoding a small frame."""

    def __missing__(self, tag):
        if tag in (2, 3):
            raise KeyError(tag)
        return _refuse_tag


_NO_TAGS = _NoTags()
_PLAIN = frozenset((str, bytes, int, float, bool, type(None)))


def _plain(value, depth: int = 0) -> bool:
    """Whether value holds nothing but dicts, lists, tuples and the exact types in _PLAIN.

    Such a message encodes to the same bytes with or without _ENCODERS (none of their types
    is in it), and cbor2 encodes several times faster without them: it looks every value up
    in an encoders mapping, and each miss raises and catches a KeyError."""
    kind = type(value)
    if kind is dict:
        if depth >= MAX_DEPTH:
            return False
        for key, item in value.items():
            if type(key) not in _PLAIN or (type(item) not in _PLAIN and not _plain(item, depth + 1)):
                return False
        return True
    if kind is list or kind is tuple:
        if depth >= MAX_DEPTH:
            return False
        for item in value:  # noqa: SIM110 (a loop: all() over a generator costs twice as much per item)
            if type(item) not in _PLAIN and not _plain(item, depth + 1):
                return False
        return True
    return kind in _PLAIN


def encode(msg: Mapping) -> bytes:
    """The CBOR body of a frame. Raises WireError if msg holds something other than plain data."""
    try:
        if _plain(msg):
            return cbor2.dumps(msg)
        return cbor2.dumps(msg, encoders=_ENCODERS)
    except (TypeError, ValueError, cbor2.CBOREncodeError) as e:
        raise WireError(f"cannot encode a message: {e}") from e


def _cbor_decoder(fp, read_size: int, string_keys: bool):
    return cbor2.CBORDecoder(
        fp,
        read_size=read_size,
        semantic_decoders=_NO_TAGS,
        max_depth=MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=string_keys,
    )


def _decoded(decoder, fp: io.BytesIO, length: int) -> dict:
    try:
        msg = decoder.decode()
    except Exception as e:  # hostile bytes may trip any error inside cbor2: all mean a bad frame
        raise ProtocolError(f"malformed CBOR in a frame of {length} bytes: {e}") from None
    if fp.tell() != length:
        raise ProtocolError(f"{length - fp.tell()} stray bytes after the CBOR map in a frame")
    if not isinstance(msg, dict):
        raise ProtocolError(f"a frame must hold a CBOR map, not {type(msg).__name__}")
    return msg


def decode(body: bytes, *, string_keys: bool = False) -> dict:
    """The message in a frame body; ProtocolError for anything but exactly one CBOR map.

    string_keys: refuse map keys other than text/byte strings (whose hashes are
    randomised), so a hostile peer cannot flood a dict with colliding int keys."""
    fp = io.BytesIO(body)
    # One read of the whole body: cbor2's default small reads are several times slower on MiB frames.
    return _decoded(_cbor_decoder(fp, max(len(body), 1), string_keys), fp, len(body))


READ_BUFFER = 64 * 1024
"""A frame reader's buffer: a frame that fits comes in with its header, in one system call."""


class _FrameReader:
    """Reads frames off one socket for one reader at a time (not thread-safe).

    A small frame usually arrives whole with one recv into a fixed buffer, header and body, and
    is decoded by one cbor2 decoder kept for the purpose (building one costs more than decoding
    a small map). A frame larger than the buffer is read as recv_frame does, its body in one
    recv of its exact size; after such a frame the next header is read alone, so a stream of
    MiB frames never copies a body it has begun into the buffer."""

    def __init__(self, sock: socket.socket, max_frame: int, *, string_keys: bool = False):
        self.sock = sock
        self.max_frame = max_frame
        self.string_keys = string_keys
        self._buffer = bytearray(READ_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = 0  # buffered bytes not consumed yet: _buffer[_start:_end]
        self._end = 0
        self._bulk = False  # the last frame was larger than the buffer
        self._decoder = None

    def has_frame(self) -> bool:
        """Whether a whole frame is already buffered (the socket may have nothing more to say)."""
        have = self._end - self._start
        return have >= HEADER.size and have >= HEADER.size + HEADER.unpack_from(self._buffer, self._start)[0]

    def _fill(self, want: int, most: int) -> int:
        """Buffer at least `want` bytes, holding at most `most`; the bytes buffered (fewer: the stream ended)."""
        if self._start and self._start + most > len(self._buffer):
            have = self._end - self._start
            self._buffer[:have] = self._view[self._start : self._end]
            self._start, self._end = 0, have
        limit = self._start + most
        while self._end - self._start < want:
            n = self.sock.recv_into(self._view[self._end : limit])
            if not n:
                break
            self._end += n
        return self._end - self._start

    def length(self) -> int | None:
        """The next frame's length, checked against max_frame; None if the peer closed between frames."""
        if self._end - self._start < HEADER.size:
            # After a large frame, the header alone: its body is read whole into its own bytes (no copy).
            have = self._fill(HEADER.size, HEADER.size if self._bulk else len(self._buffer))
            if have < HEADER.size:
                if have:
                    raise ProtocolError("the connection closed inside a frame header")
                return None
        (length,) = HEADER.unpack_from(self._buffer, self._start)
        if length > self.max_frame:
            raise ProtocolError(
                f"a frame claims {length} bytes, over the limit of {self.max_frame}: the peer is broken "
                f"or does not speak {PROTOCOL}"
            )
        self._start += HEADER.size
        return length

    def body(self, length: int) -> bytes:
        """The body of the frame whose length() was just read."""
        have = self._end - self._start
        self._bulk = length > len(self._buffer)
        if self._bulk:
            prefix = bytes(self._view[self._start : self._end])
            self._start = self._end = 0
            rest = _recv_exact(self.sock, length - have)
            if len(rest) < length - have:
                raise ProtocolError(f"the connection closed inside a frame ({have + len(rest)} of {length} bytes)")
            return prefix + rest if prefix else rest
        if have < length:
            have = self._fill(length, len(self._buffer))
            if have < length:
                raise ProtocolError(f"the connection closed inside a frame ({have} of {length} bytes)")
        body = bytes(self._view[self._start : self._start + length])
        self._start += length
        if self._start == self._end:
            self._start = self._end = 0
        return body

    def decode(self, body: bytes) -> dict:
        if len(body) > len(self._buffer):
            return decode(body, string_keys=self.string_keys)
        fp = io.BytesIO(body)
        if self._decoder is None:
            self._decoder = _cbor_decoder(fp, len(self._buffer), self.string_keys)
        else:
            self._decoder.fp = fp
        try:
            return _decoded(self._decoder, fp, len(body))
        except ProtocolError:
            self._decoder = None  # its state after a failure is cbor2's business: start afresh
            raise

    def frame(self) -> dict | None:
        """The next message, or None if the peer closed the connection between frames."""
        length = self.length()
        if length is None:
            return None
        return self.decode(self.body(length))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    # MSG_WAITALL fills one bytes object in one call on a blocking socket: no join, no extra copy.
    data = sock.recv(n, socket.MSG_WAITALL)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        chunk = sock.recv(n - got, socket.MSG_WAITALL)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _recv_length(sock: socket.socket, max_frame: int) -> int | None:
    """The next frame's length, checked against max_frame; None if the peer closed between frames."""
    header = _recv_exact(sock, HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise ProtocolError("the connection closed inside a frame header")
    (length,) = HEADER.unpack(header)
    if length > max_frame:
        raise ProtocolError(
            f"a frame claims {length} bytes, over the limit of {max_frame}: the peer is broken "
            f"or does not speak {PROTOCOL}"
        )
    return length


def _recv_body(sock: socket.socket, length: int) -> bytes:
    body = _recv_exact(sock, length)
    if len(body) < length:
        raise ProtocolError(f"the connection closed inside a frame ({len(body)} of {length} bytes)")
    return body


def recv_frame(sock: socket.socket, max_frame: int = MAX_FRAME, *, string_keys: bool = False) -> dict | None:
    """The next message, or None if the peer closed the connection between frames.

    The claimed length is checked against max_frame before anything is allocated. Reads
    exactly one frame (nothing past it), for handshakes and simple peers; the server and
    Connection read through a _FrameReader."""
    length = _recv_length(sock, max_frame)
    if length is None:
        return None
    return decode(_recv_body(sock, length), string_keys=string_keys)


def _send_body(sock: socket.socket, body: bytes) -> None:
    header = HEADER.pack(len(body))
    # Header and body in one system call, without concatenating them.
    sent = sock.sendmsg([header, body])
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    if sent - len(header) < len(body):
        sock.sendall(memoryview(body)[sent - len(header) :])


def send_frame(sock: socket.socket, msg: Mapping, max_frame: int = MAX_FRAME) -> None:
    """Encode and send one message. Not thread-safe: Server and Connection serialise their writers."""
    body = encode(msg)
    if len(body) > max_frame:
        raise FrameTooLarge(
            f"a message of {len(body)} bytes exceeds the peer's frame limit of {max_frame}", len(body), max_frame
        )
    _send_body(sock, body)


class _Channel:
    """A socket shared by one reader thread and any number of writer threads.

    Writers hold a lock for a whole frame. Shutting down wakes everyone blocked on
    the socket; the descriptor is closed only under the write lock, so no writer
    can ever write to a recycled descriptor number."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer
        self.peer_max_frame = MIN_FRAME  # until the handshake says more
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._down = False
        self._closed = False

    def send(self, msg: Mapping) -> None:
        """Raises WireError (FrameTooLarge, unencodable) with nothing sent, or ConnectionClosed."""
        body = encode(msg)
        if len(body) > self.peer_max_frame:
            raise FrameTooLarge(
                f"a message of {len(body)} bytes exceeds {self.peer}'s frame limit of {self.peer_max_frame}: "
                "send less data per call",
                len(body),
                self.peer_max_frame,
            )
        with self._send_lock:
            if self._down:
                raise ConnectionClosed(f"the connection to {self.peer} is closed")
            try:
                _send_body(self.sock, body)
            except OSError as e:
                failure = e
            else:
                return
        # A frame may be half written: the stream cannot be trusted any more.
        self.shutdown()
        raise ConnectionClosed(f"sending to {self.peer} failed: {failure.strerror or failure}") from failure

    @property
    def down(self) -> bool:
        return self._down

    def shutdown(self) -> None:
        with self._state_lock:
            if self._down:
                return
            self._down = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.shutdown()
        with self._state_lock, self._send_lock:
            if not self._closed:
                self._closed = True
                self.sock.close()


def _consume(buffers: list, sent: int) -> None:
    """Drop the first `sent` bytes from a list of buffers (a sendmsg that took only part of them)."""
    while sent and buffers:
        if sent >= len(buffers[0]):
            sent -= len(buffers.pop(0))
        else:
            buffers[0] = memoryview(buffers[0])[sent:]
            sent = 0


def _check_limit(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_FRAME <= value <= 0xFFFFFFFF:
        raise ProtocolError(f"{what} must be an integer from {MIN_FRAME} to {0xFFFFFFFF}, not {value!r}")
    return value


# --- errors on the wire ---------------------------------------------------------------------

_ERRNO_OF_CLASS = {
    FileNotFoundError: errno.ENOENT,
    FileExistsError: errno.EEXIST,
    PermissionError: errno.EACCES,
    IsADirectoryError: errno.EISDIR,
    NotADirectoryError: errno.ENOTDIR,
    TimeoutError: errno.ETIMEDOUT,
    InterruptedError: errno.EINTR,
    BlockingIOError: errno.EAGAIN,
    ProcessLookupError: errno.ESRCH,
    ChildProcessError: errno.ECHILD,
    BrokenPipeError: errno.EPIPE,
    ConnectionRefusedError: errno.ECONNREFUSED,
    ConnectionResetError: errno.ECONNRESET,
    ConnectionAbortedError: errno.ECONNABORTED,
}


def _error_payload(code: int, message: str) -> dict:
    return {"errno": code, "name": errno.errorcode.get(code, "EIO"), "message": message}


def error_for(exc: BaseException, op: str) -> dict:
    """The wire error for an exception raised by a handler."""
    by_class = next((c for t, c in _ERRNO_OF_CLASS.items() if isinstance(exc, t)), errno.EIO)
    if isinstance(exc, EnclaveError):
        return _error_payload(getattr(exc, "errno", None) or by_class, str(exc))
    if isinstance(exc, OSError):
        code = exc.errno or by_class
        # strerror, not str(exc): the filename part may name paths inside the enclave.
        return _error_payload(code, exc.strerror or str(exc) or errno.errorcode.get(code, "error"))
    log.error("%s failed with an unexpected error", op, exc_info=exc)
    return _internal_error(op)


def _internal_error(op: str) -> dict:
    # Never the exception itself: its text or traceback could carry enclave secrets to the host.
    return _error_payload(errno.EIO, f"internal error in {op}: see the enclave server log")


def _remote_error(payload, op: str) -> RemoteError:
    if not isinstance(payload, dict):
        return RemoteError(errno.EIO, f"the server sent an unreadable error: {payload!r}", op=op)
    name = payload.get("name")
    name = name if isinstance(name, str) else None
    code = payload.get("errno")
    # Prefer the name: errno numbers differ between operating systems.
    local = getattr(errno, name, None) if name and name.startswith("E") else None
    if not isinstance(local, int) or isinstance(local, bool):
        local = code if isinstance(code, int) and not isinstance(code, bool) else errno.EIO
    message = payload.get("message")
    return RemoteError(local, message if isinstance(message, str) else "error", name=name, op=op)


# --- server ---------------------------------------------------------------------------------


_CANCEL_LOCK = threading.Lock()  # orders set() against the building of a waiter's Event, for every request


class _Cancelled:
    """A request's cancellation flag with threading.Event's is_set, set and wait. Its Event is built only
    once someone waits: building one (a Condition) costs more than decoding a small request, and most
    requests are never waited on."""

    __slots__ = ("_event", "_flag")

    def __init__(self):
        self._flag = False
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with _CANCEL_LOCK:
            self._flag = True
            event = self._event
        if event is not None:
            event.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        with _CANCEL_LOCK:
            if self._event is None:
                self._event = threading.Event()
                if self._flag:
                    self._event.set()
            event = self._event
        return event.wait(timeout)


@dataclass
class RequestContext:
    """What a handler gets besides its args."""

    id: int
    op: str
    peer: str
    cancelled: threading.Event | _Cancelled  # set when the client cancels or disconnects
    _emit: Callable[[Any], None] = field(repr=False)

    def emit(self, event: Any) -> None:
        """Stream an event to the client, ahead of the reply. Raises ConnectionClosed once the client is gone."""
        self._emit(event)

    def check_cancelled(self) -> None:
        """Raise OSError(ECANCELED) if the client cancelled this request or went away."""
        if self.cancelled.is_set():
            raise OSError(errno.ECANCELED, f"{self.op} was cancelled by the client")


Handler = Callable[[dict, RequestContext], Any]


def _bulk(args: dict) -> bool:
    """Whether a request moves more than INLINE_MAX_BYTES (data it carries, or a "size" it asks for).

    Bulk requests go to the pool even when their op is inline: the reader then reads the next
    MiB while a worker copies this one, which streams faster than one thread doing both."""
    size = args.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size > INLINE_MAX_BYTES:
        return True
    for value in args.values():  # noqa: SIM110 (a loop: any() over a generator costs twice as much, per request)
        if isinstance(value, bytes) and len(value) > INLINE_MAX_BYTES:
            return True
    return False


def _describe_peer(sock: socket.socket, address) -> str:
    if sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return f"unix peer pid={pid} uid={uid} gid={gid}"
        return "unix peer"
    if isinstance(address, tuple) and len(address) == 2:
        return f"vsock peer cid={address[0]} port={address[1]}"
    return repr(address)


class _Budget:
    """The bytes of in-flight frames a server holds: at most `total` for all connections together,
    at most `per_connection` for any one, so a client that stops reading stalls only itself."""

    def __init__(self, total: int, per_connection: int):
        self.total = total
        self.per_connection = per_connection
        self.used = 0
        # The plain lock under the condition: taken directly on the paths every request runs.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0

    def acquire(self, conn: _ServerConnection, n: int) -> bool:
        """Wait until n bytes fit; False if the connection went down meanwhile."""
        with self._lock:
            while self.used + n > self.total or conn.held + n > self.per_connection:
                if conn.channel.down:
                    return False
                self._waiting += 1
                try:
                    self._cond.wait(1.0)  # woken by release() and wake(); the timeout only guards against a lost wake
                finally:
                    self._waiting -= 1
            if conn.channel.down:
                return False
            self.used += n
            conn.held += n
            return True

    def release(self, conn: _ServerConnection, n: int) -> None:
        if n:
            with self._lock:
                self.used -= n
                conn.held -= n
                if self._waiting:
                    self._cond.notify_all()

    def wake(self) -> None:
        with self._lock:
            self._cond.notify_all()


class _Pool:
    """Runs calls on up to `workers` threads, started as needed: ThreadPoolExecutor without the Future it
    builds per call (whose Condition alone costs more than a small request), as nothing here waits on one.
    The calls catch their own errors; one that escapes is logged."""

    def __init__(self, workers: int, name: str):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = workers
        self._name = name
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # workers waiting for work that no submitted call has claimed yet

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        """Queue fn(*args, **kwargs); RuntimeError if no worker runs and none can start (it stays queued)."""
        self._work.put((fn, args, kwargs))
        with self._lock:
            if self._idle:
                self._idle -= 1  # a waiting worker takes it
                return
            if len(self._threads) >= self._workers:
                return  # the next worker to finish takes it
            thread = threading.Thread(target=self._run, name=f"{self._name}_{len(self._threads)}", daemon=True)
            thread.start()  # RuntimeError when it cannot: the call waits for the running workers
            self._threads.append(thread)

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            fn, args, kwargs = item
            try:
                fn(*args, **kwargs)
            except BaseException:  # a worker outlives whatever one call does
                log.exception("a call on %s failed", self._name)
            del item, fn, args, kwargs  # hold nothing of a finished call while waiting for the next
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        """Run what is queued, then stop the workers."""
        with self._lock:
            threads, self._workers = list(self._threads), 0
        for _i in range(len(threads)):
            self._work.put(None)
        for thread in threads:
            thread.join()


class Server:
    """Serves handlers on a listening socket: a thread per connection reads frames,
    a bounded pool of workers runs handlers, so one slow request holds up neither its
    connection nor the others.

    Handlers are called as handler(args, ctx) and return plain data, or raise:
    OSError -> its errno; EnclaveError -> its .errno attribute or EIO, with str(e);
    anything else -> EIO "internal error", logged here with its traceback.

    inline: ops short enough to run on the connection's reader thread itself (file
    metadata, small reads and writes): a round trip then skips two thread hand-offs.
    Their connection reads nothing else while one runs, so an op that may block
    (a job, a hash of a whole tree) belongs on the pool. A request of an inline op
    that moves more than INLINE_MAX_BYTES (a 1 MiB write or read) runs on the pool too.

    max_buffered: bytes of in-flight frames held for all connections together (each
    request reserves its frame and the largest reply it may get until that reply is
    sent); one connection holds at most half. A worker never waits for a client to
    read: a reply the socket cannot take now waits in the connection's outbox, sent by
    that connection's writer thread, so a client that stops reading stalls only itself."""

    def __init__(
        self,
        listener: socket.socket,
        handlers: Mapping[str, Handler],
        *,
        max_frame: int = MAX_FRAME,
        workers: int = 8,
        name: str = "enclave-server",
        max_inflight: int = 32,
        max_buffered: int = MAX_BUFFERED,
        handshake_timeout: float = 10.0,
        send_timeout: float = 60.0,
        inline: Iterable[str] = (),
    ):
        try:
            self.max_frame = _check_limit(max_frame, "max_frame")
        except ProtocolError as e:
            raise ValueError(str(e)) from None
        # A connection must fit its largest request and reply: a frame each way.
        smallest = 4 * self.request_reservation(self.max_frame, self.max_frame)
        if not isinstance(max_buffered, int) or max_buffered < smallest:
            raise ValueError(
                f"max_buffered must be at least {smallest} bytes (four times a request of max_frame {self.max_frame} "
                f"and its reply), not {max_buffered!r}: raise it or lower max_frame"
            )
        self.name = name
        self.max_inflight = max_inflight
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.budget = _Budget(max_buffered, max_buffered // 2)
        self._listener = listener
        self._handlers = dict(handlers)
        if not all(isinstance(op, str) for op in self._handlers):
            raise TypeError("handler names (ops) must be strings")
        # Short ops run on the connection's reader thread: no hand-off to a worker and back.
        self._inline = frozenset(inline)
        self._pool = _Pool(workers, f"{name}-worker")
        self._lock = threading.Lock()
        self._connections: dict[_ServerConnection, threading.Thread] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._serving = threading.Lock()
        self._closed = False

    @staticmethod
    def request_reservation(length: int, reply_limit: int) -> int:
        """What a request of `length` bytes holds from the budget: its frame and the largest reply it may get."""
        return HEADER.size + length + HEADER.size + reply_limit

    def serve_forever(self) -> None:
        """Accept and serve connections until shutdown() is called from another thread."""
        with self._serving, selectors.DefaultSelector() as selector:
            if self._stopping.is_set():
                return
            self._listener.setblocking(False)
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _events in selector.select():
                    if key.fileobj is self._listener:
                        self._accept()

    def _accept(self):
        try:
            sock, address = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as e:
            log.error("%s cannot accept a connection: %s", self.name, e)
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._stopping.wait(0.1)  # out of resources: back off instead of spinning
            return
        conn = _ServerConnection(self, sock, _describe_peer(sock, address))
        thread = threading.Thread(target=conn.run, name=f"{self.name}-conn", daemon=True)
        with self._lock:
            self._connections[conn] = thread
        try:
            thread.start()
        except RuntimeError as e:  # out of threads (or memory for a stack): refuse this one, serve the others
            log.error("%s refuses the connection from %s: cannot start its thread (%s)", self.name, conn.peer, e)
            self._forget(conn)
            conn.channel.close()

    def _forget(self, conn):
        with self._lock:
            self._connections.pop(conn, None)

    def shutdown(self) -> None:
        """Stop accepting, close every connection (their requests see ctx.cancelled), wait for the handlers."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        with self._serving:  # wait for serve_forever to leave its loop
            if self._closed:
                return
            self._closed = True
        self._listener.close()
        with self._lock:
            connections = list(self._connections.items())
        for conn, _thread in connections:
            conn.close_down()
        for _conn, thread in connections:
            thread.join()
        self._pool.shutdown()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


class _ServerConnection:
    def __init__(self, server: Server, sock: socket.socket, peer: str):
        self.server = server
        self.channel = _Channel(sock, peer)
        self.peer = peer
        self.inflight: dict[int, _Cancelled] = {}  # the requests running, at most server.max_inflight
        self.lock = threading.Lock()
        self.slot_free = threading.Condition(self.lock)  # the reader waits on it while max_inflight run
        self.slot_wanted = False
        self.held = 0  # bytes reserved from server.budget (changed under the budget's lock)
        # Frames waiting to be sent, each [buffers not yet sent, bytes reserved, sent]; the first may be half sent.
        # Guarded by outbox_lock (outbox_ready's lock); the socket itself by the channel's send lock.
        self.outbox: deque[list] = deque()
        self.outbox_lock = threading.Lock()
        self.outbox_ready = threading.Condition(self.outbox_lock)

    def close_down(self) -> None:
        """Shut the socket: the reader, the writer and any budget wait end; in-flight requests see cancelled."""
        self.channel.shutdown()
        self.server.budget.wake()
        with self.outbox_lock:
            self.outbox_ready.notify_all()

    def run(self):
        writer = threading.Thread(target=self.write_loop, name=f"{self.server.name}-writer", daemon=True)
        try:
            writer.start()
        except RuntimeError as e:  # out of threads: refuse this connection, serve the others
            log.error("refusing the connection from %s: cannot start its writer thread (%s)", self.peer, e)
            self.channel.close()
            self.server._forget(self)
            return
        try:
            if self.handshake():
                self.read_loop()
            log.debug("%s disconnected", self.peer)
        except ProtocolError as e:
            log.warning("closing the connection from %s: %s", self.peer, e)
        except TimeoutError:
            log.warning(
                "closing the connection from %s: no hello within %s s", self.peer, self.server.handshake_timeout
            )
        except (OSError, WireError) as e:
            log.info("the connection from %s failed: %s", self.peer, e)
        except Exception:
            log.exception("closing the connection from %s after an internal error", self.peer)
        finally:
            with self.lock:
                for cancelled in self.inflight.values():
                    cancelled.set()
            self.close_down()
            writer.join()
            self._drop_outbox()
            self.channel.close()
            self.server._forget(self)

    def read_loop(self):
        """Read requests; each waits for its share of the budget before its body is read (beyond what
        the reader's fixed buffer already holds)."""
        reader = _FrameReader(self.channel.sock, self.server.max_frame, string_keys=True)
        budget = self.server.budget
        while True:
            length = reader.length()
            if length is None:
                return
            reserved = Server.request_reservation(length, self.channel.peer_max_frame)
            if not budget.acquire(self, reserved):
                return  # closed while waiting
            try:
                msg = reader.decode(reader.body(length))
            except BaseException:
                budget.release(self, reserved)
                raise
            self.handle(msg, reserved)

    def handshake(self) -> bool:
        server = self.server
        sock = self.channel.sock
        sock.settimeout(server.handshake_timeout)
        hello = recv_frame(sock, MIN_FRAME, string_keys=True)
        if hello is None:
            return False
        if hello.get("hello") != PROTOCOL:
            raise ProtocolError(f"the first frame is not a {PROTOCOL} hello")
        versions = hello.get("versions")
        if (
            not isinstance(versions, list)
            or not versions
            or any(isinstance(v, bool) or not isinstance(v, int) for v in versions)
        ):
            raise ProtocolError(f"the hello offers no list of protocol versions: {versions!r}")
        # Replies are bounded by both limits: what the client takes, and what the budget reserves for.
        client_max_frame = _check_limit(hello.get("max_frame"), "the client's max_frame")
        self.channel.peer_max_frame = min(client_max_frame, server.max_frame)
        log.debug("%s connected as %r", self.peer, hello.get("client"))
        common = set(versions) & set(VERSIONS)
        if not common:
            message = (
                f"this enclave server speaks protocol versions {list(VERSIONS)}, the client offered {versions}: "
                "use a client and an enclave image from the same release"
            )
            self.channel.send({"hello": PROTOCOL, "error": _error_payload(errno.EPROTONOSUPPORT, message)})
            raise ProtocolError(f"no common protocol version (client offered {versions})")
        self.channel.send(
            {
                "hello": PROTOCOL,
                "version": max(common),
                "max_frame": server.max_frame,
                "server": server.name,
                "ops": sorted(server._handlers),
            }
        )
        sock.settimeout(None)
        # A client that stops reading must not hold its frames for ever: sends give up after send_timeout.
        seconds = int(server.send_timeout)
        micros = int((server.send_timeout - seconds) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros))
        return True

    def handle(self, msg: dict, reserved: int):
        """Route one request, which holds `reserved` bytes of the budget until its reply is sent."""
        try:
            rid = msg.get("id")
            if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= MAX_ID:
                raise ProtocolError(f"a frame without a valid request id (got {rid!r})")
            if "cancel" in msg:
                if msg["cancel"] is not True:
                    raise ProtocolError(f"request {rid}: cancel must be true")
                with self.lock:
                    cancelled = self.inflight.get(rid)
                if cancelled is not None:  # else it already finished: nothing to do
                    cancelled.set()
                self.server.budget.release(self, reserved)
                return
            op = msg.get("op")
            args = msg.get("args", {})
            if not isinstance(op, str):
                raise ProtocolError(f"request {rid} has no op")
            if not isinstance(args, dict):
                raise ProtocolError(f"request {rid} ({op}): args must be a map")
            with self.lock:
                if rid in self.inflight:
                    raise ProtocolError(f"request id {rid} is already in flight")
        except BaseException:
            self.server.budget.release(self, reserved)
            raise
        handler = self.server._handlers.get(op)
        if handler is None:
            # A well-formed request for an op this server lacks (an older image?): the connection stays useful.
            message = f"this enclave server has no operation {op!r}: update the enclave image or the client"
            self.reply({"id": rid, "error": _error_payload(errno.ENOSYS, message)}, op, reserved, block=True)
            return
        cancelled = _Cancelled()
        with self.lock:
            while len(self.inflight) >= self.server.max_inflight:  # back-pressure: stop reading meanwhile
                self.slot_wanted = True
                self.slot_free.wait()
            self.inflight[rid] = cancelled
        if op in self.server._inline and not _bulk(args):
            # A short op: answered from this reader thread, which reads nothing else meanwhile.
            self.run_request(rid, op, handler, args, cancelled, reserved, block=True)
            return
        try:
            self.server._pool.submit(self.run_request, rid, op, handler, args, cancelled, reserved, block=False)
        except RuntimeError as e:
            # The pool could not start another thread; the request is queued all the same, for the
            # workers already running (or the next one that starts).
            log.warning("%s: no new worker thread for %s (%s); it waits for a running worker", self.peer, op, e)

    def run_request(
        self, rid: int, op: str, handler: Handler, args: dict, cancelled: _Cancelled, reserved: int, *, block
    ):
        def emit(event):
            # Events are sent by the handler's own thread: a job streaming to a client that does not
            # read holds its worker, as any job does for its whole run (until send_timeout).
            self.send(self.body({"id": rid, "event": event}), 0, block=True)

        ctx = RequestContext(id=rid, op=op, peer=self.peer, cancelled=cancelled, _emit=emit)
        try:
            ctx.check_cancelled()  # the client left while this waited for a worker
            reply = {"id": rid, "ok": handler(args, ctx)}
        except BaseException as e:  # even SystemExit: the client must get a reply, not wait forever
            reply = {"id": rid, "error": error_for(e, op)}
        finally:
            # Before the reply goes out: the client may reuse the id as soon as it has it.
            with self.lock:
                del self.inflight[rid]
                if self.slot_wanted:
                    self.slot_wanted = False
                    self.slot_free.notify()
        del args
        # The reader sends its own replies (block: its client's pace); a worker never waits for a client.
        self.reply(reply, op, reserved, block=block)

    def reply(self, reply: dict, op: str, reserved: int, *, block: bool):
        rid = reply["id"]
        try:
            try:
                body = self.body(reply)
            except FrameTooLarge as e:
                message = (
                    f"the result of {op} ({e.size} bytes) exceeds this client's frame limit of {e.limit}: "
                    "ask for less data per call"
                )
                body = encode({"id": rid, "error": _error_payload(errno.EMSGSIZE, message)})
            except WireError:
                log.exception("the result of %s cannot be sent", op)
                body = encode({"id": rid, "error": _internal_error(op)})
            del reply
            self.send(body, reserved, block=block)
        except ConnectionClosed:
            log.debug("the reply to %s %d for %s is lost: the connection is closed", op, rid, self.peer)

    def body(self, msg: dict) -> bytes:
        """msg encoded; WireError if it cannot be, FrameTooLarge if it exceeds the client's (or our) frame limit."""
        body = encode(msg)
        if len(body) > self.channel.peer_max_frame:
            raise FrameTooLarge(
                f"a message of {len(body)} bytes exceeds the frame limit of {self.channel.peer_max_frame}",
                len(body),
                self.channel.peer_max_frame,
            )
        return body

    # -- sending: whoever holds the channel's send lock sends the outbox from its head, whole frames in order

    def send(self, body: bytes, reserved: int, *, block: bool) -> None:
        """Queue one frame body and send what the socket takes; `reserved` budget bytes are released once
        it is sent. block=False sends only what fits now and leaves the rest to the writer thread;
        block=True waits until this frame is out (up to send_timeout). Raises ConnectionClosed."""
        entry = [[HEADER.pack(len(body)), body], reserved, False]  # buffers left, reserved, sent
        lock = self.channel._send_lock
        if not self.outbox and lock.acquire(blocking=False):
            try:
                if not self.outbox:  # checked again under the lock: a frame queued meanwhile goes first
                    self._send_now(entry, block)
                    return
            finally:
                lock.release()
        with self.outbox_lock:
            if self.channel.down:
                self.server.budget.release(self, reserved)
                raise ConnectionClosed(f"the connection to {self.peer} is closed")
            self.outbox.append(entry)
        if lock.acquire(blocking=block):
            try:
                self._flush(block=block)
            finally:
                lock.release()
        if not entry[2]:  # not all sent: the writer takes it from here
            if block or self.channel.down:  # a blocking flush leaves a frame only when the connection failed
                raise ConnectionClosed(f"the connection to {self.peer} is closed")
            with self.outbox_lock:
                self.outbox_ready.notify()

    def _send_now(self, entry: list, block: bool) -> None:
        """With the send lock held and the outbox empty (the usual case): write the frame from this thread
        at once, without queueing it; what the socket does not take goes to the head of the outbox, for the
        blocking flush (block=True) or the writer thread. Raises ConnectionClosed."""
        buffers, reserved = entry[0], entry[1]
        try:
            if self.channel.down:
                raise ConnectionClosed(f"the connection to {self.peer} is closed")
            sent = self.channel.sock.sendmsg(buffers, (), 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0  # the socket is full (block=True: SO_SNDTIMEO ran out; the blocking flush below reports it)
        except OSError as e:
            self.server.budget.release(self, reserved)
            if not isinstance(e, ConnectionClosed):
                self._fail(f"sending to {self.peer} failed: {e.strerror or e}")
            raise ConnectionClosed(f"the connection to {self.peer} is closed") from None
        if sent == len(buffers[0]) + len(buffers[1]):
            entry[2] = True
            self.server.budget.release(self, reserved)
            return
        _consume(buffers, sent)
        with self.outbox_lock:
            if self.channel.down:
                self.server.budget.release(self, reserved)
                raise ConnectionClosed(f"the connection to {self.peer} is closed")
            self.outbox.appendleft(entry)  # under the send lock: nothing went out since its first bytes
            if not block:
                self.outbox_ready.notify()
        if block:
            self._flush(block=True)
            if not entry[2]:
                raise ConnectionClosed(f"the connection to {self.peer} is closed")

    def _flush(self, *, block: bool) -> None:
        """With the send lock held: send outbox frames until it is empty, or (block=False) the socket is full."""
        flags = 0 if block else socket.MSG_DONTWAIT
        while True:
            with self.outbox_lock:
                if not self.outbox or self.channel.down:
                    return
                entry = self.outbox[0]
            buffers = entry[0]
            try:
                sent = self.channel.sock.sendmsg(buffers, (), flags)
            except BlockingIOError:
                if block:  # SO_SNDTIMEO ran out: the client has not read for send_timeout
                    self._fail(f"{self.peer} read nothing for {self.server.send_timeout} s")
                return
            except OSError as e:
                self._fail(f"sending to {self.peer} failed: {e.strerror or e}")
                return
            _consume(buffers, sent)
            if not buffers:
                with self.outbox_lock:
                    if not self.outbox or self.outbox[0] is not entry:
                        return  # dropped meanwhile (the connection failed): its bytes were released then
                    self.outbox.popleft()
                    entry[2] = True
                self.server.budget.release(self, entry[1])

    def _fail(self, reason: str) -> None:
        log.info("closing the connection from %s: %s", self.peer, reason)
        self.close_down()
        self._drop_outbox()

    def _drop_outbox(self) -> None:
        with self.outbox_lock:
            dropped, self.outbox = self.outbox, deque()
        for entry in dropped:
            self.server.budget.release(self, entry[1])

    def write_loop(self):
        """Sends what workers could not: blocks on this connection's socket only."""
        lock = self.channel._send_lock
        while True:
            with self.outbox_ready:
                while not self.outbox and not self.channel.down:
                    self.outbox_ready.wait()
                if self.channel.down:
                    return
            with lock:
                self._flush(block=True)


# --- client ---------------------------------------------------------------------------------

_EVENT, _OK, _ERROR = "event", "ok", "error"


class Call:
    """One request in flight: its id, and its outcome when it comes."""

    def __init__(self, connection: Connection, rid: int, op: str, on_event: Callable[[Any], None] | None):
        self.id = rid
        self.op = op
        self._connection = connection
        self._on_event = on_event
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._outcome: tuple[str, Any] | None = None

    def done(self) -> bool:
        return self._outcome is not None

    def cancel(self) -> None:
        """Ask the server to cancel; the final reply still comes (wait for it with result())."""
        if self._outcome is None:
            self._connection.cancel(self.id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the reply, passing events to on_event in this thread as they arrive.

        Ctrl-C (KeyboardInterrupt) sends a cancel, then propagates; call result() again
        to wait for what the server makes of the cancellation."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._outcome is None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                kind, value = self._connection._next(self, remaining)
            except queue.Empty:
                raise CallTimeout(
                    f"{self.op} got no reply within {timeout} s: the enclave may be busy; retry with a longer timeout"
                ) from None
            except KeyboardInterrupt:
                self.cancel()
                raise
            if kind is _EVENT:
                if self._on_event is not None:
                    self._on_event(value)
            else:
                self._outcome = (kind, value)
        kind, value = self._outcome
        if kind is _ERROR:
            raise value
        return value


class Connection:
    """A client connection to an enclave server. Thread-safe: any number of threads
    may call at once; a background thread routes replies to their callers by id."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float | None = 10,
        name: str = "enclave-client",
        max_frame: int = MAX_FRAME,
        peer: str = "the enclave server",
    ):
        """Handshake over a connected socket, which the Connection owns from now on."""
        self._channel = _Channel(sock, peer)
        self._max_frame = max_frame
        self._ids = itertools.count(1)  # never reused, so a late reply cannot reach a newer call
        self._lock = threading.Lock()
        self._pending: dict[int, Call] = {}
        self._closed_reason: str | None = None
        self._closing = False
        # Whoever holds it reads the socket: a waiting caller (its own reply, without a hand-off)
        # or the background reader (replies nobody is reading for: other calls' replies, a close).
        self._read_lock = threading.Lock()
        # Set while the background reader is needed: calls are waiting and no caller reads for them.
        self._watch = threading.Event()
        try:
            self._handshake(timeout, name)
        except BaseException:
            self._channel.close()
            raise
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-reader", daemon=True)
        self._reader.start()

    @classmethod
    def open(cls, endpoint: Endpoint | str, *, timeout: float | None = 10, **kwargs) -> Connection:
        """Connect to an endpoint and handshake."""
        if isinstance(endpoint, str):
            endpoint = Endpoint.parse(endpoint)
        return cls(endpoint.connect(timeout), timeout=timeout, peer=f"the enclave server at {endpoint}", **kwargs)

    def _handshake(self, timeout, name):
        peer = self._channel.peer
        sock = self._channel.sock
        sock.settimeout(timeout)
        hello = {"hello": PROTOCOL, "versions": list(VERSIONS), "max_frame": self._max_frame, "client": name}
        try:
            send_frame(sock, hello, MIN_FRAME)
            reply = recv_frame(sock, self._max_frame)
        except TimeoutError:
            raise CallTimeout(
                f"{peer} did not answer the handshake within {timeout} s: is it the enclave server?"
            ) from None
        except OSError as e:
            raise ConnectionClosed(f"the handshake with {peer} failed: {e.strerror or e}") from e
        if reply is None:
            raise ConnectionClosed(f"{peer} closed the connection during the handshake: see the enclave server log")
        if reply.get("hello") != PROTOCOL:
            raise ProtocolError(f"{peer} does not speak {PROTOCOL}")
        if "error" in reply:
            raise _remote_error(reply["error"], "handshake")
        if reply.get("version") not in VERSIONS:
            raise ProtocolError(f"{peer} chose protocol version {reply.get('version')!r}, not one of {list(VERSIONS)}")
        self.version: int = reply["version"]
        self.max_frame: int = _check_limit(reply.get("max_frame"), f"{peer}'s max_frame")
        self.server: str = str(reply.get("server", ""))
        ops = reply.get("ops")
        self.ops: tuple[str, ...] = tuple(op for op in ops if isinstance(op, str)) if isinstance(ops, list) else ()
        self._channel.peer_max_frame = self.max_frame
        sock.settimeout(None)
        self._frames = _FrameReader(sock, self._max_frame)  # read only with _read_lock held
        self._poller = select.poll()  # polled only with _read_lock held
        self._poller.register(sock, select.POLLIN)

    def _readable(self, timeout: float | None, poller=None) -> bool:
        """Whether a frame (or the end of the stream) waits on the socket; timeout None waits for ever.

        Without a poller, with _read_lock held: the connection's own poller (and its buffered frames)."""
        if poller is None:
            if self._channel.sock.fileno() < 0:  # closed under us: let the read find out and report it
                return True
            poller = self._poller
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))

    def _read_one(self) -> bool:
        """Read one frame and route it; on the end of the stream or any failure fail every call and return False.

        Only with _read_lock held, and only when the socket is readable (a frame is arriving)."""
        peer = self._channel.peer
        frames = self._frames
        try:
            msg = frames.frame()
            if msg is not None:
                self._dispatch(msg)
                # Frames that came in the same read: routed now, for nothing wakes a poll for them.
                while frames.has_frame():
                    self._dispatch(frames.frame())
                return True
            reason = f"{peer} closed the connection"
        except ConnectionResetError:
            reason = f"{peer} closed the connection abruptly (did it stop or crash?)"
        except ProtocolError as e:
            reason = f"{peer} broke the protocol ({e}); the connection is closed"
        except OSError as e:
            reason = f"the connection to {peer} failed: {e.strerror or e}"
        except Exception:  # a bug here must still fail the callers rather than leave them waiting
            log.exception("the reader of the connection to %s failed", peer)
            reason = f"the connection to {peer} failed: internal error in the client (see its log)"
        except BaseException:  # Ctrl-C inside a frame: the stream cannot be trusted any more
            self._fail_all(f"the connection to {peer} was interrupted inside a frame")
            raise
        self._fail_all(reason)
        return False

    def _fail_all(self, reason: str) -> None:
        if self._closing:
            reason = f"the connection to {self._channel.peer} was closed by this client"
        self._channel.shutdown()
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = reason
            reason = self._closed_reason
            pending, self._pending = self._pending, {}
        for call in pending.values():
            call._queue.put((_ERROR, ConnectionClosed(reason)))
        self._watch.set()  # the background reader ends

    def _read_loop(self):
        """The background reader: reads for the calls that wait while no caller reads for itself.

        Idle while the only caller reads its own reply, so a lone call wakes no other thread."""
        poller = select.poll()  # its own: it polls without _read_lock
        poller.register(self._channel.sock, select.POLLIN)
        while True:
            self._watch.wait()
            if self._closed_reason is not None:
                return
            try:
                self._readable(None, poller)
            except OSError:  # the descriptor is gone (closed): treat as the end
                self._fail_all(f"the connection to {self._channel.peer} failed")
                return
            with self._read_lock:
                # A caller may have read the frame that woke us: never block in recv on an empty socket.
                if self._closed_reason is None and self._readable(0) and not self._read_one():
                    return
                with self._lock:
                    if not self._pending and not self._closing:
                        self._watch.clear()  # the next caller reads for itself

    def _next(self, call: Call, timeout: float | None):
        """The next event or outcome of call: read off the socket by this thread when no one else is
        reading (no hand-off through the background reader), else handed over by whoever reads.
        Raises queue.Empty after timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = call._queue
        while True:
            if not replies.empty():  # only this thread takes from it
                return replies.get_nowait()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise queue.Empty
            if not self._read_lock.acquire(blocking=False):
                # Another thread reads: it routes our reply to us, or leaves the socket to the background reader.
                return replies.get(timeout=remaining)
            try:
                if not replies.empty():
                    continue
                if self._closed_reason is not None:  # nothing more will come: a call already forgotten
                    return (_ERROR, ConnectionClosed(self._closed_reason))
                if self._readable(remaining):
                    self._read_one()
            finally:
                self._read_lock.release()
                with self._lock:
                    if len(self._pending) > (call.id in self._pending):
                        self._watch.set()  # others wait for replies: leave the socket to the background reader

    def _dispatch(self, msg: dict):
        rid = msg.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise ProtocolError(f"a reply without a valid request id (got {rid!r})")
        for kind in (_EVENT, _OK, _ERROR):
            if kind in msg:
                break
        else:
            raise ProtocolError(f"the reply to request {rid} has no ok, error or event")
        with self._lock:
            call = self._pending.get(rid)
            if call is not None and kind is not _EVENT:
                del self._pending[rid]
        if call is None:
            log.debug("dropping a reply to request %d, which nobody waits for any more", rid)
            return
        value = msg[kind]
        call._queue.put((kind, _remote_error(value, call.op) if kind is _ERROR else value))

    def submit(self, op: str, args: Mapping | None = None, *, on_event: Callable[[Any], None] | None = None) -> Call:
        """Send a request and return at once; Call.result() waits for the reply."""
        if not isinstance(op, str):
            raise TypeError(f"op must be a str, not {type(op).__name__}")
        call = Call(self, next(self._ids), op, on_event)
        with self._lock:
            if self._closed_reason is not None:
                raise ConnectionClosed(self._closed_reason)
            self._pending[call.id] = call
            if len(self._pending) > 1:
                # Several calls in flight: someone must read even while their callers send, or a big
                # request and a big reply could each wait for the other to be read.
                self._watch.set()
        try:
            self._channel.send({"id": call.id, "op": op, "args": {} if args is None else args})
        except BaseException:
            self._forget(call)
            raise
        return call

    def call(self, op: str, args: Mapping | None = None, *, timeout: float | None = None) -> Any:
        """Send a request and return its result; RemoteError if the server refused it."""
        return self._wait(self.submit(op, args), timeout)

    def stream(
        self,
        op: str,
        args: Mapping | None = None,
        *,
        on_event: Callable[[Any], None],
        timeout: float | None = None,
    ) -> Any:
        """Like call(), passing each streamed event to on_event (in this thread, in order) before returning."""
        return self._wait(self.submit(op, args, on_event=on_event), timeout)

    def _wait(self, call: Call, timeout):
        try:
            return call.result(timeout)
        except BaseException:
            if not call.done():  # timeout, Ctrl-C or on_event failed: stop the server's work and move on
                call.cancel()
                self._forget(call)
            raise

    def _forget(self, call: Call):
        with self._lock:
            self._pending.pop(call.id, None)

    def cancel(self, request_id: int) -> None:
        """Ask the server to cancel a request in flight (its handler sees ctx.cancelled)."""
        with self._lock:
            if request_id not in self._pending:
                return
        with contextlib.suppress(ConnectionClosed):
            self._channel.send({"id": request_id, "cancel": True})

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    def close(self) -> None:
        """Close the connection; pending calls fail with ConnectionClosed."""
        self._closing = True
        self._channel.shutdown()
        self._watch.set()
        if threading.current_thread() is not self._reader:
            self._reader.join()
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
