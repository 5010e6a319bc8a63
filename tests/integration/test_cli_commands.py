"""The commands a user expects beside push, pull and run (issue 12), against a real served enclave:
`enclave status`, `enclave job cancel` from another terminal, `enclave share ls|rm`, a full share's answer."""

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient
from ansible_collections.confidential_ml.nitro.tests.fixtures.served import ENCLAVE, cli


def push_app(enclave):
    cli("push", str(enclave["sealed"].parent), "/encrypted", "--expect-pcr0", enclave["pcr0"])


def start_spinning(enclave) -> subprocess.Popen:
    """`enclave run` of spin.py in its own terminal, once the job prints."""
    proc = subprocess.Popen([*ENCLAVE, "run", "-f", "app.pkg", "-s", "spin.py", "--expect-pcr0", enclave["pcr0"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline() == "spinning\n", proc.stderr.read() if proc.poll() is not None else ""
    return proc


def test_status_shows_the_running_job_and_job_cancel_ends_it_from_another_terminal(enclave):
    push_app(enclave)
    idle = json.loads(cli("status", "--json").stdout)
    [seen] = [e for e in idle["enclaves"] if e["Endpoint"] == enclave["endpoint"]]
    assert seen["job"] is None and "error" not in seen
    assert "no job is running: nothing to cancel" in cli("job", "cancel").stdout  # nothing to stop: exit 0
    run = start_spinning(enclave)
    try:
        status = json.loads(cli("status", "--json").stdout)
        [seen] = [e for e in status["enclaves"] if e["Endpoint"] == enclave["endpoint"]]
        job = seen["job"]
        assert job["script"] == "spin.py" and job["package"] == "/encrypted/app.pkg" and job["elapsed"] >= 0
        text = cli("status").stdout
        assert f"job {job['job']}: spin.py from /encrypted/app.pkg, started " in text, text
        assert f"--endpoint {enclave['endpoint']}" in text
        assert json.loads(cli("job", "status", "--json").stdout)["job"]["job"] == job["job"]
        # A cancel aimed at another job cancels nothing and says which one runs.
        wrong = cli("job", "cancel", "--job", "000000000000", check=False)
        assert wrong.returncode == 1 and "job 000000000000 is not running" in wrong.stderr, wrong.stderr
        assert job["job"] in wrong.stderr and "ESRCH" not in wrong.stderr and "job.cancel" not in wrong.stderr
        assert run.poll() is None
        cancelled = cli("job", "cancel", "--job", job["job"])
        assert f"cancelled job {job['job']} (spin.py from /encrypted/app.pkg" in cancelled.stdout
        _out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"enclave: job {job['job']} was cancelled from elsewhere (enclave job cancel)" in err
    assert run.returncode == 128 + signal.SIGKILL
    with EnclaveClient(enclave["endpoint"]) as client:
        assert client.call("job.status") == {"job": None}
    assert "no job is running" in cli("status").stdout
    again = cli("run", "-f", "app.pkg", "-s", "ml_algorithm.py", "-a", "-m model.h5 -d /dataset -o /output",
                "--expect-pcr0", enclave["pcr0"], "--clear-output")  # fmt: skip
    assert again.returncode == 0  # the enclave runs the next job as usual


def test_share_ls_and_rm(enclave, tmp_path):
    data = tmp_path / "data"
    (data / "sub" / "deeper").mkdir(parents=True)
    (data / "a.csv").write_text("1,2\n")
    (data / "sub" / "b.csv").write_text("3\n")
    (data / "sub" / "deeper" / "c.csv").write_text("4\n")
    cli("push", str(data), "/dataset", "--expect-pcr0", enclave["pcr0"])
    share = enclave["share"] / "dataset"

    top = cli("share", "ls").stdout
    assert all(f" {name}/\n" in top for name in ("dataset", "encrypted", "model", "output")), top
    listed = json.loads(cli("share", "ls", "/dataset", "--json").stdout)
    assert {(e["name"], e["type"]) for e in listed["entries"]} == {("a.csv", "file"), ("sub", "dir")}
    assert "      4 " in cli("share", "ls", "/dataset/a.csv").stdout  # a file lists as itself, with its size

    # A folder needs -r; a missing path names what is there; the share's own folders stay. Nothing is removed.
    for argv, expected in (
        (["/dataset/sub"], "/dataset/sub is a folder: nothing was removed; `enclave share rm -r /dataset/sub`"),
        (
            ["/dataset/a.csv", "/dataset/nope.csv"],
            "there is no /dataset/nope.csv in the enclave's share (/dataset "
            "holds /dataset/a.csv, /dataset/sub/): nothing was removed",
        ),
        (
            ["-r", "/dataset"],
            "/dataset is one of the share's folders (/dataset, /encrypted, /model, /output), which stay: to empty "
            "it, remove what it holds (2 entries), e.g. `enclave share rm -r /dataset/a.csv /dataset/sub`",
        ),
        (["-r", "/"], "the share's root cannot be removed"),
    ):
        result = cli("share", "rm", *argv, check=False)
        assert result.returncode == 1 and f"enclave: error: {expected}" in result.stderr, (argv, result.stderr)
        assert "ENO" not in result.stderr and "share." not in result.stderr
    assert (share / "a.csv").exists() and (share / "sub" / "deeper" / "c.csv").exists()

    removed = json.loads(cli("share", "rm", "-r", "/dataset/sub", "/dataset/a.csv", "--json").stdout)
    assert removed == {"removed": ["/dataset/sub", "/dataset/a.csv"], "files": 3, "folders": 2, "bytes": 8}
    assert list(share.iterdir()) == []
    assert "0 files" in cli("share", "rm", "-f", "/dataset/a.csv").stdout  # -f: missing is fine, as for rm -f

    # Deeper than Python's recursion limit (a share path may be 4096 bytes).
    deep = "/".join(["d"] * 1100)
    subprocess.run(["mkdir", "-p", str(share / deep)], check=True)  # pathlib's mkdir recurses too
    (share / deep / "f").write_text("x")
    gone = json.loads(cli("share", "rm", "-r", "/dataset/d", "--json").stdout)
    assert gone["folders"] == 1100 and gone["files"] == 1 and list(share.iterdir()) == []


def test_share_rm_during_a_job_says_the_job_holds_it(enclave, tmp_path):
    push_app(enclave)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("hi")
    cli("push", str(data), "/dataset", "--expect-pcr0", enclave["pcr0"])
    run = start_spinning(enclave)
    try:
        result = cli("share", "rm", "/dataset/a.txt", check=False)
    finally:
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=60)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    err = result.stderr
    assert "/dataset/a.txt was not removed: /dataset is in use by job " in err, err
    assert "wait for it or cancel it (with `enclave job cancel`)" in err
    assert "EBUSY" not in err and "share.unlink" not in err
    assert (enclave["share"] / "dataset" / "a.txt").exists()
    deadline = time.time() + 30
    while json.loads(cli("job", "status", "--json").stdout)["job"] is not None:
        assert time.time() < deadline
        time.sleep(0.05)
    cli("share", "rm", "/dataset/a.txt")  # the job is over: the share is the host's again
    assert not (enclave["share"] / "dataset" / "a.txt").exists()


def test_a_full_share_says_how_much_is_free_and_leaves_no_partial_file(enclave, tmp_path):
    """The share is a 2 MiB tmpfs, as the enclave's share is a tmpfs of its own sized below its memory."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the small share needs root")
    share = enclave["share"]
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(share)], check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        for top in ("dataset", "encrypted", "model", "output"):
            (share / top).mkdir()
        data = tmp_path / "data"
        data.mkdir()
        (data / "a-small.txt").write_bytes(os.urandom(100_000))
        (data / "b-big.bin").write_bytes(os.urandom(3 << 20))
        result = cli("push", str(data), "/dataset/new", "--expect-pcr0", enclave["pcr0"], check=False)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        err = result.stderr
        assert f"the enclave's share is full: {data / 'b-big.bin'} (3.0 MiB (3145728 bytes)) does not fit" in err, err
        free = re.search(r"the share has [\d.]+ MiB \((\d+) bytes\) free of 2\.0 MiB \(2097152 bytes\)", err)
        assert free and 1 << 20 < int(free[1]) < 2 << 20, err  # measured after the partial file was removed
        assert "enclave share rm" in err and "ENOSPC" not in err and "share.write" not in err
        assert sorted(p.name for p in (share / "dataset" / "new").iterdir()) == ["a-small.txt"]  # no partial file
        # The room is back: a file that fits goes in.
        (data / "b-big.bin").write_bytes(os.urandom(1 << 20))
        again = json.loads(cli("push", str(data), "/dataset/new", "--expect-pcr0", enclave["pcr0"], "--json").stdout)
        assert again["changed"] == ["b-big.bin"] and again["unchanged"] == 1
    finally:
        subprocess.run(["umount", "-l", str(share)], check=False)


def test_the_advice_with_two_local_enclaves_leads_somewhere_that_works(local_cloud):
    """Two enclaves and no endpoint: the error names each one's --endpoint as the user types it, and that works
    (before, it said --cid, which dials vsock and times out on the local backend); --cid works too."""
    work, env = local_cloud

    def enclave(*args, check=True):
        result = subprocess.run([*ENCLAVE, *args], env=env, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0 or not check, result.stderr
        return result

    image = work / "enclave.eif"
    pcr0 = json.loads(enclave("local", "build", "--output", str(image)).stdout)["Measurements"]["PCR0"]
    started = [
        json.loads(
            enclave(
                "local",
                "run-enclave",
                "--eif-path",
                str(image),
                "--cpu-count",
                "1",
                "--memory",
                "64",
                "--enclave-name",
                name,
            ).stdout
        )  # fmt: skip
        for name in ("first", "second")
    ]
    result = enclave("attest", "--expect-pcr0", pcr0, check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    advice = re.findall(r"--endpoint (unix://\S+) for (\w+)", result.stderr)
    assert advice == [(e["Endpoint"], e["EnclaveName"]) for e in started], result.stderr
    assert "--cid" not in result.stderr
    for (endpoint, _name), one in zip(advice, started, strict=True):
        attested = json.loads(enclave("attest", "--endpoint", endpoint, "--expect-pcr0", pcr0, "--json").stdout)
        assert attested["pcrs"]["0"] == pcr0
        by_cid = enclave("attest", "--cid", str(one["EnclaveCID"]), "--expect-pcr0", pcr0)
        assert "enclave attested" in by_cid.stdout
    wrong = enclave("attest", "--cid", "99", check=False)
    assert wrong.returncode == 1 and "no running enclave on the local backend has CID 99" in wrong.stderr
    assert "first (CID 16)" in wrong.stderr, wrong.stderr
    # status shows both, each with the endpoint to type and its (idle) job.
    status = json.loads(enclave("status", "--json").stdout)
    assert [(e["EnclaveName"], e["Endpoint"], e["job"]) for e in status["enclaves"]] == [
        (e["EnclaveName"], e["Endpoint"], None) for e in started
    ]


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                    reason="needs /dev/fuse and fusermount3 (make deps)")  # fmt: skip
def test_sync_json_status_shows_the_mount_and_unmount_twice_exits_0(enclave, tmp_path):
    mnt = tmp_path / "synced_folder"
    state = json.loads(cli("sync", "-d", str(mnt), "--expect-pcr0", enclave["pcr0"], "--json").stdout)
    try:
        assert state["mountpoint"] == str(mnt) and state["endpoint"] == enclave["endpoint"] and state["pid"] > 0
        status = json.loads(cli("status", "--json").stdout)
        [mount] = [m for m in status["mounts"] if m["mountpoint"] == str(mnt)]
        assert mount["mounted"] and mount["alive"] and mount["pid"] == state["pid"]
        assert f"mount {mnt}: the share of {enclave['endpoint']} (process {state['pid']})" in cli("status").stdout
        first = json.loads(cli("sync", "-d", str(mnt), "--unmount", "--json").stdout)
        assert first == {"mountpoint": str(mnt), "unmounted": True}
    finally:
        cli("sync", "-d", str(mnt), "--unmount", check=False)
    second = cli("sync", "-d", str(mnt), "--unmount")  # nothing to stop: exit 0, as `local down` twice
    assert second.stdout == f"nothing was mounted at {mnt}: nothing to unmount\n" and second.stderr == ""
    assert json.loads(cli("sync", "-d", str(mnt), "--unmount", "--json").stdout)["unmounted"] is False
    assert not [m for m in json.loads(cli("status", "--json").stdout)["mounts"] if m["mountpoint"] == str(mnt)]


def test_package_inspect_prints_readable_text_and_json(enclave):
    sealed = str(enclave["sealed"])
    text = cli("package", "inspect", sealed).stdout
    as_json = json.loads(cli("package", "inspect", sealed, "--json").stdout)
    assert "{" not in text and "'" not in text, text  # no Python dict or repr
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    assert lines["name"] == "app" and lines["version"] == "1.0" and lines["key_id"] == as_json["key_id"]
    assert lines["manifest_digest"] == as_json["manifest_digest"]
    context = ", ".join(f"{k}={v}" for k, v in sorted(as_json["encryption_context"].items())) or "none"
    assert lines["encryption_context"] == context
    wrapped = len(base64.b64decode(as_json["wrapped_key"]))
    assert lines["wrapped_key"].startswith(f"{wrapped} bytes (the data key under the KMS key")
    assert lines["signer"].startswith("none (format 1, unsigned")
