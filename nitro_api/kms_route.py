"""The way to KMS across the enclave boundary: the names boto3 calls KMS by, and the byte relay that both
the enclave's forwarder (enclave_server/kms_forwarder.py: 127.0.0.1:443 to vsock 3:8000) and the local
backend's stand-in for the parent's vsock-proxy (enclave_local/vsock_proxy.py) run. TLS passes through
untouched: a relay sees only ciphertext.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
CONNECT_TIMEOUT = 10


def kms_hostnames() -> list[str]:
    """Every hostname boto3 builds for KMS (kms.<region>.<partition's DNS suffix>), from the
    partitions botocore ships: the names /etc/hosts maps to the forwarder."""
    from botocore.loaders import Loader

    names: list[str] = []
    for partition in Loader().load_data("partitions")["partitions"]:
        suffix = partition["outputs"]["dnsSuffix"]
        names.extend(f"kms.{region}.{suffix}" for region in partition["regions"] if not region.endswith("-global"))
    return sorted(names)


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
