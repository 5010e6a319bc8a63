"""Addresses of enclave services: one type for AF_VSOCK (nitro) and AF_UNIX (local).

An endpoint is written as a URL:

    vsock://16:5000            enclave CID 16, port 5000 (the host connects here)
    vsock://any:5000           VMADDR_CID_ANY: what the server inside the enclave listens on
    vsock://16                 the port defaults to DEFAULT_PORT
    unix:///run/enclave/16_5000.sock

The `local` backend stands in for vsock with one AF_UNIX socket file per
(cid, port) in a directory the local runtime owns (see local_socket_path).
Everything above the socket (the wire protocol, the server, the clients) is
the same on both backends.

One port carries every service: the wire protocol multiplexes requests by id,
so there is no per-service port to configure, allow-list or get wrong.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import stat
from dataclasses import dataclass

from .errors import EndpointError, EndpointUnreachableError

DEFAULT_PORT = 5000
"""The port the enclave server listens on; every service shares it."""

PARENT_CID = 3
"""The parent (host) instance as seen from inside a Nitro Enclave."""

KMS_PROXY_PORT = 8000
"""Where vsock-proxy forwards to KMS on the parent, by convention."""

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF
MAX_CID = 0xFFFFFFFF
MAX_PORT = 0xFFFFFFFE  # 0xFFFFFFFF is VMADDR_PORT_ANY

DEFAULT_SOCKET_MODE = 0o600
"""Mode of a local socket file: only its owner (the local runtime, normally root) may connect."""

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_UNIX_PATH_MAX = 107
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "vsock" | "unix"
    cid: int | None = None
    port: int | None = None
    path: str | None = None

    def __post_init__(self):
        if self.scheme == "vsock":
            if self.path is not None:
                raise EndpointError(f"a vsock endpoint has no path (got {self.path!r}): use vsock://CID:PORT")
            _check_cid(self.cid)
            _check_port(self.port)
        elif self.scheme == "unix":
            if self.cid is not None or self.port is not None:
                raise EndpointError("a unix endpoint has only a path: use unix:///absolute/path.sock")
            _check_path(self.path)
        else:
            raise EndpointError(f"unknown endpoint scheme {self.scheme!r}: use vsock://CID:PORT or unix:///path.sock")

    @classmethod
    def vsock(cls, cid: int, port: int = DEFAULT_PORT) -> Endpoint:
        return cls("vsock", cid=cid, port=port)

    @classmethod
    def unix(cls, path: str | os.PathLike) -> Endpoint:
        return cls("unix", path=os.fspath(path))

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse "vsock://CID[:PORT]" or "unix:///absolute/path"; raise EndpointError otherwise."""
        if not isinstance(text, str):
            raise EndpointError(f"an endpoint is a string such as vsock://16:5000, not {type(text).__name__}")
        scheme, sep, rest = text.partition("://")
        if not sep:
            raise EndpointError(f"endpoint {text!r} has no scheme: write vsock://CID:PORT or unix:///path.sock")
        if scheme == "unix":
            return cls.unix(rest)
        if scheme != "vsock":
            raise EndpointError(
                f"unknown endpoint scheme {scheme!r} in {text!r}: use vsock://CID:PORT or unix:///path.sock"
            )
        cid_text, sep, port_text = rest.partition(":")
        if cid_text == "any":
            cid = VMADDR_CID_ANY
        elif _DIGITS.fullmatch(cid_text):
            cid = int(cid_text)
        else:
            raise EndpointError(f"bad CID {cid_text!r} in {text!r}: a CID is a decimal number (or 'any' to listen)")
        if not sep:
            port = DEFAULT_PORT
        elif _DIGITS.fullmatch(port_text):
            port = int(port_text)
        else:
            raise EndpointError(f"bad port {port_text!r} in {text!r}: a port is a decimal number")
        return cls.vsock(cid, port)

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        cid = "any" if self.cid == VMADDR_CID_ANY else self.cid
        return f"vsock://{cid}:{self.port}"

    def _socket(self) -> socket.socket:
        if self.scheme == "unix":
            return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except (AttributeError, OSError) as e:
            raise EndpointUnreachableError(
                f"this host cannot open vsock sockets ({e}): on a Nitro parent instance install and start "
                "the nitro_enclaves driver (aws-nitro-enclaves-cli); elsewhere use the local backend (unix://)"
            ) from e

    def _address(self):
        return self.path if self.scheme == "unix" else (self.cid, self.port)

    def connect(self, timeout: float | None = 10) -> socket.socket:
        """A connected stream socket; EndpointUnreachableError (an EnclaveError) with advice if nobody answers."""
        if self.scheme == "vsock" and self.cid == VMADDR_CID_ANY:
            raise EndpointError(f"cannot connect to {self}: 'any' is for listening; give the enclave's CID")
        sock = self._socket()
        try:
            sock.settimeout(timeout)
            sock.connect(self._address())
        except OSError as e:
            sock.close()
            raise self._unreachable(e, timeout) from e
        return sock

    def _unreachable(self, e: OSError, timeout: float | None) -> EndpointUnreachableError:
        if isinstance(e, TimeoutError) and e.errno is None:
            what = f"timed out after {timeout} s"
        else:
            what = e.strerror or str(e)
        if isinstance(e, PermissionError):
            hint = "connect as the user that owns the socket (root by default), or widen its mode when listening"
        elif self.scheme == "vsock":
            hint = "is the enclave running? `nitro-cli describe-enclaves` shows its EnclaveCID"
        else:
            hint = "is the local enclave running? its runtime creates this socket when it starts"
        error = EndpointUnreachableError(f"no enclave listens on {self} ({what}): {hint}")
        error.errno = e.errno if e.errno is not None else errno.ETIMEDOUT
        return error

    def listen(self, backlog: int = 64, *, mode: int = DEFAULT_SOCKET_MODE) -> socket.socket:
        """A listening socket. For unix, a stale socket file left by a dead server is replaced,
        a live one is not, and the file appears only once it has `mode` and accepts connections:
        whoever sees it can connect (a waiter need not retry "connection refused")."""
        sock = self._socket()
        bound = None
        try:
            if self.scheme == "unix":
                self._remove_stale_socket()
            # A unix socket is bound beside its path under a temporary name, made ready there and then linked
            # into place; link, unlike rename, never replaces what another server put there meanwhile.
            address = self._temp_path() if self.scheme == "unix" else self._address()
            try:
                sock.bind(address)
            except OSError as e:
                raise EndpointError(f"cannot listen on {self}: {e.strerror or e}: {self._bind_hint(e)}") from e
            if self.scheme == "unix":
                bound = address
                os.chmod(bound, mode)
            sock.listen(backlog)
            if bound is not None:
                try:
                    os.link(bound, self._socket_file())
                except FileExistsError:
                    raise EndpointError(
                        f"cannot listen on {self}: another server started listening there meanwhile; stop it first"
                    ) from None
        except BaseException:
            sock.close()
            raise
        finally:
            if bound is not None:
                os.unlink(bound)
        return sock

    def _socket_file(self) -> str:
        if self.path is None:  # __post_init__ gives every unix endpoint a path and no vsock one
            raise EndpointError(f"{self} is a vsock endpoint: it has no socket file")
        return self.path

    def _temp_path(self) -> str:
        # As long as the file name (at least 2 bytes), so that it fits wherever the path itself fits.
        directory, name = os.path.split(self._socket_file())
        return os.path.join(directory, "." + secrets.token_hex(len(name))[: max(1, len(name) - 1)])

    def _bind_hint(self, e: OSError) -> str:
        if e.errno == errno.EADDRINUSE:
            return "another server already uses it; stop that server or choose another port"
        if e.errno == errno.ENOENT:
            return f"create the directory {os.path.dirname(self._socket_file())} first"
        if e.errno == errno.EACCES:
            return "run as a user allowed to bind there (ports below 1024 and system directories need root)"
        return "check the address"

    def _remove_stale_socket(self):
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise EndpointError(f"cannot listen on {self}: {self.path} exists and is not a socket; remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            # Nobody accepts there: a socket file left behind by a server that died.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except OSError as e:
            raise EndpointError(f"cannot listen on {self}: probing the existing socket failed: {e}") from e
        finally:
            probe.close()
        raise EndpointError(f"cannot listen on {self}: another server is listening there; stop it first")


def local_socket_path(base_dir: str | os.PathLike, cid: int, port: int) -> str:
    """The socket file standing in for vsock (cid, port) on the local backend.

    After Firecracker's hybrid vsock, which maps guest ports to files named
    after the port; here one directory holds every local enclave, so the name
    carries both: f"{base_dir}/{cid}_{port}.sock"."""
    base_dir = os.fspath(base_dir)
    if not os.path.isabs(base_dir):
        raise EndpointError(f"the local socket directory must be an absolute path, not {base_dir!r}")
    _check_cid(cid)
    _check_port(port)
    return os.path.join(base_dir, f"{cid}_{port}.sock")


def _check_cid(cid):
    if not isinstance(cid, int) or isinstance(cid, bool) or not 0 <= cid <= MAX_CID:
        raise EndpointError(f"bad vsock CID {cid!r}: a CID is an integer from 0 to {MAX_CID} (enclaves get 4 and up)")


def _check_port(port):
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= MAX_PORT:
        raise EndpointError(f"bad vsock port {port!r}: a port is an integer from 1 to {MAX_PORT}")


def _check_path(path):
    if not isinstance(path, str) or not path.startswith("/"):
        raise EndpointError(f"a unix endpoint needs an absolute path (unix:///dir/name.sock), not {path!r}")
    if "\0" in path:
        raise EndpointError(f"a unix socket path cannot contain a NUL byte: {path!r}")
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise EndpointError(f"unix socket path {path!r} is longer than {_UNIX_PATH_MAX} bytes: use a shorter directory")
