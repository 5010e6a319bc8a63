"""The wire's server (docs/PROTOCOL.md): connections, a bounded worker pool, a memory budget.

One connection carries many concurrent requests, matched to their replies by id; a
request may stream events before its reply and may be cancelled. Only the enclave
server (and tests, benchmarks) serve: the client (wire_client) does not import this.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import selectors
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConnectionClosedError, EnclaveError, FrameTooLargeError, ProtocolError, WireError
from .wire_codec import encode
from .wire_frames import (
    HEADER,
    MAX_FRAME,
    MIN_FRAME,
    PROTOCOL,
    VERSIONS,
    _Channel,
    _check_limit,
    _FrameReader,
    recv_frame,
)

log = logging.getLogger(__name__)

MAX_ID = 2**63 - 1
INLINE_MAX_BYTES = 64 * 1024
"""An inline op carrying or asking for more bytes than this runs on the pool all the same."""
MAX_BUFFERED = 128 * 1024 * 1024
"""Default bound on the bytes a server holds for in-flight frames, all connections together
(docs/PROTOCOL.md section 7): each admitted request reserves its own frame plus the largest reply
it may get, until that reply is sent. One connection may hold at most half of it."""


def _consume(buffers: list, sent: int) -> None:
    """Drop the first `sent` bytes from a list of buffers (a sendmsg that took only part of them)."""
    while sent and buffers:
        if sent >= len(buffers[0]):
            sent -= len(buffers.pop(0))
        else:
            buffers[0] = memoryview(buffers[0])[sent:]
            sent = 0


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
        """Stream an event to the client, ahead of the reply. Raises ConnectionClosedError once the client is gone."""
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
            except FrameTooLargeError as e:
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
        except ConnectionClosedError:
            log.debug("the reply to %s %d for %s is lost: the connection is closed", op, rid, self.peer)

    def body(self, msg: dict) -> bytes:
        """msg encoded; WireError if it cannot be, FrameTooLargeError if it exceeds the client's (or our) frame
        limit."""
        body = encode(msg)
        if len(body) > self.channel.peer_max_frame:
            raise FrameTooLargeError(
                f"a message of {len(body)} bytes exceeds the frame limit of {self.channel.peer_max_frame}",
                len(body),
                self.channel.peer_max_frame,
            )
        return body

    # -- sending: whoever holds the channel's send lock sends the outbox from its head, whole frames in order

    def send(self, body: bytes, reserved: int, *, block: bool) -> None:
        """Queue one frame body and send what the socket takes; `reserved` budget bytes are released once
        it is sent. block=False sends only what fits now and leaves the rest to the writer thread;
        block=True waits until this frame is out (up to send_timeout). Raises ConnectionClosedError."""
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
                raise ConnectionClosedError(f"the connection to {self.peer} is closed")
            self.outbox.append(entry)
        if lock.acquire(blocking=block):
            try:
                self._flush(block=block)
            finally:
                lock.release()
        if not entry[2]:  # not all sent: the writer takes it from here
            if block or self.channel.down:  # a blocking flush leaves a frame only when the connection failed
                raise ConnectionClosedError(f"the connection to {self.peer} is closed")
            with self.outbox_lock:
                self.outbox_ready.notify()

    def _send_now(self, entry: list, block: bool) -> None:
        """With the send lock held and the outbox empty (the usual case): write the frame from this thread
        at once, without queueing it; what the socket does not take goes to the head of the outbox, for the
        blocking flush (block=True) or the writer thread. Raises ConnectionClosedError."""
        buffers, reserved = entry[0], entry[1]
        try:
            if self.channel.down:
                raise ConnectionClosedError(f"the connection to {self.peer} is closed")
            sent = self.channel.sock.sendmsg(buffers, (), 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0  # the socket is full (block=True: SO_SNDTIMEO ran out; the blocking flush below reports it)
        except OSError as e:
            self.server.budget.release(self, reserved)
            if not isinstance(e, ConnectionClosedError):
                self._fail(f"sending to {self.peer} failed: {e.strerror or e}")
            raise ConnectionClosedError(f"the connection to {self.peer} is closed") from None
        if sent == len(buffers[0]) + len(buffers[1]):
            entry[2] = True
            self.server.budget.release(self, reserved)
            return
        _consume(buffers, sent)
        with self.outbox_lock:
            if self.channel.down:
                self.server.budget.release(self, reserved)
                raise ConnectionClosedError(f"the connection to {self.peer} is closed")
            self.outbox.appendleft(entry)  # under the send lock: nothing went out since its first bytes
            if not block:
                self.outbox_ready.notify()
        if block:
            self._flush(block=True)
            if not entry[2]:
                raise ConnectionClosedError(f"the connection to {self.peer} is closed")

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
