"""A newcomer's first hour (issue 12): what breaks when someone follows the README on their own machine.

Each test runs the installed tools as a newcomer would (the `enclave` console script, ansible-playbook),
in a directory of its own.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils import settings

BIN = Path(sys.executable).parent


def enclave(*args, env, check=True):
    done = subprocess.run([str(BIN / "enclave"), *args], env=env, capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip
    if check:
        assert done.returncode == 0, f"enclave {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture
def deep_home():
    """(home, env): an ENCLAVE_HOME 120+ characters long, as under a deep checkout; afterwards `local down`."""
    work = Path(tempfile.mkdtemp(prefix="newcomer-", dir="/tmp"))
    home = work / "home-alice-src" / "confidential-ml-nitro" / "build" / "a-rather-long-directory-name" / "home"
    while len(str(home)) < 130:
        home = home.parent / "deeper" / home.name
    env = {**os.environ, "ENCLAVE_HOME": str(home), "AWS_SECRET_ACCESS_KEY": "local-only"}
    env.pop("ENCLAVE_ENDPOINT", None)
    env.pop(settings.ENV_RUNTIME_DIR, None)
    yield home, env
    enclave("local", "down", env=env, check=False)
    shutil.rmtree(work, ignore_errors=True)


def test_local_flow_with_a_deep_enclave_home(deep_home, tmp_path):
    """Item 1: up, build, run-enclave, push, attest and down, with ENCLAVE_HOME at 130+ characters."""
    home, env = deep_home
    assert len(str(home)) >= 120
    enclave("local", "up", env=env)
    image = home / "images" / "enclave.eif"
    pcr0 = json.loads(enclave("local", "build", "--output", str(image), env=env).stdout)["Measurements"]["PCR0"]
    described = json.loads(
        enclave("local", "run-enclave", "--eif-path", str(image), "--cpu-count", "1", "--memory", "128", env=env).stdout
    )
    endpoint = described["Endpoint"]
    # The socket lives in the home's short runtime directory, whatever the home's depth.
    runtime = settings.runtime_dir(home)
    assert endpoint.startswith(f"unix://{runtime}/") and len(endpoint) - len("unix://") <= 107
    assert (runtime.stat().st_mode & 0o777) == 0o700

    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "a.csv").write_text("x,y\n1,2\n")
    pushed = json.loads(enclave("push", str(dataset), "/dataset", "--json", env=env).stdout)
    assert "a.csv" in json.dumps(pushed)
    attested = json.loads(enclave("attest", "--json", env=env).stdout)
    assert attested["pcrs"]["0"] == pcr0

    enclave("local", "down", env=env)
    assert json.loads(enclave("local", "describe-enclaves", env=env).stdout) == []
    assert [p.name for p in (runtime / "enclaves").iterdir()] == [".lock"]
