"""The share confines every host path to its root: no `..`, no links, no special files."""

import errno
import hashlib
import os
import subprocess
import sys

import pytest

from ansible_collections.confidential_ml.nitro.enclave_server.share import TOP_LEVEL, Share, split_path


@pytest.fixture
def share(tmp_path):
    return Share(tmp_path / "share")


def test_layout_is_created(share):
    assert sorted(e["name"] for e in share.listdir("/")) == sorted(TOP_LEVEL)


def test_file_round_trip(share):
    share.mkdir("/dataset/images")
    share.create("/dataset/images/a.bin")
    payload = os.urandom(3 << 20)
    assert share.write("/dataset/images/a.bin", 0, payload) == len(payload)
    assert share.read("/dataset/images/a.bin", 0, len(payload)) == payload
    assert share.read("/dataset/images/a.bin", len(payload) - 5, 100) == payload[-5:]
    assert share.stat("/dataset/images/a.bin")["size"] == len(payload)
    share.truncate("/dataset/images/a.bin", 10)
    assert share.read("/dataset/images/a.bin", 0, 100) == payload[:10]
    share.rename("/dataset/images/a.bin", "/output/b.bin")
    assert [e["name"] for e in share.listdir("/output")] == ["b.bin"]
    share.chmod("/output/b.bin", 0o600)
    assert share.stat("/output/b.bin")["mode"] & 0o777 == 0o600
    share.utimens("/output/b.bin", 1_000_000_000, 2_000_000_000)
    assert share.stat("/output/b.bin")["mtime_ns"] == 2_000_000_000
    share.unlink("/output/b.bin")
    share.rmdir("/dataset/images")
    assert share.listdir("/dataset") == []
    assert share.statfs()["bsize"] > 0


@pytest.mark.parametrize(
    "path", ["/dataset/../../etc/passwd", "../x", "/dataset/./x", "/a\0b", "x" * 5000, "/" + "n" * 300]
)
def test_hostile_paths_are_refused(share, path):
    with pytest.raises(OSError) as caught:
        share.stat(path)
    assert caught.value.errno in (errno.EPERM, errno.EINVAL, errno.ENAMETOOLONG)


def test_symlinks_are_never_followed(share, tmp_path):
    secret = tmp_path / "plaintext"
    secret.mkdir()
    (secret / "model.py").write_text("secret")
    root = tmp_path / "share"
    # A job in the enclave could leave links behind in /output; the host must not pass through them.
    os.symlink(secret, root / "output" / "dirlink")
    os.symlink(secret / "model.py", root / "output" / "filelink")
    for path in ("/output/dirlink/model.py", "/output/filelink"):
        with pytest.raises(OSError) as caught:
            share.read(path, 0, 10)
        assert caught.value.errno in (errno.EPERM, errno.ENOTDIR)
    with pytest.raises(OSError):
        share.listdir("/output/dirlink")
    with pytest.raises(OSError):
        share.create("/output/filelink")
    with pytest.raises(OSError):
        share.write("/output/filelink", 0, b"x")
    with pytest.raises(OSError):
        share.chmod("/output/filelink", 0o777)
    assert (secret / "model.py").read_text() == "secret"


def test_special_files_are_refused(share, tmp_path):
    os.mkfifo(tmp_path / "share" / "output" / "fifo")
    with pytest.raises(OSError) as caught:
        share.read("/output/fifo", 0, 10)  # must not block on the fifo either
    assert caught.value.errno == errno.EPERM


def test_layout_cannot_be_removed_or_renamed(share):
    for call in (lambda: share.rmdir("/dataset"), lambda: share.rename("/output", "/out2")):
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == errno.EPERM
    with pytest.raises(OSError):
        share.unlink("/")


def test_split_path():
    assert split_path("/dataset//a/b.csv") == ["dataset", "a", "b.csv"]
    assert split_path("/") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_full_share_gives_enospc(tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    try:
        share = Share(root)
        share.create("/dataset/big")
        with pytest.raises(OSError) as caught:
            for i in range(4):
                share.write("/dataset/big", i << 20, b"\0" * (1 << 20))
        assert caught.value.errno == errno.ENOSPC
        # Nothing else is lost: the share still answers and earlier data is intact.
        assert share.stat("/dataset/big")["size"] > 0
        share.unlink("/dataset/big")
        share.create("/dataset/small")
        assert share.write("/dataset/small", 0, b"ok") == 2
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_create_with_data_returns_the_new_stat(share):
    st = share.create("/dataset/small.bin", 0o640, True, b"hello")
    assert st["size"] == 5 and st["mode"] & 0o777 == 0o640 & ~current_umask()
    assert share.read("/dataset/small.bin", 0, 100) == b"hello"
    with pytest.raises(FileExistsError):
        share.create("/dataset/small.bin", 0o640, True, b"again")
    assert share.read("/dataset/small.bin", 0, 100) == b"hello"
    # Not exclusive: the file is emptied, then takes the new data.
    assert share.create("/dataset/small.bin", 0o640, False, b"hi")["size"] == 2
    assert share.read("/dataset/small.bin", 0, 100) == b"hi"
    assert share.create("/dataset/empty.bin")["size"] == 0


def test_create_with_data_is_confined_like_every_path(share, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(share.root, "dataset", "link"))
    for path in ("/dataset/link/x", "/../outside/x", "/dataset/../../outside/x"):
        with pytest.raises(OSError) as info:
            share.create(path, 0o644, True, b"escape")
        assert info.value.errno in (errno.ENOTDIR, errno.EPERM)
    assert os.listdir(outside) == []


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_put_replaces_a_file_whole_and_leaves_no_temporary_file(share):
    assert share.put("/dataset/a.bin", 0o640, b"first") == 5
    assert share.read("/dataset/a.bin", 0, 100) == b"first"
    assert share.put("/dataset/a.bin", 0o640, b"second, longer") == 14
    assert share.read("/dataset/a.bin", 0, 100) == b"second, longer"
    assert share.put("/dataset/empty", 0o600, b"") == 0 and share.stat("/dataset/empty")["size"] == 0
    assert sorted(e["name"] for e in share.listdir("/dataset")) == ["a.bin", "empty"]
    assert share.sha256("/dataset/a.bin") == hashlib.sha256(b"second, longer").hexdigest()


def test_put_and_sha256_are_confined_like_every_path(share, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("plaintext")
    root = tmp_path / "share"
    os.symlink(outside, root / "output" / "dirlink")
    os.symlink(outside / "secret", root / "output" / "filelink")
    os.mkfifo(root / "output" / "fifo")
    share.mkdir("/output/folder")
    for path, codes in (("/output/dirlink/x", (errno.ENOTDIR,)), ("/../outside/x", (errno.EPERM,)),
                        ("/output/filelink", (errno.EPERM,)), ("/output/fifo", (errno.EPERM,)),
                        ("/output/folder", (errno.EISDIR,)), ("/", (errno.EPERM,)),
                        ("/output/missing/x", (errno.ENOENT,))):  # fmt: skip
        with pytest.raises(OSError) as caught:
            share.put(path, 0o644, b"escape")
        assert caught.value.errno in codes, path
    for path in ("/output/dirlink/secret", "/output/filelink", "/output/fifo", "/output/folder", "/../outside/secret"):
        with pytest.raises(OSError):
            share.sha256(path)
    assert os.listdir(outside) == ["secret"] and (outside / "secret").read_text() == "plaintext"
    assert os.path.islink(root / "output" / "filelink")  # the link itself was not replaced either
    assert not [n for n in os.listdir(root / "output") if n.startswith(".put-")]


def test_put_refuses_what_a_running_job_holds(share):
    share.put("/encrypted/app.pkg", 0o644, b"package")
    fd = os.open(os.path.join(share.root, "encrypted", "app.pkg"), os.O_RDONLY)
    try:
        share.hold("job 1", fd)
        for path in ("/encrypted/app.pkg", "/dataset/x", "/output/y"):
            with pytest.raises(OSError) as caught:
                share.put(path, 0o644, b"changed")
            assert caught.value.errno == errno.EBUSY, path
        assert share.put("/encrypted/other.pkg", 0o644, b"fine") == 4
    finally:
        share.release()
        os.close(fd)
    assert share.read("/encrypted/app.pkg", 0, 100) == b"package"


def test_a_job_ending_during_a_hold_check_still_refuses_with_ebusy(share, monkeypatch):
    """The job's thread releases the hold while a host call is between its check and its refusal (forced here at
    the one call in between): the host gets EBUSY naming the job, as the check saw it, not a TypeError."""
    from ansible_collections.confidential_ml.nitro.enclave_server import share as share_module

    share.put("/dataset/x", 0o644, b"input")
    share.put("/encrypted/app.pkg", 0o644, b"package")
    fd = os.open(os.path.join(share.root, "encrypted", "app.pkg"), os.O_RDONLY)
    real_split_path, real_fstat = share_module.split_path, os.fstat

    def split_path_as_the_job_ends(path):
        share.release()
        return real_split_path(path)

    def fstat_as_the_job_ends(fd):
        if sys._getframe(1).f_code.co_name == "_check_held_file":  # not the fstat that opening the file does
            share.release()
        return real_fstat(fd)

    try:
        share.hold("job 1", fd)
        with monkeypatch.context() as patch:
            patch.setattr(share_module, "split_path", split_path_as_the_job_ends)
            with pytest.raises(OSError) as caught:
                share.unlink("/dataset/x")
        assert (caught.value.errno, "job 1" in caught.value.strerror) == (errno.EBUSY, True)

        share.hold("job 2", fd)
        with monkeypatch.context() as patch:
            patch.setattr(share_module.os, "fstat", fstat_as_the_job_ends)
            with pytest.raises(OSError) as caught:
                share.write("/encrypted/app.pkg", 0, b"changed")
        assert (caught.value.errno, "job 2" in caught.value.strerror) == (errno.EBUSY, True)
    finally:
        share.release()
        os.close(fd)
    assert share.read("/dataset/x", 0, 100) == b"input"
    assert share.read("/encrypted/app.pkg", 0, 100) == b"package"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_put_into_a_full_share_keeps_the_old_file_and_leaves_nothing_partial(tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    try:
        share = Share(root)
        share.put("/dataset/f", 0o644, b"old contents")
        with pytest.raises(OSError) as caught:
            share.put("/dataset/f", 0o644, b"\1" * (2 << 20))
        assert caught.value.errno == errno.ENOSPC
        assert share.read("/dataset/f", 0, 100) == b"old contents"
        assert [e["name"] for e in share.listdir("/dataset")] == ["f"]
        assert share.statfs()["bfree"] == share.statfs()["blocks"] - 1  # the failed put's blocks are free again
    finally:
        subprocess.run(["umount", str(root)], check=True)
