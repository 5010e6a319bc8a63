"""The host side of an enclave's way to KMS: vsock-proxy, with its allowlist.

On Nitro, `vsock-proxy 8000 kms.us-east-1.amazonaws.com 443` listens on the parent's
vsock port 8000 and relays every connection from the enclave to that one destination,
but only when the destination is in the allowlist of /etc/nitro_enclaves/vsock-proxy.yaml:

    allowlist:
    - {address: kms.us-east-1.amazonaws.com, port: 443}

The local runtime runs one per enclave: it listens on the enclave's 3_8000.sock (the
local stand-in for the parent's vsock port 8000) and relays to the local KMS on
127.0.0.1, allowed by state_home()/vsock-proxy.yaml, which `enclave local up` writes.
A destination that is not on the allowlist is refused (and logged), as vsock-proxy refuses it.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import yaml

from ..nitro_api.kms_route import CONNECT_TIMEOUT, Relay
from ..plugins.module_utils.endpoints import Endpoint
from ..plugins.module_utils.errors import VsockProxyError

log = logging.getLogger(__name__)


def parse_allowlist(text: str, *, origin: str = "the vsock-proxy configuration") -> list[tuple[str, int]]:
    """[(address, port), ...] from vsock-proxy.yaml's text."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise VsockProxyError(f"{origin} is not valid YAML: {err}") from None
    entries = config.get("allowlist") if isinstance(config, dict) else None
    if not isinstance(entries, list):
        raise VsockProxyError(f"{origin} has no allowlist: write `allowlist: [{{address: HOST, port: PORT}}]`")
    allowed = []
    for entry in entries:
        address = entry.get("address") if isinstance(entry, dict) else None
        port = entry.get("port") if isinstance(entry, dict) else None
        port_ok = isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
        if not isinstance(address, str) or not address or not isinstance(port, int) or not port_ok:
            raise VsockProxyError(
                f"{origin} has a bad allowlist entry {entry!r}: each is {{address: HOST, port: 1-65535}}"
            )
        allowed.append((address.lower(), port))
    return allowed


def load_allowlist(path: str | os.PathLike) -> list[tuple[str, int]]:
    try:
        return parse_allowlist(Path(path).read_text(), origin=str(path))
    except FileNotFoundError:
        raise VsockProxyError(
            f"no vsock-proxy allowlist at {path}: start the local cloud with `enclave local up`"
        ) from None


def render_allowlist(entries: list[tuple[str, int]]) -> str:
    return yaml.safe_dump({"allowlist": [{"address": a, "port": p} for a, p in entries]}, sort_keys=False)


class VsockProxy:
    """Relay connections made to `listen` to (address, port), if the allowlist allows that destination."""

    def __init__(self, listen: Endpoint | str, address: str, port: int, allowlist: list[tuple[str, int]]):
        self.listen_endpoint = Endpoint.parse(listen) if isinstance(listen, str) else listen
        self.address, self.port = address, port
        if (address.lower(), port) not in allowlist:
            allowed = ", ".join(f"{a}:{p}" for a, p in allowlist) or "nothing"
            log.error("vsock-proxy refused the destination %s:%d: not in the allowlist (%s)", address, port, allowed)
            raise VsockProxyError(
                f"vsock-proxy refuses {address}:{port}: it is not in the allowlist (which allows {allowed}); "
                f"add `- {{address: {address}, port: {port}}}` to the vsock-proxy configuration"
            )
        self.relay = Relay(self.listen_endpoint.listen(), self._connect, name=f"vsock-proxy-{port}")

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.address, self.port), timeout=CONNECT_TIMEOUT)
        sock.settimeout(None)
        return sock

    def start(self) -> VsockProxy:
        log.info("vsock-proxy: %s -> %s:%d", self.listen_endpoint, self.address, self.port)
        self.relay.start()
        return self

    def stop(self) -> None:
        self.relay.stop()
        if self.listen_endpoint.path is not None:  # a unix endpoint
            Path(self.listen_endpoint.path).unlink(missing_ok=True)

    def __enter__(self) -> VsockProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
