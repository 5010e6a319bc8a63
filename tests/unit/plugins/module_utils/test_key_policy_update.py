"""The change the enclave_key_policy module and `enclave policy apply` make to a key's policy, planned once."""

import json

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils import key_policy, key_policy_update
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import UnsoundPolicyError
from ansible_collections.confidential_ml.nitro.tests.fixtures.key_policies import (
    AWS_DEFAULT,
    KEY,
    OWNER,
    OWNER_ROLE,
    PCR0,
    PCR0_NEXT,
    USER,
    ZERO,
    allow,
    decide,
    policy,
    render,
)

A, B = PCR0, PCR0_NEXT


def owner_policy(**kwargs):
    args = {"account_id": OWNER, "user_principals": [USER], "admin_principals": [OWNER_ROLE], "pcr0": [A]} | kwargs
    return key_policy_update.OwnerKeyPolicy(**args)


KEY_ARN = f"arn:aws:kms:us-east-1:{OWNER}:key/1234abcd-12ab-34cd-56ef-1234567890ab"


NEW_KEY = AWS_DEFAULT | {"Statement": AWS_DEFAULT["Statement"][:1]}  # the policy KMS gives a new key


def test_plan_is_idempotent_and_keeps_the_owners_statements():
    foreign = allow(sid="OwnerAudit", action="kms:DescribeKey", principal={"AWS": OWNER_ROLE})
    first = owner_policy().plan(NEW_KEY | {"Statement": [*NEW_KEY["Statement"], foreign]}, KEY_ARN)
    assert first.changed and first.allowed_pcr0 == [A] and first.key_arn == KEY_ARN
    assert [s["Sid"] for s in first.after["Statement"]] == [
        "OwnerAudit",
        key_policy.SID_ADMIN,
        key_policy.SID_ALLOW,
        key_policy.SID_DENY,
    ]
    again = owner_policy().plan(json.dumps(first.after, indent=4), KEY_ARN)  # text and layout do not count
    assert not again.changed and again.after == first.after
    assert json.loads(again.diff()["before"]) == json.loads(again.diff()["after"])
    rotated = owner_policy(pcr0=[B], keep_newest=1).plan(first.after, KEY_ARN)
    assert rotated.changed and rotated.allowed_pcr0 == [B]
    assert not decide(rotated.after, {KEY: A}).allowed and decide(rotated.after, {KEY: B}).allowed


def test_plan_absent_takes_ours_out_and_restores_the_default_when_nothing_is_left():
    present = owner_policy().plan(NEW_KEY, KEY_ARN).after
    gone = key_policy_update.OwnerKeyPolicy(state="absent").plan(present, KEY_ARN)
    assert gone.changed and [s["Sid"] for s in gone.after["Statement"]] == [key_policy.SID_AWS_DEFAULT]
    assert gone.allowed_pcr0 == []
    assert not key_policy_update.OwnerKeyPolicy(state="absent").plan(gone.after, KEY_ARN).changed


def test_plan_refuses_an_unsound_result_and_says_why():
    """The host's role sneaks in an unconditioned Decrypt beside ours: the plan refuses to write over it."""
    legacy = allow(sid="LegacyHostAccess", principal={"AWS": USER})
    with pytest.raises(UnsoundPolicyError, match="refusing to write an unsound key policy") as refused:
        owner_policy().plan(policy(legacy), KEY_ARN)
    assert any("LegacyHostAccess" in problem for problem in refused.value.problems)
    assert key_policy.SID_DENY in [s["Sid"] for s in refused.value.policy["Statement"]]


def test_plan_carries_no_debug_pcr0_over():
    debug = render(pcr0=[ZERO], allow_debug=True)
    change = owner_policy(pcr0=[B]).plan(debug, KEY_ARN)
    assert change.allowed_pcr0 == [B] and "all zeros" in change.warnings[0]
