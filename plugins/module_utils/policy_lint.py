"""The rules a key policy of an enclave-only key must follow, checked by probing it with the evaluator itself.

lint() refuses a policy under which anyone could get the package key outside an allowed enclave (no attestation,
a debug enclave, another image, an unpinned PCR), or that names principals too broadly; lint_signing_policy()
refuses a signing key's policy that lets anyone but the owner sign.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import PolicyError
from .key_policy import IMAGE_SHA384, PCR_HEX, RELEASE_ACTIONS, SID_ALLOW, SID_DENY, abbreviate, principal_arns
from .policy_eval import (
    ACCOUNT_ID,
    ROOT_ARN,
    VERSION,
    Statement,
    account_of,
    decide,
    load_policy,
    parse_policy,
)

_ATTESTATION_PREFIX = "kms:recipientattestation:"
_PCR_KEY = re.compile(r"kms:recipientattestation:(?:imagesha384|pcr(\d{1,2}))")


def _attestation_values(statements: Sequence[Statement]) -> dict[int, list[str]]:
    """PCR index -> well-formed values the policy mentions (ImageSha384 is PCR0)."""
    found: dict[int, set[str]] = {}
    for statement in statements:
        for condition in statement.conditions:
            key = _PCR_KEY.fullmatch(condition.key.lower())
            if key:
                index = int(key.group(1) or 0)
                found.setdefault(index, set()).update(
                    v.lower() for v in condition.values if PCR_HEX.fullmatch(v.lower())
                )
    return {index: sorted(values) for index, values in found.items() if values}


def _attestation(pcrs: Mapping[int, str]) -> dict[str, str]:
    context = {f"kms:RecipientAttestation:PCR{index}": value for index, value in pcrs.items()}
    if 0 in pcrs:
        context[IMAGE_SHA384] = pcrs[0]
    return context


def _check_values(statement: Statement, allow_debug: bool) -> list[str]:
    problems = []
    for condition in statement.conditions:
        key = condition.key.lower()
        if not key.startswith(_ATTESTATION_PREFIX):
            continue
        where = f"statement {statement.label} ({condition.operator.name} on {condition.key})"
        known = _PCR_KEY.fullmatch(key)
        if not known or int(known.group(1) or 0) > 31:
            problems.append(
                f"{where} names a key KMS never sets, so positive operators never match and negated ones always"
                " do; use kms:RecipientAttestation:ImageSha384 or kms:RecipientAttestation:PCR<n>."
            )
            continue
        for value in condition.values:
            if not PCR_HEX.fullmatch(value.lower()):
                problems.append(
                    f"{where} has {abbreviate(value)!r}, which is not a 96-hex-character SHA-384 measurement"
                    f" ({len(value)} characters); copy the exact value printed by `nitro-cli build-enclave`."
                )
            elif set(value) == {"0"} and not allow_debug:
                problems.append(
                    f"{where} has an all-zero PCR, which every debug-mode enclave attests, so a host could get"
                    " the key from an enclave it can inspect; use the image's real measurement."
                )
            elif value != value.lower() and condition.operator.case_sensitive:
                problems.append(
                    f"{where} compares uppercase hex case-sensitively, but KMS sends lowercase hex;"
                    " use StringEqualsIgnoreCase (or lowercase the value)."
                )
    return problems


@dataclass(frozen=True)
class _Probe:
    situation: str  # completes "... call <action> <situation>"
    context: dict
    actions: tuple[str, ...]
    attested: bool


def _probe_principals(statements: Sequence[Statement], users: Sequence[str]) -> list[str]:
    """Every principal the policy names, a role in each account it names, and a role of an unrelated account."""
    named = {p for s in statements for p in s.principals if p != "*"} | set(users)
    accounts = {account_of(p) or (m.group(1) if (m := ROOT_ARN.fullmatch(p)) else None) for p in named} - {None}
    foreign = next(f"{n:012d}" for n in range(999999999999, 0, -1) if f"{n:012d}" not in accounts)
    return sorted(
        {p for p in named if account_of(p)} | {f"arn:aws:iam::{a}:role/lint-probe" for a in accounts | {foreign}}
    )


def _probes(
    principal: str, statements: Sequence[Statement], pinned: Mapping[int, list[str]], allow_debug: bool
) -> list[_Probe]:
    """Requests that must all be refused: no attestation, a debug enclave, another image, an unpinned PCR."""
    right = {index: values[0] for index, values in pinned.items()}
    known = {value for values in pinned.values() for value in values}
    wrong = next(h for n in range(99) if (h := hashlib.sha384(b"lint-probe-%d" % n).hexdigest()) not in known)
    caller = {"kms:CallerAccount": account_of(principal)}
    # Encryption context as the policy's own conditions expect it, so a conditional Allow gets its chance.
    mentioned = {
        c.key: c.values[0]
        for s in statements
        for c in s.conditions
        if c.key.lower().startswith("kms:encryptioncontext:")
    }
    with_ec = caller | {"kms:EncryptionContext:package": "lint-probe"} | mentioned
    unattested = ("kms:Decrypt", "kms:ReEncryptFrom")  # ReEncrypt never carries an attestation
    probes = [
        _Probe("without an attestation", caller, unattested, False),
        _Probe("without an attestation but with an encryption context", with_ec, unattested, False),
        _Probe(
            "with an attestation of an image whose PCR0 is not allowed",
            with_ec | _attestation(right | {0: wrong}),
            ("kms:Decrypt",),
            True,
        ),
    ]
    if not allow_debug:
        zeros = _attestation(dict.fromkeys(set(right) | {0}, "0" * 96))
        probes.append(_Probe("with a debug-mode (all-zero) attestation", with_ec | zeros, ("kms:Decrypt",), True))
    if 0 in right:
        probes += [
            _Probe(
                f"with an allowed PCR0 but a PCR{index} that is not pinned",
                with_ec | _attestation(right | {index: wrong}),
                ("kms:Decrypt",),
                True,
            )
            for index in sorted(set(right) - {0})
        ]
    return probes


def _wildcard(principal: str) -> bool:
    return "*" in principal or "?" in principal


def _whole_account(principal: str) -> bool:
    return bool(ROOT_ARN.fullmatch(principal) or ACCOUNT_ID.fullmatch(principal))


def _broad_principals(statements: Sequence[Statement], actions: Sequence[str]) -> list[str]:
    """Allows of actions to a wildcard principal, or to a whole account without any condition."""
    problems = []
    for statement in statements:
        covered = [action for action in actions if statement.covers(action)]
        if statement.effect != "Allow" or not covered:
            continue
        shown = ", ".join(covered)
        wild = [p for p in statement.principals if _wildcard(p)]
        if wild:
            problems.append(
                f"statement {statement.label} allows {shown} to the wildcard principal {', '.join(wild)}, whatever"
                " its conditions say today; name the exact roles that need it."
            )
        accounts = [p for p in statement.principals if _whole_account(p)]
        if accounts and not statement.conditions:
            problems.append(
                f"statement {statement.label} allows {shown} to the whole account {', '.join(accounts)} without"
                " conditions, so every principal that account's IAM allows gets it; name the owner's roles instead."
            )
    return problems


def lint(policy: dict | str, *, user_principals: Sequence[str] = (), allow_debug: bool = False) -> list[str]:
    """Problems that make a key policy unsafe for an enclave-only key; [] means sound.

    Besides shape and PCR values, it checks with the evaluator itself that nobody (each
    user, every principal the policy names, a role in each account it names, a role of an
    unrelated account) can Decrypt or ReEncryptFrom without an attestation, or Decrypt
    with a debug enclave, another image, or an allowed image with an unpinned PCR8 (or
    any other PCR the policy pins). user_principals defaults to our Allow's principals.
    """
    try:
        doc = load_policy(policy)
    except PolicyError as err:
        return [str(err)]
    problems = []
    if "Version" not in doc:
        problems.append(f'the key policy has no Version; add "Version": "{VERSION}".')
    try:
        statements = parse_policy(doc)
    except PolicyError as err:
        return [*problems, str(err)]
    labels = [s.label for s in statements]
    problems += [
        f"statement {label} appears more than once; give every statement a unique Sid."
        for label in sorted({label for label in labels if labels.count(label) > 1})
    ]
    for statement in statements:
        problems += _check_values(statement, allow_debug)
    problems += _broad_principals(statements, RELEASE_ACTIONS)

    users = list(user_principals) or [p for s in statements if s.label == SID_ALLOW for p in s.principals if p != "*"]
    pinned = _attestation_values(statements)
    principals = _probe_principals(statements, users)
    probes = {principal: _probes(principal, statements, pinned, allow_debug) for principal in principals}

    # The whole policy: nobody gets the key outside an allowed enclave.
    leaks: dict[tuple[str | None, str, str], list[str]] = {}  # (statement, action, situation): who
    for principal, cases in probes.items():
        for probe in cases:
            for action in probe.actions:
                decision = decide(statements, action, principal, probe.context)
                if decision.allowed:
                    leaks.setdefault((decision.statement, action, probe.situation), []).append(principal)
    problems += [
        f'statement {label} lets {", ".join(who)} call {action} {situation}; add a Deny for Principal "*"'
        f" with StringNotEqualsIgnoreCase on the attestation keys (render_policy writes {SID_DENY!r})."
        for (label, action, situation), who in leaks.items()
    ]

    # The Deny on its own must stop every caller without an attestation, whatever else the policy allows.
    def stops_unattested(deny: Statement) -> bool:
        return all(
            decide([deny], "kms:Decrypt", principal, probe.context).effect == "ExplicitDeny"
            for principal, cases in probes.items()
            for probe in cases
            if not probe.attested
        )

    denies = [s for s in statements if s.effect == "Deny" and s.covers("kms:Decrypt")]
    if not denies:
        problems.append(
            "no statement explicitly denies kms:Decrypt without an attestation, so any Allow (an admin's kms:*"
            f" included) hands out the key; add a Deny like {SID_DENY!r} from render_policy."
        )
    elif not any(stops_unattested(deny) for deny in denies):
        problems += [
            f"statement {deny.label} denies kms:Decrypt but lets some caller without an attestation through"
            ' (a positive operator is false when the key is absent); use Principal "*" and'
            " StringNotEqualsIgnoreCase on kms:RecipientAttestation:ImageSha384."
            for deny in denies
        ]

    for user in users:
        # A user in an account whose IAM the policy trusts with kms:PutKeyPolicy (its root, or the account id):
        # that IAM can let the host rewrite the policy and drop the Deny; a key policy cannot see IAM.
        problems += [
            f"statement {s.label} lets the whole account {account_of(user)} (its IAM) call kms:PutKeyPolicy and"
            f" the user {user} is in that account, so its IAM can let the host rewrite the policy and drop the Deny;"
            " keep the user in an account of its own, and name the owner's roles instead of the account."
            for s in statements
            if s.effect == "Allow" and s.covers("kms:PutKeyPolicy") and s.principal_match(user) == "account"
        ]
        # No Allow may name the user for Decrypt without an attestation, even if a Deny saves it today.
        problems += [
            f"statement {s.label} grants kms:Decrypt to {user} without requiring an attestation, so only a Deny"
            " keeps the parent host out; remove the statement or add the RecipientAttestation condition."
            for s in statements
            if s.effect == "Allow"
            and s.principal_match(user) in ("any", "exact")
            and decide([s], "kms:Decrypt", user, {}).allowed
        ]
        # And the point of it all: the user's enclave of an allowed image gets the key.
        right = {index: values[0] for index, values in pinned.items()}
        for pcr0 in pinned.get(0, []):
            decision = decide(statements, "kms:Decrypt", user, _attestation(right | {0: pcr0}))
            if not decision.allowed:
                problems.append(
                    f"{user} cannot call kms:Decrypt even from an enclave of an allowed image ({abbreviate(pcr0)}):"
                    f" {decision.reason}; fix the Allow statement or the statement that blocks it."
                )
    return list(dict.fromkeys(problems))


def lint_signing_policy(policy: dict | str, *, owner_principals: Sequence[str]) -> list[str]:
    """Problems that let anyone but the owner sign packages with this key; [] means sound.

    Every principal an Allow of kms:Sign names must be one of owner_principals (no wildcard, no whole account,
    no other role, conditions or not: a condition is not an identity), and each owner must be able to sign."""
    try:
        doc = load_policy(policy)
        statements = parse_policy(doc)
        owners = set(principal_arns(owner_principals, "owner_principals"))
    except PolicyError as err:
        return [str(err)]
    problems = []
    for statement in statements:
        if statement.effect != "Allow" or not statement.covers("kms:Sign"):
            continue
        others = [p for p in statement.principals if p not in owners]
        if others:
            problems.append(
                f"statement {statement.label} allows kms:Sign to {', '.join(others)}, who is not the owner"
                f" ({', '.join(sorted(owners))}); anyone who can sign makes packages the owner's enclave runs."
                " Allow kms:Sign to the owner's roles only."
            )
    for owner in sorted(owners):
        decision = decide(statements, "kms:Sign", owner, {})
        if not decision.allowed:
            problems.append(f"the owner {owner} cannot call kms:Sign: {decision.reason}; allow it.")
    return list(dict.fromkeys(problems))
