"""The owner's KMS key policies as data: render our statements, merge them by Sid into a policy, the PCR0
rotation window, and the package-signing key's policy.

Key policies are edited as data, by statement Sid, never as text. Evaluation is in policy_eval, the rules a sound
policy follows in policy_lint, and the change the enclave_key_policy module and `enclave policy apply` make to a
key in key_policy_update.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

from .errors import PolicyError
from .policy_eval import ACCOUNT_ID, PRINCIPAL_ARN, VERSION, load_policy, parse_statement, statement_list

SID_ADMIN = "OwnerAdministers"
SID_ALLOW = "EnclaveDecryptWithAttestation"
SID_DENY = "DenyDecryptWithoutAttestation"
SID_DENY_PCR8 = "DenyDecryptWithoutOwnerSignedImage"  # PCR8 = hash of the image's signing certificate
OUR_SIDS = (SID_ADMIN, SID_ALLOW, SID_DENY, SID_DENY_PCR8)

IMAGE_SHA384 = "kms:RecipientAttestation:ImageSha384"
PCR8 = "kms:RecipientAttestation:PCR8"

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

PCR_HEX = re.compile(r"[0-9a-f]{96}")  # a SHA-384 measurement as KMS compares it


def abbreviate(value: str) -> str:
    """A long value (a PCR, say) cut short for a message."""
    return value if len(value) <= 20 else f"{value[:16]}..."


def normalize_pcr(value: str, *, allow_debug: bool = False) -> str:
    """A PCR as KMS compares it: 96 lowercase hex characters (SHA-384); all zeros only with allow_debug."""
    if not isinstance(value, str):
        raise PolicyError(f"a PCR must be a hex string, got {type(value).__name__}; pass the PCR0 hex string.")
    text = value.strip().lower()
    if not PCR_HEX.fullmatch(text):
        raise PolicyError(
            f"PCR value {abbreviate(value.strip())!r} is not a SHA-384 measurement (96 hex characters, got"
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


def principal_arns(values: Sequence[str], name: str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    out = set()
    for value in values:
        text = value.strip() if isinstance(value, str) else ""
        if ACCOUNT_ID.fullmatch(text):  # KMS stores a bare account id as its root ARN
            text = f"arn:aws:iam::{text}:root"
        if not PRINCIPAL_ARN.fullmatch(text):
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
    account_id: str | None,
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
    if not ACCOUNT_ID.fullmatch(account):
        raise PolicyError(f"account_id {account_id!r} is not a 12-digit AWS account id; pass the key owner's account.")
    if admin_principals is None:
        raise PolicyError(
            "admin_principals is not set: name the owner's roles (e.g. arn:aws:iam::"
            f"{account}:role/owner); the account root would let every principal IAM allows in the account generate"
            " data keys, which lint refuses."
        )
    admins = principal_arns(admin_principals, "admin_principals")
    users = principal_arns(user_principals, "user_principals")
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
    doc = load_policy(existing)
    current = statement_list(doc)
    if not isinstance(current, list):
        raise PolicyError("the existing key policy's Statement must be an object or a list; fix it first.")
    ours: dict[str, dict] = {}
    for statement in statements:
        sid = statement.get("Sid") if isinstance(statement, dict) else None
        if not isinstance(sid, str) or not sid or sid in ours:
            raise PolicyError(f"every statement to merge needs its own Sid, got {sid!r}; give each a unique Sid.")
        ours[sid] = load_policy(statement)
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
    if not ACCOUNT_ID.fullmatch(account):
        raise PolicyError(f"{key_arn!r} is not a KMS key ARN; cannot name its account's root")
    root = {"Sid": SID_AWS_DEFAULT, "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
            "Action": "kms:*", "Resource": "*"}  # fmt: skip
    return policy | {"Statement": [root]}


def allowed_pcr0(policy: dict | str) -> list[str]:
    """The PCR0 values our Allow statement carries now, lowercase, each once, in the policy's order; [] if absent.

    render_policy writes them in the order given, newest first, so this is newest first too."""
    values = {}
    for statement in statement_list(load_policy(policy)):
        if not isinstance(statement, dict) or statement.get("Sid") != SID_ALLOW:
            continue
        for condition in parse_statement(statement, 0).conditions:
            if condition.key.lower() == IMAGE_SHA384.lower() and not condition.operator.negated:
                values.update(dict.fromkeys(value.strip().lower() for value in condition.values))
    return list(values)


def _pretty(policy: dict | str | None) -> str:
    return "" if policy is None else json.dumps(load_policy(policy), indent=2, sort_keys=True) + "\n"


def policy_diff(before: dict | str | None, after: dict | str | None) -> dict:
    """Ansible's diff: both sides as pretty JSON with sorted keys (None gives "")."""
    return {"before": _pretty(before), "after": _pretty(after)}


def rotation_window(
    pcr0: Sequence[str], allowed: Sequence[str], keep_newest: int | None = None
) -> tuple[list[str], list[str]]:
    """The PCR0 values to allow, newest first, and a warning for each allowed value that is not carried over.

    The candidates are pcr0 in the order given, then the values allowed now in the policy's order (newest first,
    as render_policy wrote them: KMS records no age, so that order is the only one); a value counts once, at its
    first place; the first keep_newest stay (all of them when None). An allowed value that is no valid PCR0 (a
    debug enclave's zeros, say) is dropped with a warning: the policy written is sound, not a copy of what was."""
    check_keep_newest(keep_newest)
    candidates = _pcrs(pcr0, "pcr0", False)
    warnings = []
    for value in allowed:
        try:
            candidates.append(normalize_pcr(value))
        except PolicyError as err:
            warnings.append(f"the current key policy allows a PCR0 that is not carried over: {err}")
    ordered = list(dict.fromkeys(candidates))
    return (ordered if keep_newest is None else ordered[:keep_newest]), warnings


def check_keep_newest(keep_newest) -> None:
    if keep_newest is not None and (isinstance(keep_newest, bool) or not isinstance(keep_newest, int)
                                    or keep_newest < 1):  # fmt: skip
        raise PolicyError(f"keep_newest is {keep_newest}; give 1 or more, or leave it unset.")


# ---------------------------------------------------------------------------------------------------------------
# The owner's package-signing key (ECC_NIST_P384, SIGN_VERIFY): what binds packages to the owner is that only the
# owner can call kms:Sign with it.


def render_signing_policy(
    *, account_id: str, owner_principals: Sequence[str], reader_principals: Sequence[str] = ()
) -> dict:
    """The signing key's policy: the owner's roles administer it and sign; readers may only read the public key."""
    if not ACCOUNT_ID.fullmatch(str(account_id).strip()):
        raise PolicyError(f"account_id {account_id!r} is not a 12-digit AWS account id; pass the key owner's account.")
    owners = principal_arns(owner_principals, "owner_principals")
    statements = [
        {"Sid": SID_SIGNING_ADMIN, "Effect": "Allow", "Principal": {"AWS": owners}, "Action": ["kms:*"],
         "Resource": "*"},
    ]  # fmt: skip
    readers = (
        sorted(set(principal_arns(reader_principals, "reader_principals")) - set(owners)) if reader_principals else []
    )
    if readers:
        statements.append(
            {"Sid": SID_SIGNING_READERS, "Effect": "Allow", "Principal": {"AWS": readers},
             "Action": list(SIGNING_READ_ACTIONS), "Resource": "*"}
        )  # fmt: skip
    return {"Version": VERSION, "Statement": statements}
