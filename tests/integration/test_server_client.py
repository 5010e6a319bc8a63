"""The real enclave server (a subprocess on a unix socket) driven by the real `enclave` CLI.

The owner's key is released through the local KMS only to the simulated NSM's
attestation of the expected PCR0; the CLI pushes data, runs the owner's script,
streams its output and pulls the results.
"""

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient, host_kms_settings
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.wire import Connection

ENCLAVE = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main"]


def cli(*args, check=True):
    result = subprocess.run([*ENCLAVE, *args], capture_output=True, text=True, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_push_run_pull_through_the_cli(enclave):
    tmp = enclave["tmp"]
    dataset = tmp / "dataset"
    dataset.mkdir()
    (dataset / "a.txt").write_text("hi")
    (dataset / "b.txt").write_text("a much longer text")
    pcr0 = enclave["pcr0"]

    assert "enclave attested" in cli("attest", "--expect-pcr0", pcr0).stdout
    pushed = json.loads(
        cli("push", str(enclave["sealed"].parent), "/encrypted", "--expect-pcr0", pcr0, "--json").stdout
    )
    assert pushed["changed"] == ["app.pkg"]
    assert "pushed a.txt" in cli("push", str(dataset), "/dataset", "--expect-pcr0", pcr0).stdout
    again = json.loads(cli("push", str(dataset), "/dataset", "--json").stdout)
    assert again["changed"] == [] and again["unchanged"] == 2

    run = cli("run", "-f", "app.pkg", "-s", "ml_algorithm.py", "-a", "-m model.h5 -d /dataset/ -o /output/",
              "--expect-pcr0", pcr0)  # fmt: skip
    assert "classified a.txt short" in run.stdout and "classified b.txt long" in run.stdout
    assert "done" in run.stderr and "output /output/results.csv" in run.stderr

    out = tmp / "results"
    assert "pulled results.csv" in cli("pull", "/output", str(out)).stdout
    assert (out / "results.csv").read_text() == "a.txt,short\nb.txt,long\n"
    assert list(enclave["work"].iterdir()) == []  # no plaintext left behind


def test_wrong_measurement_gets_nothing_sent(enclave, tmp_path):
    data = tmp_path / "secret-data"
    data.mkdir()
    (data / "x").write_text("user's data")
    result = cli("push", str(data), "/dataset", "--expect-pcr0", "ab" * 48, check=False)
    assert result.returncode == 1
    assert "failed attestation, nothing was sent" in result.stderr
    with EnclaveClient(f"unix://{enclave['sock']}") as client:
        assert client.call("share.list", {"path": "/dataset"}) == []


def test_script_exit_status_becomes_the_cli_exit_status(enclave):
    cli("push", str(enclave["sealed"].parent), "/encrypted")
    result = cli("run", "-f", "app.pkg", "-s", "ml_algorithm.py", "-a", "-m missing -d /dataset -o /output",
                 check=False)  # fmt: skip
    assert result.returncode == 1
    assert "FileNotFoundError" in result.stderr


def test_push_cannot_escape_the_share(enclave, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "x").write_text("x")
    os.symlink("/etc/passwd", data / "link")  # local links are not followed either
    result = cli("push", str(data), "/dataset/../../etc", check=False)
    assert result.returncode == 1 and "'..'" in result.stderr
    pushed = json.loads(cli("push", str(data), "/dataset", "--json").stdout)
    assert pushed["changed"] == ["x"]


def read_until_closed(raw: socket.socket) -> bytes:
    """What the server says before it closes the connection (it must close it, not hang)."""
    raw.settimeout(10)
    data = b""
    try:
        while chunk := raw.recv(1 << 16):
            data += chunk
    except ConnectionResetError:  # closed with our bytes still unread: closed all the same
        pass
    return data


def test_hostile_frames_close_only_their_connection(enclave):
    sock_path = str(enclave["sock"])
    with EnclaveClient(f"unix://{sock_path}") as good:
        for hostile in (struct.pack(">I", 0xFFFFFFFF), b"GET / HTTP/1.0\r\n\r\n" * 10, os.urandom(4096)):
            with socket.socket(socket.AF_UNIX) as raw:
                raw.connect(sock_path)
                raw.sendall(hostile)
                read_until_closed(raw)
        assert good.call("health")["server"]  # the well-behaved connection is still served
    assert enclave["server"].poll() is None


def test_client_that_disconnects_mid_job_stops_the_job(enclave):
    cli("push", str(enclave["sealed"].parent), "/encrypted")
    conn = Connection.open(f"unix://{enclave['sock']}")
    events = []
    request = {"package": "/encrypted/app.pkg", "script": "spin.py", "args": [], "kms": host_kms_settings()}
    call = conn.submit("job.run", request, on_event=events.append)
    deadline = time.time() + 30
    while not any(e.get("type") == "stdout" for e in events):
        with contextlib.suppress(TimeoutError):
            call.result(timeout=0.1)
        assert time.time() < deadline, "the job never started"
    conn.close()  # the client vanishes mid-job
    with EnclaveClient(f"unix://{enclave['sock']}") as client:
        while client.call("health")["job"] is not None:
            assert time.time() < deadline + 30, "the job outlived its client"
            time.sleep(0.05)
    assert list(enclave["work"].iterdir()) == []  # the plaintext is gone
    result = cli("run", "-f", "app.pkg", "-s", "ml_algorithm.py", "-a", "-m model.h5 -d /dataset -o /output")
    assert result.returncode == 0


def test_client_refuses_unverifiable_enclave(enclave):
    with pytest.raises(EnclaveError):
        EnclaveClient(f"unix://{enclave['sock']}", expect_pcr0=enclave["pcr0"], trusted_roots=[])


def test_receipt_proves_what_ran_and_what_it_produced(enclave, tmp_path):
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.package import read_header

    header = read_header(enclave["sealed"])
    release = {
        "allowed_pcr0": [enclave["pcr0"]],
        "packages": [{"name": "app", "version": "1.0", "manifest_digest": header.manifest_digest.hex()}],
    }
    (tmp_path / "release.json").write_text(json.dumps(release))
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("some input")
    cli("push", str(enclave["sealed"].parent), "/encrypted")
    cli("push", str(data), "/dataset")
    receipt_file = tmp_path / "receipt.json"
    cli("run", "-f", "app.pkg", "-s", "ml_algorithm.py", "-a", "-m model.h5 -d /dataset -o /output",
        "--receipt", str(receipt_file))  # fmt: skip
    outputs = tmp_path / "out"
    cli("pull", "/output", str(outputs))

    verify = ["receipt", "verify", str(receipt_file), "--release", str(tmp_path / "release.json")]
    proof = json.loads(cli(*verify, "--outputs", str(outputs), "--json").stdout)
    assert proof["pcr0"] == enclave["pcr0"] and proof["package"] == "app 1.0" and proof["rc"] == 0
    assert proof["args"] == ["-m", "model.h5", "-d", "/dataset", "-o", "/output"] and proof["inputs"] == 1
    assert proof["outputs_checked"] == [str(outputs / "results.csv")]

    # An edited output, an edited summary, or another release: each is refused, naming what is wrong.
    (outputs / "results.csv").write_text("a.txt,short\n")  # the enclave said long
    result = cli(*verify, "--outputs", str(outputs), check=False)
    assert result.returncode == 1 and "differs from the /output/results.csv" in result.stderr
    forged = json.loads(receipt_file.read_text())
    forged["summary"]["rc"] = 0 if forged["summary"]["rc"] else 1
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    result = cli("receipt", "verify", str(tmp_path / "forged.json"), "--release", str(tmp_path / "release.json"),
                 check=False)  # fmt: skip
    assert result.returncode == 1 and "receipt was edited" in result.stderr
    release["packages"][0]["manifest_digest"] = "00" * 32
    (tmp_path / "release.json").write_text(json.dumps(release))
    result = cli(*verify, check=False)
    assert result.returncode == 1 and "not in this release" in result.stderr


def test_client_that_disconnects_mid_write_leaves_the_share_consistent(enclave):
    from ansible_collections.confidential_ml.nitro.plugins.module_utils import wire

    with EnclaveClient(enclave["endpoint"]) as client:
        client.call("share.create", {"path": "/dataset/f.bin"})
        client.call("share.write", {"path": "/dataset/f.bin", "offset": 0, "data": b"a" * 1000})
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(enclave["sock"]))
        wire.send_frame(raw, {"hello": wire.PROTOCOL, "versions": [1], "max_frame": wire.MAX_FRAME}, wire.MIN_FRAME)
        assert wire.recv_frame(raw)["version"] == 1
        write = {"path": "/dataset/f.bin", "offset": 0, "data": b"b" * (1 << 20)}
        frame = wire.encode({"id": 1, "op": "share.write", "args": write})
        raw.sendall(wire.HEADER.pack(len(frame)) + frame[: len(frame) // 2])  # half a frame, then gone
    with EnclaveClient(enclave["endpoint"]) as client:
        assert client.call("share.read", {"path": "/dataset/f.bin", "offset": 0, "size": 1 << 20}) == b"a" * 1000
        assert client.call("health")["job"] is None


def test_push_sends_small_files_with_their_create(enclave, tmp_path):
    src = tmp_path / "small"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(os.urandom(100 * i))
    (src / "big").write_bytes(os.urandom((1 << 20) + 5))
    with EnclaveClient(enclave["endpoint"]) as client:
        client.call("share.mkdir", {"path": "/dataset/small"})
        assert sorted(client.push(src, "/dataset/small")["changed"]) == ["big"] + [f"f{i}" for i in range(5)]
        assert client.push(src, "/dataset/small")["changed"] == []
        st = client.call("share.create", {"path": "/dataset/small/one", "mode": 0o600, "data": b"one call"})
        assert st["size"] == 8 and client.call("share.read", {"path": "/dataset/small/one", "offset": 0,
                                                              "size": 100}) == b"one call"  # fmt: skip


def test_push_to_a_server_whose_create_takes_no_data(tmp_path):
    """An older enclave image ignores create's data and answers None: push writes the data after all."""
    from ansible_collections.confidential_ml.nitro.plugins.module_utils import wire
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.endpoints import Endpoint

    files: dict[str, bytearray] = {}

    def create(args, ctx):
        files[args["path"]] = bytearray()

    def write(args, ctx):
        data = files[args["path"]]
        data[args["offset"] : args["offset"] + len(args["data"])] = args["data"]
        return len(args["data"])

    handlers = {"share.manifest": lambda a, c: [], "share.create": create, "share.write": write,
                "share.mkdir": lambda a, c: None}  # fmt: skip
    endpoint = Endpoint.unix(str(tmp_path / "old.sock"))
    server = wire.Server(endpoint.listen(), handlers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    src = tmp_path / "src"
    src.mkdir()
    payload = {"a": os.urandom(10), "b": os.urandom((2 << 20) + 3), "c": b""}
    for name, data in payload.items():
        (src / name).write_bytes(data)
    try:
        with EnclaveClient(str(endpoint)) as client:
            client.push(src, "/dataset")
    finally:
        server.shutdown()
        thread.join()
    assert {path: bytes(data) for path, data in files.items()} == {f"/dataset/{k}": v for k, v in payload.items()}


def test_a_second_run_needs_the_outputs_pulled_and_cleared(enclave, tmp_path):
    """Outputs are never removed unasked: a rerun over /output fails, naming what is there and the fix."""
    cli("push", str(enclave["sealed"].parent), "/encrypted")
    args = ("run", "-f", "app.pkg", "-s", "ml_algorithm.py", "-a", "-m model.h5 -d /dataset -o /output")
    cli(*args)
    again = cli(*args, check=False)
    assert again.returncode != 0
    assert "/output holds 1 entries from before (results.csv)" in again.stderr and "--clear-output" in again.stderr
    cli("pull", "/output", str(tmp_path / "first"))
    receipt_path = tmp_path / "receipt.json"
    cli(*args, "--clear-output", "--receipt", str(receipt_path))
    outputs = json.loads(receipt_path.read_text())["summary"]["outputs"]
    assert [o["path"] for o in outputs] == ["/output/results.csv"]
