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
(enclave_local/vsock_proxy.py) runs the same Relay (nitro_api/kms_route.py) on the host side.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from ..nitro_api.kms_route import CONNECT_TIMEOUT, Relay, kms_hostnames
from ..plugins.module_utils.endpoints import Endpoint
from ..plugins.module_utils.errors import EnclaveError

log = logging.getLogger(__name__)

KMS_TLS_PORT = 443
LOOPBACK = "127.0.0.1"


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


def hosts_file() -> str:
    """/etc/hosts of the enclave: localhost, and each KMS hostname on the forwarder's address."""
    return "127.0.0.1 localhost\n::1 localhost\n" + "".join(f"{LOOPBACK} {name}\n" for name in kms_hostnames())


def check_route(port: int = KMS_TLS_PORT) -> None:
    """Fail now, with what to fix, if boto3 could not reach the forwarder: each KMS hostname must
    resolve to the forwarder's address, and a connection there must be accepted."""
    for name in kms_hostnames():
        try:
            addresses = {str(info[4][0]) for info in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)}
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
