"""KMS key policies evaluated as AWS does it: parse, then decide a request (explicit Deny, then Allow, else deny).

Hand-written on purpose: no Python library evaluates IAM/KMS key policies with AWS's semantics (an absent key
makes positive operators false and negated ones true, negated operators AND their values, IfExists, Null,
ForAnyValue/ForAllValues), and the local KMS must enforce key policies exactly as AWS KMS does, or a test that
passes locally would prove nothing. The local KMS decides with evaluate(); policy_lint probes a policy with
decide() on the parsed statements.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .errors import PolicyError

VERSION = "2012-10-17"
_VERSIONS = ("2012-10-17", "2008-10-17")  # KMS accepts both; only policy variables differ

ACCOUNT_ID = re.compile(r"\d{12}")
ROOT_ARN = re.compile(r"arn:aws[\w-]*:iam::(\d{12}):root")
PRINCIPAL_ARN = re.compile(r"arn:aws[\w-]*:(?:iam|sts)::(\d{12}):\S+")


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
class Operator:
    name: str
    match: Callable[[str, str], bool] | None  # None for Null
    negated: bool
    if_exists: bool
    qualifier: str | None

    @property
    def case_sensitive(self) -> bool:
        """Whether it compares strings exactly (StringEquals, StringNotEquals)."""
        return self.match is _equals


@dataclass(frozen=True)
class Condition:
    operator: Operator
    key: str  # as written in the policy
    values: tuple[str, ...]

    def holds(self, request: Mapping[str, tuple[str, ...]]) -> bool:
        op, found = self.operator, request.get(self.key.lower())
        match = op.match  # a local, so that holds_for sees it is not None
        if match is None:  # Null: "true" means the key must be absent
            return any((found is None) == (value == "true") for value in self.values)
        if found is None:
            if op.if_exists or op.qualifier == "ForAllValues":
                return True
            if op.qualifier == "ForAnyValue":
                return False
            return op.negated  # absent: positive operators fail, negated ones hold

        def holds_for(item: str) -> bool:
            return any(match(item, value) for value in self.values) != op.negated

        if op.qualifier == "ForAllValues":
            return all(holds_for(item) for item in found)
        if op.qualifier == "ForAnyValue":
            return any(holds_for(item) for item in found)
        # Unqualified on a multi-valued request value: it matches if any request value matches.
        return any(match(item, value) for item in found for value in self.values) != op.negated

    def describe(self) -> str:
        return f"{self.operator.name} on {self.key}"


@dataclass(frozen=True)
class Statement:
    label: str
    effect: str
    principals: tuple[str, ...]  # "*" means anyone
    actions: tuple[str, ...]
    not_action: bool
    resources: tuple[str, ...]
    conditions: tuple[Condition, ...]

    def principal_match(self, principal: str) -> str | None:
        """How the principal matches: "any" ("*"), "exact" (its ARN), "account" (via its account), or None."""
        account = account_of(principal)
        best = None
        for entry in self.principals:
            if entry == "*":
                return "any"
            if entry == principal:
                return "exact"
            root = ROOT_ARN.fullmatch(entry)
            entry_account = root.group(1) if root else entry if ACCOUNT_ID.fullmatch(entry) else None
            if entry_account is not None and entry_account == account:
                best = "account"
        return best

    def covers(self, action: str) -> bool:
        hit = any(_glob(pattern, True).fullmatch(action) for pattern in self.actions)
        return hit != self.not_action

    def on_resource(self, resource: str | None) -> bool:
        # A key policy is attached to one key, so without a resource every statement is about it.
        return resource is None or any(_glob(pattern, False).fullmatch(resource) for pattern in self.resources)

    def unmet(self, request: Mapping[str, tuple[str, ...]]) -> list[Condition]:
        return [condition for condition in self.conditions if not condition.holds(request)]


def account_of(principal: str) -> str | None:
    if ACCOUNT_ID.fullmatch(principal):
        return principal
    arn = PRINCIPAL_ARN.fullmatch(principal)
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


def _parse_operator(name: str, where: str) -> Operator:
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
    return Operator(name, match, negated, if_exists, qualifier or None)


def _parse_conditions(block, where: str) -> tuple[Condition, ...]:
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
            conditions.append(Condition(operator, key, values))
    return tuple(conditions)


def parse_statement(raw, index: int) -> Statement:
    if not isinstance(raw, dict):
        raise PolicyError(f"Statement[{index}] is not an object; every statement must be a JSON object.")
    sid = raw.get("Sid")
    label = sid if isinstance(sid, str) and sid else f"Statement[{index}]"
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
    return Statement(label, raw["Effect"], principals, actions, not_action, resources, conditions)


def _no_duplicate_keys(pairs):
    keys = [key for key, _value in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:  # json keeps the last one silently; a duplicated operator would drop a condition
        raise PolicyError(f"the key policy repeats the JSON keys {duplicates} in one object; merge them into one.")
    return dict(pairs)


def load_policy(policy: dict | str) -> dict:
    """A fresh dict from JSON text or a dict (the caller's dict is never modified)."""
    try:
        text = policy if isinstance(policy, str) else json.dumps(policy)
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (TypeError, ValueError) as err:
        raise PolicyError(f"the key policy is not valid JSON ({err}); fix the document.") from err
    if not isinstance(doc, dict):
        raise PolicyError(f"the key policy must be a JSON object, got {type(doc).__name__}; fix the document.")
    return doc


def statement_list(doc: dict) -> list:
    statements = doc.get("Statement", [])
    return [statements] if isinstance(statements, dict) else statements


def parse_policy(policy: dict | str) -> list[Statement]:
    doc = load_policy(policy)
    unknown = sorted(set(doc) - {"Version", "Id", "Statement"})
    if unknown:
        raise PolicyError(f"the key policy has unknown top-level elements {unknown}; keep Version, Id and Statement.")
    if "Version" in doc and doc["Version"] not in _VERSIONS:
        raise PolicyError(f"the key policy has Version {doc['Version']!r}; write {VERSION!r}.")
    if "Statement" not in doc:
        raise PolicyError("the key policy has no Statement; add the statements.")
    statements = statement_list(doc)
    if not isinstance(statements, list):
        raise PolicyError("the key policy's Statement must be an object or a list of objects; fix it.")
    return [parse_statement(raw, index) for index, raw in enumerate(statements)]


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
    statements: Sequence[Statement], action: str, principal: str, request: Mapping, resource: str | None
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


def decide(
    statements: Sequence[Statement], action: str, principal: str, context: Mapping | None, resource: str | None = None
) -> Decision:
    """evaluate() on statements parse_policy already gave: policy_lint asks many questions of one policy."""
    return _decide(statements, action, principal, _request(context), resource)


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
    return _decide(parse_policy(policy), action, principal, _request(context), resource)
