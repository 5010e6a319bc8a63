"""Errors shared by the library, the CLI, the modules and the enclave server.

Every error says what happened and what to do about it; the CLI prints
str(error) and exits non-zero, modules pass it to fail_json.
"""

import errno


class EnclaveError(Exception):
    """Base class for every error this project raises on purpose."""


class PackageError(EnclaveError):
    """A package could not be sealed, read or opened (tampered, truncated, wrong key, hostile archive)."""


class AttestationError(EnclaveError):
    """An attestation document is malformed, unsigned, untrusted, stale or has unexpected PCRs."""


class PolicyError(EnclaveError):
    """A key policy is malformed or unsound."""


class KmsError(EnclaveError):
    """A KMS call failed in a way the caller should see (wraps botocore's ClientError)."""


class WireError(EnclaveError):
    """The wire protocol failed: bad frames, closed connections, timeouts."""


class ProtocolError(WireError):
    """The peer broke the protocol (malformed or oversized frame, bad handshake)."""


class FrameTooLarge(WireError):
    """A message would exceed the peer's frame limit; nothing was sent."""

    errno = errno.EMSGSIZE

    def __init__(self, message: str, size: int, limit: int):
        super().__init__(message)
        self.size = size
        self.limit = limit


class ConnectionClosed(WireError, ConnectionError):
    """The connection is gone; every pending and later call on it fails with this."""


class CallTimeout(WireError, TimeoutError):
    """No reply within the caller's timeout."""


class RemoteError(EnclaveError, OSError):
    """The server answered a request with an error: .errno, .strerror (its message), .name, .op."""

    def __init__(self, code: int, message: str, *, name: str | None = None, op: str | None = None):
        super().__init__(code, message)
        self.name = name or errno.errorcode.get(code, "EIO")
        self.op = op

    def __str__(self):
        return f"{self.op}: {self.strerror} ({self.name})"
