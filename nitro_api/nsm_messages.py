"""The NSM's messages and limits, as both the enclave's NSM client (enclave_server/nsm.py)
and the local backend's simulated NSM (enclave_local/nsm_sim.py, nsm_service.py) speak them.

Requests are serde's externally tagged enums in CBOR, as in aws-nitro-enclaves-nsm-api;
the limits are the kernel driver's (include/uapi/linux/nsm.h) and the NSM's own.
"""

from __future__ import annotations

import struct
from typing import Any

from ..plugins.module_utils.errors import AttestationError, EnclaveError

# Sizes from the kernel's include/uapi/linux/nsm.h.
NSM_REQUEST_MAX_SIZE = 0x1000
NSM_RESPONSE_MAX_SIZE = 0x3000
# The NSM refuses larger attestation inputs with "InputTooLarge".
MAX_ATTESTATION_INPUT = 1024
PCR_COUNT = 32
# The local backend carries each raw request and answer over a Unix socket as a 4-byte
# big-endian length and the bytes (enclave_server/nsm.py NsmSocket, enclave_local/nsm_service.py).
NSM_SOCKET_FRAME = struct.Struct(">I")


def _check_input(name: str, value: bytes | None) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, bytes | bytearray | memoryview):
        raise AttestationError(f"{name} must be bytes, not {type(value).__name__}: pass raw bytes or None")
    value = bytes(value)
    if len(value) > MAX_ATTESTATION_INPUT:
        raise AttestationError(
            f"{name} is {len(value)} bytes; the NSM accepts at most {MAX_ATTESTATION_INPUT}: "
            "pass a digest of the data instead of the data itself"
        )
    return value


def check_pcr_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < PCR_COUNT:
        raise EnclaveError(f"PCR index {index!r} is out of range: the NSM has PCRs 0 to {PCR_COUNT - 1}")
    return index


def attestation_request(
    *, user_data: bytes | None = None, nonce: bytes | None = None, public_key: bytes | None = None
) -> dict[str, Any]:
    return {
        "Attestation": {
            "user_data": _check_input("user_data", user_data),
            "nonce": _check_input("nonce", nonce),
            "public_key": _check_input("public_key", public_key),
        }
    }
