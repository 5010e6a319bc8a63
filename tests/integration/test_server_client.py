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
import threading
import time

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient, host_kms_settings
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.wire_client import Connection
from ansible_collections.confidential_ml.nitro.tests.fixtures.served import cli


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
    # One summary line, not a line per file (issue 12).
    assert cli("push", str(dataset), "/dataset", "--expect-pcr0", pcr0).stdout.startswith(
        "pushed 2 changed files or folders (20 bytes), skipped 0 unchanged, in "
    )
    again = json.loads(cli("push", "--expect-pcr0", enclave["pcr0"], str(dataset), "/dataset", "--json").stdout)
    assert again["changed"] == [] and again["unchanged"] == 2

    run = cli("run", "-f", "app.pkg", "-s", "ml_algorithm.py", "-a", "-m model.h5 -d /dataset/ -o /output/",
              "--expect-pcr0", pcr0)  # fmt: skip
    assert "classified a.txt short" in run.stdout and "classified b.txt long" in run.stdout
    assert "done" in run.stderr and "output /output/results.csv" in run.stderr

    out = tmp / "results"
    pulled = cli("pull", "--expect-pcr0", enclave["pcr0"], "/output", str(out)).stdout
    assert pulled.startswith("pulled 1 changed files or folders (23 bytes), skipped 0 unchanged, in ")
    assert pulled.count("\n") == 1
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
    cli("push", "--expect-pcr0", enclave["pcr0"], str(enclave["sealed"].parent), "/encrypted")
    result = cli("run", "--expect-pcr0", enclave["pcr0"], "-f", "app.pkg", "-s", "ml_algorithm.py",
                 "-a", "-m missing -d /dataset -o /output",
                 check=False)  # fmt: skip
    assert result.returncode == 1
    assert "FileNotFoundError" in result.stderr


def test_push_cannot_escape_the_share(enclave, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    (data / "x").write_text("x")
    os.symlink("/etc/passwd", data / "link")  # local links are not followed either
    result = cli("push", "--expect-pcr0", enclave["pcr0"], str(data), "/dataset/../../etc", check=False)
    assert result.returncode == 1 and "'..'" in result.stderr
    pushed = json.loads(cli("push", "--expect-pcr0", enclave["pcr0"], str(data), "/dataset", "--json").stdout)
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
    cli("push", "--expect-pcr0", enclave["pcr0"], str(enclave["sealed"].parent), "/encrypted")
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
    result = cli(
        "run",
        "--expect-pcr0",
        enclave["pcr0"],
        "-f",
        "app.pkg",
        "-s",
        "ml_algorithm.py",
        "-a",
        "-m model.h5 -d /dataset -o /output",
    )
    assert result.returncode == 0


def test_client_refuses_unverifiable_enclave(enclave):
    with pytest.raises(EnclaveError):
        EnclaveClient(f"unix://{enclave['sock']}", expect_pcr0=enclave["pcr0"], trusted_roots=[])


def test_receipt_proves_what_ran_and_what_it_produced(enclave, tmp_path):
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_format import read_header

    header = read_header(enclave["sealed"])
    release = {
        "allowed_pcr0": [enclave["pcr0"]],
        "packages": [{"name": "app", "version": "1.0", "manifest_digest": header.manifest_digest.hex()}],
    }
    (tmp_path / "release.json").write_text(json.dumps(release))
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("some input")
    cli("push", "--expect-pcr0", enclave["pcr0"], str(enclave["sealed"].parent), "/encrypted")
    cli("push", "--expect-pcr0", enclave["pcr0"], str(data), "/dataset")
    receipt_file = tmp_path / "receipt.json"
    cli("run", "--expect-pcr0", enclave["pcr0"], "-f", "app.pkg", "-s", "ml_algorithm.py",
        "-a", "-m model.h5 -d /dataset -o /output",
        "--receipt", str(receipt_file))  # fmt: skip
    outputs = tmp_path / "out"
    cli("pull", "--expect-pcr0", enclave["pcr0"], "/output", str(outputs))

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
    from ansible_collections.confidential_ml.nitro.plugins.module_utils import wire_codec, wire_frames

    with EnclaveClient(enclave["endpoint"]) as client:
        client.call("share.create", {"path": "/dataset/f.bin"})
        client.call("share.write", {"path": "/dataset/f.bin", "offset": 0, "data": b"a" * 1000})
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(enclave["sock"]))
        wire_frames.send_frame(
            raw,
            {"hello": wire_frames.PROTOCOL, "versions": [1], "max_frame": wire_frames.MAX_FRAME},
            wire_frames.MIN_FRAME,
        )
        assert wire_frames.recv_frame(raw)["version"] == 1
        write = {"path": "/dataset/f.bin", "offset": 0, "data": b"b" * (1 << 20)}
        frame = wire_codec.encode({"id": 1, "op": "share.write", "args": write})
        raw.sendall(wire_frames.HEADER.pack(len(frame)) + frame[: len(frame) // 2])  # half a frame, then gone
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
    from ansible_collections.confidential_ml.nitro.plugins.module_utils import wire_server
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
    server = wire_server.Server(endpoint.listen(), handlers)
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
    attested = ("--expect-pcr0", enclave["pcr0"])
    cli("push", str(enclave["sealed"].parent), "/encrypted", *attested)
    args = ("run", "-f", "app.pkg", "-s", "ml_algorithm.py", "-a", "-m model.h5 -d /dataset -o /output", *attested)
    cli(*args)
    again = cli(*args, check=False)
    assert again.returncode != 0
    assert "/output holds 1 entries from before (results.csv)" in again.stderr and "--clear-output" in again.stderr
    cli("pull", "/output", str(tmp_path / "first"), *attested)
    receipt_path = tmp_path / "receipt.json"
    cli(*args, "--clear-output", "--receipt", str(receipt_path))
    outputs = json.loads(receipt_path.read_text())["summary"]["outputs"]
    assert [o["path"] for o in outputs] == ["/output/results.csv"]


def test_no_data_goes_to_an_enclave_without_attestation_unless_the_user_says_so(enclave, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x").write_text("user's data")
    for command in (["push", str(data), "/dataset"], ["pull", "/output", str(tmp_path / "out")],
                    ["run", "-f", "app.pkg", "-s", "ml_algorithm.py"]):  # fmt: skip
        refused = cli(*command, check=False)
        assert refused.returncode == 1, command
        assert "refusing to send anything to an enclave that has not proven its image" in refused.stderr
        assert "--expect-pcr0 HEX" in refused.stderr and "--release release.json" in refused.stderr
        assert "--no-attestation" in refused.stderr
        empty = cli(*command, "--expect-pcr0", "", check=False)
        assert empty.returncode == 1 and "--expect-pcr0 is empty" in empty.stderr, command
    assert not (tmp_path / "out").exists()
    with EnclaveClient(f"unix://{enclave['sock']}") as client:
        assert client.call("share.list", {"path": "/dataset"}) == []
    # Saying so sends without attestation.
    assert "pushed 1 changed" in cli("push", str(data), "/dataset", "--no-attestation").stdout
    both = cli("push", str(data), "/dataset", "--no-attestation", "--expect-pcr0", enclave["pcr0"], check=False)
    assert both.returncode == 1 and "contradicts" in both.stderr


def test_release_manifest_names_the_pcr0(enclave, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x").write_text("user's data")
    release = tmp_path / "release.json"
    release.write_text(json.dumps({"format": 1, "image": {"file": "enclave.eif", "measurements": {"pcr0": "ab" * 48}}}))
    other = cli("push", str(data), "/dataset", "--release", str(release), check=False)
    assert other.returncode == 1 and "failed attestation, nothing was sent" in other.stderr
    release.write_text(json.dumps({"image": {"measurements": {"pcr0": enclave["pcr0"].upper()}}}))
    assert "pushed 1 changed" in cli("push", str(data), "/dataset", "--release", str(release)).stdout
    attested = json.loads(cli("attest", "--release", str(release), "--json").stdout)
    assert attested["pcrs"]["0"] == enclave["pcr0"]
    release.write_text(json.dumps({"packages": []}))
    broken = cli("push", str(data), "/dataset", "--release", str(release), check=False)
    assert broken.returncode == 1 and "has no image.measurements.pcr0" in broken.stderr


def test_pull_of_a_name_of_255_bytes(enclave, tmp_path):
    name = "n" * 251 + ".csv"
    with EnclaveClient(f"unix://{enclave['sock']}", expect_pcr0=enclave["pcr0"]) as client:
        client.call("share.create", {"path": f"/output/{name}", "mode": 0o644, "data": b"a,b\n"})
        pulled = client.pull("/output", tmp_path / "out")
    assert pulled["changed"] == [name]
    assert (tmp_path / "out" / name).read_bytes() == b"a,b\n"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]  # no temporary file left


def test_a_client_that_does_not_read_cannot_delay_attestation(enclave):
    """16 x 1 MiB reads never read back: another client still attests. The stalled client never reads, so a
    server that made the other wait on it would wait for ever: the client's 10 s call timeout fails the test
    then, without timing what is only a matter of correctness."""
    from ansible_collections.confidential_ml.nitro.plugins.module_utils import wire_frames

    sock_path = f"unix://{enclave['sock']}"
    with EnclaveClient(sock_path, expect_pcr0=enclave["pcr0"]) as client:
        client.call("share.create", {"path": "/dataset/big", "mode": 0o644, "data": b"\x05" * (1 << 20)})
    with socket.socket(socket.AF_UNIX) as stalled:
        stalled.connect(str(enclave["sock"]))
        wire_frames.send_frame(
            stalled, {"hello": wire_frames.PROTOCOL, "versions": [1], "max_frame": wire_frames.MAX_FRAME}
        )
        assert wire_frames.recv_frame(stalled)["version"] == 1
        read = {"path": "/dataset/big", "offset": 0, "size": 1 << 20}
        for rid in range(1, 17):
            wire_frames.send_frame(stalled, {"id": rid, "op": "share.read", "args": read})
        time.sleep(0.5)  # let the server take them in: today's server then has every worker stuck sending
        with EnclaveClient(sock_path, expect_pcr0=enclave["pcr0"], timeout=10) as other:
            assert other.attested.pcr_hex(0) == enclave["pcr0"]


def test_the_attestation_rule_every_front_end_follows(tmp_path):
    from ansible_collections.confidential_ml.nitro.cli import fusefs
    from ansible_collections.confidential_ml.nitro.plugins.module_utils import client as client_lib

    pcr0 = "AB" * 48
    assert client_lib.expected_pcr0(pcr0) == ["ab" * 48]
    assert client_lib.expected_pcr0([pcr0, "cd" * 48]) == ["ab" * 48, "cd" * 48]
    assert client_lib.expected_pcr0(no_attestation=True) is None
    release = tmp_path / "release.json"
    release.write_text(json.dumps({"image": {"measurements": {"pcr0": pcr0}}}))
    assert client_lib.expected_pcr0(release=release) == ["ab" * 48]
    for kwargs, words in (
        ({}, "has not proven its image"),
        ({"expect_pcr0": ""}, "--expect-pcr0 is empty"),
        ({"expect_pcr0": [""]}, "--expect-pcr0 is empty"),
        ({"expect_pcr0": []}, "--expect-pcr0 lists no PCR0"),
        ({"expect_pcr0": "abc"}, "is not 96 hex digits"),
        ({"release": ""}, "--release is empty"),
        ({"release": tmp_path / "missing.json"}, "cannot read the release manifest"),
        ({"expect_pcr0": pcr0, "release": release}, "not both"),
        ({"release": release, "no_attestation": True}, "contradicts"),
    ):
        with pytest.raises(EnclaveError, match=words):
            client_lib.expected_pcr0(**kwargs)
    # The library refuses an empty PCR0 too, rather than skipping the check.
    with pytest.raises(EnclaveError, match="expect_pcr0 is empty"):
        EnclaveClient("unix:///nowhere.sock", expect_pcr0=[])
    with pytest.raises(EnclaveError, match="expect_pcr0 is empty"):
        fusefs.mount("unix:///nowhere.sock", tmp_path / "mnt", expect_pcr0="")


def test_the_servers_memory_budget_follows_the_enclaves_memory(tmp_path):
    from ansible_collections.confidential_ml.nitro.enclave_server.server import buffer_budget
    from ansible_collections.confidential_ml.nitro.plugins.module_utils import wire_frames, wire_server

    def budget(mib):
        meminfo = tmp_path / f"meminfo-{mib}"
        meminfo.write_text(f"MemTotal:       {mib * 1024} kB\nMemFree:        1000 kB\n")
        return buffer_budget(str(meminfo))

    assert budget(16384) == wire_server.MAX_BUFFERED == 128 << 20
    assert budget(256) == 64 << 20  # a quarter of a 256 MiB enclave
    smallest = budget(64)  # the local runtime's smallest enclave: one 4 MiB frame each way still fits
    assert smallest == 4 * wire_server.Server.request_reservation(wire_frames.MAX_FRAME, wire_frames.MAX_FRAME)
    assert buffer_budget(str(tmp_path / "absent")) == wire_server.MAX_BUFFERED
