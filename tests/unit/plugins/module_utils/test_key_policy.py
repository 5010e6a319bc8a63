"""The owner's key policy as data: PCR values, render, merge by Sid, the PCR0 rotation window."""

import copy
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.confidential_ml.nitro.plugins.module_utils import key_policy, key_policy_update, policy_lint
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import PolicyError
from ansible_collections.confidential_ml.nitro.tests.fixtures.key_policies import (
    AWS_DEFAULT,
    KEY,
    OTHER,
    OWNER,
    OWNER_ROLE,
    PCR0,
    PCR0_NEXT,
    PCR8,
    ROOT,
    STRANGER,
    USER,
    USER_ACCOUNT_ROLE,
    ZERO,
    decide,
    policy,
    render,
)


def test_normalize_pcr():
    assert key_policy.normalize_pcr(f"  {PCR0.upper()}\n") == PCR0
    assert key_policy.normalize_pcr(ZERO, allow_debug=True) == ZERO


@pytest.mark.parametrize(
    ("value", "message"),
    [(PCR0[:64], "96 hex"), (PCR0[:-1] + "g", "96 hex"), ("", "96 hex"), (ZERO, "debug"), (None, "hex string")],
)
def test_normalize_pcr_refuses(value, message):
    with pytest.raises(PolicyError, match=message):
        key_policy.normalize_pcr(value)


def test_rendered_policy_shape():
    doc = render(pcr0=[PCR0_NEXT.upper(), PCR0, PCR0], user_principals=[USER, USER])
    by_sid = {s["Sid"]: s for s in doc["Statement"]}
    assert list(by_sid) == [key_policy.SID_ADMIN, key_policy.SID_ALLOW, key_policy.SID_DENY]
    assert by_sid[key_policy.SID_ADMIN]["Principal"] == {"AWS": [OWNER_ROLE]}
    assert by_sid[key_policy.SID_ALLOW]["Principal"] == {"AWS": [USER]}
    # PCR0 values keep the order given (newest first), lowercase, each once.
    assert by_sid[key_policy.SID_ALLOW]["Condition"] == {"StringEqualsIgnoreCase": {KEY: [PCR0_NEXT, PCR0]}}
    assert by_sid[key_policy.SID_DENY]["Principal"] == "*"
    assert by_sid[key_policy.SID_DENY]["Condition"] == {"StringNotEqualsIgnoreCase": {KEY: [PCR0_NEXT, PCR0]}}
    assert doc["Version"] == "2012-10-17"


def test_render_is_deterministic_and_idempotent():
    first = render(pcr0=[PCR0_NEXT, PCR0], pcr8=[PCR8], user_principals=[USER, USER_ACCOUNT_ROLE])
    again = render(pcr0=[PCR0_NEXT.upper(), PCR0, PCR0_NEXT], pcr8=[PCR8], user_principals=[USER_ACCOUNT_ROLE, USER])
    assert first == again
    # The PCR0 order is the caller's (newest first): the other order is another policy.
    assert key_policy.allowed_pcr0(render(pcr0=[PCR0, PCR0_NEXT])) == [PCR0, PCR0_NEXT]
    assert key_policy.allowed_pcr0(first) == [PCR0_NEXT, PCR0]
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    remerged = render(
        pcr0=[PCR0_NEXT, PCR0], pcr8=[PCR8], user_principals=[USER, USER_ACCOUNT_ROLE], existing=json.dumps(first)
    )
    assert remerged == first


def test_rendered_policy_decisions():
    doc = render(pcr0=[PCR0, PCR0_NEXT])
    for pcr in (PCR0, PCR0.upper(), PCR0_NEXT):
        assert decide(doc, {KEY: pcr}).effect == "Allow"
    # no attestation: explicitly denied, with or without an encryption context
    for context in ({}, {"kms:EncryptionContext:package": "p1"}, {KEY: None}):
        decision = decide(doc, context)
        assert (decision.effect, decision.statement) == ("ExplicitDeny", key_policy.SID_DENY)
    assert decide(doc, {KEY: OTHER}).effect == "ExplicitDeny"
    assert decide(doc, {KEY: ZERO}).effect == "ExplicitDeny"
    # the owner administers the key and seals packages, but cannot decrypt or re-encrypt them out
    assert decide(doc, action="kms:PutKeyPolicy", principal=OWNER_ROLE).allowed
    assert decide(doc, action="kms:GenerateDataKey", principal=OWNER_ROLE).allowed
    assert decide(doc, action="kms:Decrypt", principal=ROOT).effect == "ExplicitDeny"
    assert decide(doc, action="kms:ReEncryptFrom", principal=OWNER_ROLE).effect == "ExplicitDeny"
    # the user gets nothing else, and strangers nothing at all
    assert decide(doc, action="kms:GenerateDataKey").effect == "ImplicitDeny"
    assert not decide(doc, {KEY: PCR0}, principal=USER_ACCOUNT_ROLE).allowed
    assert not decide(doc, {KEY: PCR0}, principal=STRANGER).allowed


def test_rendered_policy_with_pcr8_denies_either_mismatch():
    doc = render(pcr8=[PCR8])
    assert decide(doc, {KEY: PCR0, key_policy.PCR8: PCR8.upper()}).effect == "Allow"
    assert decide(doc, {KEY: PCR0, key_policy.PCR8: OTHER}).statement == key_policy.SID_DENY_PCR8
    assert decide(doc, {KEY: PCR0}).statement == key_policy.SID_DENY_PCR8
    assert decide(doc, {KEY: OTHER, key_policy.PCR8: PCR8}).statement == key_policy.SID_DENY
    assert decide(doc, {KEY: OTHER, key_policy.PCR8: OTHER}).effect == "ExplicitDeny"
    # even the admin's kms:* cannot use a re-signed copy of the right image
    assert decide(doc, {KEY: PCR0, key_policy.PCR8: OTHER}, principal=ROOT).effect == "ExplicitDeny"


def test_render_refuses_bad_input():
    for kwargs, message in [
        ({"account_id": "1234"}, "12-digit"),
        ({"user_principals": ["*"]}, "refused"),
        ({"user_principals": []}, "empty"),
        ({"admin_principals": []}, "empty"),
        ({"pcr0": []}, "pcr0 is empty"),
        ({"pcr0": [PCR0[:10]]}, "pcr0: .*96 hex"),
        ({"pcr0": [ZERO]}, "debug"),
        ({"pcr8": ["nothex"]}, "pcr8"),
        ({"admin_principals": [OWNER_ROLE], "user_principals": [USER, OWNER_ROLE]}, "both key administrator"),
    ]:
        with pytest.raises(PolicyError, match=message):
            render(**kwargs)
    assert render(pcr0=[ZERO], allow_debug=True)  # debug keys for tests only


def test_render_normalizes_principals():
    doc = render(admin_principals=[OWNER, OWNER_ROLE], user_principals=USER)
    admin = next(s for s in doc["Statement"] if s["Sid"] == key_policy.SID_ADMIN)
    assert admin["Principal"] == {"AWS": sorted([ROOT, OWNER_ROLE])}


def test_merge_keeps_foreign_statements_and_replaces_ours_in_place():
    existing = copy.deepcopy(AWS_DEFAULT)
    doc = render(existing=existing)
    assert existing == AWS_DEFAULT  # input untouched
    assert doc["Id"] == "key-default-1"
    sids = [s.get("Sid") for s in doc["Statement"]]
    # AWS's default account-wide statement is replaced by OwnerAdministers (lint refuses it: changed on purpose)
    assert sids == [key_policy.SID_ALLOW, None, key_policy.SID_ADMIN, key_policy.SID_DENY]
    assert doc["Statement"][1] == AWS_DEFAULT["Statement"][2]
    assert key_policy.allowed_pcr0(doc) == [PCR0]
    assert render(existing=doc) == doc
    assert policy_lint.lint(doc) == []


def test_merge_drops_our_pcr8_deny_when_pcr8_is_no_longer_pinned():
    pinned = render(pcr8=[PCR8], existing=AWS_DEFAULT)
    assert key_policy.SID_DENY_PCR8 in [s.get("Sid") for s in pinned["Statement"]]
    unpinned = render(existing=pinned)
    assert key_policy.SID_DENY_PCR8 not in [s.get("Sid") for s in unpinned["Statement"]]
    assert unpinned == render(existing=AWS_DEFAULT)


def test_merge_statements_directly():
    existing = policy({"Sid": "X", "Effect": "Allow"}, {"Sid": "Y", "v": 1}, {"Sid": "Y", "v": 2}, {"Sid": "Z"})
    merged = key_policy.merge_statements(
        json.dumps(existing), [{"Sid": "Y", "v": 3}, {"Sid": "N"}], drop=["Z", "X-not"]
    )
    assert merged["Statement"] == [{"Sid": "X", "Effect": "Allow"}, {"Sid": "Y", "v": 3}, {"Sid": "N"}]
    single = key_policy.merge_statements({"Statement": {"Sid": "F"}}, [{"Sid": "N"}])
    assert single == {"Version": "2012-10-17", "Statement": [{"Sid": "F"}, {"Sid": "N"}]}
    with pytest.raises(PolicyError, match="unique Sid"):
        key_policy.merge_statements(existing, [{"Sid": "N"}, {"Sid": "N"}])
    with pytest.raises(PolicyError, match="unique Sid"):
        key_policy.merge_statements(existing, [{"Effect": "Allow"}])


def test_allowed_pcr0_gives_a_rotation_window():
    old = render(pcr0=[PCR0])
    assert key_policy.allowed_pcr0(json.dumps(old)) == [PCR0]
    rotated = render(pcr0=[PCR0_NEXT, *key_policy.allowed_pcr0(old)], existing=old)
    assert key_policy.allowed_pcr0(rotated) == [PCR0_NEXT, PCR0]  # newest first, as given
    assert decide(rotated, {KEY: PCR0}).allowed and decide(rotated, {KEY: PCR0_NEXT}).allowed
    assert key_policy.allowed_pcr0(AWS_DEFAULT | {"Statement": AWS_DEFAULT["Statement"][:1]}) == []


def test_policy_diff():
    before, after = render(), render(pcr0=[PCR0, PCR0_NEXT])
    diff = key_policy.policy_diff(json.dumps(before), after)
    assert json.loads(diff["before"]) == before and json.loads(diff["after"]) == after
    assert diff["after"].endswith("\n") and '\n  "Statement"' in diff["after"]
    assert key_policy.policy_diff(None, after)["before"] == ""


A, B, C = PCR0, PCR0_NEXT, OTHER


@pytest.mark.parametrize(
    ("given", "allowed", "keep", "window"),
    [
        ([B], [A], None, [B, A]),  # without a window every allowed value stays, the new one first
        ([C], [A, B], 2, [C, A]),  # the policy's order says which allowed value is newer
        ([C], [C, A], 2, [C, A]),  # the same rotation again: the same window
        ([f" {C.upper()} ", B, A], [A], 2, [C, B]),  # given values first, in their order; case and space ignored
        ([], [A, B], 1, [A]),  # nothing new: narrow what is allowed
        ([], [A, B], None, [A, B]),
    ],
)
def test_rotation_window(given, allowed, keep, window):
    assert key_policy.rotation_window(given, allowed, keep) == (window, [])


def test_rotation_window_drops_what_is_no_pcr0_with_a_warning():
    window, warnings = key_policy.rotation_window([A], [ZERO, "abc", B])
    assert window == [A, B]
    assert len(warnings) == 2 and "not carried over" in warnings[0] and "all zeros" in warnings[0]


@pytest.mark.parametrize("keep", [0, -1, True, 1.5, "2"])
def test_keep_newest_must_be_a_positive_count(keep):
    with pytest.raises(PolicyError, match=f"keep_newest is {keep}; give 1 or more"):
        key_policy.rotation_window([A], [], keep)
    with pytest.raises(PolicyError, match="give 1 or more"):  # refused before anything is read from KMS
        key_policy_update.OwnerKeyPolicy(keep_newest=keep)


_measurement = st.binary(min_size=48, max_size=48).filter(any)  # all zeros is the debug PCR, refused


@given(pcrs=st.lists(_measurement, min_size=1, max_size=5), probe=st.binary(min_size=48))
@settings(max_examples=50, deadline=None)
def test_rendered_policy_allows_exactly_its_pcr0s(pcrs, probe):
    values = [p.hex() for p in pcrs]
    doc = render(pcr0=[v.upper() for v in values])
    assert render(pcr0=values, existing=doc) == doc
    assert key_policy.allowed_pcr0(doc) == list(dict.fromkeys(values))  # in the order given, each once
    for value in values:
        assert decide(doc, {KEY: value}).allowed
        assert decide(doc, {KEY: value.upper()}).allowed
    other = hashlib.sha384(probe).hexdigest()
    assert decide(doc, {KEY: other}).allowed is (other in values)
    assert not decide(doc, {}).allowed
    assert policy_lint.lint(doc) == []


def test_render_needs_admin_principals():
    with pytest.raises(PolicyError, match="admin_principals is not set"):
        key_policy.render_policy(account_id=OWNER, user_principals=[USER], pcr0=[PCR0])
