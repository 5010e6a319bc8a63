"""The owner's modules through ansible-playbook on localhost, against a real local KMS on loopback.

The playbook allows an image's PCR0 in the key policy and seals a package; a second run must change
nothing, a check-mode run after a source change must predict the reseal and write nothing, and
ansible-doc must render both modules.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from ansible_collections.confidential_ml.nitro.enclave_local.kms import LocalKms, LocalKmsServer
from ansible_collections.confidential_ml.nitro.plugins.module_utils.package import read_header

BIN = Path(sys.executable).parent
CALLBACK_PLUGINS = Path(__file__).resolve().parent / "callback_plugins"
ACCOUNT = "111122223333"
USER_ARN = f"arn:aws:iam::{ACCOUNT}:role/enclave-host"
PCR0 = hashlib.sha384(b"the owner's enclave image").hexdigest()
MODULES = ("confidential_ml.nitro.enclave_key_policy", "confidential_ml.nitro.enclave_package")

PLAYBOOK = """\
- name: Owner publishes an application for an attested enclave
  hosts: localhost
  gather_facts: false
  vars:
    kms: &kms
      kms_endpoint_url: "{{ lookup('ansible.builtin.env', 'TEST_KMS_ENDPOINT') }}"
      region: us-east-1
      access_key: owner
      secret_key: "{{ lookup('ansible.builtin.env', 'TEST_KMS_SECRET') }}"
  tasks:
    - name: Allow the image in the key policy
      confidential_ml.nitro.enclave_key_policy:
        <<: *kms
        key_id: "{{ key_id }}"
        account_id: "ACCOUNT"
        user_principals: ["USER_ARN"]
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
def workspace(tmp_path, kms_server):
    owner = boto3.client(
        "kms",
        endpoint_url=kms_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="owner",
        aws_secret_access_key="x",
    )
    key = owner.create_key()["KeyMetadata"]
    src = tmp_path / "app"
    src.mkdir()
    (src / "ml_algorithm.py").write_text("print('hello from the enclave')\n")
    (tmp_path / "owner.yml").write_text(PLAYBOOK)
    (tmp_path / "inventory.ini").write_text(
        f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
    )
    env = dict(
        os.environ,
        ANSIBLE_CALLBACK_PLUGINS=str(CALLBACK_PLUGINS),  # record_results.py: results as JSON
        ANSIBLE_CALLBACKS_ENABLED="record_results",
        TEST_RESULTS_FILE=str(tmp_path / "results.json"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-local"),
        ANSIBLE_REMOTE_TMP=str(tmp_path / "ansible-remote"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        TEST_KMS_ENDPOINT=kms_server.endpoint_url,
        TEST_KMS_SECRET="not-checked-by-the-local-kms",
    )
    return {"dir": tmp_path, "key": key, "src": src, "env": env, "owner": owner}


def playbook(workspace, *extra):
    tmp = workspace["dir"]
    command = [
        str(BIN / "ansible-playbook"),
        "-i",
        str(tmp / "inventory.ini"),
        str(tmp / "owner.yml"),
        "-e",
        json.dumps(
            {
                "key_id": workspace["key"]["KeyId"],
                "pcr0": PCR0,
                "src": str(workspace["src"]),
                "dest": str(tmp / "app.pkg"),
            }
        ),
        *extra,
    ]
    results = tmp / "results.json"
    results.unlink(missing_ok=True)
    done = subprocess.run(command, env=workspace["env"], capture_output=True, text=True, timeout=300, check=False)
    output = f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, output
    assert re.search(r"^localhost +: ok=\d+ +changed=\d+ +unreachable=0 +failed=0 ", done.stdout, re.M), output
    recorded = json.loads(results.read_text())
    stats = recorded["stats"]["localhost"]
    # The recap printed by the default callback says the same as the recorded one.
    assert re.search(rf"^localhost +: ok={stats['ok']} +changed={stats['changed']} ", done.stdout, re.M), output
    return stats, recorded["tasks"]


def test_playbook_is_idempotent_and_check_mode_writes_nothing(workspace):
    owner, key, dest = workspace["owner"], workspace["key"], workspace["dir"] / "app.pkg"

    stats, tasks = playbook(workspace)
    assert stats["changed"] == 2
    assert tasks["Allow the image in the key policy"]["changed"] is True
    assert tasks["Seal the application"]["changed"] is True
    policy = json.loads(owner.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"])
    assert policy == tasks["Allow the image in the key policy"]["policy"]
    assert read_header(dest).key_id == key["Arn"]
    package = dest.read_bytes()

    stats, tasks = playbook(workspace)
    assert stats["changed"] == 0
    assert stats["ok"] == 3
    assert dest.read_bytes() == package

    (workspace["src"] / "ml_algorithm.py").write_text("print('version 2')\n")
    stats, tasks = playbook(workspace, "--check", "--diff")
    assert stats["changed"] == 1
    sealed = tasks["Seal the application"]
    assert sealed["changed"] is True
    assert sealed["diff"]["before"] != sealed["diff"]["after"]
    assert dest.read_bytes() == package


@pytest.mark.parametrize("module", MODULES)
def test_ansible_doc_renders(module, workspace):
    done = subprocess.run(
        [str(BIN / "ansible-doc"), "-t", "module", module],
        env=workspace["env"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "[ERROR]" not in done.stderr and "[WARNING]" not in done.stderr, done.stderr
    text = done.stdout
    assert module in text
    for section in ("OPTIONS", "ATTRIBUTES", "EXAMPLES", "RETURN VALUES"):
        assert section in text, f"{section} missing from ansible-doc {module}"
    for option in ("key_id", "kms_endpoint_url", "secret_key", "check_mode", "diff_mode"):
        assert option in text

    as_json = subprocess.run(
        [str(BIN / "ansible-doc"), "-t", "module", "--json", module],
        env=workspace["env"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    doc = json.loads(as_json.stdout)[module]
    assert doc["doc"]["options"]["secret_key"]["type"] == "str"
    assert doc["doc"]["attributes"]["check_mode"]["support"] == "full"
    assert doc["return"]
