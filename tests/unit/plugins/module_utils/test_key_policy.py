"""Key policy evaluation (AWS semantics), rendering, merging and lint."""

import copy
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.confidential_ml.nitro.plugins.module_utils import key_policy as kp
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import PolicyError

OWNER = "111122223333"
ROOT = f"arn:aws:iam::{OWNER}:root"
OWNER_ROLE = f"arn:aws:iam::{OWNER}:role/pipeline"
USER = "arn:aws:iam::444455556666:role/parent-host"
USER_ACCOUNT_ROLE = "arn:aws:iam::444455556666:role/other"
STRANGER = "arn:aws:iam::999988887777:role/stranger"
PCR0 = hashlib.sha384(b"enclave image v1").hexdigest()
PCR0_NEXT = hashlib.sha384(b"enclave image v2").hexdigest()
PCR8 = hashlib.sha384(b"owner signing certificate").hexdigest()
OTHER = hashlib.sha384(b"some other image").hexdigest()
ZERO = "0" * 96
KEY = "kms:RecipientAttestation:ImageSha384"


def policy(*statements):
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(condition=None, *, action="kms:Decrypt", principal="*", sid="A", **extra):
    statement = {"Sid": sid, "Effect": "Allow", "Principal": principal, "Action": action, "Resource": "*", **extra}
    if condition is not None:
        statement["Condition"] = condition
    return statement


def deny(condition=None, **kwargs):
    return allow(condition, **kwargs) | {"Effect": "Deny", "Sid": kwargs.get("sid", "D")}


def not_action(actions):
    return {k: v for k, v in allow().items() if k != "Action"} | {"NotAction": actions}


def decide(doc, context=None, *, action="kms:Decrypt", principal=USER, **kwargs):
    return kp.evaluate(doc, action=action, principal=principal, context=context or {}, **kwargs)


# ---------------------------------------------------------------------------
# Evaluation: one Allow statement with one condition, against a request context.
# (operator, policy values, request context, allowed?)

K = "kms:EncryptionContext:purpose"
CONDITION_CASES = [
    # StringEquals: values OR together; absent key -> false; case-sensitive
    ("StringEquals", ["train"], {K: "train"}, True),
    ("StringEquals", ["train"], {K: "infer"}, False),
    ("StringEquals", ["train"], {}, False),
    ("StringEquals", ["train"], {K: None}, False),
    ("StringEquals", ["train"], {K: "TRAIN"}, False),
    ("StringEquals", ["train", "infer"], {K: "infer"}, True),
    # StringNotEquals: must differ from every value (AND); absent key -> true
    ("StringNotEquals", ["train"], {K: "infer"}, True),
    ("StringNotEquals", ["train"], {K: "train"}, False),
    ("StringNotEquals", ["train", "infer"], {K: "infer"}, False),
    ("StringNotEquals", ["train", "infer"], {K: "score"}, True),
    ("StringNotEquals", ["train"], {}, True),
    ("StringNotEquals", ["train"], {K: "TRAIN"}, True),
    # IgnoreCase forms
    ("StringEqualsIgnoreCase", ["Train"], {K: "tRAIN"}, True),
    ("StringEqualsIgnoreCase", ["train"], {K: "trains"}, False),
    ("StringEqualsIgnoreCase", ["train"], {}, False),
    ("StringNotEqualsIgnoreCase", ["train"], {K: "TRAIN"}, False),
    ("StringNotEqualsIgnoreCase", ["train", "infer"], {K: "INFER"}, False),
    ("StringNotEqualsIgnoreCase", ["train", "infer"], {K: "score"}, True),
    ("StringNotEqualsIgnoreCase", ["train"], {}, True),
    # StringLike / StringNotLike: * and ?, case-sensitive, absent key
    ("StringLike", ["tr*"], {K: "training"}, True),
    ("StringLike", ["tr?in"], {K: "train"}, True),
    ("StringLike", ["tr?in"], {K: "trxxin"}, False),
    ("StringLike", ["tr*"], {K: "TRAIN"}, False),
    ("StringLike", ["a.c"], {K: "abc"}, False),  # only * and ? are special
    ("StringLike", ["x*", "in*"], {K: "infer"}, True),
    ("StringLike", ["tr*"], {}, False),
    ("StringNotLike", ["tr*"], {K: "infer"}, True),
    ("StringNotLike", ["tr*", "in*"], {K: "infer"}, False),
    ("StringNotLike", ["tr*"], {}, True),
    # ...IfExists: absent key -> true; present key -> the base operator decides
    ("StringEqualsIfExists", ["train"], {}, True),
    ("StringEqualsIfExists", ["train"], {K: "train"}, True),
    ("StringEqualsIfExists", ["train"], {K: "infer"}, False),
    ("StringNotEqualsIfExists", ["train"], {}, True),
    ("StringNotEqualsIfExists", ["train"], {K: "train"}, False),
    ("StringEqualsIgnoreCaseIfExists", ["TRAIN"], {K: "train"}, True),
    ("StringEqualsIgnoreCaseIfExists", ["TRAIN"], {}, True),
    ("StringNotEqualsIgnoreCaseIfExists", ["TRAIN"], {K: "train"}, False),
    ("StringLikeIfExists", ["tr*"], {}, True),
    ("StringLikeIfExists", ["tr*"], {K: "infer"}, False),
    ("StringNotLikeIfExists", ["tr*"], {K: "train"}, False),
    # Bool
    ("Bool", ["true"], {K: True}, True),
    ("Bool", [True], {K: "true"}, True),
    ("Bool", ["true"], {K: False}, False),
    ("Bool", ["false"], {K: "False"}, True),
    ("Bool", ["true"], {}, False),
    ("BoolIfExists", ["true"], {}, True),
    ("BoolIfExists", ["true"], {K: False}, False),
    # Null: "true" means the key must be absent, "false" present
    ("Null", ["true"], {}, True),
    ("Null", ["true"], {K: None}, True),
    ("Null", ["true"], {K: []}, True),
    ("Null", ["true"], {K: "x"}, False),
    ("Null", ["false"], {K: "x"}, True),
    ("Null", [False], {}, False),
    # ARN operators (wildcards allowed, case-sensitive)
    ("ArnLike", ["arn:aws:iam::*:role/parent-*"], {K: USER}, True),
    ("ArnEquals", [USER], {K: USER.upper()}, False),
    ("ArnNotLike", ["arn:aws:iam::*:role/parent-*"], {}, True),
    # Set qualifiers on multi-valued keys
    ("ForAnyValue:StringEquals", ["a", "b"], {K: ["x", "b"]}, True),
    ("ForAnyValue:StringEquals", ["a", "b"], {K: ["x", "y"]}, False),
    ("ForAnyValue:StringEquals", ["a"], {}, False),
    ("ForAnyValue:StringNotEquals", ["a"], {K: ["a", "z"]}, True),
    ("ForAnyValue:StringNotEquals", ["a"], {K: ["a"]}, False),
    ("ForAllValues:StringEquals", ["a", "b"], {K: ["a", "b"]}, True),
    ("ForAllValues:StringEquals", ["a", "b"], {K: ["a", "z"]}, False),
    ("ForAllValues:StringEquals", ["a"], {}, True),
    ("ForAllValues:StringLike", ["a*"], {K: ["ab", "ac"]}, True),
    ("ForAllValues:StringNotEquals", ["a"], {K: ["b", "c"]}, True),
    ("ForAllValues:StringNotEquals", ["a"], {K: ["b", "a"]}, False),
    ("ForAllValues:StringNotEquals", ["a", "b"], {K: ["c", "b"]}, False),  # negated values AND here too
    ("ForAnyValue:StringNotEquals", ["a", "b"], {K: ["a", "b"]}, False),
    ("ForAnyValue:StringNotLike", ["a*", "b*"], {K: ["ax", "cx"]}, True),
    ("ForAnyValue:StringEqualsIfExists", ["a"], {}, True),
    # Unqualified operator on a multi-valued request value: any request value may match
    ("StringEquals", ["b"], {K: ["a", "b"]}, True),
    ("StringNotEquals", ["b"], {K: ["a", "b"]}, False),
]


@pytest.mark.parametrize(
    ("operator", "values", "context", "expected"),
    CONDITION_CASES,
    ids=[f"{op}-{vals}-{ctx}" for op, vals, ctx, _expected in CONDITION_CASES],
)
def test_condition_operator(operator, values, context, expected):
    decision = decide(policy(allow({operator: {K: values}})), context)
    assert decision.allowed is expected
    assert decision.effect == ("Allow" if expected else "ImplicitDeny")


# (statements, action, principal, context, expected effect, deciding statement)
A, D = "Allow", "ExplicitDeny"
N = "ImplicitDeny"
STATEMENT_CASES = {
    "deny wins over allow": ([allow(), deny()], "kms:Decrypt", USER, {}, D, "D"),
    "deny wins even listed after": ([deny(), allow()], "kms:Decrypt", USER, {}, D, "D"),
    "deny with unmet condition lets allow through": (
        [allow(), deny({"StringEquals": {K: "x"}})],
        "kms:Decrypt",
        USER,
        {},
        A,
        "A",
    ),
    "no statement -> implicit deny": ([], "kms:Decrypt", USER, {}, N, None),
    "allow for another action -> implicit deny": ([allow(action="kms:Encrypt")], "kms:Decrypt", USER, {}, N, None),
    "kms:* covers Decrypt": ([allow(action="kms:*")], "kms:Decrypt", USER, {}, A, "A"),
    "wildcard suffix": ([allow(action="kms:GenerateDataKey*")], "kms:GenerateDataKeyPair", USER, {}, A, "A"),
    "wildcard suffix not Decrypt": ([allow(action="kms:GenerateDataKey*")], "kms:Decrypt", USER, {}, N, None),
    "question mark": ([allow(action="kms:Decryp?")], "kms:Decrypt", USER, {}, A, "A"),
    "action case-insensitive": ([allow(action="KMS:DECRYPT")], "kms:Decrypt", USER, {}, A, "A"),
    "action list": ([allow(action=["kms:Encrypt", "kms:Decrypt"])], "kms:Decrypt", USER, {}, A, "A"),
    "NotAction excludes": ([not_action("kms:Decrypt")], "kms:Decrypt", USER, {}, N, None),
    "NotAction wildcard excludes": ([not_action("kms:De*")], "kms:Decrypt", USER, {}, N, None),
    "NotAction includes others": (
        [not_action(["kms:Decrypt"])],
        "kms:Encrypt",
        USER,
        {},
        A,
        "A",
    ),
    "principal AWS *": ([allow(principal={"AWS": "*"})], "kms:Decrypt", STRANGER, {}, A, "A"),
    "principal exact ARN": ([allow(principal={"AWS": USER})], "kms:Decrypt", USER, {}, A, "A"),
    "principal other ARN": ([allow(principal={"AWS": USER})], "kms:Decrypt", USER_ACCOUNT_ROLE, {}, N, None),
    "account root matches its roles": ([allow(principal={"AWS": ROOT})], "kms:Decrypt", OWNER_ROLE, {}, A, "A"),
    "account root matches sts sessions": (
        [allow(principal={"AWS": ROOT})],
        "kms:Decrypt",
        f"arn:aws:sts::{OWNER}:assumed-role/pipeline/session",
        {},
        A,
        "A",
    ),
    "bare account id matches its roles": ([allow(principal={"AWS": [OWNER]})], "kms:Decrypt", OWNER_ROLE, {}, A, "A"),
    "account root not other accounts": ([allow(principal={"AWS": ROOT})], "kms:Decrypt", USER, {}, N, None),
    "principal list": ([allow(principal={"AWS": [STRANGER, USER]})], "kms:Decrypt", USER, {}, A, "A"),
    "condition keys AND": (
        [allow({"StringEquals": {K: "train", "kms:CallerAccount": OWNER}})],
        "kms:Decrypt",
        USER,
        {K: "train", "kms:CallerAccount": "000000000000"},
        N,
        None,
    ),
    "condition operators AND": (
        [allow({"StringEquals": {K: "train"}, "Null": {KEY: "false"}})],
        "kms:Decrypt",
        USER,
        {K: "train"},
        N,
        None,
    ),
    "condition operators AND, all met": (
        [allow({"StringEquals": {K: "train"}, "Null": {KEY: "false"}})],
        "kms:Decrypt",
        USER,
        {K: "train", KEY: PCR0},
        A,
        "A",
    ),
    "condition key names case-insensitive": (
        [allow({"StringEquals": {"KMS:recipientattestation:IMAGESHA384": PCR0}})],
        "kms:Decrypt",
        USER,
        {KEY: PCR0},
        A,
        "A",
    ),
    "unnamed statement reported by index": (
        [{k: v for k, v in allow().items() if k != "Sid"}],
        "kms:Decrypt",
        USER,
        {},
        A,
        "Statement[0]",
    ),
    "Statement may be a single object": (allow(), "kms:Decrypt", USER, {}, A, "A"),
}


@pytest.mark.parametrize(("name"), list(STATEMENT_CASES))
def test_statement_evaluation(name):
    statements, action, principal, context, effect, deciding = STATEMENT_CASES[name]
    doc = {"Version": "2012-10-17", "Statement": statements}
    decision = decide(doc, context, action=action, principal=principal)
    assert (decision.effect, decision.statement, decision.allowed) == (effect, deciding, effect == A)
    assert decision.reason


def test_naive_single_deny_over_two_keys_fires_only_when_both_mismatch():
    # Why render_policy writes one Deny per PCR: keys under one operator AND together.
    naive = policy(allow(), deny({"StringNotEqualsIgnoreCase": {KEY: PCR0, kp.PCR8: PCR8}}))
    assert decide(naive, {KEY: PCR0, kp.PCR8: OTHER}).allowed  # wrong PCR8 slips through
    assert not decide(naive, {KEY: OTHER, kp.PCR8: OTHER}).allowed


def test_resource_matching():
    arn = f"arn:aws:kms:us-east-1:{OWNER}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    doc = policy(allow(Resource=arn))
    assert decide(doc).allowed  # a key policy is about its own key
    assert decide(doc, resource=arn).allowed
    assert not decide(doc, resource=arn.replace("1234abcd", "99999999")).allowed
    assert decide(policy(allow(Resource=f"arn:aws:kms:*:{OWNER}:key/*")), resource=arn).allowed


def test_policy_as_json_text():
    assert decide(json.dumps(policy(allow()))).allowed


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        ({"Version": "2012-10-17"}, "no Statement"),
        ({"Version": "2013-01-01", "Statement": []}, "Version"),
        ({"Version": "2012-10-17", "Statement": [], "Extra": 1}, "unknown top-level"),
        (policy(allow({"NumericLessThan": {K: "3"}})), "NumericLessThan"),
        (policy(allow({"stringequals": {K: "3"}})), "stringequals"),
        (policy(allow({"ForSomeValues:StringEquals": {K: "3"}})), "ForSomeValues:StringEquals"),
        (policy(allow({"NullIfExists": {K: "true"}})), "Null takes neither"),
        (policy(allow({"Null": {K: "maybe"}})), "only true or false"),
        (policy(allow({"StringEquals": {K: []}})), "empty value list"),
        (policy(allow() | {"Conditon": {}}), "Conditon"),
        (policy(allow() | {"Effect": "allow"}), "Effect"),
        (policy(allow() | {"NotPrincipal": {"AWS": USER}}), "NotPrincipal"),
        (policy(allow() | {"NotResource": "*"}), "NotResource"),
        (policy({k: v for k, v in allow().items() if k != "Principal"}), "no Principal"),
        (policy({k: v for k, v in allow().items() if k != "Resource"}), "no Resource"),
        (policy({k: v for k, v in allow().items() if k != "Action"}), "exactly one of Action and NotAction"),
        (policy(allow(principal="someone")), "Principal"),
        (
            '{"Version": "2012-10-17", "Statement": [{"Sid": "A", "Effect": "Allow", "Principal": "*",'
            ' "Action": "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {"a": "1"},'
            ' "StringEquals": {"b": "2"}}}]}',
            "repeats the JSON keys",
        ),
    ],
)
def test_malformed_policy_is_refused(doc, message):
    with pytest.raises(PolicyError, match=message) as err:
        decide(doc)
    assert "; " in str(err.value)  # says what to do, not only what happened


def test_evaluate_does_not_touch_the_callers_policy():
    doc = policy(allow({"StringEquals": {K: ["a"]}}))
    before = copy.deepcopy(doc)
    decide(doc, {K: "a"})
    assert doc == before


# ---------------------------------------------------------------------------
# Property: negated operators are exactly the complement of positive ones when
# the key is present, and both are decided by presence alone when it is absent.

_value = st.text(alphabet="abAB*?", min_size=0, max_size=4)


@given(values=st.lists(_value, min_size=1, max_size=4), request=st.none() | _value)
@settings(max_examples=200, deadline=None)
def test_negated_operator_is_complement(values, request):
    context = {} if request is None else {K: request}
    for positive, negated in [
        ("StringEquals", "StringNotEquals"),
        ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"),
        ("StringLike", "StringNotLike"),
    ]:
        yes = decide(policy(allow({positive: {K: values}})), context).allowed
        no = decide(policy(allow({negated: {K: values}})), context).allowed
        if request is None:
            assert (yes, no) == (False, True)
        else:
            assert yes != no
            assert decide(policy(allow({positive + "IfExists": {K: values}})), context).allowed == yes


# ---------------------------------------------------------------------------
# normalize_pcr


def test_normalize_pcr():
    assert kp.normalize_pcr(f"  {PCR0.upper()}\n") == PCR0
    assert kp.normalize_pcr(ZERO, allow_debug=True) == ZERO


@pytest.mark.parametrize(
    ("value", "message"),
    [(PCR0[:64], "96 hex"), (PCR0[:-1] + "g", "96 hex"), ("", "96 hex"), (ZERO, "debug"), (None, "hex string")],
)
def test_normalize_pcr_refuses(value, message):
    with pytest.raises(PolicyError, match=message):
        kp.normalize_pcr(value)


# ---------------------------------------------------------------------------
# Rendering and merging


def render(**kwargs):
    # The owner's role administers the key: render_policy no longer defaults to the account root, which lint
    # refuses (an account-wide Allow of GenerateDataKey without conditions).
    args = {"account_id": OWNER, "user_principals": [USER], "pcr0": [PCR0], "admin_principals": [OWNER_ROLE]} | kwargs
    return kp.render_policy(**args)


def test_rendered_policy_shape():
    doc = render(pcr0=[PCR0_NEXT.upper(), PCR0, PCR0], user_principals=[USER, USER])
    by_sid = {s["Sid"]: s for s in doc["Statement"]}
    assert list(by_sid) == [kp.SID_ADMIN, kp.SID_ALLOW, kp.SID_DENY]
    assert by_sid[kp.SID_ADMIN]["Principal"] == {"AWS": [OWNER_ROLE]}
    assert by_sid[kp.SID_ALLOW]["Principal"] == {"AWS": [USER]}
    # PCR0 values keep the order given (newest first), lowercase, each once.
    assert by_sid[kp.SID_ALLOW]["Condition"] == {"StringEqualsIgnoreCase": {KEY: [PCR0_NEXT, PCR0]}}
    assert by_sid[kp.SID_DENY]["Principal"] == "*"
    assert by_sid[kp.SID_DENY]["Condition"] == {"StringNotEqualsIgnoreCase": {KEY: [PCR0_NEXT, PCR0]}}
    assert doc["Version"] == "2012-10-17"


def test_render_is_deterministic_and_idempotent():
    first = render(pcr0=[PCR0_NEXT, PCR0], pcr8=[PCR8], user_principals=[USER, USER_ACCOUNT_ROLE])
    again = render(pcr0=[PCR0_NEXT.upper(), PCR0, PCR0_NEXT], pcr8=[PCR8], user_principals=[USER_ACCOUNT_ROLE, USER])
    assert first == again
    # The PCR0 order is the caller's (newest first): the other order is another policy.
    assert kp.allowed_pcr0(render(pcr0=[PCR0, PCR0_NEXT])) == [PCR0, PCR0_NEXT]
    assert kp.allowed_pcr0(first) == [PCR0_NEXT, PCR0]
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
        assert (decision.effect, decision.statement) == ("ExplicitDeny", kp.SID_DENY)
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
    assert decide(doc, {KEY: PCR0, kp.PCR8: PCR8.upper()}).effect == "Allow"
    assert decide(doc, {KEY: PCR0, kp.PCR8: OTHER}).statement == kp.SID_DENY_PCR8
    assert decide(doc, {KEY: PCR0}).statement == kp.SID_DENY_PCR8
    assert decide(doc, {KEY: OTHER, kp.PCR8: PCR8}).statement == kp.SID_DENY
    assert decide(doc, {KEY: OTHER, kp.PCR8: OTHER}).effect == "ExplicitDeny"
    # even the admin's kms:* cannot use a re-signed copy of the right image
    assert decide(doc, {KEY: PCR0, kp.PCR8: OTHER}, principal=ROOT).effect == "ExplicitDeny"


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
    admin = next(s for s in doc["Statement"] if s["Sid"] == kp.SID_ADMIN)
    assert admin["Principal"] == {"AWS": sorted([ROOT, OWNER_ROLE])}


AWS_DEFAULT = {
    "Version": "2012-10-17",
    "Id": "key-default-1",
    "Statement": [
        {
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": ROOT},
            "Action": "kms:*",
            "Resource": "*",
        },
        {
            "Sid": kp.SID_ALLOW,  # a stale copy of ours, to be replaced in place
            "Effect": "Allow",
            "Principal": {"AWS": USER},
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": {"StringEqualsIgnoreCase": {KEY: OTHER}},
        },
        {
            "Effect": "Allow",
            "Principal": {"AWS": OWNER_ROLE},
            "Action": ["kms:DescribeKey"],
            "Resource": "*",
        },
    ],
}


def test_merge_keeps_foreign_statements_and_replaces_ours_in_place():
    existing = copy.deepcopy(AWS_DEFAULT)
    doc = render(existing=existing)
    assert existing == AWS_DEFAULT  # input untouched
    assert doc["Id"] == "key-default-1"
    sids = [s.get("Sid") for s in doc["Statement"]]
    # AWS's default account-wide statement is replaced by OwnerAdministers (lint refuses it: changed on purpose)
    assert sids == [kp.SID_ALLOW, None, kp.SID_ADMIN, kp.SID_DENY]
    assert doc["Statement"][1] == AWS_DEFAULT["Statement"][2]
    assert kp.allowed_pcr0(doc) == [PCR0]
    assert render(existing=doc) == doc
    assert kp.lint(doc) == []


def test_merge_drops_our_pcr8_deny_when_pcr8_is_no_longer_pinned():
    pinned = render(pcr8=[PCR8], existing=AWS_DEFAULT)
    assert kp.SID_DENY_PCR8 in [s.get("Sid") for s in pinned["Statement"]]
    unpinned = render(existing=pinned)
    assert kp.SID_DENY_PCR8 not in [s.get("Sid") for s in unpinned["Statement"]]
    assert unpinned == render(existing=AWS_DEFAULT)


def test_merge_statements_directly():
    existing = policy({"Sid": "X", "Effect": "Allow"}, {"Sid": "Y", "v": 1}, {"Sid": "Y", "v": 2}, {"Sid": "Z"})
    merged = kp.merge_statements(json.dumps(existing), [{"Sid": "Y", "v": 3}, {"Sid": "N"}], drop=["Z", "X-not"])
    assert merged["Statement"] == [{"Sid": "X", "Effect": "Allow"}, {"Sid": "Y", "v": 3}, {"Sid": "N"}]
    single = kp.merge_statements({"Statement": {"Sid": "F"}}, [{"Sid": "N"}])
    assert single == {"Version": "2012-10-17", "Statement": [{"Sid": "F"}, {"Sid": "N"}]}
    with pytest.raises(PolicyError, match="unique Sid"):
        kp.merge_statements(existing, [{"Sid": "N"}, {"Sid": "N"}])
    with pytest.raises(PolicyError, match="unique Sid"):
        kp.merge_statements(existing, [{"Effect": "Allow"}])


def test_allowed_pcr0_gives_a_rotation_window():
    old = render(pcr0=[PCR0])
    assert kp.allowed_pcr0(json.dumps(old)) == [PCR0]
    rotated = render(pcr0=[PCR0_NEXT, *kp.allowed_pcr0(old)], existing=old)
    assert kp.allowed_pcr0(rotated) == [PCR0_NEXT, PCR0]  # newest first, as given
    assert decide(rotated, {KEY: PCR0}).allowed and decide(rotated, {KEY: PCR0_NEXT}).allowed
    assert kp.allowed_pcr0(AWS_DEFAULT | {"Statement": AWS_DEFAULT["Statement"][:1]}) == []


def test_policy_diff():
    before, after = render(), render(pcr0=[PCR0, PCR0_NEXT])
    diff = kp.policy_diff(json.dumps(before), after)
    assert json.loads(diff["before"]) == before and json.loads(diff["after"]) == after
    assert diff["after"].endswith("\n") and '\n  "Statement"' in diff["after"]
    assert kp.policy_diff(None, after)["before"] == ""


# ---------------------------------------------------------------------------
# The decision the module and `enclave policy apply` share: rotation window and the policy to write

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
    assert kp.rotation_window(given, allowed, keep) == (window, [])


def test_rotation_window_drops_what_is_no_pcr0_with_a_warning():
    window, warnings = kp.rotation_window([A], [ZERO, "abc", B])
    assert window == [A, B]
    assert len(warnings) == 2 and "not carried over" in warnings[0] and "all zeros" in warnings[0]


@pytest.mark.parametrize("keep", [0, -1, True, 1.5, "2"])
def test_keep_newest_must_be_a_positive_count(keep):
    with pytest.raises(PolicyError, match=f"keep_newest is {keep}; give 1 or more"):
        kp.rotation_window([A], [], keep)
    with pytest.raises(PolicyError, match="give 1 or more"):  # refused before anything is read from KMS
        kp.OwnerKeyPolicy(keep_newest=keep)


def owner_policy(**kwargs):
    args = {"account_id": OWNER, "user_principals": [USER], "admin_principals": [OWNER_ROLE], "pcr0": [A]} | kwargs
    return kp.OwnerKeyPolicy(**args)


KEY_ARN = f"arn:aws:kms:us-east-1:{OWNER}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
NEW_KEY = AWS_DEFAULT | {"Statement": AWS_DEFAULT["Statement"][:1]}  # the policy KMS gives a new key


def test_plan_is_idempotent_and_keeps_the_owners_statements():
    foreign = allow(sid="OwnerAudit", action="kms:DescribeKey", principal={"AWS": OWNER_ROLE})
    first = owner_policy().plan(NEW_KEY | {"Statement": [*NEW_KEY["Statement"], foreign]}, KEY_ARN)
    assert first.changed and first.allowed_pcr0 == [A] and first.key_arn == KEY_ARN
    assert [s["Sid"] for s in first.after["Statement"]] == ["OwnerAudit", kp.SID_ADMIN, kp.SID_ALLOW, kp.SID_DENY]
    again = owner_policy().plan(json.dumps(first.after, indent=4), KEY_ARN)  # text and layout do not count
    assert not again.changed and again.after == first.after
    assert json.loads(again.diff()["before"]) == json.loads(again.diff()["after"])
    rotated = owner_policy(pcr0=[B], keep_newest=1).plan(first.after, KEY_ARN)
    assert rotated.changed and rotated.allowed_pcr0 == [B]
    assert not decide(rotated.after, {KEY: A}).allowed and decide(rotated.after, {KEY: B}).allowed


def test_plan_absent_takes_ours_out_and_restores_the_default_when_nothing_is_left():
    present = owner_policy().plan(NEW_KEY, KEY_ARN).after
    gone = kp.OwnerKeyPolicy(state="absent").plan(present, KEY_ARN)
    assert gone.changed and [s["Sid"] for s in gone.after["Statement"]] == [kp.SID_AWS_DEFAULT]
    assert gone.allowed_pcr0 == []
    assert not kp.OwnerKeyPolicy(state="absent").plan(gone.after, KEY_ARN).changed


def test_plan_refuses_an_unsound_result_and_says_why():
    """The host's role sneaks in an unconditioned Decrypt beside ours: the plan refuses to write over it."""
    legacy = allow(sid="LegacyHostAccess", principal={"AWS": USER})
    with pytest.raises(kp.UnsoundPolicyError, match="refusing to write an unsound key policy") as refused:
        owner_policy().plan(policy(legacy), KEY_ARN)
    assert any("LegacyHostAccess" in problem for problem in refused.value.problems)
    assert kp.SID_DENY in [s["Sid"] for s in refused.value.policy["Statement"]]


def test_plan_carries_no_debug_pcr0_over():
    debug = render(pcr0=[ZERO], allow_debug=True)
    change = owner_policy(pcr0=[B]).plan(debug, KEY_ARN)
    assert change.allowed_pcr0 == [B] and "all zeros" in change.warnings[0]


_measurement = st.binary(min_size=48, max_size=48).filter(any)  # all zeros is the debug PCR, refused


@given(pcrs=st.lists(_measurement, min_size=1, max_size=5), probe=st.binary(min_size=48))
@settings(max_examples=50, deadline=None)
def test_rendered_policy_allows_exactly_its_pcr0s(pcrs, probe):
    values = [p.hex() for p in pcrs]
    doc = render(pcr0=[v.upper() for v in values])
    assert render(pcr0=values, existing=doc) == doc
    assert kp.allowed_pcr0(doc) == list(dict.fromkeys(values))  # in the order given, each once
    for value in values:
        assert decide(doc, {KEY: value}).allowed
        assert decide(doc, {KEY: value.upper()}).allowed
    other = hashlib.sha384(probe).hexdigest()
    assert decide(doc, {KEY: other}).allowed is (other in values)
    assert not decide(doc, {}).allowed
    assert kp.lint(doc) == []


# ---------------------------------------------------------------------------
# Lint


def without(doc, sid):
    return doc | {"Statement": [s for s in doc["Statement"] if s.get("Sid") != sid]}


def replace(doc, sid, **changes):
    return doc | {"Statement": [s | changes if s.get("Sid") == sid else s for s in doc["Statement"]]}


def problems_naming(problems, *words):
    return [p for p in problems if all(word in p for word in words)]


def test_lint_passes_rendered_policies():
    assert kp.lint(render(), user_principals=[USER]) == []
    assert kp.lint(json.dumps(render(pcr8=[PCR8], pcr0=[PCR0, PCR0_NEXT]))) == []
    assert kp.lint(render(admin_principals=[OWNER_ROLE], user_principals=[USER, USER_ACCOUNT_ROLE])) == []
    assert kp.lint(render(pcr0=[ZERO], allow_debug=True), allow_debug=True) == []


def test_lint_missing_deny():
    problems = kp.lint(without(render(), kp.SID_DENY), user_principals=[USER])
    assert problems_naming(problems, "no statement explicitly denies kms:Decrypt")
    # and the admin's kms:* now hands out the key without attestation
    assert problems_naming(problems, kp.SID_ADMIN, "kms:Decrypt without an attestation", OWNER_ROLE)
    assert problems_naming(problems, kp.SID_ADMIN, "kms:ReEncryptFrom")


def test_lint_all_zero_pcr0():
    doc = render(pcr0=[ZERO], allow_debug=True)
    problems = kp.lint(doc)
    assert problems_naming(problems, kp.SID_ALLOW, "all-zero")
    assert problems_naming(problems, kp.SID_DENY, "all-zero")
    assert all(p.endswith(".") for p in problems)


def test_lint_short_and_wildcard_hex():
    short = {"StringEqualsIgnoreCase": {KEY: [PCR0[:64]]}}
    problems = kp.lint(replace(render(), kp.SID_ALLOW, Condition=short))
    assert problems_naming(problems, kp.SID_ALLOW, "96-hex-character", "64 characters")
    wildcard = {"StringLike": {KEY: "*"}}
    problems = kp.lint(replace(render(), kp.SID_ALLOW, Condition=wildcard))
    assert problems_naming(problems, kp.SID_ALLOW, "96-hex-character")


def test_lint_extra_unconditional_allow_for_the_user():
    extra = allow(principal={"AWS": USER}, sid="Convenience")
    doc = render() | {"Statement": [*render()["Statement"], extra]}
    assert decide(doc).effect == "ExplicitDeny"  # the Deny still saves it today...
    problems = kp.lint(doc, user_principals=[USER])
    assert problems_naming(problems, "Convenience", USER, "without requiring an attestation")  # ...lint says so
    # without the Deny it is an outright leak, named with the statement that grants it
    problems = kp.lint(without(doc, kp.SID_DENY), user_principals=[USER])
    assert problems_naming(problems, "Convenience", USER, "kms:Decrypt without an attestation")


def test_lint_deny_with_positive_operator():
    positive = {"StringEqualsIgnoreCase": {KEY: [OTHER]}}  # denies only one bad image; absence slips through
    doc = replace(render(), kp.SID_DENY, Condition=positive)
    problems = kp.lint(doc)
    assert problems_naming(problems, kp.SID_DENY, "positive operator")
    assert problems_naming(problems, kp.SID_ADMIN, "without an attestation")


def test_lint_deny_for_some_principals_only():
    doc = replace(render(), kp.SID_DENY, Principal={"AWS": USER})
    problems = kp.lint(doc)
    assert problems_naming(problems, kp.SID_DENY, 'Principal "*"')
    assert problems_naming(problems, kp.SID_ADMIN, OWNER_ROLE, "without an attestation")


def test_lint_unpinned_pcr8():
    doc = without(render(pcr8=[PCR8]), kp.SID_DENY_PCR8)
    problems = kp.lint(doc)
    assert problems_naming(problems, kp.SID_ADMIN, "PCR8 that is not pinned")


def test_lint_foreign_allow_for_another_image():
    # A foreign statement grants the key to another image: the Deny stops it, so the
    # policy is sound, but our own user must still get the key.
    doc = render()
    doc["Statement"].append(allow({"StringEqualsIgnoreCase": {KEY: OTHER}}, principal={"AWS": USER}, sid="Old"))
    assert kp.lint(doc) == [
        f"{USER} cannot call kms:Decrypt even from an enclave of an allowed image ({OTHER[:16]}...): "
        f"statement {kp.SID_DENY} denies kms:Decrypt to {USER}; "
        "fix the Allow statement or the statement that blocks it."
    ]


def test_lint_user_who_administers_the_key():
    doc = render(admin_principals=[OWNER_ROLE])
    doc["Statement"][1]["Principal"]["AWS"].append(OWNER_ROLE)  # hand-edited: the host's role is also an admin
    assert problems_naming(kp.lint(doc), kp.SID_ADMIN, OWNER_ROLE, "without requiring an attestation")


def test_lint_user_locked_out():
    doc = render()
    doc["Statement"].append(deny(principal={"AWS": USER}, sid="Lockout"))
    assert problems_naming(kp.lint(doc), USER, "cannot call kms:Decrypt", "Lockout")


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ("{oops", ["not valid JSON"]),
        ({"Statement": render()["Statement"]}, ["no Version"]),
        ({"Version": "2012-10-17"}, ["no Statement"]),
        (replace(render(), kp.SID_ALLOW, Conditon={}), ["Conditon"]),
        (replace(render(), kp.SID_DENY, Sid=kp.SID_ALLOW), [kp.SID_ALLOW, "more than once"]),
        (
            replace(render(), kp.SID_ALLOW, Condition={"StringEquals": {KEY: PCR0.upper()}}),
            [kp.SID_ALLOW, "case-sensitively"],
        ),
        (
            replace(
                render(), kp.SID_ALLOW, Condition={"StringEqualsIgnoreCase": {"kms:RecipientAttestation:Image": PCR0}}
            ),
            [kp.SID_ALLOW, "never sets"],
        ),
    ],
)
def test_lint_names_shape_problems(doc, words):
    assert problems_naming(kp.lint(doc), *words)


# ---------------------------------------------------------------------------
# Broad principals on what releases the key, and the signing key's policy


RELEASING = ["kms:Decrypt", "kms:GenerateDataKey", "kms:ReEncrypt*", "kms:*", "kms:GenerateDataKey*"]


@pytest.mark.parametrize("action", RELEASING)
@pytest.mark.parametrize(
    "principal", ["*", {"AWS": "*"}, {"AWS": "arn:aws:iam::*:root"}, {"AWS": f"arn:aws:iam::{OWNER}:role/*"}]
)
def test_lint_refuses_wildcard_principals_on_what_releases_the_key(principal, action):
    attested = {"StringEqualsIgnoreCase": {KEY: PCR0}}  # even with the attestation condition
    doc = render()
    doc["Statement"].append(allow(attested, principal=principal, action=action, sid="Wide"))
    assert problems_naming(kp.lint(doc), "statement Wide", "wildcard principal")


def test_lint_allows_wildcard_principals_on_what_does_not_release_the_key():
    doc = render()
    doc["Statement"].append(allow(principal="*", action="kms:DescribeKey", sid="Describe"))
    assert not problems_naming(kp.lint(doc), "Describe")


@pytest.mark.parametrize("principal", [ROOT, OWNER])
def test_lint_refuses_an_account_wide_allow_without_conditions(principal):
    doc = render()
    doc["Statement"].append(allow(principal={"AWS": principal}, action="kms:GenerateDataKey", sid="Account"))
    assert problems_naming(kp.lint(doc), "statement Account", "whole account", "without conditions")
    # AWS's own default statement is exactly that, and render_policy replaces it
    problems = kp.lint(AWS_DEFAULT | {"Statement": AWS_DEFAULT["Statement"][:1] + render()["Statement"]})
    assert problems_naming(problems, "Enable IAM User Permissions", "whole account")
    assert "Enable IAM User Permissions" not in json.dumps(render(existing=AWS_DEFAULT))
    # with a condition (here the attestation) an account principal is the evaluator's business, not this rule's
    conditioned = render()
    conditioned["Statement"].append(
        allow({"StringEqualsIgnoreCase": {KEY: PCR0}}, principal={"AWS": principal}, sid="Account")
    )
    assert not problems_naming(kp.lint(conditioned), "whole account")


def test_render_needs_admin_principals():
    with pytest.raises(PolicyError, match="admin_principals is not set"):
        kp.render_policy(account_id=OWNER, user_principals=[USER], pcr0=[PCR0])


def test_rendered_signing_policy_lets_only_the_owner_sign():
    doc = kp.render_signing_policy(account_id=OWNER, owner_principals=[OWNER_ROLE], reader_principals=[USER])
    assert kp.lint_signing_policy(doc, owner_principals=[OWNER_ROLE]) == []
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
    doc = kp.render_signing_policy(account_id=OWNER, owner_principals=[OWNER_ROLE])
    doc["Statement"].append(allow({"Bool": {"aws:SecureTransport": "true"}}, principal=principal, action=action,
                                  sid="AlsoSigns"))  # fmt: skip
    problems = kp.lint_signing_policy(doc, owner_principals=[OWNER_ROLE])
    assert problems_naming(problems, "statement AlsoSigns allows kms:Sign", "who is not the owner")


def test_lint_signing_policy_wants_the_owner_able_to_sign():
    doc = kp.render_signing_policy(account_id=OWNER, owner_principals=[OWNER_ROLE])
    doc["Statement"].append(deny(principal={"AWS": OWNER_ROLE}, action="kms:Sign", sid="NoSigning"))
    assert problems_naming(
        kp.lint_signing_policy(doc, owner_principals=[OWNER_ROLE]), OWNER_ROLE, "cannot call kms:Sign"
    )
    # AWS's default policy (the whole account) is refused for a signing key too
    default = {"Version": "2012-10-17", "Statement": AWS_DEFAULT["Statement"][:1]}
    assert problems_naming(kp.lint_signing_policy(default, owner_principals=[OWNER_ROLE]), ROOT, "not the owner")
