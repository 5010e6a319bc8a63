"""The user's modules through ansible-playbook on localhost, against a real served enclave.

The playbook pushes the owner's package and the user's dataset, runs the owner's script in the background
(async/poll), pulls the outputs and asks the enclave for its health and attestation; a second push changes
nothing, and a check-mode push after a dataset change lists the file and copies nothing.
"""

import os
import re
from pathlib import Path

import pytest

FAKE_NITRO_CLI = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "fake-nitro-cli"

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
def workspace(enclave, tmp_path, ansible_playbook):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "a.txt").write_text("hi")
    (dataset / "b.txt").write_text("a much longer text")
    (tmp_path / "user.yml").write_text(PLAYBOOK)
    extra_vars = {
        "pcr0": enclave["pcr0"],
        "packages": str(enclave["sealed"].parent),
        "dataset": str(dataset),
        "results": str(tmp_path / "results"),
    }

    def playbook(*args):
        # The enclave fixture exported ENCLAVE_ENDPOINT, ENCLAVE_HOME (the local root) and the user's AWS variables.
        return ansible_playbook(tmp_path / "user.yml", extra_vars, *args)

    return {"dir": tmp_path, "enclave": enclave, "playbook": playbook}


def test_push_run_async_pull_then_push_changes_nothing(workspace):
    tmp, enclave = workspace["dir"], workspace["enclave"]
    stats, tasks = workspace["playbook"]()[:2]
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

    stats, tasks = workspace["playbook"]("--tags", "push")[:2]
    assert stats["changed"] == 0 and stats["ok"] == 2
    assert tasks["Push the dataset"]["unchanged"] == 2

    (tmp / "dataset" / "c.txt").write_text("a third, rather long, document")
    stats, tasks, stdout = workspace["playbook"]("--tags", "push", "--check", "--diff")
    assert stats["changed"] == 1
    assert tasks["Push the dataset"]["changed_files"] == ["c.txt"]
    assert "would push" in stdout and "  c.txt" in stdout
    assert not (enclave["share"] / "dataset" / "c.txt").exists()


NITRO_PLAYBOOK = """\
- name: The user's modules on the nitro backend, with and without endpoint
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Run the enclave with nitro-cli
      confidential_ml.nitro.enclave_instance:
        backend: nitro
        name: confidential-ml
        image: "{{ image }}"
        cpu_count: 2
        memory_mib: 128
        state: running
      register: instance

    - name: Without endpoint, ask the enclave nitro-cli runs
      confidential_ml.nitro.enclave_info:
        backend: nitro
      register: discovered

    - name: Without endpoint, push to it
      confidential_ml.nitro.enclave_sync:
        mode: push
        src: "{{ dataset }}"
        dest: /dataset
        expect_pcr0: "{{ pcr0 }}"
      register: push_discovered
      ignore_errors: true

    - name: Without endpoint, run in it
      confidential_ml.nitro.enclave_run:
        package: app.pkg
        script: ml_algorithm.py
        expect_pcr0: "{{ pcr0 }}"
      register: run_discovered
      ignore_errors: true

    - name: With endpoint, push the package
      confidential_ml.nitro.enclave_sync:
        mode: push
        src: "{{ packages }}"
        dest: /encrypted
        endpoint: "{{ endpoint }}"
        expect_pcr0: "{{ pcr0 }}"
      register: push_package

    - name: With endpoint, push the dataset
      confidential_ml.nitro.enclave_sync:
        mode: push
        src: "{{ dataset }}"
        dest: /dataset
        endpoint: "{{ endpoint }}"
        expect_pcr0: "{{ pcr0 }}"
      register: push_dataset

    - name: With endpoint, run
      confidential_ml.nitro.enclave_run:
        package: app.pkg
        script: ml_algorithm.py
        args: -m model.h5 -d /dataset/ -o /output/
        endpoint: "{{ endpoint }}"
        expect_pcr0: "{{ pcr0 }}"
      register: ran

    - name: With endpoint, pull the outputs
      confidential_ml.nitro.enclave_sync:
        mode: pull
        src: /output
        dest: "{{ results }}"
        endpoint: "{{ endpoint }}"
        expect_pcr0: "{{ pcr0 }}"
      register: pulled

    - name: With endpoint, ask the enclave about itself and list nitro-cli's enclaves
      confidential_ml.nitro.enclave_info:
        backend: nitro
        endpoint: "{{ endpoint }}"
        expect_pcr0: "{{ pcr0 }}"
      register: named
"""


def test_user_modules_on_the_nitro_backend_with_and_without_endpoint(enclave, tmp_path, ansible_playbook, monkeypatch):
    """Issue 12: enclave_info, enclave_sync and enclave_run through ansible-playbook on the nitro backend.

    The fake nitro-cli runs the enclave; without endpoint each module discovers vsock://CID:5000 from its
    describe-enclaves, where no vsock loopback answers here: info reports why, sync and run fail saying where
    they looked. With endpoint (the served enclave's socket) the job runs, as a module would on a parent."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nitro-cli").symlink_to(FAKE_NITRO_CLI)
    (tmp_path / "nitro-state").mkdir()
    image = tmp_path / "enclave.eif"
    image.write_bytes(b"FAKE-EIF\0" + b"\0" * 4096)
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "a.txt").write_text("hi")
    (tmp_path / "nitro.yml").write_text(NITRO_PLAYBOOK)
    monkeypatch.delenv("ENCLAVE_ENDPOINT")  # set by the enclave fixture: discovery must find the enclave itself
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "ENCLAVE_BACKEND": "nitro",
        "FAKE_NITRO_CLI_STATE": str(tmp_path / "nitro-state"),
    }
    extra_vars = {
        "image": str(image),
        "pcr0": enclave["pcr0"],
        "packages": str(enclave["sealed"].parent),
        "dataset": str(dataset),
        "results": str(tmp_path / "results"),
        "endpoint": enclave["endpoint"],
    }
    stats, tasks = ansible_playbook(tmp_path / "nitro.yml", extra_vars, env=env)[:2]
    assert stats["ignored"] == 2  # the push and the run without endpoint failed, nothing else did

    cid = tasks["Run the enclave with nitro-cli"]["enclave"]["EnclaveCID"]
    discovered = tasks["Without endpoint, ask the enclave nitro-cli runs"]
    assert discovered["backend"] == "nitro"
    assert [e["EnclaveCID"] for e in discovered["enclaves"]] == [cid]
    assert discovered["endpoint"] == f"vsock://{cid}:5000"
    assert discovered["reachable"] is False and discovered["health"] is None
    assert f"vsock://{cid}:5000" in discovered["endpoint_error"]
    for name in ("Without endpoint, push to it", "Without endpoint, run in it"):
        result = tasks[name]
        assert f"no enclave listens on vsock://{cid}:5000" in result["msg"], result
        assert "Traceback" not in result["msg"] and "No module named" not in result["msg"], result

    assert tasks["With endpoint, push the package"]["changed_files"] == ["app.pkg"]
    assert tasks["With endpoint, push the dataset"]["changed_files"] == ["a.txt"]
    ran = tasks["With endpoint, run"]
    assert ran["rc"] == 0 and ran["stdout_lines"] == ["classified a.txt short"]
    assert ran["attestation"]["pcrs"]["0"] == enclave["pcr0"]
    assert tasks["With endpoint, pull the outputs"]["changed_files"] == ["results.csv"]
    assert (tmp_path / "results" / "results.csv").read_text() == "a.txt,short\n"
    named = tasks["With endpoint, ask the enclave about itself and list nitro-cli's enclaves"]
    assert named["reachable"] is True and named["attestation"]["pcrs"]["0"] == enclave["pcr0"]
    assert [e["EnclaveCID"] for e in named["enclaves"]] == [cid]
