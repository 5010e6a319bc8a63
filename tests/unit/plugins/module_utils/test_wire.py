import contextlib
import datetime
import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.confidential_ml.nitro.plugins.module_utils import wire_codec, wire_frames, wire_server
from ansible_collections.confidential_ml.nitro.plugins.module_utils.endpoints import Endpoint
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import (
    CallTimeoutError,
    ConnectionClosedError,
    EnclaveError,
    FrameTooLargeError,
    PackageError,
    ProtocolError,
    RemoteError,
    WireError,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.wire_client import Connection
from ansible_collections.confidential_ml.nitro.plugins.module_utils.wire_codec import decode, encode
from ansible_collections.confidential_ml.nitro.plugins.module_utils.wire_frames import (
    MAX_FRAME,
    MIN_FRAME,
    PROTOCOL,
    recv_frame,
    send_frame,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.wire_server import Server

WIRE_LOGGER = wire_server.log.name
WAIT = 30  # generous bound on waits that should end at once; never asserted on


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def sockdir():
    # Short paths: sun_path holds 107 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="wire-") as d:
        yield d


class Probe:
    """Lets a test see inside handlers running in the server's workers."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.saw_cancel = threading.Event()
        self.saw_closed = threading.Event()


@pytest.fixture
def probe():
    return Probe()


class Oops(EnclaveError):
    errno = errno.EKEYREJECTED


def make_handlers(probe):
    def echo(args, ctx):
        return args

    def delayed(args, ctx):
        time.sleep(args["delay"])
        return {"token": args["token"], "thread": threading.get_ident()}

    def events(args, ctx):
        for i in range(args["n"]):
            ctx.emit(i)
        return "done"

    def wait_cancel(args, ctx):
        probe.started.set()
        if ctx.cancelled.wait(WAIT):
            probe.saw_cancel.set()
            ctx.check_cancelled()
        return "not cancelled"

    def emit_then_wait(args, ctx):
        ctx.emit("first")
        return wait_cancel(args, ctx)

    def wait_release(args, ctx):
        probe.started.set()
        probe.release.wait(WAIT)
        return "released"

    def release(args, ctx):
        probe.release.set()
        return "releasing"

    def flood(args, ctx):
        chunk = b"x" * (256 * 1024)
        try:
            while True:
                ctx.emit(chunk)
        except ConnectionClosedError:
            probe.saw_closed.set()
            raise

    def fail(args, ctx):
        kind = args["kind"]
        if kind == "enoent":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/enclave/secret/model.h5")
        if kind == "enoent-bare":
            raise FileNotFoundError("no such file in the share: dataset/x.csv")
        if kind == "eacces":
            raise PermissionError(errno.EACCES, "scripts may only write under /output")
        if kind == "enclave":
            raise PackageError("the package is damaged: download it again")
        if kind == "enclave-errno":
            raise Oops("the key was refused: check the key policy")
        if kind == "bug":
            raise ValueError("secret plaintext must not leak")
        if kind == "unencodable":
            return {"when": datetime.datetime.now()}
        if kind == "exit":
            raise SystemExit(3)
        raise AssertionError(kind)

    def big(args, ctx):
        return b"\x01" * args["size"]

    return {
        "echo": echo,
        "delayed": delayed,
        "events": events,
        "wait_cancel": wait_cancel,
        "emit_then_wait": emit_then_wait,
        "wait_release": wait_release,
        "release": release,
        "flood": flood,
        "fail": fail,
        "big": big,
    }


@pytest.fixture
def serve(sockdir, probe):
    """serve(**server_kwargs) -> (endpoint, server), a real server on an AF_UNIX socket."""
    running = []

    def start(handlers=None, **kwargs):
        endpoint = Endpoint.unix(os.path.join(sockdir, f"{len(running)}.sock"))
        server = Server(endpoint.listen(), handlers or make_handlers(probe), **kwargs)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        running.append((server, thread))
        return endpoint, server

    yield start
    probe.release.set()
    for server, thread in running:
        server.shutdown()
        thread.join()


def raw_hello(endpoint, **overrides):
    """A raw socket past the handshake, for sending hand-made frames."""
    sock = endpoint.connect(timeout=WAIT)
    hello = {"hello": PROTOCOL, "versions": [1], "max_frame": MAX_FRAME} | overrides
    send_frame(sock, hello)
    reply = recv_frame(sock)
    assert reply["hello"] == PROTOCOL
    return sock, reply


def run_in_threads(target, count):
    """target(0) .. target(count - 1), each on its own thread, all at once; returns when all have ended."""
    threads = [threading.Thread(target=target, args=(t,)) for t in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def read_until_closed(sock):
    """Read until the server closes the connection; returns what came.

    A reset counts as closed: closing with unread input makes the kernel reset."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


# --- frames ---------------------------------------------------------------------------------


def test_encode_decode_plain_data():
    msg = {"id": 7, "ok": {"data": b"\x00\xff" * 10, "n": -(2**63), "big": 2**80, "f": 1.5, "l": [None, True]}}
    assert decode(encode(msg)) == msg


def test_memoryview_goes_as_bytes():
    assert decode(encode({"data": memoryview(b"abc")[1:]})) == {"data": b"bc"}


@pytest.mark.parametrize("value", [datetime.datetime.now(), {1, 2}, frozenset(), cbor2.CBORTag(99, 1), 1j, object()])
def test_encode_refuses_anything_but_plain_data(value):
    with pytest.raises(WireError, match="cannot encode"):
        encode({"value": value})


@pytest.mark.parametrize(
    "body, words",
    [
        (cbor2.dumps([1, 2]), "must hold a CBOR map, not list"),
        (cbor2.dumps("hello"), "must hold a CBOR map"),
        (b"", "malformed CBOR"),
        (b"\xff", "malformed CBOR"),
        (b"\xa1\x61a", "malformed CBOR"),  # truncated
        (cbor2.dumps({}) + b"\x00", "1 stray bytes"),
        (bytes.fromhex("a16161c11a514b67b0"), "tags are not allowed"),  # {"a": epoch datetime}
        (bytes.fromhex("a16161d81c80"), "tags are not allowed"),  # shared reference
        (bytes.fromhex("a161615f41614162ff"), "malformed CBOR"),  # indefinite-length byte string
        (bytes.fromhex("a2616101616102"), "malformed CBOR"),  # duplicate key
        (b"\xa1\x61a" + b"\x81" * 100 + b"\x00", "malformed CBOR"),  # nested too deep
    ],
)
def test_decode_rejects(body, words):
    with pytest.raises(ProtocolError, match=words):
        decode(body)


def test_decode_string_keys():
    body = cbor2.dumps({1: "a"})
    assert decode(body) == {1: "a"}
    with pytest.raises(ProtocolError, match="map key"):
        decode(body, string_keys=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_decode(data):
    """Fuzz target: random bytes decode to a map or raise ProtocolError, nothing else."""
    with contextlib.suppress(ProtocolError):
        assert isinstance(decode(data), dict)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512), st.booleans())
def test_fuzz_recv_frame(data, well_formed_prefix):
    """Fuzz target: a byte stream on a real socket yields frames, EOF or ProtocolError, nothing else."""
    a, b = socket.socketpair()
    try:
        if well_formed_prefix:
            send_frame(a, {"id": 1, "op": "echo"})
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ProtocolError):
            while (msg := recv_frame(b, max_frame=1024)) is not None:
                assert isinstance(msg, dict)
    finally:
        a.close()
        b.close()


PLAIN_DATA = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda children: st.lists(children) | st.tuples(children, children) | st.dictionaries(st.text(), children),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(PLAIN_DATA)
def test_plain_messages_encode_as_the_refusing_encoders_would(value):
    """encode() skips cbor2's encoders mapping for plain data: the bytes must not change."""
    msg = {"id": 1, "ok": value}
    assert encode(msg) == cbor2.dumps(msg, encoders=wire_codec._encoders())


@pytest.mark.parametrize("value", [[{"a": (1, datetime.date.today())}], {"k": [b"x", {2, 3}]}, {"k": [object()]}])
def test_encode_looks_inside_containers(value):
    with pytest.raises(WireError, match="cannot encode"):
        encode({"v": value})
    assert decode(encode({"v": [{"m": memoryview(b"abc")[1:]}]})) == {"v": [{"m": b"bc"}]}


def _outcomes(read):
    """What read() yields until the end of the stream: messages, then None or the error that ended it."""
    seen = []
    while True:
        try:
            msg = read()
        except ProtocolError as e:
            return [*seen, f"ProtocolError: {e}"]
        seen.append(msg)
        if msg is None:
            return seen


FRAME_BODIES = st.one_of(
    st.binary(max_size=200).map(lambda data: encode({"id": 1, "data": data})),
    st.sampled_from(
        [wire_frames.READ_BUFFER - 40, wire_frames.READ_BUFFER - 4, wire_frames.READ_BUFFER + 1, 200_000]
    ).map(lambda size: encode({"id": 2, "data": b"x" * (size - 16)})[:size]),
    st.binary(max_size=40),  # not CBOR, or not a map
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FRAME_BODIES, max_size=6), st.binary(max_size=16))
def test_frame_reader_reads_what_recv_frame_reads(bodies, tail):
    """The buffered reader the server and Connection use yields the same messages and errors as recv_frame
    on the same stream: small and large frames in any order, junk, a truncated end."""
    stream = b"".join(struct.pack(">I", len(body)) + body for body in bodies) + tail
    results = []
    for reader in ("recv_frame", "frame reader"):
        a, b = socket.socketpair()
        with a, b:

            def write(a=a):
                with contextlib.suppress(OSError):  # the reader stopped at an error and shut its end
                    a.sendall(stream)
                    a.shutdown(socket.SHUT_WR)

            writer = threading.Thread(target=write)
            writer.start()
            if reader == "recv_frame":
                results.append(_outcomes(lambda b=b: recv_frame(b, max_frame=wire_frames.READ_BUFFER * 4)))
            else:
                frames = wire_frames._FrameReader(b, wire_frames.READ_BUFFER * 4)
                results.append(_outcomes(frames.frame))
            b.shutdown(socket.SHUT_RD)  # a writer blocked on a full socket after an error ends too
            writer.join()
    assert results[0] == results[1]


def test_recv_frame_checks_length_before_reading():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack(">I", 0xFFFFFFFF))  # and no body at all: the check cannot wait for one
        with pytest.raises(ProtocolError, match="claims 4294967295 bytes, over the limit of 4194304"):
            recv_frame(b)


def test_send_frame_refuses_oversize_messages():
    a, b = socket.socketpair()
    with a, b, pytest.raises(FrameTooLargeError) as info:
        send_frame(a, {"data": b"x" * MIN_FRAME}, max_frame=MIN_FRAME)
    assert info.value.errno == errno.EMSGSIZE


# --- handshake ------------------------------------------------------------------------------


def test_handshake(serve):
    endpoint, server = serve(name="test-server/1.0", max_frame=2 * MAX_FRAME)
    with Connection.open(str(endpoint)) as conn:
        assert conn.version == 1
        assert conn.max_frame == 2 * MAX_FRAME
        assert conn.server == "test-server/1.0"
        assert "echo" in conn.ops and "events" in conn.ops
        assert conn.call("echo", {"a": 1}) == {"a": 1}


def test_handshake_without_common_version(serve, caplog):
    endpoint, _server = serve()
    with caplog.at_level(logging.WARNING, logger=WIRE_LOGGER):
        sock = endpoint.connect(timeout=WAIT)
        with sock:
            send_frame(sock, {"hello": PROTOCOL, "versions": [7, 8], "max_frame": MAX_FRAME})
            reply = recv_frame(sock)
            assert reply["error"]["name"] == "EPROTONOSUPPORT"
            assert "client offered [7, 8]" in reply["error"]["message"]
            assert read_until_closed(sock) == b""
    assert "no common protocol version" in caplog.text


def fake_server(sockdir, respond):
    """A one-connection server that answers the hello with respond(hello)."""
    endpoint = Endpoint.unix(os.path.join(sockdir, "fake.sock"))
    listener = endpoint.listen()

    def run():
        sock, _address = listener.accept()
        with sock:
            send_frame(sock, respond(recv_frame(sock)))
            read_until_closed(sock)
        listener.close()

    threading.Thread(target=run, daemon=True).start()
    return endpoint


def test_client_reports_version_refusal(sockdir):
    def refuse(hello):
        assert hello["versions"] == [1]
        message = "this enclave server speaks protocol versions [2], the client offered [1]: upgrade"
        return {
            "hello": PROTOCOL,
            "error": {"errno": errno.EPROTONOSUPPORT, "name": "EPROTONOSUPPORT", "message": message},
        }

    with pytest.raises(RemoteError) as info:
        Connection.open(fake_server(sockdir, refuse), timeout=WAIT)
    assert info.value.errno == errno.EPROTONOSUPPORT
    assert "speaks protocol versions [2]" in str(info.value)


def test_client_refuses_a_version_it_did_not_offer(sockdir):
    endpoint = fake_server(sockdir, lambda hello: {"hello": PROTOCOL, "version": 9, "max_frame": MAX_FRAME})
    with pytest.raises(ProtocolError, match="chose protocol version 9"):
        Connection.open(endpoint, timeout=WAIT)


def test_client_refuses_a_stranger(sockdir):
    endpoint = fake_server(sockdir, lambda hello: {"hello": "something-else"})
    with pytest.raises(ProtocolError, match="does not speak confidential-ml-nitro"):
        Connection.open(endpoint, timeout=WAIT)


def test_silent_client_is_dropped_after_the_handshake_timeout(serve, caplog):
    endpoint, _server = serve(handshake_timeout=0.2)
    with caplog.at_level(logging.WARNING, logger=WIRE_LOGGER), endpoint.connect(timeout=WAIT) as sock:
        assert read_until_closed(sock) == b""
    assert "no hello within 0.2 s" in caplog.text


# --- calls ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, 1024 * 1024, 3 * 1024 * 1024])
def test_round_trip(serve, size):
    endpoint, _server = serve()
    data = os.urandom(size)
    with Connection.open(endpoint) as conn:
        result = conn.call("echo", {"data": data, "name": "chunk"}, timeout=WAIT)
        assert result == {"data": data, "name": "chunk"}
        assert isinstance(result["data"], bytes)  # not a bytearray or memoryview


def test_concurrent_calls_on_one_connection(serve):
    endpoint, _server = serve(workers=8, max_inflight=4)  # fewer slots than callers: back-pressure too
    results = {}
    errors = []

    def caller(t):
        try:
            for k in range(t, 50, 8):
                delay = (k * 7 % 10) / 1000
                results[k] = conn.call("delayed", {"delay": delay, "token": k}, timeout=WAIT)["token"]
        except Exception as e:  # reported below, with the thread's own traceback lost otherwise
            errors.append(e)

    with Connection.open(endpoint) as conn:
        run_in_threads(caller, 8)
    assert errors == []
    assert results == {k: k for k in range(50)}


def test_slow_request_does_not_block_a_later_one(serve, probe):
    endpoint, _server = serve()
    with Connection.open(endpoint) as conn:
        slow = conn.submit("wait_release")
        assert probe.started.wait(WAIT)
        # The later request completes first, on the same connection, and lets the first finish.
        assert conn.call("release", timeout=WAIT) == "releasing"
        assert slow.result(WAIT) == "released"
        assert slow.id < conn.submit("echo").id


def test_events_arrive_in_order_before_the_result(serve):
    endpoint, _server = serve()
    seen = []
    with Connection.open(endpoint) as conn:
        result = conn.stream("events", {"n": 200}, on_event=seen.append, timeout=WAIT)
        assert seen == list(range(200))
        assert result == "done"
        # call() on a streaming op drops the events and returns the result.
        assert conn.call("events", {"n": 3}, timeout=WAIT) == "done"


def test_cancel_sets_ctx_cancelled(serve, probe):
    endpoint, _server = serve()
    with Connection.open(endpoint) as conn:
        call = conn.submit("wait_cancel")
        assert probe.started.wait(WAIT)
        conn.cancel(call.id)
        with pytest.raises(RemoteError) as info:
            call.result(WAIT)
        assert info.value.errno == errno.ECANCELED
        assert probe.saw_cancel.is_set()
        assert conn.call("echo", {"still": "works"}, timeout=WAIT) == {"still": "works"}


def test_pool_runs_up_to_its_workers_at_once_and_everything_queued():
    pool = wire_server._Pool(2, "p-worker")
    gate = threading.Event()
    started, done = [], []

    def job(n):
        started.append(n)
        gate.wait(WAIT)
        done.append(n)

    for n in range(5):
        pool.submit(job, n)
    wait_until(lambda: len(started) == 2, "two calls to start")
    assert len(pool._threads) == 2  # no more threads than workers: the other three wait
    gate.set()
    pool.shutdown()  # runs what is queued first
    assert sorted(done) == list(range(5))
    assert all(not thread.is_alive() for thread in pool._threads)


def test_cancelled_flag_wakes_its_waiter_whenever_it_is_set():
    # ctx.cancelled builds its Event only for a waiter: a set before, during or after that must not be lost.
    flag = wire_server._Cancelled()
    assert not flag.is_set()
    assert flag.wait(0.01) is False
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(flag.wait(WAIT)))
    waiter.start()
    wait_until(lambda: flag._event is not None, "the waiter")
    flag.set()
    waiter.join()
    assert woke == [True]
    early = wire_server._Cancelled()
    early.set()
    assert early.is_set() and early.wait(WAIT) is True


def test_failing_event_consumer_cancels_the_request(serve, probe):
    endpoint, _server = serve()

    def on_event(event):
        raise KeyError(f"consumer broke on {event}")

    with Connection.open(endpoint) as conn:
        with pytest.raises(KeyError, match="consumer broke on first"):
            conn.stream("emit_then_wait", on_event=on_event, timeout=WAIT)
        assert probe.saw_cancel.wait(WAIT)
        assert conn.call("echo", {"x": 1}, timeout=WAIT) == {"x": 1}


def test_call_timeout_names_the_op_and_cancels(serve, probe):
    endpoint, _server = serve()
    with Connection.open(endpoint) as conn:
        with pytest.raises(CallTimeoutError, match="wait_cancel got no reply within 0.2 s") as info:
            conn.call("wait_cancel", timeout=0.2)
        assert isinstance(info.value, TimeoutError)
        assert probe.saw_cancel.wait(WAIT)
        assert conn.call("echo", {"after": "timeout"}, timeout=WAIT) == {"after": "timeout"}


def test_client_disconnect_sets_ctx_cancelled(serve, probe):
    endpoint, _server = serve()
    conn = Connection.open(endpoint)
    call = conn.submit("wait_cancel")
    assert probe.started.wait(WAIT)
    conn.close()
    with pytest.raises(ConnectionClosedError, match="closed by this client"):
        call.result(WAIT)
    assert probe.saw_cancel.wait(WAIT)
    with pytest.raises(ConnectionClosedError):
        conn.call("echo")


def test_unknown_op_gets_enosys_and_the_connection_lives(serve):
    endpoint, _server = serve()
    with Connection.open(endpoint) as conn:
        with pytest.raises(RemoteError) as info:
            conn.call("no.such.op", timeout=WAIT)
        assert info.value.errno == errno.ENOSYS
        assert "no operation 'no.such.op'" in str(info.value)
        assert conn.call("echo", {"x": 1}, timeout=WAIT) == {"x": 1}


@pytest.mark.parametrize(
    "kind, code, words",
    [
        ("enoent", errno.ENOENT, "No such file or directory"),
        ("enoent-bare", errno.ENOENT, "no such file in the share: dataset/x.csv"),
        ("eacces", errno.EACCES, "scripts may only write under /output"),
        ("enclave", errno.EIO, "the package is damaged: download it again"),
        ("enclave-errno", errno.EKEYREJECTED, "the key was refused: check the key policy"),
        ("bug", errno.EIO, "internal error in fail: see the enclave server log"),
        ("unencodable", errno.EIO, "internal error in fail: see the enclave server log"),
        ("exit", errno.EIO, "internal error in fail"),
    ],
)
def test_errno_mapping(serve, caplog, kind, code, words):
    endpoint, _server = serve()
    with caplog.at_level(logging.ERROR, logger=WIRE_LOGGER), Connection.open(endpoint) as conn:
        with pytest.raises(RemoteError) as info:
            conn.call("fail", {"kind": kind}, timeout=WAIT)
        error = info.value
        assert isinstance(error, OSError) and isinstance(error, EnclaveError)
        assert error.errno == code
        assert error.name == errno.errorcode[code]
        assert error.op == "fail"
        assert words in str(error)
        assert "/enclave/secret" not in str(error)  # an OSError's filename stays inside
        assert "secret plaintext" not in str(error)
        assert conn.call("echo", {"ok": 1}, timeout=WAIT) == {"ok": 1}
    if kind in ("bug", "unencodable"):
        assert any(record.exc_info for record in caplog.records)  # the traceback is in the server log


def test_request_over_the_server_limit_is_refused_locally(serve):
    endpoint, _server = serve(max_frame=MIN_FRAME)
    with Connection.open(endpoint) as conn:
        with pytest.raises(FrameTooLargeError, match="frame limit of 65536"):
            conn.call("echo", {"data": b"x" * MIN_FRAME})
        assert conn.call("echo", {"data": b"x" * 1000}, timeout=WAIT) == {"data": b"x" * 1000}


def test_result_over_the_client_limit_becomes_emsgsize(serve):
    endpoint, _server = serve()
    with Connection.open(endpoint, max_frame=MIN_FRAME) as conn:
        with pytest.raises(RemoteError) as info:
            conn.call("big", {"size": MIN_FRAME}, timeout=WAIT)
        assert info.value.errno == errno.EMSGSIZE
        assert "ask for less data per call" in str(info.value)
        assert conn.call("big", {"size": 10}, timeout=WAIT) == b"\x01" * 10


# --- broken peers ---------------------------------------------------------------------------


def _frame(body):
    return struct.pack(">I", len(body)) + body


BAD_INPUTS = {
    "4 GiB claim": (True, struct.pack(">I", 0xFFFFFFFF), "claims 4294967295 bytes"),
    "garbage before hello": (False, b"GET / HTTP/1.1\r\nHost: enclave\r\n\r\n", "claims 1195725856 bytes"),
    "not a hello": (False, _frame(cbor2.dumps({"id": 1, "op": "echo"})), "not a confidential-ml-nitro hello"),
    "non-map frame": (True, _frame(cbor2.dumps([1, 2, 3])), "must hold a CBOR map, not list"),
    "malformed CBOR": (True, _frame(b"\xff\xfe"), "malformed CBOR"),
    "truncated frame": (True, struct.pack(">I", 100) + b"0123456789", "closed inside a frame (10 of 100 bytes)"),
    "truncated header": (True, b"\x00\x00", "closed inside a frame header"),
    "missing id": (True, _frame(cbor2.dumps({"op": "echo"})), "without a valid request id (got None)"),
    "bad id": (True, _frame(cbor2.dumps({"id": "7", "op": "echo"})), "without a valid request id (got '7')"),
    "negative id": (True, _frame(cbor2.dumps({"id": -1, "op": "echo"})), "without a valid request id"),
    "no op": (True, _frame(cbor2.dumps({"id": 1})), "request 1 has no op"),
    "args not a map": (True, _frame(cbor2.dumps({"id": 1, "op": "echo", "args": [1]})), "args must be a map"),
    "int keys": (True, _frame(cbor2.dumps({"id": 1, "op": "echo", "args": {1: 2}})), "map key"),
    "tagged value": (
        True,
        _frame(cbor2.dumps({"id": 1, "op": "echo", "args": {"t": cbor2.CBORTag(1, 0)}})),
        "tags are not allowed",
    ),
    "bad cancel": (True, _frame(cbor2.dumps({"id": 1, "cancel": 1})), "cancel must be true"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_closes_only_that_connection(serve, caplog, name):
    after_hello, data, reason = BAD_INPUTS[name]
    endpoint, _server = serve()
    with caplog.at_level(logging.WARNING, logger=WIRE_LOGGER), Connection.open(endpoint) as good:
        assert good.call("echo", {"n": 1}, timeout=WAIT) == {"n": 1}
        if after_hello:
            sock, _reply = raw_hello(endpoint)
        else:
            sock = endpoint.connect(timeout=WAIT)
        with sock:
            sock.sendall(data)
            if "truncated" in name:
                sock.shutdown(socket.SHUT_WR)
            assert read_until_closed(sock) == b""  # the server closed it
        assert good.call("echo", {"n": 2}, timeout=WAIT) == {"n": 2}
    assert "closing the connection from unix peer" in caplog.text
    assert reason in caplog.text


def test_duplicate_in_flight_id_closes_the_connection(serve, probe, caplog):
    endpoint, _server = serve()
    with caplog.at_level(logging.WARNING, logger=WIRE_LOGGER):
        sock, _reply = raw_hello(endpoint)
        with sock:
            send_frame(sock, {"id": 5, "op": "wait_release"})
            assert probe.started.wait(WAIT)
            send_frame(sock, {"id": 5, "op": "echo"})
            assert read_until_closed(sock) == b""
    assert "request id 5 is already in flight" in caplog.text


def test_ids_may_be_reused_once_answered(serve):
    endpoint, _server = serve()
    sock, _reply = raw_hello(endpoint)
    with sock:
        for n in range(3):
            send_frame(sock, {"id": 1, "op": "echo", "args": {"n": n}})
            assert recv_frame(sock) == {"id": 1, "ok": {"n": n}}


def test_client_that_stops_reading_frees_its_worker(serve, probe, caplog):
    endpoint, _server = serve(workers=1, send_timeout=0.5)
    sock, _reply = raw_hello(endpoint)
    with sock:
        send_frame(sock, {"id": 1, "op": "flood"})  # and never read what it sends back
        assert probe.saw_closed.wait(WAIT)
        # The only worker is free again for everyone else.
        with Connection.open(endpoint) as conn:
            assert conn.call("echo", {"n": 1}, timeout=WAIT) == {"n": 1}


def test_server_shutdown_mid_call_fails_the_call(serve, probe):
    endpoint, server = serve()
    with Connection.open(endpoint) as conn:
        call = conn.submit("wait_release")
        assert probe.started.wait(WAIT)
        threading.Thread(target=server.shutdown).start()
        with pytest.raises(ConnectionClosedError, match="closed the connection"):
            call.result(WAIT)
        probe.release.set()
        with pytest.raises(ConnectionClosedError):
            conn.call("echo")


SERVER_SCRIPT = """
import os, sys, threading
from ansible_collections.confidential_ml.nitro.plugins.module_utils.endpoints import Endpoint
from ansible_collections.confidential_ml.nitro.plugins.module_utils.wire_server import Server

def hang(args, ctx):
    os.write(1, b"hanging\\n")  # one atomic write: three of these run at once
    threading.Event().wait()

server = Server(Endpoint.parse(sys.argv[1]).listen(), {"hang": hang, "echo": lambda args, ctx: args})
print("ready", flush=True)
server.serve_forever()
"""


def test_server_death_mid_call_fails_every_call_at_once(sockdir):
    endpoint = Endpoint.unix(os.path.join(sockdir, "dying.sock"))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(endpoint)], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        with Connection.open(endpoint, timeout=WAIT) as conn:
            assert conn.call("echo", {"alive": True}, timeout=WAIT) == {"alive": True}
            calls = [conn.submit("hang") for _i in range(3)]
            assert proc.stdout.readline() == "hanging\n"
            proc.send_signal(signal.SIGKILL)
            for call in calls:
                # A timeout here would be a CallTimeoutError, not ConnectionClosedError: the test tells a hang
                # from a drop.
                with pytest.raises(ConnectionClosedError, match="closed the connection"):
                    call.result(WAIT)
            with pytest.raises(ConnectionClosedError, match="closed the connection"):
                conn.call("echo", timeout=WAIT)
            assert conn.closed
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_client_drops_a_server_that_breaks_the_protocol(sockdir):
    endpoint = Endpoint.unix(os.path.join(sockdir, "rogue.sock"))
    listener = endpoint.listen()

    def rogue():
        sock, _address = listener.accept()
        with sock:
            recv_frame(sock)
            send_frame(sock, {"hello": PROTOCOL, "version": 1, "max_frame": MAX_FRAME, "server": "rogue"})
            recv_frame(sock)
            sock.sendall(struct.pack(">I", 0xFFFFFFFF))
            read_until_closed(sock)
        listener.close()

    threading.Thread(target=rogue, daemon=True).start()
    with (
        Connection.open(endpoint, timeout=WAIT) as conn,
        pytest.raises(ConnectionClosedError, match="broke the protocol .*claims 4294967295 bytes"),
    ):
        conn.call("anything", timeout=WAIT)


# --- inline ops and callers reading their own replies -------------------------------------------


@pytest.mark.parametrize("inline", [set(), {"echo"}])
def test_requests_that_arrive_together_are_all_answered(serve, inline):
    # The server's reader takes in several small frames with one recv: each must still be served.
    endpoint, _server = serve(inline=inline)
    sock, _reply = raw_hello(endpoint)
    with sock:
        bodies = [encode({"id": rid, "op": "echo", "args": {"n": rid}}) for rid in (1, 2, 3)]
        sock.sendall(b"".join(struct.pack(">I", len(body)) + body for body in bodies))
        replies = {msg["id"]: msg for msg in (recv_frame(sock) for _i in range(3))}
    assert replies == {rid: {"id": rid, "ok": {"n": rid}} for rid in (1, 2, 3)}


def test_replies_that_arrive_together_reach_their_callers(sockdir):
    # A server whose two replies reach the client in one write: whoever reads them routes both (left in a
    # buffer, the second would wake no poll and its caller would wait for ever).
    endpoint = Endpoint.unix(os.path.join(sockdir, "together.sock"))
    listener = endpoint.listen()

    def together():
        sock, _address = listener.accept()
        with sock:
            recv_frame(sock)
            send_frame(sock, {"hello": PROTOCOL, "version": 1, "max_frame": MAX_FRAME, "server": "together"})
            first, second = recv_frame(sock), recv_frame(sock)
            replies = ({"id": second["id"], "ok": "second"}, {"id": first["id"], "ok": "first"})
            sock.sendall(b"".join(struct.pack(">I", len(encode(m))) + encode(m) for m in replies))
            read_until_closed(sock)
        listener.close()

    threading.Thread(target=together, daemon=True).start()
    with Connection.open(endpoint, timeout=WAIT) as conn:
        first, second = conn.submit("a"), conn.submit("b")
        # A CallTimeoutError here means a reply was read and never routed.
        assert first.result(WAIT) == "first"
        assert second.result(WAIT) == "second"


def test_inline_ops_run_on_the_reader_thread_and_pool_ops_stay_concurrent(serve, probe):
    handlers = make_handlers(probe)

    def where(args, ctx):
        return threading.current_thread().name

    handlers["where"] = where
    endpoint, _server = serve(handlers, inline={"where", "echo", "fail"}, name="inl")
    with Connection.open(endpoint) as conn:
        assert conn.call("where", timeout=WAIT) == "inl-conn"
        # A pool op still runs beside the inline ones: they are answered while it waits.
        slow = conn.submit("wait_release")
        assert probe.started.wait(WAIT)
        assert conn.call("echo", {"n": 1}, timeout=WAIT) == {"n": 1}
        with pytest.raises(RemoteError) as info:
            conn.call("fail", {"kind": "enoent"}, timeout=WAIT)
        assert info.value.errno == errno.ENOENT
        assert conn.call("release", timeout=WAIT) == "releasing"
        assert slow.result(WAIT) == "released"


def test_many_threads_with_inline_ops_share_one_connection(serve):
    endpoint, _server = serve(inline={"echo"}, max_inflight=2)
    errors = []

    def caller(t):
        try:
            for k in range(200):
                assert conn.call("echo", {"t": t, "k": k}, timeout=WAIT) == {"t": t, "k": k}
        except Exception as e:  # reported below
            errors.append(e)

    with Connection.open(endpoint) as conn:
        run_in_threads(caller, 6)
    assert errors == []


def test_lone_caller_reads_its_own_reply(serve):
    endpoint, _server = serve(inline={"echo"})
    with Connection.open(endpoint) as conn:
        assert conn.call("echo", {"n": 1}, timeout=WAIT) == {"n": 1}
        # The background reader stays idle while the only caller reads for itself.
        assert not conn._watch.is_set()
        for n in range(50):
            assert conn.call("echo", {"n": n}, timeout=WAIT) == {"n": n}
        assert not conn._watch.is_set()


def test_call_timeout_while_reading_for_itself(serve, probe):
    endpoint, _server = serve()
    with Connection.open(endpoint) as conn:
        with pytest.raises(CallTimeoutError):
            conn.call("wait_cancel", timeout=0.2)
        assert probe.saw_cancel.wait(WAIT)
        assert conn.call("echo", {"after": "timeout"}, timeout=WAIT) == {"after": "timeout"}


def test_big_request_while_a_big_reply_is_unread(serve):
    # The caller sends a MiB while the server, answering on its reader thread, sends a MiB back:
    # the background reader takes the reply, so neither side waits for the other for ever.
    endpoint, _server = serve(inline={"big", "echo"}, send_timeout=WAIT)
    with Connection.open(endpoint) as conn:
        pending = conn.submit("big", {"size": 3 << 20})
        data = os.urandom(3 << 20)
        assert conn.call("echo", {"data": data}, timeout=WAIT) == {"data": data}
        assert pending.result(WAIT) == b"\x01" * (3 << 20)


def test_bulk_requests_of_inline_ops_run_on_the_pool(serve, probe):
    handlers = make_handlers(probe)

    def where(args, ctx):
        return threading.current_thread().name

    handlers["where"] = where
    endpoint, _server = serve(handlers, inline={"where"}, name="inl")
    with Connection.open(endpoint) as conn:
        assert conn.call("where", {"data": b"x" * wire_server.INLINE_MAX_BYTES}, timeout=WAIT) == "inl-conn"
        assert conn.call("where", {"size": wire_server.INLINE_MAX_BYTES}, timeout=WAIT) == "inl-conn"
        assert conn.call("where", {"data": b"x" * (wire_server.INLINE_MAX_BYTES + 1)}, timeout=WAIT).startswith(
            "inl-worker"
        )
        assert conn.call("where", {"size": 1 << 20}, timeout=WAIT).startswith("inl-worker")


# --- fair and bounded under load (docs/PROTOCOL.md section 7) ---------------------------------


def wait_until(condition, what):
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what}")
        time.sleep(0.02)


def test_client_that_does_not_read_cannot_delay_another(serve):
    endpoint, server = serve()  # 8 workers: fewer than the stalled client's requests
    stalled, _reply = raw_hello(endpoint)
    with stalled:
        for rid in range(1, 17):  # 16 x 1 MiB reads, and never a byte read back
            send_frame(stalled, {"id": rid, "op": "big", "args": {"size": 1 << 20}})
        # The server takes in what its budget allows for one connection (half of the whole) and answers it.
        wait_until(lambda: server.budget.used >= server.budget.per_connection // 2, "the stalled requests")
        with Connection.open(endpoint) as other:
            # The stalled client never reads: a server that made this call wait on it would wait for ever, and the
            # call's timeout fails the test (no timing: it is a matter of correctness, not of speed).
            assert other.call("echo", {"attest": "me"}, timeout=WAIT) == {"attest": "me"}
        # The other connection's reservation comes back just after its reply is out: wait for it, then only the
        # stalled connection's bytes are left, and they may not exceed its share (reading `used` at once raced
        # with that release: 577 bytes over, once).
        wait_until(lambda: server.budget.used <= server.budget.per_connection, "the stalled connection's share")
    # Its parked replies are dropped with it, and every reserved byte comes back.
    wait_until(lambda: server.budget.used == 0, "the budget to be released")


FLOOD_SERVER = """
import sys, threading
from ansible_collections.confidential_ml.nitro.plugins.module_utils.endpoints import Endpoint
from ansible_collections.confidential_ml.nitro.plugins.module_utils.wire_server import Server

stall = threading.Event()
def hang(args, ctx):
    stall.wait()

server = Server(Endpoint.parse(sys.argv[1]).listen(), {"hang": hang, "write": hang},
                workers=2, max_buffered=int(sys.argv[2]))
print("ready", flush=True)
server.serve_forever()
"""


def _rss_kib(pid, field):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def test_memory_stays_bounded_under_a_flood_of_big_writes_with_the_pool_stalled(sockdir):
    max_buffered = 40 << 20  # a little over the smallest budget that fits 4 MiB frames (32 MiB and 32 bytes)
    endpoint = Endpoint.unix(os.path.join(sockdir, "flood.sock"))
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOD_SERVER, str(endpoint), str(max_buffered)],
        stdout=subprocess.PIPE, text=True, env=os.environ,
    )  # fmt: skip
    socks = []
    try:
        assert proc.stdout.readline() == "ready\n"
        with Connection.open(endpoint, timeout=WAIT) as conn:
            conn.submit("hang")
            conn.submit("hang")  # both workers busy for good: the pool is stalled
            baseline = _rss_kib(proc.pid, "VmRSS")
            data = b"\x07" * (MAX_FRAME - 256)  # the largest write a frame holds
            sent = []

            def flood(n):
                sock, _reply = raw_hello(endpoint)
                socks.append(sock)
                with contextlib.suppress(OSError):  # the test ends by shutting the socket under it
                    for rid in range(1, 9):
                        send_frame(sock, {"id": rid, "op": "write", "args": {"path": f"/f{n}", "data": data}})
                        sent.append(rid)

            threads = [threading.Thread(target=flood, args=(n,), daemon=True) for n in range(8)]
            for thread in threads:
                thread.start()
            # Wait until every frame is in, or the server has stopped taking more: for two seconds no
            # frame went out and its RSS stayed put.
            last, steady = None, 0
            while steady < 20 and any(thread.is_alive() for thread in threads):
                time.sleep(0.1)
                now = (len(sent), _rss_kib(proc.pid, "VmRSS"))
                steady = steady + 1 if now == last else 0
                last = now
            grown = (_rss_kib(proc.pid, "VmHWM") - baseline) << 10
            # 8 x 8 x 4 MiB = 256 MiB was sent; the server held at most its budget (plus threads and heap slack).
            assert grown <= max_buffered + (24 << 20), f"the server grew by {grown >> 20} MiB"
            for sock in socks:
                sock.shutdown(socket.SHUT_RDWR)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("thread", ["conn", "writer"])
def test_a_thread_that_cannot_start_refuses_one_connection(serve, monkeypatch, caplog, thread):
    endpoint, _server = serve(name="srv")
    start = threading.Thread.start
    failures = []

    def start_or_fail(self):
        if self.name == f"srv-{thread}" and not failures:
            failures.append(self.name)
            raise RuntimeError("can't start new thread")
        return start(self)

    monkeypatch.setattr(threading.Thread, "start", start_or_fail)
    with pytest.raises(ConnectionClosedError):
        Connection.open(endpoint, timeout=WAIT)
    assert failures == [f"srv-{thread}"]
    assert "cannot start its" in caplog.text
    # The server goes on: the next connection is served.
    with Connection.open(endpoint, timeout=WAIT) as conn:
        assert conn.call("echo", {"still": "serving"}, timeout=WAIT) == {"still": "serving"}


def test_max_buffered_must_fit_a_frame_each_way(sockdir):
    listener = Endpoint.unix(os.path.join(sockdir, "small.sock")).listen()
    with listener, pytest.raises(ValueError, match="max_buffered must be at least"):
        Server(listener, {}, max_buffered=MAX_FRAME)


def test_event_over_the_client_limit_fails_in_the_handler_only(serve, probe):
    handlers = make_handlers(probe)

    def big_event(args, ctx):
        try:
            ctx.emit(b"x" * MIN_FRAME)
        except FrameTooLargeError as e:
            return f"refused {e.size} > {e.limit}"
        return "sent"

    handlers["big_event"] = big_event
    endpoint, _server = serve(handlers)
    with Connection.open(endpoint, max_frame=MIN_FRAME) as conn:
        assert conn.call("big_event", timeout=WAIT).startswith("refused")
        assert conn.call("echo", {"still": "open"}, timeout=WAIT) == {"still": "open"}
