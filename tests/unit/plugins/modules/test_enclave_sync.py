"""enclave_sync through main() against a real served enclave: push, pull, check mode, diff, FUSE mount.

The enclave's share is a directory of the server subprocess (enclave["share"]); what the module reports is
checked against it.
"""

import contextlib
import hashlib
import json
import os

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils import mounts
from ansible_collections.confidential_ml.nitro.plugins.modules import enclave_sync


def tree(root):
    """{relative path: SHA-256} of the regular files under root."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "dataset"
    (root / "images").mkdir(parents=True)
    (root / "a.csv").write_text("x,y\n1,2\n")
    (root / "images" / "1.png").write_bytes(os.urandom(3 << 20))  # several 1 MiB chunks
    return root


def push(dataset, **extra):
    return {"mode": "push", "src": str(dataset), "dest": "/dataset", **extra}


def test_push_copies_then_changes_nothing(run_module, enclave, dataset):
    first = run_module(enclave_sync.main, push(dataset, expect_pcr0=enclave["pcr0"]))
    assert first["changed"] is True
    assert first["changed_files"] == ["a.csv", "images", "images/1.png"]
    assert first["unchanged"] == 0
    assert first["bytes"] == (3 << 20) + len("x,y\n1,2\n")
    assert (first["src"], first["dest"]) == (str(dataset), "/dataset")
    assert tree(enclave["share"] / "dataset") == tree(dataset)

    second = run_module(enclave_sync.main, push(dataset, expect_pcr0=enclave["pcr0"]))
    assert second["changed"] is False
    assert second["changed_files"] == [] and second["unchanged"] == 3 and second["bytes"] == 0

    (dataset / "a.csv").write_text("x,y\n1,3\n")
    release = dataset.parent / "release.json"  # as the owner's pipeline publishes it
    release.write_text(json.dumps({"format": 1, "image": {"measurements": {"pcr0": enclave["pcr0"]}}}))
    third = run_module(enclave_sync.main, push(dataset, release=str(release)))
    assert third["changed"] is True and third["changed_files"] == ["a.csv"] and third["unchanged"] == 2
    assert (enclave["share"] / "dataset" / "a.csv").read_text() == "x,y\n1,3\n"


def test_check_mode_lists_without_copying_and_diff_names_the_files(run_module, enclave, dataset):
    result = run_module(enclave_sync.main, push(dataset, expect_pcr0=enclave["pcr0"]), check_mode=True, diff=True)
    assert result["changed"] is True
    assert result["changed_files"] == ["a.csv", "images", "images/1.png"]
    assert result["bytes"] == (3 << 20) + 8
    assert list((enclave["share"] / "dataset").iterdir()) == []
    prepared = result["diff"]["prepared"]
    assert prepared.startswith(f"would push {dataset} -> enclave:/dataset: 3 changed, 0 unchanged")
    assert "\n  a.csv\n  images\n  images/1.png\n" in prepared

    done = run_module(enclave_sync.main, push(dataset, expect_pcr0=enclave["pcr0"]), diff=True)
    assert done["diff"]["prepared"].startswith(f"push {dataset} -> enclave:/dataset: 3 changed")
    again = run_module(enclave_sync.main, push(dataset, expect_pcr0=enclave["pcr0"]), check_mode=True, diff=True)
    assert again["changed"] is False and again["changed_files"] == []
    assert "0 changed, 3 unchanged" in again["diff"]["prepared"]


def test_pull_copies_what_differs(run_module, enclave, tmp_path):
    output = enclave["share"] / "output"
    (output / "model").mkdir()
    (output / "results.csv").write_text("a,short\n")
    (output / "model" / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    dest = tmp_path / "results"
    args = {"mode": "pull", "src": "/output", "dest": str(dest), "expect_pcr0": enclave["pcr0"]}

    check = run_module(enclave_sync.main, args, check_mode=True)
    assert check["changed"] is True and check["changed_files"] == ["model", "model/weights.bin", "results.csv"]
    assert not dest.exists()

    first = run_module(enclave_sync.main, args, diff=True)
    assert first["changed"] is True and first["bytes"] == 2000 + 8
    assert tree(dest) == tree(output)
    assert "pull enclave:/output -> " in first["diff"]["prepared"]

    second = run_module(enclave_sync.main, args)
    assert second["changed"] is False and second["unchanged"] == 3

    (dest / "results.csv").write_text("tampered locally\n")
    (dest / "mine.txt").write_text("kept")  # pull never deletes
    third = run_module(enclave_sync.main, args)
    assert third["changed_files"] == ["results.csv"]
    assert (dest / "results.csv").read_text() == "a,short\n" and (dest / "mine.txt").read_text() == "kept"


def test_wrong_expect_pcr0_sends_nothing(run_module, enclave, dataset):
    result = run_module(enclave_sync.main, push(dataset, expect_pcr0=["00" * 47 + "01"]))
    assert result["failed"] is True
    assert "failed attestation, nothing was sent" in result["msg"]
    assert list((enclave["share"] / "dataset").iterdir()) == []


def test_bad_paths_fail_with_the_reason(run_module, enclave, tmp_path, dataset):
    result = run_module(enclave_sync.main, push(tmp_path / "missing", expect_pcr0=enclave["pcr0"]))
    assert result["failed"] is True and "is not a directory on the managed node" in result["msg"]
    result = run_module(enclave_sync.main, push(dataset, dest="/dataset/../../etc", expect_pcr0=enclave["pcr0"]))
    assert result["failed"] is True and "push from" in result["msg"] and "'..'" in result["msg"]
    (tmp_path / "file").write_text("x")
    result = run_module(
        enclave_sync.main, {"mode": "pull", "src": "/output", "dest": str(tmp_path / "file"), "no_attestation": True}
    )
    assert result["failed"] is True and "is not a directory" in result["msg"]
    result = run_module(
        enclave_sync.main, {"mode": "pull", "src": "/nowhere", "dest": str(tmp_path / "d"), "no_attestation": True}
    )
    assert result["failed"] is True and "pull from enclave:/nowhere" in result["msg"]


@pytest.mark.parametrize(
    "args, words",
    [
        ({"mode": "push", "state": "mounted", "src": "/a", "dest": "/b", "path": "/c"}, "mutually exclusive"),
        ({"mode": "push", "src": "/a"}, "dest"),
        ({"state": "mounted"}, "path"),
        ({}, "one of the following is required"),
        ({"mode": "push", "src": "/a", "dest": "/b", "endpoint": "unix:///x", "cid": 16}, "mutually exclusive"),
    ],
)
def test_argument_rules(run_module, args, words):
    result = run_module(enclave_sync.main, args)
    assert result["failed"] is True and words in result["msg"]


@pytest.fixture
def mountpoint(enclave, tmp_path):
    path = tmp_path / "synced_folder"
    yield path
    if mounts.is_mounted(path):
        with contextlib.suppress(Exception):
            mounts.unmount(path, lazy=True)


def test_mount_is_kept_present_then_absent(run_module, enclave, mountpoint, dataset):
    args = {"state": "mounted", "path": str(mountpoint), "expect_pcr0": enclave["pcr0"]}
    check = run_module(enclave_sync.main, args, check_mode=True, diff=True)
    assert check["changed"] is True and check["mounted"] is True
    assert check["diff"]["before"] == "mounted: false\n" and check["diff"]["after"] == "mounted: true\n"
    assert not mounts.is_mounted(mountpoint)

    first = run_module(enclave_sync.main, args)
    assert first["changed"] is True and first["mounted"] is True
    assert first["path"] == str(mountpoint) and first["endpoint"] == enclave["endpoint"]
    assert mounts.is_mounted(mountpoint)
    # The share is there: a file copied in through the mount lands in the enclave's share.
    assert sorted(os.listdir(mountpoint)) == ["dataset", "encrypted", "model", "output"]
    (mountpoint / "dataset" / "a.csv").write_bytes((dataset / "a.csv").read_bytes())
    assert (enclave["share"] / "dataset" / "a.csv").read_text() == "x,y\n1,2\n"

    second = run_module(enclave_sync.main, args)
    assert second["changed"] is False and second["mounted"] is True

    other = run_module(enclave_sync.main, dict(args, endpoint="unix:///run/other.sock"))
    assert other["failed"] is True and "unmount it first" in other["msg"]

    unmount = {"state": "unmounted", "path": str(mountpoint)}
    check = run_module(enclave_sync.main, unmount, check_mode=True)
    assert check["changed"] is True and check["mounted"] is False
    assert mounts.is_mounted(mountpoint)

    gone = run_module(enclave_sync.main, unmount)
    assert gone["changed"] is True and gone["mounted"] is False
    assert not mounts.is_mounted(mountpoint)
    assert mounts.mount_state(mountpoint) is None
    assert run_module(enclave_sync.main, unmount)["changed"] is False


def test_mount_refuses_a_wrong_enclave(run_module, enclave, mountpoint):
    result = run_module(enclave_sync.main, {"state": "mounted", "path": str(mountpoint), "expect_pcr0": "ab" * 48})
    assert result["failed"] is True and result["mounted"] is False
    assert "failed attestation" in result["msg"]
    assert not mounts.is_mounted(mountpoint)
    result = run_module(
        enclave_sync.main, {"state": "mounted", "path": str(mountpoint), "expect_pcr0": ["ab" * 48, "cd" * 48]}
    )
    assert result["failed"] is True and "one expected PCR0" in result["msg"]


def test_nothing_is_sent_without_attestation_unless_the_task_says_so(run_module, enclave, dataset, mountpoint):
    for args in (push(dataset), {"mode": "pull", "src": "/output", "dest": str(dataset.parent / "out")},
                 {"state": "mounted", "path": str(mountpoint)}):  # fmt: skip
        result = run_module(enclave_sync.main, args)
        assert result["failed"] is True
        assert "has not proven its image" in result["msg"] and "release: release.json" in result["msg"]
        assert "no_attestation: true" in result["msg"]
        empty = run_module(enclave_sync.main, dict(args, expect_pcr0=""))
        assert empty["failed"] is True and "expect_pcr0 is empty" in empty["msg"]
    assert list((enclave["share"] / "dataset").iterdir()) == []
    assert not mounts.is_mounted(mountpoint) and not (dataset.parent / "out").exists()
    sent = run_module(enclave_sync.main, push(dataset, no_attestation=True))
    assert sent["changed"] is True and "a.csv" in sent["changed_files"]
