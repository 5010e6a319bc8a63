"""The job runner runs only scripts from inside the decrypted package, isolated, and always cleans up."""

import errno
import os
import shutil
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.enclave_server.jobs import JobRunner
from ansible_collections.confidential_ml.nitro.enclave_server.share import Share
from ansible_collections.confidential_ml.nitro.plugins.module_utils import package_seal
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import JobError, PackageError

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


# The job identity for these tests: one no other process here runs as (cleanup kills all of its processes).
JOB_UID = 40000 + os.getpid() % 20000 if os.geteuid() == 0 else None


# The venv's interpreter lives under /root (0700) on this machine; the job uid runs the system's.
JOB_PYTHON = "/usr/bin/python3" if JOB_UID is not None and os.path.exists("/usr/bin/python3") else sys.executable


def seal(tmp_path, files: dict, dest, version="1"):
    src = tmp_path / f"src-{Path(dest).name}-{version}"
    src.mkdir()
    for name, body in files.items():
        (src / name).write_text(textwrap.dedent(body))
    package_seal.seal(src, dest, kms_client=FixedKeyKms(), key_id="k", name="app", version=version)


@pytest.fixture
def env(tmp_path):
    """(share, runner, work). The share and the work directory live where the job uid can reach them, as in
    an enclave: not under pytest's base directory, which every pytest session resets to 0700. tmp_path/share
    links to the share for the tests' own (host-side) file access."""
    root = Path(tempfile.mkdtemp(prefix="jobs-", dir="/tmp"))
    root.chmod(0o711)
    share = Share(root / "share")
    (tmp_path / "share").symlink_to(root / "share")
    seal(tmp_path, APP, tmp_path / "share/encrypted/app.pkg")
    work = root / "private"
    work.mkdir()
    yield share, JobRunner(share, work, job_uid=JOB_UID, python=JOB_PYTHON), work
    shutil.rmtree(root, ignore_errors=True)


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
    assert summary["rc"] == 0 and summary["ended_by"] == "exit", output_of(events, "stderr")
    assert "rows 2 helper-from-package" in output_of(events, "stdout")
    assert "to stderr" in output_of(events, "stderr")
    [out] = summary["outputs"]
    assert out["path"] == "/output/result.json" and out["size"] > 0 and len(out["sha256"]) == 64
    assert list(work.iterdir()) == []  # the decrypted tree is gone


def test_the_script_runs_as_main_in_a_light_interpreter(env, tmp_path):
    """The script is __main__, with its own globals, __file__ and argv[0], as under runpy.run_path, but the
    interpreter imports neither runpy nor traceback: together a third of a job interpreter's start."""
    main = """
        import pickle, sys
        class Point:
            pass
        assert sys.modules["__main__"].Point is Point  # pickle (and multiprocessing) find the script's classes
        copied = pickle.loads(pickle.dumps(Point()))
        print(__name__, __file__ == sys.argv[0] and __file__.endswith("/main.py"), sys.argv[1:], type(copied) is Point)
        print(sorted(name for name in ("root", "script", "code", "stderr_mode") if name in globals()))
        print("runpy" in sys.modules, "traceback" in sys.modules)
    """
    seal(tmp_path, {"main.py": main}, tmp_path / "share/encrypted/main.pkg")
    summary, events = run(runner=env[1], script="main.py", args=["a b", "c"], package="/encrypted/main.pkg")
    assert summary["rc"] == 0, output_of(events, "stderr")
    assert output_of(events, "stdout").splitlines() == ["__main__ True ['a b', 'c'] True", "[]", "False False"]


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


@pytest.mark.parametrize(
    "arg",
    ["/etc/passwd", "--out=/root/x", "/dataset/../../etc", "'unbalanced", "-o/etc/x", "-d/etc", "--output=/etc/x"],
)
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
    assert summary["ended_by"] == "timeout" and summary["rc"] != 0, (summary, events)
    assert "spinning" in output_of(events, "stdout")
    cancelled = threading.Event()
    threading.Timer(0.3, cancelled.set).start()
    summary, events = run(runner, "spin.py", [], cancelled=cancelled)
    assert summary["ended_by"] == "cancelled", (summary, events)
    assert list(work.iterdir()) == []


def test_tampered_package_runs_nothing_and_leaves_nothing(env, tmp_path):
    _share, runner, work = env
    path = tmp_path / "share/encrypted/app.pkg"
    data = bytearray(path.read_bytes())
    data[-40] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError):
        run(runner, "ml_algorithm.py", "-d /dataset -o /output")
    assert list(work.iterdir()) == []
    assert os.listdir(tmp_path / "share/output") == []


# -- isolation: what a hostile script tries, as the job uid

needs_root = pytest.mark.skipif(JOB_UID is None, reason="jobs run under their own uid only when the server is root")

PROBES = {
    "whoami.py": """
        import os
        print("uid", os.getuid(), os.geteuid(), "gid", os.getgid(), "groups", os.getgroups())
        with open("/proc/self/status") as f:
            print([line.split()[1] for line in f if line.startswith(("CapEff", "NoNewPrivs"))])
    """,
    "peek.py": """
        import os, sys
        server = int(sys.argv[1])
        for name in ("mem", "environ", "maps"):
            try:
                with open(f"/proc/{server}/{name}", "rb") as f:
                    f.read(1)
                print(name, "READ")
            except OSError as err:
                print(name, "denied", err.errno)
    """,
    "linger.py": """
        import os, sys, time
        pid = os.fork()
        if pid == 0:
            os.setsid()               # out of the job's session and process group
            if os.fork():
                os._exit(0)
            print("lingering", os.getpid(), flush=True)   # still holds stdout: the pumps must not wait for it
            while True:
                time.sleep(0.1)
        os.waitpid(pid, 0)
        time.sleep(0.2)
    """,
    "litter.py": """
        import os, sys, tempfile
        marker = sys.argv[1]
        fd, path = tempfile.mkstemp()
        print("mkstemp", path, flush=True)
        for place in ("/tmp", "/dev/shm", "/var/tmp"):
            try:
                with open(os.path.join(place, marker), "w") as f:
                    f.write("left behind")
                print("wrote", place, flush=True)
            except OSError as err:
                print("refused", place, err.errno, flush=True)
    """,
    "fail.py": """
        def load(row):
            SECRET_SOURCE_LINE = int(row)  # the owner's code
            return SECRET_SOURCE_LINE
        load("secret-customer-value")
    """,
    "warn.py": """
        import warnings
        warnings.warn("secret-warning-text")  # SECRET_WARNING_SOURCE
    """,
    "thread_fail.py": """
        import threading
        def load(row):
            SECRET_THREAD_LINE = int(row)  # the owner's code, in a thread
        worker = threading.Thread(target=load, args=("secret-thread-value",))
        worker.start()
        worker.join()
    """,
}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.fixture
def probes(tmp_path, env):
    share, runner, work = env
    seal(tmp_path, {**APP, **PROBES}, tmp_path / "share/encrypted/probes.pkg")
    return share, runner, work


def probe(runner, script, args=(), **kw):
    return run(runner, script, list(args), package="/encrypted/probes.pkg", **kw)


@needs_root
def test_job_runs_as_the_job_uid_without_privileges(probes):
    _share, runner, _work = probes
    summary, events = probe(runner, "whoami.py")
    out = output_of(events, "stdout")
    assert summary["rc"] == 0, output_of(events, "stderr")
    assert f"uid {JOB_UID} {JOB_UID} gid {JOB_UID} groups []" in out
    assert "['0000000000000000', '1']" in out  # no effective capabilities, no_new_privs


@needs_root
def test_job_cannot_read_the_servers_memory(probes):
    _share, runner, _work = probes
    summary, events = probe(runner, "peek.py", [str(os.getpid())])  # this process plays the server
    out = output_of(events, "stdout")
    assert summary["rc"] == 0, output_of(events, "stderr")
    for name in ("mem", "environ", "maps"):
        assert f"{name} denied {errno.EACCES}" in out, out


@needs_root
def test_a_setsid_child_does_not_outlive_its_job(probes):
    _share, runner, _work = probes
    summary, events = probe(runner, "linger.py")
    out = output_of(events, "stdout")
    assert summary["rc"] == 0, output_of(events, "stderr")
    pid = int(out.split("lingering ")[1].split()[0])
    assert not alive(pid), f"process {pid} of the job is still running"


@needs_root
def test_job_leaves_no_temporary_files(probes, tmp_path):
    _share, runner, work = probes
    marker = f"job-litter-{tmp_path.name}"
    summary, events = probe(runner, "litter.py", [marker])
    out = output_of(events, "stdout")
    assert summary["rc"] == 0, output_of(events, "stderr")
    tmpfile = out.split("mkstemp ")[1].split()[0]
    assert tmpfile.startswith(str(work) + "/")  # TMPDIR is the job's own
    assert not os.path.exists(tmpfile)
    for place in ("/tmp", "/dev/shm", "/var/tmp"):
        assert not os.path.exists(os.path.join(place, marker)), f"{place}/{marker} outlived the job"
    assert list(work.iterdir()) == []


@needs_root
def test_job_cannot_change_its_inputs_or_the_share_layout(probes, tmp_path):
    share, runner, _work = probes
    share.create("/dataset/a.csv", data=b"1,2\n")
    seal(tmp_path, {"touch.py": PROBE_TOUCH}, tmp_path / "share/encrypted/touch.pkg")
    targets = ["/dataset/a.csv", "/dataset/new", "/encrypted/new", "/model/new"]
    summary, events = run(runner, "touch.py", targets, package="/encrypted/touch.pkg")
    out = output_of(events, "stdout")
    assert summary["rc"] == 0, output_of(events, "stderr")
    assert out.split() == ["denied"] * 4, out
    assert share.read("/dataset/a.csv", 0, 100) == b"1,2\n"


PROBE_TOUCH = """
    import sys
    for path in sys.argv[1:]:
        try:
            open(path, "a").close()
            print("WROTE", path)
        except OSError:
            print("denied")
"""


# -- the owner's source stays in the enclave


def test_a_failing_script_shows_where_not_its_source_or_data(probes):
    _share, runner, _work = probes
    summary, events = probe(runner, "fail.py")
    err = output_of(events, "stderr")
    assert summary["rc"] == 1
    assert 'File "fail.py", line 3, in load' in err and 'File "fail.py", line 5, in <module>' in err
    assert err.rstrip().endswith("ValueError"), err
    assert "SECRET_SOURCE_LINE" not in err and "secret-customer-value" not in err
    summary, events = probe(runner, "warn.py")
    err = output_of(events, "stderr")
    assert summary["rc"] == 0 and "warn.py:3: UserWarning" in err
    assert "secret-warning-text" not in err and "SECRET_WARNING_SOURCE" not in err
    # The bootstrap does not import threading (it sets the hook threading takes when the script imports it).
    summary, events = probe(runner, "thread_fail.py")
    err = output_of(events, "stderr")
    assert 'File "thread_fail.py", line 4, in load' in err and err.rstrip().endswith("ValueError"), err
    assert "SECRET_THREAD_LINE" not in err and "secret-thread-value" not in err


def test_the_owner_can_allow_full_stderr_in_the_package(env, tmp_path):
    _share, runner, _work = env
    files = {"fail.py": PROBES["fail.py"], "enclave.json": '{"stderr": "full"}'}
    seal(tmp_path, files, tmp_path / "share/encrypted/full.pkg")
    summary, events = run(runner, "fail.py", [], package="/encrypted/full.pkg")
    err = output_of(events, "stderr")
    assert summary["rc"] == 1
    assert "SECRET_SOURCE_LINE = int(row)" in err and "secret-customer-value" in err


@pytest.mark.parametrize("settings", ['{"stderr": "all"}', "[1]", "{not json"])
def test_bad_enclave_json_is_refused_before_the_script_runs(env, tmp_path, settings):
    _share, runner, work = env
    seal(tmp_path, {"fail.py": "open('ran', 'w')\n", "enclave.json": settings}, tmp_path / "share/encrypted/bad.pkg")
    with pytest.raises(OSError, match="enclave.json in package /encrypted/bad.pkg") as caught:
        run(runner, "fail.py", [], package="/encrypted/bad.pkg")
    assert caught.value.errno == errno.EINVAL
    assert list(work.iterdir()) == []


# -- receipts bind exactly what happened


def test_output_left_from_before_is_refused_unless_cleared(env):
    share, runner, _work = env
    share.create("/output/planted.csv", data=b"made up by the host")
    with pytest.raises(OSError, match=r"/output holds 1 entries from before \(planted.csv\)") as caught:
        run(runner, "ml_algorithm.py", "-d /dataset -o /output")
    assert caught.value.errno == errno.EEXIST
    assert share.read("/output/planted.csv", 0, 100) == b"made up by the host"  # never removed unasked
    summary, _events = run(runner, "ml_algorithm.py", "-d /dataset -o /output", clear_output=True)
    assert [o["path"] for o in summary["outputs"]] == ["/output/result.json"]
    assert share.listdir("/output")[0]["name"] == "result.json"


def test_host_cannot_change_inputs_outputs_or_the_package_during_a_job(env, tmp_path):
    share, runner, work = env
    share.create("/dataset/a.csv", data=b"a")
    share.create("/encrypted/other.pkg", data=b"x")
    release = "go"
    first = threading.Thread(target=run, args=(runner, "wait.py", [release]), daemon=True)
    first.start()
    app = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = runner.current
        if job is not None and (work / job.id / "app").is_dir():
            app = work / job.id / "app"
            break
        time.sleep(0.01)
    assert app is not None, "the job never opened its package"
    attempts = {
        "create in /dataset": lambda: share.create("/dataset/b.csv"),
        "write an input": lambda: share.write("/dataset/a.csv", 0, b"b"),
        "unlink an input": lambda: share.unlink("/dataset/a.csv"),
        "plant an output": lambda: share.create("/output/planted", data=b"x"),
        "mkdir in /model": lambda: share.mkdir("/model/m"),
        "rename into /dataset": lambda: share.rename("/encrypted/other.pkg", "/dataset/c"),
        "chmod an input": lambda: share.chmod("/dataset/a.csv", 0o600),
        "overwrite the package": lambda: share.create("/encrypted/app.pkg", data=b"v2"),
        "write into the package": lambda: share.write("/encrypted/app.pkg", 0, b"v2"),
        "truncate the package": lambda: share.truncate("/encrypted/app.pkg", 0),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EBUSY, what
        assert f"job {job.id}" in str(caught.value), what
    # The package renamed away is still the same file: still refused.
    share.rename("/encrypted/app.pkg", "/encrypted/moved.pkg")
    with pytest.raises(OSError, match="in use by job") as caught:
        share.write("/encrypted/moved.pkg", 0, b"v2")
    share.write("/encrypted/other.pkg", 0, b"y")  # other packages stay the host's to change
    (app / release).write_text("go")
    first.join(timeout=30)
    assert not first.is_alive()
    share.write("/dataset/a.csv", 0, b"b")  # the job is over: the host's again
    share.rename("/encrypted/moved.pkg", "/encrypted/app.pkg")


def test_the_package_is_read_through_one_open_file(env, tmp_path):
    """The host swaps the package file for another version once its header was read: the job runs and
    names the version whose header it read, not the file now at the path."""
    share, runner, _work = env
    seal(tmp_path, {**APP, "helper.py": "NAME = 'version-two'\n"}, tmp_path / "share/encrypted/v2.pkg", version="2")

    def swap_then_unwrap(header):
        share.rename("/encrypted/v2.pkg", "/encrypted/app.pkg")  # allowed: the job holds the first file open
        return DATA_KEY

    events = []
    summary = runner.run(
        "/encrypted/app.pkg",
        "ml_algorithm.py",
        "-d /dataset -o /output",
        unwrap_key=swap_then_unwrap,
        emit=events.append,
        cancelled=threading.Event(),
    )
    assert summary["package_version"] == "1"
    assert "helper-from-package" in output_of(events, "stdout")
    assert "version-two" not in output_of(events, "stdout")


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_huge_sparse_input_honours_timeout_and_cancel(env, how):
    share, runner, work = env
    share.create("/dataset/huge.bin")
    share.truncate("/dataset/huge.bin", 1 << 40)  # 1 TiB that costs the host nothing
    released = []
    cancelled = threading.Event()
    if how == "cancel":
        threading.Timer(0.3, cancelled.set).start()
    with pytest.raises(OSError) as caught:
        runner.run(
            "/encrypted/app.pkg",
            "ml_algorithm.py",
            "-d /dataset -o /output",
            unwrap_key=lambda header: released.append(header) or DATA_KEY,
            emit=lambda event: None,
            cancelled=cancelled,
            timeout=0.3 if how == "timeout" else None,
        )
    assert caught.value.errno == (errno.ETIMEDOUT if how == "timeout" else errno.ECANCELED)
    assert "/dataset/huge.bin" in str(caught.value)
    assert released == []  # the key was never asked for, so nothing was decrypted
    assert list(work.iterdir()) == []
    share.unlink("/dataset/huge.bin")  # the share is the host's again


@pytest.mark.parametrize(
    ("arg", "mapped"),
    [
        ("-o/output/", "-o{root}/output/"),
        ("-d/dataset", "-d{root}/dataset"),
        ("--output=/output/x", "--output={root}/output/x"),
    ],
)
def test_attached_option_values_are_mapped_like_bare_paths(env, arg, mapped):
    share, runner, _work = env
    assert runner._map_arg(arg) == mapped.format(root=share.root)


@needs_root
def test_an_input_the_job_cannot_read_is_refused_with_the_fix(env):
    share, runner, work = env
    share.create("/dataset/private.csv", 0o600, data=b"x")
    share.chmod("/dataset/private.csv", 0o600)
    with pytest.raises(OSError, match=r"/dataset/private.csv has mode 0600: .*chmod o\+r") as caught:
        run(runner, "ml_algorithm.py", "-d /dataset -o /output")
    assert caught.value.errno == errno.EACCES
    assert list(work.iterdir()) == []
    share.chmod("/dataset/private.csv", 0o644)
    summary, events = run(runner, "ml_algorithm.py", "-d /dataset -o /output")
    assert summary["rc"] == 0, output_of(events, "stderr")


# -- job control: job.status and job.cancel, from any client (docs/THREAT_MODEL.md, "Job control")


def start_spinning(runner):
    """Run spin.py in a thread; returns (thread, result list, events list) once the script prints."""
    events, result = [], []
    spinning = threading.Event()

    def emit(event):
        events.append(event)
        if event.get("type") == "stdout":
            spinning.set()

    def target():
        try:
            result.append(runner.run("/encrypted/app.pkg", "spin.py", [], unwrap_key=lambda h: bytes(range(32)),
                                     emit=emit, cancelled=threading.Event()))  # fmt: skip
        except BaseException as err:  # noqa: BLE001 - the test reports it
            result.append(err)

    thread = threading.Thread(target=target)
    thread.start()
    assert spinning.wait(60), "spin.py never started"
    return thread, result, events


def test_status_names_the_running_job_and_cancel_ends_it(env):
    _share, runner, work = env
    assert runner.status() is None and runner.cancel() is None  # nothing runs: nothing to say or do
    thread, result, events = start_spinning(runner)
    status = runner.status()
    assert status["package"] == "/encrypted/app.pkg" and status["script"] == "spin.py"
    assert status["elapsed"] >= 0 and status["started"] > 0 and len(status["job"]) == 12
    assert "args" not in status  # what the job's arguments map to inside the enclave stays inside
    # A cancel aimed at another job leaves this one running.
    with pytest.raises(JobError) as caught:
        runner.cancel("000000000000")
    assert caught.value.errno == errno.ESRCH and status["job"] in caught.value.strerror
    assert runner.status()["job"] == status["job"]
    assert runner.cancel(status["job"])["job"] == status["job"]
    thread.join(60)
    assert not thread.is_alive()
    [summary] = result
    assert isinstance(summary, dict), summary
    assert summary["ended_by"] == "cancelled" and summary["rc"] != 0
    assert "spinning" in output_of(events, "stdout")
    assert runner.status() is None
    assert list(work.iterdir()) == []  # the plaintext is gone, as after the client's own cancel


def test_cancel_refuses_a_job_id_that_is_not_a_string(env):
    _share, runner, _work = env
    with pytest.raises(JobError) as caught:
        runner.cancel(["not", "an", "id"])
    assert caught.value.errno == errno.EINVAL


def test_a_cancel_while_inputs_are_hashed_says_it_came_from_elsewhere(env):
    share, runner, work = env
    share.create("/dataset/huge.bin")
    share.truncate("/dataset/huge.bin", 1 << 40)  # hashing takes minutes: the cancel lands in it
    caught = []

    def target():
        try:
            runner.run("/encrypted/app.pkg", "spin.py", [], unwrap_key=lambda h: caught.append("key") or bytes(32),
                       emit=lambda event: None, cancelled=threading.Event())  # fmt: skip
        except OSError as err:
            caught.append(err)

    thread = threading.Thread(target=target)
    thread.start()
    while runner.status() is None:
        assert thread.is_alive(), caught
        threading.Event().wait(0.01)
    runner.cancel()
    thread.join(60)
    [err] = caught  # the key was never asked for
    assert err.errno == errno.ECANCELED and "cancelled from elsewhere" in err.strerror, err
    assert list(work.iterdir()) == []
    share.unlink("/dataset/huge.bin")
