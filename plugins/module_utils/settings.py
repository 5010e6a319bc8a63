"""Where the project keeps its state, and the settings every entry point shares.

Nothing here is a constant of the protocol: ports, CIDs, regions and paths are
settings with defaults, overridable by environment or flags.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

# The one directory that holds all local state (local KMS, local CA, enclaves).
ENV_HOME = "ENCLAVE_HOME"


def state_home() -> Path:
    """$ENCLAVE_HOME, else $XDG_STATE_HOME/confidential-ml-nitro, else ~/.local/state/confidential-ml-nitro."""
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "confidential-ml-nitro"


def private_dir(path: Path) -> Path:
    """Create path (and parents) with mode 0700 and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on a lock file in the state (created 0600, its directory 0700) while inside."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


DEFAULT_SERVER_PORT = 5000
ENV_ENDPOINT = "ENCLAVE_ENDPOINT"
ENV_BACKEND = "ENCLAVE_BACKEND"
BACKENDS = ("local", "nitro")


def backend(name: str | None = None) -> str:
    """The enclave backend: name if given, else $ENCLAVE_BACKEND, else "local" (the embedded default)."""
    chosen = name or os.environ.get(ENV_BACKEND) or "local"
    if chosen not in BACKENDS:
        from .errors import EnclaveError

        source = "backend" if name else f"${ENV_BACKEND}"
        raise EnclaveError(
            f'unknown enclave backend {chosen!r} (from {source}): use "local" (the default, no Nitro hardware) '
            'or "nitro" (a Nitro parent instance with nitro-cli)'
        )
    return chosen


def resolve_endpoint(endpoint: str | None = None, *, cid: int | None = None, port: int | None = None) -> str:
    """Where the enclave server listens: an explicit endpoint, $ENCLAVE_ENDPOINT, a CID, or discovery."""
    if endpoint:
        return endpoint
    if os.environ.get(ENV_ENDPOINT):
        return os.environ[ENV_ENDPOINT]
    port = port or DEFAULT_SERVER_PORT
    if cid is not None:
        return f"vsock://{cid}:{port}"
    if backend() == "nitro":
        # Lazy: runtime imports this module. The one RUNNING enclave of `nitro-cli describe-enclaves`.
        from .runtime import NitroRuntime, discover_endpoint

        return discover_endpoint(NitroRuntime(port=port))
    if backend() == "local":
        # Lazy: the local backend's state directory names its running enclaves.
        from ...enclave_local.runtime import discover_local_endpoint

        return discover_local_endpoint()
    from .errors import EnclaveError

    raise EnclaveError(
        "no enclave given: pass --endpoint unix:///PATH or vsock://CID:PORT, --cid, or set ENCLAVE_ENDPOINT"
    )
