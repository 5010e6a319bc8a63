"""run_job.yml's pre-flight (issue 12): without a release, with a malformed one, without its image or without AWS
credentials on the host, the play fails before the enclave_host role runs, with one plain message, and nothing
was started or pushed: no local cloud, no enclave, no job directory on the controller."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PCR0 = "ab" * 48


def release(directory: Path, pcr0: str = PCR0, image: bytes = b"an enclave image") -> Path:
    """A release folder as owner.yml publishes it (its contents need not be real: the play stops before using them)."""
    (directory / "packages").mkdir(parents=True)
    (directory / "packages" / "app.pkg").write_bytes(b"sealed")
    (directory / "enclave.img").write_bytes(image)
    manifest = {"format": 1, "backend": "local", "image": {"file": "enclave.img", "measurements": {"pcr0": pcr0}},
                "packages": [{"name": "app", "version": "1.0", "file": "packages/app.pkg"}]}  # fmt: skip
    (directory / "release.json").write_text(json.dumps(manifest))
    return directory


def run_job(tmp_path: Path, release_dir: Path, **aws) -> subprocess.CompletedProcess:
    """run_job.yml against a fresh ENCLAVE_HOME, with no AWS configuration but `aws` (and no instance metadata)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "ENCLAVE_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", ENCLAVE_HOME=str(tmp_path / "home"), ANSIBLE_NOCOLOR="1",
        AWS_CONFIG_FILE=str(tmp_path / "no-config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true", **aws,
    )  # fmt: skip
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "playbooks/run_job.yml",
         "-e", f"release_dir={release_dir}", "-e", f"job_dir={tmp_path / 'job'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def assert_nothing_started(tmp_path: Path, result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "TASK [confidential_ml.nitro.enclave_host" not in output, "the role ran after a failed pre-flight"
    assert not (tmp_path / "job").exists(), "the job's directory was created"
    assert not (tmp_path / "home" / "kms").exists(), "the local cloud was started"
    described = subprocess.run(
        [str(BIN / "enclave"), "local", "describe-enclaves"],
        env={**os.environ, "ENCLAVE_HOME": str(tmp_path / "home")},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(described.stdout) == [], f"an enclave was started: {described.stdout}"


CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "us-east-1"}


def test_without_credentials_nothing_starts(tmp_path):
    result = run_job(tmp_path, release(tmp_path / "release"), AWS_DEFAULT_REGION="us-east-1")
    assert_nothing_started(tmp_path, result)
    assert "Pre-flight | Check that the host has AWS credentials" in result.stdout
    assert "this host has no usable AWS credentials for the job's KMS calls: no AWS credentials" in result.stdout


def test_with_partial_credentials_nothing_starts(tmp_path):
    result = run_job(tmp_path, release(tmp_path / "release"), AWS_ACCESS_KEY_ID="AKIDEXAMPLE")
    assert_nothing_started(tmp_path, result)
    assert "incomplete AWS credentials in the environment: AWS_SECRET_ACCESS_KEY is not set" in result.stdout


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (
            lambda d: d,
            "There is no release at {d}/release.json on the controller: publish one with playbooks/owner.yml",
        ),
        (lambda d: release(d, pcr0="not-a-pcr"), "an image PCR0 of 96 lowercase hex digits (SHA-384)"),
        (lambda d: release(d, pcr0=PCR0.upper()), "PCR0 found: " + PCR0.upper()),
        (lambda d: release(d, image=b""), "The release names the image {d}/enclave.img, which is empty"),
    ],
    ids=["no-release", "bad-pcr0", "uppercase-pcr0", "empty-image"],
)
def test_a_bad_release_stops_the_play_before_anything_starts(tmp_path, make, says):
    directory = make(tmp_path / "release")
    result = run_job(tmp_path, directory, **CREDENTIALS)
    assert_nothing_started(tmp_path, result)
    # Folded YAML joins the message's lines with spaces.
    assert says.format(d=tmp_path / "release") in " ".join(result.stdout.split()), result.stdout
