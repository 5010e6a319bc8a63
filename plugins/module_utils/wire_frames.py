"""The wire's framing (docs/PROTOCOL.md): a 4-byte big-endian length, then a CBOR body (wire_codec).

Frame limits, the frame reader, one-frame send and receive, the socket shared by one
reader and many writers, and the malloc tuning that keeps bulk frames fast. Both the
server (wire_server) and the client (wire_client) build on it; nothing else frames bytes.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
from collections.abc import Mapping

from .errors import ConnectionClosedError, FrameTooLargeError, ProtocolError
from .wire_codec import _cbor_decoder, _decoded, decode, encode

PROTOCOL = "confidential-ml-nitro"
VERSIONS = (1,)
MAX_FRAME = 4 * 1024 * 1024
"""Default frame limit: a 1 MiB data chunk plus its envelope fits with room to spare."""
MIN_FRAME = 64 * 1024
"""The smallest limit a peer may announce, and the limit on the hello frame."""
HEADER = struct.Struct(">I")


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
    glibc (nothing changes then).

    The process's own symbols (dlopen of NULL) hold libc's: ctypes.util.find_library("c") found the same
    library by running ldconfig, ~10 ms per call. ctypes is imported here, not by every command."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))


# --- frames ---------------------------------------------------------------------------------


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
        raise FrameTooLargeError(
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
        """Raises WireError (FrameTooLargeError, unencodable) with nothing sent, or ConnectionClosedError."""
        body = encode(msg)
        if len(body) > self.peer_max_frame:
            raise FrameTooLargeError(
                f"a message of {len(body)} bytes exceeds {self.peer}'s frame limit of {self.peer_max_frame}: "
                "send less data per call",
                len(body),
                self.peer_max_frame,
            )
        with self._send_lock:
            if self._down:
                raise ConnectionClosedError(f"the connection to {self.peer} is closed")
            try:
                _send_body(self.sock, body)
            except OSError as e:
                failure = e
            else:
                return
        # A frame may be half written: the stream cannot be trusted any more.
        self.shutdown()
        raise ConnectionClosedError(f"sending to {self.peer} failed: {failure.strerror or failure}") from failure

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


def _check_limit(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_FRAME <= value <= 0xFFFFFFFF:
        raise ProtocolError(f"{what} must be an integer from {MIN_FRAME} to {0xFFFFFFFF}, not {value!r}")
    return value
