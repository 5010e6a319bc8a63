"""The job runner runs only scripts from inside the decrypted package, isolated, and always cleans up."""

import errno
import os
import textwrap
import threading
import time

import pytest

from ansible_collections.confidential_ml.nitro.enclave_server.jobs import JobRunner
from ansible_collections.confidential_ml.nitro.enclave_server.share import Share
from ansible_collections.confidential_ml.nitro.plugins.module_utils import package

DATA_KEY = bytes(range(32))


class FixedKeyKms:
    """GenerateDataKey with a known key: the job runner's tests are about running, not key release."""

    def generate_data_key(self, KeyId, KeySpec, EncryptionContext):  # noqa: N803 (boto3's names)
        return {"Plaintext": DATA_KEY, "CiphertextBlob": b"wrapped:" + DATA_KEY, "KeyId": f"arn:test:{KeyId}"}


APP = {
    "ml_algorithm.py": """
        import argparse, json, os, sys
        import helper                      # the package's own modules are importable
        p = argparse.ArgumentParser()
        p.add_argument("-d"); p.add_argument("-o"); p.add_argument("--rc", type=int, default=0)
        a = p.parse_args()
        rows = sorted(os.listdir(a.d))
        print("rows", len(rows), helper.NAME)
        print("to stderr", file=sys.stderr)
        with open(os.path.join(a.o, "result.json"), "w") as f:
            json.dump({"rows": rows, "json_from": json.__file__, "env": sorted(os.environ)}, f)
        sys.exit(a.rc)
    """,
    "helper.py": "NAME = 'helper-from-package'\n",
    "wait.py": """
        import os, sys, time
        print("waiting", flush=True)
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.02)
    """,
    "spin.py": "import time\nprint('spinning', flush=True)\nwhile True: time.sleep(0.05)\n",
}


@pytest.fixture
def env(tmp_path):
    src = tmp_path / "app"
    src.mkdir()
    for name, body in APP.items():
        (src / name).write_text(textwrap.dedent(body))
    share = Share(tmp_path / "share")
    sealed = tmp_path / "share/encrypted/app.pkg"
    package.seal(src, sealed, kms_client=FixedKeyKms(), key_id="k", name="app", version="1")
    work = tmp_path / "private"
    work.mkdir()
    return share, JobRunner(share, work), work


def run(runner, script, args, **kw):
    events = []
    kw.setdefault("cancelled", threading.Event())
    summary = runner.run(
        kw.pop("package", "/encrypted/app.pkg"), script, args, unwrap_key=lambda h: DATA_KEY, emit=events.append, **kw
    )
    return summary, events


def output_of(events, stream):
    return b"".join(e["data"] for e in events if e["type"] == stream).decode()


def test_runs_script_with_share_paths_and_cleans_up(env, tmp_path):
    share, runner, work = env
    share.create("/dataset/a.csv")
    share.create("/dataset/b.csv")
    summary, events = run(runner, "ml_algorithm.py", "-d /dataset/ -o /output/")
    assert summary["rc"] == 0 and summary["ended_by"] == "exit"
    assert "rows 2 helper-from-package" in output_of(events, "stdout")
    assert "to stderr" in output_of(events, "stderr")
    [out] = summary["outputs"]
    assert out["path"] == "/output/result.json" and out["size"] > 0 and len(out["sha256"]) == 64
    assert list(work.iterdir()) == []  # the decrypted tree is gone


def test_nonzero_exit_status_comes_back(env):
    _share, runner, work = env
    summary, _events = run(runner, "ml_algorithm.py", ["-d", "/dataset", "-o", "/output", "--rc", "3"])
    assert summary["rc"] == 3
    assert list(work.iterdir()) == []


def test_share_cannot_shadow_modules_or_inject_site_code(env, tmp_path, monkeypatch):
    share, runner, _work = env
    marker = tmp_path / "pwned"
    for name in ("json.py", "sitecustomize.py", "usercustomize.py", "helper.py"):
        (tmp_path / "share/dataset" / name).write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / "share/dataset/evil.pth").write_text(f"import os; open({str(marker)!r}, 'w')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "share/dataset"))
    monkeypatch.setenv("PYTHONSTARTUP", str(tmp_path / "share/dataset/json.py"))
    summary, events = run(runner, "ml_algorithm.py", "-d /dataset -o /output")
    assert summary["rc"] == 0, output_of(events, "stderr")
    assert not marker.exists()
    result = (tmp_path / "share/output/result.json").read_text()
    assert "/share/" not in result.split('"json_from": ')[1].split(",")[0]
    assert "PYTHONPATH" not in result


@pytest.mark.parametrize(
    "script",
    ["-c", "-m", "/dataset/x.py", "../x.py", "helper", "missing.py", "/ml_algorithm.py", "-cimport os;os.system('id')"],
)
def test_script_must_be_a_py_file_in_the_package(env, script):
    share, runner, work = env
    share.create("/dataset/x.py")
    with pytest.raises(OSError) as caught:
        run(runner, script, [])
    assert caught.value.errno in (errno.EPERM, errno.ENOENT)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("pkg", ["/dataset/app.pkg", "/encrypted/../dataset/app.pkg", "/encrypted", "/etc/passwd"])
def test_package_must_be_under_encrypted(env, pkg):
    share, runner, _work = env
    share.create("/dataset/app.pkg")
    with pytest.raises(OSError) as caught:
        run(runner, "ml_algorithm.py", [], package=pkg)
    assert caught.value.errno in (errno.EPERM, errno.EISDIR, errno.ENOENT)


@pytest.mark.parametrize("arg", ["/etc/passwd", "--out=/root/x", "/dataset/../../etc", "'unbalanced"])
def test_arguments_outside_the_share_are_refused(env, arg):
    _share, runner, _work = env
    with pytest.raises(OSError):
        run(runner, "ml_algorithm.py", arg)


def test_second_job_is_busy_and_names_the_first(env, tmp_path):
    _share, runner, work = env
    release = tmp_path / "release"
    first = threading.Thread(target=run, args=(runner, "wait.py", [str(release.name)]), daemon=True)
    first.start()
    while runner.current is None:
        time.sleep(0.01)
    with pytest.raises(OSError) as caught:
        run(runner, "ml_algorithm.py", "-d /dataset -o /output")
    assert caught.value.errno == errno.EBUSY
    assert "wait.py" in str(caught.value) and runner.current.id in str(caught.value)
    # wait.py polls a path relative to its cwd (the package): create it there to let it finish,
    # once the package is open (the runner names its job before it opens the package).
    app = work / runner.current.id / "app"
    deadline = time.monotonic() + 30
    while not app.is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)
    (app / release.name).write_text("go")
    first.join(timeout=30)
    assert not first.is_alive()
    assert list(work.iterdir()) == []


def test_timeout_and_cancel_kill_the_script_and_clean_up(env):
    _share, runner, work = env
    summary, events = run(runner, "spin.py", [], timeout=0.5)
    assert summary["ended_by"] == "timeout" and summary["rc"] != 0
    assert "spinning" in output_of(events, "stdout")
    cancelled = threading.Event()
    threading.Timer(0.3, cancelled.set).start()
    summary, _events = run(runner, "spin.py", [], cancelled=cancelled)
    assert summary["ended_by"] == "cancelled"
    assert list(work.iterdir()) == []


def test_tampered_package_runs_nothing_and_leaves_nothing(env, tmp_path):
    _share, runner, work = env
    path = tmp_path / "share/encrypted/app.pkg"
    data = bytearray(path.read_bytes())
    data[-40] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(package.PackageError):
        run(runner, "ml_algorithm.py", "-d /dataset -o /output")
    assert list(work.iterdir()) == []
    assert os.listdir(tmp_path / "share/output") == []
