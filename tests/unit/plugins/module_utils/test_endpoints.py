import errno
import os
import random
import socket
import stat
import tempfile

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils.endpoints import (
    DEFAULT_PORT,
    DEFAULT_SOCKET_MODE,
    VMADDR_CID_ANY,
    Endpoint,
    local_socket_path,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import (
    EnclaveError,
    EndpointError,
    EndpointUnreachableError,
)


@pytest.fixture
def sockdir():
    # Short paths: sun_path holds 107 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="ep-") as d:
        yield d


@pytest.mark.parametrize(
    "text, expected",
    [
        ("vsock://16:5000", Endpoint("vsock", cid=16, port=5000)),
        ("vsock://3:8000", Endpoint("vsock", cid=3, port=8000)),
        ("vsock://any:5000", Endpoint("vsock", cid=VMADDR_CID_ANY, port=5000)),
        ("vsock://16", Endpoint("vsock", cid=16, port=DEFAULT_PORT)),
        ("vsock://4294967295:4294967294", Endpoint("vsock", cid=VMADDR_CID_ANY, port=4294967294)),
        ("unix:///run/enclave/16_5000.sock", Endpoint("unix", path="/run/enclave/16_5000.sock")),
    ],
)
def test_parse(text, expected):
    endpoint = Endpoint.parse(text)
    assert endpoint == expected
    assert Endpoint.parse(str(endpoint)) == endpoint


def test_str():
    assert str(Endpoint.vsock(16)) == "vsock://16:5000"
    assert str(Endpoint.vsock(VMADDR_CID_ANY, 7)) == "vsock://any:7"
    assert str(Endpoint.unix("/run/x.sock")) == "unix:///run/x.sock"


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "no scheme"),
        ("16:5000", "no scheme"),
        ("tcp://10.0.0.1:5000", "unknown endpoint scheme 'tcp'"),
        ("VSOCK://16:5000", "unknown endpoint scheme"),
        ("vsock://", "bad CID ''"),
        ("vsock://-1:5000", "bad CID '-1'"),
        ("vsock://1_6:5000", "bad CID"),
        ("vsock:// 16:5000", "bad CID"),
        ("vsock://١٦:5000", "bad CID"),  # non-ASCII digits, which int() would accept
        ("vsock://4294967296:5000", "bad vsock CID 4294967296"),
        ("vsock://16:", "bad port ''"),
        ("vsock://16:50x", "bad port"),
        ("vsock://16:0", "bad vsock port 0"),
        ("vsock://16:4294967295", "bad vsock port 4294967295"),
        ("vsock://16:5000:1", "bad port"),
        ("unix://", "absolute path"),
        ("unix://relative/16_5000.sock", "absolute path"),
        ("unix:///run/a\0b.sock", "NUL"),
        ("unix:///" + "a" * 120, "longer than 107 bytes"),
    ],
)
def test_parse_rejects(text, words):
    with pytest.raises(EndpointError) as info:
        Endpoint.parse(text)
    assert isinstance(info.value, EnclaveError)
    assert isinstance(info.value, ValueError)
    assert words in str(info.value)


def test_parse_rejects_non_strings():
    with pytest.raises(EndpointError, match="not bytes"):
        Endpoint.parse(b"vsock://16:5000")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scheme": "vsock", "cid": True, "port": 5000},
        {"scheme": "vsock", "cid": 16, "port": 5000.0},
        {"scheme": "vsock", "cid": 16, "port": 5000, "path": "/x"},
        {"scheme": "unix", "path": "/x", "port": 5000},
        {"scheme": "unix", "path": None},
        {"scheme": "tcp", "cid": 1, "port": 1},
    ],
)
def test_construction_is_validated(kwargs):
    with pytest.raises(EndpointError):
        Endpoint(**kwargs)


def test_local_socket_path():
    assert local_socket_path("/run/enclaves", 16, 5000) == "/run/enclaves/16_5000.sock"
    with pytest.raises(EndpointError, match="absolute"):
        local_socket_path("run/enclaves", 16, 5000)
    with pytest.raises(EndpointError, match="port"):
        local_socket_path("/run/enclaves", 16, 0)
    with pytest.raises(EndpointError, match="CID"):
        local_socket_path("/run/enclaves", -3, 5000)


def test_unix_listen_connect_and_mode(sockdir):
    endpoint = Endpoint.unix(local_socket_path(sockdir, 16, 5000))
    listener = endpoint.listen()
    try:
        assert stat.S_IMODE(os.stat(endpoint.path).st_mode) == DEFAULT_SOCKET_MODE == 0o600
        client = endpoint.connect(timeout=5)
        server_side, _address = listener.accept()
        client.sendall(b"ping")
        assert server_side.recv(4) == b"ping"
        client.close()
        server_side.close()
    finally:
        listener.close()


def test_unix_socket_file_appears_only_once_it_listens(sockdir, monkeypatch):
    endpoint = Endpoint.unix(os.path.join(sockdir, "s.sock"))
    seen_at_listen = []

    class Recording(socket.socket):
        def listen(self, backlog):
            seen_at_listen.append(os.path.lexists(endpoint.path))
            super().listen(backlog)

    monkeypatch.setattr(Endpoint, "_socket", lambda self: Recording(socket.AF_UNIX, socket.SOCK_STREAM))
    listener = endpoint.listen()
    try:
        assert seen_at_listen == [False]  # nobody could find it bound but refusing connections
        assert os.listdir(sockdir) == ["s.sock"]  # the temporary name is gone
        assert stat.S_IMODE(os.stat(endpoint.path).st_mode) == DEFAULT_SOCKET_MODE
        endpoint.connect(timeout=5).close()
    finally:
        listener.close()


def test_unix_listen_mode_parameter(sockdir):
    endpoint = Endpoint.unix(os.path.join(sockdir, "group.sock"))
    listener = endpoint.listen(mode=0o660)
    try:
        assert stat.S_IMODE(os.stat(endpoint.path).st_mode) == 0o660
    finally:
        listener.close()


def test_unix_listen_replaces_a_stale_socket(sockdir):
    endpoint = Endpoint.unix(os.path.join(sockdir, "s.sock"))
    endpoint.listen().close()  # a dead server leaves its socket file behind
    assert stat.S_ISSOCK(os.lstat(endpoint.path).st_mode)
    listener = endpoint.listen()
    try:
        endpoint.connect(timeout=5).close()
    finally:
        listener.close()


def test_unix_listen_refuses_to_steal_a_live_socket(sockdir):
    endpoint = Endpoint.unix(os.path.join(sockdir, "s.sock"))
    listener = endpoint.listen()
    try:
        with pytest.raises(EndpointError, match="another server is listening"):
            endpoint.listen()
        endpoint.connect(timeout=5).close()  # the first server still has its socket
    finally:
        listener.close()


def test_unix_listen_never_removes_a_regular_file(sockdir):
    path = os.path.join(sockdir, "data.sock")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(EndpointError, match="not a socket"):
        Endpoint.unix(path).listen()
    with open(path) as f:
        assert f.read() == "keep me"


def test_unix_listen_in_missing_directory(sockdir):
    endpoint = Endpoint.unix(os.path.join(sockdir, "missing", "s.sock"))
    with pytest.raises(EndpointError, match="create the directory"):
        endpoint.listen()


def test_connect_to_missing_socket(sockdir):
    endpoint = Endpoint.unix(os.path.join(sockdir, "16_5000.sock"))
    with pytest.raises(EndpointUnreachableError) as info:
        endpoint.connect(timeout=5)
    assert isinstance(info.value, EnclaveError)
    assert isinstance(info.value, ConnectionError)
    assert info.value.errno == errno.ENOENT
    assert f"no enclave listens on {endpoint}" in str(info.value)
    assert "is the local enclave running?" in str(info.value)


def test_connect_to_stale_socket(sockdir):
    endpoint = Endpoint.unix(os.path.join(sockdir, "s.sock"))
    endpoint.listen().close()
    with pytest.raises(EndpointUnreachableError) as info:
        endpoint.connect(timeout=5)
    assert info.value.errno == errno.ECONNREFUSED


def test_connect_to_any_is_refused():
    with pytest.raises(EndpointError, match="'any' is for listening"):
        Endpoint.parse("vsock://any:5000").connect()


def _vsock_available():
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except (AttributeError, OSError):
        return False
    return True


@pytest.mark.skipif(not _vsock_available(), reason="no AF_VSOCK on this host")
def test_vsock_listen_and_unreachable_connect():
    port = random.randint(20000, 60000)
    listener = Endpoint.parse(f"vsock://any:{port}").listen()
    try:
        assert listener.family == socket.AF_VSOCK
        assert listener.getsockname() == (VMADDR_CID_ANY, port)
    finally:
        listener.close()
    # Nothing runs at this address (there is no vsock loopback here): the error says what to check.
    with pytest.raises(
        EndpointUnreachableError, match=r"no enclave listens on vsock://3:\d+ .*nitro-cli describe-enclaves"
    ):
        Endpoint.vsock(3, port).connect(timeout=1)
