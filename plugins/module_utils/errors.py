"""Errors shared by the library, the CLI, the modules and the enclave server.

Every error says what happened and what to do about it; the CLI prints
str(error) and exits non-zero, modules pass it to fail_json.
"""


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
