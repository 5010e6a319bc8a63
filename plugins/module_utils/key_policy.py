"""KMS key policies for attested Nitro Enclaves: evaluate, render, merge, lint.

The evaluator is hand-written on purpose: no Python library evaluates IAM/KMS
key policies with AWS's semantics (an absent key makes positive operators false
and negated ones true, negated operators AND their values, IfExists, Null,
ForAnyValue/ForAllValues), and the local KMS must enforce key policies exactly
as AWS KMS does, or a test that passes locally would prove nothing.

Key policies are edited as data, by statement Sid, never as text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .errors import KmsError, PolicyError

try:
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError:  # only apply_key_policy talks to KMS; the modules report a missing boto3 (require_libraries)
    _BOTO_ERRORS: tuple = ()
else:
    _BOTO_ERRORS = (BotoCoreError, ClientError)

VERSION = "2012-10-17"
_VERSIONS = ("2012-10-17", "2008-10-17")  # KMS accepts both; only policy variables differ

SID_ADMIN = "OwnerAdministers"
SID_ALLOW = "EnclaveDecryptWithAttestation"
SID_DENY = "DenyDecryptWithoutAttestation"
SID_DENY_PCR8 = "DenyDecryptWithoutOwnerSignedImage"  # PCR8 = hash of the image's signing certificate
OUR_SIDS = (SID_ADMIN, SID_ALLOW, SID_DENY, SID_DENY_PCR8)

IMAGE_SHA384 = "kms:RecipientAttestation:ImageSha384"
PCR8 = "kms:RecipientAttestation:PCR8"
_ATTESTATION_PREFIX = "kms:recipientattestation:"

# The enclave only unwraps the package key. GenerateDataKey and GenerateRandom
# would be harmless under the same attestation condition, but nothing in the
# enclave needs them (the NSM gives randomness), so least privilege wins.
ENCLAVE_ACTIONS = ("kms:Decrypt",)
# What would hand an existing data key to someone outside the enclave: Decrypt,
# and ReEncryptFrom (re-wrap it under a key the caller controls, then decrypt
# that). ReEncryptTo is covered too: packages are sealed with GenerateDataKey,
# so nobody needs to re-encrypt into this key.
GUARDED_ACTIONS = ("kms:Decrypt", "kms:ReEncrypt*")
# What hands out a data key (or lets a caller make packages the key would open): lint refuses wildcard principals
# on these, and account-wide principals without conditions.
RELEASE_ACTIONS = (
    "kms:Decrypt",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyPairWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
)
# AWS's default key policy statement: the whole account, kms:*, no condition. render_policy replaces it by the
# owner's roles (OwnerAdministers), since lint refuses it.
SID_AWS_DEFAULT = "Enable IAM User Permissions"
SID_SIGNING_ADMIN = "OwnerSignsPackages"
SID_SIGNING_READERS = "PublicKeyReaders"
SIGNING_READ_ACTIONS = ("kms:GetPublicKey", "kms:DescribeKey", "kms:Verify")

_HEX96 = re.compile(r"[0-9a-f]{96}")
_ACCOUNT = re.compile(r"\d{12}")
_ROOT = re.compile(r"arn:aws[\w-]*:iam::(\d{12}):root")
_PRINCIPAL_ARN = re.compile(r"arn:aws[\w-]*:(?:iam|sts)::(\d{12}):\S+")
_PCR_KEY = re.compile(r"kms:recipientattestation:(?:imagesha384|pcr(\d{1,2}))")


# ---------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class Decision:
    allowed: bool
    effect: str  # "Allow" | "ExplicitDeny" | "ImplicitDeny"
    statement: str | None  # Sid of the deciding statement, or "Statement[i]" when it has none
    reason: str


def _equals(value: str, pattern: str) -> bool:
    return value == pattern


def _equals_ignore_case(value: str, pattern: str) -> bool:
    return value.casefold() == pattern.casefold()


def _like(value: str, pattern: str) -> bool:
    return _glob(pattern, False).fullmatch(value) is not None


def _bool(value: str, pattern: str) -> bool:
    return value.lower() == pattern


# Base operator -> (comparison, negated). A negated operator is true when the
# request value matches none of the policy values; Null is handled apart.
_OPERATORS: dict[str, tuple[Callable[[str, str], bool] | None, bool]] = {
    "StringEquals": (_equals, False),
    "StringNotEquals": (_equals, True),
    "StringEqualsIgnoreCase": (_equals_ignore_case, False),
    "StringNotEqualsIgnoreCase": (_equals_ignore_case, True),
    "StringLike": (_like, False),
    "StringNotLike": (_like, True),
    "ArnEquals": (_like, False),  # AWS lets ArnEquals take wildcards too
    "ArnLike": (_like, False),
    "ArnNotEquals": (_like, True),
    "ArnNotLike": (_like, True),
    "Bool": (_bool, False),
    "Null": (None, False),
}
_QUALIFIERS = ("ForAnyValue", "ForAllValues")
_ELEMENTS = {
    "Sid",
    "Effect",
    "Principal",
    "NotPrincipal",
    "Action",
    "NotAction",
    "Resource",
    "NotResource",
    "Condition",
}


@lru_cache(maxsize=1024)
def _glob(pattern: str, ignore_case: bool) -> re.Pattern:
    """IAM wildcards: * is any run of characters, ? exactly one; nothing else is special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


@dataclass(frozen=True)
class _Operator:
    name: str
    match: Callable[[str, str], bool] | None  # None for Null
    negated: bool
    if_exists: bool
    qualifier: str | None


@dataclass(frozen=True)
class _Condition:
    operator: _Operator
    key: str  # as written in the policy
    values: tuple[str, ...]

    def holds(self, request: Mapping[str, tuple[str, ...]]) -> bool:
        op, found = self.operator, request.get(self.key.lower())
        if op.match is None:  # Null: "true" means the key must be absent
            return any((found is None) == (value == "true") for value in self.values)
        if found is None:
            if op.if_exists or op.qualifier == "ForAllValues":
                return True
            if op.qualifier == "ForAnyValue":
                return False
            return op.negated  # absent: positive operators fail, negated ones hold

        def holds_for(item: str) -> bool:
            return any(op.match(item, value) for value in self.values) != op.negated

        if op.qualifier == "ForAllValues":
            return all(holds_for(item) for item in found)
        if op.qualifier == "ForAnyValue":
            return any(holds_for(item) for item in found)
        # Unqualified on a multi-valued request value: it matches if any request value matches.
        return any(op.match(item, value) for item in found for value in self.values) != op.negated

    def describe(self) -> str:
        return f"{self.operator.name} on {self.key}"


@dataclass(frozen=True)
class _Statement:
    label: str
    effect: str
    principals: tuple[str, ...]  # "*" means anyone
    actions: tuple[str, ...]
    not_action: bool
    resources: tuple[str, ...]
    conditions: tuple[_Condition, ...]

    def principal_match(self, principal: str) -> str | None:
        """How the principal matches: "any" ("*"), "exact" (its ARN), "account" (via its account), or None."""
        account = _account_of(principal)
        best = None
        for entry in self.principals:
            if entry == "*":
                return "any"
            if entry == principal:
                return "exact"
            root = _ROOT.fullmatch(entry)
            entry_account = root.group(1) if root else entry if _ACCOUNT.fullmatch(entry) else None
            if entry_account is not None and entry_account == account:
                best = "account"
        return best

    def covers(self, action: str) -> bool:
        hit = any(_glob(pattern, True).fullmatch(action) for pattern in self.actions)
        return hit != self.not_action

    def on_resource(self, resource: str | None) -> bool:
        # A key policy is attached to one key, so without a resource every statement is about it.
        return resource is None or any(_glob(pattern, False).fullmatch(resource) for pattern in self.resources)

    def unmet(self, request: Mapping[str, tuple[str, ...]]) -> list[_Condition]:
        return [condition for condition in self.conditions if not condition.holds(request)]


def _account_of(principal: str) -> str | None:
    if _ACCOUNT.fullmatch(principal):
        return principal
    arn = _PRINCIPAL_ARN.fullmatch(principal)
    return arn.group(1) if arn else None


def _strings(value, where: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise PolicyError(f"{where} is an empty list; give at least one value or remove it.")
    if not all(isinstance(item, str) and item for item in items):
        raise PolicyError(f"{where} must be a non-empty string or a list of them, got {value!r}; fix the key policy.")
    return tuple(items)


def _condition_values(value, where: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise PolicyError(f"{where} has an empty value list; give at least one value or remove the key.")
    out = []
    for item in items:
        if isinstance(item, bool):
            out.append("true" if item else "false")
        elif isinstance(item, (str, int, float)):
            out.append(str(item))
        else:
            raise PolicyError(f"{where} has the value {item!r}, which is not a string, number or boolean; fix it.")
    return tuple(out)


def _parse_operator(name: str, where: str) -> _Operator:
    qualifier, _colon, base = name.rpartition(":")
    if_exists = base.endswith("IfExists") and base != "IfExists"
    if if_exists:
        base = base[: -len("IfExists")]
    if base not in _OPERATORS or (qualifier and qualifier not in _QUALIFIERS):
        supported = ", ".join(_OPERATORS)
        raise PolicyError(
            f"{where} uses the condition operator {name!r}, which this evaluator does not know"
            f" (supported: {supported}, with an optional IfExists suffix and ForAnyValue:/ForAllValues: prefix);"
            " fix the operator name (they are case-sensitive) or rewrite the condition."
        )
    if base == "Null" and (if_exists or qualifier):
        raise PolicyError(f"{where} uses {name!r}, but Null takes neither IfExists nor a set qualifier; write 'Null'.")
    match, negated = _OPERATORS[base]
    return _Operator(name, match, negated, if_exists, qualifier or None)


def _parse_conditions(block, where: str) -> tuple[_Condition, ...]:
    if not isinstance(block, dict):
        raise PolicyError(f"{where}: Condition must be an object of operator -> {{key: values}}; fix it.")
    conditions = []
    for name, keys in block.items():
        operator = _parse_operator(name, where)
        if not isinstance(keys, dict) or not keys:
            raise PolicyError(f"{where}: Condition operator {name!r} must map condition keys to values; fix it.")
        for key, raw in keys.items():
            values = _condition_values(raw, f"{where}: condition {name} on {key}")
            if operator.match in (None, _bool):
                values = tuple(value.lower() for value in values)
                if not set(values) <= {"true", "false"}:
                    raise PolicyError(
                        f"{where}: {name} on {key} takes only true or false, got {list(values)}; write one of those."
                    )
            conditions.append(_Condition(operator, key, values))
    return tuple(conditions)


def _parse_statement(raw, index: int) -> _Statement:
    if not isinstance(raw, dict):
        raise PolicyError(f"Statement[{index}] is not an object; every statement must be a JSON object.")
    label = raw.get("Sid") if isinstance(raw.get("Sid"), str) and raw.get("Sid") else f"Statement[{index}]"
    where = f"statement {label}"
    unknown = sorted(set(raw) - _ELEMENTS)
    if unknown:  # a misspelt "Condition" would otherwise silently widen the statement
        raise PolicyError(f"{where} has unknown elements {unknown}; fix their spelling (elements are case-sensitive).")
    if raw.get("Effect") not in ("Allow", "Deny"):
        raise PolicyError(f"{where} has Effect {raw.get('Effect')!r}; it must be exactly 'Allow' or 'Deny'.")
    if "NotPrincipal" in raw:
        raise PolicyError(
            f"{where} uses NotPrincipal, which this evaluator does not support (its account/session semantics"
            ' are a known trap); use Principal "*" with a condition on aws:PrincipalArn instead.'
        )
    if "NotResource" in raw:
        raise PolicyError(f'{where} uses NotResource, which means nothing in a key policy; use "Resource": "*".')
    if "Principal" not in raw:
        raise PolicyError(f'{where} has no Principal; every key policy statement must name one (or "*").')
    principal = raw["Principal"]
    if principal == "*":
        principals: tuple[str, ...] = ("*",)
    elif isinstance(principal, dict) and principal:
        principals = tuple(p for kind, v in principal.items() for p in _strings(v, f"{where}: Principal {kind}"))
    else:
        raise PolicyError(f'{where} has Principal {principal!r}; write "*" or {{"AWS": "<arn>" or [...]}}.')
    if ("Action" in raw) == ("NotAction" in raw):
        raise PolicyError(f"{where} must have exactly one of Action and NotAction; keep one of them.")
    not_action = "NotAction" in raw
    actions = _strings(raw["NotAction" if not_action else "Action"], f"{where}: Action")
    if "Resource" not in raw:
        raise PolicyError(f'{where} has no Resource; in a key policy write "Resource": "*".')
    resources = _strings(raw["Resource"], f"{where}: Resource")
    conditions = _parse_conditions(raw.get("Condition", {}), where)
    return _Statement(label, raw["Effect"], principals, actions, not_action, resources, conditions)


def _no_duplicate_keys(pairs):
    keys = [key for key, _value in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:  # json keeps the last one silently; a duplicated operator would drop a condition
        raise PolicyError(f"the key policy repeats the JSON keys {duplicates} in one object; merge them into one.")
    return dict(pairs)


def _load(policy: dict | str) -> dict:
    """A fresh dict from JSON text or a dict (the caller's dict is never modified)."""
    try:
        text = policy if isinstance(policy, str) else json.dumps(policy)
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (TypeError, ValueError) as err:
        raise PolicyError(f"the key policy is not valid JSON ({err}); fix the document.") from err
    if not isinstance(doc, dict):
        raise PolicyError(f"the key policy must be a JSON object, got {type(doc).__name__}; fix the document.")
    return doc


def _statement_list(doc: dict) -> list:
    statements = doc.get("Statement", [])
    return [statements] if isinstance(statements, dict) else statements


def _parse(policy: dict | str) -> list[_Statement]:
    doc = _load(policy)
    unknown = sorted(set(doc) - {"Version", "Id", "Statement"})
    if unknown:
        raise PolicyError(f"the key policy has unknown top-level elements {unknown}; keep Version, Id and Statement.")
    if "Version" in doc and doc["Version"] not in _VERSIONS:
        raise PolicyError(f"the key policy has Version {doc['Version']!r}; write {VERSION!r}.")
    if "Statement" not in doc:
        raise PolicyError("the key policy has no Statement; add the statements.")
    statements = _statement_list(doc)
    if not isinstance(statements, list):
        raise PolicyError("the key policy's Statement must be an object or a list of objects; fix it.")
    return [_parse_statement(raw, index) for index, raw in enumerate(statements)]


def _request(context: Mapping | None) -> dict[str, tuple[str, ...]]:
    """Condition keys are case-insensitive; None or an empty list means absent."""
    request: dict[str, tuple[str, ...]] = {}
    for key, value in (context or {}).items():
        items = value if isinstance(value, (list, tuple, set, frozenset)) else [] if value is None else [value]
        strings = []
        for item in items:
            if isinstance(item, bool):
                strings.append("true" if item else "false")
            elif isinstance(item, (str, int, float)):
                strings.append(str(item))
            else:
                raise TypeError(f"request context value for {key!r} must be str, bool or a list of str, got {item!r}")
        if strings:
            request[key.lower()] = request.get(key.lower(), ()) + tuple(strings)
    return request


def _decide(
    statements: Sequence[_Statement], action: str, principal: str, request: Mapping, resource: str | None
) -> Decision:
    allow, near_misses = None, []
    for statement in statements:
        if not (statement.principal_match(principal) and statement.covers(action) and statement.on_resource(resource)):
            continue
        unmet = statement.unmet(request)
        if unmet and statement.effect == "Allow":
            near_misses.append(f"{statement.label} ({', '.join(c.describe() for c in unmet)} not met)")
        elif unmet:
            continue
        elif statement.effect == "Deny":
            reason = f"statement {statement.label} denies {action} to {principal}"
            return Decision(False, "ExplicitDeny", statement.label, reason)
        elif allow is None:
            allow = statement
    if allow is not None:
        return Decision(True, "Allow", allow.label, f"statement {allow.label} allows {action} to {principal}")
    detail = f"; conditions not met in: {'; '.join(near_misses)}" if near_misses else ""
    return Decision(False, "ImplicitDeny", None, f"no statement allows {action} to {principal}{detail}")


def evaluate(
    policy: dict | str,
    *,
    action: str,
    principal: str,
    context: Mapping[str, str | Sequence[str] | bool | None],
    resource: str | None = None,
) -> Decision:
    """Decide one request against a key policy: explicit Deny wins, then any Allow, else implicit deny.

    principal is the caller's ARN (or 12-digit account id). resource, when given, is
    matched against each statement's Resource; a key policy always means its own key,
    so by default every Resource matches. Raises PolicyError on a malformed policy,
    whatever the request, so a broken policy never decides anything.
    """
    return _decide(_parse(policy), action, principal, _request(context), resource)


# ---------------------------------------------------------------------------
# Rendering and merging


def _short(value: str) -> str:
    return value if len(value) <= 20 else f"{value[:16]}..."


def normalize_pcr(value: str, *, allow_debug: bool = False) -> str:
    """A PCR as KMS compares it: 96 lowercase hex characters (SHA-384); all zeros only with allow_debug."""
    if not isinstance(value, str):
        raise PolicyError(f"a PCR must be a hex string, got {type(value).__name__}; pass the PCR0 hex string.")
    text = value.strip().lower()
    if not _HEX96.fullmatch(text):
        raise PolicyError(
            f"PCR value {_short(value.strip())!r} is not a SHA-384 measurement (96 hex characters, got"
            f" {len(text)}); copy it from the Measurements printed by `nitro-cli build-enclave`."
        )
    if not allow_debug and set(text) == {"0"}:
        raise PolicyError(
            "PCR value is all zeros, which is what every debug-mode enclave attests, so any enclave the host"
            " starts in debug mode could get the key; use the image's real measurement (allow_debug only for tests)."
        )
    return text


def _pcrs(values: Sequence[str], name: str, allow_debug: bool) -> list[str]:
    """Normalized PCR values in the order given, each once (case and surrounding white space do not count)."""
    if isinstance(values, str):  # a lone string would otherwise be read character by character
        values = [values]
    try:
        return list(dict.fromkeys(normalize_pcr(value, allow_debug=allow_debug) for value in values))
    except PolicyError as err:
        raise PolicyError(f"{name}: {err}") from err


def _principal_arns(values: Sequence[str], name: str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    out = set()
    for value in values:
        text = value.strip() if isinstance(value, str) else ""
        if _ACCOUNT.fullmatch(text):  # KMS stores a bare account id as its root ARN
            text = f"arn:aws:iam::{text}:root"
        if not _PRINCIPAL_ARN.fullmatch(text):
            raise PolicyError(
                f"{name} entry {value!r} is not an IAM principal ARN or 12-digit account id"
                ' ("*" is refused: the key must go to named principals only); fix the principal.'
            )
        out.add(text)
    if not out:
        raise PolicyError(f"{name} is empty; name at least one IAM principal ARN.")
    return sorted(out)


def _deny_without(sid: str, key: str, values: list[str]) -> dict:
    # Negated operator: true when the request value differs from every allowed
    # value, and also when the key is absent, i.e. no attestation at all.
    return {
        "Sid": sid,
        "Effect": "Deny",
        "Principal": "*",
        "Action": list(GUARDED_ACTIONS),
        "Resource": "*",
        "Condition": {"StringNotEqualsIgnoreCase": {key: values}},
    }


def render_policy(
    *,
    account_id: str,
    user_principals: Sequence[str],
    pcr0: Sequence[str],
    pcr8: Sequence[str] = (),
    admin_principals: Sequence[str] | None = None,
    existing: dict | str | None = None,
    allow_debug: bool = False,
) -> dict:
    """The owner's key policy: admin, attested Allow for the user, Deny without attestation.

    Deterministic, so rendering again gives an equal dict: principals and PCR8 values are
    sorted; PCR0 values keep the order given (newest first, by convention: the policy is
    the only record of which values are newest, see allowed_pcr0). All are deduplicated
    and lowercase. With `existing`, foreign statements are kept as they are and ours are
    replaced by Sid in place (see merge_statements), except AWS's default statement
    (SID_AWS_DEFAULT: the whole account may use the key), which OwnerAdministers replaces.

    PCR8 gets its own Deny statement: two keys under one negated operator AND
    together, so a single Deny would fire only when PCR0 *and* PCR8 both mismatch.
    """
    account = str(account_id).strip()
    if not _ACCOUNT.fullmatch(account):
        raise PolicyError(f"account_id {account_id!r} is not a 12-digit AWS account id; pass the key owner's account.")
    if admin_principals is None:
        raise PolicyError(
            "admin_principals is not set: name the owner's roles (e.g. arn:aws:iam::"
            f"{account}:role/owner); the account root would let every principal IAM allows in the account generate"
            " data keys, which lint refuses."
        )
    admins = _principal_arns(admin_principals, "admin_principals")
    users = _principal_arns(user_principals, "user_principals")
    both = sorted(set(admins) & set(users))
    if both:  # an admin can rewrite the policy and drop the Deny: the host must never administer the key
        raise PolicyError(
            f"{both} would be both key administrator and enclave user, and an administrator can remove the Deny;"
            " give the parent host its own role."
        )
    pcr0s, pcr8s = _pcrs(pcr0, "pcr0", allow_debug), sorted(_pcrs(pcr8, "pcr8", allow_debug))
    if not pcr0s:
        raise PolicyError("pcr0 is empty; give the PCR0 of at least one enclave image, or nothing could decrypt.")
    attestation = {IMAGE_SHA384: pcr0s} | ({PCR8: pcr8s} if pcr8s else {})
    statements = [
        {"Sid": SID_ADMIN, "Effect": "Allow", "Principal": {"AWS": admins}, "Action": ["kms:*"], "Resource": "*"},
        {
            "Sid": SID_ALLOW,
            "Effect": "Allow",
            "Principal": {"AWS": users},
            "Action": list(ENCLAVE_ACTIONS),
            "Resource": "*",
            "Condition": {"StringEqualsIgnoreCase": attestation},
        },
        _deny_without(SID_DENY, IMAGE_SHA384, pcr0s),
    ]
    if pcr8s:
        statements.append(_deny_without(SID_DENY_PCR8, PCR8, pcr8s))
    stale = (SID_AWS_DEFAULT,) if pcr8s else (SID_DENY_PCR8, SID_AWS_DEFAULT)  # PCR8 unpinned: its Deny goes too
    return merge_statements(
        {"Version": VERSION, "Statement": []} if existing is None else existing, statements, drop=stale
    )


def merge_statements(existing: dict | str, statements: Sequence[dict], *, drop: Iterable[str] = ()) -> dict:
    """Replace statements by Sid in place, append new ones, remove the Sids in `drop`.

    Statements with other Sids (or none) are kept unchanged and in order: the owner's
    own statements are never dropped. A repeated Sid of ours is stale and removed.
    """
    doc = _load(existing)
    current = _statement_list(doc)
    if not isinstance(current, list):
        raise PolicyError("the existing key policy's Statement must be an object or a list; fix it first.")
    ours: dict[str, dict] = {}
    for statement in statements:
        sid = statement.get("Sid") if isinstance(statement, dict) else None
        if not isinstance(sid, str) or not sid or sid in ours:
            raise PolicyError(f"every statement to merge needs its own Sid, got {sid!r}; give each a unique Sid.")
        ours[sid] = _load(statement)
    dropped = set(drop) - set(ours)
    merged, placed = [], set()
    for statement in current:
        sid = statement.get("Sid") if isinstance(statement, dict) else None
        if sid in ours:
            if sid not in placed:
                merged.append(ours[sid])
                placed.add(sid)
        elif sid is None or sid not in dropped:
            merged.append(statement)
    merged.extend(statement for sid, statement in ours.items() if sid not in placed)
    doc.setdefault("Version", VERSION)
    doc["Statement"] = merged
    return doc


def remove_ours(existing: dict | str, key_arn: str) -> dict:
    """The policy without our statements; when nothing is left, AWS's default statement for the key's account
    (as the key was created), since a key policy needs an administrator."""
    policy = merge_statements(existing, [], drop=OUR_SIDS)
    if policy["Statement"]:
        return policy
    account = key_arn.split(":")[4] if key_arn.count(":") >= 5 else ""
    if not _ACCOUNT.fullmatch(account):
        raise PolicyError(f"{key_arn!r} is not a KMS key ARN; cannot name its account's root")
    root = {"Sid": SID_AWS_DEFAULT, "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
            "Action": "kms:*", "Resource": "*"}  # fmt: skip
    return policy | {"Statement": [root]}


def allowed_pcr0(policy: dict | str) -> list[str]:
    """The PCR0 values our Allow statement carries now, lowercase, each once, in the policy's order; [] if absent.

    render_policy writes them in the order given, newest first, so this is newest first too."""
    values = {}
    for statement in _statement_list(_load(policy)):
        if not isinstance(statement, dict) or statement.get("Sid") != SID_ALLOW:
            continue
        for condition in _parse_statement(statement, 0).conditions:
            if condition.key.lower() == IMAGE_SHA384.lower() and not condition.operator.negated:
                values.update(dict.fromkeys(value.strip().lower() for value in condition.values))
    return list(values)


def _pretty(policy: dict | str | None) -> str:
    return "" if policy is None else json.dumps(_load(policy), indent=2, sort_keys=True) + "\n"


def policy_diff(before: dict | str | None, after: dict | str | None) -> dict:
    """Ansible's diff: both sides as pretty JSON with sorted keys (None gives "")."""
    return {"before": _pretty(before), "after": _pretty(after)}


# ---------------------------------------------------------------------------
# What the owner asks of a key's policy, decided once for the enclave_key_policy module and `enclave policy apply`


class UnsoundPolicyError(PolicyError):
    """The policy that would be written fails lint; nothing was written. problems: lint's list; policy: that policy.
    (Kept here until the error classes gather in errors.py.)"""

    def __init__(self, key: str, problems: list[str], policy: dict):
        super().__init__(
            f"refusing to write an unsound key policy for {key}: {' '.join(problems)} Nothing was written; fix the"
            " statements named above."
        )
        self.problems, self.policy = problems, policy


class KeyPolicyKmsError(KmsError):
    """A KMS call of apply_key_policy failed. operation: the KMS operation; code: KMS's error code, or None."""

    def __init__(self, message: str, operation: str, code: str | None):
        super().__init__(message)
        self.operation, self.code = operation, code


def rotation_window(
    pcr0: Sequence[str], allowed: Sequence[str], keep_newest: int | None = None
) -> tuple[list[str], list[str]]:
    """The PCR0 values to allow, newest first, and a warning for each allowed value that is not carried over.

    The candidates are pcr0 in the order given, then the values allowed now in the policy's order (newest first,
    as render_policy wrote them: KMS records no age, so that order is the only one); a value counts once, at its
    first place; the first keep_newest stay (all of them when None). An allowed value that is no valid PCR0 (a
    debug enclave's zeros, say) is dropped with a warning: the policy written is sound, not a copy of what was."""
    _check_keep_newest(keep_newest)
    candidates = _pcrs(pcr0, "pcr0", False)
    warnings = []
    for value in allowed:
        try:
            candidates.append(normalize_pcr(value))
        except PolicyError as err:
            warnings.append(f"the current key policy allows a PCR0 that is not carried over: {err}")
    ordered = list(dict.fromkeys(candidates))
    return (ordered if keep_newest is None else ordered[:keep_newest]), warnings


def _check_keep_newest(keep_newest) -> None:
    if keep_newest is not None and (isinstance(keep_newest, bool) or not isinstance(keep_newest, int)
                                    or keep_newest < 1):  # fmt: skip
        raise PolicyError(f"keep_newest is {keep_newest}; give 1 or more, or leave it unset.")


@dataclass(frozen=True)
class KeyPolicyChange:
    """A key policy before and after (in check mode: what would be written), and what the run had to say."""

    key_arn: str
    before: dict
    after: dict
    warnings: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        # As data: formatting and key order do not count, so a second run with the same inputs changes nothing.
        return self.after != self.before

    @property
    def allowed_pcr0(self) -> list[str]:
        return allowed_pcr0(self.after)

    def diff(self) -> dict:
        return policy_diff(self.before, self.after)


@dataclass(frozen=True)
class OwnerKeyPolicy:
    """What the owner asks of a key's policy: our statements present, with the PCR0 rotation window, or absent.

    pcr0 is added to the values the policy allows now (see rotation_window); pcr8 replaces the current list."""

    state: str = "present"
    account_id: str | None = None
    user_principals: Sequence[str] = ()
    admin_principals: Sequence[str] | None = None
    pcr0: Sequence[str] = ()
    pcr8: Sequence[str] = ()
    keep_newest: int | None = None

    def __post_init__(self):  # before any KMS call: bad input fails first
        if self.state not in ("present", "absent"):
            raise PolicyError(f"state is {self.state!r}; give present or absent.")
        _check_keep_newest(self.keep_newest)

    def plan(self, current: dict | str, key_arn: str) -> KeyPolicyChange:
        """The policy to write over current; raises UnsoundPolicyError when lint refuses it."""
        before = _load(current)
        if self.state == "absent":
            return KeyPolicyChange(key_arn, before, remove_ours(before, key_arn))
        window, warnings = rotation_window(self.pcr0, allowed_pcr0(before), self.keep_newest)
        after = render_policy(
            account_id=self.account_id,
            user_principals=self.user_principals,
            admin_principals=self.admin_principals,
            pcr0=window,
            pcr8=self.pcr8,
            existing=before,
        )
        problems = lint(after, user_principals=self.user_principals)
        if problems:
            raise UnsoundPolicyError(key_arn, problems, after)
        return KeyPolicyChange(key_arn, before, after, tuple(warnings))


# What to do about a failed KMS call, by error code; {key_id} and {admin_principals} name the caller's options.
_KMS_ADVICE = {
    "AccessDeniedException": "the caller is not allowed to do this; run as one of the key's administrators",
    "NotFoundException": "check {key_id}, {region} and {kms_endpoint_url}",
    "MalformedPolicyDocumentException": "KMS refused the policy; keep the caller among {admin_principals} (or in"
    " another statement that allows kms:PutKeyPolicy)",
}
_KMS_DEFAULT_ADVICE = "check the KMS connection options and the key"
OPTION_NAMES = {name: name for name in ("key_id", "region", "kms_endpoint_url", "admin_principals")}


def apply_key_policy(
    kms, key_id: str, wanted: OwnerKeyPolicy, *, check_mode: bool = False, names: Mapping[str, str] = OPTION_NAMES
) -> KeyPolicyChange:
    """Read the key's policy (DescribeKey resolves an alias: GetKeyPolicy and PutKeyPolicy take none), plan the
    change, and write it with PutKeyPolicy only when it differs as data, never in check mode. kms is a boto3 KMS
    client; names: how the caller spells the options its advice names (the module's by default)."""

    def call(operation: str, method, target: str, **kwargs):
        try:
            return method(**kwargs)
        except _BOTO_ERRORS as err:
            code = (getattr(err, "response", None) or {}).get("Error", {}).get("Code") or None
            advice = _KMS_ADVICE.get(code, _KMS_DEFAULT_ADVICE).format(**{**OPTION_NAMES, **names})
            raise KeyPolicyKmsError(f"KMS {operation} on {target} failed: {err}; {advice}", operation, code) from err

    key_arn = call("DescribeKey", kms.describe_key, key_id, KeyId=key_id)["KeyMetadata"]["Arn"]
    text = call("GetKeyPolicy", kms.get_key_policy, key_arn, KeyId=key_arn, PolicyName="default")["Policy"]
    try:
        current = json.loads(text)
    except ValueError as err:
        raise PolicyError(f"the key policy of {key_arn} is not JSON ({err}); fix it in KMS first.") from err
    try:
        change = wanted.plan(current, key_arn)
    except UnsoundPolicyError:
        raise
    except PolicyError as err:
        raise PolicyError(f"cannot compute the key policy of {key_arn}: {err}") from err
    if change.changed and not check_mode:
        call(
            "PutKeyPolicy",
            kms.put_key_policy,
            key_arn,
            KeyId=key_arn,
            PolicyName="default",
            Policy=json.dumps(change.after, indent=2),
        )
    return change


# ---------------------------------------------------------------------------
# Lint


def _attestation_values(statements: Sequence[_Statement]) -> dict[int, list[str]]:
    """PCR index -> well-formed values the policy mentions (ImageSha384 is PCR0)."""
    found: dict[int, set[str]] = {}
    for statement in statements:
        for condition in statement.conditions:
            key = _PCR_KEY.fullmatch(condition.key.lower())
            if key:
                index = int(key.group(1) or 0)
                found.setdefault(index, set()).update(
                    v.lower() for v in condition.values if _HEX96.fullmatch(v.lower())
                )
    return {index: sorted(values) for index, values in found.items() if values}


def _attestation(pcrs: Mapping[int, str]) -> dict[str, str]:
    context = {f"kms:RecipientAttestation:PCR{index}": value for index, value in pcrs.items()}
    if 0 in pcrs:
        context[IMAGE_SHA384] = pcrs[0]
    return context


def _check_values(statement: _Statement, allow_debug: bool) -> list[str]:
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
            if not _HEX96.fullmatch(value.lower()):
                problems.append(
                    f"{where} has {_short(value)!r}, which is not a 96-hex-character SHA-384 measurement"
                    f" ({len(value)} characters); copy the exact value printed by `nitro-cli build-enclave`."
                )
            elif set(value) == {"0"} and not allow_debug:
                problems.append(
                    f"{where} has an all-zero PCR, which every debug-mode enclave attests, so a host could get"
                    " the key from an enclave it can inspect; use the image's real measurement."
                )
            elif value != value.lower() and condition.operator.match is _equals:
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


def _probe_principals(statements: Sequence[_Statement], users: Sequence[str]) -> list[str]:
    """Every principal the policy names, a role in each account it names, and a role of an unrelated account."""
    named = {p for s in statements for p in s.principals if p != "*"} | set(users)
    accounts = {_account_of(p) or (m.group(1) if (m := _ROOT.fullmatch(p)) else None) for p in named} - {None}
    foreign = next(f"{n:012d}" for n in range(999999999999, 0, -1) if f"{n:012d}" not in accounts)
    return sorted(
        {p for p in named if _account_of(p)} | {f"arn:aws:iam::{a}:role/lint-probe" for a in accounts | {foreign}}
    )


def _probes(
    principal: str, statements: Sequence[_Statement], pinned: Mapping[int, list[str]], allow_debug: bool
) -> list[_Probe]:
    """Requests that must all be refused: no attestation, a debug enclave, another image, an unpinned PCR."""
    right = {index: values[0] for index, values in pinned.items()}
    known = {value for values in pinned.values() for value in values}
    wrong = next(h for n in range(99) if (h := hashlib.sha384(b"lint-probe-%d" % n).hexdigest()) not in known)
    caller = {"kms:CallerAccount": _account_of(principal)}
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
    return bool(_ROOT.fullmatch(principal) or _ACCOUNT.fullmatch(principal))


def _broad_principals(statements: Sequence[_Statement], actions: Sequence[str]) -> list[str]:
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
        doc = _load(policy)
    except PolicyError as err:
        return [str(err)]
    problems = []
    if "Version" not in doc:
        problems.append(f'the key policy has no Version; add "Version": "{VERSION}".')
    try:
        statements = _parse(doc)
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
    leaks: dict[tuple[str, str, str], list[str]] = {}
    for principal, cases in probes.items():
        for probe in cases:
            for action in probe.actions:
                decision = _decide(statements, action, principal, _request(probe.context), None)
                if decision.allowed:
                    leaks.setdefault((decision.statement, action, probe.situation), []).append(principal)
    problems += [
        f'statement {label} lets {", ".join(who)} call {action} {situation}; add a Deny for Principal "*"'
        f" with StringNotEqualsIgnoreCase on the attestation keys (render_policy writes {SID_DENY!r})."
        for (label, action, situation), who in leaks.items()
    ]

    # The Deny on its own must stop every caller without an attestation, whatever else the policy allows.
    def stops_unattested(deny: _Statement) -> bool:
        return all(
            _decide([deny], "kms:Decrypt", principal, _request(probe.context), None).effect == "ExplicitDeny"
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
            f"statement {s.label} lets the whole account {_account_of(user)} (its IAM) call kms:PutKeyPolicy and"
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
            and _decide([s], "kms:Decrypt", user, {}, None).allowed
        ]
        # And the point of it all: the user's enclave of an allowed image gets the key.
        right = {index: values[0] for index, values in pinned.items()}
        for pcr0 in pinned.get(0, []):
            decision = _decide(statements, "kms:Decrypt", user, _request(_attestation(right | {0: pcr0})), None)
            if not decision.allowed:
                problems.append(
                    f"{user} cannot call kms:Decrypt even from an enclave of an allowed image ({_short(pcr0)}):"
                    f" {decision.reason}; fix the Allow statement or the statement that blocks it."
                )
    return list(dict.fromkeys(problems))


# ---------------------------------------------------------------------------------------------------------------
# The owner's package-signing key (ECC_NIST_P384, SIGN_VERIFY): what binds packages to the owner is that only the
# owner can call kms:Sign with it.


def render_signing_policy(
    *, account_id: str, owner_principals: Sequence[str], reader_principals: Sequence[str] = ()
) -> dict:
    """The signing key's policy: the owner's roles administer it and sign; readers may only read the public key."""
    if not _ACCOUNT.fullmatch(str(account_id).strip()):
        raise PolicyError(f"account_id {account_id!r} is not a 12-digit AWS account id; pass the key owner's account.")
    owners = _principal_arns(owner_principals, "owner_principals")
    statements = [
        {"Sid": SID_SIGNING_ADMIN, "Effect": "Allow", "Principal": {"AWS": owners}, "Action": ["kms:*"],
         "Resource": "*"},
    ]  # fmt: skip
    readers = (
        sorted(set(_principal_arns(reader_principals, "reader_principals")) - set(owners)) if reader_principals else []
    )
    if readers:
        statements.append(
            {"Sid": SID_SIGNING_READERS, "Effect": "Allow", "Principal": {"AWS": readers},
             "Action": list(SIGNING_READ_ACTIONS), "Resource": "*"}
        )  # fmt: skip
    return {"Version": VERSION, "Statement": statements}


def lint_signing_policy(policy: dict | str, *, owner_principals: Sequence[str]) -> list[str]:
    """Problems that let anyone but the owner sign packages with this key; [] means sound.

    Every principal an Allow of kms:Sign names must be one of owner_principals (no wildcard, no whole account,
    no other role, conditions or not: a condition is not an identity), and each owner must be able to sign."""
    try:
        doc = _load(policy)
        statements = _parse(doc)
        owners = set(_principal_arns(owner_principals, "owner_principals"))
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
        decision = _decide(statements, "kms:Sign", owner, {}, None)
        if not decision.allowed:
            problems.append(f"the owner {owner} cannot call kms:Sign: {decision.reason}; allow it.")
    return list(dict.fromkeys(problems))
