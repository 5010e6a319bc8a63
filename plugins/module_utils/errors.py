"""Every error this project raises for a caller to catch: one hierarchy under EnclaveError.

Shared by the library, the CLI, the modules, the enclave server and the local backend
(module_utils imports nothing outside itself, so they all can import this). Every
error says what happened and what to do about it; the CLI prints str(error) and exits
non-zero, modules pass it to fail_json. Where callers rely on a builtin family too
(ConnectionError, TimeoutError, OSError, ValueError), the error derives from both.
Private control-flow exceptions that never leave their module stay there.
"""

from __future__ import annotations

import errno


class EnclaveError(Exception):
    """Base class for every error this project raises on purpose."""


class PackageError(EnclaveError):
    """A package could not be sealed, read or opened (tampered, truncated, wrong key, hostile archive)."""


class AttestationError(EnclaveError):
    """An attestation document is malformed, unsigned, untrusted, stale or has unexpected PCRs."""


class PolicyError(EnclaveError):
    """A key policy is malformed or unsound."""


class UnsoundPolicyError(PolicyError):
    """The policy that would be written fails lint; nothing was written. problems: lint's list; policy: that policy."""

    def __init__(self, key: str, problems: list[str], policy: dict):
        super().__init__(
            f"refusing to write an unsound key policy for {key}: {' '.join(problems)} Nothing was written; fix the"
            " statements named above."
        )
        self.problems, self.policy = problems, policy


class KmsError(EnclaveError):
    """A KMS call failed in a way the caller should see (wraps botocore's ClientError)."""


# --- the wire --------------------------------------------------------------------------------------


class WireError(EnclaveError):
    """The wire protocol failed: bad frames, closed connections, timeouts."""


class ProtocolError(WireError):
    """The peer broke the protocol (malformed or oversized frame, bad handshake)."""


class FrameTooLargeError(WireError):
    """A message would exceed the peer's frame limit; nothing was sent."""

    errno = errno.EMSGSIZE

    def __init__(self, message: str, size: int, limit: int):
        super().__init__(message)
        self.size = size
        self.limit = limit


class ConnectionClosedError(WireError, ConnectionError):
    """The connection is gone; every pending and later call on it fails with this."""


class CallTimeoutError(WireError, TimeoutError):
    """No reply within the caller's timeout."""


class RemoteError(EnclaveError, OSError):
    """The server answered a request with an error: .errno, .strerror (its message), .name, .op."""

    errno: int  # always given, where OSError's may be None

    def __init__(self, code: int, message: str, *, name: str | None = None, op: str | None = None):
        super().__init__(code, message)
        self.name = name or errno.errorcode.get(code, "EIO")
        self.op = op

    def __str__(self):
        return f"{self.op}: {self.strerror} ({self.name})"


# --- endpoints ------------------------------------------------------------------------------------


class EndpointError(EnclaveError, ValueError):
    """An endpoint is malformed, or cannot be listened on."""


class EndpointUnreachableError(EnclaveError, ConnectionError):
    """Nothing answers at an endpoint. .errno carries the socket error."""


# --- runtimes and images --------------------------------------------------------------------------


class EnclaveRuntimeError(EnclaveError):
    """A runtime operation failed. For nitro-cli failures: the command, its exit status, its
    output and the nitro-cli error code (E19, E26, ...) when it printed one."""

    def __init__(
        self,
        message: str,
        *,
        command: list[str] | None = None,
        returncode: int | None = None,
        stdout: str = "",
        stderr: str = "",
        code: str | None = None,
    ):
        super().__init__(message)
        self.command = command
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.code = code


class EnclaveNotFoundError(EnclaveRuntimeError):
    """No running enclave has the ID or name asked for."""


class ImageError(EnclaveError):
    """An image cannot be built, read, or run on this host."""


class BootError(EnclaveError):
    """A boot step failed: the enclave cannot serve."""


# --- owner identity and KMS -----------------------------------------------------------------------


class OwnerIdentityError(EnclaveError):
    """An owner identity file or signing key is unusable."""


class KmsCallError(KmsError):
    """A KMS call failed. ``code`` is KMS's error code (e.g. "AccessDeniedException"), None when botocore failed
    before KMS answered; ``__cause__`` is botocore's original exception, so a caller can still catch or inspect
    exactly what boto3 raised."""

    def __init__(self, message: str, *, code: str | None, operation: str):
        super().__init__(message)
        self.code = code
        self.operation = operation


class KmsApiError(KmsError):
    """An error answer of the KMS API: boto3 raises it as ClientError (or the modeled subclass) with ``code``."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


# --- the enclave server's jobs --------------------------------------------------------------------


class JobError(EnclaveError, OSError):
    """A job request that cannot run; carries an errno for the wire."""

    def __str__(self):
        # The message alone, as the wire sent it while JobError was a plain OSError (never "[Errno n] ...").
        return self.strerror or super().__str__()


# --- the local backend ----------------------------------------------------------------------------


class TlsError(EnclaveError):
    """The local TLS CA is unreadable or inconsistent."""


class VsockProxyError(EnclaveError):
    """The proxy's configuration is unreadable, or its destination is not allowed."""


# --- the CLI --------------------------------------------------------------------------------------


class StepFailedError(EnclaveError):
    """A step found something wrong; todo says what to do about it."""

    def __init__(self, message: str, todo: str):
        super().__init__(message)
        self.todo = todo
