"""amazon.aws.kms_key through a real ansible-playbook against the local KMS: the owner's key tasks must run
unchanged against AWS and here, only endpoint_url differs.

The playbook creates an aliased key with a description, tags, rotation and the owner's key policy; a second
run changes nothing; a changed description and tags are applied (TagResource, UntagResource,
UpdateKeyDescription); state absent schedules the deletion, and a second absent changes nothing. Every step
is checked against the local KMS with boto3 and against its audit log (which operations the module called,
and that each was answered), and every run's results are read from ansible.posix.json.
"""

import hashlib
import json
import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from ansible_collections.confidential_ml.nitro.enclave_local.kms import LocalKms, LocalKmsServer
from ansible_collections.confidential_ml.nitro.plugins.module_utils.key_policy import render_policy

BIN = Path(sys.executable).parent
ACCOUNT = "111122223333"
OWNER_ARN = f"arn:aws:iam::{ACCOUNT}:role/owner"
USER_ARN = f"arn:aws:iam::{ACCOUNT}:role/enclave-host"
ALIAS = "confidential-ml/owner-key"
POLICY = render_policy(
    account_id=ACCOUNT,
    user_principals=[USER_ARN],
    admin_principals=[OWNER_ARN],
    pcr0=[hashlib.sha384(b"the owner's enclave image").hexdigest()],
)
READS = {
    "DescribeKey",
    "ListAliases",
    "ListKeys",
    "GetKeyRotationStatus",
    "ListGrants",
    "ListResourceTags",
    "ListKeyPolicies",
    "GetKeyPolicy",
}
KEY = {
    "alias": ALIAS,
    "description": "confidential ML package key",
    "tags": {"project": "confidential-ml", "stage": "test"},
    "enable_key_rotation": True,
    "policy": json.dumps(POLICY, indent=2),
}


@pytest.fixture(scope="module")
def kms(tmp_path_factory):
    with LocalKmsServer(LocalKms(tmp_path_factory.mktemp("kms-state"))) as server:
        yield server


@pytest.fixture(scope="module")
def owner(kms):
    return boto3.client(
        "kms",
        endpoint_url=kms.endpoint_url,
        region_name="us-east-1",
        **kms.kms.credentials("owner"),
        config=Config(retries={"max_attempts": 1}),
    )


@pytest.fixture(scope="module")
def run(kms, tmp_path_factory):
    """run(name, *tasks) -> (stats, {task name: result}): one ansible-playbook run of kms_key tasks."""
    tmp = tmp_path_factory.mktemp("ansible")
    site_packages = sysconfig.get_paths()["purelib"]  # amazon.aws comes with the ansible package
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no profile or region of the machine
    env.update(
        ANSIBLE_COLLECTIONS_PATH=os.pathsep.join(
            filter(None, [os.environ.get("ANSIBLE_COLLECTIONS_PATH"), site_packages])
        ),
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_HOME=str(tmp / "home"),
        ANSIBLE_LOCAL_TEMP=str(tmp / "local-tmp"),
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_NOCOLOR="1",
        AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
    )
    connection = {
        "endpoint_url": kms.endpoint_url,
        "region": "us-east-1",
        "access_key": kms.kms.credentials("owner")["aws_access_key_id"],
        "secret_key": kms.kms.credentials("owner")["aws_secret_access_key"],
    }

    def run(name: str, *tasks: dict) -> tuple[dict, dict]:
        play = {
            "name": name,
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "tasks": [
                {"name": f"{name} {i}", "amazon.aws.kms_key": {**connection, **task}} for i, task in enumerate(tasks)
            ],
        }
        path = tmp / f"{name}.yml"
        path.write_text(json.dumps([play], indent=2))  # YAML is a superset of JSON
        done = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", "localhost,", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = f"ansible-playbook {path} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        try:
            report = json.loads(done.stdout)
        except ValueError:
            pytest.fail(f"ansible.posix.json printed no JSON report\n{output}")
        results = {t["task"]["name"]: t["hosts"].get("localhost", {}) for t in report["plays"][0]["tasks"]}
        failed = {task: result.get("msg") for task, result in results.items() if result.get("failed")}
        assert done.returncode == 0 and not failed, f"failed tasks: {json.dumps(failed, indent=1)}\n{output}"
        assert len(results) == len(tasks), output
        return report["stats"]["localhost"], [results[f"{name} {i}"] for i in range(len(tasks))]

    return run


def kms_calls(caplog) -> list[tuple[str, str]]:
    """(operation, outcome) of every request the local KMS answered since the last call, from its audit log."""
    calls = [(r.args[0], r.args[-1]) for r in caplog.records if r.name == LocalKms.__module__ and " by " in r.msg]
    caplog.clear()
    return calls


def test_kms_key_create_idempotence_update_and_delete(run, owner, caplog):
    caplog.set_level(logging.INFO, logger=LocalKms.__module__)

    # 1. Create: an aliased key with description, tags, rotation and the owner's policy.
    stats, (created,) = run("create", KEY)
    calls = kms_calls(caplog)
    # The module looks the alias up first (not found), then everything it asks for is answered.
    assert calls[0] == ("DescribeKey", "NotFoundException") and {c[1] for c in calls[1:]} == {"ok"}, calls
    assert {"CreateKey", "CreateAlias", "EnableKeyRotation"} <= {op for op, _outcome in calls}
    assert (stats["changed"], stats["failures"]) == (1, 0)
    assert created["changed"] is True
    key_id = created["key_id"]
    assert created["aliases"] == [ALIAS]
    assert created["description"] == KEY["description"]
    assert created["tags"] == KEY["tags"]
    assert created["enable_key_rotation"] is True
    assert created["key_state"] == "Enabled" and created["grants"] == []
    assert created["key_policies"] == [POLICY]
    # ... and the local KMS holds exactly that.
    assert owner.describe_key(KeyId=f"alias/{ALIAS}")["KeyMetadata"]["KeyId"] == key_id
    assert owner.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == KEY["description"]
    tags = owner.list_resource_tags(KeyId=key_id)["Tags"]
    assert {t["TagKey"]: t["TagValue"] for t in tags} == KEY["tags"]
    assert owner.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is True
    assert json.loads(owner.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]) == POLICY

    # 2. The same task again: nothing to do.
    stats, (again,) = run("again", KEY)
    assert (stats["changed"], stats["failures"]) == (0, 0)
    assert again["changed"] is False and again["key_id"] == key_id
    calls = kms_calls(caplog)
    assert {op for op, _outcome in calls} <= READS and {outcome for _op, outcome in calls} == {"ok"}, calls
    assert len(owner.list_keys()["Keys"]) == 1

    # 3. A new description and tags (one dropped, one changed, one added); the policy stays as it was.
    new_tags = {"project": "confidential-ml-v2", "owner": "ml-team"}
    stats, (updated,) = run("update", {**KEY, "description": "package key, v2", "tags": new_tags})
    assert (stats["changed"], stats["failures"]) == (1, 0)
    assert updated["key_id"] == key_id and updated["changed"] is True
    assert updated["description"] == "package key, v2" and updated["tags"] == new_tags
    calls = kms_calls(caplog)
    assert {op for op, _outcome in calls} - READS == {"UpdateKeyDescription", "UntagResource", "TagResource"}, calls
    assert {outcome for _op, outcome in calls} == {"ok"}, calls
    assert owner.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == "package key, v2"
    assert {t["TagKey"]: t["TagValue"] for t in owner.list_resource_tags(KeyId=key_id)["Tags"]} == new_tags
    assert json.loads(owner.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]) == POLICY

    # 4. Absent schedules the deletion; absent again has nothing left to do.
    gone = {"alias": ALIAS, "state": "absent", "pending_window": 7}
    stats, (deleted, deleted_again) = run("delete", gone, gone)
    assert (stats["changed"], stats["failures"]) == (1, 0)
    assert deleted["changed"] is True and deleted["key_state"] == "PendingDeletion"
    assert deleted_again["changed"] is False and deleted_again["key_state"] == "PendingDeletion"
    calls = kms_calls(caplog)
    assert [op for op, _outcome in calls if op not in READS] == ["ScheduleKeyDeletion"], calls
    assert {outcome for _op, outcome in calls} == {"ok"}, calls
    metadata = owner.describe_key(KeyId=key_id)["KeyMetadata"]
    assert metadata["KeyState"] == "PendingDeletion" and "DeletionDate" in metadata
