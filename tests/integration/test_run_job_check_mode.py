"""`run_job.yml --check` after a real run changes nothing: no task reports a change, and
the enclave, its share, the outputs and the receipt on the controller are untouched.

What `--check` reports once the owner has published a new image (the enclave it would restart) is tested on the
SSH fleet, where that state arises anyway: tests/integration/test_ansible_upgrade.py."""

import re
import subprocess
import sys
from pathlib import Path

from ansible_collections.confidential_ml.nitro.tests.fixtures.served import file_digests

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def play(env, name, principal, extra, *flags):
    command = [str(BIN / "ansible-playbook"), f"playbooks/{name}", *extra, *flags]
    env = dict(env, AWS_PROFILE=principal)  # a profile of the credentials the local KMS issued
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return {int(c) for c in re.findall(r"changed=(\d+)", result.stdout)}


def test_run_job_check_mode_changes_nothing(tmp_path, owner_release):
    work, env = owner_release  # owner.yml ran once for the session
    extra = ["-e", f"owner_pipeline_workdir={work}/owner", "-e", f"release_dir={work}/owner/release",
             "-e", f"job_dir={tmp_path}/job", "-e", f"enclave_host_dir={tmp_path}/host"]  # fmt: skip
    describe = [str(BIN / "enclave"), "local", "describe-enclaves"]
    try:
        assert play(env, "run_job.yml", "enclave-host", extra) != {0}
        before = file_digests(tmp_path / "job")
        assert "receipt.json" in before and "output/results.csv" in before
        enclaves = subprocess.run(describe, env=env, capture_output=True, text=True, check=True).stdout
        assert play(env, "run_job.yml", "enclave-host", extra, "--check", "--diff") == {0}
        assert file_digests(tmp_path / "job") == before
        assert subprocess.run(describe, env=env, capture_output=True, text=True, check=True).stdout == enclaves
    finally:
        play(env, "cleanup.yml", "enclave-host", extra)
