"""Inside the enclave: KMS over HTTPS on loopback, relayed to the parent's KMS proxy over vsock.

An enclave has no network and no DNS, only its vsock. boto3 calls KMS at its own
https://kms.<region>.amazonaws.com and checks the certificate and the hostname, so:

  * boot (enclave_server/boot.py) brings loopback up and maps every KMS hostname boto3
    can build (kms_hostnames: each region botocore knows) to 127.0.0.1 in /etc/hosts;
    which region a job uses is what the host sends with the job, as before;
  * the server listens on 127.0.0.1:443 and relays every connection, byte for byte, to
    the parent's vsock-proxy (vsock://3:8000 on Nitro; the local runtime maps that
    address to the enclave's 3_8000.sock), which forwards it to KMS.

TLS runs end to end between boto3 in the enclave and KMS: the forwarder and the parent
relay ciphertext only, and a host that answers in KMS's place has no certificate for
its name. Only the server's own uid is relayed (only_the_server): a job runs as another
uid and gets its connection closed. The same code runs on both backends; the local runtime's vsock-proxy
(enclave_local/vsock_proxy.py) uses this module's Relay for the host side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

from ..plugins.module_utils.endpoints import Endpoint
from ..plugins.module_utils.errors import EnclaveError

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
CONNECT_TIMEOUT = 10
KMS_TLS_PORT = 443
LOOPBACK = "127.0.0.1"


class Relay:
    """Accept connections on a listening socket; relay each to a fresh upstream connection.

    Bytes are copied both ways until each side has closed its half, so request/response
    protocols (HTTP, TLS) pass through unchanged. One thread per direction and connection:
    KMS traffic is a few small requests at a time."""

    def __init__(
        self,
        listener: socket.socket,
        connect: Callable[[], socket.socket],
        *,
        name: str,
        admit: Callable[[socket.socket], bool] | None = None,
    ):
        self.listener = listener
        self.connect = connect
        self.name = name
        self.admit = admit  # decides, per accepted connection, whether it is relayed at all
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)

    def start(self) -> Relay:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        while True:
            try:
                client, _address = self.listener.accept()
            except OSError:
                return  # the listener was closed by stop()
            threading.Thread(target=self._session, args=(client,), name=f"{self.name}-session", daemon=True).start()

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._open.add if add else self._open.discard)(sock)

    def _session(self, client: socket.socket) -> None:
        self._track(client, True)
        try:
            if self.admit is not None and not self.admit(client):
                log.warning("%s: refused a connection from %s (not the server's)", self.name, client.getpeername())
                return
            try:
                upstream = self.connect()
            except Exception as err:  # noqa: BLE001 - any failure to reach upstream ends this connection only
                log.warning("%s: cannot reach the upstream, dropping a connection: %s", self.name, err)
                return
            self._track(upstream, True)
            try:
                back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
                back.start()
                _pump(client, upstream)
                back.join()
            finally:
                self._track(upstream, False)
                upstream.close()
        finally:
            self._track(client, False)
            client.close()

    def stop(self) -> None:
        """Stop accepting and cut every relayed connection."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until src ends, then pass the end on (half-close), so the peer sees EOF too."""
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass  # a reset on either side ends this direction; the other one sees it too
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def peer_uid(conn: socket.socket) -> int | None:
    """The uid that owns the other end of a loopback TCP connection, as the kernel records it in
    /proc/net/tcp(6) (the socket's creator); None if it is not listed (it closed meanwhile)."""
    peer_port, own_port = conn.getpeername()[1], conn.getsockname()[1]
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
            if int(fields[1].rsplit(":", 1)[1], 16) == peer_port and int(fields[2].rsplit(":", 1)[1], 16) == own_port:
                return int(fields[7])
    return None


def only_the_server(conn: socket.socket) -> bool:
    """Admit a connection only from this process's uid: the server releases keys; a job (another uid,
    jobs.py) must not reach KMS through the forwarder with credentials or an attestation of its own."""
    return peer_uid(conn) == os.geteuid()


def connector(endpoint: Endpoint) -> Callable[[], socket.socket]:
    """Open a blocking connection to endpoint (vsock or unix) for each relayed connection."""

    def connect() -> socket.socket:
        sock = endpoint.connect(timeout=CONNECT_TIMEOUT)
        sock.settimeout(None)  # relayed connections live as long as their peers keep them
        return sock

    return connect


def kms_hostnames() -> list[str]:
    """Every hostname boto3 builds for KMS (kms.<region>.<partition's DNS suffix>), from the
    partitions botocore ships: the names /etc/hosts maps to the forwarder."""
    from botocore.loaders import Loader

    names = []
    for partition in Loader().load_data("partitions")["partitions"]:
        suffix = partition["outputs"]["dnsSuffix"]
        names.extend(f"kms.{region}.{suffix}" for region in partition["regions"] if not region.endswith("-global"))
    return sorted(names)


def hosts_file() -> str:
    """/etc/hosts of the enclave: localhost, and each KMS hostname on the forwarder's address."""
    return "127.0.0.1 localhost\n::1 localhost\n" + "".join(f"{LOOPBACK} {name}\n" for name in kms_hostnames())


def check_route(port: int = KMS_TLS_PORT) -> None:
    """Fail now, with what to fix, if boto3 could not reach the forwarder: each KMS hostname must
    resolve to the forwarder's address, and a connection there must be accepted."""
    for name in kms_hostnames():
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)}
        except OSError as err:
            raise EnclaveError(
                f"{name} does not resolve ({err}): the enclave has no DNS, so boot must map every KMS hostname "
                f"to {LOOPBACK} in /etc/hosts"
            ) from None
        if addresses != {LOOPBACK}:
            raise EnclaveError(
                f"{name} resolves to {', '.join(sorted(addresses))}, not to the KMS forwarder on {LOOPBACK}: "
                "fix /etc/hosts (boot writes it)"
            )
    try:
        socket.create_connection((LOOPBACK, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as err:
        raise EnclaveError(
            f"the KMS forwarder on {LOOPBACK}:{port} cannot be reached ({err.strerror or err}): is loopback up? "
            "(boot brings it up; the enclave's init does not)"
        ) from None


def start(proxy: Endpoint | str, *, port: int = KMS_TLS_PORT, host: str = LOOPBACK) -> Relay:
    """Listen on host:port inside the enclave and relay each connection to the parent's KMS proxy."""
    endpoint = Endpoint.parse(proxy) if isinstance(proxy, str) else proxy
    try:
        listener = socket.create_server((host, port))
    except OSError as err:
        raise EnclaveError(
            f"the KMS forwarder cannot listen on {host}:{port}: {err.strerror or err}; choose another --kms-listen "
            "port (and the matching --kms-endpoint-url)"
        ) from err
    log.info("KMS forwarder: %s:%d -> %s", host, listener.getsockname()[1], endpoint)
    return Relay(listener, connector(endpoint), name="kms-forwarder", admit=only_the_server).start()
