"""The /dev/nsm client, driven through a fake device that does what the kernel driver does.

The fake driver is handed the same ``struct nsm_raw`` the kernel gets: it
reads the two iovecs out of that memory, reads the request through its
pointer, answers with the simulated NSM's wire protocol, writes the answer
through the response pointer and stores its length back into the struct.
"""

import ctypes
import errno
import os
import struct

import cbor2
import pytest

from ansible_collections.confidential_ml.nitro.enclave_local.nsm_sim import LocalCA, SimulatedNsm
from ansible_collections.confidential_ml.nitro.enclave_server.nsm import (
    NSM_IOCTL_RAW,
    NSM_RESPONSE_MAX_SIZE,
    NsmDevice,
    NsmMessage,
    decode_response,
)
from ansible_collections.confidential_ml.nitro.plugins.module_utils.attestation import verify_document
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import AttestationError, EnclaveError

PCR0 = bytes.fromhex("5e" * 48)
PCR1 = bytes.fromhex("6f" * 48)


class FakeNsmDriver:
    """An ioctl(fd, request, arg) that serves ``struct nsm_raw`` like drivers/misc/nsm.c."""

    def __init__(self, device_path, handler):
        self.device_ino = os.stat(device_path).st_ino
        self.handler = handler
        self.requests = []

    def __call__(self, fd, request, arg, mutate_flag=True):
        if os.fstat(fd).st_ino != self.device_ino:  # raises EBADF on a closed fd, as the kernel would
            raise OSError(errno.EBADF, "not the NSM device")
        if request != NSM_IOCTL_RAW:
            raise OSError(errno.ENOTTY, "inappropriate ioctl for device")
        raw = (ctypes.c_ubyte * 32).from_buffer(arg)  # the caller's struct nsm_raw, as memory
        request_addr, request_len, response_addr, response_cap = struct.unpack_from("=QQQQ", raw)
        request_bytes = ctypes.string_at(request_addr, request_len)
        self.requests.append(cbor2.loads(request_bytes))
        answer = self.handler(request_bytes)
        if len(answer) > response_cap:
            raise OSError(errno.EMSGSIZE, "response buffer too small")
        ctypes.memmove(response_addr, answer, len(answer))
        struct.pack_into("=Q", raw, 24, len(answer))  # response.len
        return 0


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return LocalCA.load_or_create(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def sim(ca):
    return SimulatedNsm(ca, {0: PCR0, 1: PCR1})


@pytest.fixture
def device_path(tmp_path):
    path = tmp_path / "nsm"
    path.write_bytes(b"")
    return str(path)


@pytest.fixture
def driver(device_path, sim):
    return FakeNsmDriver(device_path, sim.handle)


@pytest.fixture
def device(device_path, driver):
    with NsmDevice(device_path, ioctl=driver) as dev:
        yield dev


def test_ioctl_number_matches_the_kernel_header():
    # include/uapi/linux/nsm.h: _IOWR(0x0A, 0, struct nsm_raw), two 16-byte iovecs.
    assert ctypes.sizeof(NsmMessage) == 32
    assert NSM_IOCTL_RAW == 0xC0200A00


def test_attestation_through_the_ioctl_verifies(device, driver, ca):
    document = device.attest(user_data=b"job", nonce=b"fresh-nonce", public_key=b"rsa-public-key")
    assert driver.requests == [
        {"Attestation": {"user_data": b"job", "nonce": b"fresh-nonce", "public_key": b"rsa-public-key"}}
    ]
    doc = verify_document(document, trusted_roots=[ca.root_certificate], expected_pcrs={0: PCR0}, nonce=b"fresh-nonce")
    assert (doc.user_data, doc.public_key, doc.pcrs[1]) == (b"job", b"rsa-public-key", PCR1)


def test_attestation_without_inputs_sends_nulls(device, driver, ca):
    doc = verify_document(device.attest(), trusted_roots=[ca.root_certificate])
    assert driver.requests == [{"Attestation": {"user_data": None, "nonce": None, "public_key": None}}]
    assert (doc.user_data, doc.nonce, doc.public_key) == (None, None, None)


def test_inputs_over_1024_bytes_are_refused_before_the_ioctl(device, driver):
    device.attest(user_data=b"u" * 1024)
    with pytest.raises(AttestationError, match="at most 1024"):
        device.attest(public_key=b"k" * 1025)
    assert len(driver.requests) == 1


def test_describe_pcr(device, driver):
    assert device.describe_pcr(0) == (True, PCR0)
    assert device.describe_pcr(31) == (False, bytes(48))
    assert driver.requests == [{"DescribePCR": {"index": 0}}, {"DescribePCR": {"index": 31}}]
    with pytest.raises(EnclaveError, match="0 to 31"):
        device.describe_pcr(32)


def test_get_random_loops_until_length(device, driver):
    data = device.get_random(1000)
    assert len(data) == 1000
    assert driver.requests == ["GetRandom"] * 4  # 256 bytes per answer
    assert device.get_random(0) == b""
    assert device.get_random(16) != device.get_random(16)


def test_nsm_error_answers_become_enclave_errors(device_path):
    answers = iter([{"Error": "InputTooLarge"}, {"Error": "InternalError"}, {"GetRandom": {"random": b""}}])
    driver = FakeNsmDriver(device_path, lambda request: cbor2.dumps(next(answers)))
    with NsmDevice(device_path, ioctl=driver) as device:
        with pytest.raises(EnclaveError, match="InputTooLarge.*1024 bytes"):
            device.attest(user_data=b"x")
        with pytest.raises(EnclaveError, match="InternalError"):
            device.describe_pcr(0)
        with pytest.raises(EnclaveError, match="no bytes"):
            device.get_random(8)


@pytest.mark.parametrize(
    "answer",
    [b"\xff\xfe", cbor2.dumps("Attestation"), cbor2.dumps({"Attestation": {"document": "text"}}), cbor2.dumps({})],
)
def test_malformed_answers_become_enclave_errors(device_path, answer):
    driver = FakeNsmDriver(device_path, lambda request: answer)
    with NsmDevice(device_path, ioctl=driver) as device, pytest.raises(EnclaveError, match="NSM"):
        device.attest()


def test_ioctl_failures_and_oversized_answers(device_path):
    too_big = FakeNsmDriver(device_path, lambda request: b"\x00" * (NSM_RESPONSE_MAX_SIZE + 1))
    with NsmDevice(device_path, ioctl=too_big) as dev, pytest.raises(EnclaveError, match="ioctl for Attestation"):
        dev.attest()

    def lying_driver(fd, request, arg, mutate_flag=True):
        struct.pack_into("=Q", (ctypes.c_ubyte * 32).from_buffer(arg), 24, NSM_RESPONSE_MAX_SIZE + 1)

    with NsmDevice(device_path, ioctl=lying_driver) as dev, pytest.raises(EnclaveError, match="byte answer"):
        dev.get_random()


def test_missing_device_and_closed_device(tmp_path, device_path, driver):
    with pytest.raises(EnclaveError, match="not run inside a Nitro Enclave"):
        NsmDevice(str(tmp_path / "no-such-nsm"))
    device = NsmDevice(device_path, ioctl=driver)
    fd = device._fd
    device.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor is really closed
    with pytest.raises(EnclaveError, match="closed"):
        device.attest()
    device.close()  # closing twice is harmless


def test_real_ioctl_on_a_plain_file_is_refused(device_path):
    # The default ioctl is the real one; a regular file is not an NSM.
    with NsmDevice(device_path) as device, pytest.raises(EnclaveError, match="ioctl"):
        device.describe_pcr(0)


@pytest.mark.parametrize(
    "request_obj,code",
    [
        ({"DescribePCR": {"index": 32}}, "InvalidIndex"),
        ({"DescribePCR": {"index": True}}, "InvalidIndex"),
        ({"Attestation": {"nonce": b"n" * 1025}}, "InputTooLarge"),
        ({"Attestation": {"nonce": "text"}}, "InvalidArgument"),
        ({"ExtendPCR": {"index": 16, "data": b"x"}}, "InvalidOperation"),
        ("Unknown", "InvalidOperation"),
    ],
)
def test_simulator_wire_protocol_errors(sim, request_obj, code):
    assert cbor2.loads(sim.handle(cbor2.dumps(request_obj))) == {"Error": code}
    with pytest.raises(EnclaveError, match=code):
        decode_response(sim.handle(cbor2.dumps(request_obj)), "DescribePCR")


def test_simulator_answers_garbage_with_invalid_argument(sim):
    assert cbor2.loads(sim.handle(b"\xff")) == {"Error": "InvalidArgument"}
