"""The user's modules through ansible-playbook on localhost, against a real served enclave.

The playbook pushes the owner's package and the user's dataset, runs the owner's script in the background
(async/poll), pulls the outputs and asks the enclave for its health and attestation; a second push changes
nothing, a check-mode push after a dataset change lists the file and copies nothing, and ansible-doc renders
every user-side module.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
CALLBACK_PLUGINS = Path(__file__).resolve().parent / "callback_plugins"
MODULES = (
    "confidential_ml.nitro.enclave_run",
    "confidential_ml.nitro.enclave_sync",
    "confidential_ml.nitro.enclave_info",
    "confidential_ml.nitro.enclave_image",
)

PLAYBOOK = """\
- name: User runs the owner's algorithm on their dataset in the enclave
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Push the owner's package
      confidential_ml.nitro.enclave_sync:
        mode: push
        src: "{{ packages }}"
        dest: /encrypted
        expect_pcr0: "{{ pcr0 }}"
      register: pushed_package
      tags: [push]

    - name: Push the dataset
      confidential_ml.nitro.enclave_sync:
        mode: push
        src: "{{ dataset }}"
        dest: /dataset
        expect_pcr0: "{{ pcr0 }}"
      register: pushed_dataset
      tags: [push]

    - name: Run the algorithm in the background
      confidential_ml.nitro.enclave_run:
        package: app.pkg
        script: ml_algorithm.py
        args: -m model.h5 -d /dataset/ -o /output/
        timeout: 50
        expect_pcr0: "{{ pcr0 }}"
      async: 60
      poll: 2
      register: job

    - name: Pull the outputs
      confidential_ml.nitro.enclave_sync:
        mode: pull
        src: /output
        dest: "{{ results }}"
        expect_pcr0: "{{ pcr0 }}"
      register: pulled

    - name: Ask the enclave about itself
      confidential_ml.nitro.enclave_info:
        gather: [health, attestation]
        expect_pcr0: "{{ pcr0 }}"
      register: info

    - name: The job ran in the attested enclave and its outputs are on disk
      ansible.builtin.assert:
        that:
          - job.rc == 0
          - job.ended_by == 'exit'
          - job.stdout_lines == ['classified a.txt short', 'classified b.txt long']
          - job.outputs | map(attribute='path') | list == ['/output/results.csv']
          - job.attestation.pcrs['0'] == pcr0
          - pulled.changed_files == ['results.csv']
          - lookup('ansible.builtin.file', results ~ '/results.csv') == 'a.txt,short\\nb.txt,long'
          - info.health.job is none
          - info.attestation.pcrs['0'] == pcr0
"""


@pytest.fixture
def workspace(enclave, tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "a.txt").write_text("hi")
    (dataset / "b.txt").write_text("a much longer text")
    (tmp_path / "user.yml").write_text(PLAYBOOK)
    (tmp_path / "inventory.ini").write_text(
        f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
    )
    # The enclave fixture exported ENCLAVE_ENDPOINT, ENCLAVE_HOME (the local root) and the user's AWS variables.
    env = dict(
        os.environ,
        ANSIBLE_CALLBACK_PLUGINS=str(CALLBACK_PLUGINS),  # record_results.py: results as JSON
        ANSIBLE_CALLBACKS_ENABLED="record_results",
        TEST_RESULTS_FILE=str(tmp_path / "results.json"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-local"),
        ANSIBLE_REMOTE_TMP=str(tmp_path / "ansible-remote"),
        ANSIBLE_ASYNC_DIR=str(tmp_path / "ansible-async"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    extra = {
        "pcr0": enclave["pcr0"],
        "packages": str(enclave["sealed"].parent),
        "dataset": str(dataset),
        "results": str(tmp_path / "results"),
    }
    return {"dir": tmp_path, "env": env, "extra": extra, "enclave": enclave}


def playbook(workspace, *args):
    tmp = workspace["dir"]
    command = [
        str(BIN / "ansible-playbook"),
        "-i",
        str(tmp / "inventory.ini"),
        str(tmp / "user.yml"),
        "-e",
        json.dumps(workspace["extra"]),
        *args,
    ]
    results = tmp / "results.json"
    results.unlink(missing_ok=True)
    done = subprocess.run(command, env=workspace["env"], capture_output=True, text=True, timeout=300, check=False)
    output = f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, output
    assert re.search(r"^localhost +: ok=\d+ +changed=\d+ +unreachable=0 +failed=0 ", done.stdout, re.M), output
    recorded = json.loads(results.read_text())
    stats = recorded["stats"]["localhost"]
    assert re.search(rf"^localhost +: ok={stats['ok']} +changed={stats['changed']} ", done.stdout, re.M), output
    return stats, recorded["tasks"], done.stdout


def test_push_run_async_pull_then_push_changes_nothing(workspace):
    tmp, enclave = workspace["dir"], workspace["enclave"]
    stats, tasks = playbook(workspace)[:2]
    assert stats["failures"] == 0 and stats["ok"] == 6
    assert stats["changed"] == 4  # two pushes, the job, the pull; info and assert change nothing
    assert tasks["Push the owner's package"]["changed_files"] == ["app.pkg"]
    assert tasks["Push the dataset"]["changed_files"] == ["a.txt", "b.txt"]
    job = tasks["Run the algorithm in the background"]
    assert job["changed"] is True and job["rc"] == 0
    assert job["ansible_job_id"] and job["finished"] == 1  # it ran through async_wrapper and was polled
    assert job["stderr"] == "done"
    assert re.fullmatch(r"\d+:\d\d:\d\d\.\d{6}", job["delta"])
    assert (tmp / "results" / "results.csv").read_text() == "a.txt,short\nb.txt,long\n"
    assert list(enclave["work"].iterdir()) == []  # no plaintext left in the enclave's work area

    stats, tasks = playbook(workspace, "--tags", "push")[:2]
    assert stats["changed"] == 0 and stats["ok"] == 2
    assert tasks["Push the dataset"]["unchanged"] == 2

    (tmp / "dataset" / "c.txt").write_text("a third, rather long, document")
    stats, tasks, stdout = playbook(workspace, "--tags", "push", "--check", "--diff")
    assert stats["changed"] == 1
    assert tasks["Push the dataset"]["changed_files"] == ["c.txt"]
    assert "would push" in stdout and "  c.txt" in stdout
    assert not (enclave["share"] / "dataset" / "c.txt").exists()


@pytest.mark.parametrize("module", MODULES)
def test_ansible_doc_renders(module, tmp_path):
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path))
    done = subprocess.run(
        [str(BIN / "ansible-doc"), "-t", "module", module],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "[ERROR]" not in done.stderr and "[WARNING]" not in done.stderr, done.stderr
    for section in ("OPTIONS", "ATTRIBUTES", "EXAMPLES", "RETURN VALUES"):
        assert section in done.stdout, f"{section} missing from ansible-doc {module}"

    as_json = subprocess.run(
        [str(BIN / "ansible-doc"), "-t", "module", "--json", module],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    doc = json.loads(as_json.stdout)[module]
    assert doc["doc"]["attributes"]["check_mode"]["support"] in ("full", "partial")
    assert doc["return"] and doc["examples"]
    if module != "confidential_ml.nitro.enclave_image":  # the others talk to the enclave server
        options = doc["doc"]["options"]
        assert options["expect_pcr0"]["type"] == "list" and options["allow_debug"]["default"] is False
        assert {"endpoint", "cid", "port"} <= set(options)
