"""Client for the Nitro Secure Module (/dev/nsm) inside an AWS Nitro Enclave.

The NSM speaks CBOR through one ioctl: the caller hands the driver a
``struct nsm_raw`` holding two iovecs (request, response); the driver reads
the request through the first pointer, writes the answer through the second
and stores its length back into ``response.len``. Requests and answers are
serde's externally tagged enums, as in aws-nitro-enclaves-nsm-api:

    {"Attestation": {"user_data": b|None, "nonce": b|None, "public_key": b|None}}
        -> {"Attestation": {"document": b}}
    {"DescribePCR": {"index": n}}  -> {"DescribePCR": {"lock": bool, "data": b}}
    "GetRandom"                    -> {"GetRandom": {"random": b}}
    any                            -> {"Error": "InputTooLarge" | ...}

The simulated NSM of the local backend answers the same messages
(enclave_local/nsm_sim.py, SimulatedNsm.handle); the requests and limits both sides
need are in nitro_api/nsm_messages.py.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import cbor2

from ..nitro_api.nsm_messages import (
    MAX_ATTESTATION_INPUT,
    NSM_REQUEST_MAX_SIZE,
    NSM_RESPONSE_MAX_SIZE,
    NSM_SOCKET_FRAME,
    PCR_COUNT,
    attestation_request,
    check_pcr_index,
)
from ..plugins.module_utils.errors import EnclaveError

NSM_PATH = "/dev/nsm"
NSM_IOCTL_MAGIC = 0x0A

_ERROR_HINTS = {
    "InputTooLarge": f"user_data, nonce and public_key are limited to {MAX_ATTESTATION_INPUT} bytes each",
    "InvalidIndex": f"PCR indices run from 0 to {PCR_COUNT - 1}",
    "ReadOnlyIndex": "PCRs 0-15 are locked by the hypervisor and cannot be extended",
    "InvalidOperation": "the NSM does not know this request; check the NSM protocol version",
    "BufferTooSmall": f"the answer exceeded {NSM_RESPONSE_MAX_SIZE} bytes",
}


class NsmIoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class NsmMessage(ctypes.Structure):
    """``struct nsm_raw``: the request and response buffers handed to the driver."""

    _fields_ = [("request", NsmIoVec), ("response", NsmIoVec)]


def _iowr(magic: int, number: int, size: int) -> int:
    # Linux asm-generic/ioctl.h: dir(2 bits: read|write) | size(14) | type(8) | nr(8).
    return (3 << 30) | (size << 16) | (magic << 8) | number


# _IOWR(0x0A, 0, struct nsm_raw) == 0xC0200A00 on 64-bit Linux.
NSM_IOCTL_RAW = _iowr(NSM_IOCTL_MAGIC, 0, ctypes.sizeof(NsmMessage))


def decode_response(raw: bytes, operation: str) -> Mapping[str, Any]:
    """Decode an NSM answer to ``operation``; an {"Error": ...} answer raises EnclaveError."""
    try:
        answer = cbor2.loads(raw)
    except Exception as exc:  # cbor2 raises several types on hostile input
        raise EnclaveError(
            f"the NSM answered {operation} with undecodable CBOR ({exc}): the device is misbehaving"
        ) from exc
    if isinstance(answer, Mapping) and "Error" in answer:
        code = answer["Error"]
        hint = _ERROR_HINTS.get(code, "see the NSM error code in aws-nitro-enclaves-nsm-api")
        raise EnclaveError(f"the NSM refused {operation}: {code} ({hint})")
    body = answer.get(operation) if isinstance(answer, Mapping) else None
    if not isinstance(body, Mapping):
        raise EnclaveError(f"the NSM answered {operation} with {answer!r:.100}: expected a {{{operation!r}: ...}} map")
    return body


def _field(body: Mapping[str, Any], name: str, kind: type, operation: str) -> Any:
    value = body.get(name)
    if not isinstance(value, kind):
        raise EnclaveError(
            f"the NSM answered {operation} without a {kind.__name__} {name!r}: the device is misbehaving"
        )
    return value


class NsmDevice:
    """The real NSM, through /dev/nsm. Needs to run inside a Nitro Enclave."""

    def __init__(self, path: str = NSM_PATH, ioctl: Callable[..., Any] = fcntl.ioctl):
        self._ioctl = ioctl
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise EnclaveError(
                f"{path} does not exist: this process does not run inside a Nitro Enclave "
                "(use the local backend's simulated NSM outside one)"
            ) from exc
        except OSError as exc:
            raise EnclaveError(f"cannot open {path}: {exc.strerror}; run the enclave server as root") from exc

    def _call(self, request: Any, operation: str) -> Mapping[str, Any]:
        data = cbor2.dumps(request)
        if len(data) > NSM_REQUEST_MAX_SIZE:
            raise EnclaveError(f"the {operation} request is {len(data)} bytes, over the NSM's {NSM_REQUEST_MAX_SIZE}")
        return decode_response(self._exchange(data, operation), operation)

    def _exchange(self, data: bytes, operation: str) -> bytes:
        """Send one raw request, return the raw response: the ioctl here, a socket in NsmSocket."""
        if self._fd is None:
            raise EnclaveError(f"the NSM device {self.path} is closed: open a new NsmDevice")
        # Fresh buffers per call: no state is shared between threads.
        request_buf = ctypes.create_string_buffer(data, len(data))
        response_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
        message = NsmMessage(
            NsmIoVec(ctypes.addressof(request_buf), len(data)),
            NsmIoVec(ctypes.addressof(response_buf), NSM_RESPONSE_MAX_SIZE),
        )
        try:
            self._ioctl(self._fd, NSM_IOCTL_RAW, message)
        except OSError as exc:
            raise EnclaveError(f"the NSM ioctl for {operation} failed: {exc.strerror or exc}") from exc
        length = message.response.iov_len
        if length > NSM_RESPONSE_MAX_SIZE:
            raise EnclaveError(f"the NSM reported a {length}-byte answer for a {NSM_RESPONSE_MAX_SIZE}-byte buffer")
        return response_buf.raw[:length]

    def attest(
        self, *, user_data: bytes | None = None, nonce: bytes | None = None, public_key: bytes | None = None
    ) -> bytes:
        """Return the raw COSE_Sign1 attestation document binding the given values."""
        request = attestation_request(user_data=user_data, nonce=nonce, public_key=public_key)
        return _field(self._call(request, "Attestation"), "document", bytes, "Attestation")

    def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        body = self._call({"DescribePCR": {"index": check_pcr_index(index)}}, "DescribePCR")
        return _field(body, "lock", bool, "DescribePCR"), _field(body, "data", bytes, "DescribePCR")

    def get_random(self, length: int = 32) -> bytes:
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise EnclaveError(f"random length must be a non-negative int, not {length!r}")
        chunks = bytearray()
        while len(chunks) < length:
            chunk = _field(self._call("GetRandom", "GetRandom"), "random", bytes, "GetRandom")
            if not chunk:
                raise EnclaveError("the NSM answered GetRandom with no bytes: the device is misbehaving")
            chunks += chunk
        return bytes(chunks[:length])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> NsmDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class NsmSocket(NsmDevice):
    """The local backend's NSM: the same raw CBOR requests and responses as /dev/nsm,
    carried over a Unix socket to the simulated NSM that the local runtime holds
    (outside the enclave process, as the real NSM is outside the enclave's kernel).
    Each request is a 4-byte big-endian length and the request bytes; so is each answer."""

    def __init__(self, path: str, *, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self._fd = None

    def _exchange(self, data: bytes, operation: str) -> bytes:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.sendall(NSM_SOCKET_FRAME.pack(len(data)) + data)
                (length,) = NSM_SOCKET_FRAME.unpack(_recv_exactly(sock, NSM_SOCKET_FRAME.size))
                if length > NSM_RESPONSE_MAX_SIZE:
                    raise EnclaveError(f"the NSM at {self.path} announced a {length}-byte answer: it is misbehaving")
                return _recv_exactly(sock, length)
        except OSError as exc:
            raise EnclaveError(
                f"the simulated NSM at {self.path} did not answer {operation}: {exc.strerror or exc}; "
                "is the local runtime that launched this enclave still running?"
            ) from exc

    def close(self) -> None:
        pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EnclaveError("the NSM closed the connection mid-answer")
        buf += chunk
    return bytes(buf)
