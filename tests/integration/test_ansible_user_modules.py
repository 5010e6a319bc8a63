"""The user's modules through ansible-playbook on localhost, against a real served enclave.

The playbook pushes the owner's package and the user's dataset, runs the owner's script in the background
(async/poll), pulls the outputs and asks the enclave for its health and attestation; a second push changes
nothing, and a check-mode push after a dataset change lists the file and copies nothing.
"""

import re

import pytest

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
