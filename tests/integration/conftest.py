"""Fixtures of the integration tests that run the project's playbooks and CLI: ansible_playbook (a test's own
playbook on localhost, its results recorded) and local_cloud (a fresh ENCLAVE_HOME for local enclaves).
The served enclave and the helpers tests import live in tests/fixtures/served.py; a fresh local cloud in
tests/fixtures/cloud.py.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.confidential_ml.nitro.tests.fixtures.cloud import ENV_CREDENTIALS, fresh_cloud
from ansible_collections.confidential_ml.nitro.tests.fixtures.served import BIN, file_digests
from ansible_collections.confidential_ml.nitro.tests.fixtures.ssh_fleet import build_wheel, running

ROOT = Path(__file__).resolve().parents[2]
CALLBACK_PLUGINS = Path(__file__).resolve().parent / "callback_plugins"


@pytest.fixture
def ansible_playbook(tmp_path):
    """Runs a test's own playbook on localhost; returns (stats, tasks by name, stdout) for a run that failed nothing.

    callback_plugins/record_results.py records each task's result as JSON; Ansible's temporary and async
    directories stay under tmp_path. The environment is read at each call, after other fixtures set theirs:
    ansible_playbook(playbook, extra_vars, *args, env={...}).
    """
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    results = tmp_path / "results.json"

    def run(playbook: Path, extra_vars: dict, *args: str, env: dict | None = None):
        # A profile given in env must not lose to the session's own environment credentials.
        profiled = env is not None and "AWS_PROFILE" in env
        environment = dict(
            {k: v for k, v in os.environ.items() if not (profiled and k in ENV_CREDENTIALS)},
            ANSIBLE_CALLBACK_PLUGINS=str(CALLBACK_PLUGINS),
            ANSIBLE_CALLBACKS_ENABLED="record_results",
            TEST_RESULTS_FILE=str(results),
            ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-local"),
            ANSIBLE_REMOTE_TMP=str(tmp_path / "ansible-remote"),
            ANSIBLE_ASYNC_DIR=str(tmp_path / "ansible-async"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_RETRY_FILES_ENABLED="0",
            **(env or {}),
        )
        command = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook), "-e", json.dumps(extra_vars)]
        results.unlink(missing_ok=True)
        done = subprocess.run(
            [*command, *args], env=environment, capture_output=True, text=True, timeout=300, check=False
        )
        output = f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        assert done.returncode == 0, output
        assert re.search(r"^localhost +: ok=\d+ +changed=\d+ +unreachable=0 +failed=0 ", done.stdout, re.M), output
        recorded = json.loads(results.read_text())
        stats = recorded["stats"]["localhost"]
        # The recap printed by the default callback says the same as the recorded one.
        assert re.search(rf"^localhost +: ok={stats['ok']} +changed={stats['changed']} ", done.stdout, re.M), output
        return stats, recorded["tasks"], done.stdout

    return run


@pytest.fixture
def local_cloud():
    """(work, env) for running the project's playbooks and CLI against local enclaves of their own: a local cloud
    of this test's own (tests/fixtures/cloud.py says what work and env hold), stopped and removed afterwards."""
    with fresh_cloud() as cloud:
        yield cloud


@pytest.fixture(scope="session")
def owner_release():
    """(work, env): a local cloud of its own in which playbooks/owner.yml ran once for the session (profile owner,
    owner_pipeline_workdir=work/owner: the release is in work/owner/release).

    For tests that only read what the owner published: they run run_job.yml into a job_dir of their own and
    stop their enclaves (cleanup.yml; run_job.yml brings the local KMS back up). A test that changes the
    owner's side (another image, key or policy) takes local_cloud and runs owner.yml itself. The release must
    be as published when the session ends.
    """
    with fresh_cloud() as (work, env):
        done = subprocess.run(
            [str(BIN / "ansible-playbook"), "playbooks/owner.yml", "-e", f"owner_pipeline_workdir={work / 'owner'}"],
            cwd=ROOT, env={**env, "AWS_PROFILE": "owner"}, capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"owner.yml exited {done.returncode}:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
        )
        published = file_digests(work / "owner" / "release")
        yield work, env
        assert file_digests(work / "owner" / "release") == published, "a test changed the session's owner release"


@pytest.fixture(scope="session")
def fleet_wheel(tmp_path_factory) -> Path:
    """The project's wheel for the SSH test fleet's hosts (tests/fixtures/ssh_fleet.py), built once a session."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def ssh_fleet(local_cloud, fleet_wheel):
    """(work, env, fleet): the SSH test fleet (tests/fixtures/ssh_fleet.py) in a local cloud of its own, where owner.yml
    has not run yet; the hosts see neither the checkout nor work/owner (the owner's side) nor work/jobs."""
    work, env = local_cloud
    with running(work / "hosts", env, fleet_wheel, [work / "owner", work / "jobs"]) as (fleet, env):
        yield work, env, fleet
