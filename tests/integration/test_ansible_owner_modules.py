"""The owner's modules through ansible-playbook on localhost, against a real local KMS on loopback.

The playbook allows an image's PCR0 in the key policy and seals a package; a second run must change
nothing, and a check-mode run after a source change must predict the reseal and write nothing.
"""

import hashlib
import json

import boto3
import pytest

from ansible_collections.confidential_ml.nitro.enclave_local.kms import LocalKms, LocalKmsServer
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package import read_header

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
