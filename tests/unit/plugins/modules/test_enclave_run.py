"""enclave_run through main() against a real served enclave (local KMS, simulated NSM, server subprocess).

The package's key is released only to the simulated NSM's attestation of the expected PCR0; the module's
results are checked against what the enclave really did (its share, its work directory, its health).
"""

import base64
import hashlib
import json
import re
from datetime import datetime

import cbor2
import pytest

from ansible_collections.confidential_ml.nitro.enclave_local.nsm_sim import LocalCA
from ansible_collections.confidential_ml.nitro.plugins.module_utils import attestation
from ansible_collections.confidential_ml.nitro.plugins.module_utils.client import EnclaveClient
from ansible_collections.confidential_ml.nitro.plugins.module_utils.receipt import Receipt
from ansible_collections.confidential_ml.nitro.plugins.modules import enclave_run

TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
DELTA = re.compile(r"^\d+:\d\d:\d\d\.\d{6}$")


@pytest.fixture
def ready(enclave, tmp_path):
    """The package in /encrypted and a two-file dataset in /dataset, pushed with the library's client."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "a.txt").write_text("hi")
    (dataset / "b.txt").write_text("a much longer text")
    with EnclaveClient(enclave["endpoint"]) as client:
        client.push(enclave["sealed"].parent, "/encrypted")
        client.push(dataset, "/dataset")
    release = tmp_path / "release.json"  # as the owner's pipeline publishes it
    release.write_text(json.dumps({"format": 1, "image": {"measurements": {"pcr0": enclave["pcr0"]}}}))
    return dict(enclave, release=str(release))


def idle(enclave):
    """The enclave runs no job and holds no decrypted package."""
    with EnclaveClient(enclave["endpoint"]) as client:
        assert client.call("health")["job"] is None
    assert list(enclave["work"].iterdir()) == []


def test_run_returns_output_outputs_and_a_verified_receipt(run_module, ready):
    args = {
        "package": "app.pkg",
        "script": "ml_algorithm.py",
        "args": "-m model.h5 -d /dataset/ -o /output/",
        "expect_pcr0": [ready["pcr0"]],
    }
    result = run_module(enclave_run.main, args)
    assert result["changed"] is True
    assert result["rc"] == 0 and result["ended_by"] == "exit"
    assert result["stdout_lines"] == ["classified a.txt short", "classified b.txt long"]
    assert result["stdout"] == "classified a.txt short\nclassified b.txt long"
    assert result["stderr"] == "done" and result["stderr_lines"] == ["done"]
    assert result["package"] == "/encrypted/app.pkg" and result["script"] == "ml_algorithm.py"
    assert re.fullmatch(r"[0-9a-f]{12}", result["job"])
    assert TIME.match(result["start"]) and TIME.match(result["end"]) and DELTA.match(result["delta"])
    start = datetime.strptime(result["start"], enclave_run.TIME_FORMAT)
    end = datetime.strptime(result["end"], enclave_run.TIME_FORMAT)
    assert start <= end and abs((datetime.now() - end).total_seconds()) < 60
    h, m, s = result["delta"].split(":")
    assert abs(int(h) * 3600 + int(m) * 60 + float(s) - (end - start).total_seconds()) < 1e-3

    csv = ready["share"] / "output" / "results.csv"
    assert csv.read_text() == "a.txt,short\nb.txt,long\n"
    assert result["outputs"] == [
        {
            "path": "/output/results.csv",
            "size": csv.stat().st_size,
            "sha256": hashlib.sha256(csv.read_bytes()).hexdigest(),
        }
    ]

    receipt = result["attestation"]
    # What RETURN documents, and what run_job.yml saves and `enclave receipt verify` reads: unchanged.
    claims = {"module_id", "timestamp", "time", "digest", "debug_mode", "pcrs", "user_data", "public_key", "nonce"}
    assert set(receipt) == {"format", "summary", "document", "certificate", "root", *claims}
    saved = {key: receipt[key] for key in ("format", "summary", "document")}
    assert saved["format"] == 2 and Receipt.from_dict(json.loads(json.dumps(saved))).to_dict() == saved
    assert receipt["pcrs"]["0"] == ready["pcr0"]
    assert receipt["module_id"] and receipt["debug_mode"] is False
    # The document verifies again on its own against the local root, and its claims are the returned ones.
    document = base64.b64decode(receipt["document"])
    root = LocalCA.load_or_create(ready["tmp"] / "home").root_certificate
    claims = attestation.verify_document(document, trusted_roots=[root], expected_pcrs={0: ready["pcr0"]})
    assert claims.to_json()["user_data"] == receipt["user_data"]
    assert claims.module_id == receipt["module_id"]
    # user_data binds the returned summary: what ran, how it ended and what it produced, in the receipt domain.
    summary = receipt["summary"]
    digest = hashlib.sha384(cbor2.dumps(summary, canonical=True)).digest()
    assert (b"confidential_ml.nitro job receipt v2\0" + digest).hex() == receipt["user_data"]
    assert (summary["job"], summary["rc"], summary["ended_by"]) == (result["job"], 0, "exit")
    assert summary["outputs"] == result["outputs"]
    assert datetime.fromtimestamp(summary["start"]).strftime(enclave_run.TIME_FORMAT) == result["start"]
    idle(ready)


def test_args_as_a_list_and_a_share_path_package(run_module, ready):
    args = {
        "package": "/encrypted/app.pkg",
        "script": "ml_algorithm.py",
        "args": ["-m", "model.h5", "-d", "/dataset", "-o", "/output"],
        "release": ready["release"],
    }
    result = run_module(enclave_run.main, args)
    assert result["rc"] == 0 and result["changed"] is True
    assert "classified b.txt long" in result["stdout_lines"]
    assert (ready["share"] / "output" / "results.csv").exists()


def test_non_zero_rc_fails_with_every_field(run_module, ready):
    args = {"package": "app.pkg", "script": "ml_algorithm.py", "args": "-m missing -d /dataset -o /output",
            "expect_pcr0": ready["pcr0"]}  # fmt: skip
    result = run_module(enclave_run.main, args)
    assert result["failed"] is True
    assert result["msg"] == "non-zero return code"
    assert result["rc"] == 1 and result["ended_by"] == "exit" and result["changed"] is True
    assert "FileNotFoundError" in result["stderr"]
    assert result["stderr_lines"][-1].startswith("FileNotFoundError")
    assert result["stdout"] == "" and result["stdout_lines"] == []
    for field in ("start", "end", "delta", "job", "outputs"):
        assert field in result
    assert result["attestation"]["summary"]["rc"] == 1
    idle(ready)


def test_timeout_kills_the_job_and_fails(run_module, ready):
    result = run_module(
        enclave_run.main, {"package": "app.pkg", "script": "spin.py", "timeout": 1.5, "expect_pcr0": ready["pcr0"]}
    )
    assert result["failed"] is True
    assert result["ended_by"] == "timeout"
    assert "timeout of 1.5 s" in result["msg"]
    assert result["rc"] == -9
    assert result["stdout"].startswith("spinning")
    # The timeout counts from the job's start (hashing its inputs and opening the package included), so the
    # script's own run, which delta measures, is a little shorter.
    h, m, s = result["delta"].split(":")
    assert 0 < float(s) < 30
    idle(ready)


def test_script_missing_from_the_package_fails(run_module, ready):
    result = run_module(enclave_run.main, {"package": "app.pkg", "script": "absent.py", "expect_pcr0": ready["pcr0"]})
    assert result["failed"] is True and result["changed"] is False
    assert "job absent.py from app.pkg failed in the enclave" in result["msg"] and "not in package" in result["msg"]
    idle(ready)


def test_check_mode_checks_the_package_and_runs_nothing(run_module, ready):
    args = {
        "package": "app.pkg",
        "script": "ml_algorithm.py",
        "args": "-m model.h5 -d /dataset -o /output",
        "expect_pcr0": ready["pcr0"],  # a single value as a string
    }
    result = run_module(enclave_run.main, args, check_mode=True)
    assert result["changed"] is False and result["skipped"] is True
    assert "package /encrypted/app.pkg is in the enclave's share" in result["msg"]
    assert "attests an expected PCR0" in result["msg"]
    assert "can only be known by running it" in result["msg"]
    assert "rc" not in result
    assert list((ready["share"] / "output").iterdir()) == []  # nothing ran
    idle(ready)


def test_check_mode_fails_when_the_package_is_not_in_the_share(run_module, enclave):
    result = run_module(
        enclave_run.main, {"package": "app.pkg", "script": "x.py", "no_attestation": True}, check_mode=True
    )
    assert result["failed"] is True
    assert "/encrypted/app.pkg is not in the enclave's share" in result["msg"]
    result = run_module(
        enclave_run.main, {"package": "/dataset", "script": "x.py", "no_attestation": True}, check_mode=True
    )
    assert result["failed"] is True and "not a regular file" in result["msg"]
    # Under a file, not under a folder: nothing there either (EnclaveClient.stat answers None to ENOTDIR too).
    (enclave["share"] / "dataset" / "notes.txt").write_text("a file")
    nested = {"package": "/dataset/notes.txt/app.pkg", "script": "x.py", "no_attestation": True}
    result = run_module(enclave_run.main, nested, check_mode=True)
    assert result["failed"] is True and "/dataset/notes.txt/app.pkg is not in the enclave's share" in result["msg"]
    # A path the share refuses is an error the task names, not "missing".
    result = run_module(
        enclave_run.main, {"package": "/../etc/passwd", "script": "x.py", "no_attestation": True}, check_mode=True
    )
    assert result["failed"] is True and "cannot look up package /../etc/passwd" in result["msg"], result["msg"]


@pytest.mark.parametrize("check_mode", [False, True])
def test_wrong_expect_pcr0_fails_before_anything_is_sent(run_module, ready, check_mode):
    args = {
        "package": "app.pkg",
        "script": "ml_algorithm.py",
        "args": "-m model.h5 -d /dataset -o /output",
        "expect_pcr0": ["ab" * 48, "cd" * 48],
    }
    result = run_module(enclave_run.main, args, check_mode=check_mode)
    assert result["failed"] is True
    assert "failed attestation, nothing was sent" in result["msg"]
    assert "rc" not in result and "stdout" not in result
    assert list((ready["share"] / "output").iterdir()) == []
    idle(ready)


def test_missing_kms_settings_fail_before_connecting(run_module, ready, monkeypatch, tmp_path):
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("ENCLAVE_ENDPOINT", f"unix://{tmp_path / 'nobody.sock'}")  # never reached
    result = run_module(enclave_run.main, {"package": "app.pkg", "script": "ml_algorithm.py"})
    assert result["failed"] is True
    assert "no AWS region" in result["msg"] and "AWS_DEFAULT_REGION" in result["msg"]


def test_unreachable_endpoint_and_bad_options_fail_clearly(run_module, enclave, tmp_path):
    result = run_module(
        enclave_run.main,
        {
            "package": "app.pkg",
            "script": "x.py",
            "endpoint": f"unix://{tmp_path / 'none.sock'}",
            "no_attestation": True,
        },
    )
    assert result["failed"] is True and "no enclave listens on" in result["msg"]
    result = run_module(
        enclave_run.main, {"package": "app.pkg", "script": "x.py", "args": [{"a": 1}], "no_attestation": True}
    )
    assert result["failed"] is True and "args must be a string or a list of strings" in result["msg"]
    result = run_module(enclave_run.main, {"package": "app.pkg", "script": "x.py", "timeout": 0})
    assert result["failed"] is True and "timeout must be a positive number" in result["msg"]
    result = run_module(enclave_run.main, {"package": "app.pkg", "script": "x.py", "port": 5000})
    assert result["failed"] is True and "port" in result["msg"] and "cid" in result["msg"]


def test_no_job_runs_without_attestation_unless_the_task_says_so(run_module, ready):
    args = {"package": "app.pkg", "script": "ml_algorithm.py", "args": "-m model.h5 -d /dataset -o /output"}
    result = run_module(enclave_run.main, args)
    assert result["failed"] is True and "has not proven its image" in result["msg"]
    assert "expect_pcr0: HEX" in result["msg"] and "no_attestation: true" in result["msg"]
    assert list((ready["share"] / "output").iterdir()) == []  # nothing ran
    ran = run_module(enclave_run.main, dict(args, no_attestation=True))
    assert ran["rc"] == 0 and ran["changed"] is True
