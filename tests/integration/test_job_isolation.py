"""A job's script is hostile to the server it runs beside: against a real server (the served enclave: the
real NSM service socket, the local KMS over HTTP), it tries what an exploited script would, as the job uid.
Also: a real KMS forwarder relays the server's connections and closes a job's."""

import json
import os
import socket
import textwrap
import threading

import boto3
import pytest

from ansible_collections.confidential_ml.nitro.enclave_server import kms_forwarder
from ansible_collections.confidential_ml.nitro.plugins.module_utils import attestation, package_seal, receipt
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient, host_kms_settings
from ansible_collections.confidential_ml.nitro.plugins.module_utils.endpoints import Endpoint
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError
from ansible_collections.confidential_ml.nitro.tests.fixtures.served import JOB_UID

pytestmark = pytest.mark.skipif(JOB_UID is None, reason="jobs run under their own uid only when the server is root")

HOSTILE = """
    import os, socket, sys
    where = dict(arg.split(":", 1) for arg in sys.argv[1:])

    def attempt(name, action):
        try:
            action()
            print(name, "DONE", flush=True)
        except OSError as err:
            print(name, "denied", err.errno, flush=True)

    def nsm():
        socket.socket(socket.AF_UNIX).connect(where["nsm"])

    def server_socket():
        socket.socket(socket.AF_UNIX).connect(where["sock"])

    def move_socket():
        os.rename(where["sock"], where["sock"] + ".moved")

    def impostor():
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(where["sock"] + ".impostor")
        listener.listen(1)

    def memory():
        with open(f"/proc/{where['server']}/mem", "rb") as f:
            f.read(1)

    def kms():
        with socket.create_connection(("127.0.0.1", int(where["kms"])), timeout=10) as conn:
            conn.sendall(b"ping")
            if conn.recv(4) != b"ping":
                raise ConnectionResetError(104, "closed without an answer")

    for name, action in [("nsm", nsm), ("server-socket", server_socket), ("move-socket", move_socket),
                         ("impostor", impostor), ("memory", memory), ("kms", kms)]:
        attempt(name, action)
"""


@pytest.fixture
def forwarder(tmp_path):
    """A real KMS forwarder on loopback whose upstream (a unix socket, as the parent's proxy is) echoes."""
    upstream = socket.socket(socket.AF_UNIX)
    upstream.bind(str(tmp_path / "3_8000.sock"))
    upstream.listen(8)

    def echo():
        while True:
            try:
                conn = upstream.accept()[0]
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = kms_forwarder.start(Endpoint.parse(f"unix://{tmp_path / '3_8000.sock'}"), port=port)
    yield port
    relay.stop()
    upstream.close()


def seal_probe(enclave, tmp_path) -> None:
    src = tmp_path / "hostile"
    src.mkdir()
    (src / "hostile.py").write_text(textwrap.dedent(HOSTILE))
    owner = boto3.client("kms", endpoint_url=enclave["kms_url"], region_name="us-east-1",
                         **enclave["kms"].credentials("owner"))  # fmt: skip
    sealed = tmp_path / "hostile.pkg"
    package_seal.seal(src, sealed, kms_client=owner, key_id=enclave["key_id"], name="hostile", version="1")
    with EnclaveClient(enclave["endpoint"]) as client:
        client.call("share.create", {"path": "/encrypted/hostile.pkg", "data": sealed.read_bytes()})


def test_a_job_reaches_neither_the_nsm_nor_kms_nor_the_server(enclave, forwarder, tmp_path):
    seal_probe(enclave, tmp_path)
    # The server's own uid is relayed: the forwarder works for it.
    with socket.create_connection(("127.0.0.1", forwarder), timeout=10) as conn:
        conn.sendall(b"ping")
        assert conn.recv(4) == b"ping"
    where = {"nsm": enclave["nsm"], "sock": enclave["sock"], "server": enclave["server"].pid, "kms": forwarder}
    out = bytearray()
    with EnclaveClient(enclave["endpoint"]) as client:
        summary = client.run(
            "hostile.pkg", "hostile.py", [f"{k}:{v}" for k, v in where.items()], kms=host_kms_settings(),
            on_output=lambda name, data: out.extend(data),
        )  # fmt: skip
    text = out.decode()
    assert summary["rc"] == 0, text
    for name in ("nsm", "server-socket", "move-socket", "impostor", "memory", "kms"):
        assert f"{name} denied" in text, text
    assert "DONE" not in text
    # The server's socket is its own still, and answers with the real NSM.
    assert not os.path.exists(f"{enclave['sock']}.moved") and not os.path.exists(f"{enclave['sock']}.impostor")
    with EnclaveClient(enclave["endpoint"]) as client:
        assert client.call("health", {})["job"] is None


def test_attest_cannot_sign_a_receipt(enclave):
    """The host asks the NSM, through `attest`, to sign what a receipt would carry: it gets the bytes signed
    only inside the attest domain, and no receipt built from that document verifies."""
    summary = {"package_digest": "00" * 32, "script": "made_up.py", "args": [], "rc": 0, "outputs": []}
    with EnclaveClient(enclave["endpoint"]) as client:
        document = client.call("attest", {"user_data": receipt.job_digest(summary)})["document"]
    assert attestation.parse_document(document).user_data == receipt.ATTEST_DOMAIN + receipt.job_digest(summary)
    forged = receipt.Receipt(summary, document)
    release = {
        "allowed_pcr0": [enclave["pcr0"]],
        "packages": [{"manifest_digest": "00" * 32, "name": "x", "version": "1"}],
    }
    ca_root = _local_root(enclave)
    with pytest.raises(EnclaveError, match="not a job receipt"):
        receipt.verify_receipt(forged, release=receipt.Release.from_dict(release), trusted_roots=[ca_root])


def _local_root(enclave):
    from ansible_collections.confidential_ml.nitro.enclave_local.nsm_sim import LocalCA

    return LocalCA.load_or_create(enclave["tmp"] / "home").root_certificate


def test_receipt_user_data_is_in_the_receipt_domain(enclave):
    """A real job's receipt verifies, and its user_data starts with the receipt domain."""
    with EnclaveClient(enclave["endpoint"]) as client:
        client.call("share.create", {"path": "/encrypted/app.pkg", "data": enclave["sealed"].read_bytes()})
        summary = client.run("app.pkg", "ml_algorithm.py", "-m model.h5 -d /dataset -o /output",
                             kms=host_kms_settings())  # fmt: skip
    signed = {k: v for k, v in summary.items() if k != "attestation"}
    doc = attestation.verify_document(
        summary["attestation"], trusted_roots=[_local_root(enclave)], expected_pcrs={0: [enclave["pcr0"]]},
        max_age_s=None,
    )  # fmt: skip
    assert doc.user_data.startswith(receipt.RECEIPT_DOMAIN)
    receipt.check_receipt_user_data(doc.user_data, signed)
    json.dumps(signed)  # the summary is plain data
