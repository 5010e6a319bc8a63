"""Serve a SimulatedNsm over a Unix socket, for the enclave process to reach as its /dev/nsm.

The local runtime holds the simulated NSM (and its signing key) outside the
enclave process, as the real NSM sits outside the enclave's kernel; the
enclave only gets this socket. Framing: 4-byte big-endian length + the raw
CBOR request, answered the same way (NsmSocket is the client).
"""

import contextlib
import logging
import os
import socket
import threading

from ansible_collections.confidential_ml.nitro.nitro_api.nsm_messages import (
    NSM_REQUEST_MAX_SIZE,
    NSM_SOCKET_FRAME,
)

log = logging.getLogger(__name__)


class NsmService:
    def __init__(self, nsm, path, *, mode: int = 0o600):
        self.nsm = nsm
        self.path = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        os.chmod(self.path, mode)
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, name="nsm-service", daemon=True)

    def start(self) -> "NsmService":
        self._thread.start()
        return self

    def _serve(self) -> None:
        while True:
            try:
                conn, _address = self._sock.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                header = conn.recv(NSM_SOCKET_FRAME.size, socket.MSG_WAITALL)
                if len(header) != NSM_SOCKET_FRAME.size:
                    return
                (length,) = NSM_SOCKET_FRAME.unpack(header)
                if length > NSM_REQUEST_MAX_SIZE:
                    log.warning("refused an NSM request of %d bytes (limit %d)", length, NSM_REQUEST_MAX_SIZE)
                    return
                request = conn.recv(length, socket.MSG_WAITALL)
                if len(request) != length:
                    return
                answer = self.nsm.handle(request)
                conn.sendall(NSM_SOCKET_FRAME.pack(len(answer)) + answer)
            except OSError as exc:
                log.warning("NSM request failed: %s", exc)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
