"""Receipts and releases as typed models, and verify_receipt, on a real job's artifacts.

tests/vectors/local-job/ holds what run_job.yml left on the controller after a job of the example on the local
backend (owner.yml's release.json, the job's receipt.json and pulled outputs) and the local root the simulated
NSM's chain ends in: the receipt verifies offline, at any later time, as `enclave receipt verify` checks it.
"""

import copy
import json
import shutil
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils import attestation
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import AttestationError, EnclaveError
from ansible_collections.confidential_ml.nitro.plugins.module_utils.receipt import (
    Receipt,
    Release,
    ReleasePackage,
    verify_job_receipt,
    verify_receipt,
)

VECTOR = Path(__file__).resolve().parents[3] / "vectors" / "local-job"
PCR0 = "79f326e9d9de37e2e483c0e60fcc728c1fb07fb91841af56d34753b51d6575bc85529d4404dc5d5ee41739c1f6bf6939"
OTHER_PCR0 = "ab" * 48


@pytest.fixture(scope="module")
def roots():
    return attestation.load_trusted_roots([str(VECTOR / "root.pem")])


def receipt_json():
    return json.loads((VECTOR / "receipt.json").read_text())


def release_json():
    return json.loads((VECTOR / "release.json").read_text())


def test_the_files_read_and_write_back_field_for_field(tmp_path):
    """The JSON on disk stays what users' playbooks read: from_dict then to_dict gives every field back."""
    assert Receipt.load(VECTOR / "receipt.json").to_dict() == receipt_json()
    assert Release.load(VECTOR / "release.json").to_dict() == release_json()
    Receipt.load(VECTOR / "receipt.json").save(tmp_path / "again.json")  # as `enclave run --receipt` writes it
    assert json.loads((tmp_path / "again.json").read_text()) == receipt_json()
    minimal = {"allowed_pcr0": [PCR0], "packages": [{"name": "x", "version": "1", "manifest_digest": "00" * 32}]}
    assert Release.from_dict(minimal).to_dict() == minimal


def test_the_release_model():
    release = Release.load(VECTOR / "release.json")
    assert release.image_pcr0 == PCR0 and release.accepted_pcr0() == [PCR0]
    assert release.backend == "local" and release.key_arn.startswith("arn:aws:kms:")
    (package,) = release.packages
    assert package == ReleasePackage(
        "digits-classifier", "1.0.0", package.manifest_digest, "packages/digits-classifier.pkg", package.sha256
    )
    assert release.package(package.manifest_digest) is package and release.package("00" * 32) is None
    # A release from before the rotation window names its image alone.
    older = release_json()
    del older["allowed_pcr0"]
    older["image"]["measurements"]["pcr0"] = PCR0.upper()
    assert Release.from_dict(older).accepted_pcr0() == [PCR0]
    rotated = release_json() | {"allowed_pcr0": [OTHER_PCR0, PCR0]}
    assert Release.from_dict(rotated).accepted_pcr0() == [OTHER_PCR0, PCR0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: ["not", "a", "release"], "is not a release manifest"),
        (lambda r: {k: v for k, v in r.items() if k not in ("allowed_pcr0", "image")}, "names no image PCR0"),
        (lambda r: r | {"packages": {"a": 1}}, "not a list"),
        (lambda r: r | {"allowed_pcr0": PCR0}, "not a list of PCR0 hex strings"),
        (lambda r: r | {"packages": [{"name": "x", "version": "1"}]}, "package 0 has no manifest_digest"),
        (lambda r: r | {"packages": ["x"]}, "package 0 is not an object"),
    ],
)
def test_a_file_that_is_no_release_is_refused_clearly(tmp_path, change, message):
    (tmp_path / "release.json").write_text(json.dumps(change(release_json())))
    with pytest.raises(EnclaveError, match=message) as refused:
        Release.load(tmp_path / "release.json")
    assert str(tmp_path / "release.json") in str(refused.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"format": 1, "summary": {}, "document": ""}, "not a receipt of format 2"),
        ([], "not a receipt of format 2"),
        ({"format": 2, "summary": "rc 0", "document": ""}, "has no job summary"),
        ({"format": 2, "summary": {}, "document": "not base64!"}, "not base64"),
        ({"format": 2, "summary": {}}, "not base64"),
    ],
)
def test_a_file_that_is_no_receipt_is_refused_clearly(data, message):
    with pytest.raises(EnclaveError, match=message):
        Receipt.from_dict(data)


def test_a_real_receipt_verifies_offline_against_its_release_and_outputs(roots):
    proof = verify_receipt(
        Receipt.load(VECTOR / "receipt.json"),
        release=Release.load(VECTOR / "release.json"),
        trusted_roots=roots,
        outputs_dir=VECTOR / "output",
    )
    assert proof.package.name == "digits-classifier" and proof.document.pcr_hex(0) == PCR0
    assert proof.to_dict() == {
        "pcr0": PCR0,
        "module_id": proof.document.module_id,
        "signed_at": proof.document.timestamp,
        "package": "digits-classifier 1.0.0",
        "script": "ml_algorithm.py",
        "args": ["-m", "model/digits.npz", "-d", "/dataset/", "-o", "/output/"],
        "rc": 0,
        "inputs": 3,
        "outputs_checked": [str(VECTOR / "output" / "metrics.json"), str(VECTOR / "output" / "results.csv")],
    }
    # Right after the job the module checks it against the PCR0 the enclave attested, without a release.
    live = verify_receipt(Receipt.load(VECTOR / "receipt.json"), trusted_roots=roots, expected_pcr0=PCR0)
    assert live.package is None and live.to_dict()["package"] == "/encrypted/digits-classifier.pkg"
    with pytest.raises(ValueError, match="not both"):
        verify_receipt(live, trusted_roots=roots, release=Release.load(VECTOR / "release.json"), expected_pcr0=PCR0)


def edited(field, value):
    data = receipt_json()
    data["summary"][field] = value
    return Receipt.from_dict(data)


@pytest.mark.parametrize(
    ("receipt", "message"),
    [
        (lambda: edited("rc", 1), "the receipt was edited"),
        (lambda: edited("args", ["--leak"]), "the receipt was edited"),
        (lambda: edited("outputs", []), "the receipt was edited"),
        (lambda: edited("package_digest", "00" * 32), "the receipt was edited"),
    ],
)
def test_the_host_cannot_edit_what_the_enclave_signed(roots, receipt, message):
    with pytest.raises(EnclaveError, match=message):
        verify_receipt(receipt(), release=Release.load(VECTOR / "release.json"), trusted_roots=roots)


def test_the_host_cannot_swap_the_document_outputs_release_or_roots(roots, tmp_path):
    genuine, release = Receipt.load(VECTOR / "receipt.json"), Release.load(VECTOR / "release.json")
    # A document with one signature byte flipped.
    document = bytearray(genuine.document)
    document[-1] ^= 1
    with pytest.raises(AttestationError):
        verify_receipt(Receipt(genuine.summary, bytes(document)), release=release, trusted_roots=roots)
    # The chain must end in a trusted root: AWS's alone does not sign the local NSM.
    with pytest.raises(AttestationError):
        verify_receipt(genuine, release=release, trusted_roots=attestation.load_trusted_roots([]))
    # A release whose key policy allows another image only.
    other = Release.from_dict(release_json() | {"allowed_pcr0": [OTHER_PCR0]})
    with pytest.raises(AttestationError, match="PCR0"):
        verify_receipt(genuine, release=other, trusted_roots=roots)
    # A release without the package the job ran.
    stranger = copy.deepcopy(release_json())
    stranger["packages"][0]["manifest_digest"] = "00" * 32
    with pytest.raises(EnclaveError, match="not in this release"):
        verify_receipt(genuine, release=Release.from_dict(stranger), trusted_roots=roots)
    # Outputs edited or gone after the job.
    outputs = tmp_path / "output"
    shutil.copytree(VECTOR / "output", outputs)
    (outputs / "results.csv").write_text("0,7\n")
    with pytest.raises(EnclaveError, match="differs from the /output/results.csv"):
        verify_receipt(genuine, release=release, trusted_roots=roots, outputs_dir=outputs)
    (outputs / "results.csv").unlink()
    with pytest.raises(EnclaveError, match="missing from"):
        verify_receipt(genuine, release=release, trusted_roots=roots, outputs_dir=outputs)


def test_a_finished_jobs_receipt_must_be_signed_just_now(roots):
    """enclave_run and `enclave run --receipt` check the document the job just returned: an old one (a replayed
    receipt of an earlier run, say) is refused, and the error says the job's results are not to be trusted."""
    genuine = Receipt.load(VECTOR / "receipt.json")
    result = genuine.summary | {"attestation": genuine.document}  # what job.run returns
    assert Receipt.from_job(result) == genuine
    with pytest.raises(AttestationError, match="the job ran, but its receipt did not verify: .* s limit") as old:
        verify_job_receipt(result, trusted_roots=roots)
    assert str(old.value).endswith("; do not trust its results")
