"""The owner's modules through ansible-playbook on localhost, against a real local KMS on loopback.

The playbook allows an image's PCR0 in the key policy and seals a package; a second run must change
nothing, and a check-mode run after a source change must predict the reseal and write nothing.
"""

import hashlib
import json
import re
from pathlib import Path

import boto3
import pytest

from ansible_collections.confidential_ml.nitro.enclave_local.kms import LocalKms, LocalKmsServer
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package_format import read_header
from ansible_collections.confidential_ml.nitro.tests.fixtures.sources import copy_enclave_sources

ACCOUNT = "111122223333"
USER_ARN = f"arn:aws:iam::{ACCOUNT}:role/enclave-host"
PCR0 = hashlib.sha384(b"the owner's enclave image").hexdigest()

PLAYBOOK = """\
- name: Owner publishes an application for an attested enclave
  hosts: localhost
  gather_facts: false
  vars:
    kms: &kms
      kms_endpoint_url: "{{ lookup('ansible.builtin.env', 'TEST_KMS_ENDPOINT') }}"
      region: us-east-1
      access_key: "{{ lookup('ansible.builtin.env', 'TEST_KMS_ACCESS_KEY') }}"
      secret_key: "{{ lookup('ansible.builtin.env', 'TEST_KMS_SECRET') }}"
  tasks:
    - name: Allow the image in the key policy
      confidential_ml.nitro.enclave_key_policy:
        <<: *kms
        key_id: "{{ key_id }}"
        account_id: "ACCOUNT"
        user_principals: ["USER_ARN"]
        admin_principals: ["arn:aws:iam::ACCOUNT:role/owner"]
        pcr0: ["{{ pcr0 }}"]
        keep_newest: 2
      register: policy

    - name: Seal the application
      confidential_ml.nitro.enclave_package:
        <<: *kms
        src: "{{ src }}"
        dest: "{{ dest }}"
        key_id: "{{ policy.key_arn }}"
        name: app
        version: "1.0"
      register: package

    - name: The results carry what the owner publishes
      ansible.builtin.assert:
        that:
          - policy.allowed_pcr0 == [pcr0]
          - package.header.key_id == policy.key_arn
          - package.header.name == 'app'
""".replace("ACCOUNT", ACCOUNT).replace("USER_ARN", USER_ARN)


@pytest.fixture
def kms_server(tmp_path):
    with LocalKmsServer(LocalKms(tmp_path / "kms-state")) as server:
        yield server


@pytest.fixture
def workspace(tmp_path, kms_server, ansible_playbook):
    credentials = kms_server.kms.credentials("owner")
    owner = boto3.client("kms", endpoint_url=kms_server.endpoint_url, region_name="us-east-1", **credentials)
    key = owner.create_key()["KeyMetadata"]
    src = tmp_path / "app"
    src.mkdir()
    (src / "ml_algorithm.py").write_text("print('hello from the enclave')\n")
    (tmp_path / "owner.yml").write_text(PLAYBOOK)
    extra_vars = {"key_id": key["KeyId"], "pcr0": PCR0, "src": str(src), "dest": str(tmp_path / "app.pkg")}
    env = {
        "TEST_KMS_ENDPOINT": kms_server.endpoint_url,
        "TEST_KMS_ACCESS_KEY": credentials["aws_access_key_id"],
        "TEST_KMS_SECRET": credentials["aws_secret_access_key"],
    }

    def playbook(*args):
        return ansible_playbook(tmp_path / "owner.yml", extra_vars, *args, env=env)[:2]

    return {"dir": tmp_path, "key": key, "src": src, "owner": owner, "playbook": playbook}


def test_playbook_is_idempotent_and_check_mode_writes_nothing(workspace):
    owner, key, dest = workspace["owner"], workspace["key"], workspace["dir"] / "app.pkg"

    stats, tasks = workspace["playbook"]()
    assert stats["changed"] == 2
    assert tasks["Allow the image in the key policy"]["changed"] is True
    assert tasks["Seal the application"]["changed"] is True
    policy = json.loads(owner.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"])
    assert policy == tasks["Allow the image in the key policy"]["policy"]
    assert read_header(dest).key_id == key["Arn"]
    package = dest.read_bytes()

    stats, tasks = workspace["playbook"]()
    assert stats["changed"] == 0
    assert stats["ok"] == 3
    assert dest.read_bytes() == package

    (workspace["src"] / "ml_algorithm.py").write_text("print('version 2')\n")
    stats, tasks = workspace["playbook"]("--check", "--diff")
    assert stats["changed"] == 1
    sealed = tasks["Seal the application"]
    assert sealed["changed"] is True
    assert sealed["diff"]["before"] != sealed["diff"]["after"]
    assert dest.read_bytes() == package


IMAGE_PLAYBOOK = """\
- name: Owner builds and measures the enclave image
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Build the image
      confidential_ml.nitro.enclave_image:
        backend: local
        source: "{{ source }}"
        output: "{{ output }}"
      register: image
"""


def test_check_mode_reports_an_image_that_would_change_through_ansible_playbook(tmp_path, ansible_playbook):
    """Issue 12: after an edit to the enclave's code, `--check --diff` reports the image as changed with the PCRs
    before and after, and leaves the image and its measurements file as they were."""
    source = copy_enclave_sources(tmp_path / "source")
    output = tmp_path / "release" / "enclave.img"
    output.parent.mkdir()
    (tmp_path / "image.yml").write_text(IMAGE_PLAYBOOK)
    extra_vars = {"source": str(source), "output": str(output)}
    built = ansible_playbook(tmp_path / "image.yml", extra_vars)[1]["Build the image"]
    assert built["changed"] is True
    image, record = output.read_bytes(), Path(built["measurements_file"]).read_bytes()

    stats, tasks = ansible_playbook(tmp_path / "image.yml", extra_vars, "--check", "--diff")[:2]
    assert stats["changed"] == 0 and tasks["Build the image"]["measurements"] == built["measurements"]

    server = next((source / "enclave_server").glob("*.py"))
    server.write_text(server.read_text() + "\n# the owner's next release\n")
    stats, tasks, stdout = ansible_playbook(tmp_path / "image.yml", extra_vars, "--check", "--diff")
    check = tasks["Build the image"]
    assert stats["changed"] == 1 and check["changed"] is True
    assert check["measurements"]["pcr0"] != built["measurements"]["pcr0"]
    assert json.loads(check["diff"]["before"])["pcr0"] == built["measurements"]["pcr0"]
    assert json.loads(check["diff"]["after"])["pcr0"] == check["measurements"]["pcr0"]
    assert re.search(rf'^\+ +"pcr0": "{check["measurements"]["pcr0"]}"', stdout, re.M), stdout
    assert output.read_bytes() == image and Path(built["measurements_file"]).read_bytes() == record
