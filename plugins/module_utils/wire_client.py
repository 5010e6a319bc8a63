"""The wire's client connection (docs/PROTOCOL.md): calls in flight, matched to their replies by id.

Thread-safe; the caller that waits reads its own reply when no one else reads. What
modules import to talk to the enclave server: it does not bring in the server (wire_server).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .endpoints import Endpoint
from .errors import CallTimeoutError, ConnectionClosedError, ProtocolError, RemoteError
from .wire_frames import (
    MAX_FRAME,
    MIN_FRAME,
    PROTOCOL,
    VERSIONS,
    _Channel,
    _check_limit,
    _FrameReader,
    recv_frame,
    send_frame,
)

log = logging.getLogger(__name__)


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
                raise CallTimeoutError(
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
            raise CallTimeoutError(
                f"{peer} did not answer the handshake within {timeout} s: is it the enclave server?"
            ) from None
        except OSError as e:
            raise ConnectionClosedError(f"the handshake with {peer} failed: {e.strerror or e}") from e
        if reply is None:
            raise ConnectionClosedError(
                f"{peer} closed the connection during the handshake: see the enclave server log"
            )
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
            call._queue.put((_ERROR, ConnectionClosedError(reason)))
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
                    return (_ERROR, ConnectionClosedError(self._closed_reason))
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
                raise ConnectionClosedError(self._closed_reason)
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
        with contextlib.suppress(ConnectionClosedError):
            self._channel.send({"id": request_id, "cancel": True})

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    def close(self) -> None:
        """Close the connection; pending calls fail with ConnectionClosedError."""
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
