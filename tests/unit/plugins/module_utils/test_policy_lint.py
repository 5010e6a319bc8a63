"""Lint: the rules a key policy of an enclave-only key, and the owner's signing key's policy, must follow."""

import json

import pytest

from ansible_collections.confidential_ml.nitro.plugins.module_utils import key_policy, policy_lint
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
    USER,
    USER_ACCOUNT_ROLE,
    ZERO,
    allow,
    decide,
    deny,
    problems_naming,
    render,
    replace,
    without,
)


def test_lint_passes_rendered_policies():
    assert policy_lint.lint(render(), user_principals=[USER]) == []
    assert policy_lint.lint(json.dumps(render(pcr8=[PCR8], pcr0=[PCR0, PCR0_NEXT]))) == []
    assert policy_lint.lint(render(admin_principals=[OWNER_ROLE], user_principals=[USER, USER_ACCOUNT_ROLE])) == []
    assert policy_lint.lint(render(pcr0=[ZERO], allow_debug=True), allow_debug=True) == []


def test_lint_missing_deny():
    problems = policy_lint.lint(without(render(), key_policy.SID_DENY), user_principals=[USER])
    assert problems_naming(problems, "no statement explicitly denies kms:Decrypt")
    # and the admin's kms:* now hands out the key without attestation
    assert problems_naming(problems, key_policy.SID_ADMIN, "kms:Decrypt without an attestation", OWNER_ROLE)
    assert problems_naming(problems, key_policy.SID_ADMIN, "kms:ReEncryptFrom")


def test_lint_all_zero_pcr0():
    doc = render(pcr0=[ZERO], allow_debug=True)
    problems = policy_lint.lint(doc)
    assert problems_naming(problems, key_policy.SID_ALLOW, "all-zero")
    assert problems_naming(problems, key_policy.SID_DENY, "all-zero")
    assert all(p.endswith(".") for p in problems)


def test_lint_short_and_wildcard_hex():
    short = {"StringEqualsIgnoreCase": {KEY: [PCR0[:64]]}}
    problems = policy_lint.lint(replace(render(), key_policy.SID_ALLOW, Condition=short))
    assert problems_naming(problems, key_policy.SID_ALLOW, "96-hex-character", "64 characters")
    wildcard = {"StringLike": {KEY: "*"}}
    problems = policy_lint.lint(replace(render(), key_policy.SID_ALLOW, Condition=wildcard))
    assert problems_naming(problems, key_policy.SID_ALLOW, "96-hex-character")


def test_lint_extra_unconditional_allow_for_the_user():
    extra = allow(principal={"AWS": USER}, sid="Convenience")
    doc = render() | {"Statement": [*render()["Statement"], extra]}
    assert decide(doc).effect == "ExplicitDeny"  # the Deny still saves it today...
    problems = policy_lint.lint(doc, user_principals=[USER])
    assert problems_naming(problems, "Convenience", USER, "without requiring an attestation")  # ...lint says so
    # without the Deny it is an outright leak, named with the statement that grants it
    problems = policy_lint.lint(without(doc, key_policy.SID_DENY), user_principals=[USER])
    assert problems_naming(problems, "Convenience", USER, "kms:Decrypt without an attestation")


def test_lint_deny_with_positive_operator():
    positive = {"StringEqualsIgnoreCase": {KEY: [OTHER]}}  # denies only one bad image; absence slips through
    doc = replace(render(), key_policy.SID_DENY, Condition=positive)
    problems = policy_lint.lint(doc)
    assert problems_naming(problems, key_policy.SID_DENY, "positive operator")
    assert problems_naming(problems, key_policy.SID_ADMIN, "without an attestation")


def test_lint_deny_for_some_principals_only():
    doc = replace(render(), key_policy.SID_DENY, Principal={"AWS": USER})
    problems = policy_lint.lint(doc)
    assert problems_naming(problems, key_policy.SID_DENY, 'Principal "*"')
    assert problems_naming(problems, key_policy.SID_ADMIN, OWNER_ROLE, "without an attestation")


def test_lint_unpinned_pcr8():
    doc = without(render(pcr8=[PCR8]), key_policy.SID_DENY_PCR8)
    problems = policy_lint.lint(doc)
    assert problems_naming(problems, key_policy.SID_ADMIN, "PCR8 that is not pinned")


def test_lint_foreign_allow_for_another_image():
    # A foreign statement grants the key to another image: the Deny stops it, so the
    # policy is sound, but our own user must still get the key.
    doc = render()
    doc["Statement"].append(allow({"StringEqualsIgnoreCase": {KEY: OTHER}}, principal={"AWS": USER}, sid="Old"))
    assert policy_lint.lint(doc) == [
        f"{USER} cannot call kms:Decrypt even from an enclave of an allowed image ({OTHER[:16]}...): "
        f"statement {key_policy.SID_DENY} denies kms:Decrypt to {USER}; "
        "fix the Allow statement or the statement that blocks it."
    ]


def test_lint_user_who_administers_the_key():
    doc = render(admin_principals=[OWNER_ROLE])
    doc["Statement"][1]["Principal"]["AWS"].append(OWNER_ROLE)  # hand-edited: the host's role is also an admin
    assert problems_naming(policy_lint.lint(doc), key_policy.SID_ADMIN, OWNER_ROLE, "without requiring an attestation")


def test_lint_user_locked_out():
    doc = render()
    doc["Statement"].append(deny(principal={"AWS": USER}, sid="Lockout"))
    assert problems_naming(policy_lint.lint(doc), USER, "cannot call kms:Decrypt", "Lockout")


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ("{oops", ["not valid JSON"]),
        ({"Statement": render()["Statement"]}, ["no Version"]),
        ({"Version": "2012-10-17"}, ["no Statement"]),
        (replace(render(), key_policy.SID_ALLOW, Conditon={}), ["Conditon"]),
        (replace(render(), key_policy.SID_DENY, Sid=key_policy.SID_ALLOW), [key_policy.SID_ALLOW, "more than once"]),
        (
            replace(render(), key_policy.SID_ALLOW, Condition={"StringEquals": {KEY: PCR0.upper()}}),
            [key_policy.SID_ALLOW, "case-sensitively"],
        ),
        (
            replace(
                render(),
                key_policy.SID_ALLOW,
                Condition={"StringEqualsIgnoreCase": {"kms:RecipientAttestation:Image": PCR0}},
            ),
            [key_policy.SID_ALLOW, "never sets"],
        ),
    ],
)
def test_lint_names_shape_problems(doc, words):
    assert problems_naming(policy_lint.lint(doc), *words)


RELEASING = ["kms:Decrypt", "kms:GenerateDataKey", "kms:ReEncrypt*", "kms:*", "kms:GenerateDataKey*"]


@pytest.mark.parametrize("action", RELEASING)
@pytest.mark.parametrize(
    "principal", ["*", {"AWS": "*"}, {"AWS": "arn:aws:iam::*:root"}, {"AWS": f"arn:aws:iam::{OWNER}:role/*"}]
)
def test_lint_refuses_wildcard_principals_on_what_releases_the_key(principal, action):
    attested = {"StringEqualsIgnoreCase": {KEY: PCR0}}  # even with the attestation condition
    doc = render()
    doc["Statement"].append(allow(attested, principal=principal, action=action, sid="Wide"))
    assert problems_naming(policy_lint.lint(doc), "statement Wide", "wildcard principal")


def test_lint_allows_wildcard_principals_on_what_does_not_release_the_key():
    doc = render()
    doc["Statement"].append(allow(principal="*", action="kms:DescribeKey", sid="Describe"))
    assert not problems_naming(policy_lint.lint(doc), "Describe")


@pytest.mark.parametrize("principal", [ROOT, OWNER])
def test_lint_refuses_an_account_wide_allow_without_conditions(principal):
    doc = render()
    doc["Statement"].append(allow(principal={"AWS": principal}, action="kms:GenerateDataKey", sid="Account"))
    assert problems_naming(policy_lint.lint(doc), "statement Account", "whole account", "without conditions")
    # AWS's own default statement is exactly that, and render_policy replaces it
    problems = policy_lint.lint(AWS_DEFAULT | {"Statement": AWS_DEFAULT["Statement"][:1] + render()["Statement"]})
    assert problems_naming(problems, "Enable IAM User Permissions", "whole account")
    assert "Enable IAM User Permissions" not in json.dumps(render(existing=AWS_DEFAULT))
    # with a condition (here the attestation) an account principal is the evaluator's business, not this rule's
    conditioned = render()
    conditioned["Statement"].append(
        allow({"StringEqualsIgnoreCase": {KEY: PCR0}}, principal={"AWS": principal}, sid="Account")
    )
    assert not problems_naming(policy_lint.lint(conditioned), "whole account")


def test_rendered_signing_policy_lets_only_the_owner_sign():
    doc = key_policy.render_signing_policy(account_id=OWNER, owner_principals=[OWNER_ROLE], reader_principals=[USER])
    assert policy_lint.lint_signing_policy(doc, owner_principals=[OWNER_ROLE]) == []
    assert decide(doc, action="kms:Sign", principal=OWNER_ROLE).allowed
    assert decide(doc, action="kms:GetPublicKey", principal=USER).allowed
    assert not decide(doc, action="kms:Sign", principal=USER).allowed
    assert not decide(doc, action="kms:Sign", principal=ROOT).allowed


@pytest.mark.parametrize(
    "principal",
    ["*", {"AWS": "*"}, {"AWS": ROOT}, {"AWS": OWNER}, {"AWS": USER}, {"AWS": f"arn:aws:iam::{OWNER}:role/*"}],
)
@pytest.mark.parametrize("action", ["kms:Sign", "kms:*", "kms:S*"])
def test_lint_signing_policy_refuses_any_other_signer(principal, action):
    doc = key_policy.render_signing_policy(account_id=OWNER, owner_principals=[OWNER_ROLE])
    doc["Statement"].append(allow({"Bool": {"aws:SecureTransport": "true"}}, principal=principal, action=action,
                                  sid="AlsoSigns"))  # fmt: skip
    problems = policy_lint.lint_signing_policy(doc, owner_principals=[OWNER_ROLE])
    assert problems_naming(problems, "statement AlsoSigns allows kms:Sign", "who is not the owner")


def test_lint_signing_policy_wants_the_owner_able_to_sign():
    doc = key_policy.render_signing_policy(account_id=OWNER, owner_principals=[OWNER_ROLE])
    doc["Statement"].append(deny(principal={"AWS": OWNER_ROLE}, action="kms:Sign", sid="NoSigning"))
    assert problems_naming(
        policy_lint.lint_signing_policy(doc, owner_principals=[OWNER_ROLE]), OWNER_ROLE, "cannot call kms:Sign"
    )
    # AWS's default policy (the whole account) is refused for a signing key too
    default = {"Version": "2012-10-17", "Statement": AWS_DEFAULT["Statement"][:1]}
    assert problems_naming(
        policy_lint.lint_signing_policy(default, owner_principals=[OWNER_ROLE]), ROOT, "not the owner"
    )
