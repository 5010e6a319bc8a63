"""`run_job.yml --check` after a real run changes nothing: no task reports a change, and
the enclave, its share, the outputs and the receipt on the controller are untouched."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def play(env, name, principal, extra, *flags):
    command = [str(BIN / "ansible-playbook"), f"playbooks/{name}", *extra, *flags]
    env = dict(env, AWS_PROFILE=principal)  # a profile of the credentials the local KMS issued
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return {int(c) for c in re.findall(r"changed=(\d+)", result.stdout)}


def digests(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


def test_run_job_check_mode_changes_nothing(tmp_path, owner_release):
    work, env = owner_release  # owner.yml ran once for the session
    extra = ["-e", f"owner_pipeline_workdir={work}/owner", "-e", f"release_dir={work}/owner/release",
             "-e", f"job_dir={tmp_path}/job", "-e", f"enclave_host_dir={tmp_path}/host"]  # fmt: skip
    describe = [str(BIN / "enclave"), "local", "describe-enclaves"]
    try:
        assert play(env, "run_job.yml", "enclave-host", extra) != {0}
        before = digests(tmp_path / "job")
        assert "receipt.json" in before and "output/results.csv" in before
        enclaves = subprocess.run(describe, env=env, capture_output=True, text=True, check=True).stdout
        assert play(env, "run_job.yml", "enclave-host", extra, "--check", "--diff") == {0}
        assert digests(tmp_path / "job") == before
        assert subprocess.run(describe, env=env, capture_output=True, text=True, check=True).stdout == enclaves
    finally:
        play(env, "cleanup.yml", "enclave-host", extra)


def test_run_job_check_mode_reports_the_enclave_a_new_image_would_restart(tmp_path, local_cloud):
    """Issue 12: after the owner publishes a new image (here bound to a new signing key, so its PCR0 differs),
    `run_job.yml --check` reports the image it would copy to the host and the enclave it would restart as changed,
    skips the tasks that need the new enclave, and leaves the running enclave and the job's files alone."""
    env = local_cloud[1]
    extra = ["-e", f"owner_pipeline_workdir={tmp_path}/owner", "-e", f"release_dir={tmp_path}/owner/release",
             "-e", f"job_dir={tmp_path}/job", "-e", f"enclave_host_dir={tmp_path}/host"]  # fmt: skip
    describe = [str(BIN / "enclave"), "local", "describe-enclaves"]
    try:
        play(env, "owner.yml", "owner", extra)
        play(env, "run_job.yml", "enclave-host", extra)
        before = digests(tmp_path / "job")
        enclaves = subprocess.run(describe, env=env, capture_output=True, text=True, check=True).stdout
        play(env, "owner.yml", "owner", [*extra, "-e", "owner_pipeline_signing_key_alias=alias/next-signing"])
        result = subprocess.run(
            [str(BIN / "ansible-playbook"), "playbooks/run_job.yml", *extra, "--check", "--diff"],
            cwd=ROOT, env=dict(env, AWS_PROFILE="enclave-host"), capture_output=True, text=True, check=False,
        )  # fmt: skip
        output = result.stdout + result.stderr[-2000:]
        assert result.returncode == 0, output[-8000:]
        # The new image would be copied to the host and the enclave restarted from it.
        for task in ("Copy the release's image from the controller", "Run the enclave"):
            block = re.search(rf"TASK \[\S+enclave_host : {task}.*?(?=\nTASK )", output, re.S)
            assert block and "changed: [localhost]" in block[0], output[-8000:]
        assert "Check mode: the enclave would be restarted from enclave.img" in output, output[-8000:]
        assert digests(tmp_path / "job") == before
        assert subprocess.run(describe, env=env, capture_output=True, text=True, check=True).stdout == enclaves
    finally:
        play(env, "cleanup.yml", "enclave-host", extra)
