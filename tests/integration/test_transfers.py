"""Push, pull and share.batch against the real enclave server (a subprocess on a unix socket).

share.batch is hostile input like every request: the host chooses every operation, path, type and count in
it. Push and pull must copy exactly what differs, and an error (a full share, a dropped connection) must
never leave a partial file that a later push or pull would take for a whole one.
"""

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading

import pytest

from ansible_collections.confidential_ml.nitro.enclave_server.server import BATCH_MAX_OPS, BATCH_MAX_READ
from ansible_collections.confidential_ml.nitro.plugins.module_utils import client as client_lib
from ansible_collections.confidential_ml.nitro.plugins.module_utils import errors, wire_frames, wire_server
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import EnclaveError
from ansible_collections.confidential_ml.nitro.tests.fixtures.served import cli

MIB = 1 << 20


def tree(root) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under root, by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
    return out


def make_source(root, files: int = 300, big: int = 0) -> None:
    root.mkdir()
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-folder").mkdir()
    for i in range(files):
        folder = root if i % 3 == 0 else root / "sub" if i % 3 == 1 else root / "sub" / "deeper"
        (folder / f"f{i:04}.csv").write_bytes(os.urandom(random.randrange(0, 9000)))
    (root / "empty.bin").write_bytes(b"")
    if big:
        (root / "sub" / "big.bin").write_bytes(os.urandom(big))


def test_push_and_pull_copy_exactly_what_differs(enclave, tmp_path):
    src = tmp_path / "src"
    make_source(src, big=3 * MIB + 17)
    share = enclave["share"] / "dataset" / "run"
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        assert "share.batch" in client.connection.ops
        first = client.push(src, "/dataset/run")
        assert sorted(first["changed"]) == sorted(tree(src)) and first["unchanged"] == 0
        assert first["bytes"] == sum(len(v) for v in tree(src).values() if v is not None)
        assert tree(share) == tree(src)

        before = {str(p): p.stat().st_mtime_ns for p in share.rglob("*")}
        again = client.push(src, "/dataset/run")  # unchanged files are skipped: nothing is sent
        assert again["changed"] == [] and again["unchanged"] == len(tree(src)) and again["bytes"] == 0
        assert {str(p): p.stat().st_mtime_ns for p in share.rglob("*")} == before  # nothing was written

        # Same size, other bytes: found by SHA-256. Another size: found without hashing. A new file and folder.
        (src / "f0000.csv").write_bytes(b"x" * len((src / "f0000.csv").read_bytes()))
        (src / "sub" / "big.bin").write_bytes(os.urandom(3 * MIB + 17))
        (src / "sub" / "f0001.csv").write_bytes(b"another size " * 1000)
        (src / "new").mkdir()
        (src / "new" / "n.txt").write_text("new")
        third = client.push(src, "/dataset/run")
        assert sorted(third["changed"]) == ["f0000.csv", "new", "new/n.txt", "sub/big.bin", "sub/f0001.csv"]
        assert tree(share) == tree(src)
        assert not [p for p in tree(share) if ".part" in p or ".put-" in p]

        out = tmp_path / "out"
        pulled = client.pull("/dataset/run", out)
        assert sorted(pulled["changed"]) == sorted(tree(src)) and tree(out) == tree(src)
        assert client.pull("/dataset/run", out)["changed"] == []
        # A local file of the same size but other bytes is replaced; one of another size too.
        (out / "sub" / "big.bin").write_bytes(os.urandom(3 * MIB + 17))
        (out / "f0003.csv").write_bytes(b"")
        assert sorted(client.pull("/dataset/run", out)["changed"]) == ["f0003.csv", "sub/big.bin"]
        assert tree(out) == tree(src)
        assert not [p for p in tree(out) if ".part" in p]


def test_push_with_progress_shows_it_on_stderr_and_the_cli_without_a_tty_does_not(
    enclave, tmp_path, capsys, monkeypatch
):
    src = tmp_path / "src"
    make_source(src, files=10, big=2 * MIB)
    monkeypatch.setattr(client_lib, "PROGRESS_DELAY", 0)  # the bars appear after a second; this push is faster
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        client.push(src, "/dataset/p", progress=True)
        client.push(src, "/dataset/p", progress=True)  # the second push hashes both sides
        client.pull("/dataset/p", tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    for what in ("push:", "hashing:", "pull:"):  # bars in bytes, of the 2 MiB and the small files
        assert re.search(rf"\r{what} +\d+%\|.*/2\.\d\dM \[", err), (what, err)
    quiet = cli("push", str(src), "/dataset/q", "--expect-pcr0", enclave["pcr0"])
    assert "%" not in quiet.stderr and quiet.stdout.count("\n") == 1


def test_a_small_file_that_grows_while_it_is_pushed_is_sent_whole_or_refused(enclave, tmp_path, monkeypatch):
    """Between the listing and the read a file grows: still small, it goes as it is now; past what a batch
    carries, the push stops before sending that batch and says to push again."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_bytes(b"a" * 100)
    (src / "b.csv").write_bytes(b"b" * 100)
    listed = client_lib.local_manifest
    growth = {}

    def grow_after_listing(root, **kw):
        out = listed(root, **kw)
        for name, data in growth.items():
            (src / name).write_bytes(data)
        return out

    monkeypatch.setattr(client_lib, "local_manifest", grow_after_listing)
    share = enclave["share"] / "dataset"
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        growth = {"a.csv": b"A" * 5000}
        assert client.push(src, "/dataset")["changed"] == ["a.csv", "b.csv"]
        assert tree(share) == {"a.csv": b"A" * 5000, "b.csv": b"b" * 100}
        growth = {"b.csv": os.urandom(client_lib.SMALL_FILE + 1), "a.csv": b"a" * 100}
        with pytest.raises(EnclaveError, match=r"b\.csv grew while it was being pushed; push again"):
            client.push(src, "/dataset")
        assert tree(share) == {"a.csv": b"A" * 5000, "b.csv": b"b" * 100}  # that batch was not sent
        growth = {}
        client.push(src, "/dataset")
    assert tree(share) == tree(src)


def test_progress_costs_nothing_before_it_is_shown(enclave, tmp_path, capsys, monkeypatch):
    """A bar appears only after PROGRESS_DELAY seconds, and tqdm (~25 ms to import) is not imported before."""
    src = tmp_path / "src"
    make_source(src, files=10, big=2 * MIB)
    monkeypatch.setattr(client_lib, "PROGRESS_DELAY", 3600)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # an import of tqdm now raises ImportError
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        assert client.push(src, "/dataset/p", progress=True)["changed"]
        client.push(src, "/dataset/p", progress=True)
        client.pull("/dataset/p", tmp_path / "out", progress=True)
    assert capsys.readouterr().err == "" and tree(tmp_path / "out") == tree(src)


def test_only_a_transfer_that_streams_a_bigger_file_tunes_malloc(enclave, tmp_path, monkeypatch):
    """keep_freed_memory looks libc up (ctypes.util runs ldconfig, ~10 ms): small files in batches skip it."""
    tuned = []
    monkeypatch.setattr(client_lib, "keep_freed_memory", lambda: tuned.append(True))
    src = tmp_path / "src"
    make_source(src, files=20)
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        client.push(src, "/dataset/t")
        client.pull("/dataset/t", tmp_path / "out")
        assert tuned == []
        (src / "big.bin").write_bytes(os.urandom(client_lib.SMALL_FILE + 1))
        client.push(src, "/dataset/t")
        client.pull("/dataset/t", tmp_path / "out")
    assert tuned == [True, True] and tree(tmp_path / "out") == tree(src)


def batch(client, ops):
    return client.call("share.batch", {"ops": ops})


def test_batch_applies_operations_in_order_and_answers_each(enclave):
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        results = batch(client, [
            {"op": "mkdir", "path": "/dataset/b", "mode": 0o755},
            {"op": "put", "path": "/dataset/b/x", "mode": 0o644, "data": b"hello"},
            {"op": "put", "path": "/dataset/missing/y", "data": b"lost"},  # fails alone
            {"op": "read", "path": "/dataset/b/x", "offset": 0, "size": 100},
            {"op": "sha256", "path": "/dataset/b/x"},
            {"op": "rename", "old": "/dataset/b/x", "new": "/dataset/b/z"},
            {"op": "stat", "path": "/dataset/b/z"},
            {"op": "unlink", "path": "/dataset/b/x"},  # renamed away by the op before: ENOENT
        ])  # fmt: skip
        assert results[0] == {"ok": None} and results[1] == {"ok": 5}
        assert results[2]["error"]["name"] == "ENOENT"
        assert results[3] == {"ok": b"hello"} and results[4] == {"ok": hashlib.sha256(b"hello").hexdigest()}
        assert results[5] == {"ok": None} and results[6]["ok"]["size"] == 5
        assert results[7]["error"]["name"] == "ENOENT"
    assert sorted(os.listdir(enclave["share"] / "dataset" / "b")) == ["z"]


def test_a_batch_reaches_the_folder_its_paths_name_after_it_moved_or_removed_one(enclave):
    """A batch keeps the folder its last path resolved to open (Share.batch_folder): an operation after a
    rename or rmdir in the same batch must still land where its path names now, not in the old folder."""
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        results = batch(client, [
            {"op": "mkdir", "path": "/dataset/a"},
            {"op": "put", "path": "/dataset/a/1", "data": b"1"},  # /dataset/a is the batch's folder now
            {"op": "rename", "old": "/dataset/a", "new": "/dataset/b"},
            {"op": "mkdir", "path": "/dataset/a"},
            {"op": "put", "path": "/dataset/a/2", "data": b"2"},  # the new /dataset/a, not /dataset/b
            {"op": "put", "path": "/dataset/b/3", "data": b"3"},
            {"op": "unlink", "path": "/dataset/a/2"},
            {"op": "rmdir", "path": "/dataset/a"},
            {"op": "put", "path": "/dataset/a/4", "data": b"4"},  # no such folder any more
            {"op": "mkdir", "path": "/dataset/a"},
            {"op": "put", "path": "/dataset/a/5", "data": b"5"},
            {"op": "read", "path": "/dataset/a/5", "offset": 0, "size": 10},
        ])  # fmt: skip
        assert [next(iter(r)) for r in results] == ["ok"] * 8 + ["error", "ok", "ok", "ok"], results
        assert results[8]["error"]["name"] == "ENOENT" and results[11] == {"ok": b"5"}
    assert tree(enclave["share"] / "dataset") == {"a": None, "a/5": b"5", "b": None, "b/1": b"1", "b/3": b"3"}


def test_batches_leave_no_descriptor_open_in_the_server(enclave):
    """Whatever a batch holds open while it runs (its folder) is closed when it ends, failed operations and
    refused batches included: the host cannot make the server run out of descriptors."""

    def open_fds() -> dict:
        """The server's descriptors of files and folders in the share: what a batch opens. (Only those: the
        server's start-up warms boto3 on a thread meanwhile, and a module it is importing was open, once.)"""
        fds, share = f"/proc/{enclave['server'].pid}/fd", str(enclave["share"])
        found = {}
        for fd in os.listdir(fds):
            with contextlib.suppress(OSError):
                found[fd] = os.readlink(f"{fds}/{fd}")
        return {fd: target for fd, target in found.items() if target == share or target.startswith(share + "/")}

    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        batch(client, [{"op": "put", "path": "/dataset/warm", "data": b""}])
        before = open_fds()
        for round_ in range(50):
            results = batch(client, [
                {"op": "mkdir", "path": f"/dataset/d{round_}"},
                *({"op": "put", "path": f"/dataset/d{round_}/{i}", "data": b"x"} for i in range(20)),
                {"op": "put", "path": f"/dataset/missing/{round_}", "data": b"x"},
                {"op": "sha256", "path": f"/dataset/d{round_}"},  # a folder: EISDIR
                {"op": "stat", "path": "/dataset/warm"},
            ])  # fmt: skip
            assert sum("error" in r for r in results) == 2
            with pytest.raises(errors.RemoteError):
                client.call("share.batch", {"ops": [{"op": "read", "path": "/dataset/warm", "offset": 0,
                                                     "size": BATCH_MAX_READ + 1}]})  # fmt: skip
        after = open_fds()
        assert after == before, f"the server's descriptors changed: {sorted(set(after.items()) ^ set(before.items()))}"


def test_hostile_batches_are_refused_and_change_nothing_outside_the_share(enclave, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("plaintext")
    share = enclave["share"]
    os.symlink(outside, share / "output" / "dirlink")
    os.symlink(outside / "secret", share / "output" / "filelink")
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        escapes = [{"op": "put", "path": path, "data": b"escape"} for path in (
            "/dataset/../../outside/x", "../x", "/output/dirlink/x", "/output/filelink", "/", "/dataset/\0x",
            "/" + "n" * 300, "x/" * 3000,
        )]  # fmt: skip
        escapes += [
            {"op": "sha256", "path": "/output/filelink"},
            {"op": "read", "path": "/output/dirlink/secret", "offset": 0, "size": 10},
            {"op": "rename", "old": "/dataset", "new": "/gone"},
            {"op": "rmdir", "path": "/output"},
            {"op": "mkdir", "path": "/output/dirlink/new"},
        ]
        for result in batch(client, escapes):
            assert result["error"]["name"] in ("EPERM", "EINVAL", "ENOTDIR", "ENAMETOOLONG", "ENOENT"), result
            assert len(result["error"]["message"]) <= 200
        # Wrong types, per operation: each is EINVAL, and the others are still applied.
        wrong = [None, 7, "put", [], {}, {"op": 3}, {"op": "batch", "ops": []}, {"op": "manifest", "path": "/"},
                 {"op": "list", "path": "/"}, {"op": "put", "path": 5, "data": b""},
                 {"op": "put", "path": "/dataset/t", "data": "text"},
                 {"op": "put", "path": "/dataset/t", "mode": True, "data": b""},
                 {"op": "read", "path": "/dataset/t", "offset": -1, "size": 1},
                 {"op": "write", "path": "/dataset/t", "offset": "0", "data": b""},
                 {"op": "put", "path": "/dataset/ok", "data": b"applied"}]  # fmt: skip
        results = batch(client, wrong)
        assert [r.get("error", {}).get("name") for r in results[:-1]] == ["EINVAL"] * (len(wrong) - 1)
        assert results[-1] == {"ok": 7}
        # Whole batches refused before anything is applied: not a list, empty, too many, reads asking too much.
        many = [{"op": "put", "path": f"/dataset/many{i}", "data": b""} for i in range(BATCH_MAX_OPS + 1)]
        greedy = [{"op": "read", "path": "/dataset/ok", "offset": 0, "size": BATCH_MAX_READ // 2 + 1}] * 2
        for args in ({"ops": None}, {"ops": {}}, {"ops": []}, {}, {"ops": many},
                     {"ops": [{"op": "mkdir", "path": "/dataset/first"}, *greedy]}):  # fmt: skip
            with pytest.raises(errors.RemoteError) as caught:
                client.call("share.batch", args)
            assert caught.value.errno == errno.EINVAL
        # A batch over the frame limit is never sent; the connection stays usable.
        with pytest.raises(errors.FrameTooLargeError):
            batch(client, [{"op": "put", "path": "/dataset/huge", "data": b"\0" * (4 * MIB)}])
        assert client.call("health")["server"]
    assert sorted(os.listdir(outside)) == ["secret"] and (outside / "secret").read_text() == "plaintext"
    assert os.listdir(share / "dataset") == ["ok"]  # nothing of the refused operations and batches
    assert enclave["server"].poll() is None


def test_fuzzed_batches_get_an_answer_and_leave_the_server_serving(enclave):
    rng = random.Random(1313)
    values = [None, True, -1, 0, 2**70, 1.5, "", "/", "/dataset", "/dataset/f", "/output/../x", "\0", b"",
              b"\xff" * 100, [], {}, {"op": "put"}, "x" * 300]  # fmt: skip
    names = ["put", "mkdir", "read", "sha256", "write", "create", "truncate", "chmod", "utimens", "unlink", "rmdir",
             "rename", "stat", "batch", "job.run", "attest", None, 5]  # fmt: skip
    keys = ["path", "old", "new", "data", "offset", "size", "mode", "exclusive", "atime_ns", "mtime_ns"]
    with EnclaveClient(enclave["endpoint"]) as client:
        for _round in range(40):
            ops = []
            for _op in range(rng.randrange(1, 30)):
                op = {key: rng.choice(values) for key in rng.sample(keys, rng.randrange(0, 5))}
                op["op"] = rng.choice(names)
                ops.append(op if rng.random() > 0.05 else rng.choice(values))
            try:
                results = batch(client, ops)
            except errors.RemoteError as err:
                assert err.errno == errno.EINVAL  # a read asked for more than a batch may
                continue
            assert len(results) == len(ops)
            for result in results:
                assert set(result) in ({"ok"}, {"error"})
                if "error" in result:
                    assert result["error"]["name"] != "EIO", result  # no handler crashed on a type
        assert client.call("health")["server"]
    assert enclave["server"].poll() is None


@pytest.fixture
def small_dataset(enclave):
    """/dataset of the enclave's share as a tmpfs of 2 MiB (root only): a share that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    target = enclave["share"] / "dataset"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(target)], check=True)
    yield target
    subprocess.run(["umount", str(target)], check=True)


@pytest.mark.parametrize("big", [False, True])
def test_a_full_share_fails_the_push_plainly_and_leaves_no_partial_file(enclave, small_dataset, tmp_path, big):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_bytes(b"a" * 1000)
    (src / "folder").mkdir()
    if big:  # streamed under a temporary name
        (src / "big.bin").write_bytes(os.urandom(3 * MIB))
    else:  # small files in batches: the later ones do not fit
        for i in range(6):
            (src / f"part{i}.bin").write_bytes(os.urandom(MIB - 100))
    result = cli("push", str(src), "/dataset", "--expect-pcr0", enclave["pcr0"], check=False)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "the enclave's share is full" in message and " free" in message and "push again" in message
    assert "Traceback" not in result.stderr and "ENOSPC" not in result.stderr
    # Whatever is in the share is whole: each file there is the source's, and no temporary file is left. The
    # folders push made first stay (the user's tree, partly copied): the next push adds what is missing.
    left = tree(small_dataset)
    assert left.pop("folder", "missing") is None
    assert left and all(left[name] == (src / name).read_bytes() for name in left), sorted(left)
    assert len(left) < len(os.listdir(src)) - 1


def test_a_dropped_connection_leaves_no_half_written_file(enclave, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(6 * MIB))
    share = enclave["share"] / "dataset"
    (share / "big.bin").write_bytes(b"the previous version")
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        submit = client.connection.submit
        writes = []

        def drop_after_two_writes(op, args=None, **kw):
            if op == "share.write":
                writes.append(args["offset"])
                if len(writes) > 2:
                    client.connection.close()  # the host's side goes away mid-file
            return submit(op, args, **kw)

        monkeypatch.setattr(client.connection, "submit", drop_after_two_writes)
        with pytest.raises(errors.ConnectionClosedError):
            client.push(src, "/dataset")
    # The target is untouched; the dropped push's temporary file could not be removed over a closed connection.
    assert (share / "big.bin").read_bytes() == b"the previous version"
    assert [n for n in os.listdir(share) if n != "big.bin"] and all(
        client_lib.PUSH_TEMP.fullmatch(n) for n in os.listdir(share) if n != "big.bin"
    )
    # Until the next push removes it, a pull never copies that half file to the host.
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        assert client.pull("/dataset", tmp_path / "pulled")["changed"] == ["big.bin"]
    assert tree(tmp_path / "pulled") == {"big.bin": b"the previous version"}
    # The next push sends the file (it is not taken for unchanged) and removes the leftover.
    pushed = json.loads(cli("push", str(src), "/dataset", "--expect-pcr0", enclave["pcr0"], "--json").stdout)
    assert pushed["changed"] == ["big.bin"]
    assert os.listdir(share) == ["big.bin"] and (share / "big.bin").read_bytes() == (src / "big.bin").read_bytes()


@pytest.mark.parametrize("change", ["rewritten", "removed"])
def test_a_big_file_that_changes_while_it_is_pulled_is_refused(enclave, tmp_path, monkeypatch, change):
    """Its first MiB arrives as it was, then the enclave's file changes: rewritten, the bytes received match
    neither version; removed, the next reads fail. Either way the pull fails and leaves the host's file as it
    was, no temporary file, and no thread still hashing."""
    share_file = enclave["share"] / "output" / "big.bin"
    share_file.write_bytes(os.urandom(3 * MIB))
    out = tmp_path / "out"
    out.mkdir()
    (out / "big.bin").write_bytes(b"the host's copy")
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        submit = client.connection.submit
        reads = []

        def change_after_the_first_read(op, args=None, **kw):
            call = submit(op, args, **kw)
            if op == "share.read":
                reads.append(call)
                if len(reads) == 1:
                    call.result()  # the first MiB, as it was
                    if change == "removed":
                        share_file.unlink()
                    else:
                        with open(share_file, "r+b") as f:  # the same file, every byte replaced
                            f.write(os.urandom(3 * MIB))
            return call

        monkeypatch.setattr(client.connection, "submit", change_after_the_first_read)
        with pytest.raises(EnclaveError) as caught:
            client.pull("/output", out)
        if change == "rewritten":
            assert "changed while it was being pulled" in str(caught.value)
        else:
            assert isinstance(caught.value, errors.RemoteError) and caught.value.errno == errno.ENOENT
        assert len(reads) == 3
    assert os.listdir(out) == ["big.bin"] and (out / "big.bin").read_bytes() == b"the host's copy"
    assert not [t for t in threading.enumerate() if t.name == "pull-sha256"]


def test_pull_never_writes_through_a_link_on_the_host(enclave, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with EnclaveClient(enclave["endpoint"], expect_pcr0=enclave["pcr0"]) as client:
        batch(client, [{"op": "mkdir", "path": "/output/sub"}, {"op": "put", "path": "/output/sub/r.csv", "data": b"1"},
                       {"op": "put", "path": "/output/top.csv", "data": b"2"}])  # fmt: skip
        out = tmp_path / "out"
        out.mkdir()
        (out / "sub").symlink_to(elsewhere)  # a planted folder link
        with pytest.raises(EnclaveError, match="is a symbolic link: refusing to write through it"):
            client.pull("/output", out)
        (out / "sub").unlink()
        (out / "top.csv").symlink_to(elsewhere / "target.csv")  # a planted file link
        with pytest.raises(EnclaveError, match="is a symbolic link"):
            client.pull("/output", out)
        assert os.listdir(elsewhere) == []
        (out / "top.csv").unlink()
        shutil.rmtree(out / "sub")  # the pull before made it: folders come before the files
        (out / "sub").write_text("a file where the enclave has a folder")
        with pytest.raises(EnclaveError, match="is a file here but a folder in the enclave"):
            client.pull("/output", out)
        (out / "sub").unlink()
        assert sorted(client.pull("/output", out)["changed"]) == ["sub", "sub/r.csv", "top.csv"]
    assert tree(out) == {"sub": None, "sub/r.csv": b"1", "top.csv": b"2"}


def test_pull_from_a_server_without_batch_uses_its_manifest_hashes(tmp_path):
    """An older enclave image has no share.batch: pull compares by the SHA-256 its manifest lists and reads per
    file, and still refuses a file whose bytes do not match that hash."""
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.endpoints import Endpoint

    files = {"a.csv": b"small", "big.bin": os.urandom(2 * MIB + 5)}
    listed = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    seen = []

    def manifest(args, ctx):
        seen.append(("manifest", args.get("hash")))
        return [
            {"path": name, "type": "file", "mode": 0o644, "size": len(data), "sha256": listed[name]}
            for name, data in files.items()
        ]

    def read(args, ctx):
        seen.append("read")
        data = files[args["path"].rsplit("/", 1)[-1]]
        return data[args["offset"] : args["offset"] + args["size"]]

    endpoint = Endpoint.unix(str(tmp_path / "old.sock"))
    server = wire_server.Server(endpoint.listen(), {"share.manifest": manifest, "share.read": read})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with EnclaveClient(str(endpoint)) as client:
            assert sorted(client.pull("/output", tmp_path / "out")["changed"]) == ["a.csv", "big.bin"]
            assert tree(tmp_path / "out") == files and seen[0] == ("manifest", True)
            assert client.pull("/output", tmp_path / "out")["changed"] == []
            files["a.csv"] = b"other"  # same size, other bytes than the manifest says: refused, nothing written
            listed["a.csv"] = hashlib.sha256(b"other").hexdigest()
            (tmp_path / "out" / "a.csv").write_bytes(b"local")
            files["a.csv"] = b"torn!"
            with pytest.raises(EnclaveError, match="changed while it was being pulled"):
                client.pull("/output", tmp_path / "out")
            assert (tmp_path / "out" / "a.csv").read_bytes() == b"local"
            assert sorted(os.listdir(tmp_path / "out")) == ["a.csv", "big.bin"]
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
def bare_server(tmp_path):
    """The enclave server's handlers in this process, without an NSM (share operations only)."""
    from ansible_collections.confidential_ml.nitro.enclave_server.server import EnclaveServer

    (tmp_path / "work").mkdir()
    return EnclaveServer(share_dir=tmp_path / "share", work_dir=tmp_path / "work", nsm=None)


def test_a_cancelled_batch_applies_nothing_more(bare_server, tmp_path):
    cancelled = threading.Event()
    ctx = wire_server.RequestContext(id=1, op="share.batch", peer="test", cancelled=cancelled, _emit=None)
    ops = [{"op": "put", "path": f"/dataset/f{i}", "data": b"x"} for i in range(5)]
    applied = bare_server.batch({"ops": ops[:2]}, ctx)
    assert applied == [{"ok": 1}, {"ok": 1}]
    cancelled.set()  # the client cancelled (or went away) while the batch waited or ran
    results = bare_server.batch({"ops": ops[2:]}, ctx)
    assert [r["error"]["name"] for r in results] == ["ECANCELED"] * 3
    assert sorted(os.listdir(tmp_path / "share" / "dataset")) == ["f0", "f1"]


def test_push_and_pull_fit_a_server_with_the_smallest_frame_limit(bare_server, tmp_path):
    """A server may announce max_frame 64 KiB: batches, chunks and reads shrink to fit it."""
    from ansible_collections.confidential_ml.nitro.enclave_server.server import INLINE_OPS
    from ansible_collections.confidential_ml.nitro.plugins.module_utils.endpoints import Endpoint

    enclave = bare_server
    endpoint = Endpoint.unix(str(tmp_path / "small.sock"))
    server = wire_server.Server(
        endpoint.listen(), enclave.handlers(), max_frame=wire_frames.MIN_FRAME, inline=INLINE_OPS
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    src = tmp_path / "src"
    src.mkdir()
    for i, size in enumerate((0, 100, 20_000, 40_000, 70_000, 300_000)):
        (src / f"f{i}").write_bytes(os.urandom(size))
    try:
        with EnclaveClient(str(endpoint)) as client:
            assert client.connection.max_frame == wire_frames.MIN_FRAME
            assert len(client.push(src, "/dataset/d")["changed"]) == 6
            assert client.push(src, "/dataset/d")["changed"] == []
            assert len(client.pull("/dataset/d", tmp_path / "out")["changed"]) == 6
    finally:
        server.shutdown()
        thread.join()
    assert tree(tmp_path / "share" / "dataset" / "d") == tree(src) == tree(tmp_path / "out")
