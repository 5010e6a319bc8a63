"""Key policy evaluation with AWS's semantics: condition operators, statements, malformed policies."""

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.confidential_ml.nitro.plugins.module_utils import key_policy
from ansible_collections.confidential_ml.nitro.plugins.module_utils.errors import PolicyError
from ansible_collections.confidential_ml.nitro.tests.fixtures.key_policies import (
    KEY,
    OTHER,
    OWNER,
    OWNER_ROLE,
    PCR0,
    PCR8,
    ROOT,
    STRANGER,
    USER,
    USER_ACCOUNT_ROLE,
    allow,
    decide,
    deny,
    not_action,
    policy,
)

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
    naive = policy(allow(), deny({"StringNotEqualsIgnoreCase": {KEY: PCR0, key_policy.PCR8: PCR8}}))
    assert decide(naive, {KEY: PCR0, key_policy.PCR8: OTHER}).allowed  # wrong PCR8 slips through
    assert not decide(naive, {KEY: OTHER, key_policy.PCR8: OTHER}).allowed


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
