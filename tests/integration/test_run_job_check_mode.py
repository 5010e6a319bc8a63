"""`run_job.yml --check` after a real run changes nothing: no task reports a change, and
the enclave, its share, the outputs and the receipt on the controller are untouched."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = [str(Path(sys.executable).parent / "ansible-playbook")]


def play(name, key, extra, *flags):
    env = dict(os.environ, AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
    result = subprocess.run([*PLAYBOOK, f"playbooks/{name}", *extra, *flags], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return {int(c) for c in re.findall(r"changed=(\d+)", result.stdout)}


def digests(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


def test_run_job_check_mode_changes_nothing(tmp_path, monkeypatch):
    # A short state directory: the enclave's unix socket paths must fit in 107 bytes.
    home = Path(tempfile.mkdtemp(prefix="rjc-", dir="/tmp"))
    monkeypatch.setenv("ENCLAVE_HOME", str(home))
    extra = ["-e", f"owner_pipeline_workdir={tmp_path}/owner", "-e", f"release_dir={tmp_path}/owner/release",
             "-e", f"job_dir={tmp_path}/job"]  # fmt: skip
    try:
        play("owner.yml", "owner", extra)
        assert play("run_job.yml", "enclave-host", extra) != {0}
        before = digests(tmp_path / "job")
        assert "receipt.json" in before and "output/results.csv" in before
        describe = [sys.executable, "-m", "ansible_collections.confidential_ml.nitro.cli.main", "local",
                    "describe-enclaves"]  # fmt: skip
        enclaves = subprocess.run(describe, capture_output=True, text=True, check=True).stdout
        assert play("run_job.yml", "enclave-host", extra, "--check", "--diff") == {0}
        assert digests(tmp_path / "job") == before
        assert subprocess.run(describe, capture_output=True, text=True, check=True).stdout == enclaves
    finally:
        play("cleanup.yml", "enclave-host", extra)
        shutil.rmtree(home, ignore_errors=True)
