"""`enclave sync`: the share mounted with FUSE, driven by real shell commands.

Each test mounts a real enclave server's share through the CLI in the
background (as the original sample's `client sync -d synced_folder` did),
works on it with cp, ls, mv, rm, cat, truncate, chmod, touch, df, dd and
sha256sum, checks what landed in the server's share directory on disk, and
unmounts through the CLI. Mounts are cleaned up even when a test fails.
"""

import contextlib
import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.cli import fusefs
from ansible_collections.confidential_ml.nitro.plugins.module_utils import mounts
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.wire_client import Connection

ENCLAVE = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main"]
TOP_LEVEL = ["dataset", "encrypted", "model", "output"]
MIB = 1 << 20

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3 (make deps)",
)


def cli(*args, check=True, timeout=120):
    result = subprocess.run([*ENCLAVE, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def sh(command, *, check=True, timeout=300, cwd=None, env=None):
    """A shell command line; a hang fails the test at the timeout instead of blocking the run."""
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            env=None if env is None else {**os.environ, **env}, check=False)  # fmt: skip
    if check:
        assert result.returncode == 0, f"{command}: {result.stderr}"
    return result


def sha256(path) -> str:
    return sh(f"sha256sum '{path}'").stdout.split()[0]


def gone(pid: int) -> bool:
    """The process has exited (it may linger as a zombie until its new parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def force_unmount(mnt: Path) -> None:
    """Teardown of last resort: whatever state the test left, no mount and no mount process remain."""
    state = mounts.mount_state(mnt)
    if mounts.is_mounted(mnt) and cli("sync", "-d", mnt, "--unmount", check=False).returncode != 0:
        for command in (["fusermount3", "-u", "-z", str(mnt)], ["umount", "-l", str(mnt)]):
            if not mounts.is_mounted(mnt):
                break
            subprocess.run(command, capture_output=True, check=False)
    if state and not gone(state["pid"]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(state["pid"], 9)


def mount(mnt: Path, *flags) -> dict:
    result = cli("sync", "-d", mnt, *flags)
    assert f"on {mnt}" in result.stdout
    state = mounts.mount_state(mnt)
    assert state and mounts.is_mounted(mnt)
    return state


@pytest.fixture
def synced(enclave, tmp_path_factory):
    """The enclave's share mounted (attested) on a folder that does not exist yet, away from the server's files."""
    mnt = tmp_path_factory.mktemp("host") / "synced_folder"
    try:
        state = mount(mnt, "--expect-pcr0", enclave["pcr0"])
        yield {**enclave, "mnt": mnt, "state": state, "src": tmp_path_factory.mktemp("src")}
    finally:
        force_unmount(mnt)


def unmount_and_stats(synced) -> dict:
    """Unmount through the CLI, check nothing is left, and return what the mount did."""
    mnt, state = synced["mnt"], synced["state"]
    assert "unmounted" in cli("sync", "-d", mnt, "--unmount").stdout
    assert not mounts.is_mounted(mnt)
    assert gone(state["pid"])
    return json.loads(Path(state["stats"]).read_text())


# ---------------------------------------------------------------- the everyday loop


def test_layout_copy_in_and_checksums_on_both_sides(synced):
    mnt, share, src = synced["mnt"], synced["share"], synced["src"]
    assert sh(f"ls '{mnt}'").stdout.split() == TOP_LEVEL
    (src / "data.csv").write_bytes(os.urandom(300_000))
    sh(f"cp '{src}/data.csv' '{mnt}/dataset/'")
    digest = sha256(src / "data.csv")
    assert sha256(mnt / "dataset" / "data.csv") == digest
    assert hashlib.sha256((share / "dataset" / "data.csv").read_bytes()).hexdigest() == digest
    # What the enclave writes is readable as it is.
    (share / "output" / "results.csv").write_text("a.txt,short\n")
    assert sh(f"cat '{mnt}/output/results.csv'").stdout == "a.txt,short\n"


def test_original_workflow_through_the_mount(synced):
    """client sync; cp package and dataset in; client run; read the output: as in the AWS sample."""
    mnt, src = synced["mnt"], synced["src"]
    (src / "a.txt").write_text("hi")
    (src / "b.txt").write_text("a much longer text")
    sh(f"cp '{synced['sealed']}' '{mnt}/encrypted/' && cp -r '{src}'/* '{mnt}/dataset/'")
    run = cli("run", "-f", "app.pkg", "-s", "ml_algorithm.py", "-a", "-m model.h5 -d /dataset/ -o /output/",
              "--expect-pcr0", synced["pcr0"])  # fmt: skip
    assert "classified b.txt long" in run.stdout
    assert sh(f"cat '{mnt}/output/results.csv'").stdout == "a.txt,short\nb.txt,long\n"


def test_tree_of_small_files_cp_ls_mv_rm(synced):
    mnt, share, src = synced["mnt"], synced["share"], synced["src"]
    tree = src / "tree"
    expected = {}
    for d in range(6):
        for f in range(40):
            path = tree / f"dir{d}" / ("sub" if f % 2 else "") / f"f{f:03}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(100 + 37 * f))
            expected[str(path.relative_to(tree))] = path.stat().st_size
    sh(f"cp -r '{tree}' '{mnt}/dataset/'")
    sh(f"diff -r '{tree}' '{mnt}/dataset/tree'")
    sh(f"diff -r '{tree}' '{share}/dataset/tree'")

    # ls -lR lists every file with its size.
    listed, directory = {}, None
    for line in sh(f"cd '{mnt}/dataset/tree' && ls -lR").stdout.splitlines():
        if line.endswith(":"):
            directory = line[:-1].removeprefix("./").removeprefix(".")
        elif line.startswith("-"):
            fields = line.split()
            listed[os.path.join(directory, fields[-1])] = int(fields[4])
    assert listed == expected

    sh(f"mv '{mnt}/dataset/tree/dir0' '{mnt}/model/moved'")
    sh(f"mv '{mnt}/model/moved/f000.bin' '{mnt}/model/first.bin'")
    assert sorted(os.listdir(share / "model")) == ["first.bin", "moved"]
    assert not (share / "dataset" / "tree" / "dir0").exists()
    assert sh(f"ls '{mnt}/model/moved/sub'").stdout.split() == [f"f{f:03}.bin" for f in range(1, 40, 2)]
    (src / "other").write_text("keep me")
    sh(f"cp '{src}/other' '{mnt}/model/other'")
    sh(f"mv -n '{mnt}/model/first.bin' '{mnt}/model/other'")  # no clobbering
    assert (share / "model" / "other").read_text() == "keep me" and (share / "model" / "first.bin").exists()

    sh(f"rm -r '{mnt}/dataset/tree' '{mnt}/model/moved'")
    assert os.listdir(share / "dataset") == []
    assert sorted(os.listdir(share / "model")) == ["first.bin", "other"]
    assert sh(f"ls -A '{mnt}/dataset'").stdout == ""
    # The layout of the share stays: its top-level folders cannot be removed or renamed.
    assert sh(f"rmdir '{mnt}/output'", check=False).returncode != 0
    assert sh(f"mv '{mnt}/model' '{mnt}/models'", check=False).returncode != 0
    assert sh(f"ls '{mnt}'").stdout.split() == TOP_LEVEL


def test_truncate_chmod_touch_df(synced):
    mnt, share = synced["mnt"], synced["share"]
    target = mnt / "dataset" / "f.txt"
    sh(f"printf 'hello world' > '{target}'")
    sh(f"truncate -s 5 '{target}'")
    assert sh(f"cat '{target}'").stdout == "hello"
    sh(f"truncate -s 1M '{target}'")
    assert (share / "dataset" / "f.txt").read_bytes() == b"hello" + bytes(MIB - 5)
    sh(f"printf 'new' > '{target}'")  # O_TRUNC on an existing file
    assert (share / "dataset" / "f.txt").read_bytes() == b"new"

    sh(f"chmod 640 '{target}'")
    assert (share / "dataset" / "f.txt").stat().st_mode & 0o777 == 0o640
    assert sh(f"stat -c %a '{target}'").stdout.strip() == "640"

    sh(f"touch -d '2001-02-03 04:05:06' '{target}'", env={"TZ": "UTC"})
    when = datetime.datetime(2001, 2, 3, 4, 5, 6, tzinfo=datetime.UTC).timestamp()
    assert (share / "dataset" / "f.txt").stat().st_mtime == when
    assert int(sh(f"stat -c %Y '{target}'").stdout) == int(when)
    sh(f"touch -m -d '2002-01-01 00:00:00' '{target}'", env={"TZ": "UTC"})  # atime left as it was
    assert (share / "dataset" / "f.txt").stat().st_atime == when

    df = sh(f"df -P -B1 '{mnt}'").stdout.splitlines()[1].split()
    vfs = os.statvfs(share)
    assert df[0] == "enclave" and df[-1] == str(mnt)
    assert int(df[1]) == vfs.f_blocks * vfs.f_frsize


@pytest.mark.slow
def test_500_mb_round_trip_in_1_mib_requests(synced):
    mnt, share = synced["mnt"], synced["share"]
    source = synced["src"] / "big.bin"
    sh(f"head -c 500M /dev/urandom > '{source}'")
    digest = sha256(source)
    sh(f"cp '{source}' '{mnt}/dataset/big.bin'")
    assert sha256(share / "dataset" / "big.bin") == digest
    assert sh(f"dd if='{mnt}/dataset/big.bin' bs=1M status=none | sha256sum").stdout.split()[0] == digest
    assert sha256(mnt / "dataset" / "big.bin") == digest
    source.unlink()
    stats = unmount_and_stats(synced)
    # cp was not split into small requests: every write carried 1 MiB.
    assert stats["write_sizes"] == {str(MIB): 500}
    assert stats["negotiated"]["max_write"] == MIB


def test_reader_and_writer_at_once(synced):
    mnt, src = synced["mnt"], synced["src"]
    sh(f"head -c 48M /dev/urandom > '{src}/a' && head -c 48M /dev/urandom > '{src}/b'")
    sh(f"cp '{src}/a' '{mnt}/dataset/a'")
    reader = subprocess.Popen(f"cat '{mnt}/dataset/a' > '{src}/a.back'", shell=True)
    writer = subprocess.Popen(f"cp '{src}/b' '{mnt}/dataset/b'", shell=True)
    assert reader.wait(timeout=300) == 0 and writer.wait(timeout=300) == 0
    assert sha256(src / "a.back") == sha256(src / "a")
    assert sha256(mnt / "dataset" / "b") == sha256(src / "b")
    assert sha256(synced["share"] / "dataset" / "b") == sha256(src / "b")


def test_writes_in_flight_land_in_order(synced):
    """Writes travel several at a time; overlapping ones still land in the order they were made,
    and times set after writing (cp -p) are not undone by a write landing late."""
    mnt, share, src = synced["mnt"], synced["share"], synced["src"]
    rewrite = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n"
        "for i in range(12):\n"
        "    os.pwrite(fd, bytes([65 + i]) * (1 << 20), (i % 3) << 19)\n"
        "os.close(fd)\n"
    )
    sh(f"{sys.executable} -c '{rewrite}' '{mnt}/dataset/rewritten'")
    expected = bytearray()
    for i in range(12):
        offset = (i % 3) << 19
        expected[offset : offset + MIB] = bytes([65 + i]) * MIB
    assert (share / "dataset" / "rewritten").read_bytes() == expected

    (src / "t.bin").write_bytes(os.urandom(5 * MIB + 123))
    os.utime(src / "t.bin", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    sh(f"cp -p '{src}/t.bin' '{mnt}/model/'")
    assert (share / "model" / "t.bin").stat().st_mtime_ns == 1_000_000_000_000_000_000
    assert sha256(share / "model" / "t.bin") == sha256(src / "t.bin")


# ---------------------------------------------------------------- confinement


def test_dot_dot_stays_on_the_host_side(synced):
    """The kernel resolves `..` before FUSE sees a path: climbing out of the mount lands in the
    host's own folders, never in the enclave's files beside the share."""
    mnt, share = synced["mnt"], synced["share"]
    (share.parent / "enclave-secret.txt").write_text("must not be visible")
    assert sh(f"ls '{mnt}/dataset/../..'").stdout.split() == ["synced_folder"]
    result = sh(f"cat '{mnt}/dataset/../../enclave-secret.txt'", check=False)
    assert result.returncode != 0 and "No such file" in result.stderr
    assert "must not be visible" not in sh(f"grep -rs . '{mnt}' || true").stdout
    # A path that still carries `..` (only a raw client can send one) is refused by the server, EPERM.
    with Connection.open(synced["endpoint"]) as connection:
        ops = fusefs.operations(connection, str(mnt))
        with pytest.raises(OSError) as refused:
            ops.getattr("/dataset/../../enclave-secret.txt")
        assert refused.value.errno == errno.EPERM


def test_links_cannot_be_made_or_followed(synced):
    mnt, share = synced["mnt"], synced["share"]
    sh(f"printf x > '{mnt}/model/f'")
    for command in (f"ln -s /etc/passwd '{mnt}/dataset/x'", f"ln '{mnt}/model/f' '{mnt}/model/hard'",
                    f"mkfifo '{mnt}/dataset/fifo'"):  # fmt: skip
        result = sh(command, check=False)
        assert result.returncode != 0 and "Operation not permitted" in result.stderr, command
    assert os.listdir(share / "dataset") == [] and os.listdir(share / "model") == ["f"]
    # A link planted in the share (as a job could) is neither followed on the host nor inside the enclave.
    os.symlink("/etc/passwd", share / "output" / "passwd")
    os.symlink("../dataset", share / "output" / "up")
    for path in ("output/passwd", "output/up/anything"):
        result = sh(f"cat '{mnt}/{path}'", check=False)
        assert result.returncode != 0 and "root:" not in result.stdout, path
    assert "Operation not permitted" in sh(f"cat '{mnt}/output/passwd'", check=False).stderr
    assert sh(f"cp '{mnt}/output/passwd' '{synced['src']}/copied'", check=False).returncode != 0


@contextlib.contextmanager
def own_server(tmp_path, share, *, umask=-1):
    """An enclave server of this test's own (no attestation: the share is what is under test),
    mounted in the background; yields the mount point."""
    sock = tmp_path / "16_5000.sock"
    (tmp_path / "work").mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.enclave_server", "--listen", f"unix://{sock}",
         "--share", str(share), "--work", str(tmp_path / "work"), "--nsm", f"unix://{tmp_path / 'no-nsm.sock'}"],
        umask=umask,
    )  # fmt: skip
    mnt = tmp_path / "host" / "synced_folder"
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, "the enclave server did not start"
            time.sleep(0.02)
        mount(mnt, "--endpoint", f"unix://{sock}", "--no-attestation")
        yield mnt
    finally:
        force_unmount(mnt)
        server.kill()
        server.wait(timeout=10)


def test_full_share_gives_enospc(tmp_path, monkeypatch):
    """A server whose share is a 4 MiB tmpfs (as the enclave's share is a tmpfs of its own)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the small share needs root")
    share = tmp_path / "share"
    share.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(share)], check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    monkeypatch.setenv("ENCLAVE_HOME", str(tmp_path / "home"))
    try:
        with own_server(tmp_path, share) as mnt:
            sh(f"head -c 8M /dev/urandom > '{tmp_path}/big'")
            result = sh(f"cp '{tmp_path}/big' '{mnt}/dataset/'", check=False)
            assert result.returncode != 0 and "No space left on device" in result.stderr
            assert (share / "dataset" / "big").stat().st_size <= 4 * MIB  # what fitted, not the 8 MiB
            sh(f"rm '{mnt}/dataset/big'")  # and the share recovers
            sh(f"head -c 1M /dev/urandom > '{tmp_path}/small' && cp '{tmp_path}/small' '{mnt}/dataset/'")
            assert sha256(share / "dataset" / "small") == sha256(tmp_path / "small")
    finally:
        subprocess.run(["umount", "-l", str(share)], check=False)


def test_full_share_fails_the_cp_of_small_files_that_filled_it(tmp_path, monkeypatch):
    """Small new files go to the server with their create, answered at close: a full share still fails the
    `cp -r` that filled it, and every file cp did not complain about is whole on the server."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the small share needs root")
    share = tmp_path / "share"
    share.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(share)], check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    monkeypatch.setenv("ENCLAVE_HOME", str(tmp_path / "home"))
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(400):  # 1.6 MiB in 4 KiB files into 1 MiB
        (tree / f"f{i:03}").write_bytes(os.urandom(4096))
    try:
        with own_server(tmp_path, share) as mnt:
            result = sh(f"cp -r '{tree}' '{mnt}/dataset/'", check=False)
            assert result.returncode != 0 and "No space left on device" in result.stderr, result.stderr
            failed = {Path(name).name for name in re.findall(r"'([^']+)'", result.stderr)}
            copied = share / "dataset" / "tree"
            whole = {p.name for p in copied.iterdir() if p.read_bytes() == (tree / p.name).read_bytes()}
            assert 0 < len(whole) < 400 and failed
            # Nothing lost silently: every file cp did not complain about is whole on the server.
            assert {f"f{i:03}" for i in range(400)} - whole <= failed, result.stderr
            sh(f"rm -r '{mnt}/dataset/tree'")  # and the share recovers
            sh(f"cp '{tree}/f000' '{mnt}/dataset/'")
            assert (share / "dataset" / "f000").read_bytes() == (tree / "f000").read_bytes()
    finally:
        subprocess.run(["umount", "-l", str(share)], check=False)


def test_new_files_show_the_mode_the_server_gave_them(tmp_path, monkeypatch):
    """The mount tells the kernel a new file's stat without asking the server, once it has seen what
    the server's umask (here 027, not the host's) does to the bits asked for."""
    monkeypatch.setenv("ENCLAVE_HOME", str(tmp_path / "home"))
    share = tmp_path / "share"
    with own_server(tmp_path, share, umask=0o027) as mnt:
        for i, mode in enumerate((0o644, 0o666, 0o644, 0o755, 0o600, 0o777, 0o755, 0o664)):
            sh(f"umask 0 && {sys.executable} -c 'import os; os.open(\"{mnt}/dataset/f{i}\", os.O_CREAT, {mode})'")
            on_disk = (share / "dataset" / f"f{i}").stat().st_mode & 0o777
            assert on_disk == mode & ~0o027
            assert sh(f"stat -c %a '{mnt}/dataset/f{i}'").stdout.strip() == f"{on_disk:o}"


# ---------------------------------------------------------------- failure and lifecycle


def test_killed_server_fails_operations_at_once(synced):
    mnt = synced["mnt"]
    sh(f"printf data > '{mnt}/dataset/f'")
    assert sh(f"cat '{mnt}/dataset/f'").stdout == "data"
    synced["server"].kill()
    synced["server"].wait(timeout=10)
    for command in (f"ls '{mnt}/dataset'", f"cat '{mnt}/dataset/f'", f"cp /etc/hostname '{mnt}/model/'"):
        result = sh(command, check=False, timeout=30)  # a hang fails here
        assert result.returncode != 0, command
        assert "Transport endpoint is not connected" in result.stderr, command
    # The mount still ends cleanly.
    unmount_and_stats(synced)
    assert "the connection to the enclave is lost" in Path(synced["state"]["log"]).read_text()


def test_unmount_leaves_no_process_and_no_mount(synced):
    mnt, pid = synced["mnt"], synced["state"]["pid"]
    assert not gone(pid)
    again = cli("sync", "-d", mnt, "--expect-pcr0", synced["pcr0"], check=False)
    assert again.returncode == 1 and "already a mount point" in again.stderr
    unmount_and_stats(synced)
    assert mounts.mount_state(mnt) is None
    assert os.listdir(mnt) == []
    second = cli("sync", "-d", mnt, "--unmount")  # a stop command with nothing to stop succeeds (issue 12)
    assert f"nothing was mounted at {mnt}" in second.stdout


def test_unmount_ends_the_mount_process_though_another_namespace_holds_a_copy(synced):
    """A mount namespace made while the share is mounted (unshare, a container, another test's enclave) holds a
    private copy of the mount: the unmount here does not reach it, so the kernel keeps the FUSE connection and
    the mount process served it until that namespace ended (the 30 s unmounts under a loaded test run)."""
    mnt, pid = synced["mnt"], synced["state"]["pid"]
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", "echo up; exec sleep 600"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "up\n"
        assert str(mnt) in Path(f"/proc/{holder.pid}/mountinfo").read_text()
        stats = unmount_and_stats(synced)
        assert stats["ops"]  # the process ended as an unmount ends it: its report is written
        assert gone(pid) and mounts.mount_state(mnt) is None
        # The copy is dead too: the kernel's connection ended with the process (its namespace lives on).
        inside = subprocess.run(["nsenter", "-t", str(holder.pid), "-m", "ls", str(mnt)], capture_output=True,
                                text=True, timeout=30, check=False)  # fmt: skip
        assert inside.returncode != 0 and "not connected" in inside.stderr, inside
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_sigterm_ends_the_mount_as_an_unmount_does(synced):
    """SIGTERM to the mount process (kill, a service manager) ends its session: what was written stays, the
    share is unmounted and the process reports and exits, rather than dying or calling it a failed mount."""
    mnt, share, state = synced["mnt"], synced["share"], synced["state"]
    sh(f"dd if=/dev/zero of='{mnt}/dataset/z' bs=1M count=3 status=none")
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 60
    while not gone(state["pid"]):
        assert time.monotonic() < deadline, "the mount process did not end its session on SIGTERM"
        time.sleep(0.05)
    assert not mounts.is_mounted(mnt) and mounts.mount_state(mnt) is None
    assert json.loads(Path(state["stats"]).read_text())["write_sizes"] == {str(MIB): 3}
    assert (share / "dataset" / "z").stat().st_size == 3 * MIB
    log = Path(state["log"]).read_text()
    assert "ending the session on request" in log and "could not mount" not in log, log


def test_mount_process_that_does_not_end_its_session_is_killed_and_named(synced, monkeypatch):
    """The last resort of an unmount: a process that has not exited EXIT_TIMEOUT after its SIGTERM (here a
    stopped one) is killed, and the error says so and where its log is."""
    mnt, pid = synced["mnt"], synced["state"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    monkeypatch.setattr(mounts, "EXIT_TIMEOUT", 0.5)
    with pytest.raises(EnclaveError) as stuck:
        mounts.unmount(mnt)
    assert f"its process {pid} did not end its session" in str(stuck.value) and "it was killed" in str(stuck.value)
    assert synced["state"]["log"] in str(stuck.value)
    assert not mounts.is_mounted(mnt)
    for _attempt in range(500):
        if gone(pid):
            break
        time.sleep(0.01)
    assert gone(pid)


def test_busy_mount_says_so_and_unmounts_once_free(synced):
    mnt = synced["mnt"]
    shell = subprocess.Popen(["sleep", "300"], cwd=mnt / "dataset")
    try:
        result = cli("sync", "-d", mnt, "--unmount", check=False)
        assert result.returncode == 1 and "a process still uses it" in result.stderr
        assert mounts.is_mounted(mnt)
        cli("sync", "-d", mnt, "--unmount", "--lazy")  # detached now; the process serves the user until it leaves
        assert not mounts.is_mounted(mnt) and not gone(synced["state"]["pid"])
    finally:
        shell.kill()
        shell.wait()
    deadline = time.monotonic() + 60
    while not gone(synced["state"]["pid"]):
        assert time.monotonic() < deadline, "the mount process did not exit once its last user left"
        time.sleep(0.05)
    assert mounts.mount_state(mnt) is None


def test_killed_mount_process_can_still_be_unmounted(synced):
    mnt = synced["mnt"]
    os.kill(synced["state"]["pid"], 9)
    for _attempt in range(500):  # the kernel notices at once; the process may take a moment to die
        if gone(synced["state"]["pid"]):
            break
        time.sleep(0.01)
    result = sh(f"ls '{mnt}'", check=False, timeout=30)  # the kernel answers for the dead process
    assert result.returncode != 0
    assert "Software caused connection abort" in result.stderr or "not connected" in result.stderr
    cli("sync", "-d", mnt, "--unmount")
    assert not mounts.is_mounted(mnt) and mounts.mount_state(mnt) is None


def test_unattested_enclave_gets_no_mount(enclave, tmp_path_factory):
    mnt = tmp_path_factory.mktemp("host") / "synced_folder"
    try:
        result = cli("sync", "-d", mnt, "--expect-pcr0", "ab" * 48, check=False)
        assert result.returncode == 1 and "failed attestation" in result.stderr
        assert not mounts.is_mounted(mnt) and mounts.mount_state(mnt) is None
    finally:
        force_unmount(mnt)


@contextlib.contextmanager
def foreground_mount(enclave, mnt: Path):
    """`enclave sync --foreground` on mnt, once its mount answers; afterwards no mount and no process is left."""
    proc = subprocess.Popen(
        [*ENCLAVE, "sync", "-d", str(mnt), "--foreground", "--expect-pcr0", enclave["pcr0"]],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while mounts.mount_state(mnt) is None:  # written once the mount answers
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the foreground mount never came up"
            time.sleep(0.05)
        yield proc
    finally:
        force_unmount(mnt)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_foreground_mount_serves_until_unmounted(enclave, tmp_path_factory):
    mnt = tmp_path_factory.mktemp("host") / "fg"
    with foreground_mount(enclave, mnt) as proc:
        assert mounts.mount_state(mnt)["pid"] == proc.pid
        assert sh(f"ls '{mnt}'").stdout.split() == TOP_LEVEL
        cli("sync", "-d", mnt, "--unmount")
        assert proc.wait(timeout=30) == 0


def test_ctrl_c_ends_a_foreground_mount(enclave, tmp_path_factory):
    """Ctrl-C (SIGINT) in the terminal of a foreground mount unmounts it and ends the command without an error."""
    mnt = tmp_path_factory.mktemp("host") / "fg"
    with foreground_mount(enclave, mnt) as proc:
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=60)[1]
        assert proc.returncode == 0, stderr
        assert "could not mount" not in stderr
        assert not mounts.is_mounted(mnt) and mounts.mount_state(mnt) is None


def test_new_files_are_created_with_their_data_in_one_request(synced):
    """A new small file's create waits for its first write (and carries the data) or its close; whatever
    touches the name in between sends the create first."""
    mnt, share, src = synced["mnt"], synced["share"], synced["src"]
    tree = src / "few"
    tree.mkdir()
    for i in range(20):
        (tree / f"f{i}").write_bytes(os.urandom(4096 + i))
    sh(f"cp -r '{tree}' '{mnt}/dataset/'")
    sh(f"diff -r '{tree}' '{share}/dataset/few'")
    # Created and closed without a write: an empty file.
    sh(f"touch '{mnt}/dataset/empty'")
    assert (share / "dataset" / "empty").stat().st_size == 0
    # Touched by other operations while open and unwritten: listed, renamed, then written.
    script = f"""
import os
fd = os.open("{mnt}/dataset/late", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
assert "late" in os.listdir("{mnt}/dataset")
assert os.path.exists("{share}/dataset/late")
os.rename("{mnt}/dataset/late", "{mnt}/dataset/renamed")
os.write(fd, b"after the rename")
os.close(fd)
"""
    sh(f"{sys.executable} -c '{script}'")
    assert (share / "dataset" / "renamed").read_bytes() == b"after the rename"
    assert not (share / "dataset" / "late").exists()
    # Made on the server by another client between the kernel's create and the write (a push): taken as
    # open(O_CREAT) without O_EXCL takes an existing file, and written over from offset 0 at the close.
    fd = os.open(mnt / "dataset" / "raced", os.O_WRONLY | os.O_CREAT, 0o644)
    (share / "dataset" / "raced").write_bytes(b"theirs, longer")
    os.write(fd, b"ours")
    os.close(fd)
    assert (share / "dataset" / "raced").read_bytes() == b"oursrs, longer"
    # An exclusive create of a name the mount knows fails at once, as it should.
    assert sh(f"{sys.executable} -c 'import os; os.open(\"{mnt}/dataset/few/f0\", os.O_CREAT | os.O_EXCL)'",
              check=False).returncode != 0  # fmt: skip
    stats = unmount_and_stats(synced)
    # One request per small file once the umask is known: its create carries the data.
    # The first file (umask unknown yet), "renamed" and "raced".
    assert stats["ops"].get("share.write", 0) <= 3
    assert stats["ops"]["share.create"] >= 20


def test_changes_to_a_running_jobs_folders_fail_the_command_that_tried(synced):
    """While a job runs, /dataset, /model and /output are the job's: every change through the mount fails the
    program that made it with EBUSY (a new small file's at its write or close), and nothing lands."""
    mnt, share, src = synced["mnt"], synced["share"], synced["src"]
    sh(f"cp '{synced['sealed']}' '{mnt}/encrypted/app.pkg' && printf hi > '{mnt}/dataset/a.txt'")
    (src / "new.txt").write_text("new")
    (src / "tree").mkdir()
    for i in range(5):
        (src / "tree" / f"f{i}").write_bytes(os.urandom(4096))
    job = subprocess.Popen([*ENCLAVE, "run", "-f", "app.pkg", "-s", "spin.py", "--expect-pcr0", synced["pcr0"]],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert job.stdout.readline() == "spinning\n", job.stderr.read()
        refused = {
            "cp of a new small file": f"cp '{src}/new.txt' '{mnt}/dataset/'",
            "cp -r into a job folder": f"cp -r '{src}/tree' '{mnt}/model/'",
            "touch (created, closed unwritten)": f"touch '{mnt}/model/t'",
            "rm": f"rm '{mnt}/dataset/a.txt'",
            "overwrite": f"printf changed > '{mnt}/dataset/a.txt'",
            "mv out of a job folder": f"mv '{mnt}/dataset/a.txt' '{mnt}/encrypted/'",
            "mkdir": f"mkdir '{mnt}/dataset/sub'",
        }
        for what, command in refused.items():
            result = sh(command, check=False)
            assert result.returncode != 0 and "Device or resource busy" in result.stderr, (what, result.stderr)
        for name in ("dataset/new.txt", "model/tree", "model/t", "dataset/sub"):
            assert not (share / name).exists(), name
            assert not os.path.lexists(mnt / name), name  # the mount does not show what failed to land
        assert (share / "dataset" / "a.txt").read_text() == "hi"
        sh(f"cp '{src}/new.txt' '{mnt}/encrypted/'")  # outside the job's folders the host works on
    finally:
        job.send_signal(2)  # Ctrl-C cancels the job
        job.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while sh(f"cp '{src}/new.txt' '{mnt}/dataset/'", check=False).returncode != 0:  # the job's end frees them
        assert time.monotonic() < deadline, "the share stayed busy after the job ended"
        time.sleep(0.1)
    assert (share / "dataset" / "new.txt").read_text() == "new"


def test_mount_without_attestation_is_refused(enclave, tmp_path_factory):
    mnt = tmp_path_factory.mktemp("host") / "unattested"
    try:
        result = cli("sync", "-d", mnt, check=False)
        assert result.returncode == 1
        assert "has not proven its image" in result.stderr and "--release release.json" in result.stderr
        empty = cli("sync", "-d", mnt, "--expect-pcr0", "", check=False)
        assert empty.returncode == 1 and "--expect-pcr0 is empty" in empty.stderr
        assert not mounts.is_mounted(mnt) and mounts.mount_state(mnt) is None
    finally:
        force_unmount(mnt)
